"""The embedded Ray of `mathtir eval run` as an attacker on the same machine or network meets it: every
listening socket of a running job is on loopback, each one refuses a caller without the job's token, and a
driver killed with SIGKILL leaves no Ray process behind once the next driver of its output has run."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
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
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            found += [(proc, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:  # exited while we looked
            pass
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def grpc_answer(port: int, method: str, token: str | None = None) -> grpc.StatusCode:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(b"", timeout=5, metadata=[("authorization", f"Bearer {token}")] if token else None)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()


def http_answer(port: int) -> tuple[int, bytes] | None:
    """(status, first bytes) of a plain GET / without a token; None where the port does not speak HTTP/1."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            return resp.status, resp.read(200)
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (OSError, ValueError, urllib.error.URLError):
        return None
    except Exception:  # http.client.BadStatusLine and kin: a gRPC (HTTP/2) port
        return None


def run_token(root: psutil.Process) -> str:
    """The job's token, as its Ray processes got it (the driver set it after it started)."""
    for proc in root.children(recursive=True):
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

    token = run_token(root)
    unauthenticated, read_only = [], []
    for proc, _, port in sockets:
        http = http_answer(port)
        if http is not None:
            status, body = http
            if status in (401, 403):
                continue
            kind = next((k for k, prefix in READ_ONLY_METRICS.items() if body.startswith(b"# HELP " + prefix.encode())),
                        None)
            (read_only if kind and status == 200 else unauthenticated).append((proc.name(), port, status, kind))
            continue
        answers = {method: grpc_answer(port, method) for method in GRPC_METHODS}
        if grpc.StatusCode.UNAUTHENTICATED not in answers.values() or grpc.StatusCode.OK in answers.values():
            unauthenticated.append((proc.name(), port, {m.rsplit("/", 1)[1]: a.name for m, a in answers.items()}))
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
