"""SandboxPool behaviour: results, REPL echo, replay, truncation, supervision, degraded mode, asyncio."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mathtir.sandbox import ExecResult, SandboxPool, SandboxUnavailable
from mathtir.sandbox.catalog import descendant_pids
from mathtir.sandbox.server import MADV_COLLAPSE


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(2, memory_mb=256) as p:
        yield p


def test_ok_result_fields(pool):
    r = pool.run("print(2 + 3)", timeout=5)
    assert isinstance(r, ExecResult)
    assert (r.status, r.stdout, r.stderr, r.error, r.exit_code, r.signal, r.truncated) == \
        ("ok", "5\n", "", None, 0, None, False)
    assert 0 < r.wall_ms < 5000


def test_sympy_and_numpy_are_preloaded_and_work(pool):
    r = pool.run("import sympy as sp, numpy as np\nx = sp.Symbol('x')\nprint(sp.solve(x**2 - 4, x))\n"
                 "print(int(np.arange(5).sum()))", timeout=10)
    assert (r.status, r.stdout) == ("ok", "[-2, 2]\n10\n")


def _kernel_collapses_huge_pages() -> bool:
    """Whether MADV_COLLAPSE works here (Linux 6.1+ with transparent huge pages), tried on a touched 4 MiB
    anonymous mapping of this process."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    region = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.write(b"x" * len(region))
    view = ctypes.c_char.from_buffer(region)
    start = -(-ctypes.addressof(view) // (2 << 20)) * (2 << 20)
    collapsed = libc.madvise(start, 2 << 20, MADV_COLLAPSE) == 0
    del view
    region.close()
    return collapsed


def test_children_map_the_preloaded_heap_in_huge_pages(pool):
    """Forking a child copies, and its exit tears down, a page-table entry per populated page of the zygote:
    the server collapses its heap into 2 MiB pages first, so a child starts with them mapped whole."""
    if not _kernel_collapses_huge_pages():
        pytest.skip("this kernel cannot collapse memory into huge pages (MADV_COLLAPSE, Linux 6.1+)")
    r = pool.run("print(next(line.split()[1] for line in open('/proc/self/smaps_rollup') "
                 "if line.startswith('AnonHugePages:')))", timeout=5)
    assert r.status == "ok", r
    assert int(r.stdout) >= 2048  # kB: at least one 2 MiB page of the zygote's heap


@pytest.mark.parametrize("code, stdout", [
    ("x = 2\nx + 1", "3\n"),            # last bare expression is echoed
    ("'a' * 2", "'aa'\n"),              # as repr, like a REPL
    ("print('p')", "p\n"),              # print returns None: no 'None' echo
    ("None", ""),
    ("for i in range(2):\n    i", ""),  # only a top-level last statement is echoed
    ("x = 1\nx\ny = 2", ""),            # an expression that is not last is not echoed
])
def test_last_expression_echo(pool, code, stdout):
    r = pool.run(code, timeout=5)
    assert (r.status, r.stdout) == ("ok", stdout)


def test_exception_gives_error_line_and_traceback_without_server_frames(pool):
    r = pool.run("def f():\n    return 1 / 0\nprint('before')\nf()", timeout=5)
    assert r.status == "error"
    assert r.error == "ZeroDivisionError: division by zero"
    assert r.stdout == "before\n"
    assert r.exit_code == 1
    assert r.stderr.startswith("Traceback (most recent call last):\n  File \"<cell>\", line 4")
    assert "return 1 / 0" in r.stderr and "server.py" not in r.stderr


def test_syntax_error(pool):
    r = pool.run("x = (1,\nprint(x)", timeout=5)
    assert r.status == "error" and r.error.startswith("SyntaxError")
    assert "server.py" not in r.stderr


def test_sys_exit_codes(pool):
    assert pool.run("import sys\nsys.exit(0)", timeout=5).status == "ok"
    assert pool.run("print('a')\nexit()\nprint('b')", timeout=5).stdout == "a\n"  # site's exit/quit exist
    assert pool.run("quit(4)", timeout=5).exit_code == 4
    r = pool.run("import sys\nsys.exit(3)", timeout=5)
    assert (r.status, r.exit_code, r.error) == ("error", 3, "SystemExit: 3")


def test_timeout_keeps_partial_output(pool):
    t0 = time.monotonic()
    r = pool.run("print('started', flush=True)\nwhile True:\n    pass", timeout=0.5)
    assert r.status == "timeout" and "0.5 s" in r.error
    assert r.stdout == "started\n"
    assert time.monotonic() - t0 < 5


def test_hash_seed_and_random_seed_are_fixed_across_workers(pool):
    code = "import random, numpy as np\nprint({'apple', 'banana', 'cherry', 'date'}, random.random(), np.random.rand())"
    outputs = {r.stdout for r in [pool.run(code, timeout=5) for _ in range(6)]}
    assert len(outputs) == 1


def test_replay_restores_state_silently(pool):
    history = ["import sympy as sp\nx = sp.Symbol('x')\nprint('block one output')\nroots = sp.solve(x**2 - 9, x)",
               "roots = [r * 10 for r in roots]\nroots",     # echo during replay must stay silent too
               "import sys\nsys.stderr.write('noise')\n1 / 0",  # exception swallowed, rest of replay goes on
               "count = len(roots)"]
    r = pool.run("print(roots, count)", timeout=5, history=history)
    assert (r.status, r.stdout, r.stderr) == ("ok", "[-30, 30] 2\n", "")
    assert r.replay_ms is not None and r.replay_ms > 0


def test_replay_uses_fixed_seeds(pool):
    history = ["import random\na = random.random()"]
    first = pool.run("print(a)", timeout=5, history=history).stdout
    assert first == pool.run("print(a)", timeout=5, history=history).stdout
    # The new block continues the same random stream as if it had run in one process.
    direct = pool.run("import random\na = random.random()\nprint(a, random.random())", timeout=5).stdout
    replayed = pool.run("print(a, random.random())", timeout=5, history=history).stdout
    assert direct == replayed


def test_replay_time_within_margin_does_not_eat_the_timeout(pool):
    # Three earlier blocks of 0.3 s each: 0.9 s of replay, more than the 0.6 s timeout of the new block.
    history = ["import time\ntime.sleep(0.3)"] * 3
    r = pool.run("import time\ntime.sleep(0.3)\nprint('new block ran')", timeout=0.6, history=history)
    assert (r.status, r.stdout) == ("ok", "new block ran\n")
    assert r.replay_ms >= 850


def test_replay_beyond_margin_times_out(pool):
    with SandboxPool(1, memory_mb=256, replay_margin=0.2) as tight:
        r = tight.run("print('new block ran')", timeout=0.5, history=["import time\ntime.sleep(0.4)"] * 3)
    assert r.status == "timeout" and "replaying" in r.error
    assert r.stdout == ""


def test_replayed_block_that_hangs_is_cut_at_the_timeout(pool):
    history = ["x = 1", "while True:\n    pass", "x += 1"]
    r = pool.run("print(x)", timeout=0.5, history=history)
    assert (r.status, r.stdout) == ("ok", "2\n")


def test_truncation_keeps_head_and_tail_and_counts_dropped():
    with SandboxPool(1, memory_mb=256, keep_output_bytes=100, max_output_bytes=100_000) as small:
        r = small.run("print('START' + 'x' * 5000 + 'END')\nimport sys\n_ = sys.stderr.write('e' * 50)", timeout=5)
        assert r.status == "ok" and r.truncated
        assert r.stdout.startswith("START") and r.stdout.endswith("END\n")
        assert r.stdout_dropped == len("START" + "x" * 5000 + "END\n") - 100
        assert f"[... {r.stdout_dropped} bytes dropped ...]" in r.stdout
        assert (r.stderr, r.stderr_dropped) == ("e" * 50, 0)
        flood = small.run("while True:\n    print('y' * 1000)", timeout=5)
        assert flood.status == "output_limit" and flood.truncated
        assert flood.stdout_dropped > 100_000 - 200


def test_many_threads_share_the_pool(pool):
    results = {}

    def call(i):
        results[i] = pool.run(f"print({i} * 2)", timeout=10)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i * 2}\n" for i in range(12)}
    assert {r.worker for r in results.values()} == {0, 1}


