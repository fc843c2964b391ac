"""slurm/convert.sh on a real local Slurm cluster: sbatch -> srun -> the CLI -> torchrun with TP=2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cluster.slurm import slurm_cluster  # noqa: F401  (the module-scoped cluster fixture)

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
REPO = Path(__file__).resolve().parent.parent


def test_sbatch_convert_writes_a_tp2_checkpoint(slurm_cluster, tmp_path):  # noqa: F811
    from mathtir.models.toy import write_toy_llama

    hf_dir = write_toy_llama(tmp_path / "hf", vocab_size=250)
    out = tmp_path / "ckpt"
    job = slurm_cluster.submit(
        [str(REPO / "slurm" / "convert.sh"), "hf_to_megatron", "--hf-dir", str(hf_dir), "--out", str(out),
         "--tp", "2", "--dtype", "fp32"],
        sbatch_args=["--gpus-per-node=0", "--cpus-per-task=2", "--time=10", f"--output={tmp_path}/%x-%j.out"],
        cwd=REPO, env=slurm_cluster.env)
    info = slurm_cluster.wait(job, timeout=300)
    log = slurm_cluster.job_output(job)
    assert info.state == "COMPLETED", log
    assert "hf_to_megatron: wrote" in log and "tp=2" in log
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert (out / "iter_0000000" / "metadata.json").is_file()
    assert json.loads((out / "hf_config.json").read_text())["vocab_size"] == 250
