"""The generation driver's own cost, by simulation: an instant sampler and executor stand in for the model and
the sandbox, everything else is the real job (records, sharding, sealing, grading, filtering, the report).

    python bench/generate_driver.py [--samples-total 1000000] [--sizes 100000,1000000]

For each size it runs `mathtir generate` in its own process pinned to one core (taskset) and prints
bookkeeping samples/s and the driver's peak RSS; memory should stay flat as the run grows (problems and records
leave memory when their shard is sealed). Targets (issue: generation at scale): >= 5,000 samples/s on one core, peak RSS
<= 1 GB at 1M samples and no growth with the run's size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES_PER_PROBLEM = 8


def child(data: str, output: str, shard_problems: int) -> None:
    """Runs in the pinned process: the real generation job with stand-ins for sampling and execution."""
    sys.path.insert(0, str(REPO))
    from mathtir.eval import generation
    from mathtir.eval.samplers import Generation
    from mathtir.formats import get_template
    from mathtir.sandbox import ExecResult

    prompt_start = len(get_template("llmjp").prefix)  # the template the job below is given

    class InstantSampler:
        """Writes one code block, then answers: correctly for 5 of 8 sample seeds, so every drop path runs."""

        uses_token_ids = False
        chat = False

        async def generate(self, request):
            # "What is A + B?": the problem starts the prompt after the template's prefix
            problem = request.prompt_text[prompt_start:request.prompt_text.index("?", prompt_start)]
            if request.stop:
                text = f"Let me add them.\n```python\nprint({problem[8:]})\n```\n"
                return Generation([], text, len(text) // 4, "stop")
            a, _, b = problem[8:].partition(" + ")
            answer = int(a) + int(b) + (request.seed % 8 >= 5)
            text = f"The sum is \\boxed{{{answer}}}."
            return Generation([], text, len(text) // 4, "eos")

        def stats(self):
            return {}

    class InstantExecutor:
        async def run(self, code, history):  # what the code prints does not decide the verdict: the box does
            return ExecResult(status="ok", stdout="the sum\n")

        def stats(self):
            return {}

    args = generation.build_parser().parse_args([
        "--data", data, "--output", output, "--samples", str(SAMPLES_PER_PROBLEM), "--max-code-executions", "1",
        "--max-tokens", "256", "--prompt-template", "llmjp", "--max-in-flight", "256",
        "--shard-problems", str(shard_problems), "--backend", "openai", "--api-model", "instant", "--no-progress",
        "--max-kept", "4"])
    generation.run(args, start_sampling=lambda a: (InstantSampler(), InstantExecutor(), lambda: None))
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)


def write_problems(path: Path, problems: int) -> None:
    with open(path, "w") as f:
        for i in range(problems):
            a, b = i % 997, i // 997
            f.write(json.dumps({"id": f"q{i}", "problem": f"What is {a} + {b}?", "expected_answer": str(a + b),
                                "category": f"c{i % 5}"}) + "\n")


def measure(samples_total: int, shard_problems: int, workdir: Path) -> dict:
    problems = samples_total // SAMPLES_PER_PROBLEM
    data, output = workdir / f"problems_{problems}.jsonl", workdir / f"out_{problems}"
    write_problems(data, problems)
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", str(data), str(output), str(shard_problems)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    summary = json.loads((output / "summary.json").read_text())
    rss_kb = int(proc.stdout.split("PEAK_RSS_KB")[1].split()[0])
    run = summary["run"]
    return {"samples": summary["samples"], "kept": summary["kept"], "wall_s": round(wall, 1),
            "samples_per_s": run["samples_per_s"], "sealing_share": round(run["sealing_s"] / run["wall_s"], 4),
            "peak_rss_mb": round(rss_kb / 1024, 1),
            "records_files": len(list((output / "records").iterdir()))}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="total samples of each run, comma-separated")
    p.add_argument("--shard-problems", type=int, default=1000)
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed afterwards")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mathtir-gen-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = [measure(int(size), args.shard_problems, workdir) for size in args.sizes.split(",")]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'samples':>9} {'kept':>8} {'wall s':>8} {'samples/s':>10} {'sealing':>8} {'peak RSS MB':>12} "
          f"{'record files':>13}")
    for r in results:
        print(f"{r['samples']:>9} {r['kept']:>8} {r['wall_s']:>8} {r['samples_per_s']:>10} "
              f"{r['sealing_share']:>8.2%} {r['peak_rss_mb']:>12} {r['records_files']:>13}")
    first, last = results[0], results[-1]
    print(f"bookkeeping samples/s on one core: {last['samples_per_s']} (target >= 5000: "
          f"{last['samples_per_s'] / 5000:.2f}x)")
    print(f"peak RSS {last['samples']} vs {first['samples']} samples: {last['peak_rss_mb'] / first['peak_rss_mb']:.2f}x "
          f"(target: flat, <= 1024 MB at 1M)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
