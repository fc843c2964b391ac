"""Sandbox speed, side by side in one run: mathtir's SandboxPool (all isolation on) vs a fresh `python -c`
per snippet (the naive baseline) vs in-process `exec` (the floor, no isolation at all), and optionally
NeMo-Skills' local sandbox (its Flask app on loopback, IPython sessions, no isolation between snippets).

    .venv/bin/python bench/sandbox.py [--workers 2] [--runs 100] [--fresh-runs 8]
        [--nemo-skills PATH/local_sandbox_server.py --nemo-skills-python VENV/bin/python]

NeMo-Skills is not a dependency: give a checkout's `nemo_skills/code_execution/local_sandbox/
local_sandbox_server.py` and an interpreter with flask, ipython, psutil and sympy. Its rows are a warm session
(each caller keeps one IPython session, as a trajectory does; sympy's cache persists across its calls, as it
does across a trajectory's blocks) and a new session per snippet.

For a trivial snippet and a typical TIR snippet (sympy solve): p50/p99 latency of sequential calls, and
throughput with `workers` concurrent callers. For a 5-block sympy trajectory (each block using the state of the
earlier ones): per-block latency and blocks/s with `workers` trajectories at a time, the pool keeping each
trajectory's interpreter (warm) and replaying its history instead, against a fresh `python -c` that re-runs
the trajectory so far, in-process exec, and NeMo-Skills' IPython session per trajectory. Targets (issue 16,
with every isolation measure on): sympy throughput >= 30x the fresh-process baseline; trivial p50 <= 8 ms.
Ratios are printed at the end, with the load average: on a shared machine absolute latencies follow the load,
the ratios much less. First it measures what this machine charges for a 4 KiB page (a first touch, and a forked
child's copy-on-write copy), the part of a sandbox child's cost that the machine, not the sandbox, sets; and
the sympy ceiling with no isolation at all (in-process exec, one process per core) is printed beside the target.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import mmap
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mathtir.sandbox import SandboxPool

SYMPY_TARGET = 30.0  # x the fresh-process throughput
TRIVIAL_P50_TARGET_MS = 8.0
SNIPPETS = {
    "trivial": "print(2 + 3)",
    "sympy": "import sympy as sp\nx = sp.Symbol('x')\nprint(sp.solve(x**3 - 6*x**2 + 11*x - 6, x))",
}
# A TIR trajectory: five blocks, each building on the state the earlier ones left (as a model's do).
TRAJECTORY = (
    "import sympy as sp\nx = sp.Symbol('x')\nf = x**3 - 6*x**2 + 11*x - 6\nroots = sp.solve(f, x)\nprint(roots)",
    "print(sp.factor(f), sum(r**2 for r in roots))",
    "g = sp.diff(f, x)\ncritical = sp.solve(g, x)\nprint(critical, [f.subs(x, c).simplify() for c in critical])",
    "area = sp.integrate(f, (x, 1, 3))\nprint(area)",
    "from fractions import Fraction\nprint(Fraction(str(area)) + sum(Fraction(int(r)) for r in roots))",
)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(call, runs: int, concurrency: int) -> dict:
    """Latency: `runs` sequential calls. Throughput: `runs` calls from `concurrency` threads."""
    call()  # warm-up
    latencies = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(lambda _: call(), range(runs)))
    elapsed = time.perf_counter() - t0
    return {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "mean": statistics.fmean(latencies), "per_s": runs / elapsed}


def trajectory_measure(run_block, trajectories: int, concurrency: int) -> dict:
    """`trajectories` runs of TRAJECTORY, `concurrency` at a time; run_block(code, history, session) runs one
    block. Per-block latency percentiles, and blocks per second."""
    latencies: list[float] = []

    def one(_):
        session = uuid.uuid4().hex
        for i, block in enumerate(TRAJECTORY):
            t0 = time.perf_counter()
            run_block(block, list(TRAJECTORY[:i]), session)
            latencies.append((time.perf_counter() - t0) * 1000)

    one(None)  # warm-up
    latencies.clear()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(trajectories)))
    elapsed = time.perf_counter() - t0
    return {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "mean": statistics.fmean(latencies), "per_s": trajectories * len(TRAJECTORY) / elapsed}


def pool_block(pool: SandboxPool):
    def run_block(code, history, session):
        result = pool.run(code, timeout=30, history=history)
        if result.status != "ok":
            raise RuntimeError(f"sandbox run failed: {result}")
    return run_block


def fresh_process_block(code, history, session):
    """The stateless baseline: a new interpreter re-runs the trajectory so far, then the block."""
    subprocess.run([sys.executable, "-c", "\n".join([*history, code])], check=True, capture_output=True)


def in_process_block():
    """exec in this process, a namespace per trajectory; sympy's cache cleared when a trajectory starts (a
    sandbox child starts from the fork server's), kept across its blocks (as a kept interpreter keeps it)."""
    import sympy

    namespaces: dict[str, dict] = {}

    def run_block(code, history, session):
        if not history:
            sympy.core.cache.clear_cache()
            namespaces[session] = {"__name__": "__main__"}
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, "<cell>", "exec"), namespaces[session])
    return run_block


