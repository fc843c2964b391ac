"""Phase 2 of preparation: ``merge(cfg, num_parts)`` puts all documents of the parts back in input order (so
the result does not depend on num_parts), removes exact and near duplicates, packs (minimum bin slack),
writes the shards (mathtir.shards), the manifest, ``dropped.jsonl`` and ``report.md``.

Every record read is accounted for: the manifest's counts add up to the records read, and the merge checks it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from mathtir.data.clean import NearDuplicateIndex
from mathtir.data.pack import pack_minimum_slack, packed_row
from mathtir.data.part import PART_FORMAT, PART_SCHEMA, log, part_stem, resolve_inputs, slice_stem
from mathtir.data.recipe import fingerprint
from mathtir.data.records import DROP_REASONS, Drop
from mathtir.data.report import render_report, verification_summary
from mathtir.files import atomic_write_json, atomic_write_text, file_sha256
from mathtir.readers import DataError, input_files
from mathtir.shards import FORMAT_VERSION, write_shards


class _DocStore:
    """Memory-mapped part files; documents addressed by (chunk, row) without copying token arrays."""

    def __init__(self, paths: list[Path]):
        self.chunks: list[dict] = []
        for path in paths:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                if batch.num_rows == 0:
                    continue
                chunk = {name: batch.column(name) for name in PART_SCHEMA.names}
                for name in ("input_ids", "trained"):
                    chunk[name + "_values"] = chunk[name].values.to_numpy(zero_copy_only=True)
                    chunk[name + "_offsets"] = chunk[name].offsets.to_numpy()
                self.chunks.append(chunk)

    def refs(self) -> list[tuple[int, int]]:
        return [(c, r) for c, chunk in enumerate(self.chunks) for r in range(len(chunk["source"]))]

    def column(self, name: str) -> list:
        return [v for chunk in self.chunks for v in chunk[name].to_pylist()]

    def document(self, ref: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        chunk, row = self.chunks[ref[0]], ref[1]
        a, b = chunk["input_ids_offsets"][row], chunk["input_ids_offsets"][row + 1]
        c, d = chunk["trained_offsets"][row], chunk["trained_offsets"][row + 1]
        return chunk["input_ids_values"][a:b], chunk["trained_values"][c:d]


def merge(cfg: DictConfig, num_parts: int = 1) -> dict:
    out = Path(cfg.output_dir)
    parts_dir = out / "parts"
    config_id = fingerprint(cfg)
    part_counts: Counter = Counter()
    identity = None
    stems: list[str] = []  # one per slice file pair, over all parts
    for part in range(num_parts):
        done_path = parts_dir / f"{part_stem(part, num_parts)}.json"
        if not done_path.is_file():
            raise DataError(f"{done_path}: part {part} of {num_parts} is not done; run its prepare step first")
        done = json.loads(done_path.read_text())
        if done.get("fingerprint") != config_id or done.get("part_format") != PART_FORMAT:
            raise DataError(f"{done_path}: part {part} was prepared with another config or input; redo it")
        part_counts.update(done["counts"])
        identity = identity or done["tokenizer"]
        stems += [slice_stem(part_stem(part, num_parts), w) for w in range(done["slices"])]

    store = _DocStore([parts_dir / f"{s}.arrow" for s in stems])
    refs = store.refs()
    sources = np.array(store.column("source"), dtype=np.int64)
    indices = np.array(store.column("index"), dtype=np.int64)
    locations = store.column("location")
    keys = store.column("key")
    signatures = store.column("signature") if cfg.dedup.near else None
    order = np.lexsort((indices, sources))  # input order, whatever the number of parts

    counts = Counter(part_counts)
    dedup_drops: list[Drop] = []
    seen: dict[bytes, int] = {}
    near = (NearDuplicateIndex(cfg.dedup.num_perm, cfg.dedup.bands, cfg.dedup.near_threshold)
            if cfg.dedup.near else None)
    near_kept: list[int] = []
    kept: list[int] = []
    exact = bool(cfg.dedup.exact)  # a plain bool: OmegaConf attribute access is slow in a per-document loop
    for i in order.tolist():
        if exact:
            first = seen.setdefault(keys[i], i)
            if first != i:
                dedup_drops.append(Drop(int(sources[i]), int(indices[i]), locations[i], "exact_duplicate",
                                        f"duplicate of {locations[first]}"))
                continue
        if near is not None:
            other = near.add_if_new(np.asarray(signatures[i], dtype=np.uint32))
            if other is not None:
                dedup_drops.append(Drop(int(sources[i]), int(indices[i]), locations[i], "near_duplicate",
                                        f"near duplicate of {locations[near_kept[other]]}"))
                continue
            near_kept.append(i)
        kept.append(i)
    for drop in dedup_drops:
        counts[drop.reason] += 1

    lengths = [len(store.document(refs[i])[0]) for i in kept]
    bins = pack_minimum_slack(lengths, int(cfg.seq_length)) if kept else []
    # Shuffle whole sequences (seeded): packing puts the longest documents first.
    bins = [bins[j] for j in np.random.Generator(np.random.PCG64(cfg.seed)).permutation(len(bins))]
    seq_length, pad_id = int(cfg.seq_length), int(identity["pad_id"])
    rows = (packed_row([store.document(refs[kept[d]]) for d in b], seq_length, pad_id) for b in bins)
    shards = write_shards(out, rows, rows_per_shard=cfg.pack.rows_per_shard, row_group_size=cfg.pack.row_group_size)
    for stale in sorted(out.glob("shard_*.parquet")):
        if stale.name not in {s.file for s in shards}:
            stale.unlink()

    dropped = _write_drops(out, stems, parts_dir, dedup_drops)
    drops_total = len(dropped)
    counts["packed_documents"] = len(kept)
    accounted = counts["packed_documents"] + sum(counts[r] for r in DROP_REASONS)
    if accounted != counts["records_read"] or drops_total != sum(counts[r] for r in DROP_REASONS):
        raise RuntimeError(f"record accounting is off: {counts['records_read']} read, {accounted} accounted for, "
                           f"{drops_total} listed in dropped.jsonl")

    packed_tokens = sum(s.tokens for s in shards)
    hits = [{"location": d["location"], **d["info"]} for d in dropped if d["reason"] == "contaminated"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "seq_length": cfg.seq_length,
        "seed": cfg.seed,
        "tokenizer": identity,
        "sources": [{"path": str(p), "format": fmt,
                     "files": [{"path": str(f), "bytes": f.stat().st_size, "sha256": file_sha256(f)}
                               for f in input_files(p, fmt)]}
                    for p, fmt in resolve_inputs(cfg)],
        "counts": {"records_read": counts["records_read"],
                   **{r: counts[r] for r in DROP_REASONS},
                   "packed_documents": counts["packed_documents"]},
        "verification": verification_summary(counts) if cfg.verify.enabled else None,
        "decontamination": {
            **OmegaConf.to_container(cfg.decontam, resolve=True),
            "hits": hits,
            "by_kind": dict(Counter(hit["kind"] for hit in hits)),
        },
        "tokens": {
            "documents": packed_tokens,
            "trained": sum(s.trained_tokens for s in shards),
            "sequences": len(bins),
            "capacity": len(bins) * cfg.seq_length,
            "fill": packed_tokens / (len(bins) * cfg.seq_length) if bins else 0.0,
            "mean_document_length": packed_tokens / len(kept) if kept else 0.0,
            "max_document_length": max(lengths, default=0),
        },
        "shards": [vars(s) for s in shards],
        "num_parts": num_parts,
        "config_fingerprint": config_id,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_text(out / "report.md", render_report(manifest))
    # last: the loader never sees shards of a half-finished merge
    atomic_write_json(out / "manifest.json", manifest, indent=1)
    log(f"merged: {len(kept)} documents -> {len(bins)} sequences of {cfg.seq_length} "
         f"(fill {manifest['tokens']['fill']:.4f}) in {len(shards)} shards at {out}")
    return manifest


def _write_drops(out: Path, stems: list[str], parts_dir: Path, dedup_drops: list[Drop]) -> list[dict]:
    """<out>/dropped.jsonl: every record that did not make it into the shards, in input order, with why."""
    lines = []
    for stem in stems:
        lines += (parts_dir / f"{stem}.dropped.jsonl").read_text(encoding="utf-8").splitlines()
    lines += [d.as_json() for d in dedup_drops]
    entries = sorted((json.loads(line) for line in lines), key=lambda e: (e["source"], e["index"]))
    atomic_write_text(out / "dropped.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    return entries


