"""mathtir.formats against the two model cards' exact layouts and the TIR loop's needs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mathtir.formats import (
    HEAD_CUT_MARKER,
    OPENMATH_SYSTEM_PROMPT,
    OutputFormat,
    format_output,
    get_dialect,
    get_template,
    parse_response,
    pending_code,
    render_example,
    snippet_traceback,
)

# The TIR model card's example output, character by character.
TIR_CARD = (
    "<think>\nPython を使ってシミュレーションしよう。\n</think>\n"
    "```python\ntotal = sum(range(1, 101))\nprint(total)\n```\n"
    "```output\n5050\n```\n"
    "<think>\n計算結果は5050です。\n</think>\n1から100までの自然数の和は:\n$$\\boxed{5050}$$"
)
TIR_CODE = "total = sum(range(1, 101))\nprint(total)"

# The OpenMath card's expected output, character by character.
OPENMATH_CARD = (
    "Pythonコードを使用してこの問題を解決しましょう。<llm-code>\n"
    "initial_cars = 8\ngiven_away = 3\nremaining = initial_cars - given_away\nprint(remaining)\n"
    "</llm-code><llm-code-output>\n5\n</llm-code-output>\n"
    "したがって、ジェイデンには \\boxed{5} 台のおもちゃの車が残っています。"
)
OPENMATH_CODE = "initial_cars = 8\ngiven_away = 3\nremaining = initial_cars - given_away\nprint(remaining)"


@dataclass
class Result:
    """The fields of mathtir.sandbox.ExecResult that format_output reads."""

    status: str = "ok"
    stdout: str = ""
    stderr: str = ""
    error: str = ""
    exit_code: int | None = 0
    signal: int | None = None
    wall_ms: float = 12.0
    truncated: bool = False


def test_tir_card_example_is_rebuilt_exactly_from_code_and_result():
    tir = get_dialect("tir")
    text = (
        "<think>\nPython を使ってシミュレーションしよう。\n</think>\n"
        + tir.code_block(TIR_CODE)
        + format_output(Result(stdout="5050\n"), tir, OutputFormat())
        + "<think>\n計算結果は5050です。\n</think>\n1から100までの自然数の和は:\n$$\\boxed{5050}$$"
    )
    assert text == TIR_CARD


def test_openmath_card_example_is_rebuilt_exactly_from_code_and_result():
    om = get_dialect("openmath")
    text = (
        "Pythonコードを使用してこの問題を解決しましょう。"
        + om.code_block(OPENMATH_CODE)
        + format_output(Result(stdout="5\n"), om, OutputFormat())
        + "したがって、ジェイデンには \\boxed{5} 台のおもちゃの車が残っています。"
    )
    assert text == OPENMATH_CARD


@pytest.mark.parametrize(
    "dialect,card,code,output",
    [("tir", TIR_CARD, TIR_CODE, "5050"), ("openmath", OPENMATH_CARD, OPENMATH_CODE, "5")],
)
def test_parse_response_tiles_the_card_examples(dialect, card, code, output):
    segments = parse_response(card, dialect)
    assert [s.kind for s in segments] == ["text", "code", "output", "text"]
    assert segments[1].text == code and segments[2].text == output
    assert all(s.closed for s in segments)
    # Segments tile the response exactly: no gaps, no overlaps.
    assert segments[0].start == 0 and segments[-1].end == len(card)
    assert all(a.end == b.start for a, b in zip(segments, segments[1:], strict=False))
    assert "".join(card[s.start : s.end] for s in segments) == card


@pytest.mark.parametrize("dialect,card,code", [("tir", TIR_CARD, TIR_CODE), ("openmath", OPENMATH_CARD, OPENMATH_CODE)])
def test_sampler_stopping_at_stop_strings_leaves_exactly_the_pending_code(dialect, card, code):
    d = get_dialect(dialect)
    # What the model generates on its own: everything up to where the sandbox's output block would begin.
    generated = card[: card.index(d.output_open)] + "MODEL WOULD HALLUCINATE OUTPUT HERE"
    first_stop = min(generated.find(s) + len(s) for s in d.stop_strings if s in generated)
    stopped = generated[:first_stop]  # the stop string kept in the output
    assert pending_code(stopped, d) == code
    # The opening fence alone must not stop generation.
    assert not any(s in card[: card.index(d.code_open) + len(d.code_open)] for s in d.stop_strings)


def test_tir_stop_string_does_not_match_an_opening_python_fence():
    tir = get_dialect("tir")
    for opening in ("```python\n", "```python", "```py\n", "```output\n"):
        assert not any(s in opening for s in tir.stop_strings)


def test_pending_code_is_none_when_there_is_nothing_to_execute():
    tir_output_start = TIR_CARD.index("```output")
    assert pending_code(TIR_CARD, "tir") is None  # final answer
    assert pending_code(TIR_CARD[: tir_output_start + len("```output\n50")], "tir") is None  # inside an output
    assert pending_code("<think>\n```python\nx = 1\nprint(x", "tir") is None  # cut-off code block
    assert pending_code("考えよう。", "tir") is None
    assert pending_code(TIR_CARD[:tir_output_start] + "\n  \n", "tir") == TIR_CODE  # trailing whitespace ok
    assert pending_code(TIR_CARD[:tir_output_start] + "more text", "tir") is None
    assert pending_code(OPENMATH_CARD, "openmath") is None
    # A second code block after an answered one is the pending one.
    second = TIR_CARD[: TIR_CARD.index("<think>\n計算")] + "```python\nprint(2)\n```\n"
    assert pending_code(second, "tir") == "print(2)"


def test_unclosed_blocks_are_reported_not_dropped():
    response = "text\n```python\nx = 1\n"
    segments = parse_response(response, "tir")
    assert [s.kind for s in segments] == ["text", "code"]
    assert segments[1].closed is False and segments[1].text == "x = 1" and segments[1].end == len(response)


def test_a_fence_opening_an_output_block_does_not_close_a_code_block():
    response = "```python\nprint(1)\n```output\n1\n```\n"
    segments = parse_response(response, "tir")
    assert segments[0].kind == "code" and segments[0].text == "print(1)\n```output\n1"


def test_llmjp_template_matches_the_competition_prompt():
    template = get_template("llmjp")
    assert template.render_prompt("1から100までの自然数の和を求めてください。") == (
        "あなたは「自然言語の推論」と「Pythonコードの実行」を組み合わせて数学問題を解くアシスタントです。\n\n"
        "### 指示:\n1から100までの自然数の和を求めてください。\n\n### 応答:\n"
    )
    assert template.eos == "<|eos|>"
    assert get_template("llmjp", system="").render_prompt("p") == "### 指示:\np\n\n### 応答:\n"


def test_builtin_header_tag_templates():
    llama3 = get_template("llama3", system="S")
    assert llama3.render_prompt("P") == (
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nP<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert llama3.eos == "<|eot_id|>"
    chatml = get_template("chatml")
    assert chatml.render_prompt("P") == "<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\n"
    assert chatml.eos == "<|im_end|>"


LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(chat_template, *, bos, eos, adds_bos):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, bos: 1, eos: 2, "a": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_chat_template_from_a_llama3_tokenizer_equals_the_builtin_one():
    tokenizer = _tokenizer(LLAMA3_JINJA, bos="<|begin_of_text|>", eos="<|eot_id|>", adds_bos=True)
    chat = get_template("chat", tokenizer=tokenizer, system=OPENMATH_SYSTEM_PROMPT)
    builtin = get_template("llama3", system=OPENMATH_SYSTEM_PROMPT)
    # The BOS the tokenizer adds by itself is not in the text.
    assert chat.render_prompt("問題") == builtin.render_prompt("問題")
    assert chat.eos == builtin.eos


def test_chat_template_from_a_chatml_tokenizer():
    tokenizer = _tokenizer(CHATML_JINJA, bos="<|im_start|>", eos="<|im_end|>", adds_bos=False)
    chat = get_template("chat", tokenizer=tokenizer)
    assert chat.render_prompt("P") == get_template("chatml").render_prompt("P")
    assert chat.eos == "<|im_end|>"


def test_template_errors_are_clear():
    with pytest.raises(ValueError, match="unknown prompt template 'alpaca'"):
        get_template("alpaca")
    with pytest.raises(ValueError, match="chat_template"):
        get_template("chat")
    with pytest.raises(ValueError, match="unknown TIR dialect 'xml'"):
        get_dialect("xml")


def test_render_example_masks_the_prompt_and_optionally_the_outputs():
    template = get_template("llmjp")
    prompt = template.render_prompt("1から100までの自然数の和を求めてください。")
    trained_all = render_example("1から100までの自然数の和を求めてください。", TIR_CARD, template=template, dialect="tir")
    assert trained_all.text == prompt + TIR_CARD + "<|eos|>"
    assert trained_all.train_spans == [(len(prompt), len(trained_all.text))]

    masked = render_example(
        "1から100までの自然数の和を求めてください。", TIR_CARD, template=template, dialect="tir", train_on_outputs=False
    )
    trained = "".join(masked.text[a:b] for a, b in masked.train_spans)
    assert trained == TIR_CARD.replace("```output\n5050\n```\n", "") + "<|eos|>"
    assert "print(total)\n```\n" in trained  # the closing fence (the stop string) is trained on
    assert all(a < b for a, b in masked.train_spans)


def test_render_example_masks_every_openmath_output_block():
    om = get_dialect("openmath")
    response = (
        "まず計算します。" + om.code_block("print(2)") + om.output_block("2")
        + "次に。" + om.code_block("print(3)") + om.output_block("3") + "\\boxed{5}"
    )
    example = render_example("q", response, template=get_template("chatml"), dialect=om, train_on_outputs=False)
    trained = "".join(example.text[a:b] for a, b in example.train_spans)
    assert "<llm-code-output>" not in trained and "print(3)" in trained and trained.endswith("\\boxed{5}<|im_end|>")
    assert len(example.train_spans) == 3


def test_head_truncation_matches_the_reference_sandbox():
    stdout = "".join(f"{i}\n" for i in range(1000))
    block = format_output(Result(stdout=stdout), "tir", OutputFormat(truncation="head"))
    body = block[len("```output\n") : -len("\n```\n")]
    assert body == stdout[:1000] + HEAD_CUT_MARKER


def test_head_tail_truncation_keeps_the_last_printed_answer_and_counts_what_it_omits():
    stdout = "".join(f"step {i}\n" for i in range(500)) + "answer 42\n"
    body = format_output(Result(stdout=stdout), "tir", OutputFormat(max_chars=200))
    assert body.startswith("```output\nstep 0\n") and body.endswith("answer 42\n```\n")
    kept_before, _, rest = body[len("```output\n") :].partition("\n[... ")
    omitted = int(rest.split(" ")[0])
    assert len(kept_before) + omitted + 100 == len(stdout.rstrip("\n"))


TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/opt/mathtir/sandbox/worker.py", line 88, in run_snippet\n'
    "    exec(compiled, namespace)\n"
    '  File "<snippet>", line 3, in <module>\n'
    "    print(f(0))\n"
    "          ^^^^\n"
    '  File "<snippet>", line 2, in f\n'
    "    return 1 / x\n"
    "           ~~^~~\n"
    "ZeroDivisionError: division by zero\n"
)


def test_errors_as_last_line_or_snippet_traceback():
    result = Result(status="error", stdout="start\n", stderr=TRACEBACK, error=TRACEBACK, exit_code=1)
    assert format_output(result, "tir", OutputFormat()) == (
        "```output\nstart\nZeroDivisionError: division by zero\n```\n"
    )
    shown = format_output(result, "tir", OutputFormat(errors="traceback"))
    assert "worker.py" not in shown and "exec(compiled" not in shown
    assert shown == (
        "```output\nstart\nTraceback (most recent call last):\n"
        '  File "<snippet>", line 3, in <module>\n    print(f(0))\n          ^^^^\n'
        '  File "<snippet>", line 2, in f\n    return 1 / x\n           ~~^~~\n'
        "ZeroDivisionError: division by zero\n```\n"
    )


def test_sandbox_layout_exception_line_in_error_traceback_in_stderr():
    # mathtir.sandbox: .error is the exception line, .stderr holds whatever the snippet wrote, then the
    # traceback from the snippet's first frame ("<cell>") on.
    traceback_text = (
        "Traceback (most recent call last):\n"
        '  File "<cell>", line 1, in <module>\n    import numpyy\n'
        "ModuleNotFoundError: No module named 'numpyy'\n"
    )
    result = Result(status="error", stderr="debug line\n" + traceback_text, error="ModuleNotFoundError: No module named 'numpyy'")
    assert format_output(result, "tir", OutputFormat()) == (
        "```output\nModuleNotFoundError: No module named 'numpyy'\n```\n"
    )
    shown = format_output(result, "tir", OutputFormat(errors="traceback"))
    assert shown == "```output\n" + traceback_text + "```\n"
    timeout = Result(status="timeout", error="Timeout: exceeded the 10 s time limit", wall_ms=10_020)
    assert format_output(timeout, "tir") == "```output\nTimeout: exceeded the 10 s time limit\n```\n"


def test_chained_exception_keeps_both_exception_lines():
    chained = (
        "Traceback (most recent call last):\n"
        '  File "<snippet>", line 2, in <module>\n    int("x")\n'
        "ValueError: invalid literal for int() with base 10: 'x'\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3.11/site-packages/sympy/core/sympify.py", line 9, in sympify\n    raise X\n'
        '  File "<snippet>", line 4, in <module>\n    raise KeyError(1)\n'
        "KeyError: 1"
    )
    shown = snippet_traceback(chained)
    assert "sympify" not in shown and "ValueError: invalid literal" in shown and shown.endswith("KeyError: 1")
    assert "During handling of the above exception" in shown


def test_abnormal_statuses_say_what_happened_after_any_output():
    timeout = format_output(Result(status="timeout", stdout="partial\n", wall_ms=10_000), "tir", OutputFormat())
    assert timeout == "```output\npartial\nTimeoutError: execution timed out after 10.0 s\n```\n"
    killed = format_output(Result(status="killed", signal=9, exit_code=None), "openmath", OutputFormat())
    assert killed.startswith("<llm-code-output>\nKilled") and "SIGKILL" in killed
    assert killed.endswith("\n</llm-code-output>\n")
    flood = format_output(Result(status="output_limit", stdout="x" * 5000, truncated=True), "tir", OutputFormat())
    assert "OutputLimitError" in flood and len(flood) < 1200
    assert "SandboxError" in format_output(Result(status="internal_error", error="worker died"), "tir")
    with pytest.raises(ValueError, match="unknown result status 'weird'"):
        format_output(Result(status="weird"), "tir", OutputFormat())


def test_remaining_executions_notice_follows_the_output_block():
    fmt = OutputFormat(remaining_notice=True)
    block = format_output(Result(stdout="5\n"), "tir", fmt, remaining=2)
    assert block.startswith("```output\n5\n```\n```system\nRemaining code executions: 2.")
    assert block.endswith("\n```\n")
    last = format_output(Result(stdout="5\n"), "tir", fmt, remaining=0)
    assert "No code executions remain" in last
    assert format_output(Result(stdout="5\n"), "tir", OutputFormat(), remaining=2) == "```output\n5\n```\n"
    # The notice is text after the block: it never opens a code block or hides one from pending_code.
    assert pending_code(TIR_CARD[: TIR_CARD.index("```output")] + block, "tir") is None


def test_output_format_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="truncation"):
        OutputFormat(truncation="tail")
    with pytest.raises(ValueError, match="max_chars"):
        OutputFormat(max_chars=0)
    with pytest.raises(ValueError, match="errors"):
        OutputFormat(errors="full")


def test_chat_template_of_the_real_smollm2_tokenizer(smollm2_hf_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1は?"}]
    template = get_template("chat", tokenizer=tokenizer, system="S")
    assert template.render_prompt("1+1は?") == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert template.eos == tokenizer.eos_token == "<|im_end|>"
    # The template's own default system prompt is kept when none is given.
    assert "SmolLM" in get_template("chat", tokenizer=tokenizer).render_prompt("q")
    # A rendered training example tokenizes to prompt tokens followed by response tokens ending in eos.
    example = render_example("1+1は?", "\\boxed{2}", template=template, dialect="tir")
    ids = tokenizer(example.text)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
