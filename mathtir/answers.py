"""Answers: extraction from responses, equivalence and majority voting (metrics over them: mathtir.eval.metrics).

`is_equivalent(pred, gold)` decides in four steps, cheapest first:
1. normalization of both strings (`normalize_answer`): NFKC (full-width digits and symbols), Unicode minus,
   Japanese counters and units (12個, 1000円, 5cm²), kanji numerals, fraction readings (3分の2, 1と3分の2),
   degree signs, `\\text{}`, `\\left`/`\\right`, `\\dfrac`, LaTeX spacing, thousands separators, a leading `x =`;
2. exact comparison of the normalized strings;
3. numbers: when both sides are plain numbers (integers, decimals, fractions, scientific notation) they are
   compared exactly as rationals with a relative tolerance of 1e-9 and the answer is final, so 1/3 is not
   0.333 (nor 0.333333: math-verify's 6-decimal rounding would accept that);
4. symbolic equivalence through math-verify (LaTeX -> sympy), with two rules of our own for its known
   misjudgements on Japanese exam answers:
   - `(a, b)` is an ordered pair (coordinates, as Japanese textbooks write them), compared element by element
     in order; math-verify reads it as an open interval, and `(2, 1)` as an empty one equal to `(3, 0)`;
   - form matters for polynomials: a factored answer (`(x+1)(x+2)`, a product of two or more non-constant
     factors, one a sum) is not equivalent to its expansion (`x^2+3x+2`) and vice versa, since 因数分解 and
     展開 problems ask for exactly that form;
   and answers that still contain Japanese text after normalization (`3時間20分`) are compared exactly only,
   because math-verify would pick one number out of them.
A response with several `\\boxed{}` answers is judged by the last one (`extract_answer`); math-verify on the
whole response would merge `\\boxed{3}` and `\\boxed{5}` into the set {3, 5}.

Time bound (see `_Checker`): math-verify's own timeouts use `signal.alarm`, which only works in the main
thread, so they are disabled (`parsing_timeout=None`, `timeout_seconds=None`). The symbolic step runs instead
on a helper thread; once it has used `timeout` seconds of CPU time (or 4x that in wall time) the caller raises
an exception inside the helper (`PyThreadState_SetAsyncExc`), retires it and answers False. That works from
any thread, Ray actors and forked workers included, costs one thread hand-off (~25 us) per symbolic check, and
does not turn a loaded machine's slowness into spurious timeouts. Chosen over a subprocess per check (tens of
ms each: far below the speed target) and over sys.settrace deadlines (slows all sympy code several-fold). An
asynchronous exception is only seen between Python bytecodes, so work that stays in C (big-integer powers such
as `10^{10^{10}}`, huge factorials and binomials) cannot be interrupted: `_too_costly` refuses such answers
before they reach sympy.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import queue
import re
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

DEFAULT_TIMEOUT_S = 5.0  # CPU seconds for the symbolic step, math-verify's own default
NUMERIC_REL_TOL = Fraction(1, 10**9)
_MAX_SYMBOLIC_CHARS = 400  # longer "answers" are prose or garbage: exact comparison only


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------

# One pass over a response: LaTeX escapes first (`\\` is a line break, `\{` a literal brace), then box openings,
# then plain braces.
_BOX_TOKENS = re.compile(r"\\\\|\\[{}]|\\(?:boxed|fbox)(?![A-Za-z])\s*\{|[{}]")
_BOX_BARE = re.compile(r"\\(?:boxed|fbox)[ \t]+([^\s${}\\][^\s$]*)")


def extract_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) in `text`; None when absent.

    "Last" is the box that closes last; a box cut off by the end of the text (unbalanced braces) does not
    count, so an earlier complete one is used. Nested boxes are unwrapped (`\\boxed{\\boxed{5}}` -> `5`).
    Runs in linear time on any input.
    """
    if not isinstance(text, str):
        return None
    best_end, best = -1, None
    stack: list[int | None] = []  # for each open brace: where its box content starts, or None
    for token in _BOX_TOKENS.finditer(text):
        lexeme = token.group()
        if lexeme.startswith("\\\\") or lexeme in ("\\{", "\\}"):
            continue
        if lexeme == "}":
            if stack:
                content_start = stack.pop()
                if content_start is not None and token.end() > best_end:
                    best_end, best = token.end(), text[content_start : token.start()]
        elif lexeme == "{":
            stack.append(None)
        else:
            stack.append(token.end())
    for bare in _BOX_BARE.finditer(text):
        if bare.end() > best_end:
            best_end, best = bare.end(), bare.group(1).rstrip(".,;:。、")
    if best is None:
        return None
    best = best.strip()
    while (inner := _whole_box_content(best)) is not None:
        best = inner  # \boxed{\boxed{5}}: a box holding nothing but another box
    return best or None


