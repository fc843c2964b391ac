"""Cleaning that needs no sandbox: text normalization, exact and near duplicate keys, decontamination.

Near duplicates use MinHash over character shingles with LSH banding; decontamination uses n-grams of
"words" where a word is a run of Latin letters/digits or a single other character (Japanese has no spaces,
so a CJK character is its own word). Both work on NFKC-normalized, lower-cased text without punctuation.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass, field

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?|[^\W_]", re.UNICODE)
_MERSENNE = (1 << 61) - 1


def normalize(text: str) -> str:
    """NFKC (full-width digits and letters to ASCII), lower case, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def words(text: str) -> list[str]:
    return _WORD.findall(normalize(text))


def exact_key(problem: str, response: str) -> bytes:
    """16-byte key of a (problem, response) pair: equal after normalization -> equal key."""
    return hashlib.blake2b(f"{normalize(problem)}\x00{normalize(response)}".encode(), digest_size=16).digest()


class MinHasher:
    """MinHash signatures over character shingles (deterministic: crc32 shingle hashes, seeded permutations)."""

    def __init__(self, num_perm: int = 64, shingle: int = 5, seed: int = 0):
        rng = np.random.Generator(np.random.PCG64(seed))
        self.a = rng.integers(1, _MERSENNE, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _MERSENNE, size=num_perm, dtype=np.uint64)
        self.shingle = shingle

    def signature(self, text: str) -> np.ndarray:
        compact = normalize(text).replace(" ", "")
        k = self.shingle
        grams = {compact[i:i + k] for i in range(max(1, len(compact) - k + 1))}
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

    def add_if_new(self, signature: np.ndarray) -> int | None:
        """None if accepted (and indexed); else the number of the accepted document it duplicates."""
        keys = [(band, signature[band * self.rows:(band + 1) * self.rows].tobytes()) for band in range(self.bands)]
        for key in keys:
            for other in self.buckets.get(key, ()):
                if np.mean(self.signatures[other] == signature) >= self.threshold:
                    return other
        number = len(self.signatures)
        self.signatures.append(signature)
        for key in keys:
            self.buckets.setdefault(key, []).append(number)
        return None


@dataclass
class ContaminationHit:
    eval_set: str
    eval_id: str
    overlap: float  # share of the eval problem's n-grams found in the training text


@dataclass
class DecontaminationIndex:
    """n-gram index of evaluation problems. A training text is contaminated by an evaluation problem when it
    contains at least ``min_overlap`` of that problem's n-grams (1.0 = the whole problem appears)."""

    ngram: int
    min_overlap: float
    problems: list[tuple[str, str, int]] = field(default_factory=list)  # (set, id, number of n-grams)
    index: dict[tuple[str, ...], list[int]] = field(default_factory=dict)
    sizes: set[int] = field(default_factory=set)  # n-gram lengths in use (short problems use fewer words)

    def add(self, set_name: str, problem_id: str, text: str) -> None:
        w = words(text)
        if not w:
            raise ValueError(f"evaluation problem {set_name}/{problem_id} has no words to match")
        n = min(self.ngram, len(w))  # a problem shorter than n words is one n-gram: itself
        grams = _ngrams(w, n)
        number = len(self.problems)
        self.problems.append((set_name, problem_id, len(grams)))
        self.sizes.add(n)
        for gram in grams:
            self.index.setdefault(gram, []).append(number)

    def check(self, text: str) -> ContaminationHit | None:
        """The most overlapping evaluation problem at or above min_overlap, or None."""
        if not self.problems:
            return None
        w = words(text)
        counts: dict[int, int] = {}
        for n in sorted(self.sizes):
            for gram in _ngrams(w, n):
                for number in self.index.get(gram, ()):
                    counts[number] = counts.get(number, 0) + 1
        best = None
        for number, hits in sorted(counts.items()):
            set_name, problem_id, total = self.problems[number]
            if hits / total >= self.min_overlap and (best is None or hits / total > best.overlap):
                best = ContaminationHit(set_name, problem_id, hits / total)
        return best


def _ngrams(w: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
