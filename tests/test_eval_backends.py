"""Evaluation backends against real parts: an OpenAI-compatible server (`transformers serve`, started here on
127.0.0.1 with local models), the HF sampler's continuous batching and prefix reuse, batched sampling, replica
placement in placement groups on a real Ray (a custom resource stands in for GPUs), and the wall clock."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from mathtir.eval.problems import Problem
from mathtir.eval.samplers import GenerationRequest

REPO = Path(__file__).resolve().parent.parent

SERVE = Path(sys.executable).with_name("transformers")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def openai_server(tmp_path_factory):
    """`transformers serve` on 127.0.0.1 (models loaded on demand by path); yields (base_url, log path)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: on a shared CPU more spin-wait
    with open(log, "w") as out:
        proc = subprocess.Popen([str(SERVE), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                                 "--log-level", "info"], stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"transformers serve did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(1)
        yield base + "/v1", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(autouse=True)
def server_log_on_failure(request):
    """The server answers a failure with a bare "500 Internal Server Error": a failed test prints the end of its
    log, where the cause is."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "openai_server" in request.fixturenames:
        _, log = request.getfixturevalue("openai_server")
        print(f"--- end of {log}:\n{log.read_text(errors='replace')[-4000:]}")


class Recording:
    """Passes requests to a real sampler and keeps them (to read the conversation a chat backend was sent)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.uses_token_ids = sampler.uses_token_ids
        self.chat = sampler.chat
        self.requests: list[GenerationRequest] = []

    async def generate(self, request):
        self.requests.append(request)
        return await self.sampler.generate(request)


# -- OpenAI-compatible: a real server ----------------------------------------------------------------------

def test_chat_mode_code_block_ends_the_turn_and_its_output_is_the_next_user_message(openai_server,
                                                                                   smollm2_hf_dir):
    from mathtir.eval.execution import PoolExecutor
    from mathtir.eval.samplers.openai import OpenAISampler
    from mathtir.eval.tir import TIRConfig, run_sample
    from mathtir.formats import OutputFormat, get_dialect, get_template
    from mathtir.sandbox import SandboxPool

    base, _ = openai_server
    sampler = Recording(OpenAISampler(base, str(smollm2_hf_dir), mode="chat", tokenizer_dir=str(smollm2_hf_dir)))
    dialect = get_dialect("tir")
    problem = Problem("p", "Compute 12*34 by running this Python code block:\n```python\nprint(12*34)\n```\n"
                           "Then give the final answer in \\boxed{}.", "408", "arith")
    with SandboxPool(workers=1) as pool:
        record = asyncio.run(run_sample(
            problem, 0, sampler=sampler, executor=PoolExecutor(pool, timeout=10), tokenizer=None,
            template=get_template("chatml", system="You are a helpful assistant."), dialect=dialect,
            output_format=OutputFormat(), config=TIRConfig(max_tokens=160, max_code_executions=1,
                                                           temperature=0.0)))
    assert record.code_rounds == 1, record.text
    first, second = sampler.requests[0].messages, sampler.requests[1].messages
    assert first == [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": problem.problem}]
    assistant, output = second[2], second[3]
    # the code block ended the assistant's turn (its closing fence kept), the output came back as the user's
    # message in the dialect's fences, and the transcript is exactly those turns in order
    assert assistant["role"] == "assistant" and assistant["content"].endswith(dialect.stop_strings[0])
    assert output["role"] == "user" and output["content"].lstrip("\n").startswith(dialect.output_open)
    assert "408" in output["content"]
    assert second[:2] == first and len(second) == 4
    assert record.text.startswith(assistant["content"] + output["content"])
    assert sampler.sampler.stats()["requests"] == 2 and sampler.sampler.stats()["generated_tokens"] > 0


def test_openai_sampler_holds_hundreds_of_requests_in_flight(openai_server, tiny_llama_dir):
    from mathtir.eval.samplers.openai import OpenAISampler

    base, log = openai_server
    sampler = OpenAISampler(base, str(tiny_llama_dir), max_in_flight=256)

    async def go():
        requests = [GenerationRequest(prompt_ids=[], prompt_text=f"{i} apples and", max_new_tokens=2, stop=(),
                                      temperature=0.7, top_p=0.95, seed=i) for i in range(300)]
        return await asyncio.gather(*(sampler.generate(r) for r in requests))

    start = log.stat().st_size
    generations = asyncio.run(go())
    assert len(generations) == 300 and all(g.num_tokens == 2 for g in generations)
    stats = sampler.stats()
    assert stats["peak_in_flight"] == 256 and stats["requests"] == 300 and stats["generated_tokens"] == 600
    # the server's own count: requests it received and had not answered yet, from its log
    assert server_peak_in_flight(log, start) >= 200


def server_peak_in_flight(log: Path, offset: int) -> int:
    with open(log) as f:
        f.seek(offset)
        text = f.read()
    held = peak = 0
    for line in text.splitlines():
        if "[Request received]" in line:
            held += 1
            peak = max(peak, held)
        elif re.search(r'"POST /v1/(chat/)?completions HTTP/1\.1" \d+', line):
            held -= 1
    return peak


class FaultInjectingProxy(http.server.ThreadingHTTPServer):
    """Forwards to the real server, answering the first requests with 429 / 503 first (the API's rate limit)."""

    def __init__(self, upstream: str, faults: list[tuple[int, str | None]]):
        self.upstream = upstream
        self.faults = list(faults)
        self.lock = threading.Lock()
        self.seen_keys: list[str | None] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (the http.server API)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.seen_keys.append(self.headers.get("Authorization"))
            fault = self.server.faults.pop(0) if self.server.faults else None
        if fault:
            status, retry_after = fault
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        req = urllib.request.Request(self.server.upstream + self.path.removeprefix("/v1"), data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=300) as resp:
            data = resp.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_retries_429_and_5xx_honouring_retry_after_with_the_key_from_the_environment(
        openai_server, tiny_llama_dir, monkeypatch):
    from mathtir.eval.samplers.openai import OpenAISampler

    base, _ = openai_server
    proxy = FaultInjectingProxy(base, [(429, "2"), (503, None), (429, "1")])
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("MATHTIR_TEST_KEY", "sk-test-123")
    try:
        sampler = OpenAISampler(f"http://127.0.0.1:{proxy.server_address[1]}/v1", str(tiny_llama_dir),
                                api_key_env="MATHTIR_TEST_KEY", max_backoff_s=5, price_input_per_mtok=3.0,
                                price_output_per_mtok=15.0)
        request = GenerationRequest(prompt_ids=[], prompt_text="one two", max_new_tokens=3, stop=(),
                                    temperature=0.7, top_p=0.95, seed=1)
        started = time.monotonic()
        generation = asyncio.run(sampler.generate(request))
        elapsed = time.monotonic() - started
    finally:
        proxy.shutdown()
    stats = sampler.stats()
    assert generation.num_tokens == 3 and stats["retries"] == 3
    assert elapsed >= 3.0  # the two Retry-After waits (2 s + 1 s) were honoured
    assert proxy.seen_keys == ["Bearer sk-test-123"] * 4
    assert stats["cost_usd"] == pytest.approx((stats["prompt_tokens"] * 3.0 + 3 * 15.0) / 1e6)


def test_openai_job_in_completions_and_chat_mode_writes_reports_with_the_wall_clock(openai_server, tiny_llama_dir,
                                                                                     tmp_path):
    base, _ = openai_server
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} + {i}?",
                                        "expected_answer": str(2 * i), "category": "add"}) + "\n" for i in range(2)))
    for mode in ("completions", "chat"):
        out = tmp_path / mode
        # Its own process, as users run it: the embedded Ray's loopback and token settings are made before
        # Ray is imported, which this test process did long ago.
        proc = subprocess.run(
            [sys.executable, "ray_eval/run.py", "--backend", "openai", "--api-base", base, "--api-model",
             str(tiny_llama_dir), "--api-mode", mode, "--model", str(tiny_llama_dir), "--prompt-template", "chatml",
             "--data", str(data), "--output", str(out), "--samples", "2", "--max-tokens", "12", "--embedded-cpus",
             "2", "--sandbox-actors", "1", "--no-progress", "--price-output-per-mtok", "10"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")})
        assert proc.returncode == 0, proc.stderr[-4000:]
        run = json.loads((out / "metrics.json").read_text())["run"]
        replica = run["sampler"]["replicas"][0]
        records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        tokens = sum(r["generated_tokens"] for r in records)
        assert replica["mode"] == mode and replica["requests"] == 4 and replica["generated_tokens"] == tokens > 0
        assert replica["cost_usd"] == pytest.approx(tokens * 10 / 1e6)
        clock = run["wall_clock"]
        parts = sum(clock[k] for k in ("setup", "generation", "execution", "queueing", "finishing"))
        assert parts == pytest.approx(clock["wall_s"], abs=0.01) and clock["generation"] > 0
        assert run["throughput"]["backend"] == "openai" and run["throughput"]["generated_tokens_per_s"] > 0
        report = (out / "report.md").read_text()
        assert "## Wall clock" in report and "| **wall** |" in report


# -- HF: continuous batching, prefix reuse, batched sampling ------------------------------------------------

def _request(ids, seed=0, n=8, stop=(), temperature=0.0):
    return GenerationRequest(prompt_ids=list(ids), prompt_text="", max_new_tokens=n, stop=stop,
                             temperature=temperature, top_p=0.9, seed=seed)


def test_hf_request_arriving_mid_batch_joins_it_and_finishes_first(tiny_llama_dir):
    """A trajectory back from the sandbox must not wait for the running batch to end (static batching did)."""
    from mathtir.eval.samplers.hf import HFSampler

    sampler = HFSampler(tiny_llama_dir, max_batch_size=8, num_threads=1)
    finished: list[str] = []

    async def tagged(name, request):
        generation = await sampler.generate(request)
        finished.append(name)
        return generation

    async def go():
        long_task = asyncio.ensure_future(tagged("long", _request(range(10, 20), n=150)))
        while sampler.stats()["generated_tokens"] < 5:  # the long row is decoding
            await asyncio.sleep(0.01)
        short = await tagged("short", _request([5, 6, 7], n=3))
        return short, await long_task

    short, long_ = asyncio.run(go())
    assert finished == ["short", "long"]
    assert short.num_tokens == 3 and (long_.num_tokens == 150 or long_.finish_reason == "eos")
    assert sampler.stats()["batches"] == 1 and sampler.stats()["peak_rows"] == 2


def test_hf_stopped_trajectory_keeps_its_kv_and_the_next_round_prefills_only_the_new_ids(tiny_llama_dir):
    from mathtir.eval.samplers.hf import HFSampler

    sampler = HFSampler(tiny_llama_dir, max_batch_size=8, num_threads=1)
    fresh = HFSampler(tiny_llama_dir, max_batch_size=8, num_threads=1, prefix_cache_mb=0)
    prompt = list(range(100, 140))
    probe = asyncio.run(sampler.generate(_request(prompt, n=6)))
    # stop at the 4th greedy token's text: the round ends there, as at a closing code fence
    stop = sampler.tokenizer.decode(probe.token_ids[3:4])
    if not stop.strip() or stop in sampler.tokenizer.decode(probe.token_ids[:3]):
        pytest.skip("the tiny model's 4th greedy token does not make a usable stop string")
    first = asyncio.run(sampler.generate(_request(prompt, n=20, stop=(stop,))))
    assert first.finish_reason == "stop"
    before = sampler.stats()["prefilled_tokens"]
    output_ids = [7, 8, 9, 10, 11]  # the inserted code output
    second_prompt = prompt + first.token_ids + output_ids
    second = asyncio.run(sampler.generate(_request(second_prompt, n=10)))
    stats = sampler.stats()
    assert stats["prefix_cache"]["hits"] == 1
    # only the last sampled id (never fed through the model) and the output block were prefilled
    assert stats["prefilled_tokens"] - before == 1 + len(output_ids)
    assert second.token_ids == asyncio.run(fresh.generate(_request(second_prompt, n=10))).token_ids


def test_hf_decode_steps_write_the_kv_in_place_and_draw_plain_greedy_tokens(tiny_llama_dir):
    """A decode step writes its KV column into the batch cache's spare columns: the cache stays where it is
    (transformers' DynamicCache concatenated, a copy of the whole cache per step and layer), and the greedy tokens
    are model.generate's."""
    from mathtir.eval.samplers.hf import HFSampler

    sampler = HFSampler(tiny_llama_dir, max_batch_size=8, num_threads=1)
    storages = []
    forward = sampler.model.forward

    def recording(**kw):
        out = forward(**kw)
        if kw["input_ids"].shape[1] == 1:  # a decode step, on the batch cache
            storages.append([layer.keys.untyped_storage().data_ptr() for layer in kw[sampler.cache_key].layers])
        return out

    sampler.model.forward = recording
    prompt = list(range(100, 110))
    generation = asyncio.run(sampler.generate(_request(prompt, n=40)))
    del sampler.model.forward
    reference = sampler.model.generate(torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt))),
                                       max_new_tokens=40, do_sample=False)[0, len(prompt):].tolist()
    assert len(storages) == len(generation.token_ids) - 1 >= 20  # the row decoded long enough to tell
    assert all(step == storages[0] for step in storages)
    assert generation.token_ids == reference[:len(generation.token_ids)]


