"""The evaluation job with real models, a real sandbox and a real Ray head on loopback.

Models: SmolLM2-135M (real weights) and a tiny Llama whose weights were trained here for a few seconds to
memorize three TIR trajectories, so a test can rely on it writing a code block; one memorized output is
deliberately wrong (44 for sum(range(10))), so the sandbox's real output (45) is visibly what got inserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from cluster.ray_head import RayHead
from conftest import cache_lock

from mathtir.eval.problems import Problem
from mathtir.eval.samplers import GenerationRequest
from mathtir.eval.tir import TIRConfig, run_sample
from mathtir.files import file_sha256
from mathtir.formats import OutputFormat, get_dialect, get_template

REPO = Path(__file__).resolve().parent.parent
TIR_TINY_VERSION = "eval-tir-tiny-v1"
# (problem, code, output the model memorized, expected answer in the test data)
MEMORIZED = [("What is 6 times 7?", "print(6*7)", "42", "42"),
             ("What is 2 to the power 10?", "print(2**10)", "1024", "1024"),
             ("Sum the integers below 10.", "print(sum(range(10)))", "44", "45")]
PROBLEMS = [Problem(f"p{i}", q, gold, "arith" if i < 2 else "sums") for i, (q, _, _, gold) in enumerate(MEMORIZED)]


def memorized_response(code: str, output: str, eos: str) -> str:
    return f"I will compute it.\n```python\n{code}\n```\n```output\n{output}\n```\nThe answer is \\boxed{{{output}}}.{eos}"


@pytest.fixture(scope="session")
def tir_tiny_dir(model_cache_dir, tiny_llama_dir) -> Path:
    """tiny_llama_dir trained to reproduce MEMORIZED under the chat template (cached per machine)."""
    out = model_cache_dir / TIR_TINY_VERSION
    with cache_lock(model_cache_dir, TIR_TINY_VERSION):
        if not (out / "config.json").exists():
            _train_tir_tiny(tiny_llama_dir, out)
    return out


def _train_tir_tiny(tiny_llama_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    template = get_template("chat", tokenizer=tokenizer)
    rows = []
    for problem, code, output, _ in MEMORIZED:
        prompt = tokenizer.encode(template.render_prompt(problem), add_special_tokens=True)
        response = tokenizer.encode(memorized_response(code, output, template.eos), add_special_tokens=False)
        rows.append((prompt, response))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p): len(p) + len(r)] = torch.tensor(r)
        mask[i, : len(p) + len(r)] = 1
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05, f"the tiny model did not memorize its trajectories (loss {loss.item():.3f})"
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)


@pytest.fixture(scope="module")
def tir_sampler(tir_tiny_dir):
    from mathtir.eval.samplers.hf import HFSampler

    return HFSampler(tir_tiny_dir, max_batch_size=8, num_threads=1)


@pytest.fixture(scope="module")
def sandbox_executor():
    from mathtir.eval.execution import PoolExecutor
    from mathtir.sandbox import SandboxPool

    with SandboxPool(workers=1) as pool:
        yield PoolExecutor(pool, timeout=10)


def prompt_ids(sampler, problem: str) -> list[int]:
    template = get_template("chat", tokenizer=sampler.tokenizer)
    return sampler.tokenizer.encode(template.render_prompt(problem), add_special_tokens=True)


# -- the HF sampler ------------------------------------------------------------------------------------------

def test_hf_sampler_stop_strings_budget_and_eos(tir_sampler):
    ids = prompt_ids(tir_sampler, MEMORIZED[0][0])

    async def go():
        base = dict(prompt_ids=ids, prompt_text="", temperature=0.0, top_p=1.0, seed=0)
        return await asyncio.gather(
            tir_sampler.generate(GenerationRequest(max_new_tokens=200, stop=("```\n",), **base)),
            tir_sampler.generate(GenerationRequest(max_new_tokens=5, stop=("```\n",), **base)),
            tir_sampler.generate(GenerationRequest(max_new_tokens=200, stop=(), **base)))

    stopped, cut, whole = asyncio.run(go())
    assert stopped.finish_reason == "stop" and stopped.text.endswith("print(6*7)\n```\n")
    assert stopped.num_tokens == len(stopped.token_ids)
    assert cut.finish_reason == "length" and cut.num_tokens == 5 and cut.token_ids == stopped.token_ids[:5]
    assert whole.finish_reason == "eos" and whole.text.endswith("\\boxed{42}.")
    assert whole.token_ids[-1] in tir_sampler.eos_ids and whole.token_ids[: stopped.num_tokens] == stopped.token_ids
    assert "<|im_end|>" not in whole.text


def test_hf_sampler_is_reproducible_for_the_same_batch_and_seeds_are_per_row(tiny_llama_dir):
    """A row's randomness is its own seed's (a per-row generator): the same requests give the same tokens, and
    another seed in the same batch gives others. What shares a batch may still move the logits in their last
    bits (padding changes the kernels' shapes), so tokens are not promised across batch compositions; resume
    does not need that (a recorded sample is never generated again, see the resume tests)."""
    from mathtir.eval.samplers.hf import HFSampler

    sampler = HFSampler(tiny_llama_dir, max_batch_size=8, num_threads=1)
    short, long_ = [1, 2, 3], list(range(10, 40))

    def request(ids, seed, n=12):
        return GenerationRequest(prompt_ids=ids, prompt_text="", max_new_tokens=n, stop=(), temperature=1.0,
                                 top_p=0.9, seed=seed)

    async def batch():
        return await asyncio.gather(sampler.generate(request(long_, 1, 20)), sampler.generate(request(short, 7)),
                                    sampler.generate(request(short, 8)))

    async def go():
        return (await sampler.generate(request(short, 7)), await sampler.generate(request(short, 7)),
                await batch(), await batch())

    alone, alone_again, first, second = asyncio.run(go())
    assert sampler.stats()["peak_rows"] == 3  # the three concurrent requests shared the batch
    assert alone_again.token_ids == alone.token_ids
    assert [g.token_ids for g in second] == [g.token_ids for g in first]
    other, seven, eight = first
    assert eight.token_ids != seven.token_ids
    assert other.num_tokens == 20 or other.finish_reason == "eos"


# -- the TIR loop --------------------------------------------------------------------------------------------

def run_loop(sampler, executor, problem, *, max_tokens=200, max_code_executions=2, notice=False, index=0):
    return asyncio.run(run_sample(
        problem, index, sampler=sampler, executor=executor, tokenizer=sampler.tokenizer,
        template=get_template("chat", tokenizer=sampler.tokenizer), dialect=get_dialect("tir"),
        output_format=OutputFormat(remaining_notice=notice),
        config=TIRConfig(max_tokens=max_tokens, max_code_executions=max_code_executions, temperature=0.0)))


def test_tir_loop_executes_code_and_inserts_real_output(tir_sampler, sandbox_executor):
    record = run_loop(tir_sampler, sandbox_executor, PROBLEMS[2])
    # The sandbox printed 45 (the model memorized 44): the inserted block is the real output.
    assert record.text.startswith("I will compute it.\n```python\nprint(sum(range(10)))\n```\n```output\n45\n```\n")
    assert record.code_rounds >= 1 and record.timeouts == 0
    assert record.inserted_tokens > 0 and record.generated_tokens + record.inserted_tokens <= 200

    right = run_loop(tir_sampler, sandbox_executor, PROBLEMS[0])
    assert right.answer == "42" and right.correct and right.finish_reason == "eos" and right.code_rounds == 1
    assert right.text.endswith("```output\n42\n```\nThe answer is \\boxed{42}.")


def test_tir_loop_notice_and_execution_limit(tir_sampler, sandbox_executor):
    # The notice was never seen in training, so the model rambles on: the loop must still stop executing
    # after the allowed number of blocks and keep the whole response within the budget.
    record = run_loop(tir_sampler, sandbox_executor, PROBLEMS[0], notice=True, max_code_executions=2,
                      max_tokens=160)
    assert "```output\n42\n```\n```system\nRemaining code executions: 1." in record.text
    assert record.code_rounds <= 2
    assert record.generated_tokens + record.inserted_tokens <= 160
    assert record.text.count("```system\n") <= record.code_rounds  # notices come only with real outputs


def test_tir_budget_counts_inserted_output(tir_sampler, sandbox_executor):
    until_code = asyncio.run(tir_sampler.generate(GenerationRequest(
        prompt_ids=prompt_ids(tir_sampler, MEMORIZED[0][0]), prompt_text="", max_new_tokens=200,
        stop=("```\n",), temperature=0.0, top_p=1.0, seed=0))).num_tokens
    output_tokens = len(tir_sampler.tokenizer.encode("```output\n42\n```\n", add_special_tokens=False))

    no_room = run_loop(tir_sampler, sandbox_executor, PROBLEMS[0], max_tokens=until_code + output_tokens - 1)
    assert no_room.code_rounds == 1 and no_room.inserted_tokens == 0 and no_room.finish_reason == "length"
    assert no_room.generated_tokens == until_code

    exact = run_loop(tir_sampler, sandbox_executor, PROBLEMS[0], max_tokens=until_code + output_tokens)
    assert exact.inserted_tokens == output_tokens and exact.finish_reason == "length"
    assert exact.generated_tokens + exact.inserted_tokens == until_code + output_tokens


def test_tir_text_only_round_after_last_execution(tir_sampler, sandbox_executor):
    # No executions allowed: the single round is text-only, the model's code block is not run.
    record = run_loop(tir_sampler, sandbox_executor, PROBLEMS[2], max_code_executions=0)
    assert record.code_rounds == 0 and record.inserted_tokens == 0 and record.finish_reason == "eos"
    assert "```output\n44\n```" in record.text  # what the model wrote itself, not an execution


# -- the Ray job -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on 127.0.0.1: 2 CPUs (the sampler actor takes 1) and 2 "sandbox" units."""
    with RayHead(num_cpus=2, resources={"sandbox": 2}) as head:
        yield head


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def write_data(path: Path, problems=PROBLEMS) -> Path:
    path.write_text("".join(json.dumps({"id": p.id, "problem": p.problem, "expected_answer": p.expected_answer,
                                        "category": p.category}) + "\n" for p in problems))
    return path


def job_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--output", str(output), "--prompt-template", "chat",
            "--sandbox-workers", "1", "--no-progress", *extra]


