"""Execution verification: re-run a TIR sample's code blocks in the sandbox and compare the recorded outputs.

Block k runs with blocks 0..k-1 replayed as history (the state the model's code saw when the data was
generated). A sample passes only if every block runs "ok" and its stdout matches the recorded output block,
whitespace-normalized and with numbers compared at a relative tolerance (float printing differs between
Python/numpy versions). The first failing block decides the reason: mismatch, error, timeout, killed, ...
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mathtir.formats import OutputFormat, truncate

_NUMBER = re.compile(r"([-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)")


def _pieces(text: str) -> list[str]:
    return [p for word in text.split() for p in _NUMBER.split(word) if p]


def outputs_match(recorded: str, actual: str, rel_tol: float) -> bool:
    a, b = _pieces(recorded), _pieces(actual)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x == y:
            continue
        if not (_NUMBER.fullmatch(x) and _NUMBER.fullmatch(y)):
            return False
        if not math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=1e-12):
            return False
    return True


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str | None = None  # "mismatch" or the failing ExecResult.status
    block: int | None = None  # index of the first failing code block
    detail: str | None = None


def verify_blocks(pool, blocks: Sequence[tuple[str, str]], *, timeout: float, rel_tol: float,
                  output_max_chars: int) -> Verdict:
    """blocks: (code, recorded output body) in order. pool: a mathtir.sandbox.SandboxPool."""
    history: list[str] = []
    for k, (code, recorded) in enumerate(blocks):
        result = pool.run(code, timeout=timeout, history=tuple(history))
        if result.status != "ok":
            return Verdict(False, result.status, k, (result.error or result.stderr or "")[-300:])
        stdout = result.stdout.rstrip("\n")
        # Data generated with a truncating sandbox records the cut output: accept either cut style.
        candidates = [stdout]
        if len(stdout) > output_max_chars:
            candidates += [truncate(stdout, OutputFormat(max_chars=output_max_chars, truncation=mode))
                           for mode in ("head_tail", "head")]
        if not any(outputs_match(recorded, c, rel_tol) for c in candidates):
            return Verdict(False, "mismatch", k, f"recorded {recorded[:200]!r}, got {stdout[:200]!r}")
        history.append(code)
    return Verdict(True)
