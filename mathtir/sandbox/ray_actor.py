"""Ray wrappers: SandboxActor (a SandboxPool on a CPU node) and ConcurrencyCap (one global limit on
executions in flight, shared by every sampler of a job). Imports ray: import this module only where Ray is
used; `import mathtir.sandbox` never pulls it in.

Scheduling: each SandboxActor needs one unit of the custom resource "sandbox" and runs `workers` sandbox
processes. Start CPU nodes with `ray start ... --resources='{"sandbox": N}'`, N = cores / workers per actor,
so that actors land only there (never on GPU nodes) and do not oversubscribe cores.

    cap = get_concurrency_cap(limit=64)                       # same actor for every sampler (by name)
    actor = SandboxActor.remote(workers=8)
    result = await run_capped(cap, actor, code, timeout=10, history=earlier_blocks)
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence

import ray

from mathtir.sandbox.pool import ExecResult, SandboxPool

SANDBOX_RESOURCE = "sandbox"
CAP_NAME = "mathtir-sandbox-concurrency-cap"


@ray.remote(num_cpus=0, resources={SANDBOX_RESOURCE: 1})
class SandboxActor:
    """A SandboxPool inside a Ray actor. Async: many calls wait on the pool's workers at once."""

    def __init__(self, workers: int = 4, **pool_options):
        self.pool = SandboxPool(workers, **pool_options)

    def ready(self) -> dict:
        return {"workers": len(self.pool.workers), "degraded": self.pool.degraded,
                "node": ray.util.get_node_ip_address()}

    async def run(self, code: str, *, timeout: float, history: Sequence[str] = ()) -> ExecResult:
        return await self.pool.arun(code, timeout=timeout, history=history)

    def stats(self) -> dict:
        return {"workers": len(self.pool.workers), "internal_errors": self.pool.internal_errors,
                "restarts": sum(w.starts - 1 for w in self.pool.workers)}


@ray.remote(num_cpus=0)
class ConcurrencyCap:
    """At most `limit` leases out at once. A lease not released within `lease_s` (its sampler died) expires,
    so a crashed sampler cannot shrink the cap for good."""

    def __init__(self, limit: int, lease_s: float = 600.0):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.lease_s = lease_s
        self.leases: dict[int, float] = {}  # token -> expiry (monotonic)
        self.tokens = itertools.count()
        self.changed = asyncio.Condition()
        self.peak = 0
        self.expired = 0
        self.granted = 0

    def _expire(self) -> None:
        now = time.monotonic()
        for token in [t for t, expiry in self.leases.items() if expiry <= now]:
            del self.leases[token]
            self.expired += 1

    async def acquire(self) -> int:
        async with self.changed:
            while True:
                self._expire()
                if len(self.leases) < self.limit:
                    token = next(self.tokens)
                    self.leases[token] = time.monotonic() + self.lease_s
                    self.granted += 1
                    self.peak = max(self.peak, len(self.leases))
                    return token
                next_expiry = min(self.leases.values()) - time.monotonic()
                try:
                    await asyncio.wait_for(self.changed.wait(), timeout=max(next_expiry, 0.01))
                except TimeoutError:
                    pass

    async def release(self, token: int) -> None:
        async with self.changed:
            self.leases.pop(token, None)
            self.changed.notify()

    def stats(self) -> dict:
        return {"limit": self.limit, "in_flight": len(self.leases), "peak": self.peak,
                "granted": self.granted, "expired": self.expired}


def get_concurrency_cap(limit: int, *, name: str = CAP_NAME, namespace: str | None = None,
                        lease_s: float = 600.0):
    """The job's shared cap: created by the first caller, found by name by every other one (whose `limit`
    is then ignored: the first one wins)."""
    return ConcurrencyCap.options(name=name, namespace=namespace, get_if_exists=True).remote(limit, lease_s)


async def run_capped(cap, actor, code: str, *, timeout: float, history: Sequence[str] = ()) -> ExecResult:
    """Run a snippet on `actor` while holding one lease of the shared cap."""
    token = await cap.acquire.remote()
    try:
        return await actor.run.remote(code, timeout=timeout, history=list(history))
    finally:
        await cap.release.remote(token)
