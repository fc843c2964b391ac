"""Evaluation problems: every record of a JSONL or Parquet file (mathtir.readers) validated before any sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mathtir.readers import DataError, InvalidRecord, as_text, detect_format, iter_rows


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


def load_problems(path: str | Path, fields: FieldNames = FieldNames()) -> list[Problem]:
    """All problems of a .jsonl/.json(l) or .parquet file, or DataError naming file, line/row and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    names = {attr: getattr(fields, attr) for attr in ("id", "problem", "expected_answer", "category")}
    problems = []
    for where, row in iter_rows(path, detect_format(path), list(names.values())):
        if isinstance(row, InvalidRecord):
            raise DataError(row.message())
        values = {}
        for attr, name in names.items():
            if name not in row:
                raise DataError(f"{where}: missing field '{name}' (fields present: {', '.join(sorted(row))})")
            value = as_text(row[name], name)
            if isinstance(value, InvalidRecord):
                raise DataError(f"{where}: field '{name}': {value.reason}")
            values[attr] = value
        problems.append(Problem(**values))
    seen: dict[str, int] = {}
    for index, p in enumerate(problems):
        if p.id in seen:
            raise DataError(f"{path}: duplicate {fields.id} '{p.id}' (records {seen[p.id] + 1} and {index + 1})")
        seen[p.id] = index
    return problems
