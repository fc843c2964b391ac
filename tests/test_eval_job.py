"""The evaluation job with real models, a real sandbox and a real Ray head on loopback.

Models: SmolLM2-135M (real weights) and a tiny Llama whose weights were trained here for a few seconds to
memorize three TIR trajectories, so a test can rely on it writing a code block; one memorized output is
deliberately wrong (44 for sum(range(10))), so the sandbox's real output (45) is visibly what got inserted.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from cluster.ray_head import ray_head  # noqa: F401  (fixture)

from mathtir.eval.data import Problem
from mathtir.eval.sampling import GenerationRequest
from mathtir.eval.tir import TIRConfig, run_sample
from mathtir.formats import OutputFormat, get_dialect, get_template

REPO = Path(__file__).resolve().parent.parent
TIR_TINY_VERSION = "eval-tir-tiny-v1"
# (problem, code, output the model memorized, expected answer in the test data)
MEMORIZED = [("What is 6 times 7?", "print(6*7)", "42", "42"),
             ("What is 2 to the power 10?", "print(2**10)", "1024", "1024"),
             ("Sum the integers below 10.", "print(sum(range(10)))", "44", "45")]
PROBLEMS = [Problem(f"p{i}", q, gold, "arith" if i < 2 else "sums") for i, (q, _, _, gold) in enumerate(MEMORIZED)]


def memorized_response(code: str, output: str, eos: str) -> str:
    return f"I will compute it.\n```python\n{code}\n```\n```output\n{output}\n```\nThe answer is \\boxed{{{output}}}.{eos}"


@pytest.fixture(scope="session")
def tir_tiny_dir(model_cache_dir, tiny_llama_dir) -> Path:
    """tiny_llama_dir trained to reproduce MEMORIZED under the chat template (cached per machine)."""
    out = model_cache_dir / TIR_TINY_VERSION
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    template = get_template("chat", tokenizer=tokenizer)
    rows = []
    for problem, code, output, _ in MEMORIZED:
        prompt = tokenizer.encode(template.render_prompt(problem), add_special_tokens=True)
        response = tokenizer.encode(memorized_response(code, output, template.eos), add_special_tokens=False)
        rows.append((prompt, response))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p): len(p) + len(r)] = torch.tensor(r)
        mask[i, : len(p) + len(r)] = 1
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05, f"the tiny model did not memorize its trajectories (loss {loss.item():.3f})"
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def tir_sampler(tir_tiny_dir):
    from mathtir.eval.hf_sampler import HFSampler

    return HFSampler(tir_tiny_dir, max_batch_size=8, num_threads=1)


@pytest.fixture(scope="module")
def sandbox_executor():
    from mathtir.eval.execution import PoolExecutor
    from mathtir.sandbox import SandboxPool

    with SandboxPool(workers=1) as pool:
        yield PoolExecutor(pool, timeout=10)


def prompt_ids(sampler, problem: str) -> list[int]:
    template = get_template("chat", tokenizer=sampler.tokenizer)
    return sampler.tokenizer.encode(template.render_prompt(problem), add_special_tokens=True)


# -- the HF sampler ------------------------------------------------------------------------------------------

def test_hf_sampler_stop_strings_budget_and_eos(tir_sampler):
    ids = prompt_ids(tir_sampler, MEMORIZED[0][0])

    async def go():
        base = dict(prompt_ids=ids, prompt_text="", temperature=0.0, top_p=1.0, seed=0)
        return await asyncio.gather(
            tir_sampler.generate(GenerationRequest(max_new_tokens=200, stop=("```\n",), **base)),
            tir_sampler.generate(GenerationRequest(max_new_tokens=5, stop=("```\n",), **base)),
            tir_sampler.generate(GenerationRequest(max_new_tokens=200, stop=(), **base)))

    stopped, cut, whole = asyncio.run(go())
    assert stopped.finish_reason == "stop" and stopped.text.endswith("print(6*7)\n```\n")
    assert stopped.num_tokens == len(stopped.token_ids)
    assert cut.finish_reason == "length" and cut.num_tokens == 5 and cut.token_ids == stopped.token_ids[:5]
    assert whole.finish_reason == "eos" and whole.text.endswith("\\boxed{42}.")
    assert whole.token_ids[-1] in tir_sampler.eos_ids and whole.token_ids[: stopped.num_tokens] == stopped.token_ids
    assert "<|im_end|>" not in whole.text


def test_hf_sampler_seeds_do_not_depend_on_batch(tiny_llama_dir):
    """A sample's tokens depend on its seed only, not on what shares its batch (resume needs this)."""
    from mathtir.eval.hf_sampler import HFSampler

    sampler = HFSampler(tiny_llama_dir, max_batch_size=8, num_threads=1)
    short, long_ = [1, 2, 3], list(range(10, 40))

    def request(ids, seed, n=12):
        return GenerationRequest(prompt_ids=ids, prompt_text="", max_new_tokens=n, stop=(), temperature=1.0,
                                 top_p=0.9, seed=seed)

    async def go():
        alone = await sampler.generate(request(short, 7))
        together = await asyncio.gather(sampler.generate(request(long_, 1, 20)), sampler.generate(request(short, 7)),
                                        sampler.generate(request(short, 8)))
        return alone, together

    alone, (other, again, different_seed) = asyncio.run(go())
    assert sampler.stats()["batches"] == 2  # the three concurrent requests shared one batch
    assert again.token_ids == alone.token_ids
    assert different_seed.token_ids != alone.token_ids
    assert other.num_tokens == 20 or other.finish_reason == "eos"


