"""Answers: extraction from responses, equivalence and majority voting (metrics over them: mathtir.eval.metrics).

`is_equivalent(pred, gold)` decides in steps, cheapest first:
1. normalization of both strings (`normalize_answer`): strings escaped twice (`\\\\frac`), NFKC (full-width
   digits and symbols), Unicode minus, Japanese numerals (三, 二十五, 3万, 2万5千, 1億2000万), fraction readings
   (3分の2, 1と3分の2), ratios (3対2 = 3:2), clock times (午後3時 = 15時), degree signs, `\\text{}`,
   `\\left`/`\\right`, `\\dfrac`, LaTeX spacing (a matrix row break `\\\\` stays whole), thousands separators
   (1,000, 10,\\!000, 1 000), an escaped dollar (`\\$10`), a trailing comment (`17\\text{ any text}`), a leading
   `x =` or quantity name (`|AB| =`) before a value, solutions separated by `;` or "and" (`p=5,q=2;p=7,q=2` is
   `(5, 2), (7, 2)`); the unit at the end (12個, 1000円, 5cm², 時速60km, 12\\text{ cm}) is split off and kept;
2. units: a unit on both sides must agree, converted exactly within a dimension (1 km = 1000 m, 1時間 = 60分,
   1 L = 1000 mL), so 12cm is not 12m; a unit on one side only is dropped (the problem names it);
   then exact comparison of the normalized values;
3. numbers: when both sides are plain numbers (integers, decimals, fractions, scientific notation) they are
   compared exactly as rationals with a relative tolerance of 1e-9 and the answer is final, so 1/3 is not
   0.333 (nor 0.333333: math-verify's 6-decimal rounding would accept that);
4. symbolic equivalence through math-verify (LaTeX -> sympy), with rules of our own for its known
   misjudgements on Japanese exam answers:
   - `(a, b)` is an ordered pair (coordinates, as Japanese textbooks write them), compared element by element
     in order; math-verify reads it as an open interval, and `(2, 1)` as an empty one equal to `(3, 0)`;
   - lists of answers are sets, compared item by item with these rules; an interval equals the inequality
     that describes it (`(0, 1)` and `0 < f(x) < 1`, `(2, \\infty)` and `x > 2`); an equation equals another equation of the same relation
     (`2x+4y-3=0`, `y=-\\frac{1}{2}x+\\frac{3}{4}`) but never a bare value unless its left side is a variable
     (`(x+y)^2=81` is not 81);
   - form matters for polynomials: a factored answer (`(x+1)(x+2)`, a product of two or more non-constant
     factors, one a sum) is not equivalent to its expansion (`x^2+3x+2`) and vice versa, since 因数分解 and
     展開 problems ask for exactly that form;
   and answers that still contain Japanese text after normalization (`3時間20分`) are compared exactly only,
   because math-verify would pick one number out of them.
A response with several `\\boxed{}` answers is judged by its final box (`extract_answer`), or by its final boxes
when a list mark or connective joins them (`\\boxed{1} and \\boxed{2}` is the answer `1, 2`); math-verify on
the whole response would merge `\\boxed{3}` and `\\boxed{5}` (a correction) into the set {3, 5}.
`extract_answer_with_source` can also read an answer without a box (a fallback, off by default). The full
rules, and how they were checked against the public graders' own test cases, are in docs/grading.md.

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
_MAX_LIST_ITEMS = 20


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------

# One pass over a response: LaTeX escapes first (`\\` is a line break, `\{` a literal brace), then box openings,
# then plain braces.
_BOX_TOKENS = re.compile(r"\\\\|\\[{}]|\\(?:boxed|fbox)(?![A-Za-z])\s*\{|[{}]")
_BOX_BARE = re.compile(r"\\(?:boxed|fbox)[ \t]+([^\s${}\\][^\s$]*)")

# What may stand between boxes that together give one answer (`\boxed{1} and \boxed{2}`, `\boxed{1}, \boxed{2}`,
# `\boxed{1} papers and \boxed{2}`, `\boxed{(3, 3)} \text{ for part (a) and } \boxed{(1, 1)}`, `x = \boxed{1},
# y = \boxed{2}`): besides math delimiters, spacing and \text{} wrappers, a list mark after at most one word, or
# a connective after at most three words (no sentence end), then perhaps the next answer's name. Boxes with nothing
# between them (`\boxed{3} \boxed{5}`) or with other prose (`まず \boxed{3}、やはり \boxed{5}`, `\boxed{1} no no
# \boxed{2}`) are a correction: the last box is the answer.
_GAP_NOISE = re.compile(
    r"\$|\\[()\[\]]|\\q?quad(?![A-Za-z])|\\[,;:! ]|~|\\(?:text|textrm|textnormal|mbox|mathrm)\s*\{([^{}]*)\}"
)
_LIST_GAP = re.compile(
    r"(?:(?:[^\s.。:!?,]+\s*)?[,;、，；]|(?:[^\s.。:!?,]+\s+){0,3}(?:and|or)\s|(?:[^\s.。:!?,]+\s*)?(?:と|または|および))\s*"
    r"(?:[A-Za-z](?:_\{?\w+\}?)?\s*=\s*)?",
    re.IGNORECASE,
)


def extract_answer(text: str, *, ignore_spans: Sequence[tuple[int, int]] = ()) -> str | None:
    """The answer in the final `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) of `text`; None when absent.

    "Final" is the box that closes last; a box cut off by the end of the text (unbalanced braces) does not
    count, so an earlier complete one is used. Nested boxes are unwrapped (`\\boxed{\\boxed{5}}` -> `5`).
    Boxes joined only by a list mark or connective (`\\boxed{1} and \\boxed{2}`, `\\boxed{1}, \\boxed{2}`) are
    one answer, their contents joined by ", " (`1, 2`); boxes separated by nothing or by prose are a
    correction, and the last one counts.

    `ignore_spans` are (start, end) character ranges of `text` that cannot hold the answer, such as the output
    blocks of executed code (a program may print `\\boxed{...}`); the caller finds them, e.g. the output
    segments of `mathtir.formats.parse_response`. Runs in linear time on any input.
    """
    if not isinstance(text, str):
        return None
    if ignore_spans:
        text = _blank_spans(text, ignore_spans)
    boxes = _complete_boxes(text)
    bare = next(reversed(list(_BOX_BARE.finditer(text))), None)
    if bare is not None and (not boxes or bare.end() > boxes[-1][1]):
        answer = bare.group(1).rstrip(".,;:。、")
    elif boxes:
        start, _, content = boxes[-1]
        contents = [content]
        for previous_start, previous_end, previous_content in reversed(boxes[:-1]):
            if not _is_list_gap(text[previous_end:start]):
                break
            contents.append(previous_content)
            start = previous_start
        answer = ", ".join(c for c in map(_unwrap_boxes, reversed(contents)) if c)
    else:
        return None
    return _unwrap_boxes(answer) or None


def _blank_spans(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """`text` with each span replaced by spaces (offsets unchanged)."""
    for start, end in spans:
        start, end = max(0, start), min(len(text), end)
        if end > start:
            text = f"{text[:start]}{' ' * (end - start)}{text[end:]}"
    return text


def _complete_boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every complete box not inside another complete one, in order. A box left open
    (cut off by the end of the text) does not hide the complete boxes after its opening."""
    boxes: list[tuple[int, int, str]] = []
    stack: list[tuple[int, int] | None] = []  # per open brace: (box start, content start) for a box, else None
    for token in _BOX_TOKENS.finditer(text):
        lexeme = token.group()
        if lexeme.startswith("\\\\") or lexeme in ("\\{", "\\}"):
            continue
        if lexeme == "}":
            opened = stack.pop() if stack else None
            if opened is not None:
                while boxes and boxes[-1][0] > opened[0]:
                    boxes.pop()  # nested in this one
                boxes.append((opened[0], token.end(), text[opened[1] : token.start()]))
        elif lexeme == "{":
            stack.append(None)
        else:
            stack.append((token.start(), token.end()))
    return boxes


def _is_list_gap(gap: str) -> bool:
    cleaned = " ".join(_GAP_NOISE.sub(lambda m: f" {m.group(1) or ''} ", gap).split())
    return bool(cleaned) and _LIST_GAP.fullmatch(cleaned + " ") is not None


def _unwrap_boxes(answer: str) -> str:
    answer = answer.strip()
    while (inner := _whole_box_content(answer)) is not None:
        answer = inner  # \boxed{\boxed{5}}: a box holding nothing but another box
    return answer


# Fallback extraction, for responses without a box: the last "答えは …" / "Answer: …" / "The final answer is …"
# phrase, else the last number.
_ANSWER_PHRASE = re.compile(
    r"(?:答え|解答|final answer|answer)\s*(?:は|is|:|：|=)\s*(?P<answer>[^\n]+)", re.IGNORECASE
)
_SENTENCE_END = re.compile(r"。|(?<![0-9])\.(?=\s|$)|\.\s|です|である|となります|になります")
_LAST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def extract_answer_with_source(
    text: str, *, fallback: bool = False, ignore_spans: Sequence[tuple[int, int]] = ()
) -> tuple[str | None, str]:
    """(answer, source): source is "boxed" for an answer from `extract_answer`, "fallback" for one read without
    a box, "none" when there is no answer. The fallback (off by default: a grader that guesses answers from
    prose rewards responses that never commit to one) takes the last "答えは …", "Answer: …" or
    "The final answer is …" phrase up to the end of its sentence, else the last number in the text."""
    answer = extract_answer(text, ignore_spans=ignore_spans)
    if answer is not None:
        return answer, "boxed"
    if not fallback or not isinstance(text, str):
        return None, "none"
    if ignore_spans:
        text = _blank_spans(text, ignore_spans)
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        answer = _SENTENCE_END.split(phrases[-1].group("answer"), maxsplit=1)[0].strip(" $.,:;、。")
        if answer:
            return answer, "fallback"
    numbers = _LAST_NUMBER.findall(text)
    return (numbers[-1], "fallback") if numbers else (None, "none")


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
# A string escaped twice (`\\frac{1}{2}`, as JSON dumped twice or a raw string written with doubled
# backslashes) has a LaTeX command behind `\\`, which in LaTeX is a line break and never precedes a command name.
_TWICE_ESCAPED = re.compile(
    r"(?<!\\)\\\\(?=(?:[dtc]?frac|sqrt|boxed|fbox|left|right|text[a-z]*|math[a-z]+|mbox|pi|cdot|times|div|le|ge|"
    r"leq|geq|ne|neq|infty|circ|pm|mp|begin|in|cup|cap|sin|cos|tan|log|ln|quad|dots|ldots)(?![A-Za-z]))"
)
_ESCAPED_DOLLAR = re.compile(r"\\\$")  # a currency sign (`\$10`), not a math delimiter
_DELIMITERS = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]")
_TEXT_COMMAND_NAMES = "text|textrm|textup|textnormal|textbf|textit|mathrm|mathbf|mathit|mbox|operatorname"
_TEXT_COMMANDS = re.compile(r"\\(?:" + _TEXT_COMMAND_NAMES + r")\s*\{([^{}]*)\}")
# A `\text{...}` at the end of an answer is its unit (`\text{ cm}`) or a comment on it (`\text{ any text}`); a
# `\mathrm{...}` there is a unit (`\mathrm{km}`) or a symbol (`2\mathrm{e}`), never a comment.
_TRAILING_TEXT = re.compile(
    r"(?P<value>.*?)\s*\\(?P<command>" + _TEXT_COMMAND_NAMES + r")\s*\{(?P<words>[^{}]*)\}\s*"
    r"(?P<power>\^\s*\{?[23]\}?)?\s*\.?\s*$",
    re.DOTALL,
)
_COMMENT = re.compile(r"[A-Za-z][A-Za-z .'-]*[A-Za-z.]")  # two letters or more: `\text{e}` would be a symbol
# Spacing commands become a space, except that `\\` (a matrix row break) stays whole and `\!` (negative space, as
# in the thousands separator `10,\!000`) joins its neighbours.
_SPACING = re.compile(r"(\\\\)|\s*\\!\s*|\\[,;: ]|\\q?quad(?![A-Za-z])|~")
_LATEX_REWRITES = [
    (re.compile(r"\\(?:left|right)\.|\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])"), ""),
    (re.compile(r"\\[dtc]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\[dt]binom(?![A-Za-z])"), r"\\binom"),
    (re.compile(r"\\(?:displaystyle|textstyle)(?![A-Za-z])"), ""),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\\leq?(?![A-Za-z])|<="), r"\\le "),
    (re.compile(r"\\geq?(?![A-Za-z])|>="), r"\\ge "),
    (re.compile(r"\\lt(?![A-Za-z])"), "<"),
    (re.compile(r"\\gt(?![A-Za-z])"), ">"),
    (re.compile(r"\\frac\s*([0-9A-Za-z])\s*([0-9A-Za-z])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\frac\s*\{([^{}]*)\}\s*([0-9A-Za-z])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\frac\s*([0-9A-Za-z])\s*\{"), r"\\frac{\1}{"),
    (re.compile(r"\\sqrt\s*([0-9A-Za-z])"), r"\\sqrt{\1}"),
    (re.compile(r"([\^_])\{([0-9A-Za-z])\}"), r"\1\2"),
]

_KANJI_DIGITS = {"〇": 0, "零": 0, "一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_KANJI_SMALL_UNITS = {"十": 10, "百": 100, "千": 1000}
_KANJI_LARGE_UNITS = {"万": 10**4, "億": 10**8, "兆": 10**12}
# Japanese numerals, also written with Arabic digits between the unit characters (3万, 2万5千, 1億2000万).
_JA_NUMERAL = re.compile(r"(?:\d+(?:\.\d+)?|[〇零一二三四五六七八九十百千万億兆])+")
_JA_NUMERAL_TOKEN = re.compile(r"\d+(?:\.\d+)?|.")

_MIXED_FRACTION_READING = re.compile(r"(\d+)\s*と\s*(\d+)\s*分の\s*(\d+)")
_FRACTION_READING = re.compile(r"([0-9A-Za-z.]+|\\sqrt\{[^{}]*\})\s*分の\s*([0-9A-Za-z.]+|\\sqrt\{[^{}]*\})")
_RATIO_READING = re.compile(r"(?<=[\d}])\s*対\s*(?=[-\d\\])")  # 3対2 = 3:2
_CLOCK_READING = re.compile(r"(午前|午後)\s*(\d{1,2})\s*時")  # 午後3時 = 15時
_RATE_PREFIX = re.compile(r"^(?:時速|分速|秒速|毎時|毎分|毎秒)")  # 時速60km: 60 km per hour
_JA_LIST_SEPARATOR = re.compile(r"(?<=[\d}])\s*(?:または|および|か|と)\s*(?=[-0-9A-Za-z\\])")
_LEADING_WORDS = re.compile(r"^(?:答え?\s*(?:は|:)?|約|およそ|ほぼ)\s*")
_TRAILING_WORDS = re.compile(r"\s*(?:です|である|となる|になる|になります|となります|\.)\s*$")

# Units: spelling -> (dimension, size in the dimension's base unit). Sizes are exact, so a unit on both sides
# can be converted (1 km = 1000 m, 1 L = 1000 mL, 1時間 = 60分); a counter (個, 人, 通り...) is a dimension of
# its own. `normalize_answer` keeps the unit after the value; `is_equivalent` requires units on both sides to
# agree and drops a unit given on one side only (the problem statement names it).
_UNITS: dict[str, tuple[str, Fraction]] = {}


def _add_units(dimension: str, size: Fraction | int, spellings: str) -> None:
    for spelling in spellings.split():
        _UNITS[spelling] = (dimension, Fraction(size))


_add_units("length", Fraction(1, 1000), "mm ミリメートル millimeter millimeters")
_add_units("length", Fraction(1, 100), "cm センチメートル centimeter centimeters")
_add_units("length", 1, "m メートル meter meters metre metres")
_add_units("length", 1000, "km キロメートル kilometer kilometers")
_add_units("length", Fraction(1609344, 1000), "mile miles")
_add_units("length", Fraction(3048, 10000), "ft foot feet")
_add_units("length", Fraction(254, 10000), "inch inches")
_add_units("length^2", 1, "平方メートル")
_add_units("length^2", Fraction(1, 10**4), "平方センチメートル")
_add_units("length^2", 10**6, "平方キロメートル")
_add_units("length^3", 1, "立方メートル")
_add_units("length^3", Fraction(1, 10**6), "立方センチメートル mL ml ミリリットル cc")
_add_units("length^3", Fraction(1, 10**4), "dL dl デシリットル")
_add_units("length^3", Fraction(1, 1000), "L l リットル liter liters litre litres")
_add_units("mass", Fraction(1, 1000), "mg ミリグラム")
_add_units("mass", 1, "g グラム gram grams")
_add_units("mass", 1000, "kg キログラム kilogram kilograms")
_add_units("mass", 10**6, "トン")
_add_units("time", 1, "s sec 秒 秒間 second seconds")
_add_units("time", 60, "min 分 分間 minute minutes")
_add_units("time", 3600, "h 時間 hour hours")
_add_units("time", 86400, "日 日間 day days")
_add_units("time", 7 * 86400, "週 週間 week weeks")
_add_units("month", 1, "か月 ヶ月 カ月 ケ月 month months")
_add_units("month", 12, "年 年間 year years")
_add_units("clock", 1, "時")
_add_units("yen", 1, "円 yen")
_add_units("dollar", 1, "ドル dollar dollars")
_add_units("percent", 1, "% パーセント percent pct percentage")
_add_units("percent", 10, "割")
_add_units("angle", 1, "度 degree degrees")
for _counter in (
    "個 つ", "台", "人", "本", "枚", "冊", "匹", "頭", "羽", "回", "歳 才", "倍", "番", "点", "組", "色", "桁",
    "箇所 か所 ヶ所 カ所", "通り", "番目", "杯", "脚", "軒", "件", "曲", "問", "票", "歩", "周", "段", "階", "試合",
    "ページ", "行", "列", "辺", "角", "人分", "個分",
):
    _add_units("counter " + _counter.split()[0], 1, _counter)
_RATE_TIME = {"時速": "h", "毎時": "h", "分速": "min", "毎分": "min", "秒速": "s", "毎秒": "s"}
UNIT_SEPARATOR = "\x1f"  # between value and unit in a normalized answer; a control character no answer contains
_POWER = r"(?P<power>\^\s*\{?[23]\}?|[23])?"
_UNIT_NAMES = "|".join(sorted(map(re.escape, _UNITS), key=len, reverse=True))
# Japanese units and counters never name a variable: taken from the end of any answer. Latin ones could be
# variables (3m, 5g, 2a m): taken only after a value without variables (3, \frac{3}{4}, 2\sqrt{3}). A rate is
# `unit/time` (km/h, m/s, m/分).
_JA_UNIT_SUFFIX = re.compile(
    r"\s*(?P<unit>" + "|".join(sorted((re.escape(u) for u in _UNITS if not u.isascii()), key=len, reverse=True))
    + r")" + _POWER + r"\s*$"
)
_LATIN_UNIT_SUFFIX = re.compile(
    r"^(?P<number>.*?[\d})])\s*(?P<unit>" + _UNIT_NAMES + r")" + _POWER
    + r"(?:\s*/\s*(?P<per>h|s|sec|min|時|分|秒))?$"
)
# Degrees are a unit where an angle is the answer (60°; 30°, 60°); next to a trigonometric function
# (\sin 30^\circ) they are not, and stay for math-verify.
_DEGREE_UNIT = re.compile(r"(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree)(?![A-Za-z])\s*(?=,|$)")
_TRIGONOMETRY = re.compile(r"\\(?:sin|cos|tan|sec|csc|cot)(?![A-Za-z])")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d+)?$")  # 1,000 and 1 000
_LEADING_VARIABLE = re.compile(
    r"^\s*(?:\\[A-Za-z]+|[A-Za-z]{1,3}|\(\s*[A-Za-z](?:\s*,\s*[A-Za-z])+\s*\))(?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z]\))?"
    r"\s*=(?![=<>])\s*"
)
# `|AB|=1`, `A:B=7:32`, `\frac{NO}{BO}=\frac{1}{\sqrt{6}}`: the name of a quantity, then its value.
_NAMED_VALUE = re.compile(r"^(?P<name>[^\d=+\-<>!][^=+\-<>!]*)=(?P<value>[^=<>]+)$")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_VARIABLE = re.compile(r"[A-Za-z]")
_SOLUTION_SEPARATOR = re.compile(r";|,?\s+(?:and|or)\s+")


def _ja_numeral_to_number(run: str) -> str:
    """Japanese numerals to digits (三 -> 3, 二十五 -> 25, 一万二千 -> 12000, 2万5千 -> 25000); runs that are
    not a numeral stay."""
    if not re.search(r"[〇零一二三四五六七八九十百千万億兆]", run):
        return run
    total, section, digit = Fraction(0), Fraction(0), None
    for token in _JA_NUMERAL_TOKEN.findall(run):
        if token[0].isdigit():
            if digit is not None:
                return run
            digit = Fraction(token)
        elif token in _KANJI_DIGITS:
            if digit is not None:  # positional style: 二〇二四
                digit = digit * 10 + _KANJI_DIGITS[token]
            else:
                digit = Fraction(_KANJI_DIGITS[token])
        elif token in _KANJI_SMALL_UNITS:
            section += (1 if digit is None else digit) * _KANJI_SMALL_UNITS[token]
            digit = None
        else:
            section += digit or 0
            if section == 0:
                return run
            total += section * _KANJI_LARGE_UNITS[token]
            section, digit = Fraction(0), None
    value = total + section + (digit or 0)
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def _mixed_fraction(match: re.Match) -> str:
    whole, denominator, numerator = (int(g) for g in match.groups())
    return f"\\frac{{{whole * denominator + numerator}}}{{{denominator}}}"


def _clock_hour(match: re.Match) -> str:
    hour = int(match.group(2)) % 12
    return f"{hour + 12 if match.group(1) == '午後' else hour}時"


def _unit(spelling: str, power: str | None) -> tuple[str, Fraction] | None:
    """(dimension, size) of a unit spelling with an optional power (cm^2, cm2); None if not a unit."""
    found = _UNITS.get(spelling.strip()) or _UNITS.get(spelling.strip().lower())
    if found is None or not power:
        return found
    exponent = int(re.sub(r"\D", "", power))
    if found[0] != "length":
        return None
    return f"length^{exponent}", found[1] ** exponent


def _per(unit: tuple[str, Fraction], time_unit: str) -> tuple[str, Fraction]:
    """The rate unit `unit` per `time_unit` (km and h -> km/h)."""
    time_size = _UNITS[time_unit][1]
    return f"{unit[0]}/time", unit[1] / time_size


def _has_variable(text: str) -> bool:
    return bool(_VARIABLE.search(_COMMAND.sub("", text)))


_MAX_NORMALIZED_CHARS = 2000  # real answers are far shorter; longer text gets NFKC and whitespace only


def normalize_answer(answer: str) -> str:
    """The canonical spelling used for comparison (see the module docstring for the rules). A unit, when there
    is one, follows the value after `UNIT_SEPARATOR` as its dimension and size (`12cm` ->
    "12\\x1flength\\x1f1/100"), so that 12cm and 120mm can be compared and 12cm and 12m never match."""
    if _TWICE_ESCAPED.search(answer):
        answer = answer.replace("\\\\", "\\")
    if "\\boxed" in answer or "\\fbox" in answer:
        answer = extract_answer(answer) or answer  # a whole response: its answer
    if len(answer) > _MAX_NORMALIZED_CHARS:
        # Some rules scan quadratically on long runs; garbage this long is only ever compared exactly.
        return " ".join(unicodedata.normalize("NFKC", answer).split())
    return _normalize(answer)


@functools.lru_cache(maxsize=65536)
def _normalize(answer: str) -> str:
    text = answer.replace(UNIT_SEPARATOR, "")
    text = _SUPERSCRIPT_RUN.sub(lambda m: "^{" + m.group().translate(_SUPERSCRIPTS) + "}", text)
    text = unicodedata.normalize("NFKC", text)
    text = _SYMBOL_RE.sub(lambda m: _SYMBOLS[m.group()], text)
    text = _SQRT_SIGN.sub(lambda m: "\\sqrt{" + next(g for g in m.groups() if g is not None) + "}", text)
    text = _ESCAPED_DOLLAR.sub("", text)
    text = _DELIMITERS.sub("", text).strip()
    unit = None
    trailing = _TRAILING_TEXT.match(text)
    if trailing and trailing.group("value").strip():
        words = trailing.group("words").strip()
        unit = _unit(words, trailing.group("power"))
        comment = trailing.group("command").startswith(("text", "mbox")) and _COMMENT.fullmatch(words)
        if unit is not None or comment:
            text = trailing.group("value")
    for _ in range(3):  # nested \text{\mathrm{cm}}
        text = _TEXT_COMMANDS.sub(r"\1", text)
    text = _SPACING.sub(lambda m: m.group(1) or ("" if "!" in m.group() else " "), text)
    for pattern, replacement in _LATEX_REWRITES:
        text = pattern.sub(replacement, text)
    text = _JA_NUMERAL.sub(lambda m: _ja_numeral_to_number(m.group()), text)
    text = _MIXED_FRACTION_READING.sub(_mixed_fraction, text)
    text = _FRACTION_READING.sub(r"\\frac{\2}{\1}", text)
    text = _RATIO_READING.sub(":", text)
    text = _CLOCK_READING.sub(_clock_hour, text)
    text = _JA_LIST_SEPARATOR.sub(", ", text)
    text = " ".join(text.split())
    rate = _RATE_PREFIX.match(text)
    if rate:
        text = text[rate.end() :].strip()
    previous = None
    while previous != text:
        previous = text
        text = _LEADING_WORDS.sub("", text)
        text = _TRAILING_WORDS.sub("", text)
        if not _TRIGONOMETRY.search(text) and _DEGREE_UNIT.search(text):
            if unit is None and _split_top_level(text) is None:
                unit = _UNITS["度"]
            text = _DEGREE_UNIT.sub("", text)
        text, unit = _take_unit(text, unit)
        if _THOUSANDS.match(text):
            text = text.replace(",", "").replace(" ", "")
        if text.count("=") == 1:
            text = _strip_name(text)
        text = _strip_list_variable(_strip_outer_parentheses(text.strip()))
    text = _join_solutions(text)
    if unit is not None and rate and unit[0] == "length":
        unit = _per(unit, _RATE_TIME[rate.group()])
    return text if unit is None else f"{text}{UNIT_SEPARATOR}{unit[0]}{UNIT_SEPARATOR}{unit[1]}"


def _take_unit(text: str, unit: tuple[str, Fraction] | None) -> tuple[str, tuple[str, Fraction] | None]:
    """`text` without a unit at its end, and the unit (the one found before, if any: the outermost counts)."""
    found = None
    ja = _JA_UNIT_SUFFIX.search(text)
    if ja and text[: ja.start()].strip():
        found = _unit(ja.group("unit"), ja.group("power"))
        rest = text[: ja.start()]
    latin = _LATIN_UNIT_SUFFIX.match(text)
    if latin and found is None and not _has_variable(latin.group("number")):
        found = _unit(latin.group("unit"), latin.group("power"))
        if found is not None and latin.group("per"):
            found = _per(found, latin.group("per"))
        rest = latin.group("number")
    if found is None:
        return text, unit
    return rest.strip(), unit or found


def _strip_name(text: str) -> str:
    """`x = 5` -> `5`, `|AB| = 1` -> `1`: a name, then its value. `y = 2x + 1` (a value with a variable) stays
    an equation; `is_equivalent` compares its right side with an expression and the whole with an equation."""
    name = _LEADING_VARIABLE.match(text)
    if name:
        value = text[name.end() :]
        return value if value and not _has_variable(value) else text
    named = _NAMED_VALUE.match(text)
    if named and _has_variable(named.group("name")) and not _has_variable(named.group("value")):
        return named.group("value").strip()
    return text


def _join_solutions(text: str) -> str:
    """Solutions separated by `;`, "and" or "or" as one list: `p=5,q=2;p=7,q=2` -> `(5, 2), (7, 2)`,
    `-12;-11` -> `-12, -11`, `6 and 8` -> `6, 8`. Inside brackets `;` separates coordinates: `(0;-2;6)`."""
    if ";" not in text and " and " not in text and " or " not in text:
        return text
    chars, depth = list(text), 0
    for i, ch in enumerate(chars):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == ";" and depth > 0:
            chars[i] = ","
    parts = _split_at_depth_zero("".join(chars), _SOLUTION_SEPARATOR)
    if len(parts) < 2 or not all(parts):
        return "".join(chars)
    solutions = []
    for part in parts:
        items = _split_top_level(part)
        if items and all(item.count("=") == 1 for item in items):
            names = [item.split("=")[0].strip() for item in items]
            values = [_strip_name(item) for item in items]
            if len(set(names)) == len(names) and all(v != item for v, item in zip(values, items, strict=True)):
                solutions.append("(" + ", ".join(values) + ")")
                continue
        solutions.append(part)
    return _strip_list_variable(", ".join(solutions))


def _split_at_depth_zero(text: str, separator: re.Pattern) -> list[str]:
    parts, start = [], 0
    for match in separator.finditer(text):
        prefix = text[: match.start()]
        if sum(c in "([{" for c in prefix) == sum(c in ")]}" for c in prefix):
            parts.append(text[start : match.start()].strip())
            start = match.end()
    parts.append(text[start:].strip())
    return parts


def _strip_outer_parentheses(text: str) -> str:
    """`(\\frac{1}{2})` -> `\\frac{1}{2}`: parentheses around a single value mean nothing; plain braces
    around anything are TeX grouping (`{1,3}` is the list 1, 3; a set is written `\\{1, 3\\}`)."""
    while (_encloses(text, "(", ")") and _split_top_level(text[1:-1]) is None) or _encloses(text, "{", "}"):
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


def _split_unit(normalized: str) -> tuple[str, tuple[str, Fraction] | None]:
    value, separator, unit = normalized.partition(UNIT_SEPARATOR)
    if not separator:
        return value, None
    dimension, _, size = unit.partition(UNIT_SEPARATOR)
    return value, (dimension, Fraction(size))


def _equivalent_normalized(pred: str, gold: str, timeout: float) -> bool:
    pred_value, pred_unit = _split_unit(pred)
    gold_value, gold_unit = _split_unit(gold)
    if pred_unit is not None and gold_unit is not None and pred_unit != gold_unit:
        # Units on both sides must agree: the same dimension, and equal amounts once converted (exactly).
        if pred_unit[0] != gold_unit[0]:
            return False
        pred_number, gold_number = _plain_number(pred_value), _plain_number(gold_value)
        return (
            pred_number is not None
            and gold_number is not None
            and _numbers_equal(pred_number * pred_unit[1], gold_number * gold_unit[1])
        )
    return _equivalent_values(pred_value, gold_value, timeout)


def _equivalent_values(pred: str, gold: str, timeout: float) -> bool:
    if pred.replace(" ", "") == gold.replace(" ", ""):
        return True
    if not pred or not gold:
        return False
    pred_number, gold_number = _plain_number(pred), _plain_number(gold)
    if pred_number is not None and gold_number is not None:
        return _numbers_equal(pred_number, gold_number)
    pred_equation, gold_equation = _single_equation(pred), _single_equation(gold)
    if (pred_equation is None) != (gold_equation is None):
        # An equation against an expression: `y = 2x + 1` is its right side; `(x+y)^2 = 81` is not 81.
        lhs, rhs = pred_equation or gold_equation
        other = gold if pred_equation else pred
        if not _LEADING_VARIABLE.match(lhs + "="):
            return False
        return _equivalent_normalized(normalize_answer(rhs), other, timeout)
    pred_interval, gold_interval = _interval(pred), _interval(gold)
    pred_inequality, gold_inequality = _inequality_interval(pred), _inequality_interval(gold)
    if (pred_interval and gold_inequality) or (pred_inequality and gold_interval):
        # `(0, 1)` against `0 < f(x) < 1`: the same set of values.
        left, right = (pred_interval or pred_inequality), (gold_interval or gold_inequality)
        return left[0] == right[0] and left[3] == right[3] and all(
            _equivalent_normalized(normalize_answer(a), normalize_answer(b), timeout)
            for a, b in ((left[1], right[1]), (left[2], right[2]))
        )
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
    pred_items, gold_items = _split_top_level(pred), _split_top_level(gold)
    if pred_items is not None and gold_items is not None:
        # Two lists of answers (solutions, solution tuples): equal as sets, each item by these rules. Long lists
        # are compared by their normalized items only, since item-by-item checks grow with the square.
        if max(len(pred_items), len(gold_items)) > _MAX_LIST_ITEMS:
            return {normalize_answer(i) for i in pred_items} == {normalize_answer(i) for i in gold_items}
        return _covers(pred_items, gold_items, timeout) and _covers(gold_items, pred_items, timeout)
    for text in (pred, gold):
        if len(text) > _MAX_SYMBOLIC_CHARS or _NON_ASCII.search(text) or _too_costly(text):
            return False
    _math_verify()
    return _Checker.run_bounded(lambda: _symbolic_equal(pred, gold), timeout)


def _covers(items: list[str], others: list[str], timeout: float) -> bool:
    """Whether every item is equivalent to one of the others."""
    normalized = [normalize_answer(other) for other in others]
    return all(
        any(_equivalent_normalized(normalize_answer(item), other, timeout) for other in normalized) for item in items
    )


_RELATION = re.compile(r"<|>|\\le |\\ge |\\ne |\\le$|\\ge$|!=|\\in(?![A-Za-z])|\\approx")


def _single_equation(text: str) -> tuple[str, str] | None:
    """(left, right) of `left = right` when that is all of the text (one `=`, no other relation, no list)."""
    if text.count("=") != 1 or _RELATION.search(text) or _split_top_level(text) is not None:
        return None
    lhs, rhs = text.split("=")
    return (lhs.strip(), rhs.strip()) if lhs.strip() and rhs.strip() else None


_INTERVAL = re.compile(r"^(?P<open>[(\[])(?P<inner>.*)(?P<close>[)\]])$")
_CHAINED_INEQUALITY = re.compile(
    r"^(?P<low>[^<>]+?)(?P<left><|\\le )(?P<middle>[^<>]+?)(?P<right><|\\le )(?P<high>[^<>]+)$"
)
_ONE_SIDED_INEQUALITY = re.compile(r"^(?P<left>[^<>=]+?)(?P<relation><|>|\\le |\\ge )(?P<right>[^<>=]+)$")


def _interval(text: str) -> tuple[bool, str, str, bool] | None:
    """(closed on the left, low end, high end, closed on the right) of `(a, b]` and the like."""
    match = _INTERVAL.match(text)
    if match is None:
        return None
    depth = 0
    for ch in text[:-1]:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0:
            return None  # `(1)(2)`: the brackets do not enclose the whole text
    items = _split_top_level(match.group("inner"))
    if items is None or len(items) != 2:
        return None
    return match.group("open") == "[", items[0], items[1], match.group("close") == "]"


def _inequality_interval(text: str) -> tuple[bool, str, str, bool] | None:
    """`a < x \\le b` as the interval (a, b], `x \\ge a` as [a, \\infty): the same description as `_interval`."""
    match = _CHAINED_INEQUALITY.match(text)
    if match is not None and _has_variable(match.group("middle")):
        low, high = match.group("low").strip(), match.group("high").strip()
        return match.group("left") != "<", low, high, match.group("right") != "<"
    match = _ONE_SIDED_INEQUALITY.match(text)
    if match is None:
        return None
    left, relation, right = match.group("left").strip(), match.group("relation"), match.group("right").strip()
    if _has_variable(right) and not _has_variable(left):  # 2 < x: x > 2
        left, right, relation = right, left, {"<": ">", ">": "<", "\\le ": "\\ge ", "\\ge ": "\\le "}[relation]
    if not _has_variable(left) or _has_variable(right):
        return None
    if relation in (">", "\\ge "):
        return relation == "\\ge ", right, "\\infty", False
    return False, "-\\infty", right, relation == "\\le "



def is_equivalent(pred: str, gold: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the predicted answer means the gold answer (see the module docstring). Never raises; the
    symbolic step gives up (False) after `timeout` CPU seconds; safe to call from any thread."""
    try:
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        if pred == gold:  # the common verdict, decided before normalizing both sides
            return True
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
