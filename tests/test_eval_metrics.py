"""mathtir.eval.metrics: majority@k over equivalence classes, unbiased pass@k, bootstrap intervals, the paired
comparison — from samples whose verdicts were decided once, where they were generated."""

from __future__ import annotations

import itertools

import pytest

from mathtir.answers import is_equivalent
from mathtir.eval.metrics import JudgedSample, paired_comparison, pass_at_k, score_problems, sign_test_p_value


def judged(samples: dict[str, list], gold: dict[str, str]) -> dict[str, list[JudgedSample]]:
    """What the TIR loop stores per sample: the answer and its verdict against the gold answer."""
    return {pid: [JudgedSample(a, a is not None and is_equivalent(a, gold[pid])) for a in answers]
            for pid, answers in samples.items()}


def score(samples, gold, categories=None):
    return score_problems(judged(samples, gold), list(gold), categories)




@pytest.mark.parametrize("n,c", [(1, 0), (1, 1), (5, 0), (5, 2), (6, 5), (7, 7)])
def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_correct_sample(n, c):
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="n=3, c=4"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(3, 1, 0)


def test_majority_at_k_uses_the_first_k_samples_and_splits_ties():
    metrics = score({"p": ["5", "3", "3", "5", "五"]}, {"p": "5"})
    majority = {k: v["accuracy"] for k, v in metrics["majority@k"].items()}
    # first 1: 5 | first 2: 5 vs 3 tie | first 3: 3 wins | first 4: tie | all 5: 5 (with 五) wins
    assert majority == {"1": 1.0, "2": 0.5, "3": 0.0, "4": 0.5, "5": 1.0}
    assert metrics["per_problem"]["p"]["num_correct"] == 3
    assert metrics["pass@1_mean"]["accuracy"] == pytest.approx(3 / 5)


