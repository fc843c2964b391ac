"""SandboxPool: a fixed set of sandbox workers, each a fork server inside its own bubblewrap sandbox.

    with SandboxPool(workers=4) as pool:
        result = pool.run("import sympy as sp\\nx = sp.Symbol('x')\\nsp.solve(x**2 - 4, x)", timeout=10)
        result.status, result.stdout        # ('ok', '[-2, 2]\\n')

Host side only: builds the bwrap command, speaks the frame protocol of server.py, supervises workers
(restart on crash or hang, retry once when the snippet cannot have caused the failure, recycle after N runs).
The isolation itself is in server.py; docs/sandbox.md gives the threat model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import shutil
import site
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mathtir.sandbox.server import FRAME_HEADER, NOBODY, encode_frame, history_digest

log = logging.getLogger(__name__)

SERVER_SCRIPT = Path(__file__).with_name("server.py")
SERVER_PATH_IN_SANDBOX = "/opt/mathtir-sandbox/server.py"
STATUSES = ("ok", "error", "timeout", "killed", "output_limit", "internal_error")
DEFAULT_PRELOAD = ("math", "cmath", "fractions", "decimal", "itertools", "functools", "collections",
                   "random", "statistics", "re", "numpy", "mpmath", "sympy")
# The environment inside the sandbox: nothing from the host. Fixed hash seed so printed sets come out
# in the same order on every worker; one BLAS thread per snippet.
SANDBOX_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}


@dataclass(frozen=True)
class ExecResult:
    """The structured outcome of one snippet; mathtir.formats.format_output renders it for the model."""

    status: str  # ok | error | timeout | killed | output_limit | internal_error
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # last exception line, or what stopped the run
    exit_code: int | None = None
    signal: int | None = None
    wall_ms: float = 0.0  # fork to exit inside the worker (replay included)
    truncated: bool = False  # some output was dropped (head and tail kept)
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    replay_ms: float | None = None  # time spent replaying history, when there was any
    warm: bool = False  # ran in its trajectory's kept interpreter (no replay)
    kept: bool = False  # its interpreter is kept for the trajectory's next block, by this worker
    worker: int | None = None  # index of the worker that ran it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def internal_error(cls, message: str, worker: int | None = None) -> ExecResult:
        return cls(status="internal_error", error=message, worker=worker)


class SandboxUnavailable(RuntimeError):
    """bwrap or unprivileged user namespaces are missing and degraded mode was not allowed."""


class WorkerFailed(RuntimeError):
    """A worker crashed, hung, or could not start."""


@dataclass(frozen=True)
class SandboxConfig:
    memory_mb: int = 1024  # address space a snippet may add on top of the fork server's
    tmp_size_mb: int = 64  # size of the sandbox's /tmp and /dev/shm
    tmp_inodes: int = 16384  # files, directories and links in each of them (~1 KiB of kernel memory each)
    file_size_mb: int = 16  # largest file a snippet may write
    max_open_files: int = 64
    # RLIMIT_NPROC of a child: threads (each pins ~30 KiB of kernel memory, beyond the address-space limit
    # when made by a raw clone without a stack) and processes of the child's user. That user is shared:
    # as root, every sandbox child on the host runs as nobody and they count together.
    max_user_threads: int = 4096
    keep_output_bytes: int = 16384  # per stream: the first and last half are kept
    max_output_bytes: int = 1 << 20  # both streams together; beyond this the snippet is stopped
    replay_margin: float = 5.0  # seconds of history replay that do not count against the timeout
    # Warm trajectories: a child whose block left nothing behind but its own memory is kept, stopped, for the
    # trajectory's next block (no replay). At most this many per worker (0: always replay), each for up to
    # warm_blocks blocks and with at most warm_memory_mb more resident memory than the zygote.
    warm_trajectories: int = 8
    warm_blocks: int = 16
    warm_memory_mb: int = 128
    recycle_after: int = 1000  # runs before a worker is restarted
    supervision_grace: float = 5.0  # seconds past a request's limits before the worker counts as hung
    start_timeout: float = 120.0
    seed: int = 0
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    bwrap: str | None = field(default_factory=lambda: shutil.which("bwrap"))
    allow_degraded: bool = False


def _python_binds() -> list[str]:
    """Directories the interpreter needs, and only those: its prefix and the site-packages in use."""
    prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    dirs = sorted(prefixes | {os.path.realpath(p) for p in _site_dirs()})
    keep: list[str] = []
    for d in dirs:  # sorted: a parent comes before its children, which it already covers
        if d.startswith("/usr/") or d == "/usr" or any(d.startswith(k + "/") for k in keep):
            continue
        keep.append(d)
    return keep


# bwrap mounts fresh filesystems at these after the binds, hiding whatever was bound below them: a Python
# directory under one (a virtualenv in a checkout under /tmp, as CI clones can be) is bound elsewhere.
_SCRATCH_MOUNTS = ("/tmp", "/dev", "/proc")


def _python_mounts() -> dict[str, str]:
    """Each directory of _python_binds() -> where the sandbox sees it (the same path unless it is hidden)."""
    return {d: f"/run/mathtir/python{i}" if any(d == m or d.startswith(m + "/") for m in _SCRATCH_MOUNTS) else d
            for i, d in enumerate(_python_binds())}


def _in_sandbox(path: str, mounts: dict[str, str]) -> str:
    real = os.path.realpath(path)
    for host, inside in mounts.items():
        if real == host or real.startswith(host + "/"):
            return inside + real[len(host):]
    return real


def _site_dirs() -> list[str]:
    """The interpreter's site-packages, and the user's (pip install --user) when this interpreter uses it;
    never other sys.path entries (a checkout, PYTHONPATH), which may hold anything."""
    dirs = list(site.getsitepackages())
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user_site and user_site in sys.path:
        dirs.append(user_site)
    return [p for p in dirs if os.path.isdir(p)]


def _bwrap_namespace_args() -> list[str]:
    if os.geteuid() == 0:
        # bwrap run by root keeps root's capabilities inside, and uid 0 could write host sysctls through
        # /proc/sys. So: no user namespace, only the capabilities needed to switch to nobody, which the
        # fork server does right after setup.
        return ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return ["--unshare-all"]  # unprivileged: a user namespace, capabilities dropped by bwrap


# The fork server mounts its scratch tmpfs itself (bwrap's --tmpfs takes no inode cap), empties its bounding
# set (CAP_SETPCAP) and drops both before it runs any code from site-packages. Unprivileged, they are
# capabilities of the sandbox's own user namespace only.
_SERVER_SETUP_CAPABILITIES = ["--cap-add", "CAP_SYS_ADMIN", "--cap-add", "CAP_SETPCAP"]


def bwrap_command(bwrap: str, cfg: SandboxConfig, server_args: list[str]) -> list[str]:
    # No --as-pid-1: bwrap's own init holds the namespace, and it dies with bwrap (--die-with-parent) even
    # after the fork server changed credentials (which clears the server's own parent-death signal).
    args = [bwrap, *_bwrap_namespace_args(), *_SERVER_SETUP_CAPABILITIES, "--die-with-parent", "--new-session",
            "--clearenv", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():  # merged-/usr systems
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    mounts = _python_mounts()
    binds = [*mounts.items(), (str(SERVER_SCRIPT), SERVER_PATH_IN_SANDBOX)]
    # Privileged bwrap creates missing parents of a mount point with mode 0700, which nobody could not
    # traverse: create them world-traversable first.
    parents = sorted({str(p) for _, dest in binds for p in Path(dest).parents if str(p) != "/"},
                     key=lambda p: p.count("/"))
    for parent in parents:
        args += ["--perms", "0755", "--dir", parent]
    for src, dest in binds:
        args += ["--ro-bind", src, dest]
    args += ["--proc", "/proc", "--dev", "/dev"]
    # Mount points for the server's own capped tmpfs (_scratch_mounts), themselves capped as a fallback.
    tmp_bytes = str(cfg.tmp_size_mb * 2**20)
    args += ["--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/tmp",
             "--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/dev/shm",
             "--remount-ro", "/dev", "--remount-ro", "/"]
    for key, value in SANDBOX_ENV.items():
        args += ["--setenv", key, value]
    args += ["--chdir", "/tmp"]
    return args + [_in_sandbox(sys.executable, mounts), "-S", "-B", SERVER_PATH_IN_SANDBOX, *server_args]


def _scratch_mounts(cfg: SandboxConfig) -> list[dict]:
    return [{"path": path, "size": cfg.tmp_size_mb * 2**20, "inodes": cfg.tmp_inodes} for path in ("/tmp", "/dev/shm")]


def probe_bwrap(bwrap: str | None) -> str | None:
    """None if bwrap can create this sandbox's namespaces here, else why not."""
    if not bwrap or not os.access(bwrap, os.X_OK):
        return "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    cmd = [bwrap, *_bwrap_namespace_args(), "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
           "/bin/true"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"running bwrap failed: {exc}"
    if proc.returncode != 0:
        return (f"bwrap cannot create namespaces here ({proc.stderr.strip()}); unprivileged user "
                "namespaces may be disabled (sysctl kernel.unprivileged_userns_clone / "
                "user.max_user_namespaces, or AppArmor's restriction on Ubuntu 24.04)")
    return None


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _popen(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Popen from one thread that lives as long as the process.

    bwrap --die-with-parent (and the degraded server) use PR_SET_PDEATHSIG, which fires when the spawning
    THREAD exits: a worker started from a short-lived thread (a restart, a caller's thread) would die
    with it.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")
    return _spawner.submit(subprocess.Popen, cmd, **kwargs).result()


class TrajectoryHolders:
    """Where each trajectory's kept interpreter lives (a worker, an actor): keyed by the history_digest of the
    blocks it ran, the least recently recorded forgotten beyond `limit`. A forgotten or stale entry only costs a
    replay. Not locked: callers that share one lock it."""

    def __init__(self, limit: int):
        self.limit = limit
        self._places: OrderedDict[str, object] = OrderedDict()

    def take(self, history: Sequence[str]):
        """The place holding the state `history` built (forgotten here: its next block moves it on), or None."""
        return self._places.pop(history_digest(history), None) if history else None

    def record(self, history: Sequence[str], code: str, place) -> None:
        """`place` kept the interpreter that ran `history` and then `code`."""
        self._places[history_digest([*history, code])] = place
        while len(self._places) > self.limit:
            self._places.popitem(last=False)


def _checked_request(code: str, timeout: float, history: Sequence[str]) -> list[str]:
    """The history as a list, once the arguments are known to be well-formed."""
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    history = list(history)
    if not all(isinstance(block, str) for block in history):
        raise TypeError("history must be a sequence of str (the trajectory's earlier code blocks)")
    return history


class Worker:
    """One sandbox: a bwrap'd fork server, used by one thread at a time. Restarts itself when dead."""

    def __init__(self, index: int, cfg: SandboxConfig, degraded: bool):
        self.index = index
        self.cfg = cfg
        self.degraded = degraded
        self.proc: subprocess.Popen | None = None
        self.server_pid: int | None = None  # pid inside the sandbox
        self.runs = 0  # since the last (re)start
        self.starts = 0
        self.holding = 0  # trajectories' interpreters it keeps, as of its last answer
        self._buffer = bytearray()
        self._stderr_tail = bytearray()
        self._scratch: str | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Host pid of the worker's outermost process (bwrap, or the server itself when degraded)."""
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.stop()
        cfg = self.cfg
        # Root switches to nobody inside bwrap. Degraded mode keeps the user: the interpreter may live
        # where nobody cannot read it (pyenv under /root), and children drop all capabilities anyway.
        drop_to = NOBODY if os.geteuid() == 0 and not self.degraded else None
        server_cfg = {
            "site_dirs": _site_dirs(),
            "preload": list(cfg.preload),
            "memory_mb": cfg.memory_mb,
            "file_size_mb": cfg.file_size_mb,
            "max_open_files": cfg.max_open_files,
            "max_user_threads": cfg.max_user_threads,
            "keep_output_bytes": cfg.keep_output_bytes,
            "max_output_bytes": cfg.max_output_bytes,
            "seed": cfg.seed,
            "drop_to_uid": drop_to,
            "warm_trajectories": cfg.warm_trajectories,
            "warm_blocks": cfg.warm_blocks,
            "warm_memory_mb": cfg.warm_memory_mb,
        }
        if self.degraded:
            self._scratch = tempfile.mkdtemp(prefix=f"mathtir-sandbox-{self.index}-")
            server_cfg.update(workdir=self._scratch, scratch_dirs=[self._scratch], scratch_mounts=[],
                              host_pid=os.getpid(), own_pid_namespace=False)
            cmd = [os.path.realpath(sys.executable), "-S", "-B", str(SERVER_SCRIPT), json.dumps(server_cfg)]
            env = dict(SANDBOX_ENV, HOME=self._scratch, TMPDIR=self._scratch)
            self.proc = _popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, cwd=self._scratch, start_new_session=True)
        else:
            mounts = _python_mounts()
            server_cfg.update(workdir="/tmp", scratch_dirs=["/tmp", "/dev/shm"], scratch_mounts=_scratch_mounts(cfg),
                              host_pid=None, own_pid_namespace=True,
                              site_dirs=[_in_sandbox(d, mounts) for d in server_cfg["site_dirs"]])
            cmd = bwrap_command(cfg.bwrap, cfg, [json.dumps(server_cfg)])
            self.proc = _popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
        self.starts += 1
        self.runs = 0
        self._buffer.clear()
        self._stderr_tail = bytearray()
        threading.Thread(target=self._drain_stderr, args=(self.proc,), daemon=True,
                         name=f"sandbox-{self.index}-stderr").start()
        try:
            ready = self._read_frame(time.monotonic() + cfg.start_timeout)
        except WorkerFailed as exc:
            self.stop()
            raise WorkerFailed(f"sandbox worker {self.index} failed to start: {exc}; "
                               f"its stderr: {self.stderr_tail()!r}") from None
        self.server_pid = ready["pid"]
        self.holding = 0

    def _drain_stderr(self, proc: subprocess.Popen) -> None:
        # The server's own diagnostics (never snippet output): keep the tail for error messages.
        with proc.stderr:
            for line in proc.stderr:
                self._stderr_tail += line
                del self._stderr_tail[:-4096]

    def stderr_tail(self) -> str:
        return bytes(self._stderr_tail).decode("utf-8", "replace").strip()

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()  # bwrap --die-with-parent takes the whole sandbox down with it
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                stream.close()
            self.proc = None
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _read_frame(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        need = FRAME_HEADER.size
        while True:
            if len(self._buffer) >= FRAME_HEADER.size:
                need = FRAME_HEADER.size + FRAME_HEADER.unpack_from(self._buffer)[0]
                if len(self._buffer) >= need:
                    payload = bytes(self._buffer[FRAME_HEADER.size:need])
                    del self._buffer[:need]
                    return json.loads(payload)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerFailed("no answer in time (hung)")
            if not poller.poll(remaining * 1000):
                continue
            chunk = os.read(fd, max(need - len(self._buffer), 65536))
            if not chunk:
                try:  # the exit code tells who ended it (see attempt): worth a moment's wait
                    code = self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    code = None
                raise WorkerFailed(f"exited (code {code})")
            self._buffer += chunk

    def run(self, code: str, *, timeout: float, history: Sequence[str] = ()) -> ExecResult:
        """One attempt. A dead or hung worker is restarted and the result is internal_error."""
        return self.attempt(code, timeout=timeout, history=history)[0]

    def attempt(self, code: str, *, timeout: float, history: Sequence[str] = ()) -> tuple[ExecResult, bool]:
        """One run, and whether running the snippet again elsewhere is safe: True only when the failure
        cannot be the snippet's doing, so that a retry can neither run it twice nor let it take down a
        second worker.

        Safe: the snippet never reached a child (the worker could not start or take the request, or the
        child's setup failed before it got the request), or bwrap itself was killed by a signal, which only
        the host can send (bwrap's outer process is outside the sandbox's pid namespace). Not safe: the
        fork server died or hung while the snippet ran, whatever the cause.
        """
        history = _checked_request(code, timeout, history)
        cfg = self.cfg
        sent = False
        try:
            if not self.alive:
                self.start()
            request = {"code": code, "history": history, "timeout": timeout,
                       "replay_margin": cfg.replay_margin}
            self.proc.stdin.write(encode_frame(request))
            self.proc.stdin.flush()
            sent = True
            margin = cfg.replay_margin if history else 0.0
            answer = self._read_frame(time.monotonic() + timeout + margin + cfg.supervision_grace)
        except (WorkerFailed, OSError) as exc:
            message = f"sandbox worker {self.index} failed: {exc}"
            tail = self.stderr_tail()
            log.warning("%s; restarting it%s", message, f" (stderr: {tail[-500:]})" if tail else "")
            killed_by_host = not self.degraded and self.proc is not None and (self.proc.returncode or 0) < 0
            self.stop()
            return ExecResult.internal_error(message, worker=self.index), not sent or killed_by_host
        self.runs += 1
        self.holding = answer.pop("holding", 0)
        snippet_started = answer.pop("snippet_started")
        return ExecResult(**answer, worker=self.index), not snippet_started


class SandboxPool:
    """A fixed number of sandbox workers; `run` is safe from many threads, `arun` from asyncio.

    A request that hits a crashed or hung worker returns internal_error; it is retried once on another
    worker only when the snippet cannot have caused the failure (Worker.attempt), so that a snippet that
    breaks a worker never gets a second one. The failed worker restarts in the background. Workers restart
    after `recycle_after` runs.
    """

    def __init__(self, workers: int, *, memory_mb: int = 1024, allow_degraded: bool = False, **options):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        unknown = set(options) - set(SandboxConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown SandboxPool options: {sorted(unknown)}")
        self.config = SandboxConfig(memory_mb=memory_mb, allow_degraded=allow_degraded, **options)
        problem = probe_bwrap(self.config.bwrap)
        self.degraded = problem is not None
        if problem and not allow_degraded:
            raise SandboxUnavailable(
                f"mathtir sandbox cannot isolate code: {problem}. Fix that, or pass allow_degraded=True "
                "to run snippets with only rlimits + seccomp (no filesystem or network namespaces).")
        if problem:
            message = (f"MATHTIR SANDBOX DEGRADED: {problem}. Snippets run with rlimits + seccomp only: "
                       "they can READ ANY FILE this user can read and write to shared /tmp"
                       + (", as root (without capabilities)." if os.geteuid() == 0 else "."))
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.error(message)
        self.workers = [Worker(i, self.config, self.degraded) for i in range(workers)]
        self._idle: list[Worker] = []  # in the order they became idle
        self._idle_changed = threading.Condition()
        self._awaited: Counter[Worker] = Counter()  # callers waiting for a worker that holds their trajectory
        # (worker, its start count) for each trajectory whose interpreter a worker keeps
        self._holders = TrajectoryHolders(len(self.workers) * max(self.config.warm_trajectories, 1))
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox-run")
        self._restarts: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.internal_errors = 0
        self.closed = False
        try:
            list(self._executor.map(lambda w: w.start(), self.workers))
        except BaseException:
            self.close()
            raise
        for worker in self.workers:
            self._release(worker)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True
        self._executor.shutdown(wait=True)
        with self._lock:
            restarts = list(self._restarts)
        for thread in restarts:
            thread.join()
        for worker in self.workers:
            worker.stop()

    def run(self, code: str, *, timeout: float, history: Sequence[str] = ()) -> ExecResult:
        if self.closed:
            raise RuntimeError("SandboxPool is closed")
        history = _checked_request(code, timeout, history)
        result, safe_to_retry = self._run_once(code, timeout, history)
        if result.status == "internal_error" and safe_to_retry:
            result, _ = self._run_once(code, timeout, history)
        return result

    async def arun(self, code: str, *, timeout: float, history: Sequence[str] = ()) -> ExecResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self.run(code, timeout=timeout,
                                                                           history=history))

    def _take(self, holder: Worker | None) -> Worker:
        """An idle worker: the one holding the trajectory's interpreter if there is one (waiting for it: a
        block there costs less than replaying the history elsewhere), else the longest idle one that no such
        caller waits for."""
        with self._idle_changed:
            if holder is not None:
                self._awaited[holder] += 1
                while holder not in self._idle:
                    self._idle_changed.wait()
                self._awaited[holder] -= 1
                worker = holder
            else:
                while not (free := [w for w in self._idle if not self._awaited[w]]):
                    self._idle_changed.wait()
                worker = free[0]
            self._idle.remove(worker)
            return worker

    def _release(self, worker: Worker) -> None:
        with self._idle_changed:
            self._idle.append(worker)
            self._idle_changed.notify_all()

    def _holder(self, history: Sequence[str]) -> Worker | None:
        with self._lock:
            worker, starts = self._holders.take(history) or (None, None)
        return worker if worker is not None and worker.starts == starts else None  # a restart lost it

    def _run_once(self, code: str, timeout: float, history: Sequence[str]) -> tuple[ExecResult, bool]:
        worker = self._take(self._holder(history))
        try:
            result, safe_to_retry = worker.attempt(code, timeout=timeout, history=history)
        except BaseException:
            self._release(worker)
            raise
        if result.kept:
            with self._lock:
                self._holders.record(history, code, (worker, worker.starts))
        if result.status == "internal_error":
            with self._lock:
                self.internal_errors += 1
        if not worker.alive or worker.runs >= self.config.recycle_after:
            self._restart_in_background(worker)
        else:
            self._release(worker)
        return result, safe_to_retry

    def _restart_in_background(self, worker: Worker) -> None:
        def restart():
            try:
                worker.start()
            except WorkerFailed as exc:  # stays dead: its next run retries the start
                log.error("%s", exc)
            self._release(worker)

        thread = threading.Thread(target=restart, name=f"sandbox-{worker.index}-restart", daemon=True)
        with self._lock:
            self._restarts = [t for t in self._restarts if t.is_alive()] + [thread]
        thread.start()
