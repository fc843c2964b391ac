"""What the trainer reads: packed SFT shards written by ``mathtir.data prepare``.

A row of a shard is one packed sequence of ``seq_length`` tokens holding whole documents back to back
(``doc_offsets`` are their boundaries, cu_seqlens style) and right padding. ``loss_mask[t]`` already refers to
the *label* at t (token t+1), so the trainer multiplies the per-token loss of ``labels`` by it directly.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

SHARD_GLOB = "shard_*.parquet"
FORMAT_VERSION = 1
_CACHED_ROW_GROUPS = 8


class PackedDataset:
    """Random access to packed sequences; reads one Parquet row group at a time (bounded memory)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no manifest; run `python -m mathtir.data prepare` first")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path}: format_version {self.manifest.get('format_version')!r}, "
                f"this loader reads {FORMAT_VERSION}")
        self.seq_length = int(self.manifest["seq_length"])
        self.pad_id = int(self.manifest["tokenizer"]["pad_id"])
        self.shards = [self.directory / s["file"] for s in self.manifest["shards"]]
        # (shard index, row group index, first global row) for every row group, in order.
        self._groups: list[tuple[int, int, int]] = []
        first = 0
        for shard_index, (path, entry) in enumerate(zip(self.shards, self.manifest["shards"], strict=True)):
            meta = pq.ParquetFile(path).metadata
            if meta.num_rows != entry["rows"]:
                raise ValueError(f"{path}: {meta.num_rows} rows, manifest says {entry['rows']}")
            for rg in range(meta.num_row_groups):
                self._groups.append((shard_index, rg, first))
                first += meta.row_group(rg).num_rows
        self._len = first
        self._group_starts = np.array([g[2] for g in self._groups], dtype=np.int64)
        self._cache: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return self._len

    def _row_group(self, shard_index: int, rg: int) -> dict[str, np.ndarray]:
        """One row group as flat value arrays plus row offsets per column (no per-token Python objects)."""
        key = (shard_index, rg)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = pq.ParquetFile(self.shards[shard_index]).read_row_group(
            rg, columns=["input_ids", "loss_mask", "doc_offsets"])
        group = {}
        for name in ("input_ids", "loss_mask", "doc_offsets"):
            column = table.column(name).combine_chunks()
            group[name] = column.values.to_numpy()
            group[name + "_offsets"] = column.offsets.to_numpy()
        self._cache[key] = group
        if len(self._cache) > _CACHED_ROW_GROUPS:
            self._cache.popitem(last=False)
        return group

    def _row(self, group: dict[str, np.ndarray], name: str, row: int) -> np.ndarray:
        offsets = group[name + "_offsets"]
        return group[name][offsets[row]:offsets[row + 1]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} packed sequences")
        index %= self._len
        g = int(np.searchsorted(self._group_starts, index, side="right")) - 1
        shard_index, rg, first = self._groups[g]
        group = self._row_group(shard_index, rg)
        row = index - first
        tokens = torch.from_numpy(self._row(group, "input_ids", row).astype(np.int64))
        if tokens.numel() != self.seq_length:
            raise ValueError(f"{self.shards[shard_index]}: row {row} of row group {rg} has "
                             f"{tokens.numel()} tokens, expected seq_length {self.seq_length}")
        labels = torch.full_like(tokens, self.pad_id)
        labels[:-1] = tokens[1:]
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": torch.from_numpy(self._row(group, "loss_mask", row).astype(np.float32)),
            "doc_offsets": torch.from_numpy(self._row(group, "doc_offsets", row).astype(np.int64)),
        }


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


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """A micro-batch: stacked tokens/labels/loss_mask, the documents' offsets and their attention mask."""
    seq_length = samples[0]["tokens"].numel()
    doc_offsets = [sample["doc_offsets"] for sample in samples]
    return {
        "tokens": torch.stack([sample["tokens"] for sample in samples]),
        "labels": torch.stack([sample["labels"] for sample in samples]),
        "loss_mask": torch.stack([sample["loss_mask"] for sample in samples]),
        "doc_offsets": doc_offsets,
        "attention_mask": block_causal_mask(doc_offsets, seq_length),
    }


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The order in which epoch ``epoch`` visits the n packed sequences: a seeded permutation, identical on
    every rank and every platform (numpy PCG64), so a resumed run continues exactly where it stopped."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(n).tolist()