def submit_job(head, args: list[str], timeout: float = 300) -> tuple[str, str]:
    """`ray job submit --working-dir . -- python ray_eval/run.py ...`, then the job's final status and logs
    (the CLI exits 0 for a STOPPED job too, so the status is read from the Jobs API)."""
    cmd = head.cli("job", "submit", "--working-dir", ".", "--no-wait", "--", "python", "ray_eval/run.py", *args)
    proc = subprocess.run(cmd, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"Job '([^']+)' submitted successfully", proc.stdout + proc.stderr).group(1)
    deadline = time.monotonic() + timeout
    while True:
        info = http_json(f"{head.dashboard_url}/api/jobs/{job_id}")
        if info["status"] in TERMINAL:
            break
        assert time.monotonic() < deadline, f"job {job_id} still {info['status']} after {timeout} s"
        time.sleep(1)
    logs = http_json(f"{head.dashboard_url}/api/jobs/{job_id}/logs")["logs"]
    return info["status"], logs


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def read_records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "records.jsonl").read_text().splitlines()]


@pytest.mark.cluster
def test_ray_job_submit_tiny_model(ray_head, tir_tiny_dir, tmp_path):
    data, out = write_data(tmp_path / "problems.jsonl"), tmp_path / "out"
    status, logs = submit_job(ray_head, job_args(tir_tiny_dir, data, out, "--samples", "2", "--max-tokens", "96",
                                                 "--max-code-executions", "2"))
    assert status == "SUCCEEDED", logs[-3000:]
    records = read_records(out)
    assert sorted((r["problem_id"], r["sample_index"]) for r in records) == [
        (p.id, i) for p in PROBLEMS for i in range(2)]
    assert all(r["code_rounds"] >= 1 and r["generated_tokens"] + r["inserted_tokens"] <= 96 for r in records)
    # executed on the cluster's sandbox actors: the real output of sum(range(10)), not the memorized 44
    assert all("```output\n45\n```" in r["text"] for r in records if r["problem_id"] == "p2")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_problems"] == 3 and metrics["num_samples"] == 2
    assert metrics["per_problem"]["p0"]["majority_correct"] == 1.0
    sandbox = metrics["run"]["sandbox"]
    assert sandbox["executions"] == sum(r["code_rounds"] for r in records)
    # every execution after a trajectory's first found its state one way or the other, and is counted once
    assert sandbox["warm_executions"] + sandbox["replayed_executions"] == sum(r["code_rounds"] - 1 for r in records)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["data_sha256"] == file_sha256(data)
    assert manifest["attempts"][0]["code"]["source_sha256"]
    report = (out / "report.md").read_text()
    assert "| majority@2 |" in report and (out / "plots" / "accuracy_vs_k.png").stat().st_size > 1000


