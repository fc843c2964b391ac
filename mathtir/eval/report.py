"""metrics.json (mathtir.eval.metrics.score_problems + run statistics), report.md with tables, and PNG plots."""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

from mathtir.eval.metrics import JudgedSample, score_problems
from mathtir.eval.problems import Problem
from mathtir.eval.records import SampleRecord
from mathtir.files import atomic_write_text

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
NO_CATEGORY = "(no category)"
# Fonts that draw Japanese category names (中1, 数学I・A); without one the bars are labelled C1, C2, ...
CJK_FONTS = ("Noto Sans CJK JP", "Noto Sans JP", "IPAexGothic", "IPAGothic", "TakaoGothic", "VL Gothic",
             "Source Han Sans JP", "Hiragino Sans", "Yu Gothic", "MS Gothic")


def sample_statistics(records: list[SampleRecord]) -> dict:
    """What the TIR loop did, summed over samples: code rounds, timeouts, tokens, time, finish reasons."""
    n = len(records)

    def mean(values):
        values = list(values)
        return round(sum(values) / len(values), 4) if values else None

    return {
        "samples": n,
        "mean_code_rounds": mean(r.code_rounds for r in records),
        "samples_with_code": sum(r.code_rounds > 0 for r in records),
        "executions": sum(r.code_rounds for r in records),
        "timeouts": sum(r.timeouts for r in records),
        "exec_errors": sum(r.exec_errors for r in records),
        "mean_generated_tokens": mean(r.generated_tokens for r in records),
        "mean_inserted_tokens": mean(r.inserted_tokens for r in records),
        "mean_response_tokens": mean(r.generated_tokens + r.inserted_tokens for r in records),
        "generation_s": round(sum(r.generation_s for r in records), 2),
        "execution_s": round(sum(r.execution_s for r in records), 2),
        "finish_reasons": dict(Counter(r.finish_reason for r in records)),
        "answer_sources": {source: sum(r.answer_source == source for r in records) / n if n else 0.0
                           for source in ("boxed", "fallback", "none")},
        "samples_by_attempt": {str(k): v for k, v in sorted(Counter(r.attempt for r in records).items())},
    }


def write_results(output: Path, problems: list[Problem], records: list[SampleRecord], *, args,
                  run_stats: dict) -> dict:
    by_problem: dict[str, list[SampleRecord]] = {}
    for record in records:
        by_problem.setdefault(record.problem_id, []).append(record)
    samples = {pid: [JudgedSample(r.answer, r.correct) for r in sorted(rs, key=lambda r: r.sample_index)]
               for pid, rs in by_problem.items()}
    # Per-category figures when the data has categories; a problem without one is listed as such there.
    categories = ({p.id: p.category or NO_CATEGORY for p in problems}
                  if any(p.category is not None for p in problems) else None)
    metrics = score_problems(samples, [p.id for p in problems], categories, seed=args.seed)
    metrics["run"] = {**run_stats, **sample_statistics(records)}
    metrics["curves"] = accuracy_curves(by_problem, [p.id for p in problems], max_tokens=args.max_tokens,
                                        max_code_executions=args.max_code_executions, seed=args.seed)
    atomic_write_text(output / METRICS_FILE, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    plots = write_plots(output / PLOTS_DIR, metrics)
    atomic_write_text(output / REPORT_FILE, render_report(metrics, args=args, plots=[p.relative_to(output) for p in plots]))
    return metrics


# Token budgets the curve is read at, as fractions of the run's --max-tokens.
BUDGET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1)


def accuracy_curves(by_problem: dict[str, list[SampleRecord]], problem_ids: list[str], *, max_tokens: int,
                    max_code_executions: int, seed: int) -> dict:
    """Accuracy at smaller settings, read off the recorded trajectories without sampling again.

    At a token budget B a sample whose response (generated + inserted tokens) exceeds B counts as no answer: a
    run at B would have cut it before it finished. At N code executions a sample that executed more than N
    blocks counts as no answer. Each point is majority@n and pass@n over the same samples, so the last points
    are the run's own figures. (A run at the smaller limit differs only where the model would have written
    something else once told fewer executions remain: the notice, or the last round without stop strings.)"""
    def at(keep) -> dict:
        samples = {pid: [JudgedSample(r.answer, r.correct) if keep(r) else JudgedSample(None, False)
                         for r in sorted(rs, key=lambda r: r.sample_index)] for pid, rs in by_problem.items()}
        metrics = score_problems(samples, problem_ids, None, seed=seed)
        n = str(metrics["num_samples"])
        kept = sum(keep(r) for rs in by_problem.values() for r in rs)
        return {"majority": metrics["majority@k"][n], "pass": metrics["pass@k"][n],
                "samples_within": kept / sum(len(rs) for rs in by_problem.values())}

    budgets = sorted({max(1, round(max_tokens * f)) for f in BUDGET_FRACTIONS})
    return {
        "token_budget": [{"max_tokens": b, **at(lambda r, b=b: r.generated_tokens + r.inserted_tokens <= b)}
                         for b in budgets],
        "code_executions": [{"max_code_executions": n, **at(lambda r, n=n: r.code_rounds <= n)}
                            for n in range(max_code_executions + 1)],
    }


