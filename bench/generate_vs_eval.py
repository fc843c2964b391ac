"""Generation against evaluation on the same workload: one machinery, so the same samples/s.

    python bench/generate_vs_eval.py [--model DIR] [--problems 8] [--samples 4] [--max-tokens 256] [--rounds 2]

Runs `mathtir eval run` and `mathtir generate` alternately (each with its own embedded Ray, the HF backend, the
same problems, seeds and budget) and prints, per job, samples/s over the sampling phase (Ray and model start-up
excluded, as both jobs report it) and the share of generation's wall time spent selecting and writing
solutions. Targets: generation / evaluation samples/s >= 0.95; selecting and writing <= 5% of the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path(os.environ.get("MATHTIR_CACHE", Path.home() / ".cache" / "mathtir")) / "smollm2-135m-instruct"


def write_problems(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            a, b = 37 + 13 * i, 1000 + 7 * i * i
            f.write(json.dumps({"id": f"q{i}", "problem": f"Compute {a} * {b} using Python, then give the answer in "
                                "\\boxed{}.", "expected_answer": str(a * b), "category": "arith"}) + "\n")


def run(command: list[str], output: Path, common: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mathtir", *command, *common, "--output", str(output)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    if command[0] == "eval":
        return json.loads((output / "metrics.json").read_text())["run"]
    return json.loads((output / "summary.json").read_text())["run"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each job; the fastest is kept")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mathtir-gen-vs-eval-"))
    data = work / "problems.jsonl"
    write_problems(data, args.problems)
    common = ["--model", args.model, "--data", str(data), "--samples", str(args.samples), "--max-tokens",
              str(args.max_tokens), "--max-code-executions", "2", "--prompt-template", "chatml", "--seed", "0",
              "--sandbox-workers", "1", "--no-progress", "--embedded-cpus", "2"]
    best = {"eval": None, "generate": None}
    for round_index in range(args.rounds):
        for job, command in (("eval", ["eval", "run"]), ("generate", ["generate"])):
            stats = run(command, work / f"{job}{round_index}", common)
            if best[job] is None or stats["samples_per_s"] > best[job]["samples_per_s"]:
                best[job] = stats
            print(f"round {round_index} {job:>8}: {stats['samples_per_s']} samples/s, wall {stats['wall_s']} s",
                  flush=True)
    ratio = best["generate"]["samples_per_s"] / best["eval"]["samples_per_s"]
    sealing = best["generate"]["sealing_s"] / best["generate"]["wall_s"]
    print(f"generation / evaluation samples/s: {ratio:.3f} (target >= 0.95)")
    print(f"selecting and writing solutions: {best['generate']['sealing_s']} s of {best['generate']['wall_s']} s "
          f"wall = {sealing:.2%} (target <= 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
