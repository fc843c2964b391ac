"""Cleaning that needs no sandbox: exact and near duplicate keys, decontamination.

Near duplicates use MinHash over character shingles with LSH banding. Decontamination (docs/decontamination.md)
matches a training problem against the evaluation problems three ways, on text whose numbers are written one
way (full-width digits, thousands separators and kanji numerals become plain digits): n-grams of "words"
(a word is a run of Latin letters/digits or a single other character -- Japanese has no spaces, so a CJK
character is its own word), the multiset of numbers and operators, and MinHash similarity.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal

import numpy as np

from mathtir.similarity import char_shingles, normalize

_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?|[^\W_]", re.UNICODE)
_MERSENNE = (1 << 61) - 1


def exact_key(problem: str, response: str) -> bytes:
    """16-byte key of a (problem, response) pair: equal after normalization -> equal key."""
    return hashlib.blake2b(f"{normalize(problem)}\x00{normalize(response)}".encode(), digest_size=16).digest()


_KANJI_DIGITS = dict(zip("〇零一二三四五六七八九", [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9], strict=True))
_KANJI_SMALL_UNITS = {"十": 10, "百": 100, "千": 1000}
_KANJI_LARGE_UNITS = {"万": 10**4, "億": 10**8, "兆": 10**12}
_KANJI_NUMERAL_CHAR = re.compile(r"[〇零一二三四五六七八九十百千万億兆]")
_KANJI_NUMERAL = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?)?[〇零一二三四五六七八九十百千万億兆][0-9〇零一二三四五六七八九十百千万億兆]*")
# A lone kanji numeral is a number only before a counter (一つ, 三人, 千円, 六か月) or after 第: elsewhere it is part of
# a word (一般, 同一, 三角形, 十分, 千代).
_COUNTERS = set("個本枚人円回つ匹冊台歳才日週年月時秒点問組件杯番倍割桁かヶカヵ")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?![\d,])")
_OPERATOR_SPELLINGS = [("<=", "≤"), (">=", "≥"), ("!=", "≠"), ("≦", "≤"), ("≧", "≥"), ("×", "*"),
                       ("÷", "/"), ("−", "-")]
_SUPERSCRIPT = re.compile("[⁰¹²³⁴⁵⁶⁷⁸⁹]+")  # x² is x^2 (NFKC alone would make it x2)
_SUPERSCRIPT_DIGITS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_OPERATOR = re.compile(r"\*\*|[-+*/^=<>≤≥≠]")
_ALWAYS_OPERATORS = set("+=<>≤≥≠")


def _kanji_value(numeral: str) -> str | None:
    """Digits of a kanji (or digits + kanji unit) numeral: 三百二十五, 二〇二四, 1万2千, 1.5万; None if malformed."""
    total, section, pending, last_small, last_large = Decimal(0), Decimal(0), None, 10**5, 10**13
    for run in re.findall(r"[0-9]+(?:\.[0-9]+)?|[〇零一二三四五六七八九]+|.", numeral):
        if run[0].isascii() or run[0] in _KANJI_DIGITS:
            if pending is not None:
                return None
            pending = Decimal(run if run[0].isascii() else "".join(str(_KANJI_DIGITS[c]) for c in run))
        elif run in _KANJI_SMALL_UNITS:
            unit = _KANJI_SMALL_UNITS[run]
            if unit >= last_small:
                return None
            section, pending, last_small = section + (1 if pending is None else pending) * unit, None, unit
        else:
            unit, value = _KANJI_LARGE_UNITS[run], section + (pending or 0)
            if unit >= last_large or value == 0:
                return None
            total, section, pending, last_small, last_large = total + value * unit, Decimal(0), None, 10**5, unit
    value = total + section + (pending or 0)
    if value != value.to_integral_value():
        return None  # 1.5 alone, or 1.2345千: not a number this reading makes sure of
    return str(int(value))


def _kanji_to_digits(text: str) -> str:
    if not _KANJI_NUMERAL_CHAR.search(text):
        return text

    def replace(match: re.Match) -> str:
        numeral, start, end = match.group(), match.start(), match.end()
        if len(numeral) == 1 and not ((end < len(text) and text[end] in _COUNTERS)
                                      or (start > 0 and text[start - 1] == "第")):
            return numeral
        value = _kanji_value(numeral)
        return numeral if value is None else value

    return _KANJI_NUMERAL.sub(replace, text)


def numeric_form(text: str) -> str:
    """NFKC, lower case, every number in plain digits (full-width digits, 1,000 / 1，000, kanji numerals where
    unambiguous), operators spelled one way (× -> *, ÷ -> /, <= -> ≤, x² -> x^2)."""
    text = _SUPERSCRIPT.sub(lambda m: "^" + m.group().translate(_SUPERSCRIPT_DIGITS), text)
    text = _kanji_to_digits(unicodedata.normalize("NFKC", text).lower())
    if "," in text:
        text = _THOUSANDS.sub(lambda m: _without_thousands_separators(text, m), text)
    for spelling, operator in _OPERATOR_SPELLINGS:
        text = text.replace(spelling, operator)
    return text


def _without_thousands_separators(text: str, match: re.Match) -> str:
    # 1,234,567 but not the tail of 12,34,567 or 1.5,000 (a leading lookbehind in the pattern costs ~3x)
    if match.start() and text[match.start() - 1] in "0123456789.,":
        return match.group()
    return match.group().replace(",", "")


def fingerprint(text: str) -> tuple[Counter[str], Counter[str]]:
    """(numbers, operators) of a text, as multisets: what survives rewording and translation. Numbers are
    canonical decimals without sign (3.50 -> 3.5, 007 -> 7)."""
    sequence, operators = _numbers_and_operators(numeric_form(text))
    return Counter(sequence), operators


def _numbers_and_operators(form: str) -> tuple[list[str], Counter[str]]:
    """The numbers in reading order, and the operators."""
    sequence = list(map(_canonical_number, _NUMBER.findall(form)))
    operators = Counter()
    for match in _OPERATOR.finditer(form):
        operator = match.group()
        if operator in _ALWAYS_OPERATORS or _operands_around(form, match.start(), match.end()):
            operators["^" if operator == "**" else operator] += 1
    return sequence, operators


@functools.lru_cache(maxsize=1 << 16)
def _canonical_number(number: str) -> str:
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number.lstrip("0") or "0"


def _operands_around(form: str, start: int, end: int) -> bool:
    """'-', '*', '/', '**' and '^' are operators only between operands (digits, brackets, one-letter
    variables): elsewhere they are hyphens (x-axis), markdown emphasis (**bold**) or unit slashes (km/h)."""
    before, after = start - 1, end
    while before >= 0 and form[before] == " ":
        before -= 1
    while after < len(form) and form[after] == " ":
        after += 1
    if before < 0 or after == len(form):
        return False
    left, right = form[before], form[after]
    return ((left in "0123456789)]" or (_is_letter(left) and not (before > 0 and _is_letter(form[before - 1]))))
            and (right in "0123456789([" or (_is_letter(right)
                                               and not (after + 1 < len(form) and _is_letter(form[after + 1])))))


def _is_letter(c: str) -> bool:
    return "a" <= c <= "z"


@functools.lru_cache(maxsize=1 << 16)
def significant_digits(number: str) -> int:
    """How much a canonical number says: its digits without leading/trailing zeros (17 -> 2, 1000 -> 1,
    0.25 -> 2); 0 for the integers 0-10, which occur in nearly every problem."""
    if "." not in number and int(number) <= 10:
        return 0
    return max(1, len(number.replace(".", "").strip("0")))


class MinHasher:
    """MinHash signatures over character shingles (deterministic: crc32 shingle hashes, seeded permutations)."""

    def __init__(self, num_perm: int = 64, shingle: int = 5, seed: int = 0):
        rng = np.random.Generator(np.random.PCG64(seed))
        self.a = rng.integers(1, _MERSENNE, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _MERSENNE, size=num_perm, dtype=np.uint64)
        self.shingle = shingle

    def signature(self, text: str) -> np.ndarray:
        grams = char_shingles(text, self.shingle)
        hashes = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
        # (a*x + b) mod p with x < 2^32 and a, b < 2^61: the product overflows uint64, which still gives a
        # fixed pseudo-random permutation per (a, b) -- all that MinHash needs.
        permuted = (hashes[:, None] * self.a[None, :] + self.b[None, :]) % np.uint64(_MERSENNE)
        return permuted.min(axis=0).astype(np.uint32) if len(grams) else np.zeros(len(self.a), np.uint32)


class NearDuplicateIndex:
    """Keeps signatures of accepted documents; a new one is a near duplicate when an LSH-banded candidate
    agrees on at least ``threshold`` of the signature (an estimate of Jaccard similarity)."""

    def __init__(self, num_perm: int, bands: int, threshold: float):
        if num_perm % bands:
            raise ValueError(f"near-dedup num_perm {num_perm} is not divisible by bands {bands}")
        self.rows = num_perm // bands
        self.bands = bands
        self.threshold = threshold
        self.buckets: dict[tuple[int, bytes], list[int]] = {}
        self.signatures: list[np.ndarray] = []

    def _keys(self, signature: np.ndarray) -> list[tuple[int, bytes]]:
        return [(band, signature[band * self.rows:(band + 1) * self.rows].tobytes()) for band in range(self.bands)]

    def add(self, signature: np.ndarray) -> int:
        """Index a signature; its number."""
        number = len(self.signatures)
        self.signatures.append(signature)
        for key in self._keys(signature):
            self.buckets.setdefault(key, []).append(number)
        return number

    def add_if_new(self, signature: np.ndarray) -> int | None:
        """None if accepted (and indexed); else the number of the accepted document it duplicates."""
        for key in self._keys(signature):
            for other in self.buckets.get(key, ()):
                if np.mean(self.signatures[other] == signature) >= self.threshold:
                    return other
        self.add(signature)
        return None

    def most_similar(self, signature: np.ndarray) -> tuple[int, float] | None:
        """(number, signature agreement) of the most similar indexed document at or above threshold, or None."""
        candidates = {other for key in self._keys(signature) for other in self.buckets.get(key, ())}
        best = None
        for other in sorted(candidates):
            agreement = float(np.mean(self.signatures[other] == signature))
            if agreement >= self.threshold and (best is None or agreement > best[1]):
                best = (other, agreement)
        return best


@dataclass
class ContaminationHit:
    eval_set: str
    eval_id: str
    overlap: float  # share of the eval problem's n-grams found in the training text (whatever the kind)
    kind: str  # "ngram" | "fingerprint" | "near_duplicate"
    # ngram: = overlap; fingerprint: share of the training text's distinct significant numbers that are the
    # eval problem's (1.0: the same numbers); near_duplicate: estimated Jaccard similarity of character shingles
    score: float


@dataclass
class _EvalProblem:
    set_name: str
    problem_id: str
    ngrams: int
    numbers: Counter[str]
    sequence: list[str]  # the numbers in reading order: what a near duplicate must hold, in this order
    key: Counter[str]  # the significant ones (not 0-10): what a fingerprint match must hold
    operators: Counter[str]
    distinctive: bool  # its fingerprint alone identifies it
    signature: np.ndarray | None


def _holds(text: Counter[str], problem: Counter[str]) -> bool:
    """Multiset inclusion (Counter's own <= also walks the larger side); callers test the keys first, in C."""
    return all(text.get(x, 0) >= k for x, k in problem.items())


def _in_order(run: list[str], sequence: list[str]) -> bool:
    """Whether run is a subsequence of sequence."""
    rest = iter(sequence)
    return all(x in rest for x in run)


def _significant(numbers: Counter[str]) -> Counter[str]:
    return Counter({x: k for x, k in numbers.items() if significant_digits(x)})


class DecontaminationIndex:
    """Evaluation problems, and which of them a training text carries (docs/decontamination.md). A training
    text is contaminated by an evaluation problem when, checked in this order:

    - ngram: it contains at least ``min_overlap`` of the problem's ``ngram``-grams (1.0 = the whole problem);
    - fingerprint: the problem's fingerprint is distinctive -- at least ``fingerprint_min_tokens`` significant
      numbers (all but the integers 0-10, which translations spell as words) and operators, the numbers with
      at least ``fingerprint_min_digits`` significant digits in all -- and the text holds all of it, the
      problem's numbers being at least ``fingerprint_min_share`` of the text's distinct significant numbers (a
      text full of numbers holds many combinations by chance);
    - near_duplicate: the text holds all of the problem's numbers in the same order (a templated sibling with
      other numbers, or with the same numbers in other places, is another problem), and its MinHash similarity
      to the problem is at least ``near_threshold``.

    Plain Python and numpy state: picklable, and safe to share with forked workers (check() only reads).
    """

    def __init__(self, ngram: int, min_overlap: float, *, fingerprint: bool = True, fingerprint_min_tokens: int = 3,
                 fingerprint_min_digits: int = 5, fingerprint_min_share: float = 0.5, near_duplicate: bool = True,
                 near_threshold: float = 0.5, num_perm: int = 128, bands: int = 32, shingle: int = 3, seed: int = 0):
        self.ngram = ngram
        self.min_overlap = min_overlap
        self.use_fingerprint = fingerprint
        self.fingerprint_min_tokens = fingerprint_min_tokens
        self.fingerprint_min_digits = fingerprint_min_digits
        self.fingerprint_min_share = fingerprint_min_share
        self.near_threshold = near_threshold
        self.minhasher = MinHasher(num_perm, shingle, seed) if near_duplicate else None
        self.problems: list[_EvalProblem] = []
        self.index: dict[tuple[str, ...], list[int]] = {}
        self.sizes: set[int] = set()  # n-gram lengths in use (short problems use fewer words)
        # Problems with numbers, listed under their most significant one: a training text can only carry
        # those listed under one of its own numbers.
        self.by_anchor: dict[str, list[int]] = {}
        # Problems without numbers: found by LSH (numberless_problems[k] is the number of the k-th indexed).
        self.numberless = NearDuplicateIndex(num_perm, bands, near_threshold) if near_duplicate else None
        self.numberless_problems: list[int] = []

    def add(self, set_name: str, problem_id: str, text: str) -> None:
        form = numeric_form(text)
        w = _WORD.findall(form)
        if not w:
            raise ValueError(f"evaluation problem {set_name}/{problem_id} has no words to match")
        n = min(self.ngram, len(w))  # a problem shorter than n words is one n-gram: itself
        grams = _ngrams(w, n)
        sequence, operators = _numbers_and_operators(form)
        numbers, key = Counter(sequence), _significant(Counter(sequence))
        distinctive = (self.use_fingerprint
                       and key.total() + operators.total() >= self.fingerprint_min_tokens
                       and sum(significant_digits(x) * k for x, k in key.items()) >= self.fingerprint_min_digits)
        signature = self.minhasher.signature(" ".join(w)) if self.minhasher else None
        number = len(self.problems)
        self.problems.append(_EvalProblem(set_name, problem_id, len(grams), numbers, sequence, key, operators,
                                          distinctive, signature))
        self.sizes.add(n)
        for gram in grams:
            self.index.setdefault(gram, []).append(number)
        if numbers and (distinctive or self.minhasher is not None):
            anchor = max(numbers, key=lambda x: (significant_digits(x), len(x), x))
            self.by_anchor.setdefault(anchor, []).append(number)
        elif not numbers and self.numberless is not None:
            self.numberless.add(signature)
            self.numberless_problems.append(number)

    def check(self, text: str) -> ContaminationHit | None:
        """The strongest evidence that ``text`` carries an evaluation problem, or None: an n-gram hit if any
        (the most overlapping problem), else a fingerprint hit (the best score), else a near duplicate (the
        most similar); ties go to the problem added first."""
        if not self.problems:
            return None
        form = numeric_form(text)
        w = _WORD.findall(form)
        counts: dict[int, int] = {}
        for n in sorted(self.sizes):
            for gram in _ngrams(w, n):
                for number in self.index.get(gram, ()):
                    counts[number] = counts.get(number, 0) + 1
        best = None
        for number, hits in sorted(counts.items()):
            overlap = hits / self.problems[number].ngrams
            if overlap >= self.min_overlap and (best is None or overlap > best.overlap):
                best = self._hit(number, overlap, "ngram", overlap)
        if best is not None or (not self.by_anchor and not self.numberless_problems):
            return best

        sequence, operators = _numbers_and_operators(form)
        numbers = Counter(sequence)
        key = _significant(numbers)
        fingerprint_hits = []  # (share, number)
        near_candidates = []  # problems whose numbers the text holds in order, without a fingerprint hit
        for anchor in numbers:
            for number in self.by_anchor.get(anchor, ()):
                problem = self.problems[number]
                share = len(problem.key) / len(key) if key else 0.0
                if (problem.distinctive and share >= self.fingerprint_min_share
                        and problem.key.keys() <= key.keys() and _holds(key, problem.key)
                        and _holds(operators, problem.operators)):
                    fingerprint_hits.append((share, number))
                elif problem.numbers.keys() <= numbers.keys() and _in_order(problem.sequence, sequence):
                    near_candidates.append(number)
        if fingerprint_hits:
            share, number = max(fingerprint_hits, key=lambda hit: (hit[0], -hit[1]))
            return self._hit(number, counts.get(number, 0) / self.problems[number].ngrams, "fingerprint", share)
        if self.minhasher is None or not (near_candidates or self.numberless_problems):
            return None

        signature = self.minhasher.signature(" ".join(w))
        if self.numberless_problems:
            found = self.numberless.most_similar(signature)
            if found is not None:
                near_candidates.append(self.numberless_problems[found[0]])
        for number in sorted(near_candidates):
            problem = self.problems[number]
            similarity = float(np.mean(problem.signature == signature))
            if similarity >= self.near_threshold and (best is None or similarity > best.score):
                best = self._hit(number, counts.get(number, 0) / problem.ngrams, "near_duplicate", similarity)
        return best

    def _hit(self, number: int, overlap: float, kind: str, score: float) -> ContaminationHit:
        problem = self.problems[number]
        return ContaminationHit(problem.set_name, problem.problem_id, overlap, kind, score)


def _ngrams(w: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
