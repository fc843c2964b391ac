"""HF directory <-> mathtir checkpoint, tensor by tensor, driven by the rule table in mapping.py.

Import: every rank builds only its own TP/PP part of the model and fills it with the row ranges of the HF
tensors it owns, read straight from the safetensors files, then all ranks write one torch_dist checkpoint.
Export: one process reads the checkpoint a layer at a time (whatever TP/PP it was written at) and streams
HF safetensors shards out rule by rule; no model is built. Neither holds two copies of the model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from mathtir import checkpoint
from mathtir.models import mapping
from mathtir.models.llama import ModelSpec, build_model

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _SafetensorsFile:
    """Row ranges of the tensors in one .safetensors file, read with pread.

    Reading (rather than memory-mapping) keeps the file's pages out of the process: a memory-mapped
    8B checkpoint counts fully in the converter's RSS once every tensor was touched, on top of the model
    being built, which is exactly the "two copies" a node must not hold.
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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

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
        row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        begin, end = entry["data_offsets"]
        if end - begin != row_bytes * shape[0]:
            raise ValueError(f"{self.path}: tensor {name!r}: data size does not match shape {list(shape)}")
        target = out if out.dtype == dtype and out.is_contiguous() else torch.empty(out.shape, dtype=dtype)
        view = memoryview(target.view(-1).view(torch.uint8).numpy()) if target.numel() else memoryview(b"")
        offset = self.data_start + begin + start * row_bytes
        with open(self.path, "rb", buffering=0) as f:
            while view.nbytes:
                got = os.preadv(f.fileno(), [view], offset)
                if got <= 0:
                    raise ValueError(f"{self.path}: truncated while reading tensor {name!r}")
                view, offset = view[got:], offset + got
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
    chunks = build_model(spec, params_dtype=dtype, perform_initialization=False, use_te=False)
    state = {"model": checkpoint.model_sharded_state_dict(chunks)}
    parts = _saved_parts_of_fused_parameters(state, chunks)
    with torch.no_grad():
        for chunk in chunks:
            for local_name, param in chunk.named_parameters():
                rule, layer = mapping.match_megatron(_global_name(chunk, local_name))
                out = parts.get(param, param.data)
                mapping.import_shard(rule, spec, layer, weights, out, tp=tp, tp_rank=tp_rank)
    hf_config = dict(spec.hf_config)
    hf_config["dtype"] = _DTYPE_NAMES[dtype]
    hf_config.pop("torch_dtype", None)
    spec = ModelSpec.from_hf_config(hf_config, source=spec.source)
    return checkpoint.save(out_root, 0, state, spec=spec, tokenizer_src=hf_dir)


def _saved_parts_of_fused_parameters(state: dict, chunks: list) -> dict:
    """Parameter -> (gate, up) for the parameters megatron saves in parts (SwiGLU's fused fc1), each part
    with memory of its own, the parameter's released.

    torch_dist's writer copies every tensor that is a view into a larger one, all of them before it writes
    the first: saving fc1 as views of the parameter would hold the MLPs twice and copy them once. The
    imported model is only saved, never run, so its fused parameters are filled as their parts instead
    (megatron's factories are applied here, not inside the save)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    apply_factories(state)
    views: dict[int, list[ShardedTensor]] = {}
    for sh_ten in nested_values(state):
        if isinstance(sh_ten, ShardedTensor) and sh_ten.data.untyped_storage().nbytes() != sh_ten.data.nbytes:
            views.setdefault(sh_ten.data.untyped_storage().data_ptr(), []).append(sh_ten)
    parts = {}
    for chunk in chunks:
        for param in chunk.parameters():
            saved = views.pop(param.untyped_storage().data_ptr(), None)
            if saved:
                for sh_ten in saved:
                    sh_ten.data = torch.empty_like(sh_ten.data, memory_format=torch.contiguous_format)
                parts[param] = tuple(sh_ten.data for sh_ten in saved)
                param.data = torch.empty(0, dtype=param.dtype)
    return parts


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
    dtype = dtype or checkpoint.stored_dtype(root, iteration)
    chunks = build_model(spec, params_dtype=dtype, perform_initialization=False, use_te=False)
    checkpoint.load_model(root, chunks, iteration)
    return spec, chunks


def _read_groups(spec: ModelSpec) -> list[list[tuple[mapping.Rule, int | None]]]:
    """The (rule, layer) pairs export reads from the checkpoint in one go: each non-layer tensor alone and
    each decoder layer whole, in HF order. (With tied embeddings HF derives lm_head from the embedding.)"""
    layer_rules = [rule for rule in mapping.RULES if "{i}" in rule.megatron]
    groups = []
    for rule in mapping.RULES:
        if rule is layer_rules[0]:
            groups += [[(r, i) for r in layer_rules] for i in range(spec.num_layers)]
        elif "{i}" not in rule.megatron and not (rule.megatron == "output_layer.weight" and spec.tie_word_embeddings):
            groups.append([(rule, None)])
    return groups


def _materialized(entry, dtype: torch.dtype):
    """A sharded-state-dict entry of a meta-device model with real (empty) memory to load into."""
    import dataclasses

    shape = entry.local_shape if hasattr(entry, "local_shape") else entry.data.shape
    return dataclasses.replace(entry, data=torch.empty(shape, dtype=dtype))


def export_hf(ckpt: str | Path, out_dir: str | Path, *, hf_template: str | Path | None = None) -> Path:
    """Single process, any TP/PP the checkpoint was written at (torch_dist reshards on read). Writes
    safetensors shards with an index, config.json, generation_config.json and the tokenizer files.

    No model is built: a meta-device model supplies only the sharding template, and the checkpoint is read
    one layer at a time, so memory holds a layer and a shard, never the model."""
    from safetensors.torch import save_file

    root, iteration = resolve_root(ckpt)
    spec = ModelSpec.from_dir(root)
    dtype = checkpoint.stored_dtype(root, iteration)
    (meta_model,) = build_model(spec, params_dtype=dtype, perform_initialization=False, use_te=False, meta=True)
    template = meta_model.sharded_state_dict()
    reader = checkpoint.PartReader(root, iteration)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("model*.safetensors*"):
        stale.unlink()

    # Plan the shards from shapes alone, then write each as soon as its tensors exist.
    groups = _read_groups(spec)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes = mapping.expected_hf_shapes(spec)
    names = [n for group in groups for rule, layer in group for n in mapping.hf_names(rule, spec, layer)]
    nbytes = {n: math.prod(shapes[n]) * itemsize for n in names}
    shard_limit = max(nbytes.values())
    plan: list[list[str]] = [[]]
    for name in names:
        if plan[-1] and sum(nbytes[n] for n in plan[-1]) + nbytes[name] > shard_limit:
            plan.append([])
        plan[-1].append(name)
    file_of = {n: f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i, shard in enumerate(plan) for n in shard}
    pending: dict[str, torch.Tensor] = {}
    for group in groups:
        wanted = [rule.megatron.format(i=layer) for rule, layer in group]
        missing = [name for name in wanted if name not in template]
        if missing:
            raise KeyError(f"{root}: the model of this config has no parameter {missing[0]!r}")
        loaded = reader.read({"model": {n: _materialized(template[n], dtype) for n in wanted}})["model"]
        for (rule, layer), name in zip(group, wanted, strict=True):
            pending.update(mapping.export_tensors(rule, spec, layer, loaded.pop(name)))
        while plan and all(n in pending for n in plan[0]):
            shard = {n: pending.pop(n) for n in plan.pop(0)}
            save_file(shard, str(out_dir / file_of[next(iter(shard))]), metadata={"format": "pt"})
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

