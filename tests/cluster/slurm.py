"""A real Slurm cluster on localhost for tests: munged + slurmctld + slurmd(s), all private to one directory.

Nothing system-wide is touched: the munge key, socket, slurm.conf, spool and state directories, logs and ports
all live in a fresh directory, so several clusters (and the host's own Slurm, if any) can coexist. Clients
find the cluster through ``SLURM_CONF`` (``cluster.env``), which ``sbatch`` exports into the job, so ``srun``
inside a batch script talks to the same cluster.

    with LocalSlurmCluster() as cluster:
        job = cluster.submit(["slurm/stage1_cot.sh", "trainer.max_steps=4"], sbatch_args=["--cpus-per-task=2"])
        info = cluster.wait(job, timeout=300)
        assert info.state == "COMPLETED", cluster.job_output(job)

or use the ``slurm_cluster`` pytest fixture (module scope) defined at the bottom.

With ``preempt_grace_s=N`` the cluster preempts as production clusters do: a second partition
(``URGENT_PARTITION``) over the same nodes with a higher PriorityTier, ``PreemptType=preempt/partition_prio``,
``PreemptMode=REQUEUE``, and GraceTime=N on the default partition. A job submitted to the urgent partition that
needs a busy node's CPUs makes slurmctld send the running job's tasks SIGCONT + SIGTERM, SIGKILL them N seconds
later, and requeue the job.

Settings that work in a container-like VM without systemd or cgroups (docs/cluster-testing.md): linuxproc proctrack, no task plugin, cons_tres with
CR_CPU, short credential expiry and 1 s scheduler intervals so requeued jobs restart fast, and
kill_invalid_depend so a job whose afterok dependency failed is cancelled instead of pending forever.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
     "PREEMPTED"}
)
URGENT_PARTITION = "urgent"
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun")


class SlurmClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str  # COMPLETED, FAILED, PENDING, RUNNING, ...
    reason: str
    exit_code: str  # "rc:signal" as scontrol prints it
    restarts: int  # how many times the job was requeued
    fields: dict[str, str]

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurmCluster:
    """One slurmctld and ``nodes`` slurmd daemons on this machine, stopped by pid on exit. The nodes' NodeAddr is
    ``node_addr``: loopback by default, or one of this machine's own interfaces to stand for a cluster's internal
    network (what a job binds its services to)."""

    def __init__(self, root: str | os.PathLike | None = None, *, nodes: int = 1, cpus_per_node: int | None = None,
                 memory_mb: int | None = None, partition: str = "debug", preempt_grace_s: int | None = None,
                 node_addr: str = "127.0.0.1"):
        # Unix socket paths are limited to ~107 bytes: keep the root short.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.nodes = [f"node{i}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node or os.cpu_count() or 1
        self.memory_mb = memory_mb or self._default_memory_mb(nodes)
        self.partition = partition
        self.preempt_grace_s = preempt_grace_s
        self.node_addr = node_addr
        # The scripts derive ports from the job id (slurm/common.sh MASTER_PORT, slurm/ray_cluster.sh), as ids are
        # unique within a real cluster (ports from the id modulo 1000). Clusters of two pytest-xdist workers run
        # side by side on one machine: their job ids start 500 apart, so their jobs never pick the same ports.
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        self.first_job_id = 1 + 500 * (int(worker[2:]) if worker[2:].isdigit() else 0)
        self.conf_path = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}
        self._owns_root = root is None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalSlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (sbatch/squeue/scontrol) and for what the jobs inherit."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf_path)
        # A job submitted from inside another allocation must not inherit that allocation's variables.
        for key in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SRUN_"))]:
            del env[key]
        return env

    def start(self, timeout: float = 30.0) -> None:
        missing = missing_binaries()
        if missing:
            raise SlurmClusterError(f"Slurm/munge binaries not found: {', '.join(missing)} "
                                    "(apt-get install slurm-wlm munge)")
        try:
            self._write_munge_key()
            self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={self.root / 'munge' / 'munge.key'}",
                                   f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                                   f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                                   f"--log-file={self.root / 'log' / 'munged.log'}"])
            self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged socket")
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf_path)])
            self._wait_for(self._controller_up, timeout, "slurmctld")
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf_path)])
            self._wait_for(self._nodes_idle, timeout, "slurmd nodes to become idle")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, then stop the daemons in reverse start order (by pid, never by name)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env,
                           capture_output=True, timeout=30, check=False)
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ jobs
    def submit(self, command: list[str] | str, *, sbatch_args: list[str] = (), cwd: str | os.PathLike | None = None,
               env: dict[str, str] | None = None, partition: str | None = None) -> str:
        """``sbatch --parsable [sbatch_args] command...``; a str is a script path, a list is script + its args."""
        argv = [command] if isinstance(command, str) else list(command)
        out = self._client(["sbatch", "--parsable", f"--partition={partition or self.partition}", *sbatch_args,
                            *argv], cwd=cwd, env=env)
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmClusterError(f"sbatch printed no job id: {out!r}")
        return job_id

    def job(self, job_id: str) -> JobInfo:
        out = self._client(["scontrol", "show", "job", "--oneliner", str(job_id)])
        fields = dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", out))
        return JobInfo(job_id=str(job_id), state=fields.get("JobState", "UNKNOWN"), reason=fields.get("Reason", ""),
                       exit_code=fields.get("ExitCode", ""), restarts=int(fields.get("Restarts", "0") or 0),
                       fields=fields)

    def wait(self, job_id: str, timeout: float, *, until: frozenset[str] | set[str] = TERMINAL_STATES,
             poll: float = 0.5) -> JobInfo:
        """Poll until the job reaches one of ``until`` (default: any terminal state); raise on timeout.

        Polls itself rather than using ``sbatch --wait``, whose back-off adds tens of seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.state in until:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.state} ({info.reason}) after {timeout:.0f}s\n"
                                   f"{self.job_output(job_id)}")
            time.sleep(poll)

    def signal(self, job_id: str, sig: str = "USR1", *, batch: bool = True) -> None:
        """Send ``sig`` to the batch shell (like ``--signal=B:SIG``) or, with batch=False, to the job steps."""
        self._client(["scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id)])

    def cancel(self, job_id: str) -> None:
        self._client(["scancel", str(job_id)])

    def job_output(self, job_id: str) -> str:
        """The job's stdout file (StdOut from scontrol), or '' if it is not readable."""
        path = self.job(job_id).fields.get("StdOut", "")
        try:
            return Path(path).read_text(errors="replace") if path else ""
        except OSError:
            return ""

    def scontrol(self, *args: str) -> str:
        return self._client(["scontrol", *args])

    # ------------------------------------------------------------------ internals
    def _client(self, argv: list[str], *, cwd=None, env=None) -> str:
        full_env = self.env
        full_env.update(env or {})
        res = subprocess.run(argv, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
        if res.returncode != 0:
            raise SlurmClusterError(f"{' '.join(argv)} failed (rc={res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # the child keeps its own copy of the fd
        self._procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                             start_new_session=True)
        log.close()

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise SlurmClusterError(f"{', '.join(dead)} exited while waiting for {what}; "
                                        f"logs in {self.root / 'log'}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"timed out waiting for {what}; logs:\n{self._log_tail()}")
            time.sleep(0.1)

    def _log_tail(self, lines: int = 15) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def _controller_up(self) -> bool:
        res = subprocess.run(["scontrol", "ping"], env=self.env, capture_output=True, text=True, check=False)
        return res.returncode == 0 and "UP" in res.stdout

    def _nodes_idle(self) -> bool:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True,
                             check=False)
        states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
        return res.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    @staticmethod
    def _default_memory_mb(nodes: int) -> int:
        avail_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
        return max(256, int(avail_kb / 1024 * 0.8) // nodes)

    def _write_munge_key(self) -> None:
        munge_dir = self.root / "munge"
        for d in (munge_dir, self.root / "log", self.root / "state", self.root / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        munge_dir.chmod(0o700)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)

    def _write_conf(self) -> None:
        r = self.root
        ctld_port = _free_port()
        (r / "plugstack.conf").write_text("")  # keep the host's SPANK plugins (pyxis, ...) out of the test cluster
        lines = [
            f"ClusterName=local{ctld_port}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"FirstJobId={self.first_job_id}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / 'slurmd-%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            # Fast and hang-proof for CI: quick rescheduling (requeued jobs restart in seconds, not minutes),
            # jobs with an unsatisfiable dependency are cancelled instead of pending forever.
            "SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000",
            "DependencyParameters=kill_invalid_depend",
            "MinJobAge=600",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeHostname=localhost NodeAddr={self.node_addr} Port={_free_port()} "
                         f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb} State=UNKNOWN")
        nodes = ",".join(self.nodes)
        if self.preempt_grace_s is None:
            lines.append(f"PartitionName={self.partition} Nodes={nodes} Default=YES MaxTime=INFINITE State=UP "
                         "OverSubscribe=NO")
        else:
            lines[lines.index("MpiDefault=none"):0] = ["PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE"]
            lines.append(f"PartitionName={self.partition} Nodes={nodes} Default=YES MaxTime=INFINITE State=UP "
                         f"OverSubscribe=NO PriorityTier=1 GraceTime={self.preempt_grace_s}")
            lines.append(f"PartitionName={URGENT_PARTITION} Nodes={nodes} MaxTime=INFINITE State=UP OverSubscribe=NO "
                         "PriorityTier=10 PreemptMode=OFF")
        self.conf_path.write_text("\n".join(lines) + "\n")


try:
    import pytest
except ImportError:  # usable without pytest (e.g. from a script)
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def slurm_cluster():
        """A running two-node LocalSlurmCluster for the test module (fails, never skips, when Slurm is
        missing). Each emulated node offers all of this machine's CPUs; jobs on both share the real cores."""
        with LocalSlurmCluster(nodes=2) as cluster:
            yield cluster
