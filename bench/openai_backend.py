"""OpenAI backend vs the server driven directly: requests held in flight and throughput, one run.

    .venv/bin/python bench/openai_backend.py [--model DIR] [--requests 256] [--max-tokens 4]

Starts `transformers serve` on 127.0.0.1 (one torch thread), then sends the same --requests completions twice,
the phases alternating --repeats times (and which goes first), the fastest run of each counting:
1. direct: all at once from a bare httpx.AsyncClient, no limit (the server's throughput when driven directly);
2. sampler: through OpenAISampler.generate with --max-in-flight (what the evaluation job does).
The server's own count of requests in flight is read from its log (received and not yet answered). Prints
requests/s and generated tokens/s of both, the ratio sampler / direct (target >= 0.9) and the server's peak in
flight under the sampler (target >= 200). Default model: the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mathtir.eval.samplers import GenerationRequest  # noqa: E402
from mathtir.eval.samplers.openai import OpenAISampler  # noqa: E402


def default_model() -> Path:
    from mathtir.models.smollm2 import materialize

    cache = Path(os.environ.get("MATHTIR_CACHE", Path.home() / ".cache" / "mathtir"))
    return materialize(cache / "smollm2-135m-instruct")


def start_server(model: Path, log: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = Path(sys.executable).with_name("transformers")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(serve), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                                 "--log-level", "info", str(model)], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=5).read()
            return proc, base + "/v1"
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"transformers serve did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(1)


def server_peak_in_flight(log: Path, offset: int) -> int:
    with open(log) as f:
        f.seek(offset)
        text = f.read()
    held = peak = 0
    for line in text.splitlines():
        if "[Request received]" in line:
            held += 1
            peak = max(peak, held)
        elif re.search(r'"POST /v1/completions HTTP/1\.1" \d+', line):
            held -= 1
    return peak


def prompts(n: int) -> list[str]:
    return [f"Question {i}: what is {i} + {i}? Answer:" for i in range(n)]


async def direct(base: str, model: str, texts: list[str], max_tokens: int) -> tuple[float, int]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=3600) as client:
        async def one(i, text):
            r = await client.post(base + "/completions", json={
                "model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.95,
                "seed": i})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
        return time.perf_counter() - started, sum(tokens)


async def through_sampler(sampler: OpenAISampler, texts: list[str], max_tokens: int) -> tuple[float, int]:
    requests = [GenerationRequest(prompt_ids=[], prompt_text=t, max_new_tokens=max_tokens, stop=(),
                                  temperature=0.7, top_p=0.95, seed=i) for i, t in enumerate(texts)]
    started = time.perf_counter()
    generations = await asyncio.gather(*(sampler.generate(r) for r in requests))
    wall = time.perf_counter() - started
    await sampler.aclose()
    return wall, sum(g.num_tokens for g in generations)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each phase; the fastest counts")
    args = p.parse_args()

    model = args.model or default_model()
    texts = prompts(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        proc, base = start_server(model, log)
        try:
            asyncio.run(direct(base, str(model), texts[:2], 2))  # warm-up
            sampler = OpenAISampler(base, str(model), max_in_flight=args.max_in_flight)
            runs: dict[str, list[tuple[float, int, int]]] = {"direct": [], "sampler": []}
            for repeat in range(args.repeats):
                # the order alternates too, so that neither phase always meets the server after the other
                for name in (("direct", "sampler") if repeat % 2 == 0 else ("sampler", "direct")):
                    offset = log.stat().st_size
                    if name == "direct":
                        wall, tokens = asyncio.run(direct(base, str(model), texts, args.max_tokens))
                    else:
                        wall, tokens = asyncio.run(through_sampler(sampler, texts, args.max_tokens))
                    time.sleep(1)  # the server's access log lines of the last answers
                    runs[name].append((wall, tokens, server_peak_in_flight(log, offset)))
                    print(f"repeat {repeat + 1}: {name} {wall:.1f} s", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    print(f"model: {model}  ({args.requests} completions x <= {args.max_tokens} tokens, sampler max in flight "
          f"{args.max_in_flight}, transformers serve on 127.0.0.1)")
    print(f"{'phase':<10}{'wall s':>9}{'requests/s':>12}{'tokens/s':>10}{'server peak in flight':>23}")
    rates = {}
    for name, results in runs.items():
        wall, tokens, peak = min(results)
        rates[name] = args.requests / wall
        print(f"{name:<10}{wall:>9.2f}{rates[name]:>12.2f}{tokens / wall:>10.1f}{peak:>23}")
    ratio = rates["sampler"] / rates["direct"]
    peak = min(runs["sampler"])[2]
    print(f"sampler peak in flight (client): {sampler.stats()['peak_in_flight']}")
    print(f"ratio sampler / direct requests/s: {ratio:.3f}  (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")
    print(f"server peak in flight under the sampler: {peak}  (target >= 200: {'met' if peak >= 200 else 'NOT met'})")


if __name__ == "__main__":
    main()
