"""Evaluation problems: every record of a JSON Lines, JSON array or Parquet file or an HF datasets directory
(mathtir.readers) validated before any sampling. The category is optional: without one a problem counts only
in the overall figures."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mathtir.readers import DataError, InvalidRecord, as_text, detect_format, iter_rows


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    expected_answer: str
    category: str | None = None


@dataclass(frozen=True)
class FieldNames:
    """Which input field holds each Problem attribute (renamable from the CLI)."""

    id: str = "id"
    problem: str = "problem"
    expected_answer: str = "expected_answer"
    category: str = "category"


def iter_problems(path: str | Path, fields: FieldNames = FieldNames()) -> Iterator[Problem]:
    """Each problem of a data file or HF datasets directory in order, checked as it is read: DataError naming
    file, line/row and field at the first bad one. (Duplicate ids are the callers' to find.)"""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file or directory")
    names = {attr: getattr(fields, attr) for attr in ("id", "problem", "expected_answer")}
    for where, row in iter_rows(path, detect_format(path), list(names.values()), optional=[fields.category]):
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
        if row.get(fields.category) is not None:  # absent or null: no category
            category = as_text(row[fields.category], fields.category)
            if isinstance(category, InvalidRecord):
                raise DataError(f"{where}: field '{fields.category}': {category.reason}")
            values["category"] = category
        yield Problem(**values)


def load_problems(path: str | Path, fields: FieldNames = FieldNames()) -> list[Problem]:
    """All problems of a data file or HF datasets directory, or DataError naming file, line/row and field."""
    problems = list(iter_problems(path, fields))
    seen: dict[str, int] = {}
    for index, p in enumerate(problems):
        if p.id in seen:
            raise DataError(_duplicate_message(path, fields, p.id, seen[p.id], index))
        seen[p.id] = index
    return problems


def check_problems(path: str | Path, fields: FieldNames = FieldNames()) -> int:
    """How many problems the data holds, every one checked as load_problems checks them, without holding them:
    ids are compared by 64-bit digests (16 bytes a problem), and a repeated digest is confirmed on the ids
    themselves by a second read, so a run of millions of problems is checked in a few MB."""
    digests = array("Q", (_id_digest(p.id) for p in iter_problems(path, fields)))
    if not digests:
        return 0
    values = np.frombuffer(digests, dtype=np.uint64)
    order = np.argsort(values, kind="stable")
    repeated = np.flatnonzero(values[order][1:] == values[order][:-1])
    suspects = {int(i) for k in repeated for i in order[k:k + 2]}
    if suspects:
        seen: dict[str, int] = {}
        for index, p in enumerate(iter_problems(path, fields)):
            if index in suspects:
                if p.id in seen:
                    raise DataError(_duplicate_message(path, fields, p.id, seen[p.id], index))
                seen[p.id] = index
    return len(digests)


def _id_digest(problem_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(problem_id.encode(), digest_size=8).digest(), "little")


def _duplicate_message(path: str | Path, fields: FieldNames, problem_id: str, first: int, second: int) -> str:
    return f"{path}: duplicate {fields.id} '{problem_id}' (records {first + 1} and {second + 1})"
