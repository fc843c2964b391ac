"""The HF Llama <-> megatron-core GPTModel weight mapping: a registry of typed parameter mappings.

Each mapping names a megatron parameter and the HF tensor(s) it is made of, and its class says how they
combine and how tensor parallelism splits it (Megatron-Bridge's param mappings are the model). Every class
answers both directions from one description of the layout:

* import (`row_blocks`, `import_shard`): the megatron parameter as one TP rank holds it, from only the rows of
  the HF tensors that rank owns, read straight into the parameter or, where they are one range of one
  tensor, used where they lie;
* export (`full_row_blocks`): the whole stored megatron tensor (torch_dist keeps every TP rank's part in its
  place) as HF row ranges, which export reads straight into the HF tensors.

Layouts (docs/checkpoints.md has the verified table):
* `FusedQKV`: megatron's fused QKV weight interleaves per query group: for each of the ng groups, its nh/ng
  query heads, then its key head, then its value head. A TP rank owns whole query groups, a contiguous chunk.
* `GatedMLP`: linear_fc1 = cat(gate, up), but TP rank r holds cat(gate shard r, up shard r), not a plain chunk;
  megatron saves the two halves apart, so torch_dist's stored tensor is cat(gate, up) at any TP.
* `VocabParallel`: zero rows appended up to `ModelSpec.padded_vocab_size(tp)`.
* `OutputLayer`: with tied embeddings HF has no lm_head; the output layer is the embedding and is not exported.
HF q/k already use the rotate-half RoPE layout megatron expects: no permutation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from mathtir.models.llama import ModelSpec

# (HF tensor name, first row, stop row)
Block = tuple[str, int, int]


class RowSource(Protocol):
    """Where import reads HF tensors from: shapes, and row ranges written straight into a destination."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> None: ...


def _chunk_bounds(n: int, tp: int, rank: int) -> tuple[int, int]:
    size = n // tp
    return rank * size, (rank + 1) * size


@dataclass(frozen=True)
class ParamMapping:
    """One megatron parameter ("{i}" = global layer index) and the HF tensors it is made of. The base class is
    a parameter every TP rank holds whole (norm weights)."""

    megatron: str
    hf: tuple[str, ...]
    vocab_padded = False

    def hf_names(self, spec: ModelSpec, layer: int | None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.hf)

    def exported(self, spec: ModelSpec) -> bool:
        """Whether HF keeps this parameter as tensors of its own."""
        return True

    def row_blocks(self, spec: ModelSpec, layer: int | None, shape_of: Callable[[str], tuple[int, ...]], *,
                   tp: int, tp_rank: int) -> list[list[Block]] | None:
        """The parameter as TP rank `tp_rank` holds it, as HF row ranges stacked in order: a list of blocks per
        part megatron saves it as (one part unless said otherwise). None where rows alone do not describe it."""
        (name,) = self.hf_names(spec, layer)
        return [[(name, 0, shape_of(name)[0])]]

    def import_shard(self, spec: ModelSpec, layer: int | None, source: RowSource,
                     out: torch.Tensor | tuple[torch.Tensor, ...], *, tp: int, tp_rank: int) -> None:
        """Fill `out` (the parameter as TP rank `tp_rank` holds it, whole or as the tuple of parts megatron saves
        it as) from the rows of the HF tensors that rank owns, read in place."""
        names = self.hf_names(spec, layer)
        parts = out if isinstance(out, tuple) else (out,)
        blocks = self.row_blocks(spec, layer, source.shape, tp=tp, tp_rank=tp_rank)
        if blocks is None:
            if len(parts) != 1:
                raise ValueError(f"{', '.join(names)}: given in {len(parts)} parts, megatron saves it whole")
            self._import_unblocked(spec, names[0], source, parts[0], tp=tp, tp_rank=tp_rank)
            return
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

    def _import_unblocked(self, spec: ModelSpec, name: str, source: RowSource, out: torch.Tensor, *, tp: int,
                          tp_rank: int) -> None:
        raise AssertionError(f"{type(self).__name__} always describes its rows")

    def full_row_blocks(self, spec: ModelSpec, layer: int | None, hf_shapes: dict[str, tuple[int, ...]]) -> list[Block]:
        """The whole stored tensor as HF row ranges stacked from row 0 (any rows after them are vocabulary
        padding). `hf_shapes`: `expected_hf_shapes(spec)`."""
        blocks = self.row_blocks(spec, layer, hf_shapes.__getitem__, tp=1, tp_rank=0)
        return [block for part in blocks for block in part]


class Replicated(ParamMapping):
    """Held whole by every TP rank (RMSNorm weights)."""


