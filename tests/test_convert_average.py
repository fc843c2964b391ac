"""`mathtir convert average`: the element-wise mean of a run's checkpoints, at TP=1 and resharded at TP=2, as
a checkpoint that exports and verifies like any other; inputs of another config or shape refused by name.

The run is three checkpoints of the tiny Llama with different random weights (iterations 0, 1, 2, written by
the `make-run` driver at the bottom); `dump` reads checkpoints back at TP=1 into one .pt file for comparison.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import LAUNCH_ENV, PYTHON, REPO, tiny_llama4_dir  # noqa: F401

pytestmark = pytest.mark.slow


def driver(*args) -> None:
    subprocess.run([PYTHON, __file__, *map(str, args)], check=True, cwd=REPO, env={**os.environ, **LAUNCH_ENV},
                   timeout=600)


def mathtir(*args, expect: int = 0) -> str:
    proc = subprocess.run([PYTHON, "-m", "mathtir", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **LAUNCH_ENV}, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tiny_llama_dir) -> Path:
    root = tmp_path_factory.mktemp("average") / "run"
    driver("make-run", tiny_llama_dir, root, 3)
    return root


def test_average_is_the_elementwise_mean_at_any_tp_and_exports(run_root, tmp_path):
    out = mathtir("convert", "average", "--ckpt", run_root, "--last", "3", "--out", tmp_path / "last3")
    assert "the mean of 3 checkpoints" in out
    # Named iterations, averaged at TP=2 (each input resharded from TP=1 on load, written at TP=2).
    mathtir("convert", "average", "--ckpt", run_root, "--iterations", "0,2", "--out", tmp_path / "tp2",
            "--tp", "2")
    assert (tmp_path / "last3" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    driver("dump", tmp_path / "weights.pt", *(f"{run_root}:{i}" for i in range(3)), f"{tmp_path / 'last3'}:2",
           f"{tmp_path / 'tp2'}:2")
    weights = torch.load(tmp_path / "weights.pt")
    inputs = [weights[f"{run_root}:{i}"] for i in range(3)]
    last3, tp2 = weights[f"{tmp_path / 'last3'}:2"], weights[f"{tmp_path / 'tp2'}:2"]
    assert sorted(last3) == sorted(inputs[0]) and len(last3) > 10
    for name in last3:
        assert not torch.equal(inputs[0][name], inputs[1][name]), name  # the inputs really differ
        mean3 = torch.stack([w[name].double() for w in inputs]).mean(0)
        mean02 = (inputs[0][name].double() + inputs[2][name].double()) / 2
        # fp32 sum then one division: within a few fp32 roundings of the exact mean.
        torch.testing.assert_close(last3[name].double(), mean3, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(tp2[name].double(), mean02, rtol=1e-6, atol=1e-7, msg=name)
        assert last3[name].dtype == inputs[0][name].dtype
    # The average is a checkpoint like any other: it exports to HF and verifies against its export.
    mathtir("convert", "export", "--ckpt", tmp_path / "tp2", "--out", tmp_path / "hf")
    assert "verify: PASSED" in mathtir("convert", "verify", "--hf-dir", tmp_path / "hf", "--ckpt", tmp_path / "tp2")


def test_other_configs_and_shapes_are_refused_by_name(run_root, tiny_llama4_dir, tmp_path, capsys):  # noqa: F811
    from mathtir.convert.cli import main

    other = tmp_path / "other"  # the 4-layer tiny Llama: same vocabulary and widths, more layers
    driver("make-run", tiny_llama4_dir, other, 1)
    assert main(["average", "--ckpt", f"{run_root}/iter_0000000", "--ckpt", f"{other}/iter_0000000",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{other}/hf_config.json: num_hidden_layers=4 but {run_root}/hf_config.json has 2" in err, err

    # The same config file over weights of another shape (a copied hf_config.json): refused by tensor key.
    disguised = tmp_path / "disguised"
    shutil.copytree(other, disguised)
    shutil.copy(run_root / "hf_config.json", disguised / "hf_config.json")
    out = mathtir("convert", "average", "--ckpt", f"{run_root}/iter_0000000", "--ckpt",
                  f"{disguised}/iter_0000000", "--out", tmp_path / "y", expect=2)
    assert "average: error:" in out and "has shape (4," in out and "but the model expects (2," in out, out
    assert not (tmp_path / "y" / "latest_checkpointed_iteration.txt").exists()

    assert main(["average", "--ckpt", str(run_root), "--last", "4", "--out", str(tmp_path / "z")]) == 2
    assert f"--last 4: {run_root} holds 3 complete checkpoint(s) [0, 1, 2]" in capsys.readouterr().err
    assert main(["average", "--ckpt", str(run_root), "--iterations", "1,7", "--out", str(tmp_path / "z")]) == 2
    assert "no complete checkpoint for iteration(s) [7]" in capsys.readouterr().err


@pytest.mark.cluster
def test_pipeline_inserts_the_average_before_export(tiny_llama_dir, tmp_path):
    """slurm/pipeline.sh with AVERAGE_LAST=2 on a real local Slurm cluster, every job submitted held (only the
    chain is checked here; test_pipeline.py runs the pipeline itself)."""
    from cluster.slurm import LocalSlurmCluster

    run_root = tmp_path / "runs"
    with LocalSlurmCluster(nodes=1) as cluster:
        env = {**os.environ, **cluster.env, **LAUNCH_ENV, "MATHTIR_PYTHON": PYTHON, "BASE_HF": str(tiny_llama_dir),
               "RUN_ROOT": str(run_root), "COT_DATA": "cot.jsonl", "TIR_DATA": "tir.jsonl", "EVAL_DATA": "eval.jsonl",
               "DATA_PARTS": "1", "STAGE1_RECIPE": "nemo_configs/stage1_cot_smoke.yaml",
               "STAGE2_RECIPE": "nemo_configs/stage2_tir_smoke.yaml", "AVERAGE_LAST": "2",
               "MATHTIR_NPROC_PER_NODE": "2",
               "SBATCH_ARGS": f"--partition={cluster.partition} --hold --nodes=1 --gpus-per-node=0 --time=5"}
        submitted = subprocess.run(["bash", "slurm/pipeline.sh"], env=env, cwd=REPO, capture_output=True,
                                   text=True, timeout=300)
        assert submitted.returncode == 0, submitted.stderr
        ids = dict(re.findall(r"^  (\S+(?: \S+)?)\s+(\d+)$", submitted.stdout, re.M))
        average, export = cluster.job(ids["average"]), cluster.job(ids["export"])
        assert average.fields["Dependency"].startswith(f"afterok:{ids['stage2_tir']}")
        assert export.fields["Dependency"].startswith(f"afterok:{ids['average']}")
        command = cluster.scontrol("show", "job", ids["average"])
        assert f"--ckpt {run_root}/stage2_tir --last 2 --out {run_root}/stage2_tir_avg2" in command, command
        assert f"--ckpt {run_root}/stage2_tir_avg2" in cluster.scontrol("show", "job", ids["verify"])
        # Both layouts were planned before anything was submitted (CPU jobs: reported, not refused).
        assert "fit not checked" in (run_root / "logs" / "plan-stage1_cot_smoke.txt").read_text()


# ---------------------------------------------------------------------------- driver (own process: megatron state)
def _make_run(hf_dir: str, root: str, count: str) -> None:
    """Checkpoints 0..count-1 of one root, each a differently seeded random initialisation."""
    from mathtir.megatron import checkpoint, parallel
    from mathtir.megatron.model import build_model
    from mathtir.models.llama import ModelSpec

    spec = ModelSpec.from_dir(hf_dir)
    for iteration in range(int(count)):
        parallel.initialize(1, 1, seed=iteration)
        chunks = build_model(spec)
        for name, param in chunks[0].named_parameters():
            if "norm" in name:  # initialised to ones: make them differ too
                param.data.uniform_(0.5, 1.5)
        checkpoint.save(root, iteration, {"model": checkpoint.model_sharded_state_dict(chunks)}, spec=spec,
                        tokenizer_src=hf_dir)
    parallel.destroy()


def _dump(out: str, *sources: str) -> None:
    """Each ROOT:ITERATION read at TP=1 -> {source: {name: tensor}} in `out`."""
    from mathtir.megatron import checkpoint, parallel
    from mathtir.megatron.model import build_model
    from mathtir.models.llama import ModelSpec

    parallel.initialize(1, 1, seed=0)
    dumped = {}
    for source in sources:
        root, iteration = source.rsplit(":", 1)
        spec = ModelSpec.from_dir(root)
        chunks = build_model(spec)
        checkpoint.load_model(root, chunks, int(iteration))
        dumped[source] = {k: v.clone() for k, v in chunks[0].state_dict().items()
                          if isinstance(v, torch.Tensor) and torch.is_floating_point(v)}
    torch.save(dumped, out)
    parallel.destroy()


if __name__ == "__main__":
    {"make-run": _make_run, "dump": _dump}[sys.argv[1]](*sys.argv[2:])