_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*\{")


def _whole_box_content(text: str) -> str | None:
    """The content of `text` when all of it is one `\\boxed{...}`, else None."""
    opening = _BOX_OPENING.match(text)
    if opening is None or not text.endswith("}"):
        return None
    depth = 1
    for token in _BOX_TOKENS.finditer(text, opening.end()):
        lexeme = token.group()
        if lexeme == "}":
            depth -= 1
        elif lexeme.endswith("{") and not lexeme.startswith("\\\\") and lexeme != "\\{":
            depth += 1
        if depth == 0:
            return text[opening.end() : token.start()].strip() if token.end() == len(text) else None
    return None


# --------------------------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------------------------

_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_SUPERSCRIPT_RUN = re.compile(r"[⁻⁺]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+")
_SYMBOLS = {
    "\u2212": "-", "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-",
    "×": "\\times ", "÷": "\\div ", "·": "\\cdot ", "⋅": "\\cdot ", "π": "\\pi ", "∞": "\\infty ",
    "≤": "\\le ", "≦": "\\le ", "≥": "\\ge ", "≧": "\\ge ", "≠": "\\ne ", "±": "\\pm ", "θ": "\\theta ",
    "、": ",", "。": ".", "°C": "", "°": "^\\circ ", "マイナス": "-",
}
_SYMBOL_RE = re.compile("|".join(map(re.escape, sorted(_SYMBOLS, key=len, reverse=True))))
_SQRT_SIGN = re.compile(r"√\s*(?:\{([^{}]*)\}|\(([^()]*)\)|(\d+(?:\.\d+)?|[A-Za-z]))")
_DELIMITERS = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]")
_TEXT_COMMANDS = re.compile(
    r"\\(?:text|textrm|textup|textnormal|textbf|textit|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}"
)
_LATEX_REWRITES = [
    (re.compile(r"\\(?:left|right)\.|\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])"), ""),
    (re.compile(r"\\[dtc]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\[dt]binom(?![A-Za-z])"), r"\\binom"),
    (re.compile(r"\\(?:displaystyle|textstyle)(?![A-Za-z])"), ""),
    (re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~"), " "),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\\frac\s*([0-9A-Za-z])\s*([0-9A-Za-z])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\frac\s*\{([^{}]*)\}\s*([0-9A-Za-z])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\frac\s*([0-9A-Za-z])\s*\{"), r"\\frac{\1}{"),
    (re.compile(r"\\sqrt\s*([0-9A-Za-z])"), r"\\sqrt{\1}"),
    (re.compile(r"([\^_])\{([0-9A-Za-z])\}"), r"\1\2"),
]

