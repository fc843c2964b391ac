"""Core attention on PyTorch's own kernels, for megatron's local layer spec (no Transformer Engine).

megatron's local `DotProductAttention` materialises the [b, heads, s, s] scores in fp32, softmaxes them and
keeps the probabilities for backward: the memory and most of the time of a CPU step. `TorchCoreAttention`
takes its place in the layer spec (`mathtir.megatron.model.layer_block_spec`) and computes the same
attention with `torch.nn.functional.scaled_dot_product_attention` (backend "sdpa") or a compiled
`flex_attention` over a document block mask (backend "flex", GPU only: flex_attention has no CPU backward).

What reaches the core attention as `attention_mask` (megatron passes it through untouched, also through
full recompute, which is why it has to be a tensor):

* None: a plain causal batch (one document per row, or documents followed only by padding);
* a [b, s] integer tensor, the document index of every position of a packed row (`document_ids`); a
  position attends causally inside its own document only. SDPA then runs once per document with its causal
  (mask-free) kernel, on spans found once per micro-batch; flex builds a block mask from the ids, once per
  micro-batch.

docs/attention.md explains the choice of kernels and the measurements.
"""

from __future__ import annotations

import functools
import math

import torch

BACKENDS = ("auto", "te", "sdpa", "flex", "local")


def document_ids(doc_offsets_batch: list[torch.Tensor], seq_length: int) -> torch.Tensor:
    """[b, s] int32: for each packed row, the document index of every position (from the row's document
    start offsets, as the shards store them). The padding after the last document is one more document."""
    positions = torch.arange(seq_length)
    return torch.stack([torch.searchsorted(offsets[1:].to(torch.long), positions, right=True).to(torch.int32)
                        for offsets in doc_offsets_batch])


def one_document_per_row(doc_offsets_batch: list[torch.Tensor]) -> bool:
    """True when causal attention is exact for the micro-batch: each row holds at most one document
    (a padding tail after it is loss-masked and comes later, so no trained position sees it)."""
    return all(len(offsets) <= 2 for offsets in doc_offsets_batch)


def document_spans(doc_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) position range of each document (consecutive equal ids)."""
    spans = []
    for row in doc_ids:
        _, counts = torch.unique_consecutive(row, return_counts=True)
        ends = counts.cumsum(0).tolist()
        spans.append(list(zip([0, *ends[:-1]], ends, strict=True)))
    return spans


class _PerBatchCache:
    """The mask derived from the current micro-batch's document ids, reused by every layer of the chunk
    (and by recompute) until another micro-batch arrives."""

    def __init__(self, build):
        self.build = build
        self.key: torch.Tensor | None = None
        self.value = None

    def get(self, doc_ids: torch.Tensor):
        if self.key is None or self.key.shape != doc_ids.shape or not torch.equal(self.key, doc_ids):
            self.key, self.value = doc_ids.clone(), self.build(doc_ids)
        return self.value


_sdpa_spans = _PerBatchCache(document_spans)


def _flex_block_mask(doc_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    b, s = doc_ids.shape
    return create_block_mask(same_document_causal, b, None, s, s, device=doc_ids.device)


@functools.lru_cache(maxsize=8)
def _flex_causal_mask(b: int, s: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, b, None, s, s, device=device)


_flex_masks = _PerBatchCache(_flex_block_mask)
_compiled_flex = None


def _flex_attention():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        # Uncompiled, flex_attention is a reference implementation that materialises the scores.
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class TorchCoreAttention(torch.nn.Module):
    """Drop-in `core_attention` for megatron's `SelfAttention` (same constructor and forward contract as
    megatron.core.transformer.dot_product_attention.DotProductAttention): query [sq, b, heads, hn],
    key/value [sk, b, groups, hn] in, context [sq, b, heads * hn] out, for this rank's heads."""

    kernel = "sdpa"  # set on the subclass the layer spec uses

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__()
        from megatron.core import parallel_state

        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine (model.attention_backend=te)")
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError(f"attention backend {self.kernel!r} supports only vanilla softmax without a window")
        self.config = config
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(f"attention backend {self.kernel!r} takes packed rows as document ids, not "
                             "packed_seq_params or an attention bias")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention backend {self.kernel!r} expects None (causal) or [b, s] document ids "
                             f"as attention_mask, got shape {tuple(attention_mask.shape)}")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout if self.training else 0.0
        if self.kernel == "flex":
            mask = _flex_masks.get(attention_mask) if attention_mask is not None else \
                _flex_causal_mask(b, sq, q.device)
            if dropout:
                raise ValueError("attention backend 'flex' has no attention dropout; use 'sdpa'")
            context = _flex_attention()(q, k, v, block_mask=mask, scale=self.softmax_scale,
                                        enable_gqa=self.groups != self.heads)
        else:
            context = self._sdpa(q, k, v, attention_mask, dropout)
        # [b, n, s, hn] -> [s, b, n * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)

    def _sdpa(self, q, k, v, doc_ids, dropout):
        from megatron.core import tensor_parallel

        def attend():
            kwargs = dict(dropout_p=dropout, scale=self.softmax_scale, enable_gqa=self.groups != self.heads,
                          is_causal=True)
            if doc_ids is None:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
            # Each document on its own, causally: exactly the block-diagonal causal mask, at the cost of
            # sum(len^2) instead of s^2, on the kernels' mask-free causal path.
            return torch.cat([
                torch.cat([torch.nn.functional.scaled_dot_product_attention(
                    q[b:b + 1, :, start:end], k[b:b + 1, :, start:end], v[b:b + 1, :, start:end], **kwargs)
                    for start, end in row_spans], dim=2)
                for b, row_spans in enumerate(_sdpa_spans.get(doc_ids))], dim=0)

        if dropout and not self.config.sequence_parallel:
            # as megatron's local attention: dropout draws from the model-parallel RNG stream
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attend()
        return attend()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        return {}  # no parameters, nothing to checkpoint


class SdpaCoreAttention(TorchCoreAttention):
    kernel = "sdpa"


class FlexCoreAttention(TorchCoreAttention):
    kernel = "flex"
