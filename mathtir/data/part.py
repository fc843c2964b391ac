"""Phase 1 of preparation, for one part of the input (a Slurm array task, or the whole input).

``prepare_part(cfg, part, num_parts)`` reads every num_parts-th record and runs the per-record steps
(mathtir.data.process) in ``workers`` processes, each on its own slice, then re-executes TIR code through the
sandbox when ``verify.enabled``. Surviving documents go to ``<out>/parts/part_I-of-N.sliceW.arrow`` (Arrow IPC,
memory-mapped by the merge), every dropped record to ``part_I-of-N.sliceW.dropped.jsonl``, and the part's
counts to ``part_I-of-N.json`` (written last: its presence marks the part done, so a rerun skips it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import queue
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from mathtir.data.clean import DecontaminationIndex
from mathtir.data.process import Document, RecordProcessor
from mathtir.data.recipe import expand_input, fingerprint
from mathtir.data.records import Drop, Record, iter_records
from mathtir.files import atomic_target, atomic_write_json
from mathtir.readers import DataError, InvalidRecord, detect_format, iter_rows
from mathtir.shards import list_array
from mathtir.tokenizers import load_tokenizer

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

def log(message: str) -> None:
    print(f"[mathtir.data] {message}", file=sys.stderr, flush=True)


def resolve_inputs(cfg: DictConfig) -> list[tuple[Path, str]]:
    inputs = []
    for raw in cfg.inputs:
        paths = expand_input(raw)
        if not paths:
            raise DataError(f"{raw}: input not found (listed in `inputs`)")
        inputs += [(path, detect_format(path) if cfg.input_format == "auto" else cfg.input_format)
                   for path in paths]
    return inputs


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
    index = DecontaminationIndex(
        ngram=d.ngram, min_overlap=d.min_overlap, fingerprint=d.fingerprint,
        fingerprint_min_tokens=d.fingerprint_min_tokens, fingerprint_min_digits=d.fingerprint_min_digits,
        fingerprint_min_share=d.fingerprint_min_share, near_duplicate=d.near_duplicate,
        near_threshold=d.near_threshold, num_perm=d.num_perm, bands=d.bands, shingle=d.shingle)
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


def part_stem(part: int, num_parts: int) -> str:
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
    return pa.RecordBatch.from_arrays([
        pa.array([d.source for d in docs], pa.int32()),
        pa.array([d.index for d in docs], pa.int64()),
        pa.array([d.location for d in docs], pa.string()),
        pa.array([d.key for d in docs], pa.binary(16)),
        pa.array([None if d.signature is None else d.signature.tolist() for d in docs], pa.list_(pa.uint32())),
        list_array([d.input_ids for d in docs], pa.int32()),
        list_array([d.trained for d in docs], pa.int8()),
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
    stem = part_stem(part, num_parts)
    done_path = parts_dir / f"{stem}.json"
    config_id = fingerprint(cfg)
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done.get("fingerprint") == config_id and done.get("part_format") == PART_FORMAT:
            log(f"{stem}: already done, reusing it")
            return done
        log(f"{stem}: written with another config or input, redoing it")
    parts_dir.mkdir(parents=True, exist_ok=True)

    resolve_inputs(cfg)  # fail on a missing input before starting anything
    tokenizer = load_tokenizer(cfg.tokenizer, require_fast=True)
    processor = RecordProcessor(cfg, tokenizer, load_decontamination(cfg))
    workers = cfg.workers or len(os.sched_getaffinity(0))  # the CPUs this job may use (Slurm cpusets)
    sandbox_workers = max(1, cfg.verify.workers // workers)  # verify.workers is the part's total
    slices = [(stem, part + num_parts * w, num_parts * workers, w, sandbox_workers) for w in range(workers)]
    if workers == 1:
        results = [prepare_slice(cfg, processor, *slices[0])]
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per process: no oversubscription
        results = _in_forked_processes(prepare_slice, [(cfg, processor, *args) for args in slices])
    counts: Counter = Counter()
    for result in results:
        counts.update(result)
    done = {"fingerprint": config_id, "part_format": PART_FORMAT, "part": part, "num_parts": num_parts,
            "slices": workers, "counts": dict(counts), "tokenizer": tokenizer_identity(cfg.tokenizer, tokenizer)}
    atomic_write_json(done_path, done, indent=1)  # last: its presence marks the part done
    log(f"{stem}: done: {counts['records_read']} records, {counts['documents']} documents kept")
    return done


def slice_stem(stem: str, worker: int) -> str:
    return f"{stem}.slice{worker:03d}"


def _in_forked_processes(function: Callable[..., dict], calls: list[tuple]) -> list[dict]:
    """function(*args) for each args in its own forked process, all at once. Fork, not a pool: the arguments
    (the loaded tokenizer, the decontamination index) are inherited, never pickled. A process's exception is
    raised here."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def run(index: int, args: tuple) -> None:
        try:
            results.put((index, function(*args), None))
        except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
            results.put((index, None, exc))

    processes = [context.Process(target=run, args=(i, args), daemon=True) for i, args in enumerate(calls)]
    for process in processes:
        process.start()
    try:
        answers: dict[int, dict] = {}
        while len(answers) < len(processes):
            try:
                index, value, error = results.get(timeout=1.0)
            except queue.Empty:  # a process killed from outside (out of memory) never answers: say so
                dead = [i for i, p in enumerate(processes) if p.exitcode not in (None, 0) and i not in answers]
                if dead:
                    raise RuntimeError(f"data preparation process {dead[0]} died with exit code "
                                       f"{processes[dead[0]].exitcode}") from None
                continue
            if error is not None:
                raise error
            answers[index] = value
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    return [answers[i] for i in range(len(calls))]