_KANJI_DIGITS = {"〇": 0, "零": 0, "一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_KANJI_SMALL_UNITS = {"十": 10, "百": 100, "千": 1000}
_KANJI_LARGE_UNITS = {"万": 10**4, "億": 10**8, "兆": 10**12}
_KANJI_RUN = re.compile(r"[〇零一二三四五六七八九十百千万億兆]+")

_MIXED_FRACTION_READING = re.compile(r"(\d+)\s*と\s*(\d+)\s*分の\s*(\d+)")
_FRACTION_READING = re.compile(r"([0-9A-Za-z.]+|\\sqrt\{[^{}]*\})\s*分の\s*([0-9A-Za-z.]+|\\sqrt\{[^{}]*\})")
_JA_LIST_SEPARATOR = re.compile(r"(?<=[\d}])\s*(?:または|および|か|と)\s*(?=[-0-9A-Za-z\\])")
_LEADING_WORDS = re.compile(r"^(?:答え?\s*(?:は|:)?|約|およそ|ほぼ)\s*")
_TRAILING_WORDS = re.compile(r"\s*(?:です|である|となる|になる|になります|となります|\.)\s*$")

# Counters and units that never name a variable: stripped from the end of any answer.
_JA_UNITS = (
    "通り 番目 個 台 円 人 本 枚 冊 匹 頭 羽 回 歳 才 倍 番 点 組 色 桁 つ 箇所 か所 ヶ所 秒 分間 分 時間 日間 日 週間 "
    "週 か月 ヶ月 カ月 年間 年 度 人分 個分 杯 脚 軒 件 曲 問 票 歩 周 段 階 試合 ページ 行 列 辺 角 mm cm km "
    "平方メートル 平方センチメートル 立方メートル 立方センチメートル センチメートル ミリメートル キロメートル メートル "
    "キログラム グラム ミリリットル リットル パーセント"
).split()
_JA_UNIT_SUFFIX = re.compile(
    "(?:" + "|".join(sorted(map(re.escape, _JA_UNITS), key=len, reverse=True)) + r")(?:\^\{?[23]\}?|[23])?\s*$"
)
# Latin units could be variables (3m, 5g): stripped only when a plain number remains.
_LATIN_UNIT_SUFFIX = re.compile(
    r"^(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*"
    r"(?:km/h|m/s|cm|mm|km|m|kg|mg|g|mL|ml|dL|dl|L|l|s|sec|min|h|%)(?:\^\{?[23]\}?|[23])?$"
)
# Degrees are a unit where an angle is the answer (60°; 30°, 60°); next to a trigonometric function
# (\sin 30^\circ) they are not, and stay for math-verify.
_DEGREE_UNIT = re.compile(r"(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree)(?![A-Za-z])\s*(?=,|$)")
_TRIGONOMETRY = re.compile(r"\\(?:sin|cos|tan|sec|csc|cot)(?![A-Za-z])")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_LEADING_VARIABLE = re.compile(
    r"^\s*(?:\\[A-Za-z]+|[A-Za-z]{1,3}|\(\s*[A-Za-z](?:\s*,\s*[A-Za-z])+\s*\))(?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z]\))?"
    r"\s*=(?![=<>])\s*"
)


def _kanji_to_number(run: str) -> str:
    """漢数字 to digits (三 -> 3, 二十五 -> 25, 一万二千 -> 12000); runs that are not a numeral stay."""
    total, section, digit = 0, 0, None
    for ch in run:
        if ch in _KANJI_DIGITS:
            if digit is not None:  # positional style: 二〇二四
                digit = digit * 10 + _KANJI_DIGITS[ch]
            else:
                digit = _KANJI_DIGITS[ch]
        elif ch in _KANJI_SMALL_UNITS:
            section += (1 if digit is None else digit) * _KANJI_SMALL_UNITS[ch]
            digit = None
        else:
            section += digit or 0
            if section == 0:
                return run
            total += section * _KANJI_LARGE_UNITS[ch]
            section, digit = 0, None
    return str(total + section + (digit or 0))


def _mixed_fraction(match: re.Match) -> str:
    whole, denominator, numerator = (int(g) for g in match.groups())
    return f"\\frac{{{whole * denominator + numerator}}}{{{denominator}}}"


_MAX_NORMALIZED_CHARS = 2000  # real answers are far shorter; longer text gets NFKC and whitespace only


def normalize_answer(answer: str) -> str:
    """The canonical spelling used for comparison (see the module docstring for the rules)."""
    if len(answer) > _MAX_NORMALIZED_CHARS:
        # Some rules scan quadratically on long runs; garbage this long is only ever compared exactly.
        return " ".join(unicodedata.normalize("NFKC", answer).split())
    return _normalize(answer)


@functools.lru_cache(maxsize=65536)
def _normalize(answer: str) -> str:
    text = answer
    if "\\boxed" in text or "\\fbox" in text:
        text = extract_answer(text) or text
    text = _SUPERSCRIPT_RUN.sub(lambda m: "^{" + m.group().translate(_SUPERSCRIPTS) + "}", text)
    text = unicodedata.normalize("NFKC", text)
    text = _SYMBOL_RE.sub(lambda m: _SYMBOLS[m.group()], text)
    text = _SQRT_SIGN.sub(lambda m: "\\sqrt{" + next(g for g in m.groups() if g is not None) + "}", text)
    text = _DELIMITERS.sub("", text)
    for _ in range(3):  # nested \text{\mathrm{cm}}
        text = _TEXT_COMMANDS.sub(r"\1", text)
    for pattern, replacement in _LATEX_REWRITES:
        text = pattern.sub(replacement, text)
    text = _KANJI_RUN.sub(lambda m: _kanji_to_number(m.group()), text)
    text = _MIXED_FRACTION_READING.sub(_mixed_fraction, text)
    text = _FRACTION_READING.sub(r"\\frac{\2}{\1}", text)
    text = _JA_LIST_SEPARATOR.sub(", ", text)
    text = " ".join(text.split())
    previous = None
    while previous != text:
        previous = text
        text = _LEADING_WORDS.sub("", text)
        text = _TRAILING_WORDS.sub("", text)
        if not _TRIGONOMETRY.search(text):
            text = _DEGREE_UNIT.sub("", text)
        stripped = _JA_UNIT_SUFFIX.sub("", text).strip()
        text = stripped or text
        latin = _LATIN_UNIT_SUFFIX.match(text)
        text = latin.group("number") if latin else text
        if _THOUSANDS.match(text):
            text = text.replace(",", "")
        if text.count("=") == 1:
            text = _LEADING_VARIABLE.sub("", text) or text
        text = _strip_list_variable(_strip_outer_parentheses(text.strip()))
    return text


def _strip_outer_parentheses(text: str) -> str:
    """`(\\frac{1}{2})` -> `\\frac{1}{2}`: parentheses around a single value mean nothing."""
    while _encloses(text, "(", ")") and _split_top_level(text[1:-1]) is None:
        text = text[1:-1].strip()
    return text


def _strip_list_variable(text: str) -> str:
    """`x=1, x=2` -> `1, 2`: every item assigns the same variable (a list of solutions)."""
    items = _split_top_level(text)
    if items is None:
        return text
    names = {match.group().split("=")[0].strip() if (match := _LEADING_VARIABLE.match(item)) else None
             for item in items}
    if len(names) != 1 or None in names or any(item.count("=") != 1 for item in items):
        return text
    return ", ".join(_LEADING_VARIABLE.sub("", item) for item in items)


# --------------------------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------------------------

_DECIMAL = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?")
_LATEX_FRACTION = re.compile(r"(?P<sign>[-+]?)\\frac\{(?P<num>[^{}]+)\}\{(?P<den>[^{}]+)\}")
_SLASH_FRACTION = re.compile(r"(?P<num>[-+]?[\d.]+)/(?P<den>[\d.]+)")
_TIMES_TEN = re.compile(r"(?P<mantissa>[-+]?[\d.]+)(?:\\times|\\cdot)10\^\{?(?P<exp>[-+]?\d{1,3})\}?")


def _plain_number(text: str) -> Fraction | None:
    """The exact value of a plain number (5, -0.25, 1.5e3, 1/3, \\frac{-3}{4}, 2.5\\times10^{3}), else None."""
    compact = text.replace(" ", "")
    if len(compact) > 80:
        return None
    if _DECIMAL.fullmatch(compact):
        return Fraction(compact)
    for pattern in (_LATEX_FRACTION, _SLASH_FRACTION):
        match = pattern.fullmatch(compact)
        if match:
            numerator, denominator = match.group("num"), match.group("den")
            if not (_DECIMAL.fullmatch(numerator) and _DECIMAL.fullmatch(denominator)):
                return None
            if Fraction(denominator) == 0:
                return None
            value = Fraction(numerator) / Fraction(denominator)
            return -value if match.groupdict().get("sign") == "-" else value
    match = _TIMES_TEN.fullmatch(compact)
    if match and _DECIMAL.fullmatch(match.group("mantissa")):
        return Fraction(match.group("mantissa")) * Fraction(10) ** int(match.group("exp"))
    return None


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    return abs(a - b) <= NUMERIC_REL_TOL * max(abs(a), abs(b))


def _split_top_level(text: str) -> list[str] | None:
    """Comma-separated items at bracket depth 0, or None when there is no top-level comma."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if not items:
        return None
    items.append(text[start:].strip())
    return items


def _encloses(text: str, opening: str, closing: str) -> bool:
    """Whether text[0] and text[-1] are a matching pair of brackets around all of it ("(1)(2)" is not)."""
    if not (text.startswith(opening) and text.endswith(closing)):
        return False
    depth = 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and i < len(text) - 1:
            return False
    return depth == 0


def _ordered_pair(text: str) -> list[str] | None:
    """The items of `(a, b, ...)` when the outer parentheses enclose the whole text; else None."""
    return _split_top_level(text[1:-1]) if _encloses(text, "(", ")") else None


_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_EXPONENT = re.compile(r"\^\s*(\{)?")
_FACTORIAL = re.compile(r"(?:(\d+)|[^\s\d!])\s*!")


def _braced(text: str, start: int) -> str:
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] == "{"
        depth -= text[i] == "}"
        if depth == 0:
            return text[start + 1 : i]
    return text[start + 1 :]


def _too_costly(text: str) -> bool:
    """Answers whose evaluation would run for minutes inside C code (big-integer arithmetic), where no time
    bound can reach: power towers, exponents of 100000 and more, factorials above 10000 or of expressions,
    binomials next to large numbers, powers or factorials."""
    for match in _EXPONENT.finditer(text):
        exponent = _braced(text, match.end() - 1) if match.group(1) else text[match.end() : match.end() + 12]
        if match.group(1) and ("^" in exponent or "!" in exponent or "binom" in exponent):
            return True
        digits = re.match(r"\d+", exponent)
        if digits and len(digits.group()) > 5:
            return True
    for match in _FACTORIAL.finditer(text):
        if match.group(1) is None or len(match.group(1)) > 5 or int(match.group(1)) > 10_000:
            return True
    return "\\binom" in text and bool(re.search(r"\^|!|\d{5}", text))


def _factored(expr: Any) -> bool:
    """True for a product of two or more non-constant factors at least one of which is a sum: (x+1)(x+2),
    x(x-3), (x+1)^2. 2(x+1) and (9x+3)/2 are not: a constant factor is not factoring."""
    import sympy

    if not isinstance(expr, sympy.Expr) or not expr.free_symbols:
        return False
    count, has_sum = 0, False
    for factor in sympy.Mul.make_args(expr):
        base, exponent = factor.as_base_exp()
        if base.free_symbols and exponent.is_Integer and exponent > 0:
            count += int(exponent)
            has_sum = has_sum or isinstance(base, sympy.Add)
    return count >= 2 and has_sum


_TIMEOUT_WARNINGS = ("Timeout is disabled",)


class _DropDisabledTimeoutWarning(logging.Filter):
    # math-verify warns once that its signal timeouts are off; here they are replaced, not missing.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIMEOUT_WARNINGS)


@functools.lru_cache(maxsize=1)
def _math_verify():
    """math-verify, imported and warmed up (its LaTeX grammar is built on first use). Called by the caller
    before any bounded check: an import takes seconds on a loaded machine and must never be interrupted."""
    import math_verify
    from math_verify import grader, parser

    for module in (grader, parser):
        module.logger.addFilter(_DropDisabledTimeoutWarning())
    warm_up = [math_verify.parse(text, parsing_timeout=None) for text in ("$x+1$", "$1+x$")]
    math_verify.verify(*warm_up, timeout_seconds=None)
    return math_verify


@functools.lru_cache(maxsize=8192)
def _parsed(text: str) -> tuple:
    """math-verify's parse of a normalized answer (cached: majority voting compares each answer many times)."""
    return tuple(_math_verify().parse(f"${text}$", parsing_timeout=None))


def _symbolic_equal(pred: str, gold: str) -> bool:
    gold_parsed, pred_parsed = _parsed(gold), _parsed(pred)
    if not gold_parsed or not pred_parsed:
        return False
    if _factored(gold_parsed[0]) != _factored(pred_parsed[0]):
        return False
    return bool(
        _math_verify().verify(
            list(gold_parsed), list(pred_parsed), float_rounding=9, timeout_seconds=None, raise_on_error=False
        )
    )


class _Deadline(BaseException):
    """Raised asynchronously into a checker thread whose caller stopped waiting. A BaseException, so that the
    `except Exception` blocks inside sympy and math-verify cannot swallow it."""


def _raise_in_thread(thread_id: int, exception: type[BaseException] | None) -> None:
    target = ctypes.py_object(exception) if exception is not None else None  # None clears a pending one
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target)


