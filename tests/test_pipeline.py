"""The whole pipeline: slurm/pipeline.sh on the real local Slurm cluster, and the local demo's stage plan."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cluster.slurm import slurm_cluster  # noqa: F401  (the module-scoped cluster fixture)

from mathtir.data.recipe import load_data_recipe
from mathtir.pipeline import build_stages
from mathtir.train.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
JOB_NAMES = ("data stage1_cot", "data stage2_tir", "import", "stage1_cot", "stage2_tir", "export", "verify", "eval")


def _overrides(command: list[str]) -> list[str]:
    return [arg for arg in command if re.match(r"^[\w.]+=", arg)]


def test_demo_stages_call_existing_scripts_with_valid_recipes(tmp_path):
    """Every stage of `bash quickstart.sh demo` names a script that exists and a recipe that loads with the
    overrides the pipeline passes (a renamed key or file fails here, not 10 minutes into the demo)."""
    args = argparse.Namespace(workdir=str(tmp_path), eval_problems=4, samples=2, max_tokens=64)
    stages = build_stages(args)
    assert len({s.done_marker for s in stages}) == len(stages), "two stages share a done marker"
    for stage in stages:
        for arg in stage.command:
            if arg.endswith((".py", ".sh", ".yaml")):
                assert Path(arg).is_file(), f"stage {stage.name!r}: {arg} does not exist"
        recipe = next((a for a in stage.command if a.endswith(".yaml")), None)
        if recipe is None:
            continue
        if stage.command[3] == "data":  # [python, -m, mathtir, data, ...]
            cfg = load_data_recipe(recipe, _overrides(stage.command))
            assert str(cfg.output_dir).startswith(str(tmp_path))
        else:
            cfg = load_recipe(recipe, _overrides(stage.command))
            assert str(cfg.checkpoint.dir).startswith(str(tmp_path))
            assert cfg.data.seq_length == load_data_recipe(
                REPO / "nemo_configs" / "data_demo_cot.yaml", []).seq_length, "trainer and shards disagree"


@pytest.mark.slow
@pytest.mark.cluster
def test_slurm_pipeline_runs_through_as_dependent_jobs(slurm_cluster, tiny_llama_dir, tmp_path):  # noqa: F811
    raw = tmp_path / "raw"
    subprocess.run([sys.executable, "-m", "mathtir", "data", "demo", "--out", str(raw), "--seed", "0",
                    "--train", "24", "--eval", "2"], check=True, cwd=REPO, timeout=300)
    run_root = tmp_path / "runs"
    # One 2-CPU emulated node instead of the scripts' multi-node GPU defaults.
    cpu_job = (f"--partition={slurm_cluster.partition} --nodes=1 --gpus-per-node=0 --cpus-per-task=2 "
               "--mem=2G --time=15")
    env = {
        **os.environ, **slurm_cluster.env,
        "BASE_HF": str(tiny_llama_dir), "RUN_ROOT": str(run_root),
        "COT_DATA": str(raw / "cot_train.jsonl"), "TIR_DATA": str(raw / "tir_train.jsonl"),
        "EVAL_DATA": str(raw / "eval.jsonl"),
        "COT_DATA_RECIPE": "nemo_configs/data_demo_cot.yaml", "TIR_DATA_RECIPE": "nemo_configs/data_demo_tir.yaml",
        "TIR_DATA_OVERRIDES": "verify.workers=1", "DATA_PARTS": "1",
        "STAGE1_RECIPE": "nemo_configs/stage1_cot_smoke.yaml", "STAGE2_RECIPE": "nemo_configs/stage2_tir_smoke.yaml",
        "STAGE1_OVERRIDES": "data.seq_length=1024 trainer.max_steps=2",
        "STAGE2_OVERRIDES": "data.seq_length=1024 trainer.max_steps=2",
        "EVAL_ARGS": "--samples 1 --max-tokens 48 --max-code-executions 1",
        "SBATCH_ARGS": cpu_job, "MATHTIR_NPROC_PER_NODE": "2",
    }
    submitted = subprocess.run(["bash", "slurm/pipeline.sh"], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    ids = {name: job for name, job in re.findall(r"^  (\S+(?: \S+)?)\s+(\d+)$", submitted.stdout, re.M)}
    assert set(ids) == set(JOB_NAMES), submitted.stdout

    final = slurm_cluster.wait(ids["eval"], timeout=900)
    states = {name: slurm_cluster.job(job).state for name, job in ids.items()}
    failed = [name for name, state in states.items() if state != "COMPLETED"]
    assert not failed, (states, {name: slurm_cluster.job_output(ids[name])[-3000:] for name in failed})
    assert final.state == "COMPLETED"

    # Each stage's product is where the next one read it from.
    assert (run_root / "data" / "stage2_tir" / "manifest.json").is_file()
    assert (run_root / "stage2_tir" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (run_root / "hf" / "stage2_tir" / "config.json").is_file()
    evaluation = run_root / "eval" / "stage2_tir"
    assert (evaluation / "metrics.json").is_file() and (evaluation / "report.md").is_file()
    records = (evaluation / "records.jsonl").read_text().splitlines()
    assert len(records) == 2  # 2 problems x 1 sample, none lost or duplicated
