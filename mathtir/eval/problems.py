"""Evaluation problems: every record of a JSON Lines, JSON array or Parquet file or an HF datasets directory
(mathtir.readers) validated before any sampling. The category is optional: without one a problem counts only
in the overall figures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def load_problems(path: str | Path, fields: FieldNames = FieldNames()) -> list[Problem]:
    """All problems of a data file or HF datasets directory, or DataError naming file, line/row and field."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file or directory")
    names = {attr: getattr(fields, attr) for attr in ("id", "problem", "expected_answer")}
    problems = []
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
        problems.append(Problem(**values))
    seen: dict[str, int] = {}
    for index, p in enumerate(problems):
        if p.id in seen:
            raise DataError(f"{path}: duplicate {fields.id} '{p.id}' (records {seen[p.id] + 1} and {index + 1})")
        seen[p.id] = index
    return problems
