"""HF sampler: continuous batching vs the static batching it replaced, on the same TIR workload, one run.

    .venv/bin/python bench/hf_sampler.py [--model DIR] [--problems 8] [--samples 4] [--seeds 3] [--max-tokens 256]

Both samplers load the same model and run the same samples (same problems, seeds, sandbox) with real code
execution, the phases alternating --repeats times, the fastest of each counting. The workload is run once per
seed of --seeds (default 3): the two samplers cannot draw bit-identical tokens (their batches differ, and with
them the logits' last bits), so one seed's trajectories differ in length between them by chance (one run had
the continuous sampler write 15% more tokens and run 50% more code); summing over seeds evens that out. The baseline
(`StaticBatchingSampler`, below) is the previous implementation kept here for comparison: it decodes a batch
until every row of it is done (a trajectory back from the sandbox waits for the whole batch), re-prefills each
round's prompt + response from an empty cache, and samples row by row (a full-vocabulary sort for top-p).
Prints samples/s and tokens/s of both and the ratio (target >= 2).
Default model: the real SmolLM2-135M-Instruct, built from the PyPI GGUF on first use.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mathtir.eval.execution import PoolExecutor  # noqa: E402
from mathtir.eval.problems import Problem  # noqa: E402
from mathtir.eval.samplers.hf import HFSampler, _set_exception, _set_result  # noqa: E402
from mathtir.eval.tir import TIRConfig, run_sample  # noqa: E402
from mathtir.formats import OutputFormat, get_dialect, get_template  # noqa: E402
from mathtir.sandbox import SandboxPool  # noqa: E402

QUESTIONS = [("What is 123 * 456?", "56088"), ("What is 2**20 - 1?", "1048575"),
             ("What is the sum of the integers from 1 to 100?", "5050"), ("What is 17 * 19 * 23?", "7429"),
             ("What is 1001 divided by 7?", "143"), ("What is the product of 12 and 34?", "408"),
             ("What is 9 factorial?", "362880"), ("How many seconds are in a day?", "86400")]
INSTRUCTION = " Write one Python code block that prints the answer, then give the final answer in \\boxed{}."


class StaticBatchingSampler(HFSampler):
    """The baseline: the static batching HF sampler as it was before continuous batching."""

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._have_work.wait()
            await asyncio.sleep(self.batch_wait_s)
            with self._pending_lock:
                batch = self._pending[: self.max_batch_size]
                del self._pending[: self.max_batch_size]
                if not self._pending:
                    self._have_work.clear()
            try:
                await asyncio.to_thread(self._decode_batch, batch, loop)
            except Exception as e:
                for _, future in batch:
                    loop.call_soon_threadsafe(_set_exception, future, e)

    @torch.inference_mode()
    def _decode_batch(self, batch, loop) -> None:
        started = time.perf_counter()
        requests = [r for r, _ in batch]
        n = len(requests)
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(requests):
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attention_mask[i, width - len(r.prompt_ids):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator(device=self.device).manual_seed(r.seed) for r in requests]
        new_ids: list[list[int]] = [[] for _ in requests]
        rows = list(range(n))
        cache = None
        while rows:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=1, **{self.cache_key: cache})
            cache = out[self.cache_key]
            next_tokens = self._sample_per_row(out.logits[:, -1, :], [requests[i] for i in rows],
                                               [generators[i] for i in rows])
            self._stats["generated_tokens"] += len(rows)
            keep = []
            for j, i in enumerate(rows):
                token = int(next_tokens[j])
                new_ids[i].append(token)
                reason = self._finish_reason(requests[i], new_ids[i], token)
                if reason is None:
                    keep.append(j)
                else:
                    loop.call_soon_threadsafe(_set_result, batch[i][1], self._generation(new_ids[i], reason))
            next_positions = position_ids[:, -1:] + 1
            if len(keep) < len(rows):
                if not keep:
                    break
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                attention_mask, next_tokens, next_positions = (
                    attention_mask[index], next_tokens[index], next_positions[index])
                rows = [rows[j] for j in keep]
            input_ids = next_tokens[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
            position_ids = next_positions
        self._stats["busy_s"] += time.perf_counter() - started

    @staticmethod
    def _sample_per_row(logits, requests, generators):
        tokens = []
        for row, request, generator in zip(logits.float(), requests, generators, strict=True):
            if request.temperature <= 0:
                tokens.append(row.argmax())
                continue
            probs = torch.softmax(row / request.temperature, dim=-1)
            if request.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= request.top_p] = 0
                tokens.append(order[torch.multinomial(sorted_probs, 1, generator=generator)[0]])
            else:
                tokens.append(torch.multinomial(probs, 1, generator=generator)[0])
        return torch.stack(tokens)


async def run_all(problems, samples, *, sampler, executor, template, config):
    jobs = [run_sample(p, i, sampler=sampler, executor=executor, tokenizer=sampler.tokenizer, template=template,
                       dialect=get_dialect("tir"), output_format=OutputFormat(), config=config)
            for p in problems for i in range(samples)]
    started = time.perf_counter()
    records = await asyncio.gather(*jobs)
    return time.perf_counter() - started, records


def default_model() -> Path:
    from mathtir.models.smollm2 import materialize

    cache = Path(os.environ.get("MATHTIR_CACHE", Path.home() / ".cache" / "mathtir"))
    return materialize(cache / "smollm2-135m-instruct")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-code-executions", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--sandbox-workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each sampler; the fastest counts")
    p.add_argument("--seeds", type=int, default=3, help="the workload is run once per seed; the sum counts")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--no-baseline", action="store_true", help="run the continuous sampler only (samples/s)")
    # One torch thread: on a shared, oversubscribed CPU more threads spin-wait and decoding slows by 10x+.
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    model = args.model or default_model()
    kwargs = {"max_batch_size": args.max_batch_size, "num_threads": args.threads, "device": args.device}
    samplers = {"continuous": HFSampler(model, **kwargs)}
    if not args.no_baseline:
        samplers["static (before)"] = StaticBatchingSampler(model, **kwargs)
    template = get_template("chat", tokenizer=samplers["continuous"].tokenizer)
    problems = [Problem(f"q{i}", q + INSTRUCTION, a, "arith") for i, (q, a) in
                enumerate((QUESTIONS * (args.problems // len(QUESTIONS) + 1))[: args.problems])]
    configs = [TIRConfig(max_tokens=args.max_tokens, max_code_executions=args.max_code_executions,
                         temperature=0.7, top_p=0.95, seed=seed) for seed in range(args.seeds)]
    walls: dict[str, list[float]] = {name: [] for name in samplers}
    results = {}
    with SandboxPool(workers=args.sandbox_workers) as pool:
        executor = PoolExecutor(pool, timeout=10)
        warm = TIRConfig(max_tokens=16, max_code_executions=1, seed=1)
        for sampler in samplers.values():
            asyncio.run(run_all(problems[:2], 1, sampler=sampler, executor=executor, template=template,
                                config=warm))
        for repeat in range(args.repeats):
            runs: dict[str, list] = {name: [] for name in samplers}
            for config in configs:  # the samplers alternate seed by seed: the machine's noise falls on both
                for name, sampler in samplers.items():
                    runs[name].append(asyncio.run(run_all(problems, args.samples, sampler=sampler,
                                                          executor=executor, template=template, config=config)))
            for name in samplers:
                walls[name].append(sum(wall for wall, _ in runs[name]))
                results[name] = [record for _, records in runs[name] for record in records]
                print(f"repeat {repeat + 1}: {name} {walls[name][-1]:.1f} s", flush=True)

    print(f"model: {model}  ({args.problems} problems x {args.samples} samples x {args.seeds} seeds, "
          f"max_tokens {args.max_tokens}, <= {args.max_code_executions} executions, batch <= {args.max_batch_size}, {args.threads} threads, "
          f"device {samplers['continuous'].device})")
    print(f"{'sampler':<18}{'wall s':>9}{'samples/s':>11}{'gen tok/s':>11}{'executions':>12}{'mean tokens':>13}")
    rates = {}
    for name, records in results.items():
        wall = min(walls[name])
        tokens = sum(r.generated_tokens for r in records)
        rates[name] = len(records) / wall
        print(f"{name:<18}{wall:>9.2f}{rates[name]:>11.3f}{tokens / wall:>11.1f}"
              f"{sum(r.code_rounds for r in records):>12}{tokens / len(records):>13.1f}")
    stats = samplers["continuous"].stats()
    print(f"prefix cache: {stats['prefix_cache']}; rows that shared a prompt's prefill: {stats['shared_prompt_rows']}")
    if args.no_baseline:
        return
    ratio = rates["continuous"] / rates["static (before)"]
    print(f"ratio continuous / static samples/s: {ratio:.2f}  (target >= 2: {'met' if ratio >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
