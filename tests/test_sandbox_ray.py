"""SandboxActor and the shared ConcurrencyCap on an embedded Ray (local, loopback, no dashboard)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_AUTH_MODE"] = "disabled"  # an unset mode would write ~/.ray/auth_token
    ray.init(num_cpus=2, resources={"sandbox": 2}, include_dashboard=False, namespace="sandbox-test",
             object_store_memory=80 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


def test_actors_run_snippets_under_one_shared_cap(local_ray):
    from mathtir.sandbox.ray_actor import SandboxActor, get_concurrency_cap, run_capped

    actors = [SandboxActor.remote(workers=1, memory_mb=256) for _ in range(2)]
    info = ray.get([a.ready.remote() for a in actors], timeout=120)
    assert [i["workers"] for i in info] == [1, 1] and not any(i["degraded"] for i in info)
    # A third actor would need a third "sandbox" unit: it must not be scheduled.
    extra = SandboxActor.remote(workers=1)
    ready, _ = ray.wait([extra.ready.remote()], timeout=2)
    assert ready == []
    ray.kill(extra)

    cap = get_concurrency_cap(limit=1)
    assert get_concurrency_cap(limit=99)._actor_id == cap._actor_id  # one cap per job, found by name

    async def main():
        return await asyncio.gather(*(run_capped(cap, actors[i % 2], "import time\ntime.sleep(0.3)\n6 * 7",
                                                 timeout=10) for i in range(4)))

    t0 = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert [(r.status, r.stdout) for r in results] == [("ok", "42\n")] * 4
    stats = ray.get(cap.stats.remote())
    assert (stats["peak"], stats["granted"], stats["in_flight"]) == (1, 4, 0)
    assert elapsed >= 4 * 0.3  # serialised by the cap although two actors were free

    sandboxed = ray.get(actors[0].run.remote("import socket\nsocket.socket()", timeout=5))
    assert sandboxed.status == "error" and "PermissionError" in sandboxed.error


def test_the_executor_sends_a_trajectory_back_to_the_actor_that_kept_it(local_ray):
    from mathtir.eval.execution import SandboxActorExecutor
    from mathtir.sandbox.ray_actor import SandboxActor

    actors = [SandboxActor.remote(workers=1, memory_mb=256) for _ in range(2)]
    ray.get([a.ready.remote() for a in actors], timeout=120)
    executor = SandboxActorExecutor(actors, timeout=10)

    async def trajectory(k: int) -> list:
        blocks = [f"v{k} = {k}", f"v{k} += 1", f"print(v{k})"]
        return [await executor.run(block, blocks[:i]) for i, block in enumerate(blocks)]

    async def main():
        return await asyncio.gather(*(trajectory(k) for k in range(4)))

    for k, results in enumerate(asyncio.run(main())):
        assert results[-1].stdout == f"{k + 1}\n"
        assert [r.warm for r in results] == [False, True, True], k
    stats = executor.stats()
    assert (stats["executions"], stats["warm_executions"], stats["replayed_executions"]) == (12, 8, 0)
    for actor in actors:
        ray.kill(actor)


def test_cap_lease_of_a_dead_sampler_expires(local_ray):
    from mathtir.sandbox.ray_actor import get_concurrency_cap

    cap = get_concurrency_cap(limit=1, name="short-lease-cap", lease_s=0.5)
    ray.get(cap.acquire.remote())  # never released, as if its sampler crashed
    t0 = time.monotonic()
    ray.get(cap.acquire.remote(), timeout=10)
    assert 0.3 < time.monotonic() - t0 < 5
    assert ray.get(cap.stats.remote())["expired"] == 1