def test_arun_runs_concurrently(pool):
    async def main():
        return await asyncio.gather(*(pool.arun("import time\ntime.sleep(0.4)\nprint('x')", timeout=5)
                                      for _ in range(2)))

    t0 = time.monotonic()
    results = asyncio.run(main())
    assert [r.stdout for r in results] == ["x\n", "x\n"]
    assert time.monotonic() - t0 < 0.8 + 0.5  # both workers at once, not one after the other


def test_bad_arguments_are_clear_errors(pool):
    with pytest.raises(ValueError, match="timeout"):
        pool.run("1", timeout=0)
    with pytest.raises(TypeError, match="history"):
        pool.run("1", timeout=1, history=[1])
    with pytest.raises(TypeError, match="unknown SandboxPool options"):
        SandboxPool(1, memry_mb=5)


def test_killed_worker_is_restarted_and_the_request_retried():
    with SandboxPool(1, memory_mb=256) as sup:
        worker = sup.workers[0]
        first_pid = worker.pid
        killer = threading.Timer(0.3, os.kill, (first_pid, signal.SIGKILL))
        killer.start()
        r = sup.run("import time\ntime.sleep(1)\nprint('done')", timeout=5)
        killer.join()
        assert (r.status, r.stdout) == ("ok", "done\n")  # retried once on the restarted worker
        assert sup.internal_errors == 1
        assert worker.pid != first_pid and worker.starts == 2


