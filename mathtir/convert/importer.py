"""HF directory -> mathtir checkpoint: every rank builds only its own TP/PP part of the model (on the meta
device) and fills it with the row ranges of the HF tensors it owns, read straight from the safetensors files,
then all ranks write one torch_dist checkpoint. No rank holds two copies of its part.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mathtir.convert import rules
from mathtir.convert.safetensors import HF_DTYPE_NAMES, HFWeights
from mathtir.megatron import checkpoint
from mathtir.megatron.model import build_model
from mathtir.megatron.parallel import rank
from mathtir.models.llama import ModelSpec


def import_hf(hf_dir: str | Path, out_root: str | Path, *, dtype: torch.dtype, tp: int, pp: int) -> Path:
    """Collective over the TP*PP ranks of mathtir.megatron.parallel.initialize(tp, pp, ...)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import apply_factories

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
    chunks = build_model(spec, params_dtype=dtype, perform_initialization=False, attention_backend="local", meta=True)
    state = {"model": checkpoint.model_sharded_state_dict(chunks)}
    apply_factories(state)
    for index, chunk in enumerate(chunks):
        entries = state["model"] if len(chunks) == 1 else state["model"][f"vp{index}"]
        for local_name, _ in chunk.named_parameters():
            rule, layer = rules.match_megatron(_global_name(chunk, local_name))
            saved = entries[local_name] if isinstance(entries[local_name], list) else [entries[local_name]]
            views = weights.part_views(rule.row_blocks(spec, layer, weights.shape, tp=tp, tp_rank=tp_rank), dtype)
            for i, sh_ten in enumerate(saved):
                sh_ten.data = torch.empty(sh_ten.local_shape, dtype=dtype) if views is None else views[i]
                if tuple(sh_ten.data.shape) != tuple(sh_ten.local_shape):
                    raise ValueError(f"{hf_dir}: rows for {local_name} have shape {tuple(sh_ten.data.shape)}, "
                                     f"megatron expects {tuple(sh_ten.local_shape)}")
            if views is None:
                out = tuple(sh_ten.data for sh_ten in saved)
                rule.import_shard(spec, layer, weights, out if len(out) > 1 else out[0], tp=tp,
                                     tp_rank=tp_rank)
    hf_config = dict(spec.hf_config)
    hf_config["dtype"] = HF_DTYPE_NAMES[dtype]
    hf_config.pop("torch_dtype", None)
    spec = ModelSpec.from_hf_config(hf_config, source=spec.source)
    return checkpoint.save(out_root, 0, state, spec=spec, tokenizer_src=hf_dir)


def _global_name(chunk, local_name: str) -> str:
    """state_dict numbers layers per pipeline stage; the mapping uses global numbers (layer_number - 1)."""
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)