def prepare_slice(cfg: DictConfig, processor: RecordProcessor, stem: str, slice_index: int, num_slices: int,
                  worker: int, sandbox_workers: int) -> dict:
    """One process of a part: records slice_index, slice_index+num_slices, ... -> its Arrow and drop files."""
    parts_dir = Path(cfg.output_dir) / "parts"
    name = slice_stem(stem, worker)
    counts: Counter = Counter()
    invalid: list[Drop] = []
    records = iter_records(resolve_inputs(cfg), OmegaConf.to_object(cfg.fields), part=slice_index,
                           num_parts=num_slices)
    with contextlib.ExitStack() as stack:
        tmp_docs = stack.enter_context(atomic_target(parts_dir / f"{name}.arrow"))
        tmp_drops = stack.enter_context(atomic_target(parts_dir / f"{name}.dropped.jsonl"))
        sandbox = stack.enter_context(_sandbox(cfg, sandbox_workers)) if cfg.verify.enabled else None
        executor = stack.enter_context(ThreadPoolExecutor(max_workers=sandbox_workers))
        with pa.OSFile(str(tmp_docs), "wb") as sink, pa.ipc.new_file(sink, PART_SCHEMA) as writer, \
                open(tmp_drops, "w", encoding="utf-8") as drops_file:
            def emit_drop(drop: Drop) -> None:
                counts[drop.reason] += 1
                drops_file.write(drop.as_json() + "\n")

            for number, batch in enumerate(_batches(records, cfg.batch_size, cfg.skip_invalid, invalid), start=1):
                results = processor(batch)
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
                    log(f"{name}: {counts['records_read']} records, {counts['documents']} kept")
            for drop in invalid:
                emit_drop(drop)
    counts["records_read"] += counts["invalid"]
    return dict(counts)


def _sandbox(cfg: DictConfig, workers: int):
    from mathtir.sandbox import SandboxPool

    return SandboxPool(workers, memory_mb=cfg.verify.memory_mb, allow_degraded=cfg.verify.allow_degraded)


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


