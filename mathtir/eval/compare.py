"""Compare two evaluation runs on the same problems: a before/after report with a paired test.

    mathtir eval compare RUN_A RUN_B [--out report.md] [--names base,tuned]

Each RUN is an output directory of `mathtir eval run` / `ray_eval/run.py` (its metrics.json). Small test sets make single accuracy
numbers misleading — the second model card's 60.0% vs 56.7% on 30 problems is one problem apart — so beside
each accuracy and its 95% CI this prints the paired comparison on the problems both runs share: the
difference with its bootstrap CI, how many problems each run alone got right, and the exact McNemar p-value.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mathtir.eval.metrics import paired_comparison
from mathtir.eval.report import percent_ci


def _load_metrics(run: Path) -> dict:
    path = run / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (did the evaluation finish?)")
    metrics = json.loads(path.read_text())
    if "per_problem" not in metrics:
        raise ValueError(f"{path}: field 'per_problem' is missing")
    return metrics


def _per_problem(metrics: dict, measure: str) -> dict[str, float]:
    rows = metrics["per_problem"]
    if measure == "majority":
        return {pid: float(row["majority_correct"]) for pid, row in rows.items()}
    return {pid: row["num_correct"] / row["num_samples"] for pid, row in rows.items() if row["num_samples"]}


def compare_runs(run_a: Path, run_b: Path, out: Path, names: tuple[str, str] = ("base", "fine-tuned"),
                 seed: int = 0) -> Path:
    """Write the comparison report to `out` (markdown, plus `out` with .json) and return its path."""
    a, b = _load_metrics(Path(run_a)), _load_metrics(Path(run_b))
    n = a["num_samples"]
    if b["num_samples"] != n:
        raise ValueError(f"runs differ in samples per problem ({n} vs {b['num_samples']}): not comparable")
    shared = sorted(set(a["per_problem"]) & set(b["per_problem"]))
    if not shared:
        raise ValueError(f"{run_a} and {run_b} share no problem ids")
    paired = {
        measure: paired_comparison({p: _per_problem(b, measure)[p] for p in shared},
                                   {p: _per_problem(a, measure)[p] for p in shared}, seed=seed)
        for measure in ("majority", "pass@1")
    }
    result = {"runs": {names[0]: str(run_a), names[1]: str(run_b)}, "problems": len(shared),
              "samples_per_problem": n, "paired": paired}
    lines = [
        f"# {names[1]} vs {names[0]}",
        "",
        f"{len(shared)} problems, {n} samples each. Accuracy with its 95% bootstrap CI over problems.",
        "",
        f"| metric | {names[0]} | {names[1]} |",
        "|---|---|---|",
        f"| majority@{n} | {percent_ci(a['majority@k'][str(n)])} | {percent_ci(b['majority@k'][str(n)])} |",
        f"| pass@1 (mean over samples) | {percent_ci(a['pass@1_mean'])} | {percent_ci(b['pass@1_mean'])} |",
        f"| pass@{n} | {percent_ci(a['pass@k'][str(n)])} | {percent_ci(b['pass@k'][str(n)])} |",
        f"| no answer (samples) | {100 * a['no_answer_rate']:.1f}% | {100 * b['no_answer_rate']:.1f}% |",
        "",
        f"## Paired comparison ({names[1]} minus {names[0]}, same problems)",
        "",
    ]
    for measure, p in paired.items():
        lo, hi = p["difference_ci95"]
        lines.append(
            f"- **{measure}**: {100 * p['difference']:+.1f} points (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}); "
            f"{names[1]} better on {p['a_better']} problems, {names[0]} better on {p['b_better']}, "
            f"{p['ties']} ties; exact McNemar p = {p['p_value']:.3g} — "
            f"{'significant' if p['significant'] else 'not significant'} at the 5% level."
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mathtir eval compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path, help="the reference run (e.g. the base model)")
    parser.add_argument("run_b", type=Path, help="the run compared against it (e.g. the fine-tuned model)")
    parser.add_argument("--out", type=Path, default=Path("comparison.md"))
    parser.add_argument("--names", default="base,fine-tuned", help="two comma-separated labels")
    args = parser.parse_args(argv)
    names = tuple(args.names.split(",", 1))
    if len(names) != 2:
        parser.error("--names needs two comma-separated labels")
    try:
        out = compare_runs(args.run_a, args.run_b, args.out, names)
    except (FileNotFoundError, ValueError) as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    print(out.read_text())
    return 0

