"""Regions of a torch_dist checkpoint's tensors, by one process alone: read into memory the caller provides,
or located as runs of the checkpoint's files.

megatron's own load cannot do this in a one-process world: it describes the parts a process does not read
as held by "another rank", which with one rank is itself. So regions are read with
torch.distributed.checkpoint directly, by stored key and global offset (torch_dist stacks a model's layers
as the leading axis of each layer tensor).

Each stored tensor is a torch.save zip archive inside a .distcp file. torch.distributed.checkpoint's reader
deserializes it into new memory and copies the wanted region from there; where the archive holds the tensor
plainly (uncompressed, contiguous, little-endian) and the region is one run of its bytes, the bytes are read
here straight into the destination instead, or handed out as file ranges to copy file to file. Anything
else takes torch's own path.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mathtir.convert.rawio import pread_into
from mathtir.megatron import checkpoint

# (stored key, global offset of the region, destination with the region's shape)
Region = tuple[str, tuple[int, ...], torch.Tensor]


class PartReader:
    """Reads regions of the tensors of one checkpoint iteration (default: the latest)."""

    def __init__(self, root: str | Path, iteration: int | None = None):
        self.dir = checkpoint.iteration_to_read(root, iteration)
        self._reader = _InPlaceReader(str(self.dir))
        self._stored = {key: md for key, md in self._reader.read_metadata().state_dict_metadata.items()
                        if isinstance(md, TensorStorageMetadata)}
        self.stored_shapes = {key: tuple(md.size) for key, md in self._stored.items()}

    def stored_dtype(self) -> torch.dtype:
        """The dtype the model weights were saved in (bf16 from training, fp32/bf16 from import)."""
        key = "embedding.word_embeddings.weight"
        if key not in self._stored:
            raise KeyError(f"{self.dir}: no {key!r}; not a GPT checkpoint")
        return self._stored[key].properties.dtype

    @property
    def in_place_reads(self) -> int:
        """How many stored chunks were read straight into their destination so far (the rest took torch's path)."""
        return self._reader.in_place_reads

    def read(self, regions: list[Region]) -> None:
        for key, offsets, data in regions:
            self._check_region(key, offsets, tuple(data.shape))
        dcp.load({}, storage_reader=self._reader, planner=_RegionLoadPlanner(regions), no_dist=True)

    def byte_runs(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...],
                  dtype: torch.dtype) -> list[tuple[Path, int, int]] | None:
        """Where a region's bytes lie in the checkpoint's files, as (file, offset, length) runs that give the
        region in row-major order (e.g. a layer's rows over TP=2's two row chunks), so they can be copied file
        to file; None where they are not plainly there (a column split, another dtype): `read` it then."""
        self._check_region(key, offsets, shape)
        k = next((d for d, n in enumerate(shape) if n != 1), len(shape) - 1)  # the dimension chunks may split
        pieces = []
        for chunk in self._reader.read_metadata().state_dict_metadata[key].chunks:
            start = [max(o, c) for o, c in zip(offsets, chunk.offsets, strict=True)]
            stop = [min(o + n, c + s) for o, n, c, s in zip(offsets, shape, chunk.offsets, chunk.sizes, strict=True)]
            lengths = [b - a for a, b in zip(start, stop, strict=True)]
            if any(n <= 0 for n in lengths):
                continue
            if any(lengths[d] != shape[d] for d in range(len(shape)) if d != k):
                return None
            info = self._reader.read_metadata().storage_data[MetadataIndex(key, chunk.offsets)]
            stored = self._reader.plain_tensor(info)
            within = [a - c for a, c in zip(start, chunk.offsets, strict=True)]
            span = _contiguous_span(tuple(chunk.sizes), within, lengths)
            if stored is None or stored[1:] != (dtype, tuple(chunk.sizes)) or span is None:
                return None
            pieces.append((start[k], (self.dir / info.relative_path, stored[0] + span[0] * dtype.itemsize,
                                      span[1] * dtype.itemsize)))
        runs = [run for _, run in sorted(pieces, key=lambda piece: piece[0])]
        return runs if sum(n for _, _, n in runs) == math.prod(shape) * dtype.itemsize else None

    def _check_region(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> None:
        if key not in self.stored_shapes:
            raise KeyError(f"{self.dir}: tensor {key!r} is missing (a checkpoint of another architecture?)")
        stored = self.stored_shapes[key]
        if len(offsets) != len(stored) or len(shape) != len(stored) or any(
                o < 0 or o + n > s for o, n, s in zip(offsets, shape, stored, strict=True)):
            raise ValueError(f"{self.dir}: region at {list(offsets)} of shape {list(shape)} is outside "
                             f"tensor {key!r} {list(stored)} (a checkpoint of another config?)")


class _RegionLoadPlanner(LoadPlanner):
    """Fills each region's destination with its part of the stored global tensor."""

    def __init__(self, regions: list[Region]):
        self.by_key: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
        for key, offsets, data in regions:
            self.by_key.setdefault(key, []).append((offsets, data))

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, regions in self.by_key.items():
            chunks = [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=data.shape) for offsets, data in regions]
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, new_plan):
        return new_plan

    def load_bytes(self, read_item, value) -> None:
        raise ValueError(f"{read_item.dest_index.fqn}: stored as bytes, not as a tensor")

    def resolve_tensor(self, read_item):
        target = self.by_key[read_item.dest_index.fqn][read_item.dest_index.index][1]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            target = target.narrow(dim, offset, length)
        return target

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the data is already in place


