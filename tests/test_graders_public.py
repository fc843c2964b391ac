"""mathtir.answers against the public graders' own test cases (tests/fixtures/graders, see its README.md).

Each equivalence case is (pred, gold, the source's verdict); where that verdict breaks one of our documented rules
the fixture carries an explicit override with its reason. Every case runs; per source mathtir must agree with
the verdicts on at least 99% of the cases, and extraction must agree on all of them. The agreement of
math-verify on the same cases is computed alongside, as a reference (`python bench/answers.py` prints the
table).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from mathtir.answers import extract_answer, is_equivalent

FIXTURES = Path(__file__).parent / "fixtures" / "graders"
EQUIVALENCE_SOURCES = ["hendrycks-math", "lighteval", "math-verify", "nemo-skills"]
EXTRACTION_SOURCES = ["nemo-skills-extraction"]
AGREEMENT_TARGET = 0.99
_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed")


def load_cases(source: str) -> list[dict]:
    with open(FIXTURES / f"{source}.jsonl", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def expected_verdict(case: dict) -> bool:
    return case["override"]["expected"] if "override" in case else case["expected"]


def math_verify_verdict(pred: str, gold: str) -> bool:
    """math-verify as users call it: `verify(parse(gold), parse(pred))`, bare answers wrapped in `$...$`
    (without delimiters it parses nothing)."""
    from math_verify import parse, verify

    def wrapped(text: str) -> str:
        return text if _DELIMITED.search(text) else f"${text}$"

    try:
        return bool(verify(parse(wrapped(gold)), parse(wrapped(pred))))
    except Exception:
        return False


def agreement(cases: list[dict], check) -> tuple[float, list[dict]]:
    """(fraction of cases where `check(pred, gold)` gives the expected verdict, the cases where it does not)."""
    disagreements = [case for case in cases if check(case["pred"], case["gold"]) != expected_verdict(case)]
    return 1 - len(disagreements) / len(cases), disagreements


def no_answer_as_none(answer: str | None) -> str | None:
    return answer or None  # an empty box is no answer: NeMo-Skills records "", mathtir None


def extraction_agreement(cases: list[dict]) -> tuple[float, list[dict]]:
    misses = [
        case for case in cases
        if no_answer_as_none(extract_answer(case["response"]))
        != no_answer_as_none(case.get("override", {}).get("expected_answer", case["expected_answer"]))
    ]
    return 1 - len(misses) / len(cases), misses


def agreement_table() -> list[tuple[str, int, int, float, float | None]]:
    """(source, cases, overridden verdicts, mathtir agreement, math-verify agreement) per source, both against
    the verdicts after overrides; extraction has no math-verify column (math-verify does not extract a single
    answer string)."""
    logging.disable(logging.WARNING)  # math-verify logs every string it cannot parse
    try:
        rows = []
        for source in EQUIVALENCE_SOURCES:
            cases = load_cases(source)
            overrides = sum("override" in case for case in cases)
            rows.append((source, len(cases), overrides, agreement(cases, is_equivalent)[0],
                         agreement(cases, math_verify_verdict)[0]))
        for source in EXTRACTION_SOURCES:
            cases = load_cases(source)
            overrides = sum("override" in case for case in cases)
            rows.append((source, len(cases), overrides, extraction_agreement(cases)[0], None))
        return rows
    finally:
        logging.disable(logging.NOTSET)


def markdown_table(rows: list[tuple[str, int, int, float, float | None]]) -> str:
    lines = [
        "| source | cases | overridden verdicts | mathtir agreement | math-verify agreement |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for source, count, overrides, ours, theirs in rows:
        theirs_text = "n/a" if theirs is None else f"{theirs:.1%}"
        lines.append(f"| {source} | {count} | {overrides} | {ours:.1%} | {theirs_text} |")
    return "\n".join(lines)


@pytest.mark.parametrize("source", EQUIVALENCE_SOURCES)
def test_mathtir_agrees_with_the_public_verdicts(source):
    cases = load_cases(source)
    rate, disagreements = agreement(cases, is_equivalent)
    print(f"{source}: {len(cases)} cases, mathtir agrees on {rate:.1%}")
    listed = "\n".join(
        f"  {case['file']}:{case['line']} pred={case['pred'][:80]!r} gold={case['gold'][:80]!r} "
        f"expected={expected_verdict(case)}" for case in disagreements
    )
    assert rate >= AGREEMENT_TARGET, f"{source}: {rate:.1%} < {AGREEMENT_TARGET:.0%}; disagreements:\n{listed}"


@pytest.mark.parametrize("source", EXTRACTION_SOURCES)
def test_extraction_agrees_with_the_public_answers(source):
    rate, misses = extraction_agreement(load_cases(source))
    assert rate == 1.0, [(case["file"], case["line"], case["expected_answer"]) for case in misses]


def test_every_override_has_a_documented_reason():
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    for source in EQUIVALENCE_SOURCES + EXTRACTION_SOURCES:
        for case in load_cases(source):
            if "override" in case:
                assert f"`{case['override']['reason']}`" in readme, case


def test_math_verify_agreement_is_computed_on_the_same_cases():
    """The reference column: math-verify runs on every case (its verdicts are not asserted, only counted)."""
    pytest.importorskip("math_verify")
    table = agreement_table()
    print("\n" + markdown_table(table))
    assert [row[0] for row in table] == EQUIVALENCE_SOURCES + EXTRACTION_SOURCES
    assert all(0.0 <= row[4] <= 1.0 for row in table if row[4] is not None)