def percent_ci(summary: dict) -> str:
    """An accuracy summary as "61.3% [52.0, 70.1]" (the 95% interval in brackets)."""
    low, high = summary["ci95"]
    return f"{100 * summary['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def render_report(metrics: dict, *, args, plots: list[Path]) -> str:
    n = metrics["num_samples"]
    run = metrics["run"]
    lines = [
        "# Evaluation report",
        "",
        f"- model: `{args.model or args.api_model}` (backend {args.backend}, template {args.prompt_template}, "
        f"dialect {args.dialect})",
        f"- data: `{args.data}` — {metrics['num_problems']} problems × {n} samples",
        f"- budget: {args.max_tokens} tokens (generated + inserted), ≤ {args.max_code_executions} code "
        f"executions, temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}",
        "",
        "## Accuracy (95% bootstrap CI over problems)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| majority@{n} | {percent_ci(metrics['majority@k'][str(n)])} |",
        f"| pass@1 (mean over samples) | {percent_ci(metrics['pass@1_mean'])} |",
        f"| pass@{n} | {percent_ci(metrics['pass@k'][str(n)])} |",
        f"| no-answer rate (samples) | {100 * metrics['no_answer_rate']:.1f}% |",
        f"| no-answer rate (majority@{n}) | {100 * metrics['majority_no_answer_rate']:.1f}% |",
        "",
        "## Accuracy vs k",
        "",
        "| k | majority@k | pass@k |",
        "|---|---|---|",
    ]
    for k in range(1, n + 1):
        lines.append(f"| {k} | {percent_ci(metrics['majority@k'][str(k)])} | {percent_ci(metrics['pass@k'][str(k)])} |")
    curves = metrics.get("curves")
    if curves:
        for key, setting, title in (("token_budget", "max_tokens", "token budget"),
                                    ("code_executions", "max_code_executions", "code executions")):
            lines += ["", f"## Accuracy vs {title} (from the recorded trajectories, no re-sampling)", "",
                      f"A sample that needed more than the {title} counts as no answer.", "",
                      f"| {setting} | majority@{n} | pass@{n} | samples within |", "|---|---|---|---|"]
            lines += [f"| {p[setting]} | {percent_ci(p['majority'])} | {percent_ci(p['pass'])} | "
                      f"{100 * p['samples_within']:.1f}% |" for p in curves[key]]
    if metrics.get("per_category"):
        labels = category_labels(list(metrics["per_category"]))
        lines += ["", "## Per category", "",
                  f"| category | plot label | problems | majority@{n} | pass@1 | no answer |",
                  "|---|---|---|---|---|---|"]
        for (name, c), label in zip(metrics["per_category"].items(), labels, strict=True):
            lines.append(f"| {name} | {label} | {c['num_problems']} | {percent_ci(c[f'majority@{n}'])} | "
                         f"{percent_ci(c['pass@1_mean'])} | {100 * c['no_answer_rate']:.1f}% |")
    lines += ["", "## Run", "", "| statistic | value |", "|---|---|"]
    for key in ("samples", "samples_with_code", "mean_code_rounds", "executions", "timeouts", "exec_errors",
                "mean_generated_tokens", "mean_inserted_tokens", "mean_response_tokens", "generation_s",
                "execution_s", "finish_reasons", "answer_sources", "samples_by_attempt", "wall_s", "sampling_s", "samples_per_s"):
        value = run.get(key)
        lines.append(f"| {key} | {json.dumps(value) if isinstance(value, dict) else value} |")
    lines += wall_clock_section(run)
    if metrics.get("unsampled_problems"):
        lines += ["", f"Problems without samples: {', '.join(metrics['unsampled_problems'])}"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.as_posix()})" for p in plots]
    lines += ["", "Definitions: " + "; ".join(f"**{k}**: {v}" for k, v in metrics["definitions"].items()), ""]
    return "\n".join(lines)