def pool_call(pool: SandboxPool, code: str):
    def call():
        result = pool.run(code, timeout=30)
        if result.status != "ok":
            raise RuntimeError(f"sandbox run failed: {result}")
    return call


def fresh_process_call(code: str):
    def call():
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return call


def in_process_call(code: str):
    """exec in this process. sympy's cache is cleared first: a sandbox child starts from the fork server's
    cache, so repeating one solve in one process would time cache hits, not the work."""
    import sympy

    compiled = compile(code, "<cell>", "exec")

    def call():
        sympy.core.cache.clear_cache()
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compiled, {"__name__": "__main__"})
    return call


@contextlib.contextmanager
def nemo_skills_server(server_py: str, python: str):
    """NeMo-Skills' local sandbox app served by flask on a free loopback port; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Path(server_py).resolve()
    log = tempfile.TemporaryFile()  # it logs every request: a pipe nobody reads would fill and stall it
    # A session of its own: its IPython session processes outlive the flask process, so they go by group.
    proc = subprocess.Popen([python, "-m", "flask", "--app", server.stem, "run", "--host", "127.0.0.1", "--port",
                             str(port)], cwd=server.parent, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"NeMo-Skills sandbox did not start: {log.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def nemo_skills_execute(url: str, code: str, session: str) -> None:
    body = json.dumps({"generated_code": code, "timeout": 30, "language": "ipython"}).encode()
    request = urllib.request.Request(f"{url}/execute", data=body, headers={
        "Content-Type": "application/json", "X-Session-ID": session})
    with urllib.request.urlopen(request, timeout=60) as resp:
        result = json.load(resp)
    if result.get("process_status") != "completed":
        raise RuntimeError(f"NeMo-Skills sandbox run failed: {result}")


def nemo_skills_block(url: str):
    """A trajectory's blocks in one IPython session of its own, deleted after the last block."""
    def run_block(code, history, session):
        nemo_skills_execute(url, code, session)
        if len(history) == len(TRAJECTORY) - 1:
            urllib.request.urlopen(urllib.request.Request(f"{url}/sessions/{session}", method="DELETE"),
                                   timeout=30).read()
    return run_block


def nemo_skills_call(url: str, code: str, *, warm: bool):
    """One snippet through /execute in an IPython session: the calling thread's own session when warm, else a
    new session, deleted after the call (as a new trajectory would start one)."""
    own = threading.local()

    def call():
        if warm and not hasattr(own, "session"):
            own.session = uuid.uuid4().hex
        session = own.session if warm else uuid.uuid4().hex
        nemo_skills_execute(url, code, session)
        if not warm:
            urllib.request.urlopen(urllib.request.Request(f"{url}/sessions/{session}", method="DELETE"),
                                   timeout=30).read()
    return call


