"""Isolation properties that need more than one hostile case to show: what a sample can learn about the one
before it, who decides that a run is over, when the pool may run a snippet a second time, the inode cap, and
a fork server that shrugs off signals.
"""

from __future__ import annotations

import os
import platform
import signal
import threading
import time

import pytest

from mathtir.sandbox import SandboxPool
from mathtir.sandbox.catalog import MEMORY_SCAN, PREVIOUS_CANARY, RAW_THREADS, descendant_pids

FORGED_SETUP_FAILED = ("import os\nos.write(3, b'{\"event\": \"setup_failed\", \"error\": \"forged\"}\\n')\n"
                       "os._exit(120)")


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(1, memory_mb=256) as p:
        yield p


def _host_pid_of_fork_server(worker) -> int:
    """The host's pid for the process that the sandbox knows as worker.server_pid."""
    for pid in descendant_pids(worker.pid):
        with open(f"/proc/{pid}/status") as f:
            nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
        if int(nspid[-1]) == worker.server_pid:
            return pid
    raise AssertionError("fork server not found")


def test_memory_scan_finds_a_canary_in_its_own_process(pool):
    """The scan below is able to see: a canary planted in the scanning process itself is found."""
    r = pool.run(f"secret = {PREVIOUS_CANARY!r} * 3\n{MEMORY_SCAN}", timeout=20)
    assert (r.status, r.stdout) == ("ok", "found\n"), r


def test_a_sample_cannot_read_the_previous_one_from_memory(pool):
    for _ in range(3):
        assert pool.run(f"secret = {PREVIOUS_CANARY!r}\nprint(secret * 3)", timeout=5).status == "ok"
        scan = pool.run(MEMORY_SCAN, timeout=20)
        assert (scan.status, scan.stdout) == ("ok", "clean\n"), scan


def test_a_forged_done_event_does_not_end_the_run(pool):
    r = pool.run("import os, time\nos.write(3, b'{\"event\": \"done\", \"exit_code\": 0}\\n')\ntime.sleep(0.3)\n"
                 "print('still running')\nraise SystemExit(4)", timeout=5)
    assert (r.status, r.stdout, r.exit_code) == ("error", "still running\n", 4)
    assert r.wall_ms >= 300


def test_a_forged_setup_failure_is_the_snippets_own_error_and_runs_once():
    with SandboxPool(2, memory_mb=256) as two:
        r = two.run(FORGED_SETUP_FAILED, timeout=5)
        assert (r.status, r.exit_code) == ("error", 120)
        assert two.internal_errors == 0


def test_a_fork_server_that_dies_mid_run_is_not_retried_on_another_worker():
    """The host cannot tell whether the snippet brought its fork server down: it must not get a second worker."""
    with SandboxPool(2, memory_mb=256) as two:
        first = two.workers[0]
        two.workers[1].run("pass", timeout=5)  # the queue hands out worker 0 next
        runs_before = [w.runs for w in two.workers]
        server = _host_pid_of_fork_server(first)
        killer = threading.Timer(0.3, os.kill, (server, signal.SIGKILL))
        killer.start()
        r = two.run("import time\ntime.sleep(1)\nprint('done')", timeout=5)
        killer.join()
        assert r.status == "internal_error" and "137" in r.error, r
        assert two.internal_errors == 1
        assert [w.runs for w in two.workers] == runs_before  # no other worker ran it


def test_fork_server_ignores_catchable_signals(pool):
    worker = pool.workers[0]
    server = _host_pid_of_fork_server(worker)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGIO, signal.SIGUSR1, signal.SIGRTMIN):
        os.kill(server, signum)
    time.sleep(0.2)
    r = pool.run("print(2 + 3)", timeout=5)
    assert (r.status, r.stdout) == ("ok", "5\n")
    assert worker.starts == 1 and _host_pid_of_fork_server(worker) == server


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the raw-clone snippet is x86_64 machine code")
def test_threads_without_stacks_are_capped_by_the_thread_limit():
    """Threads made by a raw clone cost no address space: RLIMIT_NPROC is what bounds their kernel memory."""
    with SandboxPool(1, memory_mb=256, max_user_threads=64) as small:
        r = small.run(RAW_THREADS, timeout=10)
        assert r.status == "ok" and r.stdout.startswith("capped ") and int(r.stdout.split()[1]) < 64, r


def test_scratch_inode_cap_is_configurable_and_wiped():
    with SandboxPool(1, memory_mb=256, tmp_inodes=100) as small:
        r = small.run("import os\nfor i in range(200):\n    open(f'/tmp/f{i}', 'w').close()", timeout=5)
        assert r.status == "error" and "No space left" in r.error, r
        r = small.run("import os\nfor i in range(200):\n    os.mkdir(f'/dev/shm/d{i}')", timeout=5)
        assert r.status == "error" and "No space left" in r.error, r
        after = small.run("import os\nprint(os.listdir('/tmp'), os.listdir('/dev/shm'))", timeout=5)
        assert after.stdout == "[] []\n"