def test_score_problems_counts_no_answers_categories_and_unsampled_problems():
    samples = {
        "a": ["1", "1", None, "2"],
        "b": [None, None, None, None],
        "c": ["\\frac{1}{2}", "0.5", "1/3", "1/3"],
        "d": ["12個", "12", "12", "12"],
    }
    gold = {"a": "1", "b": "7", "c": "1/2", "d": "12", "e": "3"}
    categories = {"a": "中1", "b": "中1", "c": "数学I・A", "d": "数学I・A"}
    metrics = score(samples, gold, categories)
    assert metrics["num_problems"] == 4 and metrics["num_samples"] == 4
    assert metrics["unsampled_problems"] == ["e"]
    assert metrics["no_answer_rate"] == pytest.approx(5 / 16)
    assert metrics["majority_no_answer_rate"] == pytest.approx(1 / 4)
    # c: 1/2 class (2 votes) ties 1/3 (2 votes) -> 0.5
    assert metrics["majority@k"]["4"]["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert metrics["pass@k"]["4"]["accuracy"] == pytest.approx(3 / 4)
    assert metrics["per_category"]["中1"]["num_problems"] == 2
    assert metrics["per_category"]["数学I・A"]["majority@4"]["accuracy"] == pytest.approx(0.75)
    for summary in [*metrics["majority@k"].values(), *metrics["pass@k"].values(), metrics["pass@1_mean"]]:
        low, high = summary["ci95"]
        assert 0.0 <= low <= summary["accuracy"] <= high <= 1.0


def test_bootstrap_interval_narrows_with_more_problems():
    def width(copies):
        samples = {f"{i}-{j}": [ans] for j in range(copies) for i, ans in enumerate(["1", "2", "1", "3"])}
        gold = {pid: "1" for pid in samples}
        low, high = score(samples, gold)["majority@k"]["1"]["ci95"]
        return high - low

    assert width(25) < width(1) / 2


def test_score_problems_reports_bad_input_by_problem():
    one = [JudgedSample("1", True)]
    with pytest.raises(ValueError, match="'x' has samples but is not a known problem"):
        score_problems({"x": one}, ["y"])
    with pytest.raises(ValueError, match="'x' has no category"):
        score_problems({"x": one}, ["x"], categories={})
    with pytest.raises(ValueError, match="problem 'x', sample 1"):
        score_problems({"x": [*one, JudgedSample(2, False)]}, ["x"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="problem 'x', sample 0: correct without an answer"):
        score_problems({"x": [JudgedSample(None, True)]}, ["x"])


def test_metrics_read_the_stored_verdicts_and_never_regrade():
    """A verdict is decided once, when the sample is generated: the metrics count what the record says, even
    where a grader run today would disagree (a record written by an older grader stays as it was judged)."""
    samples = {"p": [JudgedSample("42", False), JudgedSample("42", False), JudgedSample("7", True)]}
    metrics = score_problems(samples, ["p"])
    assert metrics["per_problem"]["p"]["correct"] == [False, False, True]
    assert metrics["majority@k"]["3"]["accuracy"] == 0.0  # "42" wins the vote and is stored as wrong
    assert metrics["pass@k"]["3"]["accuracy"] == 1.0


def _card_runs(a_only: int, b_only: int, both: int, n: int = 30):
    """Two runs on n problems: `both` solved by each, plus a_only / b_only solved by one."""
    a, b = {}, {}
    for i in range(n):
        a[f"q{i}"] = float(i < both or both <= i < both + a_only)
        b[f"q{i}"] = float(i < both or both + a_only <= i < both + a_only + b_only)
    return a, b


def test_the_second_cards_headline_is_not_significant():
    # 60.0% (18/30) vs 56.7% (17/30): one problem apart, whatever the overlap.
    for a_only, b_only in [(1, 0), (3, 2), (5, 4)]:
        a, b = _card_runs(a_only, b_only, both=18 - a_only)
        result = paired_comparison(a, b)
        assert result["accuracy_a"] == pytest.approx(0.6) and result["accuracy_b"] == pytest.approx(17 / 30)
        assert result["a_better"] == a_only and result["b_better"] == b_only
        low, high = result["difference_ci95"]
        assert low <= 0 < high
        assert result["p_value"] > 0.5 and not result["significant"]
        assert "not significant" in result["summary"]


def test_a_large_paired_difference_is_significant():
    a, b = _card_runs(a_only=12, b_only=0, both=10)
    result = paired_comparison(a, b)
    assert result["significant"] and result["p_value"] < 0.001 and result["difference_ci95"][0] > 0


def test_sign_test_matches_the_binomial_distribution():
    for wins, losses in [(0, 0), (3, 1), (7, 2), (10, 0)]:
        trials = wins + losses
        outcomes = list(itertools.product([0, 1], repeat=trials))
        extreme = min(wins, losses)
        as_extreme = sum(min(sum(o), trials - sum(o)) <= extreme for o in outcomes) / len(outcomes)
        assert sign_test_p_value(wins, losses) == pytest.approx(min(1.0, as_extreme))


def test_paired_comparison_needs_the_same_problems_and_valid_values():
    with pytest.raises(ValueError, match=r"only in a: \['q2'\]"):
        paired_comparison({"q1": 1.0, "q2": 0.0}, {"q1": 1.0})
    with pytest.raises(ValueError, match="run b, problem 'q1'"):
        paired_comparison({"q1": 1.0}, {"q1": 1.5})


def test_score_problems_feeds_paired_comparison():
    gold = {f"q{i}": str(i) for i in range(10)}
    run_a = score({p: [g, g, "0"] for p, g in gold.items()}, gold)
    run_b = score({p: ["0", "0", g] for p, g in gold.items()}, gold)
    a = {p: v["majority_correct"] for p, v in run_a["per_problem"].items()}
    b = {p: v["majority_correct"] for p, v in run_b["per_problem"].items()}
    result = paired_comparison(a, b)
    assert result["difference"] == pytest.approx(0.9)  # q0's gold is "0": both runs get it
    assert result["a_better"] == 9