def page_costs(mib: int = 32) -> dict:
    """Microseconds per 4 KiB page on this machine: the first touch of fresh anonymous memory, and the copy a
    forked child makes at its first write to a page it shares with its parent. A sandbox child pays the
    second for every page of the fork server's heap the snippet writes to (~1,500 for the sympy solve), so
    where page-table updates are expensive (a hypervisor trapping them) it is most of a snippet's extra cost."""
    n, page = mib << 20, mmap.PAGESIZE
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE)
    m.madvise(mmap.MADV_NOHUGEPAGE)  # 4 KiB pages, as the heap's copies are

    def write_each_page(value: int) -> float:
        t = time.perf_counter()
        for i in range(0, n, page):
            m[i] = value
        return time.perf_counter() - t

    first, loop = write_each_page(1), write_each_page(2)  # the second pass faults nothing: the loop's own cost
    read, write = os.pipe()
    pid = os.fork()  # before any thread or pool exists
    if pid == 0:
        try:
            os.write(write, repr(write_each_page(3)).encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    copy = float(os.read(read, 64))
    for fd in (read, write):
        os.close(fd)
    m.close()
    return {"first_touch_us": (first - loop) / (n // page) * 1e6,
            "copy_on_write_us": (copy - loop) / (n // page) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="pool workers = concurrent callers for throughput")
    parser.add_argument("--runs", type=int, default=100, help="calls per (pool|in-process, snippet) measurement")
    parser.add_argument("--fresh-runs", type=int, default=8, help="calls per fresh-process measurement")
    parser.add_argument("--nemo-skills", metavar="SERVER_PY", help="NeMo-Skills' local_sandbox_server.py: adds its rows")
    parser.add_argument("--nemo-skills-python", default=sys.executable,
                        help="interpreter for it (flask, ipython, psutil, sympy)")
    parser.add_argument("--nemo-skills-new-runs", type=int, default=8, help="calls per new-session measurement")
    parser.add_argument("--trajectories", type=int, default=20, help="trajectories per pool|NeMo-Skills measurement")
    parser.add_argument("--fresh-trajectories", type=int, default=2, help="trajectories per fresh-process measurement")
    args = parser.parse_args()

    rows: dict[tuple[str, str], dict] = {}
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    pages = page_costs()
    print(f"a 4 KiB page here: first touch {pages['first_touch_us']:.2f} us, copy-on-write copy "
          f"{pages['copy_on_write_us']:.2f} us", flush=True)
    t0 = time.perf_counter()
    with SandboxPool(args.workers) as pool:
        print(f"pool of {args.workers} workers started in {time.perf_counter() - t0:.1f} s "
              f"({'DEGRADED' if pool.degraded else 'bwrap + seccomp + rlimits'})", flush=True)
        for name, code in SNIPPETS.items():
            rows["pool", name] = measure(pool_call(pool, code), args.runs, args.workers)
        rows["pool", "5-block"] = trajectory_measure(pool_block(pool), args.trajectories, args.workers)
    with SandboxPool(args.workers, warm_trajectories=0) as pool:
        rows["pool, replay", "5-block"] = trajectory_measure(pool_block(pool), args.trajectories, args.workers)
    rows["fresh python -c", "5-block"] = trajectory_measure(fresh_process_block, args.fresh_trajectories,
                                                            args.workers)
    rows["in-process exec", "5-block"] = trajectory_measure(in_process_block(), args.trajectories, 1)
    for name, code in SNIPPETS.items():
        rows["fresh python -c", name] = measure(fresh_process_call(code), args.fresh_runs, args.workers)
        # exec holds the GIL: more threads would not add throughput, so the floor is single-threaded.
        rows["in-process exec", name] = measure(in_process_call(code), args.runs, 1)
    if args.nemo_skills:
        with nemo_skills_server(args.nemo_skills, args.nemo_skills_python) as url:
            for name, code in SNIPPETS.items():
                rows["NeMo-Skills warm", name] = measure(nemo_skills_call(url, code, warm=True), args.runs,
                                                         args.workers)
                rows["NeMo-Skills new", name] = measure(nemo_skills_call(url, code, warm=False),
                                                        args.nemo_skills_new_runs, args.workers)
            rows["NeMo-Skills", "5-block"] = trajectory_measure(nemo_skills_block(url), args.trajectories,
                                                                 args.workers)

    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"\n{'method':<18}{'snippet':<9}{'p50 ms':>9}{'p99 ms':>9}{'runs/s':>9}")
    for (method, name), row in rows.items():
        print(f"{method:<18}{name:<9}{row['p50']:>9.2f}{row['p99']:>9.2f}{row['per_s']:>9.1f}")
    print()
    for name in SNIPPETS:
        pool_row, fresh, floor = rows["pool", name], rows["fresh python -c", name], rows["in-process exec", name]
        print(f"{name}: pool throughput = {pool_row['per_s'] / fresh['per_s']:.1f}x fresh process; "
              f"pool p50 = {fresh['p50'] / pool_row['p50']:.1f}x faster than fresh, "
              f"+{pool_row['p50'] - floor['p50']:.2f} ms over in-process exec")
        if ("NeMo-Skills warm", name) in rows:
            warm = rows["NeMo-Skills warm", name]
            print(f"{name}: pool / NeMo-Skills warm session: throughput {pool_row['per_s'] / warm['per_s']:.2f}x, "
                  f"p50 {pool_row['p50']:.2f} vs {warm['p50']:.2f} ms; / new session: throughput "
                  f"{pool_row['per_s'] / rows['NeMo-Skills new', name]['per_s']:.1f}x")
    blocks = {method: row["per_s"] for (method, name), row in rows.items() if name == "5-block"}
    print(f"5-block trajectories (blocks/s): pool = {blocks['pool'] / blocks['fresh python -c']:.1f}x fresh "
          f"process (re-running the trajectory), {blocks['pool'] / blocks['pool, replay']:.2f}x the pool replaying"
          + (f", {blocks['pool'] / blocks['NeMo-Skills']:.2f}x a NeMo-Skills session" if "NeMo-Skills" in blocks
             else "") + f"; in-process exec on one core (the floor, no isolation): {blocks['in-process exec']:.1f}")
    sympy_ratio = rows["pool", "sympy"]["per_s"] / rows["fresh python -c", "sympy"]["per_s"]
    cores = min(args.workers, os.cpu_count() or 1)
    print(f"sympy with no isolation at all (in-process exec, one process per core on {cores}): "
          f"{cores * rows['in-process exec', 'sympy']['per_s'] / rows['fresh python -c', 'sympy']['per_s']:.1f}x "
          f"fresh, the ceiling for any sandbox; a pool child adds its fork and exit and a copy of each fork-server "
          f"page the snippet writes to ({pages['copy_on_write_us']:.2f} us a page here)")
    trivial_p50 = rows["pool", "trivial"]["p50"]
    print(f"targets: sympy throughput >= {SYMPY_TARGET:g}x fresh: {sympy_ratio:.1f}x "
          f"[{'met' if sympy_ratio >= SYMPY_TARGET else 'MISSED'}]; trivial p50 <= {TRIVIAL_P50_TARGET_MS:g} ms: "
          f"{trivial_p50:.2f} ms [{'met' if trivial_p50 <= TRIVIAL_P50_TARGET_MS else 'MISSED'}]")


if __name__ == "__main__":
    main()
