"""slurm/prepare_data.sh on a real local Slurm cluster: an array job of parts, then the dependent merge, gives
the same shards as a one-process `prepare`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cluster.slurm import slurm_cluster  # noqa: F401  (the module-scoped cluster fixture)

from mathtir.data.prepare import prepare
from mathtir.data.recipe import load_data_recipe

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
REPO = Path(__file__).resolve().parent.parent


def test_array_of_parts_then_merge_equals_one_process_prepare(slurm_cluster, tmp_path, smollm2_hf_dir):  # noqa: F811
    rows = [{"problem": f"{i}と{i + 3}の和は?", "generated_solution": f"{i} + {i + 3} = {2 * i + 3}。\\boxed{{{2 * i + 3}}}",
             "expected_answer": str(2 * i + 3), "inference_mode": "cot"} for i in range(30)]
    rows.append(dict(rows[4]))  # a duplicate across parts: the merge removes it
    data = tmp_path / "cot.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    recipe = str(REPO / "nemo_configs" / "data_demo_cot.yaml")
    overrides = [f"inputs=[{data}]", f"tokenizer={smollm2_hf_dir}", "decontam.eval_sets=[]", "workers=1"]
    sbatch = f"--cpus-per-task=1 --mem=1G --time=10 --output={tmp_path}/%x-%j.out"
    submitted = subprocess.run(
        ["bash", str(REPO / "slurm" / "prepare_data.sh"), "--parts", "2", "--sbatch", sbatch, recipe,
         *overrides, f"output_dir={tmp_path / 'slurm'}"],
        cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    merge_job = submitted.stdout.strip().splitlines()[-1]
    info = slurm_cluster.wait(merge_job, timeout=300)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(tmp_path.glob("*.out")))
    assert info.state == "COMPLETED", logs
    assert len(list((tmp_path / "slurm" / "parts").glob("part_*-of-00002.json"))) == 2

    local = prepare(load_data_recipe(recipe, [*overrides, f"output_dir={tmp_path / 'local'}"]))
    merged = json.loads((tmp_path / "slurm" / "manifest.json").read_text())
    assert merged["counts"] == local["counts"] and merged["counts"]["exact_duplicate"] == 1
    assert [s["sha256"] for s in merged["shards"]] == [s["sha256"] for s in local["shards"]]