_WALL_FACTOR = 4
_POLL_S = 0.02  # how often a waiting caller looks at the checker's clock; finished checks return at once


def _thread_cpu_clock(thread_id: int | None) -> Callable[[], float]:
    try:
        clock_id = time.pthread_getcpuclockid(thread_id)
        time.clock_gettime(clock_id)
        return functools.partial(time.clock_gettime, clock_id)
    except (AttributeError, OSError, TypeError):
        return time.monotonic


class _Job:
    def __init__(self, fn: Callable[[], bool]):
        self.fn = fn
        self.result = False
        self.done = threading.Event()
        self.outcome: dict[str, str] = {}  # "owner": "finished" | "abandoned" — set once, atomically
        self.interrupt_sent = False


class _Checker(threading.Thread):
    """A helper thread that runs bounded checks one at a time.

    The budget is CPU time of the checker thread (wall time where the platform has no per-thread clock), so a
    loaded machine slows checks down without turning them into spurious timeouts; wall time is capped at
    `_WALL_FACTOR` times the budget all the same.

    Caller and checker race for `job.outcome["owner"]` with dict.setdefault, which is atomic under the GIL:
    if the checker finishes first its result is used; if the budget runs out first the caller raises
    `_Deadline` in the checker exactly once and returns False. An abandoned checker waits for that exception
    (pending or delivered), clears it and exits, so it can never surface later in shared code; idle checkers
    are reused.
    """

    _idle: list[_Checker] = []

    def __init__(self) -> None:
        super().__init__(name="mathtir-answer-check", daemon=True)
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.start()

    @classmethod
    def run_bounded(cls, fn: Callable[[], bool], timeout: float) -> bool:
        try:
            checker = cls._idle.pop()
        except IndexError:
            checker = cls()
        job = _Job(fn)
        cpu_time = _thread_cpu_clock(checker.ident)
        cpu_start = cpu_time()
        wall_deadline = time.monotonic() + _WALL_FACTOR * timeout
        checker.jobs.put(job)
        while not job.done.wait(_POLL_S):
            if cpu_time() - cpu_start > timeout or time.monotonic() > wall_deadline:
                break
        if job.outcome.setdefault("owner", "abandoned") == "finished":
            job.done.wait()  # the result is being handed over
            return job.result
        _raise_in_thread(checker.ident, _Deadline)
        job.interrupt_sent = True
        return False

    def run(self) -> None:
        while self._serve(self.jobs.get()):
            pass

    def _serve(self, job: _Job) -> bool:
        """Run one job; True to keep serving, False once abandoned (the thread then exits)."""
        try:
            try:
                job.result = bool(job.fn())
            except Exception:  # garbage that sympy or math-verify choke on is simply not equivalent
                job.result = False
            if job.outcome.setdefault("owner", "finished") == "finished":
                job.done.set()
                self._idle.append(self)
                return True
            # Abandoned: exactly one _Deadline is on its way (or was swallowed inside fn). Wait until it has
            # been sent, then clear it if it is still pending.
            while not job.interrupt_sent:
                time.sleep(0.001)
            _raise_in_thread(threading.get_ident(), None)
        except _Deadline:
            pass  # delivered: the caller sends only one, nothing more can arrive
        return False


