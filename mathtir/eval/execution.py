"""Code execution for the TIR loop: sandbox actors on the cluster's CPU nodes (or a local SandboxPool).

Each mathtir.sandbox.ray_actor.SandboxActor needs one unit of the custom resource "sandbox", which the CPU
nodes offer; actors are restarted by Ray when they die (max_restarts=-1) and a snippet whose actor died is run
again on a live one.
"""

from __future__ import annotations

import logging

from mathtir.eval.actors import ActorPool
from mathtir.sandbox import ExecResult, SandboxPool, TrajectoryHolders

log = logging.getLogger(__name__)


class StateTally:
    """How the executions after a trajectory's first found its state: warm (the interpreter kept for it) or
    replayed (its earlier blocks run again first)."""

    def __init__(self):
        self.warm_executions = self.replayed_executions = 0

    def count(self, result: ExecResult, history: list[str]) -> ExecResult:
        if history:
            if result.warm:
                self.warm_executions += 1
            else:
                self.replayed_executions += 1
        return result

    def stats(self) -> dict:
        return {"warm_executions": self.warm_executions, "replayed_executions": self.replayed_executions}


class PoolExecutor:
    """A local SandboxPool as an Executor (one machine, no Ray)."""

    def __init__(self, pool: SandboxPool, *, timeout: float):
        self.pool = pool
        self.timeout = timeout
        self.tally = StateTally()

    async def run(self, code: str, history: list[str]) -> ExecResult:
        return self.tally.count(await self.pool.arun(code, timeout=self.timeout, history=history), history)

    def stats(self) -> dict:
        return {"workers": len(self.pool.workers), "internal_errors": self.pool.internal_errors,
                **self.tally.stats()}


class SandboxActorExecutor:
    """Snippets spread over SandboxActor replicas (mathtir.eval.actors.ActorPool), each execution holding a lease
    of the job's concurrency cap while it runs. A trajectory's next block goes to the actor that kept its
    interpreter (ExecResult.kept), where it runs warm instead of replaying the history."""

    # Trajectories remembered (~100 bytes each): far more than the actors keep, so a forgotten one was dropped there
    MAX_HOLDERS = 65536

    def __init__(self, actors: list, *, timeout: float, cap=None, max_attempts: int = 6):
        self.pool = ActorPool(actors, name="sandbox", max_attempts=max_attempts, max_backoff_s=10.0)
        self.timeout = timeout
        self.cap = cap  # mathtir.sandbox.ray_actor.ConcurrencyCap: executions in flight across the job
        self.holders = TrajectoryHolders(self.MAX_HOLDERS)  # actor index for each kept trajectory
        self.tally = StateTally()

    async def run(self, code: str, history: list[str]) -> ExecResult:
        prefer = self.holders.take(history)
        lease = await self.cap.acquire.remote() if self.cap is not None else None
        try:
            index, result = await self.pool.call_at(prefer, "run", code, timeout=self.timeout, history=history)
        finally:
            if lease is not None:
                await self.cap.release.remote(lease)
        if result.kept:
            self.holders.record(history, code, index)
        return self.tally.count(result, history)

    def stats(self) -> dict:
        import ray

        stats = self.pool.stats()
        stats["executions"] = stats.pop("calls")
        stats.update(self.tally.stats())
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