def readme_submit_block() -> str:
    """The README's `ray job submit` example, exactly as written there."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    (block,) = [b for b in blocks if "ray job submit" in b]
    return block.strip()


def job_by_output(head, output: str) -> dict:
    jobs = http_json(f"{head.dashboard_url}/api/jobs/")
    (job,) = [j for j in (jobs if isinstance(jobs, list) else jobs.values())
              if f"--output {output}" in j["entrypoint"]]
    return job


@pytest.mark.cluster
def test_readme_ray_job_submit_runs_as_typed(ray_head, tir_tiny_dir, tmp_path):
    """The README block, run by bash from a submitting directory laid out as the README assumes (a checkout
    with runs/hf/final and dev.jsonl); only small-budget flags are appended to its last line."""
    import shutil

    submit = tmp_path / "checkout"
    for name in ("mathtir", "ray_eval"):
        shutil.copytree(REPO / name, submit / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".rayignore", ".gitignore"):
        shutil.copy(REPO / name, submit / name)
    (submit / "runs" / "hf").mkdir(parents=True)
    (submit / "runs" / "hf" / "final").symlink_to(tir_tiny_dir)
    (submit / "runs" / "eval" / "earlier").mkdir(parents=True)
    (submit / "runs" / "eval" / "earlier" / "records.jsonl").write_bytes(os.urandom(1 << 20))
    write_data(submit / "dev.jsonl")
    # .rayignore alone keeps run outputs out (Ray reads .gitignore too unless told not to, as here)
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.dashboard_url, "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"}
    small = " --samples 2 --max-tokens 64 --max-code-executions 1 --prompt-template chat --sandbox-workers 1 " \
            "--no-progress"
    proc = subprocess.run(["bash", "-c", readme_submit_block() + small], cwd=submit, env=env, capture_output=True,
                          text=True, timeout=600)
    out = submit / "runs" / "eval" / "final"
    job = job_by_output(ray_head, str(out))
    assert job["status"] == "SUCCEEDED", proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(read_records(out)) == len(PROBLEMS) * 2 and (out / "report.md").is_file()
    # the upload held the code and the data, not the run outputs
    packages = [d for d in ray_head.temp_dir.rglob("_ray_pkg_*") if d.is_dir() and (d / "dev.jsonl").is_file()]
    assert packages and all((d / "ray_eval" / "run.py").is_file() and not (d / "runs").exists() for d in packages)

    # The same command with a relative --output: refused, naming the fix, before anything runs.
    relative = readme_submit_block().replace('"$PWD/runs/eval/final"', "runs/eval/relative")
    subprocess.run(["bash", "-c", relative + small], cwd=submit, env=env, capture_output=True, text=True,
                   timeout=300)
    job = job_by_output(ray_head, "runs/eval/relative")
    assert job["status"] == "FAILED"
    logs = http_json(f"{ray_head.dashboard_url}/api/jobs/{job['submission_id']}/logs")["logs"]
    assert ("error: --output runs/eval/relative: relative path(s) in a `ray job submit` job" in logs
            and '--output "$PWD/runs/eval/relative"' in logs), logs[-2000:]
    assert not (submit / "runs" / "eval" / "relative").exists()


@pytest.mark.cluster
def test_ray_job_submit_smollm2(ray_head, smollm2_hf_dir, tmp_path):
    problems = [Problem("a", "What is 2 + 3? Put the answer in \\boxed{}.", "5", "easy"),
                Problem("b", "What is 10 - 4? Put the answer in \\boxed{}.", "6", "easy")]
    data, out = write_data(tmp_path / "problems.jsonl", problems), tmp_path / "out"
    status, logs = submit_job(ray_head, job_args(smollm2_hf_dir, data, out, "--samples", "2", "--max-tokens", "40",
                                                 "--max-code-executions", "1"))
    assert status == "SUCCEEDED", logs[-3000:]
    records = read_records(out)
    assert len(records) == 4 and {r["problem_id"] for r in records} == {"a", "b"}
    assert all(0 < r["generated_tokens"] + r["inserted_tokens"] <= 40 for r in records)
    assert all(r["finish_reason"] in ("eos", "length") for r in records)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 2 and set(metrics["per_problem"]) == {"a", "b"}
    assert (out / "report.md").exists()


@pytest.fixture
def start_driver(ray_head):
    """Start run.py as its own process so the test can kill it: joining the head (RAY_ADDRESS), or with
    join=False starting its embedded Ray. Whatever is still running at the end of the test is killed by pid,
    an embedded Ray's processes included."""
    procs = []

    def start(args: list[str], log_path: Path, join: bool = True) -> subprocess.Popen:
        env = dict(ray_head.env, RAY_ADDRESS=ray_head.address) if join else dict(ray_head.env)
        with open(log_path, "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "ray_eval/run.py", *args], cwd=REPO, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            leftovers = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            proc.wait(timeout=30)
            for child in leftovers:
                try:
                    child.kill()
                except psutil.Error:
                    pass


def sandbox_actor_pids(root: psutil.Process) -> set[int]:
    pids = set()
    for proc in root.children(recursive=True):
        try:
            if "SandboxActor" in " ".join(proc.cmdline()):
                pids.add(proc.pid)
        except psutil.Error:  # exited (or a zombie) while we looked
            pass
    return pids


def wait_for_records(output: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    path = output / "records.jsonl"
    while not (path.exists() and path.read_bytes().count(b"\n") >= n):
        assert proc.poll() is None, f"driver exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"fewer than {n} records after {timeout} s"
        time.sleep(0.2)


@pytest.mark.cluster
def test_killed_driver_resumes_without_loss_or_duplicates(start_driver, tir_tiny_dir, tmp_path):
    data, out, log = write_data(tmp_path / "problems.jsonl"), tmp_path / "out", tmp_path / "driver.log"
    args = job_args(tir_tiny_dir, data, out, "--samples", "4", "--max-tokens", "64", "--max-in-flight", "1")
    first = start_driver(args, log)
    wait_for_records(out, 3, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    before = (out / "records.jsonl").read_text().splitlines(keepends=True)
    assert 3 <= len(before) < 12, "the driver was not killed mid-run"

    second = start_driver(args, log)
    assert second.wait(timeout=300) == 0, log.read_text()[-3000:]
    after = (out / "records.jsonl").read_text().splitlines(keepends=True)
    assert after[: len(before)] == before  # nothing rewritten
    keys = [(json.loads(line)["problem_id"], json.loads(line)["sample_index"]) for line in after]
    assert len(keys) == len(set(keys)) == 12
    attempts = [json.loads(line)["attempt"] for line in after]
    assert attempts == [1] * len(before) + [2] * (12 - len(before))  # no finished sample generated again
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["attempts"]) == 2 and manifest["attempts"][1]["resumed_samples"] == len(before)
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 4


@pytest.mark.cluster
def test_killed_sandbox_actor_is_replaced(start_driver, tir_tiny_dir, tmp_path):
    """An embedded run (no RAY_ADDRESS): the driver starts its own Ray; its only sandbox actor is killed."""
    data, out, log = write_data(tmp_path / "problems.jsonl"), tmp_path / "out", tmp_path / "driver.log"
    args = job_args(tir_tiny_dir, data, out, "--samples", "4", "--max-tokens", "64", "--max-in-flight", "1",
                    "--sandbox-actors", "1", "--embedded-cpus", "2")
    driver = start_driver(args, log, join=False)
    wait_for_records(out, 2, driver)
    actors = sandbox_actor_pids(psutil.Process(driver.pid))
    assert len(actors) == 1, actors
    killed = actors.pop()
    os.kill(killed, signal.SIGKILL)
    done_at_kill = (out / "records.jsonl").read_bytes().count(b"\n")
    deadline = time.monotonic() + 120
    while not sandbox_actor_pids(psutil.Process(driver.pid)) - {killed}:
        assert driver.poll() is None and time.monotonic() < deadline, "no replacement sandbox actor started"
        time.sleep(0.2)

    assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
    records = read_records(out)
    assert len(records) == 12 and done_at_kill < 12
    # samples finished after the kill still ran their code, on the replacement actor
    later = records[done_at_kill:]
    assert all(r["code_rounds"] >= 1 and r["exec_errors"] == 0 for r in later)
    assert all("```output\n" in r["text"] for r in later)
    sandbox = json.loads((out / "metrics.json").read_text())["run"]["sandbox"]
    assert sandbox["executions"] >= len(later)
    assert "| majority@4 |" in (out / "report.md").read_text()


def test_openai_backend_against_a_local_completions_server(tir_sampler, sandbox_executor):
    """The OpenAI-compatible adapter + the TIR loop in text mode. The server (the tiny model behind
    /v1/completions) behaves like OpenAI's: the matched stop string is cut from the text, finish_reason is
    "stop" for both a stop string and eos, and there is no stop_reason."""
    import http.server
    import threading

    from mathtir.eval.samplers.openai import OpenAISampler

    requests_seen, replies = [], []

    class Completions(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests_seen.append(body)
            ids = tir_sampler.tokenizer.encode(body["prompt"], add_special_tokens=True)
            gen = asyncio.run(tir_sampler.generate(GenerationRequest(
                prompt_ids=ids, prompt_text="", max_new_tokens=body["max_tokens"], stop=tuple(body.get("stop", ())),
                temperature=body["temperature"], top_p=body["top_p"], seed=body["seed"])))
            text = gen.text
            for stop in body.get("stop", ()):
                if gen.finish_reason == "stop" and text.endswith(stop):
                    text = text[: -len(stop)]
            reply = {"choices": [{"text": text, "finish_reason": "length" if gen.finish_reason == "length"
                                  else "stop"}], "usage": {"completion_tokens": gen.num_tokens}}
            replies.append(reply)
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Completions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sampler = OpenAISampler(f"http://127.0.0.1:{server.server_port}/v1", "tiny", dialect="tir")
        record = asyncio.run(run_sample(
            PROBLEMS[0], 0, sampler=sampler, executor=sandbox_executor, tokenizer=tir_sampler.tokenizer,
            template=get_template("chat", tokenizer=tir_sampler.tokenizer), dialect=get_dialect("tir"),
            output_format=OutputFormat(), config=TIRConfig(max_tokens=200, temperature=0.0)))
    finally:
        server.shutdown()
        server.server_close()
    assert record.text == memorized_response("print(6*7)", "42", "")
    assert record.code_rounds == 1 and record.correct and record.finish_reason == "eos"
    output_block = "```output\n42\n```\n"
    assert record.inserted_tokens == len(tir_sampler.tokenizer.encode(output_block, add_special_tokens=False))
    assert len(requests_seen) == 2 and requests_seen[1]["prompt"].endswith(output_block)
    # the second round's budget = 200 - (round-1 tokens, as the server counted them) - the inserted block
    assert requests_seen[1]["max_tokens"] == 200 - replies[0]["usage"]["completion_tokens"] - record.inserted_tokens
