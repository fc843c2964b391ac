"""Evaluation metrics over judged samples: majority@k (answers pooled by equivalence class), unbiased pass@k,
pass@1 with its seed spread, no-answer rates, per-category accuracy, 95% bootstrap intervals over problems, and
the paired comparison of two runs (bootstrap difference + exact McNemar test).

Each sample's correctness is decided once, by the TIR loop when the sample is generated (mathtir.eval.tir),
stored in its record, and read here; this module never grades an answer against the gold one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mathtir.answers import DEFAULT_TIMEOUT_S, group_answers, top_classes

BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class JudgedSample:
    """A sample as the metrics see it: its extracted answer and its stored verdict."""

    answer: str | None
    correct: bool




def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # The product form avoids huge binomials: C(n-c, k) / C(n, k) = prod_{i=n-c+1..n} (1 - k / i).
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def bootstrap_ci(values: Sequence[float], *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> list[float]:
    """95% percentile-bootstrap interval of the mean of per-problem values (problems resampled)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def _summary(values: Sequence[float], seed: int) -> dict:
    return {"accuracy": float(np.mean(values)) if len(values) else math.nan, "ci95": bootstrap_ci(values, seed=seed)}


def _majority_at_k(labels: list[int | None], class_correct: list[float], k: int) -> tuple[float, bool]:
    """(correctness, no answer) of majority voting over the first k samples; a tie scores the mean
    correctness of the tied classes."""
    top = top_classes(labels[:k])
    if not top:
        return 0.0, True
    return float(np.mean([class_correct[c] for c in top])), False


def _classes(samples: Sequence[JudgedSample], timeout: float) -> tuple[list[int | None], list[str], list[float]]:
    """Equivalence-class labels of the samples' answers, the classes' representatives, and each class's
    correctness: the stored verdict of the samples that gave its representative."""
    labels, representatives = group_answers([s.answer for s in samples], timeout=timeout)
    verdict_of = {s.answer: s.correct for s in samples if s.answer is not None}
    return labels, representatives, [float(verdict_of[r]) for r in representatives]


METRIC_DEFINITIONS = {
    "majority@k": "majority vote over the first k samples (sample order = seed order, as in NeMo-Skills); "
    "answers pooled by equivalence class; a tie scores the mean correctness of the tied classes; no answer "
    "among the first k scores 0",
    "pass@k": "unbiased estimator 1 - C(n-c,k)/C(n,k) over all n samples of a problem",
    "pass@1_mean": "fraction of correct samples per problem, averaged over problems; seed_std is the standard "
    "deviation of single-seed accuracy across seeds",
    "no_answer_rate": "fraction of samples without an extracted answer",
    "ci95": f"95% percentile bootstrap over problems, {BOOTSTRAP_RESAMPLES} resamples",
}


