"""The tool-integrated-reasoning loop for one sample: generate, execute each closed code block, feed back.

    generate until a code block closes (the dialect's stop strings)
    -> execute it in the sandbox, in the state the trajectory's earlier blocks left (notebook-like: the
       interpreter the sandbox kept for it, or the earlier blocks replayed first)
    -> append the formatted output block (and, optionally, a remaining-executions notice)
    -> continue; after the last allowed execution one text-only round (no stop strings), then done.

The budget (--max-tokens) counts every response token, generated and inserted alike. With token-id backends
the loop appends the sampled ids as they are and tokenizes only the inserted output, so the count is exact and
the model sees exactly the ids it produced. With a chat backend (a chat API) the same transcript travels as a
conversation: each generation round is an assistant turn that a closed code block ends, and each output block
(in the dialect's own fences) is the next user message. Each sample is one coroutine: thousands run concurrently and a
sample waiting for the sandbox never holds up the sampler for the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from mathtir.answers import extract_answer_with_source, is_equivalent
from mathtir.eval.problems import Problem
from mathtir.eval.records import SampleRecord, sample_seed
from mathtir.eval.samplers import GenerationRequest, Sampler
from mathtir.formats import Dialect, OutputFormat, PromptTemplate, format_output, parse_response, pending_code

ERROR_STATUSES = ("error", "killed", "output_limit", "internal_error")


class Executor(Protocol):
    async def run(self, code: str, history: list[str]) -> Any:
        """An ExecResult-like object (.status .stdout .stderr .error .truncated)."""


@dataclass(frozen=True)
class TIRConfig:
    max_tokens: int = 4096
    max_code_executions: int = 5
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    answer_fallback: bool = False  # read an unboxed answer from the prose ("答えは…", "Answer: …", last number)


def round_seed(sample_seed_value: int, round_index: int) -> int:
    # Each generation round of a sample gets its own seed, fixed by the sample's identity alone.
    return (sample_seed_value * 1_000_003 + round_index * 7919) % (1 << 63)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


async def run_sample(problem: Problem, sample_index: int, *, sampler: Sampler, executor: Executor,
                     tokenizer: Tokenizer | None, template: PromptTemplate, dialect: Dialect,
                     output_format: OutputFormat, config: TIRConfig, attempt: int = 1) -> SampleRecord:
    seed = sample_seed(config.seed, problem.id, sample_index)
    prompt_text = template.render_prompt(problem.problem)
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=True) if sampler.uses_token_ids else []
    response_ids: list[int] = []
    response_text = ""
    response_tokens = generated_tokens = inserted_tokens = 0
    executed: list[str] = []
    chat = getattr(sampler, "chat", False)
    # chat: the finished turns, and what the assistant has written since the last output block
    messages = ([{"role": "system", "content": template.system}] if template.system else []) + [
        {"role": "user", "content": problem.problem}]
    assistant_turn = ""
    timeouts = exec_errors = 0
    generation_s = execution_s = 0.0
    finish_reason = "length"
    round_index = 0
    while True:
        budget = config.max_tokens - response_tokens
        if budget <= 0:
            finish_reason = "length"
            break
        code_allowed = len(executed) < config.max_code_executions
        conversation = []
        if chat:  # a round that continues an unfinished assistant turn sends it as the last message
            conversation = messages + ([{"role": "assistant", "content": assistant_turn}] if assistant_turn else [])
        request = GenerationRequest(
            prompt_ids=prompt_ids + response_ids, prompt_text=prompt_text + response_text,
            max_new_tokens=budget, stop=dialect.stop_strings if code_allowed else (),
            temperature=config.temperature, top_p=config.top_p, seed=round_seed(seed, round_index),
            messages=conversation)
        round_index += 1
        started = time.perf_counter()
        generation = await sampler.generate(request)
        generation_s += time.perf_counter() - started
        response_ids += generation.token_ids
        response_text += generation.text
        assistant_turn += generation.text
        response_tokens += generation.num_tokens
        generated_tokens += generation.num_tokens
        if generation.finish_reason != "stop":
            finish_reason = generation.finish_reason
            break
        code = pending_code(response_text, dialect)
        if code is None:
            continue  # the stop string closed something other than a code block: keep generating
        started = time.perf_counter()
        result = await executor.run(code, list(executed))
        execution_s += time.perf_counter() - started
        executed.append(code)
        timeouts += result.status == "timeout"
        exec_errors += result.status in ERROR_STATUSES
        remaining = config.max_code_executions - len(executed)
        output_text = format_output(result, dialect, output_format, remaining=remaining)
        if sampler.uses_token_ids:
            output_ids = tokenizer.encode(output_text, add_special_tokens=False)
            n_output = len(output_ids)
        else:
            output_ids, n_output = [], count_tokens(tokenizer, output_text)
        if n_output > config.max_tokens - response_tokens:
            # The output block does not fit the budget: the sample ends here, as a generation would.
            finish_reason = "length"
            break
        response_ids += output_ids
        response_text += output_text
        if chat:
            messages += [{"role": "assistant", "content": assistant_turn}, {"role": "user", "content": output_text}]
            assistant_turn = ""
        response_tokens += n_output
        inserted_tokens += n_output

    # The answer is the model's own: a \boxed{} that executed code printed into an output block is not it.
    outputs = [(s.start, s.end) for s in parse_response(response_text, dialect) if s.kind == "output"]
    answer, answer_source = extract_answer_with_source(response_text, fallback=config.answer_fallback,
                                                       ignore_spans=outputs)
    return SampleRecord(
        problem_id=problem.id, sample_index=sample_index, seed=seed, text=response_text, answer=answer,
        answer_source=answer_source,
        # graded once, here; the metrics read this verdict
        correct=answer is not None and is_equivalent(answer, problem.expected_answer),
        code_rounds=len(executed), timeouts=timeouts, exec_errors=exec_errors,
        prompt_tokens=len(prompt_ids) if sampler.uses_token_ids else count_tokens(tokenizer, prompt_text),
        generated_tokens=generated_tokens, inserted_tokens=inserted_tokens,
        generation_s=round(generation_s, 4), execution_s=round(execution_s, 4),
        finish_reason=finish_reason, attempt=attempt)


def count_tokens(tokenizer: Tokenizer | None, text: str) -> int:
    """Tokens of text for text backends: exact with the model's tokenizer; without one, a deliberate
    overestimate (one token per 3 UTF-8 bytes) so the budget is never exceeded."""
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return -(-len(text.encode()) // 3)
