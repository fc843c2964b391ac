"""Preemption as Slurm does it, on a real local cluster configured for it (tests/cluster/slurm.py,
``preempt_grace_s``): partition_prio preemption with PreemptMode=REQUEUE and a GraceTime.

A stage 1 smoke run is preempted mid-run by a job submitted to the higher-priority partition. Slurm sends the
training job's tasks SIGTERM (not the batch shell, and not the USR1 of `--signal`); the trainer must finish
its step, save within the grace time, and the job must requeue, resume, and end with per-step losses
bit-identical to the same run left alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cluster.slurm import URGENT_PARTITION, LocalSlurmCluster
from test_train import LAUNCH_ENV, PYTHON, REPO, step_records, tiny_init, tiny_llama4_dir, tiny_shards  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

STEPS = 10
GRACE_S = 120  # one smoke step plus one save take a few seconds; the margin is for a loaded CI machine
CPUS = 2  # one emulated node: the training job takes both CPUs, so the urgent job can only run by preempting


@pytest.fixture(scope="module")
def preempting_cluster():
    with LocalSlurmCluster(nodes=1, cpus_per_node=CPUS, preempt_grace_s=GRACE_S) as cluster:
        yield cluster


def submit_training(cluster, out: Path, run_dir: Path, tiny_init: Path, tiny_shards: Path) -> str:  # noqa: F811
    return cluster.submit(
        [str(REPO / "slurm" / "stage1_cot.sh"), str(REPO / "nemo_configs" / "stage1_cot_smoke.yaml"),
         f"model.init_from={tiny_init}", f"data.train_dir={tiny_shards}", f"trainer.max_steps={STEPS}",
         f"checkpoint.dir={run_dir}"],
        sbatch_args=["--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={CPUS}", "--time=15", f"--output={out}"],
        cwd=REPO, env={**LAUNCH_ENV, "MATHTIR_NPROC_PER_NODE": "2", "MATHTIR_PYTHON": PYTHON})


def test_preempted_training_saves_requeues_and_resumes_bit_identically(preempting_cluster, tmp_path, tiny_init,  # noqa: F811
                                                                       tiny_shards):  # noqa: F811
    cluster = preempting_cluster
    # The uninterrupted reference first; the preempted run queues behind it on the one node.
    reference_job = submit_training(cluster, tmp_path / "reference.out", tmp_path / "reference", tiny_init,
                                    tiny_shards)
    job, out = submit_training(cluster, tmp_path / "preempted.out", tmp_path / "preempted", tiny_init,
                               tiny_shards), tmp_path / "preempted.out"
    reference = cluster.wait(reference_job, timeout=600)
    assert reference.state == "COMPLETED", (tmp_path / "reference.out").read_text()[-4000:]

    deadline = time.monotonic() + 300
    while len(step_records(out.read_text() if out.exists() else "")) < 2:  # mid-run: after step 2
        assert time.monotonic() < deadline, out.read_text()[-4000:] if out.exists() else "no output"
        assert not cluster.job(job).done, out.read_text()[-4000:]
        time.sleep(0.05)
    urgent = cluster.submit([], sbatch_args=["--cpus-per-task=1", f"--output={tmp_path / 'urgent.out'}",
                                             "--wrap=echo urgent job ran"], partition=URGENT_PARTITION)

    info = cluster.wait(job, timeout=600)
    text = out.read_text()
    assert info.state == "COMPLETED" and info.restarts == 1, text[-4000:]
    assert cluster.wait(urgent, timeout=60).state == "COMPLETED"
    # Slurm's SIGTERM reached the trainer (the batch shell got no signal), which saved before the grace time's
    # SIGKILL and exited; the batch script requeued; the second run resumed from that checkpoint.
    assert "stop requested (SIGTERM received)" in text, text[-4000:]
    saved_at = int(text.split("checkpoint saved (iteration ")[1].split(")")[0])
    assert 2 <= saved_at < STEPS and (tmp_path / "preempted" / f"iter_{saved_at:07d}").is_dir()
    assert "requeueing job" in text and f"resumed {tmp_path / 'preempted'} at step {saved_at}" in text
    # The memory plan ran first on each start and, on CPUs, reported without blocking.
    assert text.count("fit not checked (no device memory given)") == 2
    records = step_records(text)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), [r["step"] for r in records]
    expected = step_records((tmp_path / "reference.out").read_text())
    # Bit-identical: the JSON floats round-trip exactly, so equality of the parsed values is equality of bits.
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]
    assert [r["grad_norm"] for r in records] == [r["grad_norm"] for r in expected]
