"""Pack tokenized documents into fixed-length sequences (written as shards by mathtir.shards).

Packing is minimum bin slack: each sequence starts with the longest remaining document and is then filled
with the subset of the remaining documents that leaves the least room (an exact subset-sum over document
lengths, with Python integers as bitsets). It packs tighter than first-fit or best-fit decreasing (those leave
a gap in almost every sequence once only long documents are left to place), keeps every document whole (a
document never spans two sequences) and is deterministic: ties are broken by document index.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def pack_minimum_slack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of document indices; every length must be in (0, capacity] (over-length documents are dropped
    before). Each bin: the longest remaining document, then the fullest-fitting subset of the rest."""
    for doc, length in enumerate(lengths):
        if not 0 < length <= capacity:
            raise ValueError(f"document {doc} has {length} tokens; packing needs 0 < length <= {capacity}")
    # length -> its documents, as a stack whose top is the lowest index
    docs_of: dict[int, list[int]] = {}
    for doc in sorted(range(len(lengths)), key=lambda i: (lengths[i], -i)):
        docs_of.setdefault(lengths[doc], []).append(doc)
    ascending = sorted(docs_of)  # the lengths that still have documents
    bins: list[list[int]] = []
    while ascending:
        longest = ascending[-1]
        first = docs_of[longest].pop()
        if not docs_of[longest]:
            ascending.pop()
        chosen = [first] + _fullest_subset(docs_of, ascending, capacity - longest)
        bins.append(chosen)
        for length in {lengths[doc] for doc in chosen[1:]}:
            if not docs_of[length]:
                del ascending[bisect.bisect_left(ascending, length)]
    return bins


def _fullest_subset(docs_of: dict[int, list[int]], ascending: list[int], room: int) -> list[int]:
    """Pop and return the documents of a subset whose total length is the largest one <= room.

    Bounded subset sum: each length with c documents enters as pieces of 1, 2, 4, ... documents; bit s of
    ``reach`` says that total s is reachable. Longest lengths first; stops early at a perfect fit (the common
    case while many documents are left).
    """
    mask = (1 << (room + 1)) - 1
    full = 1 << room
    reach = 1
    history: list[tuple[int, int, int]] = []  # (length, documents in the piece, reach before the piece)
    for k in range(bisect.bisect_right(ascending, room) - 1, -1, -1):
        length = ascending[k]
        left, piece = len(docs_of[length]), 1
        while left:
            take = piece if piece < left else left
            if length * take > room:
                break
            history.append((length, take, reach))
            reach |= (reach << (length * take)) & mask
            left -= take
            piece *= 2
        if reach & full:
            break
    total = reach.bit_length() - 1
    chosen: list[int] = []
    for length, take, before in reversed(history):
        if total and not before >> total & 1:  # total became reachable only with this piece
            chosen += [docs_of[length].pop() for _ in range(take)]
            total -= length * take
    return chosen


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
