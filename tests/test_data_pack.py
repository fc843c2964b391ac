"""Packing and the trainer-facing loader: every token kept, loss masks aligned with shifted labels."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mathtir.data.pack import pack_minimum_slack, packed_row
from mathtir.shards import FORMAT_VERSION, PackedDataset, write_shards
from mathtir.train.batches import block_causal_mask, collate, epoch_order

PAD = 0


def _documents(n: int, seed: int, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Documents whose token ids encode (document, position) and whose second half is 'response'."""
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        length = rng.randint(2, max_len)
        ids = np.array([1 + d * 1000 + p for p in range(length)], dtype=np.int32)
        trained = np.zeros(length, dtype=np.int8)
        trained[rng.randint(1, length - 1):] = 1
        docs.append((ids, trained))
    return docs


def _write(tmp_path, docs, seq_length, rows_per_shard=3, row_group_size=2):
    bins = pack_minimum_slack([len(d[0]) for d in docs], seq_length)
    rows = [packed_row([docs[i] for i in b], seq_length, PAD) for b in bins]
    shards = write_shards(tmp_path, rows, rows_per_shard=rows_per_shard, row_group_size=row_group_size)
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "seq_length": seq_length, "tokenizer": {"pad_id": PAD},
        "shards": [vars(s) for s in shards]}))
    return bins, shards


def test_minimum_slack_packing_keeps_every_document_once_and_fills_bins():
    rng = random.Random(0)
    lengths = [rng.randint(1, 400) for _ in range(3000)]
    bins = pack_minimum_slack(lengths, 512)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    fill = sum(lengths) / (512 * len(bins))
    assert fill > 0.98, fill
    with pytest.raises(ValueError, match="document 1 has 600 tokens"):
        pack_minimum_slack([10, 600], 512)


def test_loader_rows_keep_tokens_and_align_loss_mask_with_shifted_labels(tmp_path):
    seq_length = 64
    docs = _documents(40, seed=1, max_len=50)
    bins, shards = _write(tmp_path, docs, seq_length)
    ds = PackedDataset(tmp_path)
    assert len(ds) == len(bins) == sum(s.rows for s in shards)
    assert ds.seq_length == seq_length
    seen_tokens = []
    for i in range(len(ds)):
        row = ds[i]
        tokens, labels, mask, offsets = row["tokens"], row["labels"], row["loss_mask"], row["doc_offsets"]
        assert tokens.shape == labels.shape == mask.shape == (seq_length,)
        assert torch.equal(labels[:-1], tokens[1:]) and labels[-1] == PAD
        assert offsets[0] == 0 and torch.all(offsets[1:] > offsets[:-1]) and offsets[-1] <= seq_length
        assert torch.all(tokens[offsets[-1]:] == PAD)
        for d, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
            doc = (int(tokens[start]) - 1) // 1000
            ids, trained = docs[doc]
            assert tokens[start:end].tolist() == ids.tolist()
            seen_tokens.append(doc)
            for t in range(start, end):
                # Trained iff the label at t is a trained token of the same document.
                expected = t + 1 < end and trained[t + 1 - start] == 1
                assert mask[t].item() == float(expected), (i, d, t)
        assert mask[offsets[-1] - 1:].sum() == 0
    assert sorted(seen_tokens) == list(range(len(docs)))
    total_trained = sum(int(t[1:].sum()) for _, t in docs)
    assert sum(s.trained_tokens for s in shards) == total_trained
    assert sum(s.tokens for s in shards) == sum(len(d[0]) for d in docs)


def test_block_causal_mask_matches_definition():
    s = 10
    offsets = [torch.tensor([0, 3, 7]), torch.tensor([0, 10])]
    mask = block_causal_mask(offsets, s)
    assert mask.shape == (2, 1, s, s) and mask.dtype == torch.bool
    for b, off in enumerate(offsets):
        bounds = off.tolist()

        def doc(p, bounds=bounds):
            return next((k for k in range(len(bounds) - 1) if bounds[k] <= p < bounds[k + 1]), -1)

        for q in range(s):
            for k in range(s):
                allowed = k <= q and doc(q) == doc(k)
                assert mask[b, 0, q, k].item() == (not allowed), (b, q, k)
    # No fully masked row (padding attends to itself), so softmax never sees an all -inf row.
    assert not mask.all(dim=-1).any()


def test_collate_and_shards_are_byte_identical_on_rewrite(tmp_path):
    docs = _documents(25, seed=2, max_len=30)
    _, first = _write(tmp_path / "a", docs, 32)
    _, second = _write(tmp_path / "b", docs, 32)
    assert [s.sha256 for s in first] == [s.sha256 for s in second]
    for s in first:
        assert (tmp_path / "a" / s.file).read_bytes() == (tmp_path / "b" / s.file).read_bytes()
    ds = PackedDataset(tmp_path / "a")
    batch = collate([ds[0], ds[1]])
    assert batch["tokens"].shape == (2, 32) and len(batch["doc_offsets"]) == 2
    assert "attention_mask" not in batch  # built per micro-batch by the trainer, in its backend's form


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(100, epoch=0, seed=7)
    assert sorted(a) == list(range(100))
    assert a == epoch_order(100, epoch=0, seed=7)
    assert a != epoch_order(100, epoch=1, seed=7)
    assert a != epoch_order(100, epoch=0, seed=8)


def test_loader_rejects_missing_manifest_and_row_count_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        PackedDataset(tmp_path)
    _write(tmp_path, _documents(10, seed=3, max_len=20), 32)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["rows"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shard_00000.parquet: \d+ rows, manifest says"):
        PackedDataset(tmp_path)
