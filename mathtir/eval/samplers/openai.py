"""OpenAI-compatible HTTP sampler (`POST {base}/completions`): a served model (vLLM, SGLang, TGI...) or an API.

Text in, text out: the TIR loop sends the prompt plus the response so far and appends what comes back. Token
counts come from the server's `usage`; inserted code output is counted with the local tokenizer (--model)
when there is one. Servers drop the matched stop string from the text; it is appended back here (vLLM also
names it in `stop_reason`) so the loop sees a closed code block.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request

from mathtir.eval.samplers import Generation, GenerationRequest
from mathtir.formats import get_dialect, pending_code

_RETRY_STATUSES = (429, 500, 502, 503, 504)


class OpenAISampler:
    uses_token_ids = False

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", dialect: str = "tir",
                 timeout_s: float = 600.0, max_retries: int = 5):
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.api_key = os.environ.get(api_key_env, "")
        self.dialect = get_dialect(dialect)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._stats = {"requests": 0, "generated_tokens": 0, "retries": 0}

    async def generate(self, request: GenerationRequest) -> Generation:
        return await asyncio.to_thread(self._complete, request)

    def _complete(self, request: GenerationRequest) -> Generation:
        body = {"model": self.model, "prompt": request.prompt_text, "max_tokens": request.max_new_tokens,
                "temperature": request.temperature, "top_p": request.top_p, "seed": request.seed % (1 << 31)}
        if request.stop:
            body["stop"] = list(request.stop)
        reply = self._post(body)
        choice = reply["choices"][0]
        text = choice.get("text") or ""
        num_tokens = int(reply.get("usage", {}).get("completion_tokens", 0))
        reason = "length" if choice.get("finish_reason") == "length" else "eos"
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
        self._stats["requests"] += 1
        self._stats["generated_tokens"] += num_tokens
        return Generation(token_ids=[], text=text, num_tokens=num_tokens, finish_reason=reason)

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                if e.code not in _RETRY_STATUSES or attempt == self.max_retries:
                    raise RuntimeError(f"{self.url}: HTTP {e.code}: {e.read()[:500]!r}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.max_retries:
                    raise RuntimeError(f"{self.url}: {e}") from None
            self._stats["retries"] += 1
            time.sleep(min(30.0, 2.0 ** attempt))
        raise AssertionError("unreachable")

    def stats(self) -> dict:
        return dict(self._stats, backend="openai")
