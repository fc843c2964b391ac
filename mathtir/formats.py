"""The one home of mathtir's text formats, shared by training-data preparation and evaluation.

Three things live here, so that the text a model is trained on and the text it sees at evaluation time can
never drift apart:

- prompt templates (`get_template`): how a problem becomes the text that precedes the response;
- TIR dialects (`get_dialect`): how code, its output and the final `\\boxed{}` answer are laid out inside a
  response, how to parse that layout, and where a sampler must stop to execute code;
- output blocks (`format_output`): how a sandbox result is presented back to the model.

Exact layouts, taken character by character from the two reproduced model cards:

    tir (the competition model):
        <think>\\n...\\n</think>\\n```python\\ntotal = sum(range(1, 101))\\nprint(total)\\n```\\n```output\\n5050\\n```\\n...$$\\boxed{5050}$$
    openmath (OpenMathInstruct-1 style):
        ...しましょう。<llm-code>\\ninitial_cars = 8\\n...\\nprint(remaining)\\n</llm-code><llm-code-output>\\n5\\n</llm-code-output>\\nしたがって...\\boxed{5}...

Texts never contain a BOS token that the tokenizer adds by itself: tokenize them with the tokenizer's default
`add_special_tokens=True`.
"""

from __future__ import annotations

import re
import signal as _signal
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, NamedTuple

# The competition model's system line (the TIR model card's usage example).
TIR_SYSTEM_PROMPT = "あなたは「自然言語の推論」と「Pythonコードの実行」を組み合わせて数学問題を解くアシスタントです。"

# The second model card's system prompt (OpenMathInstruct-1 style, Llama-3 chat template).
OPENMATH_SYSTEM_PROMPT = (
    "あなたは数学の問題を解く優秀なAIアシスタントです。ステップバイステップで考え、Pythonコードを使って計算し、"
    "最終的な答えを明示してください。\n\n"
    "回答は以下のフォーマットに従ってください:\n"
    "1. Pythonコードは <llm-code> と </llm-code> タグで囲んでください\n"
    "2. コードの実行結果は <llm-code-output> と </llm-code-output> タグで囲んでください\n"
    "3. 最終的な答えは \\boxed{答え} の形式で明示してください"
)

TEMPLATE_NAMES = ("llmjp", "chat", "llama3", "chatml")
DIALECT_NAMES = ("tir", "openmath")

# A string that no problem contains: rendered in place of the problem (or the response) to cut a tokenizer's
# chat template into the text before it and the text after it.
_SENTINEL = "\u0000MATHTIR_SLOT\u0000"