# A forked child (multiprocessing, Ray workers) inherits the idle list but not the threads behind it.
os.register_at_fork(after_in_child=_Checker._idle.clear)


def _equivalent_normalized(pred: str, gold: str, timeout: float) -> bool:
    if pred.replace(" ", "") == gold.replace(" ", ""):
        return True
    if not pred or not gold:
        return False
    pred_number, gold_number = _plain_number(pred), _plain_number(gold)
    if pred_number is not None and gold_number is not None:
        return _numbers_equal(pred_number, gold_number)
    pred_pair, gold_pair = _ordered_pair(pred), _ordered_pair(gold)
    if pred_pair is not None or gold_pair is not None:
        pred_items = pred_pair if pred_pair is not None else _split_top_level(pred)
        gold_items = gold_pair if gold_pair is not None else _split_top_level(gold)
        if pred_items is None or gold_items is None or len(pred_items) != len(gold_items):
            return False
        return all(
            _equivalent_normalized(normalize_answer(p), normalize_answer(g), timeout)
            for p, g in zip(pred_items, gold_items, strict=True)
        )
    for text in (pred, gold):
        if len(text) > _MAX_SYMBOLIC_CHARS or _NON_ASCII.search(text) or _too_costly(text):
            return False
    _math_verify()
    return _Checker.run_bounded(lambda: _symbolic_equal(pred, gold), timeout)


