"""The HF side of conversion: safetensors files read by row ranges (in place where possible) and written straight
from tensor memory or from the checkpoint's files.

Copies are read, not taken from a mapping: mapped pages that this process touches count in its RSS on top of
the copies made of them, the "two copies" a node must not hold. Views over memory-mapped files are only handed
to the checkpoint writer's forked processes, which stream them to disk from the page cache.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mathtir.convert import rules
from mathtir.convert.rawio import pread_into
from mathtir.models.llama import ModelSpec

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class _SafetensorsFile:
    """Row ranges of the tensors in one .safetensors file: read with pread into memory of the caller's, or,
    where the stored bytes already are the wanted tensor, viewed in place over the memory-mapped file.

    Copies are read, not taken from a mapping: mapped pages that this process touches count in its RSS on
    top of the copies made of them, the "two copies" a node must not hold. Views are only handed to the
    checkpoint writer's forked processes, which stream them to disk from the page cache.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from e
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header
        self._mmap: mmap.mmap | None = None
        # A truncated file is named here, not by whichever read or memory-mapped view first runs past its end.
        size = os.path.getsize(path)
        for name, entry in header.items():
            if self.data_start + entry["data_offsets"][1] > size:
                raise ValueError(f"{path}: truncated: tensor {name!r} ends at byte "
                                 f"{self.data_start + entry['data_offsets'][1]}, the file has {size}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def row_view(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` as a tensor over the file's own pages (memory-mapped copy-on-
        write: nothing is read until the tensor is, and the file is never written)."""
        entry = self.entries[name]
        dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{self.path}: rows {start}:{stop} are outside tensor {name!r} {list(shape)}")
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        row = math.prod(shape[1:])
        offset = self.data_start + entry["data_offsets"][0] + start * row * dtype.itemsize
        return torch.frombuffer(self._mmap, dtype=dtype, count=(stop - start) * row,
                                offset=offset).view(stop - start, *shape[1:])

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self.entries[name]["dtype"]]

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows [start, stop) of tensor `name` into `out` (converted if `out` has another dtype)."""
        entry = self.entries[name]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
        if not shape:
            raise ValueError(f"{self.path}: tensor {name!r} is a scalar, not a weight matrix or vector")
        if tuple(out.shape) != (stop - start, *shape[1:]) or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{self.path}: rows {start}:{stop} of tensor {name!r} {tuple(entry['shape'])} do "
                             f"not fit the destination {tuple(out.shape)}")
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        begin, end = entry["data_offsets"]
        if end - begin != row_bytes * shape[0]:
            raise ValueError(f"{self.path}: tensor {name!r}: data size does not match shape {list(shape)}")
        target = out if out.dtype == dtype and out.is_contiguous() else torch.empty(out.shape, dtype=dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            pread_into(fd, self.data_start + begin + start * row_bytes, target, f"{self.path}: tensor {name!r}")
        finally:
            os.close(fd)
        if target is not out:
            out.copy_(target)


class HFWeights:
    """Tensor-by-tensor access to an HF directory's safetensors (single file or sharded with an index)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else [single.name]
        self._files = {}
        for name in files:
            if not (self.dir / name).is_file():
                raise FileNotFoundError(f"{self.dir / name}: listed in the safetensors index but missing")
            self._files[name] = _SafetensorsFile(self.dir / name)
        if weight_map is None:
            weight_map = {k: single.name for k in self._files[single.name].entries}
        for tensor, fname in weight_map.items():
            if tensor not in self._files[fname].entries:
                raise KeyError(f"{self.dir / fname}: tensor {tensor!r} listed in the index is not in the file")
        self.file_of = weight_map

    def _file(self, name: str) -> _SafetensorsFile:
        if name not in self.file_of:
            raise KeyError(f"{self.dir}: tensor {name!r} is missing from the safetensors files")
        return self._files[self.file_of[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        self._file(name).read_rows(name, start, stop, out)

    def part_views(self, blocks: list[list[tuple[str, int, int]]] | None, dtype: torch.dtype) -> list | None:
        """Each part of a parameter as a tensor over the files' pages, where every part is one row range of
        one tensor stored in `dtype`; else None (the parameter has to be assembled or converted)."""
        if blocks is None or any(len(part) != 1 or self._file(part[0][0]).dtype(part[0][0]) != dtype
                                 for part in blocks):
            return None
        return [self._file(name).row_view(name, start, stop) for ((name, start, stop),) in blocks]

    def tensor(self, name: str) -> torch.Tensor:
        file = self._file(name)
        out = torch.empty(self.shape(name), dtype=_SAFETENSORS_DTYPES[file.entries[name]["dtype"]])
        file.read_rows(name, 0, out.shape[0], out)
        return out

    def check_against(self, spec: ModelSpec) -> None:
        """Every tensor the config implies exists with the implied shape, and nothing unexplained is left."""
        expected = rules.expected_hf_shapes(spec)
        for name, shape in expected.items():
            if name not in self.file_of:
                raise KeyError(f"{self.dir}: tensor {name!r} (required by config.json) is missing")
            have = self.shape(name)
            if have != shape:
                raise ValueError(
                    f"{self.dir / self.file_of[name]}: tensor {name!r} has shape {have}, config.json implies {shape}"
                )
        extra = [n for n in self.file_of if n not in expected and not rules.IGNORED_HF_TENSORS.fullmatch(n)]
        if spec.tie_word_embeddings and "lm_head.weight" in extra:
            same = torch.equal(self.tensor("lm_head.weight"), self.tensor("model.embed_tokens.weight"))
            if same:
                extra.remove("lm_head.weight")
        if extra:
            raise ValueError(f"{self.dir}: tensors not covered by the Llama mapping (unsupported model?): {extra[:5]}")


@dataclass(frozen=True)
class FileRuns:
    """An HF tensor whose bytes are, in order, these (file, offset, length) runs of the checkpoint's files:
    the kernel copies them file to file, through no memory of ours."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    runs: list[tuple[Path, int, int]]

    @property
    def nbytes(self) -> int:
        return sum(length for _, _, length in self.runs)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor | FileRuns]) -> None:
    """The safetensors format (header length, JSON header padded to 8 bytes, the tensors' bytes back to back)
    written straight from the tensors' memory or the checkpoint's files (safetensors' save_file first copies
    each tensor into a bytes object)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        header[name] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb", buffering=0) as f, contextlib.ExitStack() as sources:
        fds: dict[Path, int] = {}
        _write_all(f, len(raw).to_bytes(8, "little") + raw)
        for tensor in tensors.values():
            if isinstance(tensor, torch.Tensor):
                _write_all(f, tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                continue
            for src, start, length in tensor.runs:
                if src not in fds:
                    fds[src] = sources.enter_context(open(src, "rb", buffering=0)).fileno()
                copy_run(f.fileno(), fds[src], start, length, src)


def copy_run(out_fd: int, src_fd: int, start: int, length: int, src: Path) -> None:
    """Bytes [start, start + length) of src appended at out's position: by the kernel (sendfile), or through a
    buffer where the filesystems cannot splice (some FUSE mounts answer EINVAL)."""
    while length:
        try:
            sent = os.sendfile(out_fd, src_fd, start, length)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            sent = os.write(out_fd, os.pread(src_fd, min(length, 64 << 20), start))
        if sent <= 0:
            raise ValueError(f"{src}: truncated (wanted {length} more bytes at {start})")
        start, length = start + sent, length - sent


def _write_all(f, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        view = view[f.write(view):]


