"""HF directory <-> mathtir checkpoint, tensor by tensor, driven by the rule table in mapping.py.

Import: every rank builds only its own TP/PP part of the model and fills it with the slices of the HF
tensors it owns, read through safetensors memory maps, then all ranks write one torch_dist checkpoint.
Export: one process loads the checkpoint at TP=1/PP=1 (torch_dist reshards) and streams HF safetensors
shards out rule by rule. Neither holds two copies of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mathtir import checkpoint
from mathtir.models import mapping
from mathtir.models.llama import ModelSpec, build_model

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
SHARD_BYTES = 2 * 1024**3


class HFWeights:
    """Memory-mapped access to an HF directory's safetensors (single file or sharded with an index)."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

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
        self._handles = {}
        for name in files:
            if not (self.dir / name).is_file():
                raise FileNotFoundError(f"{self.dir / name}: listed in the safetensors index but missing")
            self._handles[name] = safe_open(str(self.dir / name), framework="pt")
        if weight_map is None:
            weight_map = {k: single.name for k in self._handles[single.name].keys()}
        self.file_of = weight_map

    def _slice(self, name: str):
        if name not in self.file_of:
            raise KeyError(f"{self.dir}: tensor {name!r} is missing from the safetensors files")
        return self._handles[self.file_of[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._slice(name)[start:stop]

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
            same = torch.equal(self.rows("lm_head.weight", 0, spec.vocab_size),
                               self.rows("model.embed_tokens.weight", 0, spec.vocab_size))
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
    with torch.no_grad():
        for chunk in chunks:
            for local_name, param in chunk.named_parameters():
                rule, layer = mapping.match_megatron(_global_name(chunk, local_name))
                shard = mapping.import_shard(rule, spec, layer, weights.rows, tp=tp, tp_rank=tp_rank,
                                             num_rows=lambda n: weights.shape(n)[0])
                if tuple(shard.shape) != tuple(param.shape):
                    raise ValueError(f"{hf_dir}: {mapping.hf_names(rule, spec, layer)} -> {local_name}: "
                                     f"shape {tuple(shard.shape)} but megatron expects {tuple(param.shape)}")
                param.copy_(shard.to(dtype))
    hf_config = dict(spec.hf_config)
    hf_config["dtype"] = _DTYPE_NAMES[dtype]
    hf_config.pop("torch_dtype", None)
    spec = ModelSpec.from_hf_config(hf_config, source=spec.source)
    return checkpoint.save(out_root, 0, {"model": checkpoint.model_sharded_state_dict(chunks)},
                           spec=spec, tokenizer_src=hf_dir)


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
    """Build the model for the current parallel state and load the checkpoint's weights into it."""
    root, iteration = resolve_root(ckpt)
    spec = ModelSpec.from_dir(root)
    stored = checkpoint.stored_dtype(root, iteration)
    chunks = build_model(spec, params_dtype=stored, perform_initialization=False, use_te=False)
    checkpoint.load_model(root, chunks, iteration)
    if dtype is not None and dtype != stored:
        chunks = [c.to(dtype) for c in chunks]
    return spec, chunks


def export_hf(ckpt: str | Path, out_dir: str | Path, *, hf_template: str | Path | None = None) -> Path:
    """Single process (TP=1, PP=1 — mathtir.distributed.initialize(1, 1, ...)). Writes safetensors shards
    with an index, config.json, generation_config.json and the tokenizer files."""
    from safetensors.torch import save_file

    root, _ = resolve_root(ckpt)
    spec, (model,) = load_megatron(ckpt)
    params = dict(model.named_parameters())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("model*.safetensors*"):
        stale.unlink()

    def hf_tensors():
        for rule in mapping.RULES:
            layers = range(spec.num_layers) if "{i}" in rule.megatron else [None]
            for layer in layers:
                name = rule.megatron.format(i=layer)
                if name not in params:
                    if rule.megatron == "output_layer.weight" and spec.tie_word_embeddings:
                        continue
                    raise KeyError(f"{root}: checkpoint model has no parameter {name!r}")
                yield from mapping.export_tensors(rule, spec, layer, params[name].detach()).items()

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, tensor in hf_tensors():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
        total += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        shard.clear()  # release the export copies (qkv/fc1 splits) as soon as they are on disk
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    hf_config = json.loads((root / checkpoint.HF_CONFIG_FILE).read_text())
    hf_config["dtype"] = _DTYPE_NAMES[next(iter(params.values())).dtype]
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

