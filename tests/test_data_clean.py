"""Decontamination (mathtir.data.clean.DecontaminationIndex): evaluation problems reformatted, reworded,
translated or answered inside a training text are caught, each hit with its kind and score; templated
problems that only share numbers or structure are not."""

from __future__ import annotations

import multiprocessing
import pickle
import random
import re

import pytest

from mathtir.data.clean import DecontaminationIndex, fingerprint, numeric_form
from mathtir.data.demo import content_key, generate_problems

SHOP = "ある店で、1個250円のりんごを12個と、1本180円のジュースを3本買いました。代金は全部で何円ですか。"
TRIP = "時速48kmで2時間15分走り、さらに時速36kmで1時間45分走りました。走った道のりは全部で何kmですか。"
SAVINGS = "毎月12500円ずつ貯金すると、1年6か月で貯金は全部でいくらになりますか。"
BALLS = "箱に赤い玉が17個と白い玉が5個入っています。そこから玉を8個取り出すと、箱に残る玉は何個ですか。"
EQUATION = "方程式 x² − 37x + 312 ＝ 0 の解をすべて求めよ。"
PRIMES = "素数が無限に多く存在することを証明せよ。"


@pytest.fixture()
def index() -> DecontaminationIndex:
    # ngram and min_overlap as in nemo_configs/data_openmathreasoning.yaml; the rest at their defaults
    index = DecontaminationIndex(ngram=13, min_overlap=0.5)
    for i, problem in enumerate([SHOP, TRIP, SAVINGS, BALLS, EQUATION, PRIMES]):
        index.add("dev.jsonl", f"p{i}", problem)
    return index


def _hit(index: DecontaminationIndex, text: str) -> tuple[str, str] | None:
    hit = index.check(text)
    return None if hit is None else (hit.eval_id, hit.kind)


def test_numbers_are_written_one_way_and_fingerprinted_with_their_operators():
    assert numeric_form("１，２５０円と1,000個と12,500円、1，000人") == "1250円と1000個と12500円、1000人"
    assert numeric_form("三百二十五円、二〇二四年、1万2千人、1.5万円、三十六km、第三問、一つ") == (
        "325円、2024年、12000人、15000円、36km、第3問、1つ")
    # a lone kanji numeral that is part of a word, and malformed numerals, stay as they are
    assert numeric_form("一般に同一の三角形は十分、万一、1,2,3") == "一般に同一の三角形は十分、万一、1,2,3"
    numbers, operators = fingerprint("x² − 37x + 312 ＝ 0、3.50、007")
    assert numbers == {"2": 1, "37": 1, "312": 1, "0": 1, "3.5": 1, "7": 1}
    assert operators == {"^": 1, "-": 1, "+": 1, "=": 1}
    # hyphens, unit slashes and markdown emphasis are not operators; the same signs between operands are
    assert fingerprint("the x-axis, 60 km/h, **note**")[1] == {}
    assert fingerprint("2**10 - a/b * 3")[1] == {"^": 1, "-": 1, "/": 1, "*": 1}


def test_reformatted_problem_is_caught(index):
    # full-width digits, thousands separators, kanji numerals, other spacing and punctuation
    hit = index.check("毎月１２，５００円ずつ 貯金すると、一年六か月で、貯金は 全部で いくらに なりますか？！")
    assert (hit.eval_id, hit.kind, hit.overlap, hit.score) == ("p2", "ngram", 1.0, 1.0)
    hit = index.check("時速４８ｋｍで二時間十五分走り、さらに時速三十六kmで一時間四十五分走りました。走った道のりは？")
    assert (hit.eval_id, hit.kind) == ("p1", "ngram") and hit.overlap >= 0.5


def test_reworded_problem_is_caught(index):
    # words changed and sentences reordered: the numbers and operators are the problem's own
    hit = index.check("りんごは1個250円、ジュースは1本180円で売られています。りんごを12個とジュースを3本買ったとき、"
                      "支払う金額はいくらですか。")
    assert (hit.eval_id, hit.kind, hit.score) == ("p0", "fingerprint", 1.0) and hit.overlap < 0.5
    # small numbers say little on their own: a reworded copy is found by its wording, its numbers in order
    hit = index.check("箱の中に赤い玉が17個と白い玉が5個あります。そこから玉を8個取り出したら、箱に残る玉は何個ですか。")
    assert (hit.eval_id, hit.kind) == ("p3", "near_duplicate") and hit.score >= 0.5 and hit.overlap < 0.5
    # a problem without numbers is found among its peers by LSH
    hit = index.check("素数が無限に多く存在することを示せ。")
    assert (hit.eval_id, hit.kind) == ("p5", "near_duplicate") and hit.score >= 0.5