def is_equivalent(pred: str, gold: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the predicted answer means the gold answer (see the module docstring). Never raises; the
    symbolic step gives up (False) after `timeout` CPU seconds; safe to call from any thread."""
    try:
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        return _equivalent_normalized(normalize_answer(pred), normalize_answer(gold), timeout)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------------------
# Voting
# --------------------------------------------------------------------------------------------------------------


def group_answers(
    answers: Sequence[str | None], *, timeout: float = DEFAULT_TIMEOUT_S
) -> tuple[list[int | None], list[str]]:
    """Equivalence classes of answers: (class index per answer, None for None; representative per class).

    Independent of answer order: distinct normalized spellings are visited most frequent first (then
    alphabetically) and each joins the first class whose representative it is equivalent to; a class's
    representative is its first spelling, written as the alphabetically first original answer with it.
    """
    normalized = [normalize_answer(a) if isinstance(a, str) else None for a in answers]
    counts = Counter(n for n in normalized if n is not None)
    originals: dict[str, str] = {}
    for answer, norm in zip(answers, normalized, strict=True):
        if norm is not None and (norm not in originals or answer < originals[norm]):
            originals[norm] = answer
    class_of: dict[str, int] = {}
    class_keys: list[str] = []
    for norm in sorted(counts, key=lambda n: (-counts[n], n)):
        for index, key in enumerate(class_keys):
            if _safe_equivalent(norm, key, timeout):
                class_of[norm] = index
                break
        else:
            class_of[norm] = len(class_keys)
            class_keys.append(norm)
    labels = [class_of[n] if n is not None else None for n in normalized]
    return labels, [originals[key] for key in class_keys]


def _safe_equivalent(pred_normalized: str, gold_normalized: str, timeout: float) -> bool:
    try:
        return _equivalent_normalized(pred_normalized, gold_normalized, timeout)
    except Exception:
        return False


def top_classes(labels: Sequence[int | None]) -> list[int]:
    """The classes with the most votes, in class order (class order is the deterministic tie-break)."""
    votes = Counter(label for label in labels if label is not None)
    if not votes:
        return []
    most = max(votes.values())
    return sorted(label for label, count in votes.items() if count == most)


def majority_vote(answers: Sequence[str | None], *, timeout: float = DEFAULT_TIMEOUT_S) -> str | None:
    """The answer of the equivalence class with the most votes (`\\frac12`, `0.5` and `1/2` pool theirs);
    None answers do not vote; None when nobody answered. Ties go to the class whose representative is the most
    frequent spelling (then the alphabetically first), so the result never depends on sample order."""
    labels, representatives = group_answers(answers, timeout=timeout)
    top = top_classes(labels)
    return representatives[top[0]] if top else None