def test_hf_sampler_passes_the_cache_under_the_name_the_installed_transformers_takes(tiny_llama_dir, recwarn):
    """transformers 5 renamed `past_key_values` to `cache` and warns that the old name goes in 5.40; 4.x (the
    serving images) knows only the old one. The sampler uses whichever the model's forward declares."""
    import inspect

    from mathtir.eval.samplers.hf import HFSampler

    sampler = HFSampler(tiny_llama_dir, max_batch_size=8, num_threads=1)
    assert sampler.cache_key in inspect.signature(sampler.model.forward).parameters
    generation = asyncio.run(sampler.generate(_request(list(range(100, 110)), n=8)))
    assert generation.num_tokens > 1  # decode steps ran on the cache
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def test_hf_prompts_arriving_together_are_prefilled_once_each_in_one_forward(tiny_llama_dir):
    """A problem's samples share their prompt: it is computed once, whatever the number of samples."""
    from mathtir.eval.samplers.hf import HFSampler

    sampler = HFSampler(tiny_llama_dir, max_batch_size=8, num_threads=1)
    forwards = []
    forward = sampler.model.forward
    sampler.model.forward = lambda **kw: forwards.append(tuple(kw["input_ids"].shape)) or forward(**kw)
    first, second = list(range(100, 140)), list(range(200, 230))

    async def go():
        return await asyncio.gather(*[sampler.generate(_request(first, seed=s, n=4, temperature=1.0)) for s in range(4)],
                                    sampler.generate(_request(second, n=4)))

    generations = asyncio.run(go())
    stats = sampler.stats()
    assert [g.num_tokens for g in generations] == [4] * 5 or any(g.finish_reason == "eos" for g in generations)
    assert stats["prefilled_tokens"] == len(first) + len(second) and stats["shared_prompt_rows"] == 3
    assert forwards[0] == (2, len(first))  # both prompts in one left-padded forward, then decode steps
    assert all(shape[1] == 1 for shape in forwards[1:]) and stats["rows"] == 5