# -- the TIR loop --------------------------------------------------------------------------------------------

def run_loop(sampler, executor, problem, *, max_tokens=200, max_code_executions=2, notice=False, index=0):
    return asyncio.run(run_sample(
        problem, index, sampler=sampler, executor=executor, tokenizer=sampler.tokenizer,
        template=get_template("chat", tokenizer=sampler.tokenizer), dialect=get_dialect("tir"),
        output_format=OutputFormat(remaining_notice=notice),
        config=TIRConfig(max_tokens=max_tokens, max_code_executions=max_code_executions, temperature=0.0)))


def test_tir_loop_executes_code_and_inserts_real_output(tir_sampler, sandbox_executor):
    record = run_loop(tir_sampler, sandbox_executor, PROBLEMS[2])
    # The sandbox printed 45 (the model memorized 44): the inserted block is the real output.
    assert record.text.startswith("I will compute it.\n```python\nprint(sum(range(10)))\n```\n```output\n45\n```\n")
    assert record.code_rounds >= 1 and record.timeouts == 0
    assert record.inserted_tokens > 0 and record.generated_tokens + record.inserted_tokens <= 200

    right = run_loop(tir_sampler, sandbox_executor, PROBLEMS[0])
    assert right.answer == "42" and right.correct and right.finish_reason == "eos" and right.code_rounds == 1
    assert right.text.endswith("```output\n42\n```\nThe answer is \\boxed{42}.")


def test_tir_loop_notice_and_execution_limit(tir_sampler, sandbox_executor):
    # The notice was never seen in training, so the model rambles on: the loop must still stop executing
    # after the allowed number of blocks and keep the whole response within the budget.
    record = run_loop(tir_sampler, sandbox_executor, PROBLEMS[0], notice=True, max_code_executions=2,
                      max_tokens=160)
    assert "```output\n42\n```\n```system\nRemaining code executions: 1." in record.text
    assert record.code_rounds <= 2
    assert record.generated_tokens + record.inserted_tokens <= 160
    assert record.text.count("```system\n") <= record.code_rounds  # notices come only with real outputs


def test_tir_budget_counts_inserted_output(tir_sampler, sandbox_executor):
    until_code = asyncio.run(tir_sampler.generate(GenerationRequest(
        prompt_ids=prompt_ids(tir_sampler, MEMORIZED[0][0]), prompt_text="", max_new_tokens=200,
        stop=("```\n",), temperature=0.0, top_p=1.0, seed=0))).num_tokens
    output_tokens = len(tir_sampler.tokenizer.encode("```output\n42\n```\n", add_special_tokens=False))

    no_room = run_loop(tir_sampler, sandbox_executor, PROBLEMS[0], max_tokens=until_code + output_tokens - 1)
    assert no_room.code_rounds == 1 and no_room.inserted_tokens == 0 and no_room.finish_reason == "length"
    assert no_room.generated_tokens == until_code

    exact = run_loop(tir_sampler, sandbox_executor, PROBLEMS[0], max_tokens=until_code + output_tokens)
    assert exact.inserted_tokens == output_tokens and exact.finish_reason == "length"
    assert exact.generated_tokens + exact.inserted_tokens == until_code + output_tokens


def test_tir_text_only_round_after_last_execution(tir_sampler, sandbox_executor):
    # No executions allowed: the single round is text-only, the model's code block is not run.
    record = run_loop(tir_sampler, sandbox_executor, PROBLEMS[2], max_code_executions=0)
    assert record.code_rounds == 0 and record.inserted_tokens == 0 and record.finish_reason == "eos"
    assert "```output\n44\n```" in record.text  # what the model wrote itself, not an execution
