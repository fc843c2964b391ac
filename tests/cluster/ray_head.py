"""A real Ray head on 127.0.0.1 for tests: `ray start --head --block`, private ports and temp dir, stopped by pid.

What it takes on a shared CI machine (docs/cluster-testing.md):
- every process of the run gets the environment of every Ray this project starts
  (``mathtir.eval.embedded_ray.ray_env``), here with auth disabled: one explicit ``RAY_AUTH_MODE``;
- the dashboard / Jobs API binds to loopback only;
- ``--block`` keeps the head a child of this process, so it is stopped by pid (``ray stop`` would kill every
  Ray process on the machine, other engineers' included);
- own ports and a short ``--temp-dir`` so several heads can coexist; a small ``--object-store-memory``;
- the job's ``python`` is the first one on the head's PATH, so the venv's ``bin`` goes first.

    with RayHead(num_cpus=2, resources={"sandbox": 2}) as head:
        subprocess.run(head.cli("job", "submit", "--working-dir", ".", "--", "python", "x.py"), env=head.env)

(tests/test_eval_job.py wraps it in a module-scoped ``ray_head`` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from mathtir.eval.embedded_ray import ray_env

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
AUTH_MODE = "disabled"


class RayHeadError(RuntimeError):
    pass


def _free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RayHead:
    def __init__(self, *, num_cpus: int = 2, resources: dict[str, float] | None = None,
                 object_store_mb: int = 100, start_timeout: float = 90.0):
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.object_store_mb = object_store_mb
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.temp_dir: Path | None = None
        self.gcs_port = self.dashboard_port = 0

    # -- what clients need -------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """GCS address for ray.init / RAY_ADDRESS of a driver started on this machine."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Jobs API address for `ray job ... --address`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for every process that talks to this head (CLI, drivers)."""
        env = {**os.environ, **ray_env(AUTH_MODE)}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env.pop("RAY_ADDRESS", None)
        return env

    def cli(self, *args: str) -> list[str]:
        """A `ray ...` command line for this head: `ray job <sub>` gets the Jobs API address."""
        cmd = [str(VENV_BIN / "ray"), *args]
        if args and args[0] == "job":
            cmd[3:3] = ["--address", self.dashboard_url]
        return cmd

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> RayHead:
        # A short path: Ray puts unix sockets under it (107-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
        (self.gcs_port, self.dashboard_port, client_port, node_manager_port, object_manager_port,
         metrics_port, agent_listen_port, agent_grpc_port, runtime_env_port) = _free_ports(9)
        # Worker ports: below the kernel's ephemeral range (32768+), where the ports above came from, and above
        # the ports the Slurm scripts fix per job (20000-28999) and the Slurm jobs' own Ray workers (10002-19999),
        # one window per pytest-xdist worker, so that heads and jobs running side by side never share a port.
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        worker_lo = 29000 + 1000 * ((int(worker[2:]) if worker[2:].isdigit() else 0) % 3)
        cmd = [
            str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={client_port}", f"--node-manager-port={node_manager_port}",
            f"--object-manager-port={object_manager_port}", f"--metrics-export-port={metrics_port}",
            f"--dashboard-agent-listen-port={agent_listen_port}",
            f"--dashboard-agent-grpc-port={agent_grpc_port}", f"--runtime-env-agent-port={runtime_env_port}",
            f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 999}",
            f"--num-cpus={self.num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(self.resources)}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--temp-dir={self.temp_dir}",
        ]
        self._log = open(self.temp_dir / "head.log", "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RayHeadError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._jobs_api_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RayHeadError(f"Ray head not ready after {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def _jobs_api_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/jobs/", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.temp_dir / "head.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the `ray start --block` process (it tears its daemons down), then kill leftovers by pid."""
        if self.proc is None:
            return
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(descendants, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.proc = None
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def descendants(self) -> list[psutil.Process]:
        """Processes of this head (daemons, workers, job drivers): the only ones a test may kill."""
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
