"""``prepare``: raw records -> cleaned, tokenized documents (per part) -> deduplicated, packed shards (merge).

Two phases, so that a Slurm array job can run the first one in parallel:

1. ``prepare_part(cfg, part, num_parts)`` reads every num_parts-th record and runs the per-record steps in
   ``workers`` processes, each on its own slice: field mapping, mode selection, rendering (mathtir.formats),
   structural filters, answer check (mathtir.answers), decontamination, tokenization (the HF fast tokenizer
   of ``cfg.tokenizer``), over-length drop, execution verification through the sandbox. Surviving documents
   go to ``<out>/parts/part_I-of-N.sliceW.arrow`` (Arrow IPC, memory-mapped by the merge), every dropped
   record to ``part_I-of-N.sliceW.dropped.jsonl``, and the part's counts to ``part_I-of-N.json`` (written
   last: its presence marks the part done, so a rerun skips it).
2. ``merge(cfg, num_parts)`` puts all documents back in input order (so the result does not depend on
   num_parts), removes exact and near duplicates, packs (minimum bin slack), writes the shards, the
   manifest, ``dropped.jsonl`` and ``report.md``.

Every record read is accounted for: the manifest's counts add up to the records read, and the merge checks it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from mathtir.data.clean import DecontaminationIndex, MinHasher, NearDuplicateIndex, exact_key
from mathtir.data.config import fingerprint
from mathtir.data.loader import FORMAT_VERSION
from mathtir.data.pack import pack_minimum_slack, packed_row, write_shards
from mathtir.data.readers import (
    DataError,
    FieldMap,
    InvalidRecord,
    Record,
    detect_format,
    input_files,
    iter_records,
    iter_rows,
)

PART_FORMAT = 2  # bump when a part's files change meaning: parts written by other code are redone
PART_SCHEMA = pa.schema([
    ("source", pa.int32()),
    ("index", pa.int64()),
    ("location", pa.string()),
    ("key", pa.binary(16)),
    ("signature", pa.list_(pa.uint32())),
    ("input_ids", pa.list_(pa.int32())),
    ("trained", pa.list_(pa.int8())),
])

# The order of the report's funnel: each record read ends in exactly one of these (or in the shards).
DROP_REASONS = (
    "invalid", "mode_not_selected", "no_code", "code_without_output", "boxed_before_code", "no_answer",
    "wrong_answer", "contaminated", "over_length", "verify_mismatch", "verify_error", "verify_timeout",
    "verify_killed", "verify_output_limit", "verify_internal_error", "exact_duplicate", "near_duplicate",
)


def _log(message: str) -> None:
    print(f"[mathtir.data] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# Per-record work (runs in worker processes)
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Document:
    source: int
    index: int
    location: str
    key: bytes
    signature: np.ndarray | None
    input_ids: np.ndarray  # int32
    trained: np.ndarray  # int8 per token: 1 = a response token that is trained on
    blocks: list[tuple[str, str]]  # (code, recorded output) pairs, for execution verification


@dataclass
class Drop:
    source: int
    index: int
    location: str
    reason: str
    detail: str | None = None

    def as_json(self) -> str:
        return json.dumps({"source": self.source, "index": self.index, "location": self.location,
                           "reason": self.reason, "detail": self.detail}, ensure_ascii=False)


class RecordProcessor:
    """Everything done to one record before verification; built once and inherited by forked workers."""

    def __init__(self, cfg: DictConfig, tokenizer, decontam: DecontaminationIndex | None):
        from mathtir.formats import get_dialect, get_template

        # Plain values: OmegaConf attribute access is slow enough to show up per record.
        self.filters = OmegaConf.to_object(cfg.filters)
        self.seq_length = int(cfg.seq_length)
        self.train_on_outputs = bool(cfg.train_on_outputs)
        self.template = get_template(cfg.template.name, tokenizer=tokenizer, system=cfg.template.system)
        self.dialect = get_dialect(cfg.dialect)
        self.backend = tokenizer.backend_tokenizer
        self.decontam = decontam
        self.minhasher = (MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle, seed=cfg.seed)
                          if cfg.dedup.near else None)
        self.modes = set(self.filters.modes) if self.filters.modes is not None else None

    def _structural(self, record: Record) -> tuple[str | None, str | None, list[tuple[str, str]]]:
        """(drop reason, detail, code/output pairs)."""
        from mathtir.formats import parse_response

        f = self.filters
        segments = [s for s in parse_response(record.response, self.dialect)
                    if s.kind != "text" or s.text.strip()]
        blocks: list[tuple[str, str]] = []
        for k, segment in enumerate(segments):
            if segment.kind == "code":
                following = segments[k + 1] if k + 1 < len(segments) else None
                if following is None or following.kind != "output" or not following.closed:
                    if f.code_output_pairs:
                        return "code_without_output", f"code block at character {segment.start}", []
                    continue
                blocks.append((segment.text, following.text))
        if f.require_code and not blocks:
            return "no_code", None, []
        if f.no_boxed_before_code and blocks:
            first_code = next(s.start for s in segments if s.kind == "code")
            if "\\boxed" in record.response[:first_code]:
                return "boxed_before_code", None, []
        if f.answer_matches and record.expected_answer is not None:
            from mathtir.answers import extract_answer, is_equivalent

            answer = extract_answer(record.response)
            if answer is None:
                return "no_answer", None, []
            if not is_equivalent(answer, record.expected_answer):
                return "wrong_answer", f"{answer!r} vs expected {record.expected_answer!r}", []
        return None, None, blocks

    def __call__(self, records: list[Record]) -> list[Document | Drop]:
        from mathtir.formats import render_example

        out: list[Document | Drop | None] = []
        texts, spans, pending = [], [], []
        for record in records:
            if self.modes is not None and record.mode not in self.modes:
                out.append(Drop(record.source, record.index, record.location, "mode_not_selected", record.mode))
                continue
            reason, detail, blocks = self._structural(record)
            if reason is not None:
                out.append(Drop(record.source, record.index, record.location, reason, detail))
                continue
            if self.decontam is not None:
                hit = self.decontam.check(record.problem)
                if hit is not None:
                    out.append(Drop(record.source, record.index, record.location, "contaminated",
                                    f"{hit.eval_set}:{hit.eval_id} overlap {hit.overlap:.2f}"))
                    continue
            rendered = render_example(record.problem, record.response, template=self.template,
                                      dialect=self.dialect, train_on_outputs=self.train_on_outputs)
            texts.append(rendered.text)
            spans.append(rendered.train_spans)
            pending.append((len(out), record, blocks))
            out.append(None)
        # One batched call: the fast tokenizer's own throughput is the bench's baseline.
        encodings = self.backend.encode_batch(texts, add_special_tokens=True) if texts else []
        for (slot, record, blocks), encoding, text, train_spans in zip(pending, encodings, texts, spans, strict=True):
            ids = np.asarray(encoding.ids, dtype=np.int32)
            if len(ids) > self.seq_length:
                out[slot] = Drop(record.source, record.index, record.location, "over_length",
                                 f"{len(ids)} tokens > seq_length {self.seq_length}")
                continue
            trained = np.zeros(len(ids), dtype=np.int8)
            for a, b in train_spans:
                first, last = _tokens_starting_in(encoding, a, b, len(text))
                trained[first:last] = 1
            out[slot] = Document(
                record.source, record.index, record.location, exact_key(record.problem, record.response),
                self.minhasher.signature(f"{record.problem}\n{record.response}") if self.minhasher else None,
                ids, trained, blocks)
        return out  # type: ignore[return-value]


def _tokens_starting_in(encoding, a: int, b: int, text_length: int) -> tuple[int, int]:
    """[first, last) token indices whose first character lies in the character span [a, b).

    Asks the Rust encoding for the few tokens at the span's edges instead of materializing every token's
    offsets in Python (which costs more than the tokenization itself). Tokens the tokenizer adds by itself
    (BOS/EOS, offsets (0, 0)) never start inside a response span.
    """
    n = len(encoding.ids)
    first = None
    for c in range(a, b):  # the first character inside the span that belongs to a token
        first = encoding.char_to_token(c)
        if first is not None:
            break
    if first is None:
        return 0, 0
    if encoding.token_to_chars(first)[0] < a:  # that token straddles the span's start: not trained
        first += 1
    if b == text_length:  # the usual case (the span runs to the end): skip trailing added special tokens
        last = n - 1
        while last >= first and (encoding.token_to_chars(last) or (-1, -1))[0] < a:
            last -= 1
        return first, last + 1
    last = None
    for c in range(b - 1, a - 1, -1):
        last = encoding.char_to_token(c)
        if last is not None:
            break
    # char_to_token gives the first token of a character split into several byte tokens: take them all.
    start = encoding.token_to_chars(last)[0]
    while last + 1 < n and (encoding.token_to_chars(last + 1) or (-1, -1))[0] == start:
        last += 1
    return first, last + 1


_PROCESSOR: RecordProcessor | None = None  # set before forking; the workers inherit it


# ------------------------------------------------------------------------------------------------------------
# Inputs, tokenizer, evaluation sets
# ------------------------------------------------------------------------------------------------------------


def resolve_inputs(cfg: DictConfig) -> list[tuple[Path, str]]:
    inputs = []
    for raw in cfg.inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{path}: input not found (listed in `inputs`)")
        inputs.append((path, detect_format(path) if cfg.input_format == "auto" else cfg.input_format))
    return inputs


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise DataError(f"{path}: tokenizer directory not found (set tokenizer=<local HF directory>)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{path}: a fast (Rust) tokenizer is needed; this directory has no tokenizer.json")
    return tokenizer


def tokenizer_identity(path: str, tokenizer) -> dict:
    digest = hashlib.sha256()
    names = sorted(p.name for p in Path(path).iterdir()
                   if p.is_file() and (p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
                                       or p.suffix == ".model"))
    for name in names:
        digest.update(name.encode() + b"\0" + (Path(path) / name).read_bytes())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"path": str(path), "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "eos_token": tokenizer.eos_token, "eos_id": tokenizer.eos_token_id, "pad_id": pad_id,
            "files": names, "sha256": digest.hexdigest()}


def load_decontamination(cfg: DictConfig) -> DecontaminationIndex | None:
    d = cfg.decontam
    if not d.eval_sets:
        return None
    index = DecontaminationIndex(ngram=d.ngram, min_overlap=d.min_overlap)
    for path in map(Path, d.eval_sets):
        if not path.exists():
            raise DataError(f"{path}: evaluation set not found (listed in decontam.eval_sets)")
        for where, row in iter_rows(path, detect_format(path), [d.id_field, d.problem_field]):
            if isinstance(row, InvalidRecord):
                raise DataError(f"evaluation set {row.message()}")
            for name in (d.id_field, d.problem_field):
                if row.get(name) is None or not str(row[name]).strip():
                    raise DataError(f"evaluation set {where}: field '{name}': missing")
            index.add(path.name, str(row[d.id_field]), str(row[d.problem_field]))
    return index


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Phase 1: one part
# ------------------------------------------------------------------------------------------------------------


def _part_stem(part: int, num_parts: int) -> str:
    return f"part_{part:05d}-of-{num_parts:05d}"


def _batches(records: Iterable[Record | InvalidRecord], size: int, skip_invalid: bool,
             invalid: list[Drop]) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for record in records:
        if isinstance(record, InvalidRecord):
            if not skip_invalid:
                raise DataError(f"{record.message()} (pass skip_invalid=true to count and skip bad records)")
            invalid.append(Drop(record.source, record.index, record.location, "invalid", record.message()))
            continue
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _doc_batch(docs: list[Document]) -> pa.RecordBatch:
    def lists(arrays, value_type):
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        values = np.concatenate(arrays) if arrays else np.zeros(0, value_type.to_pandas_dtype())
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))

    return pa.RecordBatch.from_arrays([
        pa.array([d.source for d in docs], pa.int32()),
        pa.array([d.index for d in docs], pa.int64()),
        pa.array([d.location for d in docs], pa.string()),
        pa.array([d.key for d in docs], pa.binary(16)),
        pa.array([None if d.signature is None else d.signature.tolist() for d in docs], pa.list_(pa.uint32())),
        lists([d.input_ids for d in docs], pa.int32()),
        lists([d.trained for d in docs], pa.int8()),
    ], schema=PART_SCHEMA)


def prepare_part(cfg: DictConfig, part: int = 0, num_parts: int = 1) -> dict:
    """Phase 1 for records part, part+num_parts, ...; returns the part's counts (reused when already done).

    The part runs as ``workers`` processes, each reading, filtering, tokenizing, verifying and writing its own
    slice of the part's records (slice w of a part = every (num_parts*workers)-th record from
    part + num_parts*w): no records or token arrays travel between processes.
    """
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} is not in [0, {num_parts})")
    parts_dir = Path(cfg.output_dir) / "parts"
    stem = _part_stem(part, num_parts)
    done_path = parts_dir / f"{stem}.json"
    config_id = fingerprint(cfg)
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done.get("fingerprint") == config_id and done.get("part_format") == PART_FORMAT:
            _log(f"{stem}: already done, reusing it")
            return done
        _log(f"{stem}: written with another config or input, redoing it")
    parts_dir.mkdir(parents=True, exist_ok=True)

    resolve_inputs(cfg)  # fail on a missing input before starting anything
    tokenizer = load_tokenizer(cfg.tokenizer)
    global _PROCESSOR
    _PROCESSOR = RecordProcessor(cfg, tokenizer, load_decontamination(cfg))
    workers = cfg.workers or len(os.sched_getaffinity(0))  # the CPUs this job may use (Slurm cpusets)
    sandbox_workers = max(1, cfg.verify.workers // workers)  # verify.workers is the part's total
    slices = [(stem, part + num_parts * w, num_parts * workers, w, sandbox_workers) for w in range(workers)]
    if workers == 1:
        results = [_prepare_slice(cfg, *slices[0])]
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per process: no oversubscription
        # fork: the processes inherit the loaded tokenizer and the decontamination index
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = [r.get() for r in [pool.apply_async(_prepare_slice, (cfg, *args)) for args in slices]]
    counts: Counter = Counter()
    for result in results:
        counts.update(result)
    done = {"fingerprint": config_id, "part_format": PART_FORMAT, "part": part, "num_parts": num_parts,
            "slices": workers, "counts": dict(counts), "tokenizer": tokenizer_identity(cfg.tokenizer, tokenizer)}
    tmp = done_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(done, indent=1))
    tmp.replace(done_path)  # last: its presence marks the part done
    _log(f"{stem}: done: {counts['records_read']} records, {counts['documents']} documents kept")
    return done


def _slice_stem(stem: str, worker: int) -> str:
    return f"{stem}.slice{worker:03d}"


def _prepare_slice(cfg: DictConfig, stem: str, slice_index: int, num_slices: int, worker: int,
                   sandbox_workers: int) -> dict:
    """One process of a part: records slice_index, slice_index+num_slices, ... -> its Arrow and drop files."""
    assert _PROCESSOR is not None
    parts_dir = Path(cfg.output_dir) / "parts"
    name = _slice_stem(stem, worker)
    counts: Counter = Counter()
    invalid: list[Drop] = []
    tmp_docs, tmp_drops = parts_dir / f"{name}.arrow.tmp", parts_dir / f"{name}.dropped.jsonl.tmp"
    records = iter_records(resolve_inputs(cfg), FieldMap(**cfg.fields), part=slice_index, num_parts=num_slices)
    sandbox = _open_sandbox(cfg, sandbox_workers) if cfg.verify.enabled else None
    try:
        with pa.OSFile(str(tmp_docs), "wb") as sink, pa.ipc.new_file(sink, PART_SCHEMA) as writer, \
                open(tmp_drops, "w", encoding="utf-8") as drops_file, \
                ThreadPoolExecutor(max_workers=sandbox_workers) as executor:
            def emit_drop(drop: Drop) -> None:
                counts[drop.reason] += 1
                drops_file.write(drop.as_json() + "\n")

            for number, batch in enumerate(_batches(records, cfg.batch_size, cfg.skip_invalid, invalid), start=1):
                results = _PROCESSOR(batch)
                counts["records_read"] += len(results)
                docs = [r for r in results if isinstance(r, Document)]
                for r in results:
                    if isinstance(r, Drop):
                        emit_drop(r)
                if sandbox is not None:
                    docs = _verify(cfg, sandbox, executor, docs, counts, emit_drop)
                counts["documents"] += len(docs)
                counts["document_tokens"] += sum(len(d.input_ids) for d in docs)
                if docs:
                    writer.write_batch(_doc_batch(docs))
                if number % 50 == 0:
                    _log(f"{name}: {counts['records_read']} records, {counts['documents']} kept")
            for drop in invalid:
                emit_drop(drop)
    finally:
        if sandbox is not None:
            sandbox.__exit__(None, None, None)
    counts["records_read"] += counts["invalid"]
    tmp_docs.replace(parts_dir / f"{name}.arrow")
    tmp_drops.replace(parts_dir / f"{name}.dropped.jsonl")
    return dict(counts)


def _open_sandbox(cfg: DictConfig, workers: int):
    from mathtir.sandbox import SandboxPool

    pool = SandboxPool(workers, memory_mb=cfg.verify.memory_mb, allow_degraded=cfg.verify.allow_degraded)
    pool.__enter__()
    return pool


def _verify(cfg: DictConfig, sandbox, executor: ThreadPoolExecutor, docs: list[Document], counts: Counter,
            emit_drop: Callable[[Drop], None]) -> list[Document]:
    from mathtir.data.verify import verify_blocks

    v = cfg.verify
    to_check = [d for d in docs if d.blocks]
    verdicts = executor.map(lambda d: verify_blocks(sandbox, d.blocks, timeout=v.timeout_s, rel_tol=v.float_rel_tol,
                                                    output_max_chars=v.output_max_chars), to_check)
    failed = set()
    for doc, verdict in zip(to_check, verdicts, strict=True):
        counts["verified_samples"] += 1
        counts["verified_blocks"] += len(doc.blocks) if verdict.ok else verdict.block + 1
        if not verdict.ok:
            failed.add(id(doc))
            emit_drop(Drop(doc.source, doc.index, doc.location, f"verify_{verdict.reason}",
                           f"code block {verdict.block}: {verdict.detail}"))
    return [d for d in docs if id(d) not in failed]


# ------------------------------------------------------------------------------------------------------------
# Phase 2: merge
# ------------------------------------------------------------------------------------------------------------


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
        done_path = parts_dir / f"{_part_stem(part, num_parts)}.json"
        if not done_path.is_file():
            raise DataError(f"{done_path}: part {part} of {num_parts} is not done; run its prepare step first")
        done = json.loads(done_path.read_text())
        if done.get("fingerprint") != config_id or done.get("part_format") != PART_FORMAT:
            raise DataError(f"{done_path}: part {part} was prepared with another config or input; redo it")
        part_counts.update(done["counts"])
        identity = identity or done["tokenizer"]
        stems += [_slice_stem(_part_stem(part, num_parts), w) for w in range(done["slices"])]

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
        "verification": _verification_summary(counts) if cfg.verify.enabled else None,
        "decontamination": {
            "eval_sets": [str(p) for p in cfg.decontam.eval_sets],
            "ngram": cfg.decontam.ngram, "min_overlap": cfg.decontam.min_overlap,
            "hits": [{"location": d["location"], "eval": d["detail"]} for d in dropped if d["reason"] == "contaminated"],
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
    (out / "report.md").write_text(render_report(manifest))
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    tmp.replace(out / "manifest.json")  # last: the loader never sees shards of a half-finished merge
    _log(f"merged: {len(kept)} documents -> {len(bins)} sequences of {cfg.seq_length} "
         f"(fill {manifest['tokens']['fill']:.4f}) in {len(shards)} shards at {out}")
    return manifest


def _write_drops(out: Path, stems: list[str], parts_dir: Path, dedup_drops: list[Drop]) -> list[dict]:
    """<out>/dropped.jsonl: every record that did not make it into the shards, in input order, with why."""
    lines = []
    for stem in stems:
        lines += (parts_dir / f"{stem}.dropped.jsonl").read_text(encoding="utf-8").splitlines()
    lines += [d.as_json() for d in dedup_drops]
    entries = sorted((json.loads(line) for line in lines), key=lambda e: (e["source"], e["index"]))
    tmp = out / "dropped.jsonl.tmp"
    tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    tmp.replace(out / "dropped.jsonl")
    return entries


def _verification_summary(counts: Counter) -> dict:
    failed = {r.removeprefix("verify_"): counts[r] for r in DROP_REASONS if r.startswith("verify_")}
    checked = counts["verified_samples"]
    return {"samples_checked": checked, "blocks_run": counts["verified_blocks"], "failed": sum(failed.values()),
            "drop_rate": sum(failed.values()) / checked if checked else 0.0, "by_reason": failed}


def render_report(manifest: dict) -> str:
    c, t = manifest["counts"], manifest["tokens"]
    lines = [f"# Data preparation report: {manifest['name']}", "",
             f"seq_length {manifest['seq_length']}, seed {manifest['seed']}, tokenizer "
             f"`{manifest['tokenizer']['path']}` (sha256 {manifest['tokenizer']['sha256'][:12]})", "",
             "## Records", "", "| step | dropped | remaining |", "|---|---:|---:|",
             f"| read | | {c['records_read']} |"]
    remaining = c["records_read"]
    for reason in DROP_REASONS:
        if c[reason]:
            remaining -= c[reason]
            lines.append(f"| {reason.replace('_', ' ')} | {c[reason]} | {remaining} |")
    lines += [f"| **packed** | | **{c['packed_documents']}** |", "",
              "Every dropped record is listed with its location and reason in `dropped.jsonl`.", ""]
    v = manifest.get("verification")
    if v:
        reasons = ", ".join(f"{k} {n}" for k, n in v["by_reason"].items() if n) or "none"
        lines += ["## Execution verification", "",
                  f"{v['samples_checked']} samples with code re-run ({v['blocks_run']} blocks): {v['failed']} "
                  f"dropped ({100 * v['drop_rate']:.2f}%; {reasons}).", ""]
    d = manifest["decontamination"]
    if d["eval_sets"]:
        lines += ["## Decontamination", "",
                  f"Against {', '.join(f'`{p}`' for p in d['eval_sets'])} ({d['ngram']}-grams, overlap >= "
                  f"{d['min_overlap']}): {len(d['hits'])} training records dropped."]
        lines += [f"- {hit['location']}: {hit['eval']}" for hit in d["hits"][:50]]
        if len(d["hits"]) > 50:
            lines.append(f"- ... {len(d['hits']) - 50} more in `dropped.jsonl`")
        lines.append("")
    lines += ["## Tokens", "",
              f"- documents: {c['packed_documents']}, tokens {t['documents']} (trained on: {t['trained']}), "
              f"mean length {t['mean_document_length']:.1f}, max {t['max_document_length']}",
              f"- packed sequences: {t['sequences']}, fill {100 * t['fill']:.2f}% of {t['capacity']} slots",
              f"- shards: {len(manifest['shards'])}", ""]
    return "\n".join(lines)


def prepare(cfg: DictConfig) -> dict:
    prepare_part(cfg, 0, 1)
    return merge(cfg, 1)