def test_batched_top_p_samples_only_the_nucleus_with_per_row_seeds():
    from mathtir.eval.samplers.hf import sample_rows

    vocab = 5000
    logits = torch.full((2, vocab), -30.0)
    logits[:, :4] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))  # nucleus at top_p 0.9: tokens 0, 1, 2
    flat = torch.zeros(1, vocab)  # a nucleus far wider than the candidate window: the full-sort path
    counts = torch.zeros(vocab)
    for seed in range(600):
        gens = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 10_000)]
        tokens = sample_rows(logits, torch.tensor([1.0, 1.0]), torch.tensor([0.9, 0.9]), gens)
        counts.index_add_(0, tokens, torch.ones(2))
    assert counts[3:].sum() == 0  # never outside the nucleus
    share = counts[:3] / counts.sum()  # renormalised nucleus: 0.5/0.95, 0.3/0.95, 0.15/0.95
    assert torch.allclose(share, torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.05)
    wide = {int(sample_rows(flat, torch.tensor([1.0]), torch.tensor([0.99]), [torch.Generator().manual_seed(s)])[0])
            for s in range(200)}
    assert max(wide) > 300  # tokens beyond the first candidates are reachable
    again = [sample_rows(logits, torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.9]),
                         [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]).tolist()
             for _ in range(2)]
    assert again[0] == again[1] and again[0][1] == 0  # the same seeds, the same draws; temperature 0 is argmax


