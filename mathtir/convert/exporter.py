"""mathtir checkpoint -> HF directory, in one process, whatever TP/PP the checkpoint was written at, and without
building the model: each HF tensor's row ranges are located in the stored megatron tensors and copied file to
file into safetensors shards (or, where not stored plainly, read into memory a few layers at a time).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mathtir.convert import rules
from mathtir.convert.safetensors import HF_DTYPE_NAMES, FileRuns, write_safetensors
from mathtir.convert.torch_dist import PartReader
from mathtir.megatron import checkpoint
from mathtir.megatron.model import build_model
from mathtir.models.llama import ModelSpec, rope_parameters
from mathtir.tokenizers import portable_tokenizer_config


def _read_groups(spec: ModelSpec, layer_bytes: int, budget: int) -> list[list[tuple[rules.ParamMapping, int | None]]]:
    """The (rule, layer) pairs export reads from the checkpoint in one go, in HF order: each non-layer tensor
    alone, and whole decoder layers, as many consecutive ones as fit in `budget` bytes (at least one; each
    read has a fixed cost, ~5 ms). With tied embeddings HF derives lm_head from the embedding."""
    per_read = max(1, budget // layer_bytes)
    groups = []
    for rule in rules.MAPPINGS:
        if rule is rules.LAYER_MAPPINGS[0]:
            groups += [[(r, i) for i in range(first, min(first + per_read, spec.num_layers))
                        for r in rules.LAYER_MAPPINGS]
                       for first in range(0, spec.num_layers, per_read)]
        elif rule not in rules.LAYER_MAPPINGS and rule.exported(spec):
            groups.append([(rule, None)])
    return groups


def _stored_place(entry, rule: rules.ParamMapping, spec: ModelSpec, reader: PartReader):
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
            reader: PartReader) -> tuple[dict[str, torch.Tensor | FileRuns], list]:
    """The HF tensors of a read group, each found where its row ranges lie in the stored megatron tensors:
    as file runs where they are plainly there, else as a tensor to read them into (the regions returned). No
    megatron tensor is assembled, split or copied."""
    tensors: dict[str, torch.Tensor | FileRuns] = {}
    regions = []
    for rule, layer in group:
        key, layer_offsets = places[rule.megatron.format(i=layer)]
        blocks_of: dict[str, list[tuple[int, int, tuple[int, ...], tuple[int, ...]]]] = {}
        row = 0  # in the stored tensor
        for hf_name, start, stop in rule.full_row_blocks(spec, layer, shapes):
            trailing = shapes[hf_name][1:]
            blocks_of.setdefault(hf_name, []).append((start, stop, (*layer_offsets, row) + (0,) * len(trailing),
                                                      (1,) * len(layer_offsets) + (stop - start, *trailing)))
            row += stop - start
        for hf_name, blocks in blocks_of.items():
            blocks.sort()
            runs = [reader.byte_runs(key, offsets, shape, dtype) for _, _, offsets, shape in blocks]
            if all(r is not None for r in runs):
                tensors[hf_name] = FileRuns(dtype, shapes[hf_name], [run for r in runs for run in r])
            else:
                tensor = tensors[hf_name] = torch.empty(shapes[hf_name], dtype=dtype)
                regions += [(key, offsets, tensor[start:stop].view(shape)) for start, stop, offsets, shape in blocks]
    return tensors, regions


def loader_portable_config(hf_config: dict, dtype: torch.dtype) -> dict:
    """config.json that every loader reads the same: transformers 5 reads `rope_parameters` and `dtype`, while
    4.x (the line vLLM 0.11 images pin) reads `rope_theta`, `rope_scaling` and `torch_dtype` and silently
    falls back to defaults without them (SmolLM2's rope base 100000 read as 10000: a different model)."""
    config = dict(hf_config)
    rope = rope_parameters(config)
    config["rope_parameters"] = rope
    config["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))  # "type": the older spelling
    config["rope_scaling"] = None if kind == "default" else scaling
    config["dtype"] = config["torch_dtype"] = HF_DTYPE_NAMES[dtype]
    return config


def export_hf(ckpt: str | Path, out_dir: str | Path, *, hf_template: str | Path | None = None) -> Path:
    """Single process, any TP/PP the checkpoint was written at (torch_dist reshards on read). Writes
    safetensors shards with an index, config.json, generation_config.json and the tokenizer files.

    No model is built: a meta-device model supplies only the sharding template. Tensors stored plainly are
    copied file to file by the kernel; the rest (e.g. a TP>1 checkpoint's column splits) are read a group of
    layers at a time, so memory holds at most a few layers and a shard, never the model."""
    root, iteration = checkpoint.resolve_root(ckpt)
    spec = ModelSpec.from_dir(root)
    reader = PartReader(root, iteration)
    dtype = reader.stored_dtype()
    (meta_model,) = build_model(spec, params_dtype=dtype, perform_initialization=False, attention_backend="local", meta=True)
    template = meta_model.sharded_state_dict()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("model*.safetensors*"):
        stale.unlink()

    # Plan the reads and the shards from shapes alone (a shard and a read are at most the largest tensor,
    # or one layer), then write each shard as soon as its tensors exist.
    shapes = rules.expected_hf_shapes(spec)
    nbytes = {n: math.prod(shape) * dtype.itemsize for n, shape in shapes.items()}
    shard_limit = max(nbytes.values())
    groups = _read_groups(spec, sum(b for n, b in nbytes.items() if n.startswith("model.layers.0.")), shard_limit)
    names = [n for group in groups for rule, layer in group for n in rule.hf_names(spec, layer)]
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
    pending: dict[str, torch.Tensor | FileRuns] = {}
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
                writing = writer.submit(write_safetensors, out_dir / file_of[next(iter(shard))], shard)
        if writing is not None:
            writing.result()
    if plan or pending:
        raise RuntimeError(f"export of {root} left tensors unwritten: {sorted(pending)[:5]}")
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": dict(sorted(file_of.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    hf_config = loader_portable_config(json.loads((root / checkpoint.HF_CONFIG_FILE).read_text()), dtype)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    tokenizer_src = Path(hf_template) if hf_template else root / checkpoint.TOKENIZER_DIR
    if not tokenizer_src.is_dir():
        raise FileNotFoundError(f"{tokenizer_src}: no tokenizer directory to copy (pass --hf-template DIR)")
    copied = checkpoint.copy_tokenizer_files(tokenizer_src, out_dir)
    if "tokenizer_config.json" in copied:
        config_path = out_dir / "tokenizer_config.json"
        config_path.write_text(json.dumps(portable_tokenizer_config(json.loads(config_path.read_text())),
                                          indent=2, ensure_ascii=False) + "\n")
    if "generation_config.json" not in copied:
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out_dir

