"""Rows of the files users bring: JSON Lines (plain or gzip), JSON arrays, Parquet and HF `datasets`
save_to_disk directories (read through `datasets`).

The one reader of every stage (training data preparation, evaluation problems, decontamination sets) and its
one error type, `DataError`. Memory stays bounded for the streaming formats: JSON Lines is read line by line,
Parquet and Arrow in record batches; a JSON array is read whole (JSON Lines is the format for big sets).
Every row gets a location ("file:line" or "file row N") so any error or drop can be traced back to its source. A bad row is yielded as an ``InvalidRecord`` (never skipped here): the caller raises or counts it.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
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


FORMATS_EXPECTED = ("JSON Lines (.jsonl, .ndjson, optionally .gz: one object per line), JSON (.json: an array "
                    "of objects, or JSON Lines), Parquet (.parquet), or an HF datasets save_to_disk directory")


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf_disk"
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return "jsonl"
    if name.endswith((".json", ".json.gz")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    raise DataError(f"{path}: cannot tell the format from the name; expected {FORMATS_EXPECTED} "
                    f"(or set format: jsonl | json | parquet | hf_disk)")


def load_hf_dataset(path: Path):
    """The `datasets.Dataset` saved in directory `path` (memory-mapped: nothing is read yet)."""
    if not path.is_dir():
        raise DataError(f"{path}: HF datasets directory not found")
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a `datasets` save_to_disk directory ({exc}); expected {FORMATS_EXPECTED}"
                        ) from exc
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(dataset)
        raise DataError(f"{path}: a DatasetDict with splits {splits}; point at one split's subdirectory, "
                        f"e.g. {path / next(iter(dataset))}")
    return dataset


def input_files(path: Path, fmt: str) -> list[Path]:
    """The files behind one input (an HF directory holds several Arrow files, possibly per split)."""
    if fmt != "hf_disk":
        if not path.is_file():
            raise DataError(f"{path}: input file not found")
        return [path]
    return [Path(entry["filename"]) for entry in load_hf_dataset(path).cache_files]


def iter_rows(path: Path, fmt: str, columns: Sequence[str], owned: Callable[[int], bool] = lambda i: True,
              optional: Sequence[str] = ()) -> Iterator[tuple[str, dict | InvalidRecord | None]]:
    """(location, raw dict) for every record of one input, InvalidRecord for unparseable ones, and None for the
    records ``owned(row)`` rejects: those are counted but never decoded (other array tasks own them).
    Columnar inputs must have every column of `columns`; those of `optional` are read when present."""
    if fmt == "jsonl":
        yield from _jsonl_rows(path, owned)
    elif fmt == "json":
        yield from _json_rows(path, owned)
    elif fmt == "parquet":
        yield from _parquet_rows(path, columns, optional, owned)
    elif fmt == "hf_disk":
        yield from _hf_rows(path, columns, optional, owned)
    else:
        raise DataError(f"{path}: unknown format {fmt!r} (jsonl | json | parquet | hf_disk)")


def parse_json_object(raw: bytes, where: str) -> dict | InvalidRecord:
    """One JSON Lines line -> its object, or an InvalidRecord saying what is wrong with it (a non-UTF-8 byte,
    malformed or too deeply nested JSON, not an object)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InvalidRecord(-1, -1, where, None, f"non-UTF-8 byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
                                                  f"of the line (expected UTF-8 text)")
    if not line.strip():
        return InvalidRecord(-1, -1, where, None, "empty line")
    try:
        value = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        return InvalidRecord(-1, -1, where, None, f"malformed JSON ({exc.msg} at column {exc.colno}; expected one "
                                                  f"JSON object per line)")
    except RecursionError:
        return InvalidRecord(-1, -1, where, None, f"JSON nested too deeply (over {sys.getrecursionlimit()} levels)")
    if not isinstance(value, dict):
        return InvalidRecord(-1, -1, where, None, f"expected a JSON object, got {type(value).__name__}")
    return value


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _jsonl_rows(path: Path, owned: Callable[[int], bool]) -> Iterator[tuple[str, dict | InvalidRecord | None]]:
    seen_any = False
    try:
        with _open_binary(path) as f:
            for line_number, raw in enumerate(f, start=1):
                seen_any = True
                if not owned(line_number - 1):
                    yield "", None
                    continue
                where = f"{path}:{line_number}"
                value = parse_json_object(raw, where)
                if (isinstance(value, InvalidRecord) and line_number == 1 and raw.lstrip()[:1] == b"["
                        and value.reason.startswith("malformed")):
                    value = InvalidRecord(-1, -1, where, None, f"{value.reason}; this looks like a JSON array: "
                                                               f"name the file .json to read it as one")
                yield where, value
    except (OSError, EOFError) as exc:  # truncated or corrupt gzip
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if not seen_any and owned(0):
        yield f"{path}", InvalidRecord(-1, -1, f"{path}", None, "empty file (no records)")


