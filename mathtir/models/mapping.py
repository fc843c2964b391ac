"""The HF Llama <-> megatron-core GPTModel weight mapping: one declarative table, used in both directions.

Each `Rule` names a megatron parameter, the HF tensor(s) it is made of, how they combine (`transform`) and
the axis megatron splits it along under tensor parallelism (`tp_axis`, None = replicated). Import reads,
per TP rank, only the slices of the HF tensors that rank owns (safetensors memory-mapped slices); export
inverts the transform on the full (TP=1) megatron tensor.

Layouts (verified in shared/notes/megatron-on-cpu.md):
* `qkv`: megatron's fused QKV weight interleaves per query group: for each of the ng groups, its nh/ng query
  heads, then its key head, then its value head. A TP rank owns whole query groups, i.e. a contiguous chunk.
* `gated`: linear_fc1 = cat(gate, up), but TP rank r holds cat(gate shard r, up shard r), not a plain chunk.
* `vocab`-padded tensors have zero rows appended up to `ModelSpec.padded_vocab_size(tp)`.
HF q/k already use the rotate-half RoPE layout megatron expects: no permutation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mathtir.models.llama import ModelSpec

COPY, QKV, GATED = "copy", "qkv", "gated"


@dataclass(frozen=True)
class Rule:
    megatron: str  # "{i}" = global layer index
    hf: tuple[str, ...]
    transform: str = COPY
    tp_axis: int | None = None
    vocab_padded: bool = False


_L = "model.layers.{i}."
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), COPY, tp_axis=0, vocab_padded=True),
    Rule("decoder.layers.{i}.input_layernorm.weight", (_L + "input_layernorm.weight",)),
    Rule(
        "decoder.layers.{i}.self_attention.linear_qkv.weight",
        (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
        QKV,
        tp_axis=0,
    ),
    Rule("decoder.layers.{i}.self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), COPY, tp_axis=1),
    Rule("decoder.layers.{i}.pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",)),
    Rule("decoder.layers.{i}.mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), GATED, tp_axis=0),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), COPY, tp_axis=1),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    # With tied embeddings HF has no lm_head; the last pipeline stage's copy is the embedding.
    Rule("output_layer.weight", ("lm_head.weight",), COPY, tp_axis=0, vocab_padded=True),
)
# Buffers some HF checkpoints carry that are recomputed from the config, never weights.
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_MEGATRON_PATTERNS = [(_pattern(rule.megatron), rule) for rule in RULES]


def match_megatron(name: str) -> tuple[Rule, int | None]:
    """The rule for a megatron parameter name (layers numbered globally) and its layer index."""
    for pattern, rule in _MEGATRON_PATTERNS:
        m = pattern.match(name)
        if m:
            return rule, int(m.group(1)) if m.groups() else None
    raise KeyError(f"megatron parameter {name!r} has no mapping rule")


def hf_names(rule: Rule, spec: ModelSpec, layer: int | None) -> tuple[str, ...]:
    if rule.megatron == "output_layer.weight" and spec.tie_word_embeddings:
        return ("model.embed_tokens.weight",)
    return tuple(n.format(i=layer) for n in rule.hf)


def expected_hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of `spec` must contain, with its shape."""
    h, hd = spec.hidden_size, spec.head_dim
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (spec.num_attention_heads * hd, h),
        "self_attn.k_proj.weight": (spec.num_kv_heads * hd, h),
        "self_attn.v_proj.weight": (spec.num_kv_heads * hd, h),
        "self_attn.o_proj.weight": (h, spec.num_attention_heads * hd),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (spec.ffn_hidden_size, h),
        "mlp.up_proj.weight": (spec.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, spec.ffn_hidden_size),
    }
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


# A reader returns rows [start, stop) of an HF tensor (all columns): what safetensors slices cheaply.
RowReader = Callable[[str, int, int], torch.Tensor]


def _chunk_bounds(n: int, tp: int, rank: int) -> tuple[int, int]:
    size = n // tp
    return rank * size, (rank + 1) * size


def import_shard(rule: Rule, spec: ModelSpec, layer: int | None, read_rows: RowReader, *,
                 tp: int, tp_rank: int, num_rows: Callable[[str], int]) -> torch.Tensor:
    """The megatron tensor of `rule` as TP rank `tp_rank` holds it, reading only the rows it owns."""
    names = hf_names(rule, spec, layer)
    if rule.transform == QKV:
        q_name, k_name, v_name = names
        ng, hd = spec.num_kv_heads, spec.head_dim
        q_per_group = spec.num_attention_heads // ng
        g0, g1 = _chunk_bounds(ng, tp, tp_rank)
        q = read_rows(q_name, g0 * q_per_group * hd, g1 * q_per_group * hd)
        k = read_rows(k_name, g0 * hd, g1 * hd)
        v = read_rows(v_name, g0 * hd, g1 * hd)
        groups = g1 - g0
        q = q.reshape(groups, q_per_group * hd, -1)
        k = k.reshape(groups, hd, -1)
        v = v.reshape(groups, hd, -1)
        return torch.cat([q, k, v], dim=1).reshape(groups * (q_per_group + 2) * hd, -1)
    if rule.transform == GATED:
        gate_name, up_name = names
        start, stop = _chunk_bounds(spec.ffn_hidden_size, tp, tp_rank)
        return torch.cat([read_rows(gate_name, start, stop), read_rows(up_name, start, stop)], dim=0)

    (name,) = names
    if rule.tp_axis is None:
        return read_rows(name, 0, num_rows(name))
    if rule.tp_axis == 1:
        full = read_rows(name, 0, num_rows(name))
        start, stop = _chunk_bounds(full.shape[1], tp, tp_rank)
        return full[:, start:stop].contiguous()
    if rule.vocab_padded:
        start, stop = _chunk_bounds(spec.padded_vocab_size(tp), tp, tp_rank)
        real = read_rows(name, min(start, spec.vocab_size), min(stop, spec.vocab_size))
        if real.shape[0] == stop - start:
            return real
        pad = torch.zeros(stop - start - real.shape[0], *real.shape[1:], dtype=real.dtype)
        return torch.cat([real, pad], dim=0)
    start, stop = _chunk_bounds(num_rows(name), tp, tp_rank)
    return read_rows(name, start, stop)


def export_tensors(rule: Rule, spec: ModelSpec, layer: int | None, full: torch.Tensor) -> dict[str, torch.Tensor]:
    """Invert `rule` on the full (TP=1) megatron tensor: HF name -> tensor. (With tied embeddings the
    output layer is not exported: HF derives lm_head from the embedding.)"""
    names = hf_names(rule, spec, layer)
    if rule.transform == QKV:
        ng, hd = spec.num_kv_heads, spec.head_dim
        q_per_group = spec.num_attention_heads // ng
        grouped = full.reshape(ng, (q_per_group + 2) * hd, -1)
        q, k, v = torch.split(grouped, [q_per_group * hd, hd, hd], dim=1)
        return {n: t.reshape(-1, full.shape[-1]).contiguous() for n, t in zip(names, (q, k, v), strict=True)}
    if rule.transform == GATED:
        gate, up = torch.chunk(full, 2, dim=0)
        return {names[0]: gate.contiguous(), names[1]: up.contiguous()}
    (name,) = names
    if rule.vocab_padded:
        full = full[: spec.vocab_size]
    return {name: full.contiguous()}
