"""Ray actors of the evaluation job: one pool type for sampler replicas and sandbox actors alike, and the actor
that hosts a sampler of any backend on a GPU (or CPU) node.

`ActorPool.call` sends each call to the least loaded actor. Actors are started with max_restarts, so Ray
brings a crashed one back; a call it was serving is sent again after a back-off. That is safe for both kinds:
a generation request carries its seed (the retry samples the same tokens) and code execution is stateless (a
trajectory's earlier blocks are replayed each time). A lost actor costs time, never a sample.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mathtir.eval.samplers import Generation, GenerationRequest, build_sampler

log = logging.getLogger(__name__)


class ActorPool:
    def __init__(self, actors: list, *, name: str, max_attempts: int, max_backoff_s: float):
        self.actors = list(actors)
        self.name = name
        self.max_attempts = max_attempts
        self.max_backoff_s = max_backoff_s
        self._in_flight = [0] * len(self.actors)
        self.calls = 0
        self.actor_failures = 0
        self.busy_s = 0.0

    async def call(self, method: str, *args, **kwargs):
        import ray

        for attempt in range(1, self.max_attempts + 1):
            index = min(range(len(self.actors)), key=self._in_flight.__getitem__)
            self._in_flight[index] += 1
            started = time.perf_counter()
            try:
                result = await getattr(self.actors[index], method).remote(*args, **kwargs)
                self.calls += 1
                self.busy_s += time.perf_counter() - started
                return result
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                # The actor died (or is restarting): Ray brings it back; send the call again.
                self.actor_failures += 1
                if attempt == self.max_attempts:
                    raise RuntimeError(f"{self.name} actors failed {attempt} times in a row: {e}") from e
                log.warning("%s actor %d failed (%s); retrying (attempt %d)", self.name, index, type(e).__name__,
                            attempt + 1)
                await asyncio.sleep(min(self.max_backoff_s, 0.5 * 2 ** attempt))
            finally:
                self._in_flight[index] -= 1
        raise AssertionError("unreachable")

    def stats(self) -> dict:
        return {"actors": len(self.actors), "calls": self.calls, "actor_failures": self.actor_failures,
                "busy_s": round(self.busy_s, 2)}


def sampler_actor_class():
    """A Ray actor class that hosts one sampler of any backend (built lazily: Ray is optional)."""
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


class RemoteSampler:
    """The Sampler interface over a pool of sampler actors."""

    def __init__(self, actors: list, uses_token_ids: bool, max_attempts: int = 4):
        self.pool = ActorPool(actors, name="sampler", max_attempts=max_attempts, max_backoff_s=30.0)
        self.uses_token_ids = uses_token_ids

    async def generate(self, request: GenerationRequest) -> Generation:
        return await self.pool.call("generate", request)

    def stats(self) -> dict:
        import ray

        per_actor = ray.get([a.stats.remote() for a in self.pool.actors], timeout=60)
        return {"replicas": per_actor, "actor_failures": self.pool.actor_failures}
