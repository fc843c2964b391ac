"""Evaluation problems: read a JSONL or Parquet file, validate every record before any sampling starts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A bad evaluation data file; the message names the file, the line/row and the field."""


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    expected_answer: str
    category: str


@dataclass(frozen=True)
class FieldNames:
    """Which input field holds each Problem attribute (renamable from the CLI)."""

    id: str = "id"
    problem: str = "problem"
    expected_answer: str = "expected_answer"
    category: str = "category"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _as_text(value, *, where: str, field: str, allow_empty: bool = False) -> str:
    # Answers and ids are often numbers in JSON (42, 3.5); keep their JSON spelling, never bool/None/containers.
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise DataError(f"{where}: field '{field}' must be a string or number, got {json.dumps(value)}")
    text = value if isinstance(value, str) else json.dumps(value)
    if not allow_empty and not text.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    return text


def _problem_from_record(record, *, where: str, fields: FieldNames) -> Problem:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    values = {}
    for attr in ("id", "problem", "expected_answer", "category"):
        name = getattr(fields, attr)
        if name not in record:
            raise DataError(f"{where}: missing field '{name}' (fields present: {', '.join(sorted(record))})")
        values[attr] = _as_text(record[name], where=where, field=name)
    return Problem(**values)


def _read_jsonl(path: Path, fields: FieldNames) -> list[Problem]:
    problems = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
            problems.append(_problem_from_record(record, where=where, fields=fields))
    return problems


def _read_parquet(path: Path, fields: FieldNames) -> list[Problem]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for name in (fields.id, fields.problem, fields.expected_answer, fields.category):
        if name not in table.column_names:
            raise DataError(f"{path}: missing column '{name}' (columns: {', '.join(table.column_names)})")
    return [_problem_from_record(row, where=f"{path}: row {i}", fields=fields)
            for i, row in enumerate(table.to_pylist())]


def load_problems(path: str | Path, fields: FieldNames = FieldNames()) -> list[Problem]:
    """All problems of a .jsonl/.json(l) or .parquet file, or DataError naming file, line/row and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        problems = _read_parquet(path, fields)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        problems = _read_jsonl(path, fields)
    else:
        raise DataError(f"{path}: unknown data format '{path.suffix}' (expected .jsonl or .parquet)")
    if not problems:
        raise DataError(f"{path}: no problems in the file")
    seen: dict[str, int] = {}
    for index, p in enumerate(problems):
        if p.id in seen:
            raise DataError(f"{path}: duplicate {fields.id} '{p.id}' (records {seen[p.id] + 1} and {index + 1})")
        seen[p.id] = index
    return problems
