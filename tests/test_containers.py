"""Containers used as documented: slurm/pipeline.sh on the real local Slurm cluster with
MATHTIR_CONTAINER_IMAGE set, every step of the data, convert, train and eval scripts inside the image.

No container runtime runs here, so `apptainer` is a stand-in (tests/cluster/container_standin/apptainer) that
records each command it is asked to run and runs it on the host. Guards for python, python3, ray and torchrun
come first on PATH and refuse to run unless started through the stand-in: a step that bypasses the image
fails its job, and is listed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cluster.slurm import slurm_cluster  # noqa: F401  (the module-scoped cluster fixture)

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "tests" / "cluster" / "container_standin"
JOB_NAMES = ("data stage1_cot", "data stage2_tir", "import", "stage1_cot", "stage2_tir", "export", "verify", "eval")
GUARD = """#!/usr/bin/env bash
if [ -z "${{MATHTIR_STANDIN_IMAGE:-}}" ]; then
  echo "{name} $*" >> "{outside}"
  echo "{name} ran outside the container image" >&2
  exit 97
fi
exec "{real}" "$@"
"""


def _guards(directory: Path, outside: Path) -> Path:
    directory.mkdir()
    venv_bin = Path(sys.executable).parent
    for name, real in (("python", sys.executable), ("python3", sys.executable), ("ray", venv_bin / "ray"),
                       ("torchrun", venv_bin / "torchrun")):
        (directory / name).write_text(GUARD.format(name=name, outside=outside, real=real))
        (directory / name).chmod(0o755)
    return directory


def test_a_bare_container_image_variable_is_refused_not_ignored(tmp_path):
    env = {**os.environ, "CONTAINER_IMAGE": "/images/mathtir-train.sqsh"}
    env.pop("MATHTIR_CONTAINER_IMAGE", None)
    proc = subprocess.run(["bash", "slurm/convert.sh", "verify", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "CONTAINER_IMAGE is set but the scripts read MATHTIR_CONTAINER_IMAGE" in proc.stderr


@pytest.mark.slow
@pytest.mark.cluster
def test_every_pipeline_step_runs_in_the_image(slurm_cluster, tiny_llama_dir, tmp_path):  # noqa: F811
    raw = tmp_path / "raw"
    subprocess.run([sys.executable, "-m", "mathtir", "data", "demo", "--out", str(raw), "--seed", "0",
                    "--train", "24", "--eval", "2"], check=True, cwd=REPO, timeout=300)
    run_root = tmp_path / "runs"
    image = tmp_path / "images" / "mathtir.sif"  # a .sif selects the apptainer runtime (slurm/common.sh)
    log, outside = tmp_path / "container-calls.jsonl", tmp_path / "outside-the-image.txt"
    guards = _guards(tmp_path / "guards", outside)
    cpu_job = (f"--partition={slurm_cluster.partition} --nodes=1 --gpus-per-node=0 --cpus-per-task=2 "
               "--mem=2G --time=15")
    env = {
        **os.environ, **slurm_cluster.env,
        "PATH": f"{guards}{os.pathsep}{STANDIN}{os.pathsep}{os.environ['PATH']}",
        "MATHTIR_CONTAINER_IMAGE": str(image), "CONTAINER_STANDIN_LOG": str(log),
        "CONTAINER_STANDIN_PYTHON": sys.executable,
        "BASE_HF": str(tiny_llama_dir), "RUN_ROOT": str(run_root),
        "COT_DATA": str(raw / "cot_train.jsonl"), "TIR_DATA": str(raw / "tir_train.jsonl"),
        "EVAL_DATA": str(raw / "eval.jsonl"),
        "COT_DATA_RECIPE": "nemo_configs/data_demo_cot.yaml", "TIR_DATA_RECIPE": "nemo_configs/data_demo_tir.yaml",
        "TIR_DATA_OVERRIDES": "verify.workers=1", "DATA_PARTS": "1",
        "STAGE1_RECIPE": "nemo_configs/stage1_cot_smoke.yaml", "STAGE2_RECIPE": "nemo_configs/stage2_tir_smoke.yaml",
        "STAGE1_OVERRIDES": "data.seq_length=1024 trainer.max_steps=1",
        "STAGE2_OVERRIDES": "data.seq_length=1024 trainer.max_steps=1",
        "EVAL_ARGS": "--samples 1 --max-tokens 32 --max-code-executions 1",
        "SBATCH_ARGS": cpu_job, "MATHTIR_NPROC_PER_NODE": "2",
    }
    env.pop("MATHTIR_PYTHON", None)
    env.pop("RAY_ADDRESS", None)
    submitted = subprocess.run(["bash", "slurm/pipeline.sh"], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    ids = {name: job for name, job in re.findall(r"^  (\S+(?: \S+)?)\s+(\d+)$", submitted.stdout, re.M)}
    assert set(ids) == set(JOB_NAMES), submitted.stdout

    slurm_cluster.wait(ids["eval"], timeout=900)
    states = {name: slurm_cluster.job(job).state for name, job in ids.items()}
    bypassed = outside.read_text() if outside.exists() else ""
    failed = [name for name, state in states.items() if state != "COMPLETED"]
    assert not bypassed, f"steps that ran outside the image:\n{bypassed}"
    assert not failed, (states, {name: slurm_cluster.job_output(ids[name])[-3000:] for name in failed})

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls and all(c["image"] == str(image) for c in calls)
    # Outside a job only the memory plan runs (pipeline.sh plans both stages before submitting anything).
    assert all(c["slurm_job"] or c["argv"][1:5] == ["-m", "mathtir", "train", "plan"] for c in calls), calls
    by_job = {name: [" ".join(c["argv"]) for c in calls if c["slurm_job"] == job] for name, job in ids.items()}
    assert all(by_job.values()), {name: len(cmds) for name, cmds in by_job.items()}
    assert any("-m mathtir data" in cmd for cmd in by_job["data stage1_cot"])
    assert any("convert/hf_to_megatron.py" in cmd for cmd in by_job["import"])
    assert any("torch.distributed.run" in cmd and "train" in cmd for cmd in by_job["stage2_tir"])
    assert any("convert/megatron_to_hf.py" in cmd for cmd in by_job["export"])
    assert any("convert/verify.py" in cmd for cmd in by_job["verify"])
    # eval: the Ray head, the node check and the driver, each in the image
    assert any(re.search(r"\bray start --head\b", cmd) for cmd in by_job["eval"])
    assert any("ray_eval/run.py" in cmd for cmd in by_job["eval"])
    assert (run_root / "eval" / "stage2_tir" / "report.md").is_file()
