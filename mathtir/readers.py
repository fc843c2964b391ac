"""Rows of the files users bring: JSONL (plain or gzip), Parquet and HF `datasets` save_to_disk directories.

The one reader of every stage (training data preparation, evaluation problems, decontamination sets) and its
one error type, `DataError`. Memory stays bounded: JSONL is read line by line, Parquet and Arrow in record
batches. Every row gets a location ("file:line" or "file row N") so any error or drop can be traced back to
its source. A bad row is yielded as an ``InvalidRecord`` (never skipped here): the caller raises or counts it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_BATCH_ROWS = 1024


class DataError(ValueError):
    """Bad input data; the message names the file, the line/row and the field."""


@dataclass(frozen=True)
class InvalidRecord:
    source: int  # index of the input in the caller's list (-1: not yet known)
    index: int  # row number within that input (-1: not yet known)
    location: str
    field: str | None
    reason: str

    def message(self) -> str:
        where = f"field '{self.field}': " if self.field else ""
        return f"{self.location}: {where}{self.reason}"


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf_disk"
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise DataError(f"{path}: cannot tell the format from the name; set format: jsonl | parquet | hf_disk")


def input_files(path: Path, fmt: str) -> list[Path]:
    """The files behind one input (an HF directory holds several Arrow files, possibly per split)."""
    if fmt != "hf_disk":
        if not path.is_file():
            raise DataError(f"{path}: input file not found")
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: HF datasets directory not found")
    state = path / "state.json"
    if not state.is_file():
        raise DataError(f"{path}: not a `datasets` save_to_disk directory (no state.json; for a DatasetDict "
                        f"point at one split's subdirectory, e.g. {path}/train)")
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{state}: unreadable state.json ({exc})") from exc
    return [path / name for name in names]


def iter_rows(path: Path, fmt: str, columns: Sequence[str], owned: Callable[[int], bool] = lambda i: True
              ) -> Iterator[tuple[str, dict | InvalidRecord | None]]:
    """(location, raw dict) for every record of one input, InvalidRecord for unparseable ones, and None for the
    records ``owned(row)`` rejects: those are counted but never decoded (other array tasks own them)."""
    if fmt == "jsonl":
        yield from _jsonl_rows(path, owned)
    elif fmt == "parquet":
        yield from _parquet_rows(path, columns, owned)
    elif fmt == "hf_disk":
        row = 0
        for arrow_file in input_files(path, fmt):
            for item in _arrow_rows(arrow_file, columns, lambda i, first=row: owned(first + i)):
                row += 1
                yield item
    else:
        raise DataError(f"{path}: unknown format {fmt!r} (jsonl | parquet | hf_disk)")


def _jsonl_rows(path: Path, owned: Callable[[int], bool]) -> Iterator[tuple[str, dict | InvalidRecord | None]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    seen_any = False
    try:
        with opener(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                seen_any = True
                if not owned(line_number - 1):
                    yield "", None
                    continue
                where = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield where, InvalidRecord(-1, -1, where, None,
                                               f"non-UTF-8 byte 0x{raw[exc.start]:02x} at column {exc.start + 1}")
                    continue
                if not line.strip():
                    yield where, InvalidRecord(-1, -1, where, None, "empty line")
                    continue
                try:
                    value = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    yield where, InvalidRecord(-1, -1, where, None, f"malformed JSON ({exc.msg} at column {exc.colno})")
                    continue
                if not isinstance(value, dict):
                    yield where, InvalidRecord(-1, -1, where, None, f"expected a JSON object, got {type(value).__name__}")
                    continue
                yield where, value
    except (OSError, EOFError) as exc:  # truncated or corrupt gzip
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if not seen_any and owned(0):
        yield f"{path}", InvalidRecord(-1, -1, f"{path}", None, "empty file (no records)")


def _table_batches_rows(path: Path, batches, schema: pa.Schema, columns: Sequence[str],
                        owned: Callable[[int], bool]) -> Iterator[tuple[str, dict | InvalidRecord | None]]:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{path}: missing field '{missing[0]}' (columns present: {', '.join(schema.names)})")
    row = 0
    for batch in batches:
        keep = [j for j in range(batch.num_rows) if owned(row + j)]
        values = iter(batch.select(list(columns)).take(pa.array(keep, pa.int64())).to_pylist())
        kept = set(keep) if len(keep) < batch.num_rows else None
        for j in range(batch.num_rows):
            if kept is None or j in kept:
                yield f"{path} row {row}", next(values)
            else:
                yield "", None
            row += 1
    if row == 0 and owned(0):
        yield f"{path}", InvalidRecord(-1, -1, f"{path}", None, "empty file (no records)")


def _parquet_rows(path: Path, columns: Sequence[str], owned: Callable[[int], bool]
                  ) -> Iterator[tuple[str, dict | InvalidRecord | None]]:
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        batches = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[c for c in columns if c in schema.names])
        yield from _table_batches_rows(path, batches, schema, columns, owned)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc


def _arrow_rows(path: Path, columns: Sequence[str], owned: Callable[[int], bool]
                ) -> Iterator[tuple[str, dict | InvalidRecord | None]]:
    # `datasets` writes Arrow IPC streams; memory-mapped, so batches are read lazily.
    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            source = pa.memory_map(str(path))
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield from _table_batches_rows(path, batches, reader.schema, columns, owned)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Arrow file ({exc})") from exc


def as_text(value, field: str) -> str | InvalidRecord:
    """A field's value as text. Answers and ids are often numbers in JSON (42, 3.5): they keep their JSON
    spelling; bool, null and containers are refused, as is an empty string."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return InvalidRecord(-1, -1, "", field, "missing" if value is None else
                             f"must be a string or number, got {type(value).__name__}")
    text = value if isinstance(value, str) else json.dumps(value)
    if not text.strip():
        return InvalidRecord(-1, -1, "", field, "empty")
    return text