class _InPlaceReader(dcp.FileSystemReader):
    """torch's reader, reading the metadata once (not once per load) and plain stored tensors in place."""

    def __init__(self, path: str):
        super().__init__(path)
        self.in_place_reads = 0
        self._plain: dict[tuple[str, int], tuple | None] = {}  # stored chunk -> _plain_tensor's answer

    def read_metadata(self):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata()
        return self._metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        rest, files = [], {}
        try:
            for item in plan.items:
                info = self.storage_data[item.storage_index]
                if item.type != LoadItemType.TENSOR:
                    rest.append(item)
                    continue
                if info.relative_path not in files:
                    files[info.relative_path] = os.open(Path(self.path) / info.relative_path, os.O_RDONLY)
                if self._read_in_place(files[info.relative_path], info, item, planner):
                    self.in_place_reads += 1
                else:
                    rest.append(item)
        finally:
            for fd in files.values():
                os.close(fd)
        return super().read_data(dataclasses.replace(plan, items=rest), planner)

    def plain_tensor(self, info) -> tuple[int, torch.dtype, tuple[int, ...]] | None:
        """`_plain_tensor` of the stored chunk `info` (a _StorageInfo), worked out once; None for a chunk stored
        through transforms (torch's storage extensions, e.g. compression)."""
        if getattr(info, "transform_descriptors", None):
            return None
        if (info.relative_path, info.offset) not in self._plain:
            path = Path(self.path) / info.relative_path
            fd = os.open(path, os.O_RDONLY)
            try:
                self._plain[info.relative_path, info.offset] = _plain_tensor(fd, info.offset, info.length, str(path))
            finally:
                os.close(fd)
        return self._plain[info.relative_path, info.offset]

    def _read_in_place(self, fd: int, info, item: ReadItem, planner: LoadPlanner) -> bool:
        stored = self.plain_tensor(info)
        if stored is None:
            return False
        data_offset, dtype, shape = stored
        span = _contiguous_span(shape, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if span is None or target.dtype != dtype or not target.is_contiguous() or target.numel() != span[1]:
            return False
        pread_into(fd, data_offset + span[0] * target.element_size(), target,
                   f"{Path(self.path) / info.relative_path}: {item.storage_index.fqn}")
        planner.commit_tensor(item, target)
        return True


def _contiguous_span(shape, offsets, lengths) -> tuple[int, int] | None:
    """(first element, element count) of a region of a row-major tensor where it is one run of memory: one
    index in each leading dimension, a range in the next, whole trailing dimensions. Else None."""
    k = next((d for d, n in enumerate(lengths) if n != 1), len(shape) - 1)
    if any(lengths[d] != shape[d] for d in range(k + 1, len(shape))):
        return None
    first = sum(o * math.prod(shape[d + 1:]) for d, o in enumerate(offsets))
    return first, math.prod(lengths)


class _Slice(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a seekable file of their own (for zipfile)."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, pos + (0, self.pos, self.length)[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        got = os.preadv(self.fd, [memoryview(buffer)[:max(0, self.length - self.pos)]], self.start + self.pos)
        self.pos += got
        return got


# The (legacy) storage classes torch.save names a tensor's dtype by; their own .dtype is deprecated.
_STORAGE_DTYPES = {"BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16, "FloatStorage": torch.float32,
                   "DoubleStorage": torch.float64}


class _TensorPickle(pickle.Unpickler):
    """Unpickles the data.pkl of a torch.save'd plain tensor into (storage id, storage offset, size, stride)
    without building anything (the storage class stands for its dtype); anything else is refused, and then
    read by torch's own path."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, storage_offset, size, stride, *_: (storage, storage_offset, tuple(size), tuple(stride))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain tensor")

    def persistent_load(self, pid):
        return pid  # ("storage", storage class, record key, location, element count)


def _plain_tensor(fd: int, start: int, length: int, where: str) -> tuple[int, torch.dtype, tuple[int, ...]] | None:
    """(file offset of the data, dtype, shape) of the torch.save archive at [start, start + length) if it
    holds one contiguous tensor, stored uncompressed and little-endian, that is its whole storage; else None."""
    try:
        archive = zipfile.ZipFile(_Slice(fd, start, length))
    except zipfile.BadZipFile:
        return None
    entries = {info.filename: info for info in archive.infolist()}
    pkl = next((name for name in entries if name.endswith("/data.pkl")), None)
    if pkl is None or any(info.compress_type != zipfile.ZIP_STORED for info in entries.values()):
        return None
    prefix = pkl.removesuffix("data.pkl")
    byteorder = entries.get(prefix + "byteorder")
    if byteorder is not None and _record(fd, start, byteorder, where) != b"little":
        return None
    try:
        storage, storage_offset, shape, stride = _TensorPickle(io.BytesIO(_record(fd, start, entries[pkl], where))).load()
        _, dtype, key, _, numel = storage
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError):
        return None
    data = entries.get(f"{prefix}data/{key}")
    if not isinstance(dtype, torch.dtype) or data is None:
        return None
    contiguous = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
    if (storage_offset != 0 or numel != math.prod(shape) or data.file_size != numel * dtype.itemsize
            or any(n > 1 and s != c for n, s, c in zip(shape, stride, contiguous, strict=True))):
        return None
    return _record_start(fd, start, data, where), dtype, shape


def _record_start(fd: int, start: int, info: zipfile.ZipInfo, where: str) -> int:
    """File offset of a zip entry's bytes: after its local header, whose name and extra field (torch pads the
    data to 64-byte alignment there) need not match the central directory's."""
    header = os.pread(fd, 30, start + info.header_offset)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"{where}: corrupt checkpoint archive (no zip entry {info.filename!r} at its offset)")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return start + info.header_offset + 30 + name_len + extra_len


def _record(fd: int, start: int, info: zipfile.ZipInfo, where: str) -> bytes:
    return os.pread(fd, info.file_size, _record_start(fd, start, info, where))