def test_translated_problem_is_caught_by_its_numbers_and_operators(index):
    assert _hit(index, "At a shop you buy 12 apples at 250 yen each and three bottles of juice at 180 yen a "
                       "bottle. How much do you pay altogether?") == ("p0", "fingerprint")
    assert _hit(index, "Find all solutions of the equation x^2 - 37x + 312 = 0.") == ("p4", "fingerprint")
    # the same numbers without the operators are another problem
    assert index.check("A club had 312 members in 1937; 37 of them left. How many stayed?") is None


def test_answer_only_variant_is_a_hit_when_the_answer_works_with_the_problems_numbers(index):
    # The statement is gone but the worked answer carries all of the problem's distinctive numbers, and they
    # are most of the text's numbers: this is the problem's solution, so it is a hit.
    hit = index.check("買い物の合計金額を求めなさい。解答: 250 × 12 + 180 × 3 = 3540 なので 3540円。")
    assert (hit.eval_id, hit.kind) == ("p0", "fingerprint") and hit.score == 0.75
    # A text that carries the numbers among many others is not (a long text holds many combinations).
    assert index.check("記録: 250, 12, 180, 3, 411, 977, 5321, 86, 1234, 4242 の平均を求めよ。") is None
    # Evaluation answers are not indexed: a text with only the answer is not a hit.
    assert index.check("3540円を5人で分けると1人いくらですか。") is None


def test_unrelated_problems_sharing_small_numbers_or_swapped_numbers_are_not_flagged(index):
    # The same problem with the objects renamed is a hit; one number changed, small numbers in other roles,
    # or a few shared small numbers are other problems.
    assert _hit(index, "袋に青い玉が17個と黄色い玉が5個入っています。そこから玉を8個取り出すと、袋に残る玉は何個ですか。") == (
        "p3", "near_duplicate")
    for text in ["箱に赤い玉が17個と白い玉が6個入っています。そこから玉を8個取り出すと、箱に残る玉は何個ですか。",
                 "箱に赤い玉が5個と白い玉が17個入っています。そこから玉を8個取り出すと、箱に残る玉は何個ですか。",
                 "赤い花が5本、白い花が8本あります。花は全部で何本ですか。",
                 "方程式 x² − 37x + 336 ＝ 0 の解をすべて求めよ。"]:
        hit = index.check(text)
        assert hit is None or hit.kind == "ngram", (text, hit)  # n-grams alone: min_overlap decides


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def test_templated_demo_problems_are_flagged_only_when_they_are_the_same_problem():
    """Demo problems share their template sentences (the demo recipes use 8-grams at overlap 1.0). A training
    problem is the same problem as an evaluation one when it comes from the same template with the same
    numbers in the same places (only names and items differ): only those are flagged, the ones worded closely
    enough."""
    rng = random.Random(0)
    held_out = generate_problems(100, rng, exclude=set())
    index = DecontaminationIndex(ngram=8, min_overlap=1.0)
    for i, p in enumerate(held_out):
        index.add("eval.jsonl", str(i), p.problem)

    def flagged(train):
        hits = 0
        for p in train:
            hit = index.check(p.problem)
            if hit is not None:
                matched = held_out[int(hit.eval_id)]
                assert hit.kind in ("ngram", "near_duplicate") and (matched.category, *_numbers(matched.problem)) == (
                    p.category, *_numbers(p.problem)), (p.problem, matched.problem, hit)
                hits += 1
        return hits

    # Training problems drawn without regard to the held-out ones: the same problems with other names come up.
    assert flagged(generate_problems(1000, random.Random(1), exclude=set())) > 20
    # The demo data excludes held-out problems by template and numbers (content_key): none is left to catch.
    assert flagged(generate_problems(1000, random.Random(1), exclude={content_key(p) for p in held_out})) == 0

TEXTS = ["毎月１２，５００円ずつ貯金すると、一年六か月で貯金は全部でいくらになりますか。",
         "Find all solutions of the equation x^2 - 37x + 312 = 0.",
         "袋に青い玉が17個と黄色い玉が5個入っています。そこから玉を8個取り出すと、袋に残る玉は何個ですか。",
         "赤い花が5本、白い花が8本あります。花は全部で何本ですか。"]
_FORKED_INDEX: DecontaminationIndex | None = None


def _check_in_worker(text: str) -> tuple[str, str] | None:
    return _hit(_FORKED_INDEX, text)


def test_index_survives_pickling_and_fork(index):
    global _FORKED_INDEX
    expected = [("p2", "ngram"), ("p4", "fingerprint"), ("p3", "near_duplicate"), None]
    assert [_hit(index, t) for t in TEXTS] == expected
    assert [_hit(pickle.loads(pickle.dumps(index)), t) for t in TEXTS] == expected
    _FORKED_INDEX = index  # built before the fork, as prepare does, and inherited by the workers
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            assert pool.map(_check_in_worker, TEXTS) == expected
    finally:
        _FORKED_INDEX = None