class RowParallel(ParamMapping):
    """Split along the input dimension (columns): no rank's part is a row range of the HF tensor."""

    def row_blocks(self, spec, layer, shape_of, *, tp, tp_rank):
        return super().row_blocks(spec, layer, shape_of, tp=tp, tp_rank=tp_rank) if tp == 1 else None

    def _import_unblocked(self, spec, name, source, out, *, tp, tp_rank):
        rows = source.shape(name)[0]
        full = torch.empty((rows, *source.shape(name)[1:]), dtype=out.dtype)
        source.read_rows(name, 0, rows, full)  # whole rows are read, this rank's columns kept
        start, stop = _chunk_bounds(full.shape[1], tp, tp_rank)
        if out.shape != full[:, start:stop].shape:
            raise ValueError(f"{name}: columns {start}:{stop} of {tuple(full.shape)} do not fit {tuple(out.shape)}")
        out.copy_(full[:, start:stop])


class VocabParallel(ParamMapping):
    """Vocabulary rows split over TP ranks, padded with zero rows to `padded_vocab_size(tp)`."""

    vocab_padded = True

    def row_blocks(self, spec, layer, shape_of, *, tp, tp_rank):
        (name,) = self.hf_names(spec, layer)
        start, stop = _chunk_bounds(spec.padded_vocab_size(tp), tp, tp_rank)
        return [[(name, start, stop)]] if stop <= shape_of(name)[0] else None  # padding rows in this range

    def _import_unblocked(self, spec, name, source, out, *, tp, tp_rank):
        start, stop = _chunk_bounds(spec.padded_vocab_size(tp), tp, tp_rank)
        _expect_rows(out, stop - start, (name,))
        real_stop = min(stop, spec.vocab_size)
        if real_stop > start:
            source.read_rows(name, start, real_stop, out[: real_stop - start])
        out[max(real_stop - start, 0):].zero_()

    def full_row_blocks(self, spec, layer, hf_shapes):
        return [(self.hf_names(spec, layer)[0], 0, spec.vocab_size)]


class OutputLayer(VocabParallel):
    """lm_head. With tied embeddings HF has none: the last pipeline stage's copy is the embedding."""

    def hf_names(self, spec, layer):
        return ("model.embed_tokens.weight",) if spec.tie_word_embeddings else super().hf_names(spec, layer)

    def exported(self, spec):
        return not spec.tie_word_embeddings


class FusedQKV(ParamMapping):
    """q, k, v fused and interleaved per query group; a TP rank owns whole query groups."""

    def row_blocks(self, spec, layer, shape_of, *, tp, tp_rank):
        q_name, k_name, v_name = self.hf_names(spec, layer)
        hd, q_per_group = spec.head_dim, spec.num_attention_heads // spec.num_kv_heads
        g0, g1 = _chunk_bounds(spec.num_kv_heads, tp, tp_rank)
        blocks = []
        for g in range(g0, g1):  # per query group: its q heads, its k head, its v head
            blocks += [(q_name, g * q_per_group * hd, (g + 1) * q_per_group * hd),
                       (k_name, g * hd, (g + 1) * hd), (v_name, g * hd, (g + 1) * hd)]
        return [blocks]


class GatedMLP(ParamMapping):
    """SwiGLU's fc1: this rank's gate rows, then its up rows, saved by megatron as two parts."""

    def row_blocks(self, spec, layer, shape_of, *, tp, tp_rank):
        gate, up = self.hf_names(spec, layer)
        start, stop = _chunk_bounds(spec.ffn_hidden_size, tp, tp_rank)
        return [[(gate, start, stop)], [(up, start, stop)]]


def _expect_rows(out: torch.Tensor, rows: int, names: tuple[str, ...]) -> None:
    if out.shape[0] != rows:
        raise ValueError(f"{', '.join(names)}: {rows} rows for this rank, megatron expects {out.shape[0]}")


_L = "model.layers.{i}."
MAPPINGS: tuple[ParamMapping, ...] = (
    VocabParallel("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Replicated("decoder.layers.{i}.input_layernorm.weight", (_L + "input_layernorm.weight",)),
    FusedQKV("decoder.layers.{i}.self_attention.linear_qkv.weight",
             (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight")),
    RowParallel("decoder.layers.{i}.self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",)),
    Replicated("decoder.layers.{i}.pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",)),
    GatedMLP("decoder.layers.{i}.mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight")),
    RowParallel("decoder.layers.{i}.mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",)),
    Replicated("decoder.final_layernorm.weight", ("model.norm.weight",)),
    OutputLayer("output_layer.weight", ("lm_head.weight",)),
)
LAYER_MAPPINGS = tuple(m for m in MAPPINGS if "{i}" in m.megatron)
# Buffers some HF checkpoints carry that are recomputed from the config, never weights.
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_MEGATRON_PATTERNS = [(_pattern(m.megatron), m) for m in MAPPINGS]


def match_megatron(name: str) -> tuple[ParamMapping, int | None]:
    """The mapping for a megatron parameter name (layers numbered globally) and its layer index."""
    for pattern, mapping in _MEGATRON_PATTERNS:
        m = pattern.match(name)
        if m:
            return mapping, int(m.group(1)) if m.groups() else None
    raise KeyError(f"megatron parameter {name!r} has no mapping rule")


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
