"""Text similarity: the normalization and character shingles that near-duplicate detection is built on.

Training-data cleaning (mathtir.data.clean) estimates Jaccard similarity across a whole dataset with MinHash;
generation (mathtir.eval.generation) compares the few solutions of one problem exactly. Both read the same
shingles, so "near-identical" means one thing in both places.
"""

from __future__ import annotations

import unicodedata


def normalize(text: str) -> str:
    """NFKC (full-width digits and letters to ASCII), lower case, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def char_shingles(text: str, k: int) -> set[str]:
    """The k-character substrings of the normalized text with whitespace removed (one shingle for short text),
    so reflowed or re-spaced copies share every shingle."""
    compact = normalize(text).replace(" ", "")
    return {compact[i:i + k] for i in range(max(1, len(compact) - k + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0
