"""Ray actors of the evaluation job: one pool type for sampler replicas and sandbox actors alike, the actor
that hosts a sampler of any backend on a GPU (or CPU) node, and where sampler replicas are placed.

`ActorPool.call` sends each call to the least loaded actor, or to the one the caller prefers (a sandbox actor
that keeps the trajectory's interpreter). Actors are started with max_restarts, so Ray brings a crashed one
back; a call it was serving is sent again after a back-off. That is safe for both kinds: a generation request
carries its seed (the retry samples the same tokens) and code execution needs no actor's state (an actor that
does not keep the trajectory's interpreter replays its earlier blocks). A lost actor costs time, never a sample.
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
        return (await self.call_at(None, method, *args, **kwargs))[1]

    async def call_at(self, prefer: int | None, method: str, *args, **kwargs) -> tuple[int, object]:
        """(index of the actor that answered, its answer); the first attempt goes to actor `prefer` if given."""
        import ray

        for attempt in range(1, self.max_attempts + 1):
            if prefer is not None and attempt == 1:
                index = prefer
            else:
                index = min(range(len(self.actors)), key=self._in_flight.__getitem__)
            self._in_flight[index] += 1
            started = time.perf_counter()
            try:
                result = await getattr(self.actors[index], method).remote(*args, **kwargs)
                self.calls += 1
                self.busy_s += time.perf_counter() - started
                return index, result
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


def place_sampler_replicas(ray, *, replicas: int, gpus_per_replica: int, cpus_per_replica: float,
                           tensor_parallel: bool, gpu_resource: str = "GPU", timeout_s: float = 600.0) -> list[dict]:
    """One placement group per sampler replica, and the options that put its actor inside it.

    A replica's GPUs are packed on one node (STRICT_PACK: a tensor-parallel group never spans nodes); replicas
    go wherever their group fits, across nodes. With ``tensor_parallel`` (vLLM at TP>1) the actor holds no
    GPU itself: it sits in the first bundle with its CPUs only, and the engine's Ray executor starts one worker
    per bundle (one GPU each) of the actor's own group (``placement_group_capture_child_tasks``). Were the
    actor to claim a GPU as well, the workers would wait for one forever (ray#36650, vllm#4410). Otherwise the
    actor claims its GPU(s) itself, in one bundle. ``gpu_resource`` is the resource that stands for a GPU
    ("GPU"; a custom resource in the CPU tests). Raises TimeoutError when the groups cannot all be placed in
    time.
    """
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    groups, options = [], []
    for _ in range(replicas):
        if tensor_parallel:  # one bundle per engine worker's GPU, the actor's CPUs with the first
            bundles = [{gpu_resource: 1} for _ in range(gpus_per_replica)]
        else:  # the actor claims all of them itself
            bundles = [{gpu_resource: gpus_per_replica}]
        bundles[0]["CPU"] = cpus_per_replica
        group = placement_group(bundles, strategy="STRICT_PACK")
        groups.append(group)
        strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=tensor_parallel)
        claim = {} if tensor_parallel else ({"num_gpus": gpus_per_replica} if gpu_resource == "GPU"
                                            else {"resources": {gpu_resource: gpus_per_replica}})
        options.append({"num_cpus": cpus_per_replica, "num_gpus": 0, **claim,
                        "scheduling_strategy": strategy})
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        for group in groups:
            ray.util.remove_placement_group(group)
        raise TimeoutError(f"{len(groups) - len(ready)} of {replicas} sampler replica(s) could not be placed "
                           f"({gpus_per_replica} {gpu_resource} each, on one node) within {timeout_s:.0f} s")
    return options


def sampler_actor_class():
    """A Ray actor class that hosts one sampler of any backend (built lazily: Ray is optional)."""
    import ray

    @ray.remote
    class SamplerActor:
        def __init__(self, backend: str, kwargs: dict):
            self.sampler = build_sampler(backend, **kwargs)

        def interface(self) -> dict:
            return {"uses_token_ids": self.sampler.uses_token_ids, "chat": getattr(self.sampler, "chat", False)}

        async def generate(self, request: GenerationRequest) -> Generation:
            return await self.sampler.generate(request)

        def stats(self) -> dict:
            return self.sampler.stats()

    return SamplerActor


class RemoteSampler:
    """The Sampler interface over a pool of sampler actors."""

    def __init__(self, actors: list, uses_token_ids: bool, chat: bool = False, max_attempts: int = 4):
        self.pool = ActorPool(actors, name="sampler", max_attempts=max_attempts, max_backoff_s=30.0)
        self.uses_token_ids = uses_token_ids
        self.chat = chat

    async def generate(self, request: GenerationRequest) -> Generation:
        return await self.pool.call("generate", request)

    def stats(self) -> dict:
        import ray

        per_actor = ray.get([a.stats.remote() for a in self.pool.actors], timeout=60)
        return {"replicas": per_actor, "actor_failures": self.pool.actor_failures}
