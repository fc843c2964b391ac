"""Which sampled trajectories become training data: the rejection-sampling rules of TIR data generation.

A trajectory is kept only when the grader judged its final answer correct, it finished within the token budget,
every code block ran (unless errors or timeouts are allowed) and it wrote code at all (a TIR set). Then, per
problem: a difficulty filter on the teacher's pass rate, near-identical solutions removed (exact Jaccard
similarity of character shingles, mathtir.similarity), and at most `max_kept` kept, in sample order.
Every trajectory that is not kept gets exactly one reason, counted in the report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mathtir.eval.records import SampleRecord
from mathtir.similarity import char_shingles, jaccard

# In the order they are tested: a trajectory is dropped for the first that applies.
DROP_REASONS = ("over_budget", "sampler_error", "no_answer", "wrong", "code_timeout", "code_error", "no_code",
                "too_hard", "too_easy", "duplicate", "over_limit")


@dataclass(frozen=True)
class KeepRules:
    max_kept: int = 4                # per problem
    require_code: bool = True        # a solution without a code block is chain-of-thought, not TIR
    allow_code_errors: bool = False  # keep solutions in which a block raised (the model recovered)
    allow_timeouts: bool = False
    min_pass_rate: float = 0.0       # problems the teacher solves less often are dropped (too hard)
    max_pass_rate: float = 1.0       # ... more often: dropped (too easy to teach anything)
    near_duplicate: float = 0.9      # Jaccard similarity of shingles at which a solution repeats a kept one
    shingle: int = 5                 # characters per shingle


def trajectory_reason(record: SampleRecord, rules: KeepRules) -> str | None:
    """Why this trajectory cannot be kept on its own merits, or None."""
    if record.finish_reason == "length":
        return "over_budget"
    if record.finish_reason == "error":
        return "sampler_error"
    if record.answer is None:
        return "no_answer"
    if not record.correct:
        return "wrong"
    if record.timeouts and not rules.allow_timeouts:
        return "code_timeout"
    if record.exec_errors and not rules.allow_code_errors:
        return "code_error"
    if rules.require_code and record.code_rounds == 0:
        return "no_code"
    return None


@dataclass
class ProblemSelection:
    problem_id: str
    samples: int
    correct: int
    kept: list[SampleRecord]
    dropped: dict[int, str]  # sample index -> reason

    @property
    def pass_rate(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    def reasons(self) -> Counter[str]:
        return Counter(self.dropped.values())


def select(problem_id: str, records: list[SampleRecord], rules: KeepRules) -> ProblemSelection:
    """The kept trajectories of one problem (all its samples), and a reason for each of the others."""
    records = sorted(records, key=lambda r: r.sample_index)
    correct = sum(r.correct for r in records)
    selection = ProblemSelection(problem_id, len(records), correct, [], {})
    candidates = []
    for record in records:
        reason = trajectory_reason(record, rules)
        if reason:
            selection.dropped[record.sample_index] = reason
        else:
            candidates.append(record)
    rate = selection.pass_rate
    difficulty = "too_hard" if rate < rules.min_pass_rate else "too_easy" if rate > rules.max_pass_rate else None
    kept_shingles: list[set[str]] = []
    kept_texts: set[str] = set()
    for record in candidates:
        if difficulty:
            selection.dropped[record.sample_index] = difficulty
            continue
        if record.text in kept_texts:  # similarity 1: a teacher often writes the very same solution again
            selection.dropped[record.sample_index] = "duplicate"
            continue
        shingles = char_shingles(record.text, rules.shingle)
        if any(jaccard(shingles, other) >= rules.near_duplicate for other in kept_shingles):
            selection.dropped[record.sample_index] = "duplicate"
        elif len(selection.kept) >= rules.max_kept:
            selection.dropped[record.sample_index] = "over_limit"
        else:
            selection.kept.append(record)
            kept_shingles.append(shingles)
            kept_texts.add(record.text)
    return selection
