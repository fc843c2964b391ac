"""The sampler interface the TIR loop talks to, and the Ray actor that hosts a sampler on a GPU (or CPU).

A sampler continues one trajectory at a time from the loop's point of view (`await generate(request)`), and
batches concurrent requests internally: the loop keeps many trajectories in flight, so while some wait for
the sandbox the others keep the sampler busy.

Backends: ``hf`` (transformers, CPU or GPU; the one CI runs), ``vllm`` (GPU engines; cannot run on this
platform, a thin adapter), ``openai`` (an OpenAI-compatible HTTP endpoint: a served model or a commercial API).
Token-id backends (hf, vllm) take and return token ids, so the TIR loop appends the generated ids as they are
and tokenizes only the inserted code output: the token budget is exact and nothing drifts at block boundaries.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

BACKENDS = ("hf", "vllm", "openai")


@dataclass
class GenerationRequest:
    prompt_ids: list[int]          # prompt + response so far (token-id backends)
    prompt_text: str               # the same as text (text backends)
    max_new_tokens: int
    stop: tuple[str, ...]          # stop after the first of these appears in the new text
    temperature: float
    top_p: float
    seed: int


@dataclass
class Generation:
    token_ids: list[int]           # the new ids, as sampled (empty for text backends)
    text: str                      # the new text, ending with the stop string when finish_reason == "stop"
    num_tokens: int                # new tokens, counting the eos token when there is one
    finish_reason: str             # "stop" (a stop string) | "eos" | "length"


class Sampler(Protocol):
    uses_token_ids: bool

    async def generate(self, request: GenerationRequest) -> Generation: ...

    def stats(self) -> dict: ...


def sampler_actor_class():
    """A Ray actor class that hosts one sampler of any backend (imported lazily: Ray is optional)."""
    import ray

    @ray.remote
    class SamplerActor:
        def __init__(self, backend: str, kwargs: dict):
            self.sampler = build_sampler(backend, **kwargs)

        def uses_token_ids(self) -> bool:
            return self.sampler.uses_token_ids

        async def generate(self, request: GenerationRequest) -> Generation:
            return await self.sampler.generate(request)

        def stats(self) -> dict:
            return self.sampler.stats()

    return SamplerActor


def build_sampler(backend: str, **kwargs) -> Sampler:
    if backend == "hf":
        from mathtir.eval.hf_sampler import HFSampler

        return HFSampler(**kwargs)
    if backend == "vllm":
        from mathtir.eval.vllm_sampler import VLLMSampler

        return VLLMSampler(**kwargs)
    if backend == "openai":
        from mathtir.eval.openai_sampler import OpenAISampler

        return OpenAISampler(**kwargs)
    raise ValueError(f"unknown sampler backend {backend!r} (choose from {', '.join(BACKENDS)})")


class RemoteSampler:
    """The Sampler interface over a pool of sampler actors: each request goes to the least loaded one.

    Actors are started with max_restarts, so Ray brings a crashed replica back; a request it was serving is
    sent again (a request carries its seed, so the retry samples the same tokens)."""

    def __init__(self, actors: list, uses_token_ids: bool, max_attempts: int = 4):
        self.actors = list(actors)
        self.uses_token_ids = uses_token_ids
        self.max_attempts = max_attempts
        self._in_flight = [0] * len(self.actors)
        self.actor_failures = 0

    async def generate(self, request: GenerationRequest) -> Generation:
        import ray

        for attempt in range(1, self.max_attempts + 1):
            index = min(range(len(self.actors)), key=self._in_flight.__getitem__)
            self._in_flight[index] += 1
            try:
                return await self.actors[index].generate.remote(request)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                self.actor_failures += 1
                if attempt == self.max_attempts:
                    raise
                await asyncio.sleep(min(30.0, 2.0 ** attempt))
            finally:
                self._in_flight[index] -= 1
        raise AssertionError("unreachable")

    def stats(self) -> dict:
        import ray

        per_actor = ray.get([a.stats.remote() for a in self.actors], timeout=60)
        return {"replicas": per_actor, "actor_failures": self.actor_failures}
