"""The Ray clusters of an evaluation as an attacker on the same machine or network meets them. The embedded Ray
of `mathtir eval run`: every listening socket of a running job is on loopback, each one refuses a caller
without the job's token, and a driver killed with SIGKILL leaves no Ray process behind once the next driver
of its output has run. `slurm/eval.sh` on a node whose address is one of this machine's real interfaces:
every socket of the job is on that address or loopback except what Ray cannot narrow, and each refuses a
caller without the token; a job whose Ray ports are out of range or taken ends at once, saying why."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from cluster.slurm import LocalSlurmCluster
from test_eval_job import REPO, job_args, tir_tiny_dir, wait_for_records, write_data  # noqa: F401

from mathtir.eval.embedded_ray import ray_env

pytestmark = pytest.mark.cluster

# One real method of each gRPC service a Ray process serves (GCS, raylet's node and object managers, core
# workers, the dashboard agent). Called with an empty request and no token, each must answer UNAUTHENTICATED;
# the other services' methods answer UNIMPLEMENTED on that port.
GRPC_METHODS = (
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
    "/ray.rpc.NodeManagerService/GetNodeStats",
    "/ray.rpc.ObjectManagerService/Pull",
    "/ray.rpc.CoreWorkerService/NumPendingTasks",
    "/ray.rpc.ReporterService/GetTraceback",
    "/ray.rpc.RayletDriver/ClusterInfo",  # the Ray Client server of a head started with a client port
)
# Ray 2.60 has no switch for two Prometheus exporters of a head node: the autoscaler monitor's and the
# dashboard head's. They serve read-only metrics text on loopback here (README: security notes).
READ_ONLY_METRICS = {"autoscaler monitor": "autoscaler_", "dashboard head": "ray_dashboard_"}


@pytest.fixture
def embedded_driver():
    """run.py as its own process with no RAY_ADDRESS (so it starts its embedded Ray), in an environment that
    asks for no auth, as a user's shell might. Whatever is left at the end is killed by pid."""
    procs = []

    def start(args: list[str], log_path: Path) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(ray_env("disabled"))
        with open(log_path, "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "ray_eval/run.py", *args], cwd=REPO, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            family = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            proc.wait(timeout=30)
            _kill(family)


def _kill(procs) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


def listening_sockets(root: psutil.Process) -> list[tuple[psutil.Process, str, int]]:
    return [s for proc in [root, *root.children(recursive=True)] for s in listening_sockets_of(proc)]


def listening_sockets_of(proc: psutil.Process) -> list[tuple[psutil.Process, str, int]]:
    try:
        return [(proc, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN]
    except psutil.Error:  # exited while we looked
        return []


def plain_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address, an IPv4-mapped IPv6 one (::ffff:127.0.0.1, as dual-stack sockets show) as IPv4."""
    address = ipaddress.ip_address(ip)
    return getattr(address, "ipv4_mapped", None) or address


def is_loopback(ip: str) -> bool:
    return plain_ip(ip).is_loopback


def grpc_answer(port: int, method: str, token: str | None = None, host: str = "127.0.0.1") -> grpc.StatusCode:
    channel = grpc.insecure_channel(f"{host}:{port}")
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(b"", timeout=5, metadata=[("authorization", f"Bearer {token}")] if token else None)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()


def http_answer(port: int, host: str = "127.0.0.1", path: str = "/") -> tuple[int, bytes] | None:
    """(status, first bytes) of a plain GET without a token; None where the port does not speak HTTP/1."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read(200)
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (OSError, ValueError, urllib.error.URLError):
        return None
    except Exception:  # http.client.BadStatusLine and kin: a gRPC (HTTP/2) port
        return None


def answers_without_token(sockets, host: str = "127.0.0.1") -> tuple[list, list]:
    """Each socket called at `host` without a token: (those that served the caller, those that served one of
    the READ_ONLY_METRICS pages). An HTTP port must refuse (401/403) its root, or its Jobs API where the root is
    the dashboard's public page (index.html, as Ray's token middleware intends, like its health checks); a gRPC
    port must answer UNAUTHENTICATED to a method of its service and never OK."""
    unauthenticated, read_only = [], []
    for proc, _, port in sockets:
        http = http_answer(port, host)
        if http is not None:
            status, body = http
            if status in (401, 403):
                continue
            kind = next((k for k, prefix in READ_ONLY_METRICS.items() if body.startswith(b"# HELP " + prefix.encode())),
                        None)
            if kind and status == 200:
                read_only.append((proc.name(), port, status, kind))
            elif body.lstrip().lower().startswith(b"<!doctype html") and \
                    (jobs := http_answer(port, host, "/api/jobs/")) and jobs[0] in (401, 403):
                continue
            else:
                unauthenticated.append((proc.name(), port, status, kind))
            continue
        answers = {method: grpc_answer(port, method, host=host) for method in GRPC_METHODS}
        if grpc.StatusCode.UNAUTHENTICATED not in answers.values() or grpc.StatusCode.OK in answers.values():
            unauthenticated.append((proc.name(), port, {m.rsplit("/", 1)[1]: a.name for m, a in answers.items()}))
    return unauthenticated, read_only


def run_token(procs: list[psutil.Process]) -> str:
    """The job's token, as its Ray processes got it (an embedded driver sets it after it started)."""
    for proc in procs:
        try:
            token = proc.environ().get("RAY_AUTH_TOKEN")
        except psutil.Error:
            continue
        if token:
            return token
    raise AssertionError("no Ray process of the job has RAY_AUTH_TOKEN")


def test_embedded_job_listens_on_loopback_only_and_refuses_callers_without_the_token(
        embedded_driver, tir_tiny_dir, tmp_path):  # noqa: F811
    data, out, log = write_data(tmp_path / "problems.jsonl"), tmp_path / "out", tmp_path / "driver.log"
    args = job_args(tir_tiny_dir, data, out, "--samples", "4", "--max-tokens", "64", "--max-in-flight", "1",
                    "--sandbox-actors", "1", "--embedded-cpus", "2")
    driver = embedded_driver(args, log)
    wait_for_records(out, 1, driver)
    root = psutil.Process(driver.pid)
    # The job's actors run at the driver's priority, not at Ray's default niceness 15, where a busy neighbour on
    # the machine starves them (embedded_ray.ray_env).
    actors = [p for p in root.children(recursive=True) if p.name().startswith("ray::") and "Actor" in p.name()]
    assert {p.name().split(".")[0] for p in actors} == {"ray::SamplerActor", "ray::SandboxActor"}, actors
    assert {p.nice() for p in actors} == {root.nice()}
    sockets = listening_sockets(root)
    assert len(sockets) >= 6, sockets  # GCS, raylet (2), agents, workers: the job's cluster is running
    exposed = [(p.name(), ip, port) for p, ip, port in sockets if not is_loopback(ip)]
    assert not exposed, f"non-loopback listening sockets: {exposed}"

    token = run_token(root.children(recursive=True))
    unauthenticated, read_only = answers_without_token(sockets)
    assert not unauthenticated, f"listening sockets that serve a caller without the token: {unauthenticated}"
    assert len(read_only) <= len(READ_ONLY_METRICS), read_only
    # The refusals are the token's doing: the GCS answers the same call when it carries the token.
    gcs_ports = [port for p, _, port in sockets if p.name() == "gcs_server"]
    assert gcs_ports and grpc_answer(gcs_ports[0], GRPC_METHODS[0], token) == grpc.StatusCode.OK
    assert grpc_answer(gcs_ports[0], GRPC_METHODS[0], "0" * 64) == grpc.StatusCode.UNAUTHENTICATED
    assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]


def test_killed_driver_leaves_no_ray_process_once_the_next_driver_ran(embedded_driver, tir_tiny_dir, tmp_path):  # noqa: F811
    data, out, log = write_data(tmp_path / "problems.jsonl"), tmp_path / "out", tmp_path / "driver.log"
    args = job_args(tir_tiny_dir, data, out, "--samples", "4", "--max-tokens", "64", "--max-in-flight", "1",
                    "--sandbox-actors", "1", "--embedded-cpus", "2")
    first = embedded_driver(args, log)
    wait_for_records(out, 2, first)
    cluster = psutil.Process(first.pid).children(recursive=True)
    names = {p.name() for p in cluster}
    assert {"gcs_server", "raylet"} <= names and any("Agent" in n for n in names), names
    first.kill()
    first.wait(timeout=30)
    try:
        second = embedded_driver(args, log)
        # Checked as soon as the second driver's own Ray is up (the killed one's agents would otherwise live
        # on for about a minute), and again when it is done.
        deadline = time.monotonic() + 240
        while log.read_text().count("started an embedded Ray") < 2:
            assert second.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert not alive(cluster), f"the killed driver's Ray processes outlived the next start: {alive(cluster)}"
        assert second.wait(timeout=300) == 0, log.read_text()[-3000:]
        assert not alive(cluster), f"the killed driver's Ray processes still alive after the rerun: {alive(cluster)}"
        assert "Ray process(es) left by a killed driver" in log.read_text()
    finally:
        _kill(cluster)


def alive(procs: list[psutil.Process]) -> list[tuple[int, str]]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append((proc.pid, proc.name()))
        except psutil.Error:
            pass
    return left


def internal_address() -> str | None:
    """An IPv4 address of one of this machine's own non-loopback interfaces: the 'cluster network' of the
    Slurm-style test (a real interface, so that a wildcard bind is really reachable from outside)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                return address.address
    return None


def binds_every_interface_in_ray(proc: psutil.Process) -> bool:
    """Whether the process is one whose gRPC server slurm/ray_cluster.sh documents as beyond its reach: Ray 2.60
    binds the GCS, the raylet, the dashboard agent's gRPC port and the core workers (the actors' and the
    driver's) to every interface of a node whose address is not loopback, with no option to narrow them."""
    name = proc.name()
    if name in ("gcs_server", "raylet", "ray::DashboardAgent"):
        return True
    if name.startswith("ray::"):
        return not name.endswith("Agent")  # an actor's core worker; the runtime env agent binds the node address
    return "ray_eval/run.py" in " ".join(proc.cmdline())


# Slurm's own processes inside a job (the step daemon, and srun with its I/O and PMI ports): authenticated by
# Slurm's credentials, not the job's to bind.
SLURM_OWN = ("slurmstepd", "srun")


def job_processes(job_id: str) -> list[psutil.Process]:
    """Every process this Slurm job started, Slurm's own aside: those whose environment names the job, and
    their descendants (Ray starts its agents with an environment of their own)."""
    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") == job_id:
                found.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
        except psutil.Error:  # exited while we looked
            continue
    return [p for p in found.values() if name_of(p) not in SLURM_OWN]


def name_of(proc: psutil.Process) -> str | None:
    try:
        return proc.name()
    except psutil.Error:  # a short-lived process (a sandbox child) that has exited
        return None


def test_slurm_eval_job_binds_the_internal_interface_and_refuses_callers_without_the_token(tir_tiny_dir, tmp_path):  # noqa: F811
    internal = internal_address()
    if internal is None:
        pytest.skip("this machine has no non-loopback IPv4 interface to stand for a cluster network")
    data, out = write_data(tmp_path / "problems.jsonl"), tmp_path / "out"
    # more samples than the test waits for: the job is cancelled once its sockets have been called
    args = job_args(tir_tiny_dir, data, out, "--samples", "1000", "--max-tokens", "64", "--max-in-flight", "1")
    with LocalSlurmCluster(nodes=1, node_addr=internal) as cluster:
        env = {**cluster.env, "MATHTIR_PYTHON": sys.executable}
        job = cluster.submit(["slurm/eval.sh", *args], cwd=REPO, env=env, sbatch_args=[
            "--nodes=1", "--cpus-per-task=2", "--mem=4G", f"--output={tmp_path / 'job.out'}"])
        deadline = time.monotonic() + 300
        while not ((out / "records.jsonl").exists() and (out / "records.jsonl").read_bytes().count(b"\n")):
            assert not cluster.job(job).done and time.monotonic() < deadline, cluster.job_output(job)[-3000:]
            time.sleep(0.5)
        procs = job_processes(job)
        names = {name_of(p) for p in procs}
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
        sockets = [s for proc in procs for s in listening_sockets_of(proc)]
        assert len(sockets) >= 6, sockets

        wildcard = [(p, ip, port) for p, ip, port in sockets if plain_ip(ip).is_unspecified]
        elsewhere = [(p.name(), ip, port) for p, ip, port in sockets
                     if str(plain_ip(ip)) != internal and not is_loopback(ip) and not plain_ip(ip).is_unspecified]
        assert not elsewhere, f"sockets on neither the node's address nor loopback: {elsewhere}"
        # Every socket, wherever bound, called from the network (the node's address) without the token
        reachable = [(p, ip, port) for p, ip, port in sockets if not is_loopback(ip)]
        unauthenticated, read_only = answers_without_token(reachable, host=internal)
        assert not unauthenticated, f"sockets that serve a network caller without the token: {unauthenticated}"
        # the autoscaler monitor is not started (--no-monitor): only the dashboard head's exporter is left
        assert [kind for *_, kind in read_only] in ([], ["dashboard head"]), read_only
        metrics_ports = {port for _, port, *_ in read_only}
        beyond = [(p.name(), ip, port) for p, ip, port in wildcard if port not in metrics_ports and not binds_every_interface_in_ray(p)]
        assert not beyond, f"wildcard binds other than Ray's core gRPC servers: {beyond}"
        token = run_token(procs)
        gcs = next(port for p, ip, port in reachable if p.name() == "gcs_server")
        assert grpc_answer(gcs, GRPC_METHODS[0], token, host=internal) == grpc.StatusCode.OK
        assert cluster.job(job).state == "RUNNING", cluster.job_output(job)[-3000:]
        cluster.cancel(job)
        cluster.wait(job, timeout=120)
        # the job's teardown (slurm/ray_cluster.sh) and Slurm leave none of its Ray processes behind
        deadline = time.monotonic() + 60
        while alive(procs) and time.monotonic() < deadline:
            time.sleep(1)
        assert not alive(procs), f"Ray processes of the cancelled job still alive: {alive(procs)}"


def test_slurm_eval_job_ends_at_once_when_its_ray_ports_are_out_of_range_or_taken(tir_tiny_dir, tmp_path):  # noqa: F811
    """The job's Ray ports lie below the kernel's ephemeral range (a port in it may be held by any outgoing
    connection on the node: a Ray Client port of 34009 once was), and a Ray head that cannot start ends the
    job instead of leaving it waiting for nodes that never come."""
    data = write_data(tmp_path / "problems.jsonl")
    args = job_args(tir_tiny_dir, data, tmp_path / "out", "--samples", "1", "--max-tokens", "16")
    # 21000 + k * 1000 is the block of a job id divisible by 1000: no test cluster gets that far
    base = 21000
    with LocalSlurmCluster(nodes=1) as cluster, socket.socket() as held:
        env = {**cluster.env, "MATHTIR_PYTHON": sys.executable}
        sbatch_args = ["--nodes=1", "--cpus-per-task=2", "--mem=4G"]
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        job = cluster.submit(["slurm/eval.sh", *args], cwd=REPO, env={**env, "EVAL_RAY_PORT": str(ephemeral - 7000)},
                             sbatch_args=[*sbatch_args, f"--output={tmp_path / 'range.out'}"])
        info = cluster.wait(job, timeout=120)
        assert (info.state, info.exit_code) == ("FAILED", "2:0"), cluster.job_output(job)[-3000:]
        assert f"EVAL_RAY_PORT={ephemeral - 7000}" in cluster.job_output(job)

        held.bind(("127.0.0.1", base + 2000))  # the Ray Client port of the head
        held.listen()
        job = cluster.submit(["slurm/eval.sh", *args], cwd=REPO, env={**env, "EVAL_RAY_PORT": str(base)},
                             sbatch_args=[*sbatch_args, f"--output={tmp_path / 'taken.out'}"])
        info = cluster.wait(job, timeout=300)
        output = cluster.job_output(job)
        assert info.state == "FAILED", output[-3000:]
        assert "the Ray head exited" in output and "Address already in use" in output, output[-3000:]
