"""The HF Llama <-> megatron-core GPTModel weight mapping: one declarative table, used in both directions.

Each `Rule` names a megatron parameter, the HF tensor(s) it is made of, how they combine (`transform`) and
the axis megatron splits it along under tensor parallelism (`tp_axis`, None = replicated). Import takes,
per TP rank, only the rows of the HF tensors that rank owns (`row_blocks`), read straight into the
parameter or, where they are one range of one tensor, used where they lie; export reads the same row
ranges of the whole stored tensor (`full_row_blocks`) straight into the HF tensors.

Layouts (verified in shared/notes/megatron-on-cpu.md):
* `qkv`: megatron's fused QKV weight interleaves per query group: for each of the ng groups, its nh/ng query
  heads, then its key head, then its value head. A TP rank owns whole query groups, i.e. a contiguous chunk.
* `gated`: linear_fc1 = cat(gate, up), but TP rank r holds cat(gate shard r, up shard r), not a plain chunk;
  megatron saves the two halves apart, so torch_dist's stored tensor is cat(gate, up) at any TP.
* `vocab`-padded tensors have zero rows appended up to `ModelSpec.padded_vocab_size(tp)`.
HF q/k already use the rotate-half RoPE layout megatron expects: no permutation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


class RowSource(Protocol):
    """Where import reads HF tensors from: shapes, and row ranges written straight into a destination."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> None: ...


def _chunk_bounds(n: int, tp: int, rank: int) -> tuple[int, int]:
    size = n // tp
    return rank * size, (rank + 1) * size


def row_blocks(rule: Rule, spec: ModelSpec, layer: int | None, shape_of: Callable[[str], tuple[int, ...]], *,
               tp: int, tp_rank: int) -> list[list[tuple[str, int, int]]] | None:
    """The megatron parameter as TP rank `tp_rank` holds it, as HF row ranges stacked in order: a list of
    (HF name, start, stop) blocks per part megatron saves it as (`gated`: the gate rows, then the up rows;
    one part otherwise). None where rows alone do not describe it: a column split, or padding rows of the
    vocabulary in this rank's range."""
    names = hf_names(rule, spec, layer)
    if rule.transform == QKV:
        q_name, k_name, v_name = names
        hd, q_per_group = spec.head_dim, spec.num_attention_heads // spec.num_kv_heads
        g0, g1 = _chunk_bounds(spec.num_kv_heads, tp, tp_rank)
        blocks = []
        for g in range(g0, g1):  # per query group: its q heads, its k head, its v head
            blocks += [(q_name, g * q_per_group * hd, (g + 1) * q_per_group * hd),
                       (k_name, g * hd, (g + 1) * hd), (v_name, g * hd, (g + 1) * hd)]
        return [blocks]
    if rule.transform == GATED:
        start, stop = _chunk_bounds(spec.ffn_hidden_size, tp, tp_rank)
        return [[(names[0], start, stop)], [(names[1], start, stop)]]
    (name,) = names
    rows = shape_of(name)[0]
    if rule.tp_axis is None or (rule.tp_axis == 1 and tp == 1):
        return [[(name, 0, rows)]]
    if rule.tp_axis == 1:
        return None
    start, stop = _chunk_bounds(spec.padded_vocab_size(tp) if rule.vocab_padded else rows, tp, tp_rank)
    return [[(name, start, stop)]] if stop <= rows else None


def import_shard(rule: Rule, spec: ModelSpec, layer: int | None, source: RowSource,
                 out: torch.Tensor | tuple[torch.Tensor, ...], *, tp: int, tp_rank: int) -> None:
    """Fill `out` (the megatron parameter as TP rank `tp_rank` holds it, whole or as the tuple of parts
    megatron saves it as) from the rows of the HF tensors that rank owns, read in place."""
    names = hf_names(rule, spec, layer)
    parts = out if isinstance(out, tuple) else (out,)
    blocks = row_blocks(rule, spec, layer, source.shape, tp=tp, tp_rank=tp_rank)
    if blocks is not None:
        if len(parts) == 1:
            blocks = [[block for part_blocks in blocks for block in part_blocks]]
        if len(parts) != len(blocks):
            raise ValueError(f"{', '.join(names)}: given in {len(parts)} parts, megatron saves {len(blocks)}")
        for part, part_blocks in zip(parts, blocks, strict=True):
            row = 0
            for name, start, stop in part_blocks:
                source.read_rows(name, start, stop, part[row:row + stop - start])
                row += stop - start
            _expect_rows(part, row, names)
        return
    if len(parts) != 1:
        raise ValueError(f"{', '.join(names)}: given in {len(parts)} parts, megatron saves it whole")
    (name,), (out,) = names, parts
    rows = source.shape(name)[0]
    if rule.tp_axis == 1:  # column split: whole rows are read, this rank's columns kept
        full = torch.empty((rows, *source.shape(name)[1:]), dtype=out.dtype)
        source.read_rows(name, 0, rows, full)
        start, stop = _chunk_bounds(full.shape[1], tp, tp_rank)
        if out.shape != full[:, start:stop].shape:
            raise ValueError(f"{name}: columns {start}:{stop} of {tuple(full.shape)} do not fit {tuple(out.shape)}")
        out.copy_(full[:, start:stop])
    else:  # this rank's rows of the padded vocabulary; padding rows are zero
        start, stop = _chunk_bounds(spec.padded_vocab_size(tp), tp, tp_rank)
        _expect_rows(out, stop - start, names)
        real_stop = min(stop, spec.vocab_size)
        if real_stop > start:
            source.read_rows(name, start, real_stop, out[: real_stop - start])
        out[max(real_stop - start, 0):].zero_()


def _expect_rows(out: torch.Tensor, rows: int, names: tuple[str, ...]) -> None:
    if out.shape[0] != rows:
        raise ValueError(f"{', '.join(names)}: {rows} rows for this rank, megatron expects {out.shape[0]}")


def full_row_blocks(rule: Rule, spec: ModelSpec, layer: int | None,
                    hf_shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, int, int]]:
    """The whole megatron tensor, as torch_dist stores it (every TP rank's part in its place), as HF row
    ranges stacked from row 0; any rows after them are vocabulary padding. Export reads each range straight
    into its HF tensor. `hf_shapes`: `expected_hf_shapes(spec)`. (With tied embeddings the output layer is
    the embedding: HF has no lm_head.)"""
    if rule.vocab_padded:
        return [(hf_names(rule, spec, layer)[0], 0, spec.vocab_size)]
    blocks = row_blocks(rule, spec, layer, hf_shapes.__getitem__, tp=1, tp_rank=0)
    return [block for part in blocks for block in part]