def score_problems(
    samples: Mapping[str, Sequence[JudgedSample]],
    problem_ids: Sequence[str],
    categories: Mapping[str, str] | None = None,
    seed: int = 0,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict:
    """The metrics.json content for `samples[problem_id] = [JudgedSample per sample, in sample order]`.

    Correctness is the verdict each sample carries (decided once, when it was generated); answers are only
    compared with each other here, to pool equivalent ones for the vote. Every sampled problem must be one of
    `problem_ids` (and have a category when `categories` is given); problems without samples are listed under
    "unsampled_problems", never dropped silently. k runs up to the smallest sample count among problems.
    """
    known = set(problem_ids)
    for problem_id in samples:
        if problem_id not in known:
            raise ValueError(f"score_problems: problem {problem_id!r} has samples but is not a known problem")
        if categories is not None and problem_id not in categories:
            raise ValueError(f"score_problems: problem {problem_id!r} has no category")
        if len(samples[problem_id]) == 0:
            raise ValueError(f"score_problems: problem {problem_id!r} has an empty sample list")
        for index, sample in enumerate(samples[problem_id]):
            if (sample.answer is not None and not isinstance(sample.answer, str)) or not isinstance(sample.correct, bool):
                raise ValueError(
                    f"score_problems: problem {problem_id!r}, sample {index}: answer {sample.answer!r} / verdict "
                    f"{sample.correct!r} is not a string or None / a bool"
                )
            if sample.correct and sample.answer is None:
                raise ValueError(f"score_problems: problem {problem_id!r}, sample {index}: correct without an answer")
    problem_ids_sampled = sorted(samples)
    if not problem_ids_sampled:
        raise ValueError("score_problems: no samples to score")
    max_k = min(len(samples[p]) for p in problem_ids_sampled)

    per_problem: dict[str, dict] = {}
    majority = {k: [] for k in range(1, max_k + 1)}
    passes = {k: [] for k in range(1, max_k + 1)}
    pass1, no_answer, no_answer_majority = [], [], []
    for problem_id in problem_ids_sampled:
        judged = list(samples[problem_id])
        correct = [s.correct for s in judged]
        labels, representatives, class_correct = _classes(judged, timeout)
        for k in majority:
            majority[k].append(_majority_at_k(labels, class_correct, k)[0])
            passes[k].append(pass_at_k(len(judged), sum(correct), k))
        full_score, full_no_answer = _majority_at_k(labels, class_correct, len(judged))
        top = top_classes(labels)
        n_none = sum(s.answer is None for s in judged)
        pass1.append(sum(correct) / len(judged))
        no_answer.append(n_none / len(judged))
        no_answer_majority.append(float(full_no_answer))
        per_problem[problem_id] = {
            "majority": representatives[top[0]] if top else None,
            "majority_correct": full_score,
            "num_correct": sum(correct),
            "num_samples": len(judged),
            "num_no_answer": n_none,
            "correct": correct,
        }

    seed_accuracy = [np.mean([per_problem[p]["correct"][s] for p in problem_ids_sampled]) for s in range(max_k)]
    metrics = {
        "num_problems": len(problem_ids_sampled),
        "num_samples": max_k,
        "majority@k": {str(k): _summary(v, seed) for k, v in majority.items()},
        "pass@k": {str(k): _summary(v, seed) for k, v in passes.items()},
        "pass@1_mean": {**_summary(pass1, seed), "seed_std": float(np.std(seed_accuracy))},
        "no_answer_rate": float(np.mean(no_answer)),
        "majority_no_answer_rate": float(np.mean(no_answer_majority)),
        "unsampled_problems": sorted(known - set(samples)),
        "definitions": METRIC_DEFINITIONS,
    }
    if categories is not None:
        per_category = {}
        for category in sorted({categories[p] for p in problem_ids_sampled}):
            rows = [i for i, p in enumerate(problem_ids_sampled) if categories[p] == category]
            per_category[category] = {
                "num_problems": len(rows),
                f"majority@{max_k}": _summary([majority[max_k][i] for i in rows], seed),
                "pass@1_mean": _summary([pass1[i] for i in rows], seed),
                f"pass@{max_k}": _summary([passes[max_k][i] for i in rows], seed),
                "no_answer_rate": float(np.mean([no_answer[i] for i in rows])),
            }
        metrics["per_category"] = per_category
    metrics["per_problem"] = per_problem
    return metrics


def sign_test_p_value(wins: int, losses: int) -> float:
    """Exact two-sided sign test (= exact McNemar test on the discordant pairs)."""
    trials = wins + losses
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, i) for i in range(min(wins, losses) + 1)) / 2**trials
    return min(1.0, 2 * tail)


def paired_comparison(
    correct_a: Mapping[str, float], correct_b: Mapping[str, float], seed: int = 0
) -> dict:
    """Compare two runs on the same problems (per-problem correctness in [0, 1], e.g. majority_correct).

    difference = accuracy_a - accuracy_b with a paired bootstrap 95% interval; a_better / b_better count the
    problems where one run scored higher (the discordant pairs); p_value is the exact McNemar (sign) test on
    them. A difference whose interval contains 0, or with p >= 0.05, is not evidence that one run is better.
    """
    missing_b = sorted(set(correct_a) - set(correct_b))
    missing_a = sorted(set(correct_b) - set(correct_a))
    if missing_a or missing_b:
        raise ValueError(
            f"paired_comparison needs the same problems in both runs: only in a: {missing_b[:5]}"
            f"{' ...' if len(missing_b) > 5 else ''}, only in b: {missing_a[:5]}{' ...' if len(missing_a) > 5 else ''}"
        )
    problem_ids = sorted(correct_a)
    if not problem_ids:
        raise ValueError("paired_comparison: no problems")
    for name, run in (("a", correct_a), ("b", correct_b)):
        for problem_id in problem_ids:
            value = run[problem_id]
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"paired_comparison: run {name}, problem {problem_id!r}: correctness {value!r} "
                                 "is not a number in [0, 1]")
    a = np.array([float(correct_a[p]) for p in problem_ids])
    b = np.array([float(correct_b[p]) for p in problem_ids])
    difference = a - b
    a_better, b_better = int((difference > 0).sum()), int((difference < 0).sum())
    ci = bootstrap_ci(difference, seed=seed)
    p_value = sign_test_p_value(a_better, b_better)
    significant = p_value < 0.05 and not ci[0] <= 0.0 <= ci[1]
    summary = (
        f"{len(problem_ids)} problems: a {a.mean():.1%} vs b {b.mean():.1%}, difference "
        f"{difference.mean() * 100:+.1f} points (95% CI {ci[0] * 100:+.1f} to {ci[1] * 100:+.1f}); "
        f"a better on {a_better}, b better on {b_better}; exact McNemar p = {p_value:.3g}: "
        f"{'significant' if significant else 'not significant'} at the 5% level"
    )
    return {
        "num_problems": len(problem_ids),
        "accuracy_a": float(a.mean()),
        "accuracy_b": float(b.mean()),
        "difference": float(difference.mean()),
        "difference_ci95": ci,
        "a_better": a_better,
        "b_better": b_better,
        "ties": len(problem_ids) - a_better - b_better,
        "p_value": p_value,
        "significant": significant,
        "summary": summary,
    }
