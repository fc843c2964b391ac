"""Evaluation job parts that need neither a model nor Ray: data validation, records + resume, seeds, report."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mathtir.eval.problems import FieldNames, check_problems, load_problems
from mathtir.eval.records import RecordsError, RecordStore, SampleRecord, sample_seed
from mathtir.eval.report import write_results
from mathtir.readers import DataError

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


GOOD = [{"id": "p1", "problem": "1+1は?", "expected_answer": "2", "category": "中1"},
        {"id": 7, "problem": "2+3?", "expected_answer": 5, "category": "中2"}]


# -- data ----------------------------------------------------------------------------------------------------

def test_loads_jsonl_and_parquet_with_renamed_fields(tmp_path):
    problems = load_problems(write_jsonl(tmp_path / "a.jsonl", GOOD))
    assert [(p.id, p.expected_answer, p.category) for p in problems] == [("p1", "2", "中1"), ("7", "5", "中2")]

    table = pa.table({"qid": ["x", "y"], "question": ["q1", "q2"], "answer": ["1", "\\frac{1}{2}"],
                      "subset": ["A", "B"]})
    pq.write_table(table, tmp_path / "b.parquet")
    fields = FieldNames(id="qid", problem="question", expected_answer="answer", category="subset")
    problems = load_problems(tmp_path / "b.parquet", fields)
    assert [(p.id, p.problem, p.expected_answer) for p in problems] == [("x", "q1", "1"), ("y", "q2", "\\frac{1}{2}")]


@pytest.mark.parametrize("rows, message", [
    ([GOOD[0], {"id": "p2", "problem": "x", "category": "c"}], r"bad\.jsonl:2: missing field 'expected_answer'"),
    ([GOOD[0], GOOD[1], '{"id": "p3", "problem": '], r"bad\.jsonl:3: malformed JSON"),
    ([GOOD[0], {**GOOD[1], "problem": "  "}], r"bad\.jsonl:2: field 'problem': empty"),
    ([GOOD[0], {**GOOD[1], "expected_answer": None}], r"bad\.jsonl:2: field 'expected_answer': missing"),
    ([GOOD[0], {**GOOD[1], "id": "p1"}], r"duplicate id 'p1' \(records 1 and 2\)"),
    (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl_names_file_line_and_field(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_problems(write_jsonl(tmp_path / "bad.jsonl", rows))


@pytest.mark.parametrize("collide", [False, True])
def test_checking_without_holding_finds_what_loading_finds(tmp_path, monkeypatch, collide):
    """check_problems (generation: millions of problems, never all in memory) counts and refuses like
    load_problems. Ids are compared by digests; with every digest made equal, the ids themselves decide."""
    from mathtir.eval import problems as problems_module

    if collide:
        monkeypatch.setattr(problems_module, "_id_digest", lambda problem_id: 7)
    rows = [{"id": f"q{i}", "problem": f"{i}+1?", "expected_answer": str(i + 1)} for i in range(50)]
    assert check_problems(write_jsonl(tmp_path / "ok.jsonl", rows)) == 50 == len(load_problems(tmp_path / "ok.jsonl"))
    bad = write_jsonl(tmp_path / "dup.jsonl", [*rows[:30], {**rows[40], "problem": "again"}, *rows[30:]])
    for check in (check_problems, load_problems):
        with pytest.raises(DataError, match=r"dup\.jsonl: duplicate id 'q40' \(records 31 and 42\)"):
            check(bad)
    with pytest.raises(DataError, match=r"gap\.jsonl:3: missing field 'expected_answer'"):
        check_problems(write_jsonl(tmp_path / "gap.jsonl", [*rows[:2], {"id": "x", "problem": "y"}]))


def test_bad_parquet_names_column_and_row(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "problem": ["q"], "category": ["c"]}), tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m\.parquet: missing field 'expected_answer'"):
        load_problems(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "problem": ["q", None], "expected_answer": ["1", "2"],
                             "category": ["c", "c"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet row 1: field 'problem'"):
        load_problems(tmp_path / "n.parquet")


def test_cli_rejects_bad_data_before_any_sampling(tmp_path):
    """The CLI exits 2 with file:line:field, starts no Ray (RAY_ADDRESS points nowhere) and writes nothing."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], {"id": "p2", "problem": "x", "category": "c"}])
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1", RAY_AUTH_MODE="disabled")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "ray_eval/run.py", "--model", str(tmp_path), "--data", str(bad),
                           "--output", str(out), "--backend", "openai", "--api-model", "m"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}:2: missing field 'expected_answer'" in proc.stderr
    assert not out.exists()
    assert time.monotonic() - started < 60


