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


def _zeros_with_room(like: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """[rows, heads, capacity, dim] zeros with room for `width` columns and half as many again. Zeros, not empty:
    left padding is masked out, yet a NaN from uninitialized memory would still reach attention's weighted sum."""
    return like.new_zeros(rows, like.shape[1], width + max(width // 2, _MIN_SPARE), like.shape[3])


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
        in `width` columns."""
        rows = sum(keys.shape[0] for keys, _ in parts)
        buffers = tuple(_zeros_with_room(tensor, rows, width) for tensor in parts[0])
        start = 0
        for pair in parts:
            end = start + pair[0].shape[0]
            for buffer, tensor in zip(buffers, pair, strict=True):
                buffer[start:end, :, width - tensor.shape[-2]:width] = tensor
            start = end
        return cls(*buffers, width)

    def _fill(self, width: int) -> None:
        self.keys, self.values = (buffer[:, :, :width] for buffer in self._buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        width = self.keys.shape[-2]
        end = width + key_states.shape[-2]
        if end > self._buffers[0].shape[-2]:
            grown = tuple(_zeros_with_room(buffer, buffer.shape[0], end) for buffer in self._buffers)
            for new, old in zip(grown, (self.keys, self.values), strict=True):
                new[:, :, :width] = old
            self._buffers = grown
        for buffer, states in zip(self._buffers, (key_states, value_states), strict=True):
            buffer[:, :, width:end] = states
        self._fill(end)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # DynamicLayer's selects from the views, leaving behind the buffers `update` writes into
        self._buffers = tuple(buffer[indices] for buffer in self._buffers)
        self._fill(self.keys.shape[-2])

    def drop_leading(self, columns: int) -> None:
        """Forgets the first columns. A view, no copy: the next row selection or growth copies only the rest."""
        self._buffers = tuple(buffer[:, :, columns:] for buffer in self._buffers)
        self._fill(self.keys.shape[-2] - columns)
