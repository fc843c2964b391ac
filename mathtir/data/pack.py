"""Pack tokenized documents into fixed-length sequences and write them as Parquet shards.

Packing is best-fit decreasing: documents sorted longest first, each placed in the open bin it fills most
tightly. It keeps every document whole (a document never spans two sequences) and is deterministic: ties are
broken by document index, never by hash order.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),
    ("doc_offsets", pa.list_(pa.int32())),
])


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of document indices; every length must be <= capacity (over-length documents are dropped before)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Remaining capacity -> bins with exactly that much room (a stack; the newest bin is reused first).
    bins_with_room: dict[int, list[int]] = {}
    room_values: list[int] = []  # sorted distinct keys of bins_with_room, at most capacity + 1 of them
    for doc in order:
        length = lengths[doc]
        if length > capacity or length <= 0:
            raise ValueError(f"document {doc} has {length} tokens; packing needs 0 < length <= {capacity}")
        k = bisect.bisect_left(room_values, length)
        if k == len(room_values):
            bin_index, room = len(bins), capacity
            bins.append([])
        else:
            room = room_values[k]
            stack = bins_with_room[room]
            bin_index = stack.pop()
            if not stack:
                del bins_with_room[room]
                room_values.pop(k)
        bins[bin_index].append(doc)
        left = room - length
        if left > 0:
            if left not in bins_with_room:
                bins_with_room[left] = []
                bisect.insort(room_values, left)
            bins_with_room[left].append(bin_index)
    return bins


def packed_row(docs: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One packed sequence from (token ids, trained-token flags) documents.

    loss_mask[t] is the flag of the token predicted at t, i.e. of token t+1, and only inside one document:
    the last token of a document predicts the next document's first token, which is never trained on.
    """
    input_ids = np.full(seq_length, pad_id, dtype=np.int32)
    loss_mask = np.zeros(seq_length, dtype=np.int8)
    offsets = [0]
    for ids, trained in docs:
        start, end = offsets[-1], offsets[-1] + len(ids)
        if end > seq_length:
            raise ValueError(f"documents total {end} tokens > seq_length {seq_length}")
        input_ids[start:end] = ids
        loss_mask[start:end - 1] = trained[1:]
        offsets.append(end)
    return input_ids, loss_mask, np.asarray(offsets, dtype=np.int32)


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
            _list_array([r[0] for r in chunk], pa.int32()),
            _list_array([r[1] for r in chunk], pa.int8()),
            _list_array([r[2] for r in chunk], pa.int32()),
        ], schema=SHARD_SCHEMA)
        tmp = out_dir / (name + ".tmp")
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd",
                       write_statistics=False, store_schema=False)
        tmp.replace(out_dir / name)
        shards.append(ShardInfo(
            file=name, rows=len(chunk),
            tokens=int(sum(int(r[2][-1]) for r in chunk)),
            trained_tokens=int(sum(int(r[1].sum()) for r in chunk)),
            sha256=hashlib.sha256((out_dir / name).read_bytes()).hexdigest()))
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


def _list_array(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(value_type.to_pandas_dtype())))
