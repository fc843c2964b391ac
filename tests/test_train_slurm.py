"""The sbatch scripts on a real local Slurm cluster (munged + slurmctld + slurmd on localhost).

Stage 1 (TP=2, smoke recipe) completes; stage 2 chained with afterok starts from stage 1's final checkpoint;
a job whose dependency failed is cancelled, not left pending; and a preempted job (its USR1 signal sent to
the batch shell mid-run, as `--signal=B:USR1@N` would) checkpoints, requeues, resumes, and its per-step
losses equal the uninterrupted run's to 1e-6.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from cluster.slurm import slurm_cluster  # noqa: F401  (the module-scoped cluster fixture)
from test_train import LAUNCH_ENV, REPO, step_records, tiny_init, tiny_llama4_dir, tiny_shards  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

# Override the scripts' multi-node GPU defaults for this one 2-CPU node.
CPU_JOB = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=15"]
JOB_ENV = dict(LAUNCH_ENV)
STEPS = 10  # long enough that the signal sent after step 2 lands mid-run even on an idle machine


def submit(cluster, script: str, recipe: str, out: Path, overrides: list[str], extra: list[str] = ()) -> str:
    ranks_per_node = "1" if "--nodes=2" in extra else "2"
    return cluster.submit([str(REPO / "slurm" / script), str(REPO / "nemo_configs" / recipe), *overrides],
                          sbatch_args=[*CPU_JOB, f"--output={out}", *extra], cwd=REPO,
                          env={**JOB_ENV, "MATHTIR_NPROC_PER_NODE": ranks_per_node})


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm_jobs")


@pytest.fixture(scope="module")
def stage_jobs(slurm_cluster, work, tiny_init, tiny_shards):  # noqa: F811
    """Submit everything up front, in an order that lets the two emulated nodes overlap jobs (stage 1 beside
    the failing job, then beside the preempted one); the two-node job runs last."""
    stage1 = [f"model.init_from={tiny_init}", f"data.train_dir={tiny_shards}", f"trainer.max_steps={STEPS}"]
    jobs = {"stage1": submit(slurm_cluster, "stage1_cot.sh", "stage1_cot_smoke.yaml", work / "stage1.out",
                             [*stage1, f"checkpoint.dir={work / 's1'}"])}
    jobs["bad"] = submit(slurm_cluster, "stage1_cot.sh", "stage1_cot_smoke.yaml", work / "bad.out",
                         [*stage1, "optim.lr=-1", f"checkpoint.dir={work / 'bad'}"])
    jobs["stage2"] = submit(slurm_cluster, "stage2_tir.sh", "stage2_tir_smoke.yaml", work / "stage2.out",
                            [f"model.init_from={work / 's1'}", f"data.train_dir={tiny_shards}",
                             "trainer.max_steps=3", f"checkpoint.dir={work / 's2'}"],
                            [f"--dependency=afterok:{jobs['stage1']}"])
    jobs["preempted"] = submit(slurm_cluster, "stage1_cot.sh", "stage1_cot_smoke.yaml", work / "preempted.out",
                               [*stage1, f"checkpoint.dir={work / 's1p'}"])
    jobs["after_bad"] = submit(slurm_cluster, "stage2_tir.sh", "stage2_tir_smoke.yaml", work / "after_bad.out",
                               [f"model.init_from={work / 'bad'}", f"checkpoint.dir={work / 'after_bad'}"],
                               [f"--dependency=afterok:{jobs['bad']}"])
    # The same run as stage1 with its two TP ranks on two emulated nodes: srun + torchrun per node,
    # rendezvous at the first node's address.
    jobs["two_nodes"] = submit(slurm_cluster, "stage1_cot.sh", "stage1_cot_smoke.yaml", work / "two_nodes.out",
                               [*stage1, f"checkpoint.dir={work / 's1_two_nodes'}"],
                               ["--nodes=2", "--cpus-per-task=1"])
    return jobs


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_cluster, stage_jobs, work):  # noqa: F811
    # First in this file: it must watch its job from the start to signal it mid-run.
    job, out = stage_jobs["preempted"], work / "preempted.out"
    slurm_cluster.wait(job, timeout=300, until={"RUNNING"})
    deadline = time.monotonic() + 240
    while len(step_records(out.read_text() if out.exists() else "")) < 2:  # mid-run: after step 2
        assert time.monotonic() < deadline, out.read_text()[-4000:]
        assert not slurm_cluster.job(job).done, out.read_text()[-4000:]
        time.sleep(0.05)
    slurm_cluster.signal(job, "USR1")  # what --signal=B:USR1@N delivers to the batch shell
    info = slurm_cluster.wait(job, timeout=300)
    text = out.read_text()
    assert info.state == "COMPLETED" and info.restarts == 1, text[-4000:]
    assert "requeueing job" in text and "resumed" in text
    records = step_records(text)
    # Every step exactly once across the two runs: nothing lost, nothing repeated.
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), [r["step"] for r in records]
    first_run_steps = int(text.split("checkpoint saved (iteration ")[1].split(")")[0])
    assert 2 <= first_run_steps < STEPS
    slurm_cluster.wait(stage_jobs["stage1"], timeout=240)
    reference = step_records((work / "stage1.out").read_text())
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in reference], rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in records], [r["grad_norm"] for r in reference], rtol=1e-6)


def test_stage1_then_stage2_with_afterok(slurm_cluster, stage_jobs, work):  # noqa: F811
    s1 = slurm_cluster.wait(stage_jobs["stage1"], timeout=240)
    out1 = (work / "stage1.out").read_text()
    assert s1.state == "COMPLETED", out1[-4000:]
    records1 = step_records(out1)
    assert [r["step"] for r in records1] == list(range(1, STEPS + 1))
    assert "TP=2 PP=1 DP=1" in out1  # the smoke recipe's tensor parallelism really ran over the 2 ranks
    assert (work / "s1" / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)
    assert (work / "s1" / "iter_0000004").is_dir()  # the every-4-steps checkpoint as well as the final one

    s2 = slurm_cluster.wait(stage_jobs["stage2"], timeout=240)
    out2 = (work / "stage2.out").read_text()
    assert s2.state == "COMPLETED", out2[-4000:]
    assert f"initialised from {work / 's1'} (iteration {STEPS})" in out2
    records2 = step_records(out2)
    assert [r["step"] for r in records2] == [1, 2, 3]
    # Stage 2 starts from stage 1's trained weights, not from the initial ones: its first loss on the same
    # data is below stage 1's first.
    assert records2[0]["loss"] < records1[0]["loss"] - 0.1
    assert (work / "s2" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_two_node_job_equals_the_one_node_run(slurm_cluster, stage_jobs, work):  # noqa: F811
    two = slurm_cluster.wait(stage_jobs["two_nodes"], timeout=300)
    text = (work / "two_nodes.out").read_text()
    assert two.state == "COMPLETED", text[-4000:]
    assert "on 2 node(s), 1 rank(s) per node" in text and "TP=2 PP=1 DP=1" in text
    slurm_cluster.wait(stage_jobs["stage1"], timeout=240)
    one = step_records((work / "stage1.out").read_text())
    np.testing.assert_allclose([r["loss"] for r in step_records(text)], [r["loss"] for r in one], rtol=0, atol=1e-6)


def test_failed_job_reports_the_key_and_cancels_its_dependents(slurm_cluster, stage_jobs, work):  # noqa: F811
    bad = slurm_cluster.wait(stage_jobs["bad"], timeout=240)
    assert bad.state == "FAILED"
    assert "key 'optim.lr': must be > 0" in (work / "bad.out").read_text()
    after = slurm_cluster.wait(stage_jobs["after_bad"], timeout=60)
    assert after.state == "CANCELLED" and "DependencyNeverSatisfied" in after.reason
