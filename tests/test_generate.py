"""`mathtir generate`: TIR training data by rejection sampling, through the evaluation's own machinery.

The teacher is the tiny Llama of test_eval_job.py that memorized three TIR trajectories (its answer to the third
problem is deliberately wrong), sampled on a real Ray head with the real sandbox; one test drives it through
the real OpenAI-compatible server of test_eval_backends.py. The kept solutions go through `mathtir data
prepare` and one step of stage-2 training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_eval_backends import openai_server, server_log_on_failure  # noqa: F401
from test_eval_job import PROBLEMS, REPO, ray_head, tir_tiny_dir, write_data  # noqa: F401

from mathtir.answers import is_equivalent
from mathtir.eval.records import SampleRecord
from mathtir.eval.rejection import DROP_REASONS, KeepRules, select
from mathtir.similarity import char_shingles

PYTHON = sys.executable


def record(index: int, *, correct: bool = True, answer: str | None = "42", finish: str = "eos",
           code_rounds: int = 1, timeouts: int = 0, exec_errors: int = 0, text: str | None = None) -> SampleRecord:
    # distinct wording per index, so only the texts a test makes equal are near-identical
    text = text or (f"Approach {index}: " + " ".join(f"w{index * 7 + k}" for k in range(30))
                    + f"\n```python\nprint(6*7)\n```\n```output\n42\n```\n\\boxed{{{answer}}}")
    return SampleRecord(problem_id="p", sample_index=index, seed=index, text=text, answer=answer, correct=correct,
                        code_rounds=code_rounds, timeouts=timeouts, exec_errors=exec_errors, prompt_tokens=10,
                        generated_tokens=50, inserted_tokens=3, generation_s=0.0, execution_s=0.0,
                        finish_reason=finish, attempt=1)


# -- the rules, on records made here ---------------------------------------------------------------------------

def test_every_dropped_trajectory_gets_the_first_reason_that_applies():
    duplicate_text = record(7).text.replace(" ", "  ").upper()  # the same solution re-spaced and re-cased
    records = [record(0, finish="length", correct=False, answer=None), record(1, finish="error", answer=None,
                                                                              correct=False),
               record(2, answer=None, correct=False), record(3, answer="41", correct=False),
               record(4, timeouts=1, exec_errors=0), record(5, exec_errors=1), record(6, code_rounds=0),
               record(7), record(8, text=duplicate_text), record(9), record(10)]
    selection = select("p", records, KeepRules(max_kept=2))
    assert [r.sample_index for r in selection.kept] == [7, 9]
    assert selection.dropped == {0: "over_budget", 1: "sampler_error", 2: "no_answer", 3: "wrong",
                                 4: "code_timeout", 5: "code_error", 6: "no_code", 8: "duplicate", 10: "over_limit"}
    assert set(selection.dropped.values()) | {"too_hard", "too_easy"} == set(DROP_REASONS)
    assert selection.correct == 7 and selection.pass_rate == 7 / 11
    # allowed: errors, timeouts and code-free solutions are kept like any other
    loose = select("p", records, KeepRules(max_kept=10, allow_code_errors=True, allow_timeouts=True,
                                            require_code=False))
    assert [r.sample_index for r in loose.kept] == [4, 5, 6, 7, 9, 10]


def test_difficulty_filter_reads_the_teachers_pass_rate():
    easy = [record(i) for i in range(4)]
    assert select("p", easy, KeepRules(max_pass_rate=0.9)).reasons() == {"too_easy": 4}
    assert len(select("p", easy, KeepRules(max_pass_rate=1.0)).kept) == 4
    hard = [record(0), *(record(i, answer="1", correct=False) for i in range(1, 4))]
    selection = select("p", hard, KeepRules(min_pass_rate=0.5))
    assert selection.pass_rate == 0.25 and selection.dropped == {0: "too_hard", 1: "wrong", 2: "wrong", 3: "wrong"}
    assert [r.sample_index for r in select("p", hard, KeepRules(min_pass_rate=0.25)).kept] == [0]


# -- the job -------------------------------------------------------------------------------------------------

def generate_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--output", str(output), "--prompt-template", "chat",
            "--sandbox-workers", "1", "--no-progress", "--max-tokens", "64", "--max-code-executions", "2", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def outputs(out: Path) -> dict[str, list]:
    """Everything a generation run wrote, by kind (records without the per-attempt fields)."""
    volatile = ("attempt", "generation_s", "execution_s")
    return {"records": sorted(({k: v for k, v in r.items() if k not in volatile}
                               for f in sorted((out / "records").iterdir()) for r in read_jsonl(f)),
                              key=lambda r: (r["problem_id"], r["sample_index"])),
            "solutions": [r for f in sorted((out / "solutions").iterdir()) for r in read_jsonl(f)],
            "problems": [r for f in sorted((out / "problems").iterdir()) for r in read_jsonl(f)]}


def run_generate(head, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "ray_eval/generate.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(head.env, RAY_ADDRESS=head.address), timeout=timeout)


@pytest.fixture(scope="module")
def generated(ray_head, tir_tiny_dir, tmp_path_factory) -> Path:  # noqa: F811
    """One run on the Ray head: 3 problems x 4 samples, 2 problems per shard, at most 2 kept per problem."""
    work = tmp_path_factory.mktemp("generated")
    data, out = write_data(work / "problems.jsonl"), work / "out"
    proc = run_generate(ray_head, generate_args(tir_tiny_dir, data, out, "--samples", "4", "--max-kept", "2",
                                                "--shard-problems", "2", "--near-duplicate", "1.0"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.cluster
def test_kept_solutions_are_the_ones_the_grader_accepts(generated):
    gold = {p.id: p.expected_answer for p in PROBLEMS}
    produced = outputs(generated)
    records = produced["records"]
    assert [(r["problem_id"], r["sample_index"]) for r in records] == [(p.id, i) for p in PROBLEMS for i in range(4)]
    # graded again here, independently of the verdict stored in the record
    accepted = {(r["problem_id"], r["sample_index"]) for r in records
                if r["answer"] is not None and is_equivalent(r["answer"], gold[r["problem_id"]])
                and r["finish_reason"] != "length" and r["code_rounds"] >= 1 and not r["exec_errors"] + r["timeouts"]}
    kept = {(s["problem_id"], s["sample_index"]) for s in produced["solutions"]}
    assert kept <= accepted
    text = {(r["problem_id"], r["sample_index"]): r["text"] for r in records}
    for p in PROBLEMS:  # at most 2 per problem, as many as the distinct accepted solutions allow
        distinct = {frozenset(char_shingles(text[key], 5)) for key in accepted if key[0] == p.id}
        assert sum(pid == p.id for pid, _ in kept) == min(2, len(distinct))
    assert not any(pid == "p2" for pid, _ in kept)  # the memorized wrong answer (44; the sandbox printed 45)
    assert {p["problem_id"]: p["dropped"] for p in produced["problems"]}["p2"] == {"wrong": 4}
    for solution in produced["solutions"]:  # OpenMathReasoning's fields, plus where the solution came from
        assert solution["expected_answer"] == gold[solution["problem_id"]]
        assert solution["inference_mode"] == "tir" and solution["teacher"] == "eval-tir-tiny-v1"
        assert "```output\n" in solution["generated_solution"] and "\\boxed{" in solution["generated_solution"]
    for problem in produced["problems"]:
        mine = [r for r in records if r["problem_id"] == problem["problem_id"]]
        assert problem["correct"] == sum(r["correct"] for r in mine) and problem["samples"] == 4
        assert problem["kept"] + sum(problem["dropped"].values()) == 4
    summary = json.loads((generated / "summary.json").read_text())
    assert summary["samples"] == 12 and summary["kept"] == len(kept)
    assert summary["kept"] + sum(summary["dropped"].values()) == 12
    assert summary["categories"]["sums"]["kept"] == 0 and summary["unsolved_problems"] >= 1
    index = sorted(read_jsonl(generated / "index.jsonl"), key=lambda e: e["shard"])  # in the order sealed
    assert [(e["shard"], e["problems"]) for e in index] == [(0, 2), (1, 1)]
    assert "| wrong |" in (generated / "report.md").read_text()


@pytest.mark.cluster
def test_generated_solutions_prepare_pack_and_train_a_stage2_step(generated, tir_tiny_dir, tmp_path):  # noqa: F811
    prepared, init = tmp_path / "stage2_tir", tmp_path / "init"
    prepare = subprocess.run(
        [PYTHON, "-m", "mathtir", "data", "prepare", str(REPO / "nemo_configs" / "data_demo_tir.yaml"),
         f"inputs=[{generated}/solutions/*.jsonl]", f"output_dir={prepared}", f"tokenizer={tir_tiny_dir}",
         "seq_length=256", "decontam.eval_sets=[]", "verify.workers=1", "workers=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert prepare.returncode == 0, prepare.stderr[-4000:]
    manifest = json.loads((prepared / "manifest.json").read_text())
    kept = json.loads((generated / "summary.json").read_text())["kept"]
    # every generated solution passed prepare's own checks (code re-run in the sandbox, answer, pairs)
    assert manifest["counts"]["records_read"] == manifest["counts"]["packed_documents"] == kept > 0, manifest
    convert = subprocess.run([PYTHON, "-m", "mathtir", "convert", "import", "--hf-dir", str(tir_tiny_dir),
                              "--out", str(init), "--tp", "1", "--dtype", "fp32"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert convert.returncode == 0, convert.stderr[-4000:]
    train = subprocess.run(
        ["bash", "slurm/stage2_tir.sh", str(REPO / "nemo_configs" / "stage2_tir_smoke.yaml"),
         f"model.init_from={init}", f"data.train_dir={prepared}", f"checkpoint.dir={tmp_path / 'ckpt'}",
         "data.seq_length=256", "trainer.max_steps=1", "model.tensor_model_parallel_size=1",
         "model.sequence_parallel=false",
         "model.micro_batch_size=1", "model.global_batch_size=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, MATHTIR_NPROC_PER_NODE="1", MATHTIR_PYTHON=PYTHON))
    assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
    steps = [json.loads(line) for line in train.stdout.splitlines() if line.startswith("{") and '"step"' in line]
    assert steps and steps[-1]["step"] == 1 and steps[-1]["loss"] > 0


def recorded(out: Path) -> int:
    return sum(f.read_bytes().count(b"\n") for f in (out / "records").glob("*.jsonl"))


def wait_for_records(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while recorded(out) < n:
        assert proc.poll() is None, f"driver exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"fewer than {n} records after {timeout} s"
        time.sleep(0.1)


@pytest.mark.cluster
def test_killed_generation_resumes_to_exactly_the_uninterrupted_output(ray_head, tir_tiny_dir, tmp_path):  # noqa: F811
    # one trajectory at a time, so both runs draw the same samples in the same batches
    data = write_data(tmp_path / "problems.jsonl")
    common = ("--samples", "3", "--max-in-flight", "1", "--shard-problems", "1")
    straight = run_generate(ray_head, generate_args(tir_tiny_dir, data, tmp_path / "straight", *common))
    assert straight.returncode == 0, straight.stderr[-4000:]

    out, log = tmp_path / "killed", tmp_path / "driver.log"
    args = generate_args(tir_tiny_dir, data, out, *common)
    first = subprocess.Popen([PYTHON, "ray_eval/generate.py", *args], cwd=REPO,
                             env=dict(ray_head.env, RAY_ADDRESS=ray_head.address), stdout=open(log, "ab"),
                             stderr=subprocess.STDOUT)
    try:
        wait_for_records(out, 4, first)  # past the first shard (3 samples): one sealed, one open
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    sealed = read_jsonl(out / "index.jsonl")
    assert 1 <= len(sealed) < 3, "the driver was not killed mid-run"
    before = {f.name: f.read_bytes() for f in (out / "records").iterdir()}

    resumed = run_generate(ray_head, args)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for name, content in before.items():  # nothing recorded before the kill was rewritten
        assert (out / "records" / name).read_bytes().startswith(content)
    assert outputs(out) == outputs(tmp_path / "straight")
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = sum(content.count(b"\n") for content in before.values())
    assert [a["resumed_samples"] for a in manifest["attempts"]] == [0, recorded]
    assert sorted(e["shard"] for e in read_jsonl(out / "index.jsonl")) == [0, 1, 2]


@pytest.mark.cluster
def test_generation_through_the_openai_compatible_server(openai_server, ray_head, tir_tiny_dir, tmp_path):  # noqa: F811
    base, _ = openai_server
    data, out = write_data(tmp_path / "problems.jsonl", PROBLEMS[:2]), tmp_path / "out"
    proc = run_generate(ray_head, generate_args(tir_tiny_dir, data, out, "--samples", "2", "--backend", "openai",
                                                "--api-base", base, "--api-model", str(tir_tiny_dir),
                                                "--temperature", "0"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    solutions = outputs(out)["solutions"]
    # greedy: both samples of a problem are the same text, so one is kept and the other is its duplicate
    assert sorted(s["problem_id"] for s in solutions) == ["p0", "p1"]
    assert all(s["teacher"] == str(tir_tiny_dir) for s in solutions)
    assert json.loads((out / "summary.json").read_text())["dropped"] == {"duplicate": 2}


def test_bad_input_is_refused_before_any_sampling(tir_tiny_dir, tmp_path):  # noqa: F811
    data = tmp_path / "problems.jsonl"
    data.write_text('{"id": "a", "problem": "1+1?", "expected_answer": "2"}\n{"id": "b", "problem": "2+2?"}\n')
    out = tmp_path / "out"
    proc = subprocess.run([PYTHON, "-m", "mathtir", "generate", *generate_args(tir_tiny_dir, data, out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{data}:2" in proc.stderr and "expected_answer" in proc.stderr
    assert not out.exists()
    write_data(data)
    proc = subprocess.run([PYTHON, "-m", "mathtir", "generate", *generate_args(tir_tiny_dir, data, out),
                           "--min-pass-rate", "0.8", "--max-pass-rate", "0.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--min-pass-rate" in proc.stderr and not out.exists()


@pytest.mark.parametrize("damage, message", [
    ({"shard": "0"}, "field 'shard': must be int, got str"),  # would seal shard "0", and shard 0 be generated again
    ({"kept": True}, "field 'kept': must be int, got bool"),
    ({"solutions_sha256": 7}, "field 'solutions_sha256': must be str or null, got int"),
    ({"dropped": None}, "field 'dropped': must be dict, got NoneType"),
])
def test_a_damaged_index_line_is_refused_naming_file_line_and_field(tmp_path, damage, message):
    from mathtir.eval.generation import ShardIndex
    from mathtir.eval.records import RecordsError

    good = {"shard": 0, "problems": 1, "samples": 2, "correct": 1, "kept": 1, "dropped": {}, "categories": {},
            "pass_rate_histogram": {}, "generated_tokens": 10, "solutions_sha256": None}
    path = tmp_path / "index.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "shard": 1, **damage}) + "\n")
    with pytest.raises(RecordsError, match=f"^{path}:2: {message}"):
        ShardIndex(path)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "correct"}) + "\n")
    with pytest.raises(RecordsError, match=f"^{path}:1: index line lacks field\\(s\\) correct"):
        ShardIndex(path)
    path.write_text(json.dumps(good) + "\n")
    assert set(ShardIndex(path).entries) == {0}


def test_the_driver_holds_only_the_open_shards_problems(tmp_path, monkeypatch):
    """A run of many shards reads its problems shard by shard and lets each go when the shard is sealed: at any
    moment the driver holds the problems of the shards its window of in-flight samples touches, never the run's.
    A sampler and executor that answer at once stand in for Ray (as in bench/generate_driver.py)."""
    import asyncio

    from mathtir.eval import generation
    from mathtir.eval.samplers import Generation
    from mathtir.sandbox import ExecResult

    class Sampler:
        uses_token_ids, chat = False, False

        async def generate(self, request):
            await asyncio.sleep(0)  # the other in-flight samples run meanwhile
            if request.stop:
                return Generation([], "```python\nprint(1)\n```\n", 5, "stop")
            return Generation([], "\\boxed{1}", 3, "eos")

        def stats(self):
            return {}

    class Executor:
        async def run(self, code, history):
            return ExecResult(status="ok", stdout="1\n")

        def stats(self):
            return {}

    held = []
    seal = generation.Generation.seal_if_complete

    def seal_and_count(self, j):
        held.append(sum(len(p) for p in self.problems_of.values()))
        seal(self, j)

    monkeypatch.setattr(generation.Generation, "seal_if_complete", seal_and_count)
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"{i}?", "expected_answer": "1"}) + "\n"
                            for i in range(50)))
    out = tmp_path / "out"
    args = generation.build_parser().parse_args([
        "--data", str(data), "--output", str(out), "--samples", "2", "--shard-problems", "4", "--max-in-flight",
        "3", "--backend", "openai", "--api-model", "instant", "--no-progress", "--prompt-template", "llmjp"])
    assert generation.run(args, start_sampling=lambda a: (Sampler(), Executor(), lambda: None)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["problems"], summary["samples"], summary["kept"]) == (50, 100, 50)
    assert len(list((out / "solutions").iterdir())) == 13  # 12 shards of 4 problems and one of 2
    # 3 samples in flight span at most 2 shards of 4 problems each (the record that completes a shard is
    # counted before the shard lets go)
    assert len(held) == 100 and max(held) <= 2 * 4, max(held)