def test_hung_worker_returns_internal_error_and_restarts():
    with SandboxPool(1, memory_mb=256, supervision_grace=0.5) as sup:
        worker = sup.workers[0]
        for pid in descendant_pids(worker.pid):  # the fork server stops answering: the worker looks hung
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        r = worker.run("print(1)", timeout=0.5)
        assert r.status == "internal_error" and "hung" in r.error
        assert time.monotonic() - t0 < 3
        r = worker.run("print(1)", timeout=5)  # a dead worker restarts on its next run
        assert (r.status, r.stdout, worker.starts) == ("ok", "1\n", 2)


def test_workers_are_recycled_after_n_runs():
    with SandboxPool(1, memory_mb=256, recycle_after=3) as rec:
        worker = rec.workers[0]
        pids = set()
        for _ in range(7):
            assert rec.run("print(1)", timeout=5).stdout == "1\n"
            pids.add(worker.pid)
        assert worker.starts >= 3 and len(pids) >= 2


def test_missing_bwrap_is_a_clear_error_unless_degraded_is_allowed(monkeypatch):
    monkeypatch.setenv("MATHTIR_TEST_SECRET", "s3cret-value")
    with pytest.raises(SandboxUnavailable, match="allow_degraded"):
        SandboxPool(1, bwrap="/nonexistent/bwrap")
    with pytest.warns(RuntimeWarning, match="DEGRADED"):
        degraded = SandboxPool(1, memory_mb=256, bwrap="/nonexistent/bwrap", allow_degraded=True)
    with degraded:
        assert degraded.degraded
        assert degraded.run("print(2 + 3)", timeout=5).stdout == "5\n"
        # seccomp and rlimits still hold without namespaces
        assert degraded.run("import os\nos.fork()", timeout=5).error.startswith("PermissionError")
        assert degraded.run("import socket\nsocket.socket()", timeout=5).status == "error"
        assert degraded.run("import os\nos.kill(os.getppid(), 9)", timeout=5).status == "error"
        assert degraded.run("while True:\n    pass", timeout=0.5).status == "timeout"
        env = degraded.run("import os\nprint(dict(os.environ))", timeout=5)
        assert env.status == "ok" and "PYTHONHASHSEED" in env.stdout and "s3cret-value" not in env.stdout


def test_import_is_light():
    code = "import sys, mathtir.sandbox\nprint(sorted(m for m in ('sympy', 'numpy', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "[]\n"


def test_site_packages_under_tmp_are_visible_inside(tmp_path, monkeypatch):
    """A virtualenv in a checkout under /tmp (CI clones can live there): the sandbox's own /tmp must not
    hide it."""
    import tempfile

    from mathtir.sandbox import pool as pool_module

    site_dir = tempfile.mkdtemp(prefix="mathtir-site-", dir="/tmp")
    os.chmod(site_dir, 0o755)  # the fork server runs as nobody when the host is root
    with open(os.path.join(site_dir, "planted_module_for_sandbox.py"), "w") as f:
        f.write("ANSWER = 42\n")
    os.chmod(os.path.join(site_dir, "planted_module_for_sandbox.py"), 0o644)
    real_site_dirs = pool_module._site_dirs
    monkeypatch.setattr(pool_module, "_site_dirs", lambda: [*real_site_dirs(), site_dir])
    with SandboxPool(1) as private_pool:
        result = private_pool.run("import planted_module_for_sandbox as m\nprint(m.ANSWER)", timeout=20)
    assert (result.status, result.stdout.strip()) == ("ok", "42"), result