def test_json_arrays_parquet_and_hf_datasets_load_alike_and_category_is_optional(tmp_path):
    import datasets

    rows = [{k: v for k, v in r.items() if k != "category"} for r in GOOD]  # no category at all
    expected = [("p1", "1+1は?", "2", None), ("7", "2+3?", "5", None)]
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False, indent=2))
    columnar = [{k: str(v) for k, v in r.items()} for r in rows]  # one type per column
    pq.write_table(pa.Table.from_pylist(columnar), tmp_path / "a.parquet")
    datasets.Dataset.from_list(columnar).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(columnar[:1])}).save_to_disk(str(tmp_path / "dd"))
    for source in ("a.json", "a.parquet", "hf", "dd/test"):
        problems = load_problems(tmp_path / source)
        assert [(p.id, p.problem, p.expected_answer, p.category) for p in problems] == expected[:len(problems)]
    # one row with a category, one without (absent or null): only the present one is a category
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [GOOD[0], {**GOOD[1], "category": None}])
    assert [p.category for p in load_problems(mixed)] == ["中1", None]
    with pytest.raises(DataError, match=r"dd: a DatasetDict with splits test; point at one split's subdirectory"):
        load_problems(tmp_path / "dd")


@pytest.mark.parametrize(("content", "message"), [
    (json.dumps({"problems": GOOD}), r"x\.json:1: missing field 'id' \(fields present: problems\)"),
    ('[{"id": "a", "problem": "q", "expected_answer": "1"},\n 42]', r"x\.json:2 \(item 2\): expected a JSON object, got int"),
    ('[{"id": "a", "problem": "q", "expected_answer": "1"}\n {"id": "b"}]', r"x\.json:2: malformed JSON \(expected ',' or ']' after item 1\); expected a JSON array of objects"),
    ('[{"id": "a", "problem": "q", "expected_answer": "1"},', r"x\.json: malformed JSON \(the array is never closed"),
    ("[\n" + "[" * 200_000 + "]" * 200_000 + "]", r"x\.json:2 \(item 1\): JSON nested too deeply"),
], ids=["object-not-array", "item-not-object", "missing-comma", "unclosed", "deep"])
def test_bad_json_files_say_what_was_expected(tmp_path, content, message):
    (tmp_path / "x.json").write_text(content)
    with pytest.raises(DataError, match=message):
        load_problems(tmp_path / "x.json")


def test_a_json_array_named_jsonl_gets_a_hint(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps(GOOD, indent=1))
    with pytest.raises(DataError, match=r"x\.jsonl:1: malformed JSON .*this looks like a JSON array: name the file "
                                        r"\.json"):
        load_problems(tmp_path / "x.jsonl")
    with pytest.raises(DataError, match=r"x\.txt: cannot tell the format from the name; expected JSON Lines"):
        load_problems(write_jsonl(tmp_path / "x.txt", GOOD))