def wall_clock_section(run: dict) -> list[str]:
    """This attempt's wall time in parts that add up to it (mathtir.eval.timeline), and its throughput."""
    clock = run.get("wall_clock")
    if not clock:
        return []
    wall = clock["wall_s"]
    lines = ["", "## Wall clock (this attempt)", "",
             "Consecutive intervals by what was in progress: generation = a generation request out; execution = "
             "code running and no generation out (a stall); queueing = neither. The parts sum to the wall time; "
             "the run table's generation_s and execution_s instead sum every sample's own waits, shared time "
             "counted once per sample.", "", "| part | seconds | share |", "|---|---:|---:|"]
    for part in ("setup", "generation", "execution", "queueing", "finishing"):
        lines.append(f"| {part} | {clock[part]:.2f} | {100 * clock[part] / wall if wall else 0:.1f}% |")
    lines.append(f"| **wall** | {wall:.2f} | 100.0% |")
    throughput = run.get("throughput") or {}
    if throughput.get("samples_per_s") is not None:
        lines += ["", f"Throughput ({throughput['backend']} backend, over the sampling phase): "
                      f"{throughput['samples_per_s']} samples/s, {throughput['generated_tokens_per_s']} generated "
                      "tokens/s."]
    return lines


@functools.cache
def _cjk_font() -> str | None:
    from matplotlib import font_manager

    manager = font_manager.fontManager
    found = next((name for name in CJK_FONTS if name in {f.name for f in manager.ttflist}), None)
    if found is None:
        # matplotlib caches its font list once per version: a font installed later (quickstart.sh installs
        # one) stays unknown to it until added, and the plots would fall back to C1, C2, ...
        known = {f.fname for f in manager.ttflist}
        for path in font_manager.findSystemFonts():
            if path not in known:
                try:
                    manager.addfont(path)
                except (OSError, RuntimeError, ValueError):  # a file FreeType cannot read: not a font for us
                    continue
        found = next((name for name in CJK_FONTS if name in {f.name for f in manager.ttflist}), None)
    return found


def category_labels(names: list[str]) -> list[str]:
    """Tick labels for the category plot: the names when a font can draw them, else C1, C2, ..."""
    if all(name.isascii() for name in names) or _cjk_font():
        return list(names)
    return [f"C{i + 1}" for i in range(len(names))]


def write_plots(directory: Path, metrics: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = _cjk_font()
    if font:
        matplotlib.rcParams["font.family"] = [font, "DejaVu Sans"]

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    ks = list(range(1, metrics["num_samples"] + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("majority@k", "majority@k"), ("pass@k", "pass@k")):
        acc = [metrics[key][str(k)]["accuracy"] for k in ks]
        low = [metrics[key][str(k)]["ci95"][0] for k in ks]
        high = [metrics[key][str(k)]["ci95"][1] for k in ks]
        ax.plot(ks, acc, marker="o", label=label)
        ax.fill_between(ks, low, high, alpha=0.2)
    ax.set(xlabel="k (samples)", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy vs k (95% CI)")
    ax.set_xticks(ks)
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(directory / "accuracy_vs_k.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    n = metrics["num_samples"]
    for key, setting, label in (("token_budget", "max_tokens", "token budget (generated + inserted tokens)"),
                                ("code_executions", "max_code_executions", "code executions allowed")):
        points = (metrics.get("curves") or {}).get(key)
        if not points:
            continue
        xs = [p[setting] for p in points]
        fig, ax = plt.subplots(figsize=(6, 4))
        for curve, name in (("majority", f"majority@{n}"), ("pass", f"pass@{n}")):
            ax.plot(xs, [p[curve]["accuracy"] for p in points], marker="o", label=name)
            ax.fill_between(xs, [p[curve]["ci95"][0] for p in points], [p[curve]["ci95"][1] for p in points],
                            alpha=0.2)
        ax.set(xlabel=label, ylabel="accuracy", ylim=(0, 1.02), title=f"Accuracy vs {label.split(' (')[0]} (95% CI)")
        if key == "code_executions":
            ax.set_xticks(xs)
        ax.legend()
        ax.grid(alpha=0.3)
        paths.append(directory / f"accuracy_vs_{key}.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    categories = metrics.get("per_category") or {}
    if categories:
        names = list(categories)
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 4))
        width = 0.4
        for offset, key, label in ((-width / 2, f"majority@{n}", f"majority@{n}"),
                                   (width / 2, "pass@1_mean", "pass@1")):
            acc = [categories[c][key]["accuracy"] for c in names]
            err = [[a - categories[c][key]["ci95"][0] for a, c in zip(acc, names, strict=True)],
                   [categories[c][key]["ci95"][1] - a for a, c in zip(acc, names, strict=True)]]
            ax.bar([i + offset for i in range(len(names))], acc, width, yerr=err, capsize=3, label=label)
        ax.set_xticks(range(len(names)), category_labels(names), rotation=20)
        ax.set(ylabel="accuracy", ylim=(0, 1.05), title="Per-category accuracy (95% CI)")
        ax.legend()
        paths.append(directory / "category_accuracy.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
