"""Packed SFT shards: the on-disk contract between data preparation (which writes them) and the trainer (which
reads them).

A directory holds ``shard_{i:05d}.parquet`` files and a ``manifest.json`` written last. A row of a shard is one
packed sequence of ``seq_length`` tokens holding whole documents back to back (``doc_offsets`` are their
boundaries, cu_seqlens style) and right padding. ``loss_mask[t]`` already refers to the *label* at t (token
t+1), so the trainer multiplies the per-token loss of ``labels`` by it directly.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mathtir.files import atomic_target, file_sha256

SHARD_GLOB = "shard_*.parquet"
FORMAT_VERSION = 1
_CACHED_ROW_GROUPS = 8
SHARD_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),
    ("doc_offsets", pa.list_(pa.int32())),
])


@dataclass
class ShardInfo:
    file: str
    rows: int
    tokens: int          # non-pad tokens
    trained_tokens: int  # sum of loss_mask
    sha256: str


def write_shards(out_dir: Path, rows: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                 rows_per_shard: int, row_group_size: int) -> list[ShardInfo]:
    """Write packed rows as shard_{i:05d}.parquet. Same rows -> byte-identical files (no timestamps inside)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[ShardInfo] = []
    for index, chunk in enumerate(_chunks(rows, rows_per_shard)):
        name = f"shard_{index:05d}.parquet"
        table = pa.Table.from_arrays([
            list_array([r[0] for r in chunk], pa.int32()),
            list_array([r[1] for r in chunk], pa.int8()),
            list_array([r[2] for r in chunk], pa.int32()),
        ], schema=SHARD_SCHEMA)
        with atomic_target(out_dir / name) as tmp:
            pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd",
                           write_statistics=False, store_schema=False)
        shards.append(ShardInfo(
            file=name, rows=len(chunk),
            tokens=int(sum(int(r[2][-1]) for r in chunk)),
            trained_tokens=int(sum(int(r[1].sum()) for r in chunk)),
            sha256=file_sha256(out_dir / name)))
    return shards


def _chunks(rows: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def list_array(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """An Arrow list column from numpy arrays, built from one concatenation (no per-element Python objects)."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(value_type.to_pandas_dtype())))


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
