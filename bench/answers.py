"""Checks per second: mathtir.answers.is_equivalent against raw math-verify, same pairs, one run.

    PYTHONPATH=. python bench/answers.py [--pairs 600] [--seed 0]

Pairs are generated in the competition's answer styles (integers, Japanese units, full-width digits,
fractions and decimals, LaTeX polynomials, roots, factored forms, sets, pairs), half equivalent, half not,
every string distinct so that no cache helps either side across pairs. Raw math-verify is called as users call
it: `verify(parse("$gold$"), parse("$pred$"))` (bare LaTeX without `$` does not parse at all), in the main
thread with its default signal timeouts. is_equivalent runs with its caches cleared first. The two alternate
pair by pair. Rates are printed for all pairs, for the pairs is_equivalent settles without math-verify
(numbers, units, pairs of numbers) and for those where both run math-verify. Target: a ratio of at least 0.8
on all pairs. The accuracy of both against the pairs' labels is printed too.

Then the same on the public graders' own test cases (tests/fixtures/graders): the agreement table of
docs/grading.md (per source: cases, mathtir agreement, math-verify agreement) and checks per second of both on
those cases, interleaved the same way, caches cleared. Target there: a ratio of at least 1.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Callable


def make_pairs(count: int, seed: int) -> list[tuple[str, str, bool, str]]:
    """(pred, gold, equivalent, style) in the styles of Japanese competition answers."""
    rng = random.Random(seed)
    full_width = str.maketrans("0123456789", "０１２３４５６７８９")

    def integer(i):
        a = 1000 + i
        return (str(a), str(a), True) if i % 2 else (str(a + 7), str(a), False)

    def unit(i):
        a, unit_name = 2000 + i, rng.choice(["個", "台", "円", "人", "通り", "cm", "本"])
        return (f"{a}{unit_name}", str(a), True) if i % 2 else (f"{a + 1}{unit_name}", str(a), False)

    def wide(i):
        a = 3000 + i
        return (str(a).translate(full_width), str(a), True) if i % 2 else (str(a + 2).translate(full_width), str(a), False)

    def fraction(i):
        q = rng.choice([2, 4, 5, 8, 10, 16, 20, 25])
        p = 4000 + i
        decimal = f"{p / q:.10g}"
        if i % 2:
            return (decimal, f"\\frac{{{p}}}{{{q}}}", True)
        return (f"{(p + 1) / q:.10g}", f"\\frac{{{p}}}{{{q}}}", False)

    def linear(i):
        a, b, c = 2 * i + 3, i + 5, rng.choice([2, 3, 4, 5, 7])
        gold = f"\\frac{{{a}x+{b}}}{{{c}}}"
        if i % 2:
            return (f"\\frac{{{a}}}{{{c}}}x+\\frac{{{b}}}{{{c}}}", gold, True)
        return (f"\\frac{{{a}}}{{{c}}}x+\\frac{{{b + 1}}}{{{c}}}", gold, False)

    def root(i):
        k, m = 2 + i % 7, rng.choice([2, 3, 5, 6, 7]) + 10 * (i // 7)
        gold = f"{k}\\sqrt{{{m}}}"
        return (f"\\sqrt{{{k * k * m}}}", gold, True) if i % 2 else (f"\\sqrt{{{k * k * m + 1}}}", gold, False)

    def factored(i):
        a, b = i + 1, i + 2
        gold = f"(x+{a})(x+{b})"
        if i % 2:
            return (f"(x+{b})(x+{a})", gold, True)
        return (f"(x+{a})(x+{b + 1})", gold, False)

    def polynomial(i):
        a, b = i + 1, 2 * i + 1
        gold = f"x^{{2}}+{a}x+{b}"
        return (f"{b}+{a}x+x^2", gold, True) if i % 2 else (f"x^2+{a}x+{b + 1}", gold, False)

    def solution_set(i):
        a, b = i + 1, -(i + 3)
        gold = f"x={a}, {b}"
        return (f"{b}, {a}", gold, True) if i % 2 else (f"{b}, {a + 1}", gold, False)

    def point(i):
        a, b = i + 2, -(i + 1)
        gold = f"({a}, {b})"
        return (f"\\left({a}, {b}\\right)", gold, True) if i % 2 else (f"({b}, {a})", gold, False)

    styles: list[Callable[[int], tuple[str, str, bool]]] = [
        integer, unit, wide, fraction, linear, root, factored, polynomial, solution_set, point,
    ]
    pairs = []
    for n in range(count):
        style = styles[n % len(styles)]
        pairs.append((*style(n // len(styles)), style.__name__))
    return pairs


# Styles whose answers are plain numbers once normalized: is_equivalent settles them without math-verify.
NUMERIC_STYLES = {"integer", "unit", "wide", "fraction", "point"}


def timed_interleaved(first: Callable[[str, str], bool], second: Callable[[str, str], bool], pairs):
    """(seconds, verdict) per pair for each check. The two checks alternate pair by pair (and which goes first),
    so that a shared, noisy machine slows both alike."""
    results: tuple[list, list] = ([], [])
    for index, (pred, gold, _, _) in enumerate(pairs):
        order = (0, 1) if index % 2 else (1, 0)
        for which in order:
            check = (first, second)[which]
            start = time.perf_counter()
            verdict = check(pred, gold)
            results[which].append((time.perf_counter() - start, verdict))
    return results


def summarize(results, pairs, keep: Callable[[str], bool]) -> tuple[float, float]:
    """(checks per second, accuracy against the labels) over the pairs whose style passes `keep`."""
    chosen = [(r, p) for r, p in zip(results, pairs, strict=True) if keep(p[3])]
    seconds = sum(r[0] for r, _ in chosen)
    accuracy = sum(r[1] == p[2] for r, p in chosen) / len(chosen)
    return len(chosen) / seconds, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # math-verify logs every unparsable string

    from math_verify import parse, verify

    from mathtir import answers

    def raw_math_verify(pred: str, gold: str) -> bool:
        return verify(parse(f"${gold}$"), parse(f"${pred}$"))

    warmup = make_pairs(40, args.seed + 1)
    for check in (raw_math_verify, answers.is_equivalent):
        for pred, gold, _, _ in warmup:
            check(f"{pred} ", gold)  # distinct strings from the timed ones: imports and grammars, not caches

    pairs = make_pairs(args.pairs, args.seed)
    answers._parsed.cache_clear()
    answers._normalize.cache_clear()
    ours, raw = timed_interleaved(answers.is_equivalent, raw_math_verify, pairs)

    print(f"pairs: {len(pairs)} (half equivalent), one pass each, caches cleared")
    subsets = [
        ("all pairs", lambda style: True),
        ("numbers (no math-verify needed)", lambda style: style in NUMERIC_STYLES),
        ("symbolic (both use math-verify)", lambda style: style not in NUMERIC_STYLES),
    ]
    for title, keep in subsets:
        raw_rate, raw_accuracy = summarize(raw, pairs, keep)
        our_rate, our_accuracy = summarize(ours, pairs, keep)
        print(f"{title}:")
        print(f"  raw math-verify      : {raw_rate:8.1f} checks/s   accuracy vs labels {raw_accuracy:.1%}")
        print(f"  answers.is_equivalent: {our_rate:8.1f} checks/s   accuracy vs labels {our_accuracy:.1%}")
        print(f"  ratio: {our_rate / raw_rate:.2f}x")
    total_ratio = summarize(ours, pairs, subsets[0][1])[0] / summarize(raw, pairs, subsets[0][1])[0]
    print(f"ratio is_equivalent / raw math-verify, all pairs: {total_ratio:.2f}x (target >= 0.8x)")
    public_cases(answers)


def public_cases(answers) -> None:
    """Agreement with the public graders' verdicts, and speed on their cases."""
    from tests.test_graders_public import (
        EQUIVALENCE_SOURCES,
        agreement_table,
        load_cases,
        markdown_table,
        math_verify_verdict,
    )

    print("\npublic graders' test cases (tests/fixtures/graders):")
    print(markdown_table(agreement_table()))
    logging.disable(logging.WARNING)  # agreement_table restores logging when done
    cases = [(c["pred"], c["gold"], None, source) for source in EQUIVALENCE_SOURCES for c in load_cases(source)]
    answers._parsed.cache_clear()
    answers._normalize.cache_clear()
    ours, raw = timed_interleaved(answers.is_equivalent, math_verify_verdict, cases)
    our_rate = len(cases) / sum(seconds for seconds, _ in ours)
    raw_rate = len(cases) / sum(seconds for seconds, _ in raw)
    print(f"{len(cases)} cases, one pass each, caches cleared:")
    print(f"  math-verify ($-wrapped): {raw_rate:8.1f} checks/s")
    print(f"  answers.is_equivalent  : {our_rate:8.1f} checks/s")
    print(f"ratio is_equivalent / math-verify, public cases: {our_rate / raw_rate:.2f}x (target >= 1x)")


if __name__ == "__main__":
    main()
