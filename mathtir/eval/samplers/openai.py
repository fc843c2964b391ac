"""OpenAI-compatible HTTP sampler: a served model (vLLM, SGLang, TGI, `transformers serve`) or a commercial API.

Two modes:

- ``completions`` (`POST {base}/completions`): text in, text out. The TIR loop sends the prompt plus the
  response so far and appends what comes back.
- ``chat`` (`POST {base}/chat/completions`), for chat-only APIs: the conversation is the system prompt, the
  problem as the user's message, then one assistant turn per generation round; a closed code block ends the
  assistant's turn (the dialect's stop strings) and the sandbox output goes back as the next user message,
  in the dialect's own fences, so the transcript reads exactly as in completions mode.

One ``httpx.AsyncClient`` holds up to ``max_in_flight`` requests at once (no thread per request). Retries with
exponential backoff on 429 and 5xx (honouring ``Retry-After``) and on connection errors; the API key comes from
the environment variable ``api_key_env``. Token counts come from the server's ``usage`` (and a cost when prices
are given). Servers drop the matched stop string from the text; it is appended back here (vLLM also names it
in ``stop_reason``) so the loop sees a closed code block; a server that ignores ``stop`` is cut here at the first
stop string, its tokens then counted with the local tokenizer (or estimated, 3 bytes a token).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time

from mathtir.eval.samplers import Generation, GenerationRequest
from mathtir.formats import get_dialect, pending_code

_RETRY_STATUSES = (429, 500, 502, 503, 504)
MODES = ("completions", "chat")


class OpenAISampler:
    uses_token_ids = False

    def __init__(self, base_url: str, model: str, *, mode: str = "completions", api_key_env: str = "OPENAI_API_KEY",
                 dialect: str = "tir", timeout_s: float = 600.0, max_retries: int = 6, max_in_flight: int = 256,
                 max_backoff_s: float = 60.0, price_input_per_mtok: float | None = None,
                 price_output_per_mtok: float | None = None, tokenizer_dir: str | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown OpenAI mode {mode!r} (choose from {', '.join(MODES)})")
        self.mode = mode
        self.chat = mode == "chat"
        self.url = base_url.rstrip("/") + ("/chat/completions" if self.chat else "/completions")
        self.model = model
        self.api_key = os.environ.get(api_key_env, "")
        self.dialect = get_dialect(dialect)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_backoff_s = max_backoff_s
        self.max_in_flight = max_in_flight
        self.prices = (price_input_per_mtok, price_output_per_mtok)
        self.tokenizer = None
        if tokenizer_dir:
            from mathtir.tokenizers import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer_dir)
        self._client = None
        self._slots: asyncio.Semaphore | None = None
        self._in_flight = 0
        self._stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "retries": 0,
                       "stop_cut_locally": 0, "peak_in_flight": 0, "busy_s": 0.0}
        self._busy_since: float | None = None

    def _ensure_client(self):
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:  # one client per event loop
            limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
            self._client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(self.timeout_s, connect=30.0))
            self._client_loop = loop
            self._slots = asyncio.Semaphore(self.max_in_flight)
        return self._client

    async def generate(self, request: GenerationRequest) -> Generation:
        client = self._ensure_client()
        body = {"model": self.model, "max_tokens": request.max_new_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "seed": request.seed % (1 << 31)}
        if self.chat:
            body["messages"] = [dict(m) for m in request.messages]
        else:
            body["prompt"] = request.prompt_text
        if request.stop:
            body["stop"] = list(request.stop)
        async with self._slots:
            self._enter()
            try:
                reply = await self._post(client, body)
            finally:
                self._leave()
        return self._generation(request, reply)

    def _enter(self) -> None:
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        self._stats["peak_in_flight"] = max(self._stats["peak_in_flight"], self._in_flight)

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:  # busy = wall time with at least one request out
            self._stats["busy_s"] += time.perf_counter() - self._busy_since

    def _generation(self, request: GenerationRequest, reply: dict) -> Generation:
        choice = reply["choices"][0]
        if self.chat:
            text = (choice.get("message") or {}).get("content") or ""
        else:
            text = choice.get("text") or ""
        usage = reply.get("usage") or {}
        num_tokens = int(usage.get("completion_tokens", 0))
        self._stats["requests"] += 1
        self._stats["prompt_tokens"] += int(usage.get("prompt_tokens", 0))
        self._stats["generated_tokens"] += num_tokens
        reason = "length" if choice.get("finish_reason") == "length" else "eos"
        if request.stop:
            cut = _first_stop(text, request.stop)
            if cut is not None and cut[0] + len(cut[1]) < len(text):
                # the server went past a stop string (it ignores `stop`): the round ends there
                text = text[: cut[0] + len(cut[1])]
                num_tokens = self._count(text)
                self._stats["stop_cut_locally"] += 1
                return Generation(token_ids=[], text=text, num_tokens=num_tokens, finish_reason="stop")
            if cut is not None:
                return Generation(token_ids=[], text=text, num_tokens=num_tokens, finish_reason="stop")
        if choice.get("finish_reason") == "stop" and request.stop:
            matched = choice.get("stop_reason")
            if isinstance(matched, str):
                reason = "stop"
            elif pending_code(text + request.stop[0], self.dialect) is not None:
                # No stop_reason (not vLLM): a stop string ends a code block, so if putting it back closes
                # one, that is what stopped generation; otherwise the model ended (eos).
                matched, reason = request.stop[0], "stop"
            if reason == "stop" and not text.endswith(matched):
                text += matched
        return Generation(token_ids=[], text=text, num_tokens=num_tokens, finish_reason=reason)

    def _count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        return -(-len(text.encode()) // 3)

    async def _post(self, client, body: dict) -> dict:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                response = await client.post(self.url, json=body, headers=headers)
                if response.status_code == 200:
                    return response.json()
                if response.status_code not in _RETRY_STATUSES or attempt == self.max_retries:
                    raise RuntimeError(f"{self.url}: HTTP {response.status_code}: {response.text[:500]!r}")
                wait = retry_after_s(response.headers.get("retry-after"))
            except (httpx.TransportError, httpx.TimeoutException) as e:
                if attempt == self.max_retries:
                    raise RuntimeError(f"{self.url}: {type(e).__name__}: {e}") from None
            self._stats["retries"] += 1
            if wait is None:  # exponential with jitter, so that many clients do not retry in step
                wait = min(self.max_backoff_s, 2.0 ** attempt) * (0.5 + random.random() / 2)
            await asyncio.sleep(min(wait, self.max_backoff_s))
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Closes the HTTP connections (a client is made again on the next request)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def stats(self) -> dict:
        stats = dict(self._stats, backend="openai", mode=self.mode, busy_s=round(self._stats["busy_s"], 2))
        price_in, price_out = self.prices
        if price_in is not None or price_out is not None:
            stats["cost_usd"] = round((stats["prompt_tokens"] * (price_in or 0.0)
                                       + stats["generated_tokens"] * (price_out or 0.0)) / 1e6, 6)
        return stats


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _first_stop(text: str, stops: tuple[str, ...]):
    hits = [(text.find(s), s) for s in stops if s in text]
    return min(hits) if hits else None
