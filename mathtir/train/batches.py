"""The trainer's sample stream: a seeded order over the packed sequences, and micro-batches with their masks."""

from __future__ import annotations

import numpy as np
import torch

from mathtir.megatron.attention import document_ids, one_document_per_row


def block_causal_mask(doc_offsets_batch: list[torch.Tensor], s: int) -> torch.Tensor:
    """[b, 1, s, s] bool, True = masked: causal inside each document, nothing across documents.

    The padding after the last document forms one more causal block, so no attention row is fully masked
    (a fully masked softmax row gives NaN even though its loss is masked).
    """
    positions = torch.arange(s)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    masks = []
    for offsets in doc_offsets_batch:
        doc_of_position = torch.searchsorted(offsets[1:].to(torch.long), positions, right=True)
        masks.append((doc_of_position[:, None] != doc_of_position[None, :]) | causal)
    return torch.stack(masks).unsqueeze(1)


def attention_mask_for(backend: str, doc_offsets_batch: list[torch.Tensor], seq_length: int) -> torch.Tensor | None:
    """What the model takes as `attention_mask` for a packed micro-batch with attention backend `backend`
    ("te" takes the documents as packed_seq_params instead): megatron's local attention the s x s
    `block_causal_mask`; the PyTorch kernels (mathtir.megatron.attention) None when plain causal attention
    is exact (their fastest path), else the [b, s] document ids, from which they build their own mask."""
    if backend == "local":
        return block_causal_mask(doc_offsets_batch, seq_length)
    if one_document_per_row(doc_offsets_batch):
        return None
    return document_ids(doc_offsets_batch, seq_length)


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """A micro-batch: stacked tokens/labels/loss_mask and the documents' offsets. The attention mask is the
    trainer's to build, in the form its attention backend takes (an s x s mask for every micro-batch of a
    step, built here up front, would hold seq_length^2 bytes each until the step ends)."""
    return {
        "tokens": torch.stack([sample["tokens"] for sample in samples]),
        "labels": torch.stack([sample["labels"] for sample in samples]),
        "loss_mask": torch.stack([sample["loss_mask"] for sample in samples]),
        "doc_offsets": [sample["doc_offsets"] for sample in samples],
    }


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The order in which epoch ``epoch`` visits the n packed sequences: a seeded permutation, identical on
    every rank and every platform (numpy PCG64), so a resumed run continues exactly where it stopped."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(n).tolist()


class SampleStream:
    """The packed sequences as one stream, epoch after epoch, each epoch a seeded permutation (`epoch_order`)."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self._order: tuple[int, list[int]] | None = None  # (epoch, its permutation): only the current one

    def sample_at(self, position: int) -> dict:
        epoch, index = divmod(position, len(self.dataset))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.dataset), epoch, self.seed))
        return self.dataset[self._order[1][index]]

    def micro_batches(self, first: int, count: int, size: int) -> list[dict]:
        """`count` micro-batches of `size` consecutive stream positions from `first` on."""
        return [collate([self.sample_at(first + mb * size + j) for j in range(size)]) for mb in range(count)]
