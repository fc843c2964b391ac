"""Per-sample records: one JSON line per finished sample, fsync'd at once, so a killed job resumes exactly.

A rerun with the same output directory reads the file back, skips every (problem id, sample index) already
there and generates only the rest: nothing lost, nothing duplicated. A line torn by a kill mid-write (no
trailing newline) is cut off and counted; any other unreadable line is an error, never skipped silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mathtir.readers import InvalidRecord, parse_json_object

RECORDS_FILE = "records.jsonl"


class RecordsError(ValueError):
    pass


@dataclass
class SampleRecord:
    problem_id: str
    sample_index: int
    seed: int
    text: str                 # the full response: generated text with the inserted output blocks
    answer: str | None        # extracted from the model's final \boxed{} (or the fallback, when enabled)
    correct: bool             # the verdict against the gold answer, decided once when the sample finished
    code_rounds: int          # code blocks executed
    timeouts: int             # of which timed out
    exec_errors: int          # of which raised, were killed or hit a limit
    prompt_tokens: int
    generated_tokens: int     # sampled by the model
    inserted_tokens: int      # code output blocks inserted by the loop (they count against the budget too)
    generation_s: float       # time spent waiting for the sampler
    execution_s: float        # time spent waiting for the sandbox
    finish_reason: str        # "eos" | "stop" | "length" (token budget) | "error"
    attempt: int              # which run of this output directory produced the sample (1 = first)
    answer_source: str = "boxed"  # "boxed" | "fallback" | "none" (records written before it existed: boxed/none)

    @property
    def key(self) -> tuple[str, int]:
        return (self.problem_id, self.sample_index)


_FIELD_ORDER = tuple(f.name for f in dataclasses.fields(SampleRecord))
# json.dumps(..., ensure_ascii=False) builds an encoder per call; the job writes a line per sample, so one is kept
encode_json = json.JSONEncoder(ensure_ascii=False).encode
_FIELDS = set(_FIELD_ORDER)
_REQUIRED = {f.name for f in dataclasses.fields(SampleRecord) if f.default is dataclasses.MISSING}
# The JSON types each field is written with (an int is a valid float; bool, though an int in Python, is not).
_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "str | None": (str, type(None))}
_TYPES = {f.name: _JSON_TYPES[f.type] for f in dataclasses.fields(SampleRecord)}


def field_type_error(name: str, value, kinds: tuple[type, ...]) -> str | None:
    """Why a JSON field's value is not one of `kinds` (a bool is not an int here), or None."""
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return None
    wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
    return f"field '{name}': must be {wanted}, got {type(value).__name__} {json.dumps(value)[:40]}"


def sample_seed(seed: int, problem_id: str, sample_index: int) -> int:
    """A seed for one sample that depends only on its identity, so resuming never changes other samples."""
    digest = hashlib.sha256(f"{seed}\0{problem_id}\0{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def complete_lines(path: Path) -> tuple[list[tuple[int, bytes]], int]:
    """(line number, line) of every non-blank complete line of an append-only JSONL file, and how many bytes of
    a torn last line (a kill during its write: no newline yet) were cut off the file."""
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    if complete_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(complete_end)
            f.flush()
            os.fsync(f.fileno())
    lines = [(n, line) for n, line in enumerate(data[:complete_end].splitlines(), start=1) if line.strip()]
    return lines, len(data) - complete_end


class RecordStore:
    """Append-only JSONL of SampleRecords with crash-safe resume."""

    def __init__(self, path: str | Path, *, sync_interval_s: float = 0.0):
        """sync_interval_s: every line reaches the kernel at once, which is all a killed process needs; fsync
        (for a crash of the machine itself) follows each line when 0, else at most this often and at close
        -- a line the machine lost is generated again, and a torn one cut."""
        self.path = Path(path)
        self.records: dict[tuple[str, int], SampleRecord] = {}
        self.torn_bytes = 0
        self.sync_interval_s = sync_interval_s
        self._synced = time.monotonic()
        if self.path.exists():
            self._load()
        # unbuffered: each record reaches the file (the page cache) with the append that wrote it, one write call
        self._file = open(self.path, "ab", buffering=0)

    def _load(self) -> None:
        lines, self.torn_bytes = complete_lines(self.path)
        for lineno, line in lines:
            where = f"{self.path}:{lineno}"
            raw = parse_json_object(line, where)
            if isinstance(raw, InvalidRecord):
                raise RecordsError(f"{where}: unreadable record ({raw.reason}); fix or remove the line")
            missing = _REQUIRED - set(raw)
            if missing:
                raise RecordsError(f"{where}: record lacks field(s) {', '.join(sorted(missing))}")
            # A wrong type would load under another key (sample "3" is not sample 3) and be generated again.
            wrong = next(filter(None, (field_type_error(k, raw[k], _TYPES[k]) for k in _FIELDS if k in raw)), None)
            if wrong:
                raise RecordsError(f"{where}: {wrong}")
            if "answer_source" not in raw:
                raw["answer_source"] = "boxed" if raw["answer"] is not None else "none"
            record = SampleRecord(**{k: raw[k] for k in _FIELDS})
            if record.key in self.records:
                raise RecordsError(f"{where}: duplicate record for problem {record.problem_id!r} "
                                   f"sample {record.sample_index}")
            self.records[record.key] = record

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: SampleRecord) -> None:
        if record.key in self.records:
            raise RecordsError(f"{self.path}: sample {record.key} is already recorded")
        # every field is a plain value, held in the instance's own dict in field order (dataclasses.asdict would
        # deep-copy each one)
        line = encode_json(record.__dict__) + "\n"
        data = memoryview(line.encode())
        while data:  # a raw write may take less than all of it
            data = data[self._file.write(data):]
        if time.monotonic() - self._synced >= self.sync_interval_s:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()
        self.records[record.key] = record

    def close(self) -> None:
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
