"""Hugging Face transformers sampler: batched decoding on CPU or GPU with stop strings and per-request seeds.

A small decoding loop of our own instead of ``model.generate``, because the TIR loop needs, per request: its
own token budget, its own seed (a per-row ``torch.Generator``: a row's random draws are its own; the logits
themselves can differ in their last bits with what shares the batch, since padding changes the kernels'
shapes), and its own stop strings, and it needs each row handed back the moment it stops so its code can run
while the rest of the batch keeps decoding. Finished rows are dropped from the KV cache as they go.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import torch

from mathtir.eval.samplers import Generation, GenerationRequest

# Stop strings are short ("```", "</llm-code>"): the newest 16 tokens always cover one that just completed.
_STOP_WINDOW_TOKENS = 16


class HFSampler:
    uses_token_ids = True

    def __init__(self, model_dir: str | Path, *, max_batch_size: int = 32, dtype: str = "auto",
                 device: str | None = None, num_threads: int | None = None, batch_wait_s: float = 0.02):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(self.device).eval()
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids) if self.eos_ids else 0
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._pending: list[tuple[GenerationRequest, asyncio.Future]] = []
        self._have_work: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._stats = {"batches": 0, "rows": 0, "generated_tokens": 0, "busy_s": 0.0}
        self._stats_lock = threading.Lock()

    def _eos_ids(self) -> set[int]:
        ids = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        for value in (eos if isinstance(eos, list) else [eos]) + [self.tokenizer.eos_token_id]:
            if value is not None:
                ids.add(int(value))
        return ids

    # -- the asyncio side: collect concurrent requests into batches ----------------------------------------
    async def generate(self, request: GenerationRequest) -> Generation:
        if not request.prompt_ids:
            raise ValueError("HFSampler needs prompt_ids")
        if request.max_new_tokens <= 0:
            return Generation(token_ids=[], text="", num_tokens=0, finish_reason="length")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.get_loop() is not loop:
            # One batching task per event loop (a Ray actor has one; scripts may asyncio.run several times).
            self._have_work = asyncio.Event()
            self._pending = []
            self._worker = loop.create_task(self._batch_loop())
        future = loop.create_future()
        self._pending.append((request, future))
        self._have_work.set()
        return await future

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._have_work.wait()
            await asyncio.sleep(self.batch_wait_s)  # let requests that arrive together share a batch
            batch = self._pending[: self.max_batch_size]
            del self._pending[: self.max_batch_size]
            if not self._pending:
                self._have_work.clear()
            try:
                await asyncio.to_thread(self._decode_batch, batch, loop)
            except Exception as e:  # hand the error to every caller still waiting, keep serving
                for _, future in batch:
                    if not future.done():
                        loop.call_soon_threadsafe(_set_exception, future, e)

    # -- the decoding loop (runs in a thread) ---------------------------------------------------------------
    @torch.inference_mode()
    def _decode_batch(self, batch, loop) -> None:
        started = time.perf_counter()
        requests = [r for r, _ in batch]
        n = len(requests)
        with self._stats_lock:
            self._stats["batches"] += 1
            self._stats["rows"] += n
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row's next token lands in the last column
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attention_mask[i, width - len(r.prompt_ids):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator(device=self.device).manual_seed(r.seed) for r in requests]
        new_ids: list[list[int]] = [[] for _ in requests]
        rows = list(range(n))  # batch row -> request index
        cache = None
        while rows:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            next_tokens = self._sample(out.logits[:, -1, :], [requests[i] for i in rows],
                                       [generators[i] for i in rows])
            with self._stats_lock:
                self._stats["generated_tokens"] += len(rows)
            keep = []
            for j, i in enumerate(rows):
                token = int(next_tokens[j])
                new_ids[i].append(token)
                reason = self._finish_reason(requests[i], new_ids[i], token)
                if reason is None:
                    keep.append(j)
                else:
                    generation = self._generation(new_ids[i], reason)
                    loop.call_soon_threadsafe(_set_result, batch[i][1], generation)
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
        with self._stats_lock:
            self._stats["busy_s"] += time.perf_counter() - started

    def _sample(self, logits: torch.Tensor, requests, generators) -> torch.Tensor:
        tokens = []
        for row, request, generator in zip(logits.float(), requests, generators, strict=True):
            if request.temperature <= 0:
                tokens.append(row.argmax())
                continue
            probs = torch.softmax(row / request.temperature, dim=-1)
            if request.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # keep the smallest prefix whose mass reaches top_p (always at least the top token)
                sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= request.top_p] = 0
                choice = torch.multinomial(sorted_probs, 1, generator=generator)
                tokens.append(order[choice[0]])
            else:
                tokens.append(torch.multinomial(probs, 1, generator=generator)[0])
        return torch.stack(tokens)

    def _finish_reason(self, request: GenerationRequest, ids: list[int], token: int) -> str | None:
        if token in self.eos_ids:
            return "eos"
        if request.stop:
            tail = self.tokenizer.decode(ids[-_STOP_WINDOW_TOKENS:], skip_special_tokens=False)
            if any(s in tail for s in request.stop):
                return "stop"
        if len(ids) >= request.max_new_tokens:
            return "length"
        return None

    def _generation(self, ids: list[int], reason: str) -> Generation:
        text_ids = ids[:-1] if reason == "eos" else ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=False)
        return Generation(token_ids=list(ids), text=text, num_tokens=len(ids), finish_reason=reason)

    def stats(self) -> dict:
        with self._stats_lock:
            return dict(self._stats, backend="hf", device=str(self.device))


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
