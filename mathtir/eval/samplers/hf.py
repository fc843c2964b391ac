"""Hugging Face transformers sampler: continuous batching on CPU or GPU, a trajectory's KV cache kept across its
rounds, stop strings and per-request seeds.

A decoding loop of our own instead of ``model.generate``, because the TIR loop needs, per request: its own token
budget, its own seed (a per-row ``torch.Generator``: a row's random draws are its own; the logits themselves can
differ in their last bits with what shares the batch, since padding changes the kernels' shapes), and its own
stop strings, and it needs each row handed back the moment it stops so its code can run while the rest keep
decoding.

Continuous: one running batch. A request that arrives while it decodes (a trajectory back from the sandbox)
joins it at the next step: new prompts are prefilled together, each distinct prompt once (a problem's samples
share theirs), their KV rows merged into the batch cache (left padding); a row that finishes leaves at once. A
row that stops at a code block leaves its KV behind (``PrefixCache``); its next round (the same ids + the code
output) prefills only what was added.
Sampling runs on the whole batch's tensors: top-p over the top ``_TOP_P_CANDIDATES`` tokens (a partial sort),
the full distribution only for a row whose nucleus reaches beyond them; each row draws its own uniform number
from its own generator, so seeds stay per row.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mathtir.eval.samplers import Generation, GenerationRequest

# Stop strings are short ("```", "</llm-code>"): the newest 16 tokens always cover one that just completed.
_STOP_WINDOW_TOKENS = 16
# top-p looks at this many most likely tokens first; a nucleus wider than that falls back to a full sort.
_TOP_P_CANDIDATES = 256


@dataclass
class _Row:
    request: GenerationRequest
    future: asyncio.Future
    generator: torch.Generator
    new_ids: list[int] = field(default_factory=list)
    length: int = 0                # real tokens in the KV cache (the row's next position id)


class PrefixCache:
    """KV tensors of trajectories that stopped for code execution, keyed by the ids they cover, oldest evicted
    first beyond ``max_bytes``. A hit is removed: the trajectory's next stop stores its longer prefix."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._lengths: dict[int, int] = {}  # key length -> entries of that length
        self.bytes = 0
        self.hits = self.misses = self.reused_tokens = 0

    @staticmethod
    def _size(kv) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)

    def put(self, ids: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        size = self._size(kv)
        if not ids or size > self.max_bytes:
            return
        key = tuple(ids)
        if key in self._entries:
            self._drop(key)
        self._entries[key] = kv
        self._lengths[len(key)] = self._lengths.get(len(key), 0) + 1
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def take(self, ids: list[int]):
        """The longest stored prefix of ids shorter than ids (at least one id is left to prefill): (n, kv)."""
        for n in sorted(self._lengths, reverse=True):
            if n < len(ids):
                key = tuple(ids[:n])
                if key in self._entries:
                    kv = self._entries[key]
                    self._drop(key)
                    self.hits += 1
                    self.reused_tokens += n
                    return n, kv
        self.misses += 1
        return 0, None

    def _drop(self, key) -> None:
        kv = self._entries.pop(key)
        self.bytes -= self._size(kv)
        self._lengths[len(key)] -= 1
        if not self._lengths[len(key)]:
            del self._lengths[len(key)]


def sample_rows(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor,
                generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of logits [B, V], on the batch's tensors: greedy where the temperature is 0, else
    inverse-CDF sampling of the top-p nucleus with one uniform draw from each row's own generator."""
    logits = logits.float()
    greedy = temperatures <= 0
    tokens = logits.argmax(-1)
    if bool(greedy.all()):
        return tokens
    uniforms = torch.stack([torch.rand((), generator=g, device=logits.device) for g in generators])
    probs = torch.softmax(logits / torch.where(greedy, 1.0, temperatures)[:, None], dim=-1)
    k = min(_TOP_P_CANDIDATES, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    before = values.cumsum(-1) - values
    # the smallest prefix whose mass reaches top_p (always the top token); rows whose nucleus is not inside
    # the candidates (top_p 1, or a flat distribution) sample from the full distribution instead
    keep = before < top_ps[:, None]
    wide = ~greedy & keep[:, -1] & ((before[:, -1] + values[:, -1]) < top_ps)
    chosen = _inverse_cdf(values * keep, uniforms)
    tokens = torch.where(greedy, tokens, indices.gather(-1, chosen[:, None])[:, 0])
    whole = wide & (top_ps >= 1)  # no nucleus: the whole distribution, in vocabulary order
    if bool(whole.any()):
        rows = whole.nonzero()[:, 0]
        tokens[rows] = _inverse_cdf(probs[rows], uniforms[rows])
    if bool((wide & ~whole).any()):
        rows = (wide & ~whole).nonzero()[:, 0]
        sorted_probs, order = probs[rows].sort(dim=-1, descending=True)
        sorted_probs = sorted_probs * ((sorted_probs.cumsum(-1) - sorted_probs) < top_ps[rows, None])
        picked = _inverse_cdf(sorted_probs, uniforms[rows])
        tokens[rows] = order.gather(-1, picked[:, None])[:, 0]
    return tokens


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    cdf = weights.cumsum(-1)
    index = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
    return index.clamp(max=weights.shape[-1] - 1)


class HFSampler:
    uses_token_ids = True
    chat = False

    def __init__(self, model_dir: str | Path, *, max_batch_size: int = 32, dtype: str = "auto",
                 device: str | None = None, num_threads: int | None = None, batch_wait_s: float = 0.02,
                 prefix_cache_mb: int = 2048):
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
        # transformers 5 renamed the forward's `past_key_values` argument and output to `cache` (the old name is
        # deprecated, to go in 5.40); serving images pin 4.x, which knows only the old one
        self.cache_key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids) if self.eos_ids else 0
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.prefix_cache = PrefixCache(prefix_cache_mb * 1024 * 1024)
        self._arriving: list[tuple[GenerationRequest, asyncio.Future]] = []  # this event-loop pass's requests
        self._pending: list[tuple[GenerationRequest, asyncio.Future]] = []   # handed to the decoding thread
        self._pending_lock = threading.Lock()
        self._have_work: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._stats = {"batches": 0, "rows": 0, "steps": 0, "peak_rows": 0, "generated_tokens": 0, "prefilled_tokens": 0,
                       "shared_prompt_rows": 0, "busy_s": 0.0}
        self._stats_lock = threading.Lock()

    def _eos_ids(self) -> set[int]:
        ids = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        for value in (eos if isinstance(eos, list) else [eos]) + [self.tokenizer.eos_token_id]:
            if value is not None:
                ids.add(int(value))
        return ids

    # -- the asyncio side: hand requests to the running batch -----------------------------------------------
    async def generate(self, request: GenerationRequest) -> Generation:
        if not request.prompt_ids:
            raise ValueError("HFSampler needs prompt_ids")
        if request.max_new_tokens <= 0:
            return Generation(token_ids=[], text="", num_tokens=0, finish_reason="length")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.get_loop() is not loop:
            # One batching task per event loop (a Ray actor has one; scripts may asyncio.run several times).
            self._have_work = asyncio.Event()
            self._arriving = []
            with self._pending_lock:
                self._pending = []
            self._worker = loop.create_task(self._batch_loop())
        future = loop.create_future()
        if not self._arriving:
            loop.call_soon(self._publish)
        self._arriving.append((request, future))
        return await future

    def _publish(self) -> None:
        # Requests made in the same event-loop pass reach the batch together (one batch composition for the
        # same concurrent requests, whatever the decoding thread is doing meanwhile).
        with self._pending_lock:
            self._pending += self._arriving
        self._arriving = []
        self._have_work.set()

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._have_work.wait()
            await asyncio.sleep(self.batch_wait_s)  # let requests that arrive together start together
            self._have_work.clear()
            try:
                # decodes until no row is left and nothing waits; later arrivals join inside
                await asyncio.to_thread(self._run_batch, loop)
            except Exception:  # its callers got the error (_run_batch); keep serving the others
                pass

    def _admit(self, free: int) -> list[tuple[GenerationRequest, asyncio.Future]]:
        with self._pending_lock:
            taken = self._pending[:free]
            del self._pending[:free]
        return taken

    # -- the running batch (in a thread) --------------------------------------------------------------------
    @torch.inference_mode()
    def _run_batch(self, loop) -> None:
        started = time.perf_counter()
        rows: list[_Row] = []
        arrivals: list[tuple[GenerationRequest, asyncio.Future]] = []
        cache = None                      # the batch's KV: one (keys, values) [B, heads, width, dim] per layer
        mask = None                       # [B, width]: 1 where the cache holds a real token
        next_tokens = None                # [B]: each row's last sampled token, fed at the next step
        joined = False
        try:
            while True:
                arrivals = self._admit(self.max_batch_size - len(rows))
                if not rows and not arrivals:
                    return
                if not joined:
                    joined = True
                    with self._stats_lock:
                        self._stats["batches"] += 1
                logits = []
                if rows:
                    positions = torch.tensor([[r.length] for r in rows], device=self.device)
                    mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                    out = self.model(input_ids=next_tokens[:, None], attention_mask=mask, position_ids=positions,
                                     use_cache=True, logits_to_keep=1, **{self.cache_key: cache})
                    cache = out[self.cache_key]
                    logits.append(out.logits[:, -1, :])
                    for r in rows:
                        r.length += 1
                if arrivals:
                    new_rows, new_kv, new_logits = self._prefill(arrivals)
                    cache, mask = self._merge(cache, mask, new_kv, [r.length for r in new_rows])
                    rows += new_rows
                    arrivals = []
                    logits.append(new_logits)
                tokens = sample_rows(
                    torch.cat(logits), torch.tensor([r.request.temperature for r in rows], device=self.device),
                    torch.tensor([r.request.top_p for r in rows], device=self.device),
                    [r.generator for r in rows])
                with self._stats_lock:
                    self._stats["steps"] += 1
                    self._stats["peak_rows"] = max(self._stats["peak_rows"], len(rows))
                    self._stats["generated_tokens"] += len(rows)
                keep = []
                for j, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
                    row.new_ids.append(token)
                    reason = self._finish_reason(row.request, row.new_ids, token)
                    if reason is None:
                        keep.append(j)
                        continue
                    if reason == "stop":  # the trajectory comes back after its code runs: keep its KV
                        self.prefix_cache.put(row.request.prompt_ids + row.new_ids[:-1],
                                              self._row_kv(cache, j, row.length))
                    loop.call_soon_threadsafe(_set_result, row.future, self._generation(row.new_ids, reason))
                if len(keep) < len(rows):
                    rows = [rows[j] for j in keep]
                    if not rows:
                        cache = mask = None
                        continue
                    index = torch.tensor(keep, device=self.device)
                    mask, tokens = mask[index], tokens[index]
                    # the columns no remaining row uses go first: the row selection then copies none of them
                    cache, mask = _trim_left(cache, mask)
                    cache.batch_select_indices(index)
                next_tokens = tokens
        except Exception as e:  # every row of this batch fails with the error; later requests start afresh
            for future in [r.future for r in rows] + [f for _, f in arrivals]:
                loop.call_soon_threadsafe(_set_exception, future, e)
            raise
        finally:
            with self._stats_lock:
                self._stats["busy_s"] += time.perf_counter() - started

    def _prefill(self, arrivals):
        """Each arriving request's KV and next-token logits. A request that continues a stored prefix (a
        trajectory back from the sandbox) prefills only what was added; the others are prefilled together in
        one left-padded forward, each distinct prompt once (a problem's samples arrive with the same prompt)."""
        rows, kvs, logits = [], [], []
        fresh: dict[tuple[int, ...], list[int]] = {}  # a new prompt -> the arrivals that carry it
        for position, (request, future) in enumerate(arrivals):
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
            rows.append(_Row(request, future, generator, length=len(request.prompt_ids)))
            reused, kv = self.prefix_cache.take(request.prompt_ids)
            if kv is None:
                fresh.setdefault(tuple(request.prompt_ids), []).append(position)
                kvs.append(None)
                logits.append(None)
            else:
                kv, logit = self._prefill_suffix(request.prompt_ids, reused, kv)
                kvs.append(kv)
                logits.append(logit)
        if fresh:
            for (kv, logit), positions in zip(self._prefill_prompts(list(fresh)), fresh.values(), strict=True):
                for position in positions:
                    kvs[position], logits[position] = kv, logit
        with self._stats_lock:
            self._stats["rows"] += len(rows)
            self._stats["shared_prompt_rows"] += sum(map(len, fresh.values())) - len(fresh)
        return rows, kvs, torch.cat(logits)

    def _prefill_suffix(self, ids: list[int], reused: int, kv):
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (k, v) in enumerate(kv):
            cache.update(k, v, layer)
        n = len(ids)
        out = self.model(input_ids=torch.tensor([ids[reused:]], device=self.device),
                         attention_mask=torch.ones((1, n), dtype=torch.long, device=self.device),
                         position_ids=torch.arange(reused, n, device=self.device)[None],
                         use_cache=True, logits_to_keep=1, **{self.cache_key: cache})
        with self._stats_lock:
            self._stats["prefilled_tokens"] += n - reused
        return [(layer.keys, layer.values) for layer in out[self.cache_key].layers], out.logits[:, -1, :]

    def _prefill_prompts(self, prompts: list[tuple[int, ...]]):
        """One forward over the prompts, left-padded: each prompt's KV (its own columns) and last logits."""
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1)
        with self._stats_lock:
            self._stats["prefilled_tokens"] += sum(map(len, prompts))
        layers = out[self.cache_key].layers
        return [([(layer.keys[i:i + 1, :, width - len(ids):], layer.values[i:i + 1, :, width - len(ids):])
                  for layer in layers], out.logits[i:i + 1, -1, :]) for i, ids in enumerate(prompts)]

    def _merge(self, cache, mask, new_kv, lengths):
        """The batch cache with the new rows appended below, everything left-padded to one width, in buffers
        with spare columns that the decode steps write into (``KVBufferLayer``)."""
        from transformers import Cache

        from mathtir.eval.samplers.kv_buffer import KVBufferLayer

        old_width = mask.shape[1] if mask is not None else 0
        width = max([old_width, *lengths])
        new_mask = torch.zeros((len(lengths), width), dtype=torch.long, device=self.device)
        for i, n in enumerate(lengths):
            new_mask[i, width - n:] = 1
        layers = []
        for layer in range(len(new_kv[0])):
            parts = [kv[layer] for kv in new_kv]
            if cache is not None:
                parts.insert(0, (cache.layers[layer].keys, cache.layers[layer].values))
            layers.append(KVBufferLayer.left_padded(parts, width))
        if mask is not None:
            new_mask = torch.cat([torch.nn.functional.pad(mask, (width - old_width, 0)), new_mask])
        return Cache(layers=layers), new_mask

    @staticmethod
    def _row_kv(cache, j: int, length: int):
        # the row's real tokens are its last `length` columns (left padding); cloned so the batch can move on
        return [(layer.keys[j:j + 1, :, -length:].clone(), layer.values[j:j + 1, :, -length:].clone())
                for layer in cache.layers]

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
            stats = dict(self._stats, backend="hf", device=str(self.device))
        stats["prefix_cache"] = {"hits": self.prefix_cache.hits, "misses": self.prefix_cache.misses,
                                 "reused_tokens": self.prefix_cache.reused_tokens}
        return stats


def _trim_left(cache, mask):
    """Drops leading columns that no remaining row uses (rows with long prompts left)."""
    used = mask.any(0).nonzero()
    first = int(used[0]) if len(used) else mask.shape[1]
    if first == 0:
        return cache, mask
    for layer in cache.layers:
        layer.drop_leading(first)
    return cache, mask[:, first:]


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
