"""Samplers: the interface the TIR loop talks to, and the registry of backends (each in its own module).

A sampler continues one trajectory at a time from the loop's point of view (`await generate(request)`), and
batches concurrent requests internally: the loop keeps many trajectories in flight, so while some wait for
the sandbox the others keep the sampler busy.

Backends: ``hf`` (transformers, CPU or GPU; the one CI runs), ``vllm`` (GPU engines; cannot run on this
platform, a thin adapter), ``openai`` (an OpenAI-compatible HTTP endpoint: a served model or a commercial API,
in completions or chat mode).
Token-id backends (hf, vllm) take and return token ids, so the TIR loop appends the generated ids as they are
and tokenizes only the inserted code output: the token budget is exact and nothing drifts at block boundaries.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

# backend name -> "module:class"; imported only when built (vLLM and the HTTP client are heavy or absent)
BACKENDS = {
    "hf": "mathtir.eval.samplers.hf:HFSampler",
    "vllm": "mathtir.eval.samplers.vllm:VLLMSampler",
    "openai": "mathtir.eval.samplers.openai:OpenAISampler",
}


@dataclass
class GenerationRequest:
    prompt_ids: list[int]          # prompt + response so far (token-id backends)
    prompt_text: str               # the same as text (text backends)
    max_new_tokens: int
    stop: tuple[str, ...]          # stop after the first of these appears in the new text
    temperature: float
    top_p: float
    seed: int
    # chat backends: the conversation so far ({"role", "content"} dicts: system, the problem as the user's
    # message, then assistant rounds and code output as user messages)
    messages: list[dict] = field(default_factory=list)


@dataclass
class Generation:
    token_ids: list[int]           # the new ids, as sampled (empty for text backends)
    text: str                      # the new text, ending with the stop string when finish_reason == "stop"
    num_tokens: int                # new tokens, counting the eos token when there is one
    finish_reason: str             # "stop" (a stop string) | "eos" | "length"


class Sampler(Protocol):
    uses_token_ids: bool
    chat: bool                     # wants GenerationRequest.messages (a chat API) rather than the prompt text

    async def generate(self, request: GenerationRequest) -> Generation: ...

    def stats(self) -> dict: ...


def build_sampler(backend: str, **kwargs) -> Sampler:
    if backend not in BACKENDS:
        raise ValueError(f"unknown sampler backend {backend!r} (choose from {', '.join(BACKENDS)})")
    module, name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), name)(**kwargs)