# A JSON string or one bracket: enough to find where a container ends without building it.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _json_value_end(text: str, pos: int) -> int | None:
    """Where the JSON container starting at `pos` ends (None: it never does), found by matching brackets
    outside strings: used to step over an item too deep for the parser."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text, pos):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def _json_rows(path: Path, owned: Callable[[int], bool]) -> Iterator[tuple[str, dict | InvalidRecord | None]]:
    """A .json file: a JSON array of objects (read whole: prefer JSON Lines for big sets), or JSON Lines."""
    try:
        with _open_binary(path) as f:
            head = f.read(4096).lstrip()
            if head[:1] != b"[":
                yield from _jsonl_rows(path, owned)
                return
            f.seek(0)
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{line}: non-UTF-8 byte 0x{data[exc.start]:02x} at byte {column} of the line "
                        f"(expected UTF-8 text)") from None
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"[ \t\n\r]*")
    expected = "expected a JSON array of objects: [{...}, {...}]"
    pos = whitespace.match(text, text.index("[") + 1).end()
    line, counted = 1, 0  # line of `pos`, counted incrementally
    index = 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        where = f"{path}:{line} (item {index + 1})"
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno}); {expected}"
                            ) from None
        except RecursionError:
            end = _json_value_end(text, pos)
            if end is None:
                raise DataError(f"{where}: JSON nested too deeply, and never closed; {expected}") from None
            value = InvalidRecord(-1, -1, where, None, f"JSON nested too deeply (over {sys.getrecursionlimit()} "
                                                       f"levels)")
        if not owned(index):
            yield "", None
        elif isinstance(value, InvalidRecord):
            yield where, value
        elif not isinstance(value, dict):
            yield where, InvalidRecord(-1, -1, where, None, f"expected a JSON object, got {type(value).__name__}")
        else:
            yield where, value
        index += 1
        pos = whitespace.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = whitespace.match(text, pos + 1).end()
        elif pos < len(text) and text[pos] != "]":
            line += text.count("\n", counted, pos)
            raise DataError(f"{path}:{line}: malformed JSON (expected ',' or ']' after item {index}); {expected}")
    if pos >= len(text):
        raise DataError(f"{path}: malformed JSON (the array is never closed with ']'); {expected}")
    if text[pos + 1:].strip():
        raise DataError(f"{path}: malformed JSON (text after the closing ']'); {expected}")
    if index == 0 and owned(0):
        yield f"{path}", InvalidRecord(-1, -1, f"{path}", None, "empty file (no records)")


def _table_batches_rows(path: Path, batches, schema: pa.Schema, columns: Sequence[str], optional: Sequence[str],
                        owned: Callable[[int], bool]) -> Iterator[tuple[str, dict | InvalidRecord | None]]:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{path}: missing field '{missing[0]}' (columns present: {', '.join(schema.names)})")
    read = list(dict.fromkeys([*columns, *(c for c in optional if c in schema.names)]))
    row = 0
    for batch in batches:
        keep = [j for j in range(batch.num_rows) if owned(row + j)]
        values = iter(batch.select(read).take(pa.array(keep, pa.int64())).to_pylist())
        kept = set(keep) if len(keep) < batch.num_rows else None
        for j in range(batch.num_rows):
            if kept is None or j in kept:
                yield f"{path} row {row}", next(values)
            else:
                yield "", None
            row += 1
    if row == 0 and owned(0):
        yield f"{path}", InvalidRecord(-1, -1, f"{path}", None, "empty file (no records)")


def _parquet_rows(path: Path, columns: Sequence[str], optional: Sequence[str], owned: Callable[[int], bool]
                  ) -> Iterator[tuple[str, dict | InvalidRecord | None]]:
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        wanted = [c for c in dict.fromkeys([*columns, *optional]) if c in schema.names]
        batches = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=wanted)
        yield from _table_batches_rows(path, batches, schema, columns, optional, owned)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc}); expected {FORMATS_EXPECTED}") from exc


def _hf_rows(path: Path, columns: Sequence[str], optional: Sequence[str], owned: Callable[[int], bool]
             ) -> Iterator[tuple[str, dict | InvalidRecord | None]]:
    # Through `datasets` itself (its on-disk layout is its own business); Arrow batches of a memory map.
    dataset = load_hf_dataset(path)
    schema = dataset.data.schema
    wanted = [c for c in dict.fromkeys([*columns, *optional]) if c in schema.names]
    batches = (table for table in dataset.select_columns(wanted).with_format("arrow").iter(batch_size=_BATCH_ROWS))
    yield from _table_batches_rows(path, batches, schema, columns, optional, owned)


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
