"""Warm trajectories: a trajectory's later blocks run in the interpreter its earlier blocks left (stopped between
blocks, kept by the fork server), with the same results as replaying the history in a fresh child; a child is
kept only when its block left nothing outside its own memory, and kept children cannot reach each other."""

from __future__ import annotations

import threading

import pytest

from mathtir.sandbox import SandboxPool
from mathtir.sandbox.catalog import PREVIOUS_CANARY, REACH_OTHER_PROCESSES

TRAJECTORY = (
    "import random, numpy as np, sympy as sp\nx = sp.Symbol('x')\nroots = sp.solve(x**2 - 5*x + 6, x)\n"
    "draws = [random.random(), float(np.random.rand())]\nprint(roots, draws)",
    "print(sum(roots), random.random(), float(np.random.rand()))",
    "undefined_name + 1",
    "roots.append(7)\nlen(roots)",
    "print(roots, sp.factor(x**2 - 5*x + 6))",
)


def run_trajectory(pool: SandboxPool, blocks=TRAJECTORY, timeout: float = 10):
    return [pool.run(code, timeout=timeout, history=blocks[:i]) for i, code in enumerate(blocks)]


def outcome(result):
    return result.status, result.stdout, result.error, result.exit_code


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(1, memory_mb=512) as p:
        yield p


def test_later_blocks_run_warm_with_the_results_replay_gives(pool):
    with SandboxPool(1, memory_mb=512, warm_trajectories=0) as replaying:
        expected = run_trajectory(replaying)
    results = run_trajectory(pool)
    assert [r.warm for r in expected] == [False] * 5
    assert [r.warm for r in results] == [False, True, True, True, True]
    assert [outcome(r) for r in results] == [outcome(r) for r in expected]
    assert results[2].status == "error" and "NameError" in results[2].error and results[2].exit_code == 1
    assert all(r.replay_ms is None for r in results)


def test_a_block_that_leaves_something_outside_its_memory_is_not_kept(pool):
    leave_behind = {
        "a file": "open('/tmp/f', 'w').write('kept?')",
        "a file in /dev/shm": "open('/dev/shm/f', 'w').write('kept?')",
        "a deleted file held open": "import os\nf = open('/tmp/f', 'w+')\nf.write('x' * 10000)\nf.flush()\n"
                                    "os.unlink('/tmp/f')",
        "a running thread": "import threading, time\n"
                            "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()",
        "its status channel replaced": "import os\nos.dup2(1, 3)",
        "its request channel closed": "import os\nos.close(4)",
    }
    for what, block in leave_behind.items():
        first, second = run_trajectory(pool, (block, "print('next')"))
        assert first.status == "ok", (what, first)
        assert (second.status, second.stdout, second.warm) == ("ok", "next\n", False), what
    # The replayed history rebuilds what the kept child would have had.
    first, second = run_trajectory(pool, ("open('/tmp/f', 'w').write('state')", "print(open('/tmp/f').read())"))
    assert (second.stdout, second.warm) == ("state\n", False)


def test_a_block_that_grows_past_warm_memory_is_not_kept():
    with SandboxPool(1, memory_mb=512, warm_memory_mb=32) as small:
        kept = run_trajectory(small, ("data = bytearray(8 * 2**20)", "print(len(data))"))
        dropped = run_trajectory(small, ("data = bytearray(64 * 2**20)", "print(len(data))"))
    assert (kept[1].stdout, kept[1].warm) == (f"{8 * 2**20}\n", True)
    assert (dropped[1].stdout, dropped[1].warm) == (f"{64 * 2**20}\n", False)


def test_exit_or_timeout_ends_the_interpreter_and_replay_takes_over(pool):
    exits = run_trajectory(pool, ("y = 1", "raise SystemExit(3)", "print(y)"))
    assert [(r.status, r.exit_code, r.warm) for r in exits] == [("ok", 0, False), ("error", 3, True),
                                                                ("ok", 0, False)]
    assert exits[2].stdout == "1\n"
    hang = run_trajectory(pool, ("y = 2", "import time\nwhile True:\n    time.sleep(0.01)"), timeout=1)
    assert [(r.status, r.warm) for r in hang] == [("ok", False), ("timeout", True)]
    after = pool.run("print(y)", timeout=1, history=("y = 2", "print('short')"))
    assert (after.stdout, after.warm) == ("2\n", False)


def test_the_least_recently_used_trajectory_is_dropped_beyond_the_limit():
    with SandboxPool(1, warm_trajectories=2) as two:
        firsts = [f"t = {i}" for i in range(3)]
        for block in firsts:
            assert two.run(block, timeout=5).status == "ok"
        assert two.workers[0].holding == 2
        oldest, newest = (two.run("print(t)", timeout=5, history=[firsts[i]]) for i in (0, 2))
    assert (oldest.stdout, oldest.warm) == ("0\n", False)
    assert (newest.stdout, newest.warm) == ("2\n", True)


def test_kept_children_are_out_of_reach_of_other_trajectories(pool):
    holder = (f"secret = {PREVIOUS_CANARY!r}\nprint(len(secret))",)
    assert pool.run(holder[0], timeout=5).stdout == f"{len(PREVIOUS_CANARY)}\n"
    assert pool.workers[0].holding >= 1
    probe = pool.run(REACH_OTHER_PROCESSES, timeout=20)
    assert (probe.status, probe.stdout) == ("ok", "True []\n"), probe
    again = pool.run(f"print(secret == {PREVIOUS_CANARY!r})", timeout=5, history=holder)
    assert (again.stdout, again.warm) == ("True\n", True)


def test_the_pool_sends_each_block_to_the_worker_holding_its_trajectory():
    with SandboxPool(2) as two:
        results: dict[int, list] = {}

        def trajectory(k: int) -> None:
            results[k] = run_trajectory(two, (f"n{k} = {k}", f"n{k} += 1", f"n{k} *= 10", f"print(n{k})"))

        threads = [threading.Thread(target=trajectory, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for k, rs in results.items():
        assert rs[-1].stdout == f"{(k + 1) * 10}\n"
        assert [r.warm for r in rs] == [False, True, True, True], k
        assert len({r.worker for r in rs}) == 1
    assert {rs[0].worker for rs in results.values()} == {0, 1}