# -- vLLM replica placement (Ray, custom resources standing in for GPUs) ------------------------------------

# Run in its own process: Ray's in-process node threads must not outlive the test in a pytest worker that later
# forks (a fork inherits their held locks).
TWO_NODE_PLACEMENT = """
import contextlib
from collections import Counter

import ray
from ray.cluster_utils import Cluster

from mathtir.eval.actors import place_sampler_replicas


@contextlib.contextmanager
def refused():
    try:
        yield
    except TimeoutError as e:
        assert "could not be placed" in str(e)
    else:
        raise AssertionError("placed")


node = {"num_cpus": 1, "resources": {"standin_gpu": 2}, "node_ip_address": "127.0.0.1",
        "include_dashboard": False, "object_store_memory": 80 * 1024 * 1024}
cluster = Cluster(initialize_head=True, head_node_args=node)
try:
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)

    @ray.remote
    def tp_worker():  # what vLLM's Ray executor starts per GPU of the engine's placement group
        context = ray.get_runtime_context()
        return context.get_placement_group_id(), context.get_node_id()

    @ray.remote
    class Engine:
        def start(self, tp):
            context = ray.get_runtime_context()
            workers = [tp_worker.options(num_cpus=0, resources={"standin_gpu": 1}).remote() for _ in range(tp)]
            ready, _ = ray.wait(workers, num_returns=tp, timeout=120)
            return context.get_placement_group_id(), context.get_node_id(), ray.get(ready)

        def where(self):
            context = ray.get_runtime_context()
            return context.get_node_id(), context.get_assigned_resources().get("standin_gpu", 0)

    placements = place_sampler_replicas(ray, replicas=2, gpus_per_replica=2, cpus_per_replica=0.25,
                                        tensor_parallel=True, gpu_resource="standin_gpu", timeout_s=300)
    engines = [Engine.options(**p).remote() for p in placements]
    started = ray.get([e.start.remote(2) for e in engines], timeout=600)
    assert len({group for group, _, _ in started}) == 2  # one placement group per replica
    assert len({engine_node for _, engine_node, _ in started}) == 2  # one replica per node
    for group, engine_node, workers in started:
        # both TP workers got a GPU of their engine's own group, on the engine's node: the engine holds none
        assert workers == [(group, engine_node)] * 2
    with refused():  # all four are held: no overcommit
        place_sampler_replicas(ray, replicas=1, gpus_per_replica=1, cpus_per_replica=0.25,
                               tensor_parallel=True, gpu_resource="standin_gpu", timeout_s=5)
    for engine, placement in zip(engines, placements, strict=True):  # every GPU free again
        ray.kill(engine)
        ray.util.remove_placement_group(placement["scheduling_strategy"].placement_group)
    with refused():  # four free, but no node has three
        place_sampler_replicas(ray, replicas=1, gpus_per_replica=3, cpus_per_replica=0.25,
                               tensor_parallel=True, gpu_resource="standin_gpu", timeout_s=5)
    placements = place_sampler_replicas(ray, replicas=4, gpus_per_replica=1, cpus_per_replica=0.25,
                                        tensor_parallel=False, gpu_resource="standin_gpu", timeout_s=300)
    where = ray.get([Engine.options(**p).remote().where.remote() for p in placements], timeout=600)
    assert sorted(Counter(n for n, _ in where).values()) == [2, 2]
    assert [gpus for _, gpus in where] == [1, 1, 1, 1]  # each actor holds its own GPU
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_replicas_spread_over_nodes_with_each_tensor_parallel_group_on_one_node():
    """Two Ray nodes on this machine with two stand-in GPUs each: TP=2 replicas land one per node, their engine
    workers inside their own group on that node; a TP=3 replica cannot be placed although four GPUs are free in
    all (a group never spans nodes); TP=1 replicas claim their GPU themselves and fill both nodes."""
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the embedded Ray's switch: the driver connects over loopback, where
    # both nodes listen, instead of resolving 127.0.0.1 to the host's address
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": str(REPO)}
    for _attempt in range(2):
        run = subprocess.run([sys.executable, "-c", TWO_NODE_PLACEMENT], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=600)
        # Ray waits a fixed 30 s for a new node's raylet to register; on an overloaded machine it can take longer
        if run.returncode == 0 or "timed out during startup" not in run.stderr:
            break
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]


# -- the wall clock -----------------------------------------------------------------------------------------

def test_wall_clock_parts_add_up_and_count_shared_time_once():
    from mathtir.eval.timeline import TimedExecutor, TimedSampler, WallClock

    class Sleeper:  # real waits, as a sampler and an executor would
        uses_token_ids = False

        async def generate(self, request):
            await asyncio.sleep(0.3)

        async def run(self, code, history):
            await asyncio.sleep(0.2)

    clock = WallClock()
    time.sleep(0.1)
    clock.start_sampling()
    sampler, executor = TimedSampler(Sleeper(), clock), TimedExecutor(Sleeper(), clock)

    async def trajectory():
        await sampler.generate(None)
        await executor.run("", [])

    async def go():
        await asyncio.gather(*(trajectory() for _ in range(20)))  # 20 overlapping trajectories
        await asyncio.sleep(0.1)

    asyncio.run(go())
    clock.end_sampling()
    parts = clock.breakdown()
    assert sum(parts[k] for k in ("setup", "generation", "execution", "queueing", "finishing")) == \
        pytest.approx(parts["wall_s"], abs=0.005)
    assert parts["generation"] == pytest.approx(0.3, abs=0.1)  # not 20 x 0.3
    assert parts["execution"] == pytest.approx(0.2, abs=0.1)
    assert parts["queueing"] == pytest.approx(0.1, abs=0.08) and parts["setup"] >= 0.1
