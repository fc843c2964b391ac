"""Code execution for the TIR loop: sandbox actors on the cluster's CPU nodes (or a local SandboxPool).

SandboxActorExecutor spreads snippets over mathtir.sandbox.ray_actor.SandboxActor replicas (each needs one unit
of the custom resource "sandbox", which the CPU nodes offer), least-loaded first. Actors are restarted by Ray
when they die (max_restarts=-1); a snippet whose actor died is run again on a live one (execution is stateless:
the trajectory's earlier blocks are replayed each time), so a lost actor costs time, never a sample.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mathtir.sandbox import ExecResult, SandboxPool

log = logging.getLogger(__name__)


class PoolExecutor:
    """A local SandboxPool as an Executor (one machine, no Ray)."""

    def __init__(self, pool: SandboxPool, *, timeout: float):
        self.pool = pool
        self.timeout = timeout

    async def run(self, code: str, history: list[str]) -> ExecResult:
        return await self.pool.arun(code, timeout=self.timeout, history=history)

    def stats(self) -> dict:
        return {"workers": len(self.pool.workers), "internal_errors": self.pool.internal_errors}


class SandboxActorExecutor:
    def __init__(self, actors: list, *, timeout: float, cap=None, max_attempts: int = 6):
        self.actors = list(actors)
        self.timeout = timeout
        self.cap = cap  # mathtir.sandbox.ray_actor.ConcurrencyCap: executions in flight across the job
        self.max_attempts = max_attempts
        self._in_flight = [0] * len(self.actors)
        self.executions = 0
        self.actor_failures = 0
        self.busy_s = 0.0

    async def run(self, code: str, history: list[str]) -> ExecResult:
        import ray

        lease = await self.cap.acquire.remote() if self.cap is not None else None
        try:
            for attempt in range(1, self.max_attempts + 1):
                index = min(range(len(self.actors)), key=self._in_flight.__getitem__)
                self._in_flight[index] += 1
                started = time.perf_counter()
                try:
                    result = await self.actors[index].run.remote(code, timeout=self.timeout, history=history)
                    self.executions += 1
                    self.busy_s += time.perf_counter() - started
                    return result
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    # The actor died (or is restarting): Ray brings it back; run the snippet again.
                    self.actor_failures += 1
                    if attempt == self.max_attempts:
                        raise RuntimeError(f"sandbox actors failed {attempt} times in a row: {e}") from e
                    log.warning("sandbox actor %d failed (%s); retrying (attempt %d)", index,
                                type(e).__name__, attempt + 1)
                    await asyncio.sleep(min(10.0, 0.5 * 2 ** attempt))
                finally:
                    self._in_flight[index] -= 1
        finally:
            if lease is not None:
                await self.cap.release.remote(lease)
        raise AssertionError("unreachable")

    def stats(self) -> dict:
        import ray

        stats = {"actors": len(self.actors), "executions": self.executions,
                 "actor_failures": self.actor_failures, "busy_s": round(self.busy_s, 2)}
        if self.cap is not None:
            stats["concurrency"] = ray.get(self.cap.stats.remote(), timeout=60)
        return stats


def start_sandbox(ray, args) -> SandboxActorExecutor:
    """Sandbox actors sized to the cluster's "sandbox" resource (or --sandbox-actors), ready before use."""
    from mathtir.sandbox.ray_actor import SandboxActor, get_concurrency_cap

    units = int(ray.cluster_resources().get("sandbox", 0))
    if units < 1:
        raise RuntimeError("the Ray cluster offers no 'sandbox' resource: start the CPU nodes with "
                           "`ray start ... --resources='{\"sandbox\": N}'` (slurm/eval.sh does)")
    count = args.sandbox_actors or units
    if count > units:
        raise RuntimeError(f"--sandbox-actors {count} > the cluster's {units} 'sandbox' unit(s)")
    actors = [SandboxActor.options(max_restarts=-1).remote(workers=args.sandbox_workers) for _ in range(count)]
    ray.get([a.ready.remote() for a in actors], timeout=300)
    log.info("%d sandbox actor(s) ready, %d worker(s) each", count, args.sandbox_workers)
    # A per-job cap (the job's own namespace): one job never waits on another job's leases.
    cap = get_concurrency_cap(args.max_concurrent_executions or count * args.sandbox_workers)
    return SandboxActorExecutor(actors, timeout=args.exec_timeout, cap=cap)
