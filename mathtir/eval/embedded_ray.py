"""The Ray cluster an evaluation starts for itself when it joins none: loopback only, token-authenticated, and
gone with its driver.

- Loopback: Ray resolves a node address of 127.0.0.1 to the host's own address unless it runs as a single-machine
  Ray (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ``ray`` is first imported); then GCS, raylet, object
  manager, workers and agents all bind 127.0.0.1.
- Token: Ray's own token authentication (``RAY_AUTH_MODE=token``) with a fresh random token for every driver
  process,
  passed to the cluster's processes through the environment (never written to ``~/.ray/auth_token``). The
  agents' Prometheus exporter (``RAY_enable_metrics_collection=0``) is off: nothing scrapes an embedded run.
- Orphans: a driver killed with SIGKILL cannot shut its Ray down, and Ray's agents outlive it (about a minute).
  Every process of an embedded cluster carries a mark in its environment naming the ``--output`` it serves, or
  (the agents, which rename themselves over their command line and environment) keeps log files open in the
  cluster's directory; the next driver of that output first ends every such process, and removes the killed
  cluster's session directory.
- One driver per output: it holds a lock in the cluster's directory for its whole life, so a second driver of
  the same output is refused rather than have its cluster swept away.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import psutil

log = logging.getLogger("mathtir.eval")

# The environment variable that marks an embedded cluster's processes with the output they serve.
MARK = "MATHTIR_EMBEDDED_RAY"
LOCK_FILE = "driver.lock"
_held_locks: dict[Path, object] = {}  # this process's lock files stay open (and locked) until it exits
# One token per driver process: the C++ token loader of a process caches the first token it reads.
_token = secrets.token_hex(32)


class EmbeddedRayError(RuntimeError):
    pass


def cluster_key(output: str | Path) -> str:
    return hashlib.sha256(str(Path(output).resolve()).encode()).hexdigest()[:12]


def cluster_dir(output: str | Path) -> Path:
    """A short directory private to this user and output (mode 0700): Ray's unix sockets live under it
    (107-byte limit)."""
    path = Path(tempfile.gettempdir()) / f"mathtir-ray-{os.getuid()}-{cluster_key(output)}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise EmbeddedRayError(f"{path}: exists but is not private to this user (mode {oct(info.st_mode & 0o777)})")
    return path


def processes_of(key: str, home: Path) -> list[psutil.Process]:
    """This user's processes (not this one) of the cluster `key`: marked in their environment, or holding a file
    open under its directory `home` (Ray's agents rename themselves over their environment, but keep their
    session's log files open)."""
    inside = f"{home}{os.sep}"
    found = []
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info["uids"]
        if proc.pid == os.getpid() or uids is None or uids.real != os.getuid():
            continue
        try:
            if proc.environ().get(MARK) == key or any(f.path.startswith(inside) for f in proc.open_files()):
                found.append(proc)
        except psutil.Error:  # exited, or a zombie, while we looked
            continue
    return found


def end_processes(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL for whatever is still there after `timeout` (their children included)."""
    family = {p.pid: p for p in procs}
    for proc in procs:
        try:
            family.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            pass
    for proc in family.values():
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(family.values()), timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _take_lock(home: Path, output: str | Path) -> None:
    if home in _held_locks:  # a second run of this process into the same output
        return
    lock = open(home / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the life of the process)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise EmbeddedRayError(f"--output {output}: another driver of this output is running (its embedded Ray "
                               f"is in {home}); wait for it or stop it first") from None
    _held_locks[home] = lock


def ray_env(auth_mode: str) -> dict[str, str]:
    """What every process of a Ray this project starts carries in its environment (the embedded cluster here,
    the tests' Ray head): one explicit auth mode (left unset, it flips to token auth as soon as some
    ``ray.init()`` has written ``~/.ray/auth_token``, and a client without that token gets HTTP 401), this
    driver's token when the mode is ``token``, no usage stats, and workers at the normal priority: Ray starts
    them at niceness 15, where beside two busy processes of another job they get a few percent of a core (a
    sampler actor's 9 s start took 316 s on two loaded cores), though they do all of this job's work."""
    env = {"RAY_AUTH_MODE": auth_mode, "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0"}
    if auth_mode == "token":
        env["RAY_AUTH_TOKEN"] = _token
    return env


def start(output: str | Path, *, num_cpus: int, resources: dict, object_store_bytes: int):
    """Start the embedded cluster for `output` and connect to it; returns the ray module."""
    home = cluster_dir(output)
    key = cluster_key(output)
    _take_lock(home, output)
    orphans = processes_of(key, home)
    if orphans:
        log.warning("ending %d Ray process(es) left by a killed driver of %s: %s", len(orphans), output,
                    ", ".join(str(p.pid) for p in orphans))
        end_processes(orphans)
    for entry in home.iterdir():  # the killed cluster's sessions (sockets, logs, spilled objects)
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()

    os.environ.update({**ray_env("token"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                       "RAY_enable_metrics_collection": "0", MARK: key})
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    import ray

    # Ray makes its temp dir world-writable; inside this private directory nobody else can reach it.
    ray.init(num_cpus=num_cpus, resources=resources, include_dashboard=False, _temp_dir=str(home / "r"),
             object_store_memory=object_store_bytes)
    node_ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_ip).is_loopback:  # ray was imported before the single-machine switch
        ray.shutdown()
        raise EmbeddedRayError(f"the embedded Ray would listen on {node_ip}, not loopback: start the evaluation in "
                               "a process that has not imported ray yet")
    return ray