def run_cli(tmp_path: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1", RAY_AUTH_MODE="disabled")
    return subprocess.run([sys.executable, "ray_eval/run.py", "--model", str(tmp_path), "--data", str(data),
                           "--output", str(out), "--backend", "openai", "--api-model", "m"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli_refuses_a_non_utf8_byte_naming_file_line_and_byte(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + json.dumps(GOOD[1]).encode().replace(b"2+3", b"2\xfe3")
                      + b"\n")
    array = tmp_path / "d.json"
    array.write_bytes(b"[\n" + json.dumps(GOOD[0]).encode() + b",\n" + json.dumps(GOOD[1]).encode().replace(
        b"2+3", b"2\xfe3") + b"\n]\n")
    for data, line in ((jsonl, 2), (array, 3)):
        proc = run_cli(tmp_path, data, tmp_path / "out")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert re.search(rf"error: {re.escape(str(data))}:{line}: non-UTF-8 byte 0xfe at byte \d+ of the line",
                         proc.stderr), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_submitted_job_refuses_relative_paths_naming_the_fix(tmp_path):
    """In a `ray job submit` driver (Ray's job supervisor passes the job's runtime_env in this variable) a
    relative path would resolve inside Ray's temporary copy of the working directory; the README test runs
    the real submission."""
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1", RAY_AUTH_MODE="disabled",
               RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    proc = subprocess.run([sys.executable, "ray_eval/run.py", "--model", str(tmp_path), "--data", str(data),
                           "--output", "runs/eval/x", "--backend", "openai", "--api-model", "m"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --output runs/eval/x: relative path(s) in a `ray job submit` job" in proc.stderr
    assert '--output "$PWD/runs/eval/x"' in proc.stderr and not (REPO / "runs" / "eval" / "x").exists()


def test_cli_refuses_json_nested_too_deeply_naming_file_and_line(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps(GOOD[0]) + "\n" + "[" * 200_000 + "]" * 200_000 + "\n")
    proc = run_cli(tmp_path, deep, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {deep}:2: JSON nested too deeply" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- records -------------------------------------------------------------------------------------------------

def make_record(pid: str, index: int, answer: str | None = "1", correct: bool = True, **over) -> SampleRecord:
    base = dict(problem_id=pid, sample_index=index, seed=sample_seed(0, pid, index), text=f"t {pid} {index}",
                answer=answer, correct=correct, code_rounds=1, timeouts=0, exec_errors=0, prompt_tokens=10,
                generated_tokens=20, inserted_tokens=5, generation_s=0.5, execution_s=0.1, finish_reason="eos",
                attempt=1)
    return SampleRecord(**{**base, **over})


def test_records_resume_skips_finished_and_cuts_a_torn_line(tmp_path):
    path = tmp_path / "records.jsonl"
    with RecordStore(path) as store:
        store.append(make_record("a", 0))
        store.append(make_record("a", 1, answer=None, correct=False))
    with open(path, "ab") as f:  # a kill in the middle of writing the third record
        f.write(b'{"problem_id": "b", "sample_ind')
    with RecordStore(path) as store:
        assert store.torn_bytes == len(b'{"problem_id": "b", "sample_ind')
        assert ("a", 0) in store and ("a", 1) in store and ("b", 0) not in store
        assert store.records[("a", 1)].answer is None
        store.append(make_record("b", 0))
        with pytest.raises(RecordsError, match="already recorded"):
            store.append(make_record("a", 0))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["problem_id"] for line in lines] == ["a", "a", "b"]


def test_records_refuse_corrupt_and_duplicate_lines(tmp_path):
    path = tmp_path / "records.jsonl"
    good = json.dumps(dataclasses.asdict(make_record("a", 0)))
    path.write_text(f"{good}\nnot json\n")
    with pytest.raises(RecordsError, match=r"records\.jsonl:2: unreadable record"):
        RecordStore(path)
    path.write_text(f"{good}\n{good}\n")
    with pytest.raises(RecordsError, match=r"records\.jsonl:2: duplicate record for problem 'a' sample 0"):
        RecordStore(path)


def test_records_refuse_a_non_utf8_byte_and_wrong_field_types_on_resume(tmp_path):
    path = tmp_path / "records.jsonl"
    good = json.dumps(dataclasses.asdict(make_record("a", 0)))
    path.write_bytes(good.encode() + b"\n" + good.replace('"t a 0"', '"t \\u00e9"').encode().replace(b"\\u00e9", b"\xe9")
                     + b"\n")
    with pytest.raises(RecordsError, match=r"records\.jsonl:2: unreadable record \(non-UTF-8 byte 0xe9 at byte \d+"):
        RecordStore(path)
    # sample 0 stored as "0" would load as another key than (a, 0), and that sample would be generated again
    for field, value, wanted in (("sample_index", "0", "int"), ("correct", 1, "bool"), ("answer", 3, "str or null"),
                                 ("generated_tokens", True, "int"), ("generation_s", "0.5", "int or float")):
        row = {**dataclasses.asdict(make_record("a", 1)), field: value}
        path.write_text(f"{good}\n{json.dumps(row)}\n")
        with pytest.raises(RecordsError, match=rf"records\.jsonl:2: field '{field}': must be {wanted}, got"):
            RecordStore(path)


def test_cli_refuses_bad_records_on_resume_with_status_2(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    out = tmp_path / "out"
    out.mkdir()
    row = {**dataclasses.asdict(make_record("p1", 0)), "sample_index": "0"}
    (out / "records.jsonl").write_bytes(json.dumps(row).encode() + b"\n")
    proc = run_cli(tmp_path, data, out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {out / 'records.jsonl'}:1: field 'sample_index': must be int, got str" in proc.stderr
    (out / "records.jsonl").write_bytes(json.dumps(dataclasses.asdict(make_record("p1", 0))).encode()[:-2]
                                        + b'\xff"}\n')
    proc = run_cli(tmp_path, data, out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {out / 'records.jsonl'}:1: unreadable record (non-UTF-8 byte 0xff" in proc.stderr


def test_records_written_before_answer_source_existed_still_resume(tmp_path):
    path = tmp_path / "records.jsonl"
    rows = [dataclasses.asdict(make_record("a", 0)), dataclasses.asdict(make_record("a", 1, answer=None, correct=False))]
    for row in rows:
        del row["answer_source"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with RecordStore(path) as store:
        assert [store.records[("a", i)].answer_source for i in (0, 1)] == ["boxed", "none"]


def test_sample_seeds_depend_only_on_identity():
    assert sample_seed(0, "p1", 3) == sample_seed(0, "p1", 3)
    seeds = {sample_seed(s, p, i) for s in (0, 1) for p in ("p1", "p2") for i in range(4)}
    assert len(seeds) == 16
    assert all(0 <= s < 2**63 for s in seeds)


# -- report --------------------------------------------------------------------------------------------------

def test_report_writes_metrics_tables_and_plots(tmp_path):
    from mathtir.eval.problems import Problem

    problems = [Problem("p1", "q", "2", "中1"), Problem("p2", "q", "5", "中1"), Problem("p3", "q", "7", "数学I・A")]
    answers = {"p1": ["2", "2", "3"], "p2": ["4", "5", None], "p3": ["7", "7", "7"]}
    records = [make_record(pid, i, answer=a, correct=a == {"p1": "2", "p2": "5", "p3": "7"}[pid])
               for pid, ans in answers.items() for i, a in enumerate(ans)]
    args = Namespace(model="m", api_model=None, backend="hf", prompt_template="chat", dialect="tir", data="d.jsonl",
                     max_tokens=64, max_code_executions=2, temperature=0.7, top_p=0.95, seed=0)
    metrics = write_results(tmp_path, problems, records, args=args, run_stats={"wall_s": 1.0, "samples_per_s": 9})
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["num_problems"] == 3 and on_disk["num_samples"] == 3
    # p1: 2 of 3 right (majority right), p2: 1 of 3 (tie 4/5 -> 0.5), p3: all right
    assert on_disk["majority@k"]["3"]["accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert on_disk["pass@1_mean"]["accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 1) / 3)
    assert on_disk["run"]["executions"] == 9 and on_disk["run"]["finish_reasons"] == {"eos": 9}
    assert set(on_disk["per_category"]) == {"中1", "数学I・A"}
    report = (tmp_path / "report.md").read_text()
    assert "| majority@3 |" in report
    # the plot labels are the categories' own names (a CJK font: quickstart.sh installs one), never C1, C2
    assert "| 中1 | 中1 |" in report and "| 数学I・A | 数学I・A |" in report
    for png in ("plots/accuracy_vs_k.png", "plots/category_accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    assert metrics["per_problem"]["p2"]["num_no_answer"] == 1


def test_curves_read_accuracy_at_smaller_budgets_and_execution_limits_off_the_records(tmp_path):
    from mathtir.eval.problems import Problem

    problems = [Problem("p1", "q", "2"), Problem("p2", "q", "5"), Problem("p3", "q", "7")]
    gold = {"p1": "2", "p2": "5", "p3": "7"}
    # per sample: (answer, response tokens = generated + inserted, code executions)
    samples = {"p1": [("2", 10, 0), ("2", 40, 2), ("3", 20, 1)],
               "p2": [("5", 60, 1), ("5", 50, 2), ("4", 8, 0)],
               "p3": [("7", 30, 1), ("7", 30, 1), ("7", 30, 1)]}
    records = [make_record(pid, i, answer=a, correct=a == gold[pid], generated_tokens=t - 4, inserted_tokens=4,
                           code_rounds=rounds)
               for pid, rows in samples.items() for i, (a, t, rounds) in enumerate(rows)]
    args = Namespace(model="m", api_model=None, backend="hf", prompt_template="chat", dialect="tir", data="d.jsonl",
                     max_tokens=64, max_code_executions=2, temperature=0.7, top_p=0.95, seed=0)
    metrics = write_results(tmp_path, problems, records, args=args, run_stats={"wall_s": 1.0})
    assert "per_category" not in metrics  # no categories in the data: overall figures only

    def point(key, setting, value):
        (p,) = [p for p in metrics["curves"][key] if p[setting] == value]
        return p["majority"]["accuracy"], p["pass"]["accuracy"], p["samples_within"]

    budgets = [p["max_tokens"] for p in metrics["curves"]["token_budget"]]
    assert budgets == [4, 8, 16, 24, 32, 40, 48, 56, 64]
    # B=16: p1 keeps "2" only, p2 keeps the wrong "4", p3 nothing
    assert point("token_budget", "max_tokens", 16) == pytest.approx((1 / 3, 1 / 3, 2 / 9))
    # B=32: p1 "2" vs "3" ties (0.5), p2 still "4", p3 everything
    assert point("token_budget", "max_tokens", 32) == pytest.approx((0.5, 2 / 3, 6 / 9))
    assert point("token_budget", "max_tokens", 4) == pytest.approx((0, 0, 0))
    assert point("code_executions", "max_code_executions", 0) == pytest.approx((1 / 3, 1 / 3, 2 / 9))
    assert point("code_executions", "max_code_executions", 1) == pytest.approx((2 / 3, 1, 7 / 9))
    # at the run's own settings the curves end at the run's figures
    for key, setting, value in (("token_budget", "max_tokens", 64), ("code_executions", "max_code_executions", 2)):
        assert point(key, setting, value) == pytest.approx(
            (metrics["majority@k"]["3"]["accuracy"], metrics["pass@k"]["3"]["accuracy"], 1.0))
    report = (tmp_path / "report.md").read_text()
    assert "## Accuracy vs token budget (from the recorded trajectories, no re-sampling)" in report
    assert "| 32 | 50.0% [" in report and "## Accuracy vs code executions" in report
    for png in ("plots/accuracy_vs_token_budget.png", "plots/accuracy_vs_code_executions.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report


class ScriptedSampler:
    """A text sampler replaying fixed model turns, for exercising the loop's bookkeeping around real code
    execution; the real backends are tested in test_eval_job.py."""

    uses_token_ids = False

    def __init__(self, turns: list[tuple[str, str]]):
        self.turns = list(turns)

    async def generate(self, request):
        from mathtir.eval.samplers import Generation

        text, reason = self.turns.pop(0)
        return Generation(token_ids=[], text=text, num_tokens=len(text) // 3, finish_reason=reason)


@pytest.mark.parametrize("fallback, answer, source", [(False, None, "none"), (True, "12", "fallback")])
def test_an_answer_printed_by_code_is_not_the_models_answer(fallback, answer, source):
    """Hostile or careless code prints a \\boxed{} into its output block; the model itself boxes nothing. The
    sample has no answer (or, with the fallback, the model's own last number), never the printed box."""
    import asyncio

    from mathtir.eval.execution import PoolExecutor
    from mathtir.eval.problems import Problem
    from mathtir.eval.tir import TIRConfig, run_sample
    from mathtir.formats import OutputFormat, get_dialect, get_template
    from mathtir.sandbox import SandboxPool

    sampler = ScriptedSampler([("Let me compute.\n```python\nprint('\\\\boxed{7}')\n```\n", "stop"),
                               ("So the count is 12 apples.", "eos")])
    with SandboxPool(workers=1) as pool:
        record = asyncio.run(run_sample(
            Problem("p", "How many?", "7", "c"), 0, sampler=sampler, executor=PoolExecutor(pool, timeout=10),
            tokenizer=None, template=get_template("llmjp"), dialect=get_dialect("tir"), output_format=OutputFormat(),
            config=TIRConfig(answer_fallback=fallback)))
    assert "```output\n\\boxed{7}\n```" in record.text  # the code really printed the box
    assert (record.answer, record.answer_source, record.correct) == (answer, source, False)


class GatedSampler:
    """A text sampler whose answers wait for the test to release them: it sees how many trajectories are out
    at once, and the sample whose problem id is `failing` raises."""

    uses_token_ids = False

    def __init__(self, failing: str | None = None):
        self.out = self.peak = 0
        self.failing = failing

    async def generate(self, request):
        import asyncio

        from mathtir.eval.samplers import Generation

        self.out += 1
        self.peak = max(self.peak, self.out)
        await asyncio.sleep(0.001)
        self.out -= 1
        if self.failing and self.failing in request.prompt_text:
            raise RuntimeError(f"sampler failed on {self.failing}")
        return Generation(token_ids=[], text="\\boxed{1}", num_tokens=3, finish_reason="eos")


def run_window(sampler, problems: int, samples: int, max_in_flight: int):
    """run_samples over problems x samples: (finished keys, how many samples were drawn, the error raised)."""
    import asyncio

    from mathtir.eval.job import run_samples
    from mathtir.eval.problems import Problem
    from mathtir.eval.tir import TIRConfig
    from mathtir.formats import OutputFormat, get_dialect, get_template

    drawn, finished = [], []

    def todo():
        for i in range(problems):
            for s in range(samples):
                drawn.append((f"q{i}", s))
                yield Problem(f"q{i}", f"problem q{i}:", "1", None), s

    try:
        asyncio.run(run_samples(todo(), lambda problem, record: finished.append(record.key), sampler=sampler,
                                executor=None, tokenizer=None, template=get_template("llmjp"),
                                dialect=get_dialect("tir"), output_format=OutputFormat(), config=TIRConfig(),
                                attempt=1, max_in_flight=max_in_flight))
    except RuntimeError as e:
        return finished, len(drawn), e
    return finished, len(drawn), None


def test_run_samples_holds_the_window_and_records_each_sample_once():
    sampler = GatedSampler()
    finished, drawn, error = run_window(sampler, problems=30, samples=4, max_in_flight=16)
    assert error is None and drawn == 120
    assert sorted(finished) == sorted((f"q{i}", s) for i in range(30) for s in range(4))
    assert sampler.peak == 16  # the window is full, never more


def test_run_samples_stops_drawing_at_the_first_error_and_raises_it():
    finished, drawn, error = run_window(GatedSampler(failing="q3:"), problems=30, samples=4, max_in_flight=4)
    assert str(error) == "sampler failed on q3:"
    # q3's first sample is the 13th drawn; the window's other samples may finish and draw once or twice more
    # before the error is seen, but not the remaining 100-odd
    assert 13 <= drawn <= 12 + 2 * 4 and len(finished) < drawn
