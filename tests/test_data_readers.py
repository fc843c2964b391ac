"""Readers on real files of each format, field mapping, and bad input named by file, line and field."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mathtir.data.clean import DecontaminationIndex, MinHasher, NearDuplicateIndex, exact_key
from mathtir.data.recipe import FieldsConfig
from mathtir.data.records import Record, iter_records
from mathtir.readers import DataError, InvalidRecord, detect_format

OMR = FieldsConfig(problem="problem", response="generated_solution", expected_answer="expected_answer",
               mode="inference_mode")
ROWS = [{"problem": f"問題{i}", "generated_solution": f"答えは \\boxed{{{i}}}", "expected_answer": str(i),
         "inference_mode": "cot" if i % 2 else "tir", "problem_source": "x"} for i in range(5)]


def _read(path, fields=OMR, fmt=None, **kw):
    return list(iter_records([(path, fmt or detect_format(path))], fields, **kw))


def _write_hf_disk(directory, rows):
    """A directory written by `datasets` itself, in two shards (the reader goes through `datasets` too)."""
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(directory), num_shards=2)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "parquet", "hf_disk"])
def test_every_format_yields_the_same_records(tmp_path, kind):
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    elif kind == "jsonl.gz":
        path = tmp_path / "d.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS, ensure_ascii=False, indent=2), encoding="utf-8")
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=2)
    else:
        path = tmp_path / "d_hf"
        _write_hf_disk(path, ROWS)
    records = _read(path)
    assert all(isinstance(r, Record) for r in records)
    assert [(r.problem, r.response, r.expected_answer, r.mode) for r in records] == [
        (r["problem"], r["generated_solution"], r["expected_answer"], r["inference_mode"]) for r in ROWS]
    assert [r.index for r in records] == list(range(len(ROWS)))
    # Array-job parts partition the records: disjoint, and together everything.
    parts = [_read(path, part=p, num_parts=3) for p in range(3)]
    assert sorted(r.index for part in parts for r in part) == list(range(len(ROWS)))


def test_openmathinstruct_and_messages_mappings(tmp_path):
    path = tmp_path / "omi.jsonl"
    path.write_text(json.dumps({"question": "q", "generated_solution": "s", "expected_answer": 5}) + "\n")
    (record,) = _read(path, FieldsConfig(problem="question", response="generated_solution"))
    assert (record.problem, record.response, record.expected_answer, record.mode) == ("q", "s", "5", None)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "sys"},
                                             {"role": "user", "content": "u"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    (record,) = _read(path, FieldsConfig(messages="messages", expected_answer=None))
    assert (record.problem, record.response) == ("u", "a")


def test_bad_jsonl_lines_are_named_by_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(ROWS[0], ensure_ascii=False).encode()
    no_answer = json.dumps({k: v for k, v in ROWS[1].items() if k != "expected_answer"}).encode()
    path.write_bytes(b"\n".join([good, b'{"problem": "x", ', no_answer, b'{"problem": "\xff"}', good]) + b"\n")
    records = _read(path)
    invalid = [r for r in records if isinstance(r, InvalidRecord)]
    assert [r.message() for r in invalid] == [
        f"{path}:2: malformed JSON (Expecting property name enclosed in double quotes at column 18; expected one "
        f"JSON object per line)",
        f"{path}:3: field 'expected_answer': missing",
        f"{path}:4: non-UTF-8 byte 0xff at byte 14 of the line (expected UTF-8 text)",
    ]
    assert sum(isinstance(r, Record) for r in records) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert [r.message() for r in _read(empty)] == [f"{empty}: empty file (no records)"]


def test_parquet_missing_column_and_null_value(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "a", "generated_solution": "b"}]), path)
    with pytest.raises(DataError, match=r"p.parquet: missing field 'expected_answer'"):
        _read(path)
    pq.write_table(pa.Table.from_pylist([{"problem": "a", "generated_solution": None, "expected_answer": "1",
                                          "inference_mode": "cot"}]), path)
    (bad,) = _read(path)
    assert bad.message() == f"{path} row 0: field 'generated_solution': missing"


def test_exact_and_near_duplicate_keys():
    assert exact_key("１＋１は？", "答え  2") == exact_key("1+1は?", "答え 2")
    assert exact_key("1+1は?", "答え 2") != exact_key("1+1は?", "答え 3")
    hasher = MinHasher(num_perm=64, shingle=5, seed=0)
    index = NearDuplicateIndex(num_perm=64, bands=16, threshold=0.8)
    base = "太郎はりんごを12個持っています。花子に3個あげました。残りは何個ですか。" * 3
    assert index.add_if_new(hasher.signature(base)) is None
    assert index.add_if_new(hasher.signature(base.replace("太郎", "次郎", 1))) == 0
    assert index.add_if_new(hasher.signature("全く別の問題: 三角形の面積を求めよ。底辺は7cm、高さは4cmです。")) is None


def test_decontamination_catches_a_planted_problem_but_not_a_template_sibling():
    index = DecontaminationIndex(ngram=8, min_overlap=0.5)
    index.add("eval", "p1", "りんごが17個あります。5個食べると、残りは何個ですか。")
    planted = "次の問題を解いてください。りんごが１７個あります。 5個食べると、残りは何個ですか。答えは12"
    hit = index.check(planted)
    assert hit is not None and (hit.eval_set, hit.eval_id) == ("eval", "p1") and hit.overlap == 1.0
    assert index.check("みかんが23個あります。8個食べると、残りは何個ですか。") is None
