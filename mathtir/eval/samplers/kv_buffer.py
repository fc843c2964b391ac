"""The HF sampler's batch KV cache: per layer, buffers with spare columns that a decode step writes into.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``: a copy of the whole cache,
per layer and per step (O(width) a step; ~5% of the HF sampler bench's wall time on SmolLM2-135M). Here a step
writes its column in place, and a full buffer moves into one half as large again (geometric growth: an amortized
O(1) copy a step). A module of its own so that importing the sampler does not import transformers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

# Spare columns at least, however narrow the cache: a fresh batch of short prompts does not regrow every few steps.
_MIN_SPARE = 64


def _with_room(like: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """An uninitialized [rows, heads, capacity, dim] buffer with room for `width` columns and half as many again:
    a column is written before the views reach it."""
    return like.new_empty(rows, like.shape[1], width + max(width // 2, _MIN_SPARE), like.shape[3])


class KVBufferLayer(DynamicLayer):
    """One layer's KV in [rows, heads, capacity, dim] buffers, the cache in their first columns. ``keys`` and
    ``values`` are views of exactly the filled columns: what attention reads, what the inherited
    ``get_seq_length``/``get_mask_sizes`` (the mask's width) measure, what the sampler takes a row's KV from.
    Overrides what the sampler calls; beam search's reorders (``reorder_cache``, ``batch_repeat_interleave``)
    would act on the views alone."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, width: int):
        super().__init__()
        self.device, self.is_initialized = key_buffer.device, True
        self._buffers = (key_buffer, value_buffer)
        self._fill(width)

    @classmethod
    def left_padded(cls, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> KVBufferLayer:
        """The rows of `parts` ((keys, values) [rows, heads, w, dim] each) one below the other, each right-aligned
        in `width` columns. The padding is zeros: masked out, yet a NaN left there from uninitialized memory would
        still reach attention's weighted sum."""
        rows = sum(keys.shape[0] for keys, _ in parts)
        buffers = tuple(_with_room(tensor, rows, width) for tensor in parts[0])
        start = 0
        for pair in parts:
            end = start + pair[0].shape[0]
            for buffer, tensor in zip(buffers, pair, strict=True):
                padding = width - tensor.shape[-2]
                buffer[start:end, :, :padding].zero_()
                buffer[start:end, :, padding:width] = tensor
            start = end
        return cls(*buffers, width)

    def _fill(self, width: int) -> None:
        self.keys, self.values = (buffer[:, :, :width] for buffer in self._buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        width = self.keys.shape[-2]
        end = width + key_states.shape[-2]
        if end > self._buffers[0].shape[-2]:
            grown = tuple(_with_room(buffer, buffer.shape[0], end) for buffer in self._buffers)
            for new, old in zip(grown, (self.keys, self.values), strict=True):
                new[:, :, :width] = old
            self._buffers = grown
        for buffer, states in zip(self._buffers, (key_states, value_states), strict=True):
            buffer[:, :, width:end] = states
        self._fill(end)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the rows at `indices`, moved up in place (DynamicLayer's would select from the views, leaving behind
        the buffers `update` writes into). Rows that stay where they are (those above the first departure) are not
        copied, the others only in their filled columns, and no new buffer is allocated."""
        width, rows = self.keys.shape[-2], indices.tolist()
        stay = next((new for new, old in enumerate(rows) if new != old), len(rows))
        for buffer in self._buffers:
            buffer[stay:len(rows), :, :width] = buffer[indices[stay:], :, :width]
        self._buffers = tuple(buffer[:len(rows)] for buffer in self._buffers)
        self._fill(width)

    def drop_leading(self, columns: int) -> None:
        """Forgets the first columns: a view, no copy (their memory goes at the next merge or growth)."""
        self._buffers = tuple(buffer[:, :, columns:] for buffer in self._buffers)
        self._fill(self.keys.shape[-2] - columns)
