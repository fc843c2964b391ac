"""HF directory <-> mathtir checkpoint, tensor by tensor, driven by the rule table in mapping.py.

Import: every rank builds only its own TP/PP part of the model and fills it with the row ranges of the HF
tensors it owns, read straight from the safetensors files, then all ranks write one torch_dist checkpoint.
Export: one process, no model built, whatever TP/PP the checkpoint was written at: each HF tensor's row
ranges are located in the stored tensors and copied file to file into safetensors shards (or, where not
stored plainly, read into memory a few layers at a time). Neither holds two copies of the model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from mathtir import checkpoint
from mathtir.checkpoint_regions import PartReader
from mathtir.models import mapping
from mathtir.models.llama import ModelSpec, build_model
from mathtir.rawio import pread_into

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


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
        expected = mapping.expected_hf_shapes(spec)
        for name, shape in expected.items():
            if name not in self.file_of:
                raise KeyError(f"{self.dir}: tensor {name!r} (required by config.json) is missing")
            have = self.shape(name)
            if have != shape:
                raise ValueError(
                    f"{self.dir / self.file_of[name]}: tensor {name!r} has shape {have}, config.json implies {shape}"
                )
        extra = [n for n in self.file_of if n not in expected and not mapping.IGNORED_HF_TENSORS.fullmatch(n)]
        if spec.tie_word_embeddings and "lm_head.weight" in extra:
            same = torch.equal(self.tensor("lm_head.weight"), self.tensor("model.embed_tokens.weight"))
            if same:
                extra.remove("lm_head.weight")
        if extra:
            raise ValueError(f"{self.dir}: tensors not covered by the Llama mapping (unsupported model?): {extra[:5]}")


def import_hf(hf_dir: str | Path, out_root: str | Path, *, dtype: torch.dtype, tp: int, pp: int) -> Path:
    """Collective over the TP*PP ranks of mathtir.distributed.initialize(tp, pp, ...)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from mathtir.distributed import rank

    hf_dir = Path(hf_dir)
    spec = ModelSpec.from_dir(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json")
    spec.check_parallel(tp, pp)
    weights = HFWeights(hf_dir)
    if rank() == 0:
        weights.check_against(spec)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    # The model is never run, only saved: a meta-device model supplies the sharded state dict (this rank's
    # parts, with their keys and offsets), and each part gets its data here. A part that is one row range
    # of an HF tensor in the target dtype is the file's own pages (the writer reads them straight from the
    # page cache); the rest (QKV interleaving, column splits, vocabulary padding, dtype casts) is read into
    # memory of its own. megatron saves some parameters in parts (SwiGLU's fc1: gate rows, up rows):
    # its factories are applied first, so no fused copy of them ever exists.
    chunks = build_model(spec, params_dtype=dtype, perform_initialization=False, use_te=False, meta=True)
    state = {"model": checkpoint.model_sharded_state_dict(chunks)}
    apply_factories(state)
    for index, chunk in enumerate(chunks):
        entries = state["model"] if len(chunks) == 1 else state["model"][f"vp{index}"]
        for local_name, _ in chunk.named_parameters():
            rule, layer = mapping.match_megatron(_global_name(chunk, local_name))
            saved = entries[local_name] if isinstance(entries[local_name], list) else [entries[local_name]]
            views = weights.part_views(mapping.row_blocks(rule, spec, layer, weights.shape, tp=tp, tp_rank=tp_rank), dtype)
            for i, sh_ten in enumerate(saved):
                sh_ten.data = torch.empty(sh_ten.local_shape, dtype=dtype) if views is None else views[i]
                if tuple(sh_ten.data.shape) != tuple(sh_ten.local_shape):
                    raise ValueError(f"{hf_dir}: rows for {local_name} have shape {tuple(sh_ten.data.shape)}, "
                                     f"megatron expects {tuple(sh_ten.local_shape)}")
            if views is None:
                out = tuple(sh_ten.data for sh_ten in saved)
                mapping.import_shard(rule, spec, layer, weights, out if len(out) > 1 else out[0], tp=tp,
                                     tp_rank=tp_rank)
    hf_config = dict(spec.hf_config)
    hf_config["dtype"] = _DTYPE_NAMES[dtype]
    hf_config.pop("torch_dtype", None)
    spec = ModelSpec.from_hf_config(hf_config, source=spec.source)
    return checkpoint.save(out_root, 0, state, spec=spec, tokenizer_src=hf_dir)


def _global_name(chunk, local_name: str) -> str:
    """state_dict numbers layers per pipeline stage; the mapping uses global numbers (layer_number - 1)."""
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def resolve_root(ckpt: str | Path) -> tuple[Path, int | None]:
    """Accept a checkpoint root or one of its iter_N directories."""
    ckpt = Path(ckpt)
    if ckpt.name.startswith("iter_") and (ckpt.parent / checkpoint.HF_CONFIG_FILE).is_file():
        return ckpt.parent, int(ckpt.name.removeprefix("iter_"))
    if not (ckpt / checkpoint.HF_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{ckpt}: no {checkpoint.HF_CONFIG_FILE}; not a mathtir checkpoint root")
    return ckpt, None


def load_megatron(ckpt: str | Path, *, dtype: torch.dtype | None = None) -> tuple[ModelSpec, list]:
    """Build the model for the current parallel state and load the checkpoint's weights into it, in the
    stored dtype or, if given, in `dtype` (torch_dist casts while loading)."""
    root, iteration = resolve_root(ckpt)
    spec = ModelSpec.from_dir(root)
    dtype = dtype or PartReader(root, iteration).stored_dtype()
    chunks = build_model(spec, params_dtype=dtype, perform_initialization=False, use_te=False)
    checkpoint.load_model(root, chunks, iteration)
    return spec, chunks


@dataclass(frozen=True)
class _FileRuns:
    """An HF tensor whose bytes are, in order, these (file, offset, length) runs of the checkpoint's files:
    the kernel copies them file to file, through no memory of ours."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    runs: list[tuple[Path, int, int]]

    @property
    def nbytes(self) -> int:
        return sum(length for _, _, length in self.runs)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor | _FileRuns]) -> None:
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


def _read_groups(spec: ModelSpec, layer_bytes: int, budget: int) -> list[list[tuple[mapping.Rule, int | None]]]:
    """The (rule, layer) pairs export reads from the checkpoint in one go, in HF order: each non-layer tensor
    alone, and whole decoder layers, as many consecutive ones as fit in `budget` bytes (at least one; each
    read has a fixed cost, ~5 ms). With tied embeddings HF derives lm_head from the embedding."""
    layer_rules = [rule for rule in mapping.RULES if "{i}" in rule.megatron]
    per_read = max(1, budget // layer_bytes)
    groups = []
    for rule in mapping.RULES:
        if rule is layer_rules[0]:
            groups += [[(r, i) for i in range(first, min(first + per_read, spec.num_layers)) for r in layer_rules]
                       for first in range(0, spec.num_layers, per_read)]
        elif "{i}" not in rule.megatron and not (rule.megatron == "output_layer.weight" and spec.tie_word_embeddings):
            groups.append([(rule, None)])
    return groups


def _stored_place(entry, rule: mapping.Rule, spec: ModelSpec, reader: PartReader):
    """A meta-device model's sharded-state-dict entry -> (torch_dist key, offsets along its prepended axes,
    i.e. the layer index for layer tensors), once the stored tensor is known to have the shape the config
    implies (a vocabulary padded for whatever TP the checkpoint was written at)."""
    if not hasattr(entry, "prepend_axis_num"):  # a factory (SwiGLU's fc1): its parts share key and layer
        entry = entry.build()[0]
    have, want = reader.stored_shapes.get(entry.key), tuple(entry.global_shape)
    if have is None:
        raise KeyError(f"{reader.dir}: tensor {entry.key!r} is missing (a checkpoint of another architecture?)")
    fits = have == want or (rule.vocab_padded and have[1:] == want[1:]
                            and any(have[0] == spec.padded_vocab_size(tp) for tp in range(1, 1025)))
    if not fits:
        raise ValueError(f"{reader.dir}: tensor {entry.key!r} has shape {have} but the model expects {want} "
                         "(a checkpoint of another architecture or config?)")
    return entry.key, tuple(entry.global_offset[: entry.prepend_axis_num])


def _locate(group, spec: ModelSpec, shapes: dict, dtype: torch.dtype, places: dict,
            reader: PartReader) -> tuple[dict[str, torch.Tensor | _FileRuns], list]:
    """The HF tensors of a read group, each found where its row ranges lie in the stored megatron tensors:
    as file runs where they are plainly there, else as a tensor to read them into (the regions returned). No
    megatron tensor is assembled, split or copied."""
    tensors: dict[str, torch.Tensor | _FileRuns] = {}
    regions = []
    for rule, layer in group:
        key, layer_offsets = places[rule.megatron.format(i=layer)]
        blocks_of: dict[str, list[tuple[int, int, tuple[int, ...], tuple[int, ...]]]] = {}
        row = 0  # in the stored tensor
        for hf_name, start, stop in mapping.full_row_blocks(rule, spec, layer, shapes):
            trailing = shapes[hf_name][1:]
            blocks_of.setdefault(hf_name, []).append((start, stop, (*layer_offsets, row) + (0,) * len(trailing),
                                                      (1,) * len(layer_offsets) + (stop - start, *trailing)))
            row += stop - start
        for hf_name, blocks in blocks_of.items():
            blocks.sort()
            runs = [reader.byte_runs(key, offsets, shape, dtype) for _, _, offsets, shape in blocks]
            if all(r is not None for r in runs):
                tensors[hf_name] = _FileRuns(dtype, shapes[hf_name], [run for r in runs for run in r])
            else:
                tensor = tensors[hf_name] = torch.empty(shapes[hf_name], dtype=dtype)
                regions += [(key, offsets, tensor[start:stop].view(shape)) for start, stop, offsets, shape in blocks]
    return tensors, regions


def export_hf(ckpt: str | Path, out_dir: str | Path, *, hf_template: str | Path | None = None) -> Path:
    """Single process, any TP/PP the checkpoint was written at (torch_dist reshards on read). Writes
    safetensors shards with an index, config.json, generation_config.json and the tokenizer files.

    No model is built: a meta-device model supplies only the sharding template. Tensors stored plainly are
    copied file to file by the kernel; the rest (e.g. a TP>1 checkpoint's column splits) are read a group of
    layers at a time, so memory holds at most a few layers and a shard, never the model."""
    root, iteration = resolve_root(ckpt)
    spec = ModelSpec.from_dir(root)
    reader = PartReader(root, iteration)
    dtype = reader.stored_dtype()
    (meta_model,) = build_model(spec, params_dtype=dtype, perform_initialization=False, use_te=False, meta=True)
    template = meta_model.sharded_state_dict()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("model*.safetensors*"):
        stale.unlink()

    # Plan the reads and the shards from shapes alone (a shard and a read are at most the largest tensor,
    # or one layer), then write each shard as soon as its tensors exist.
    shapes = mapping.expected_hf_shapes(spec)
    nbytes = {n: math.prod(shape) * dtype.itemsize for n, shape in shapes.items()}
    shard_limit = max(nbytes.values())
    groups = _read_groups(spec, sum(b for n, b in nbytes.items() if n.startswith("model.layers.0.")), shard_limit)
    names = [n for group in groups for rule, layer in group for n in mapping.hf_names(rule, spec, layer)]
    plan: list[list[str]] = [[]]
    for name in names:
        if plan[-1] and sum(nbytes[n] for n in plan[-1]) + nbytes[name] > shard_limit:
            plan.append([])
        plan[-1].append(name)
    file_of = {n: f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i, shard in enumerate(plan) for n in shard}
    places = {}  # every stored tensor checked before anything is written
    for rule, layer in (pair for group in groups for pair in group):
        name = rule.megatron.format(i=layer)
        if name not in template:
            raise KeyError(f"{root}: the model of this config has no parameter {name!r}")
        places[name] = _stored_place(template[name], rule, spec, reader)
    pending: dict[str, torch.Tensor | _FileRuns] = {}
    # One shard is written by a thread while the next layers are read (both mostly wait on I/O, GIL released).
    with ThreadPoolExecutor(max_workers=1) as writer:
        writing = None
        for group in groups:
            tensors, regions = _locate(group, spec, shapes, dtype, places, reader)
            if regions:
                reader.read(regions)
            pending.update(tensors)
            while plan and all(n in pending for n in plan[0]):
                shard = {n: pending.pop(n) for n in plan.pop(0)}
                if writing is not None:
                    writing.result()  # at most one shard in flight: memory stays a layer and two shards
                writing = writer.submit(_write_safetensors, out_dir / file_of[next(iter(shard))], shard)
        if writing is not None:
            writing.result()
    if plan or pending:
        raise RuntimeError(f"export of {root} left tensors unwritten: {sorted(pending)[:5]}")
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": dict(sorted(file_of.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    hf_config = json.loads((root / checkpoint.HF_CONFIG_FILE).read_text())
    hf_config["dtype"] = _DTYPE_NAMES[dtype]
    hf_config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    tokenizer_src = Path(hf_template) if hf_template else root / checkpoint.TOKENIZER_DIR
    if not tokenizer_src.is_dir():
        raise FileNotFoundError(f"{tokenizer_src}: no tokenizer directory to copy (pass --hf-template DIR)")
    copied = checkpoint.copy_tokenizer_files(tokenizer_src, out_dir)
    if "generation_config.json" not in copied:
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out_dir