# --------------------------------------------------------------------------------------------------------------
# Prompt templates
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt is `prefix + problem + suffix`; a training example appends `response + eos`.

    Every supported template has that shape (the tokenizer's own chat template is cut at a sentinel problem),
    which keeps rendering exact and makes the prompt/response boundary a plain character offset.
    """

    name: str
    prefix: str
    suffix: str
    eos: str
    system: str | None

    def render_prompt(self, problem: str) -> str:
        """The text up to where the response starts."""
        return f"{self.prefix}{problem}{self.suffix}"


def get_template(name: str, *, tokenizer: Any = None, system: str | None = None) -> PromptTemplate:
    """The prompt template called `name` (from config).

    - "llmjp": the llm-jp instruction style of the competition model: a system line, `### 指示:` + problem,
      `### 応答:` + response, then eos (the tokenizer's eos token, else `<|eos|>`). `system` defaults to the
      competition model's system line.
    - "chat": the tokenizer's own `chat_template` (needs `tokenizer`); eos is what the template writes after an
      assistant turn (e.g. `<|eot_id|>`, `<|im_end|>`).
    - "llama3", "chatml": built-in header-tag templates for tokenizers that have no chat template.
    For "chat", "llama3" and "chatml", `system=None` means no system message.
    """
    if name == "llmjp":
        eos = "<|eos|>"
        if tokenizer is not None:
            if not getattr(tokenizer, "eos_token", None):
                raise ValueError("template 'llmjp': the tokenizer has no eos_token to end responses with")
            eos = tokenizer.eos_token
        system_line = TIR_SYSTEM_PROMPT if system is None else system
        prefix = f"{system_line}\n\n### 指示:\n" if system_line else "### 指示:\n"
        return PromptTemplate("llmjp", prefix, "\n\n### 応答:\n", eos, system_line)
    if name == "llama3":
        prefix = ""
        if system is not None:
            prefix = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        prefix += "<|start_header_id|>user<|end_header_id|>\n\n"
        suffix = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        return PromptTemplate("llama3", prefix, suffix, "<|eot_id|>", system)
    if name == "chatml":
        prefix = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        prefix += "<|im_start|>user\n"
        return PromptTemplate("chatml", prefix, "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", system)
    if name == "chat":
        return _template_from_tokenizer(tokenizer, system)
    raise ValueError(f"unknown prompt template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")


def _template_from_tokenizer(tokenizer: Any, system: str | None) -> PromptTemplate:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template 'chat' needs a tokenizer with a chat_template; use 'llama3', 'chatml' or 'llmjp' for "
            "tokenizers without one"
        )
    messages = [{"role": "system", "content": system}] if system is not None else []
    prompt = tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    if prompt.count(_SENTINEL) != 1:
        raise ValueError("template 'chat': the tokenizer's chat template does not render the problem verbatim")
    prefix, suffix = prompt.split(_SENTINEL)
    conversation = tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}],
        tokenize=False,
    )
    head, sep, tail = conversation.partition(_SENTINEL)
    if not sep or not head.endswith(suffix):
        raise ValueError(
            "template 'chat': the tokenizer's chat template does not render an assistant turn right after the "
            "generation prompt, so prompt and training text would disagree"
        )
    eos_token = getattr(tokenizer, "eos_token", None)
    eos = tail[: tail.index(eos_token) + len(eos_token)] if eos_token and eos_token in tail else tail.rstrip()
    if not eos:
        raise ValueError("template 'chat': the chat template writes nothing after an assistant turn (no eos)")
    bos = getattr(tokenizer, "bos_token", None)
    if bos and prefix.startswith(bos) and _tokenizer_adds_bos(tokenizer):
        prefix = prefix[len(bos) :]
    return PromptTemplate("chat", prefix, suffix, eos, system)


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


# --------------------------------------------------------------------------------------------------------------
# TIR dialects and response parsing
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    """How code, code output and notices are laid out inside a response.

    `code_open`/`code_close` and `output_open`/`output_close` are the exact texts written around a block;
    parsing is more tolerant (see the `*_pattern` regexes). `stop_strings` are where a sampler must stop to
    execute code: each ends a closed code block and none matches an opening fence. Keep the matched stop string
    in the response (vLLM `include_stop_str_in_output=True`, or append it back) so that `pending_code` sees a
    closed block.
    """

    name: str
    code_open: str
    code_close: str
    output_open: str
    output_close: str
    stop_strings: tuple[str, ...]
    notice_open: str
    notice_close: str
    code_open_pattern: str
    code_close_pattern: str
    output_open_pattern: str
    output_close_pattern: str

    def code_block(self, code: str) -> str:
        """A code block in this dialect's exact layout."""
        return f"{self.code_open}{code.strip(chr(10))}{self.code_close}"

    def output_block(self, body: str) -> str:
        """An output block in this dialect's exact layout (body without its trailing newlines)."""
        return f"{self.output_open}{body.rstrip(chr(10))}{self.output_close}"

    @cached_property
    def block_patterns(self) -> tuple[re.Pattern, dict[str, re.Pattern]]:
        """The opening of a code or output block, and each kind's closing. Compiled once per dialect and kept
        on it (neither re's cache nor a cache keyed by the dialect's hash is looked up): the TIR loop parses
        every round of every sample."""
        opener = re.compile(f"(?P<code>{self.code_open_pattern})|(?P<output>{self.output_open_pattern})")
        return opener, {"code": re.compile(self.code_close_pattern), "output": re.compile(self.output_close_pattern)}


# A closing fence is ``` at the start of a line, alone on it: "```output" or "```python" never close a block.
_FENCE_CLOSE = r"(?:(?<=\n)|^)```[ \t]*(?:\n|\Z)"

_DIALECTS = {
    "tir": Dialect(
        name="tir",
        code_open="```python\n",
        code_close="\n```\n",
        output_open="```output\n",
        output_close="\n```\n",
        # "```\n" ends a closing fence; an opening fence "```python\n" never contains it.
        stop_strings=("```\n",),
        notice_open="```system\n",
        notice_close="\n```\n",
        code_open_pattern=r"```(?:python|py)[ \t]*\n",
        code_close_pattern=_FENCE_CLOSE,
        output_open_pattern=r"```output[ \t]*\n",
        output_close_pattern=_FENCE_CLOSE,
    ),
    "openmath": Dialect(
        name="openmath",
        code_open="<llm-code>\n",
        code_close="\n</llm-code>",
        output_open="<llm-code-output>\n",
        output_close="\n</llm-code-output>\n",
        # "</llm-code>" cannot match "<llm-code>" (the slash) nor "</llm-code-output>" (the '>').
        stop_strings=("</llm-code>",),
        notice_open="",
        notice_close="\n",
        code_open_pattern=r"<llm-code>",
        code_close_pattern=r"</llm-code>",
        output_open_pattern=r"<llm-code-output>",
        output_close_pattern=r"</llm-code-output>\n?",
    ),
}


def get_dialect(name: str | Dialect) -> Dialect:
    """The TIR dialect called `name`: "tir" or "openmath" (a Dialect is returned as is)."""
    if isinstance(name, Dialect):
        return name
    try:
        return _DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown TIR dialect {name!r}; choose one of {', '.join(DIALECT_NAMES)}") from None


class Segment(NamedTuple):
    """A piece of a response. For code/output, `text` is the block's content without its markers, and
    `start`/`end` span the whole block including the markers. `closed` is False for a block cut off by the
    end of the response. (A named tuple: the TIR loop parses every round of every sample, and a frozen
    dataclass costs several times as much to build.)"""

    kind: Literal["text", "code", "output"]
    text: str
    start: int
    end: int
    closed: bool = True


def _block_body(raw: str) -> str:
    # The layouts put one newline after the opening marker and one before the closing marker.
    if raw.startswith("\n"):
        raw = raw[1:]
    if raw.endswith("\n"):
        raw = raw[:-1]
    return raw


def parse_response(response: str, dialect: str | Dialect) -> list[Segment]:
    """Split a response into text, code and output segments that tile it exactly (in order, no gaps)."""
    opener, closers = get_dialect(dialect).block_patterns
    segments: list[Segment] = []
    pos = 0
    while pos < len(response):
        opened = opener.search(response, pos)
        if opened is None:
            break
        if opened.start() > pos:
            segments.append(Segment("text", response[pos : opened.start()], pos, opened.start()))
        kind = "code" if opened.group("code") is not None else "output"
        closed = closers[kind].search(response, opened.end())
        if closed is None:
            body = response[opened.end() :]
            segments.append(Segment(kind, _block_body(body), opened.start(), len(response), closed=False))
            pos = len(response)
            break
        body = response[opened.end() : closed.start()]
        segments.append(Segment(kind, _block_body(body), opened.start(), closed.end()))
        pos = closed.end()
    if pos < len(response):
        segments.append(Segment("text", response[pos:], pos, len(response)))
    return segments


def pending_code(response: str, dialect: str | Dialect) -> str | None:
    """The code the TIR loop must execute now: that of a closed code block at the end of the response (only
    whitespace after it) with no output block after it. None otherwise (final answer, cut-off block, ...)."""
    segments = parse_response(response, dialect)
    while segments and segments[-1].kind == "text" and not segments[-1].text.strip():
        segments.pop()
    if segments and segments[-1].kind == "code" and segments[-1].closed:
        return segments[-1].text
    return None


# --------------------------------------------------------------------------------------------------------------
# Training examples
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedExample:
    """A training text and the [start, end) character spans whose tokens are trained on."""

    text: str
    train_spans: list[tuple[int, int]]


def render_example(
    problem: str,
    response: str,
    *,
    template: PromptTemplate,
    dialect: str | Dialect,
    train_on_outputs: bool = True,
) -> RenderedExample:
    """`prompt + response + eos` with the prompt masked. With `train_on_outputs=False` the output blocks
    (markers included: the sandbox writes them, not the model) are masked too; the reference trains on them."""
    prompt = template.render_prompt(problem)
    text = f"{prompt}{response}{template.eos}"
    start = len(prompt)
    if train_on_outputs:
        return RenderedExample(text, [(start, len(text))])
    spans: list[tuple[int, int]] = []
    cursor = start
    for segment in parse_response(response, dialect):
        if segment.kind == "output":
            if start + segment.start > cursor:
                spans.append((cursor, start + segment.start))
            cursor = start + segment.end
    if len(text) > cursor:
        spans.append((cursor, len(text)))
    return RenderedExample(text, spans)


# --------------------------------------------------------------------------------------------------------------
# Output blocks
# --------------------------------------------------------------------------------------------------------------

HEAD_CUT_MARKER = "<output cut>"  # the reference sandbox's marker after its first-N-characters cut


@dataclass(frozen=True)
class OutputFormat:
    """How an execution result is shown to the model.

    max_chars: per stream (stdout, error text) before truncation.
    truncation: "head_tail" keeps the first and last halves around an omitted-count marker (the answer is
        usually printed last); "head" keeps the first max_chars and appends `<output cut>`, as the NeMo-Skills
        reference sandbox does.
    errors: "last_line" shows only the exception line; "traceback" shows the traceback with the frames of
        sandbox and library files removed, keeping those of the snippet itself.
    remaining_notice: append a notice with the number of code executions left after each output block.
    """

    max_chars: int = 1000
    truncation: Literal["head_tail", "head"] = "head_tail"
    errors: Literal["last_line", "traceback"] = "last_line"
    remaining_notice: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_chars, int) or self.max_chars < 1:
            raise ValueError(f"OutputFormat.max_chars must be a positive integer, got {self.max_chars!r}")
        if self.truncation not in ("head_tail", "head"):
            raise ValueError(f"OutputFormat.truncation must be 'head_tail' or 'head', got {self.truncation!r}")
        if self.errors not in ("last_line", "traceback"):
            raise ValueError(f"OutputFormat.errors must be 'last_line' or 'traceback', got {self.errors!r}")


def truncate(text: str, fmt: OutputFormat) -> str:
    """Cut `text` to about fmt.max_chars as fmt.truncation says."""
    if len(text) <= fmt.max_chars:
        return text
    if fmt.truncation == "head":
        return text[: fmt.max_chars] + HEAD_CUT_MARKER
    head = fmt.max_chars // 2
    tail = fmt.max_chars - head
    omitted = len(text) - head - tail
    return f"{text[:head]}\n[... {omitted} characters omitted ...]\n{text[len(text) - tail :]}"


_FRAME = re.compile(r'^  File "(?P<file>[^"]*)"')


def snippet_traceback(text: str) -> str:
    """A traceback with only the snippet's own frames (pseudo-files such as "<snippet>", "<string>"); frames
    of real files (the sandbox runner, sympy internals) tell the model nothing it can act on."""
    kept: list[str] = []
    keep_frame = True
    for line in text.splitlines():
        frame = _FRAME.match(line)
        if frame:
            keep_frame = frame.group("file").startswith("<")
        elif not line.startswith("    "):
            keep_frame = True  # exception lines and chaining messages are never part of a frame
        if keep_frame:
            kept.append(line)
    return "\n".join(kept)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _signal_name(number: Any) -> str:
    try:
        return _signal.Signals(int(number)).name
    except (TypeError, ValueError):
        return f"signal {number}"


_TRACEBACK_HEADER = "Traceback (most recent call last)"


def _error_text(result: Any, fmt: OutputFormat) -> str:
    """How an exception is shown. mathtir.sandbox puts the exception line in .error and the traceback (from
    the snippet's first frame on) in .stderr; other executors may put either in either."""
    error = getattr(result, "error", None) or ""
    stderr = getattr(result, "stderr", None) or ""
    if fmt.errors == "traceback":
        source = next((text for text in (error, stderr) if _TRACEBACK_HEADER in text), error or stderr)
        if _TRACEBACK_HEADER in source:
            source = source[source.index(_TRACEBACK_HEADER) :]  # drop unrelated stderr printed before it
        return snippet_traceback(source).strip("\n")
    return _last_line(error or stderr)


def _status_line(result: Any, fmt: OutputFormat) -> str:
    """The line saying why execution did not end normally: the executor's own words when it gave some."""
    status = getattr(result, "status", "ok")
    if status == "ok":
        return ""
    if status == "error":
        return _error_text(result, fmt) or "Error: the code failed without an error message"
    detail = _last_line(getattr(result, "error", None) or "")
    if status == "timeout":
        wall_ms = getattr(result, "wall_ms", None)
        after = f" after {wall_ms / 1000:.1f} s" if wall_ms else ""
        return detail or f"TimeoutError: execution timed out{after}"
    if status == "killed":
        signal_number = getattr(result, "signal", None)
        by = f" by {_signal_name(signal_number)}" if signal_number else ""
        return detail or f"Killed: the process was terminated{by} (out of memory or a resource limit)"
    if status == "output_limit":
        return detail or "OutputLimitError: the code printed too much; the rest of its output was discarded"
    if status == "internal_error":
        return f"SandboxError: the code could not be run{': ' + detail if detail else ''}"
    raise ValueError(f"format_output: unknown result status {status!r}")


def remaining_notice(remaining: int) -> str:
    """The text telling the model how many code executions it has left."""
    if remaining > 0:
        return (
            f"Remaining code executions: {remaining}. When none remain, code will no longer be run; "
            "you can still finish the solution by reasoning."
        )
    return "No code executions remain. Code will no longer be run: finish the solution by reasoning alone."


def format_output(
    result: Any,
    dialect: str | Dialect,
    fmt: OutputFormat | None = None,
    remaining: int | None = None,
) -> str:
    """The complete output block (markers included) for an execution result, ready to append to the trajectory.

    `result` is any object with .status .stdout .stderr .error (mathtir.sandbox.ExecResult). stdout is shown
    for every status, followed by one line (or a filtered traceback) saying why it stopped when it was not "ok".
    `remaining` (code executions left) adds a notice after the block when fmt.remaining_notice is set.
    """
    d = get_dialect(dialect)
    fmt = fmt or OutputFormat()
    parts = []
    stdout = (getattr(result, "stdout", None) or "").rstrip("\n")
    if stdout:
        parts.append(truncate(stdout, fmt))
    status_line = _status_line(result, fmt)
    if status_line:
        parts.append(truncate(status_line, fmt))
    block = d.output_block("\n".join(parts))
    if fmt.remaining_notice and remaining is not None:
        block += f"{d.notice_open}{remaining_notice(remaining)}{d.notice_close}"
    return block
