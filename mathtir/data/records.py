"""Training records: the fields of a raw row (mathtir.readers) mapped to problem / response / answer / mode.

Field names come from the data recipe (`fields:`); a row that lacks one, or holds something that is not text,
becomes an InvalidRecord naming the field, which the caller raises or counts (`skip_invalid`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mathtir.data.recipe import FieldsConfig
from mathtir.readers import InvalidRecord, as_text, iter_rows

# The order of the report's funnel: each record read ends in exactly one of these (or in the shards).
DROP_REASONS = (
    "invalid", "mode_not_selected", "no_code", "code_without_output", "boxed_before_code", "no_answer",
    "wrong_answer", "contaminated", "over_length", "verify_mismatch", "verify_error", "verify_timeout",
    "verify_killed", "verify_output_limit", "verify_internal_error", "exact_duplicate", "near_duplicate",
)


@dataclass
class Drop:
    source: int
    index: int
    location: str
    reason: str
    detail: str | None = None
    info: dict | None = None  # structured detail for the manifest (a decontamination hit's set, id, kind, score)

    def as_json(self) -> str:
        entry = {"source": self.source, "index": self.index, "location": self.location, "reason": self.reason,
                 "detail": self.detail}
        if self.info is not None:
            entry["info"] = self.info
        return json.dumps(entry, ensure_ascii=False)


@dataclass(frozen=True)
class Record:
    source: int  # index of the input file in the config's list
    index: int  # record number within that file, 0-based
    location: str
    problem: str
    response: str
    expected_answer: str | None
    mode: str | None


def map_fields(raw: dict, fields: FieldsConfig) -> dict[str, str | None] | InvalidRecord:
    """problem / response / expected_answer / mode from one raw record, by the configured field names."""
    out: dict[str, str | None] = {"expected_answer": None, "mode": None}
    if fields.messages:
        messages = raw.get(fields.messages)
        if not isinstance(messages, list):
            return InvalidRecord(-1, -1, "", fields.messages, "missing" if messages is None else "must be a list")
        by_role: dict[str, list[str]] = {}
        for turn in messages:
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
                return InvalidRecord(-1, -1, "", fields.messages, "each message needs a string 'content'")
            by_role.setdefault(str(turn.get("role")), []).append(turn["content"])
        if len(by_role.get("user", [])) != 1 or len(by_role.get("assistant", [])) != 1:
            return InvalidRecord(-1, -1, "", fields.messages,
                                 "expected exactly one user and one assistant message (multi-turn is unsupported)")
        out["problem"], out["response"] = by_role["user"][0], by_role["assistant"][0]
    else:
        for key in ("problem", "response"):
            name = getattr(fields, key)
            if name not in raw:
                return InvalidRecord(-1, -1, "", name, "missing")
            value = as_text(raw[name], name)
            if isinstance(value, InvalidRecord):
                return value
            out[key] = value
    for key in ("expected_answer", "mode"):
        name = getattr(fields, key)
        if name is None:
            continue
        value = as_text(raw.get(name), name)
        if isinstance(value, InvalidRecord):
            return value
        out[key] = value
    return out


def required_columns(fields: FieldsConfig) -> list[str]:
    names = [fields.messages] if fields.messages else [fields.problem, fields.response]
    names += [n for n in (fields.expected_answer, fields.mode) if n]
    return list(dict.fromkeys(n for n in names if n))


def iter_records(inputs: Sequence[tuple[Path, str]], fields: FieldsConfig, *, part: int = 0, num_parts: int = 1
                 ) -> Iterator[Record | InvalidRecord]:
    """Records of all inputs in order; with num_parts > 1 only every num_parts-th one (array jobs).

    Ownership is by global record number, so parts never overlap and their union is the whole input.
    """
    columns = required_columns(fields)
    first = 0  # global number of the current file's first record
    for source, (path, fmt) in enumerate(inputs):
        rows = 0
        for index, (where, raw) in enumerate(
                iter_rows(path, fmt, columns, owned=lambda i, first=first: (first + i) % num_parts == part)):
            rows += 1
            if raw is None:
                continue
            if isinstance(raw, InvalidRecord):
                yield InvalidRecord(source, index, where, raw.field, raw.reason)
                continue
            mapped = map_fields(raw, fields)
            if isinstance(mapped, InvalidRecord):
                yield InvalidRecord(source, index, where, mapped.field, mapped.reason)
                continue
            yield Record(source=source, index=index, location=where, **mapped)
        first += rows
