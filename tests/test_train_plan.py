"""`mathtir train plan`: memory per GPU for a recipe's layout, and the sbatch scripts' check built on it.

The stage 1 recipe is planned for an 8B Llama-3-shaped model (hidden 4096, FFN 14336, 32 heads, 8 KV heads,
vocabulary 128256) on 1, 2 and 4 nodes of 8 x 80 GB; the parameter count is checked against transformers'
own model of the same config, the components against their definitions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mathtir.models.llama import ModelSpec
from mathtir.train import plan
from mathtir.train.cli import main
from mathtir.train.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
STAGE1 = REPO / "nemo_configs" / "stage1_cot.yaml"
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128009,
}


@pytest.fixture(scope="module")
def model_8b(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("llama8b")
    (d / "config.json").write_text(json.dumps(LLAMA_8B))
    return d


def gib(text: str, label: str) -> float:
    return float(re.search(rf"{re.escape(label)}\s+([\d.]+) GiB", text).group(1))


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_stage1_recipe_answers_on_1_2_4_nodes_of_8x80gb(nodes, model_8b, capsys):
    assert main(["plan", str(STAGE1), "--nodes", str(nodes), "--gpus-per-node", "8", "--gpu-memory", "80",
                 "--model", str(model_8b)]) == 0
    out = capsys.readouterr().out
    assert f"TP=2 PP=1 DP={4 * nodes}" in out and f"{24 // nodes} micro-batch(es)" in out
    for label in ("weights", "gradients (fp32)", "optimizer state", "activations, no recompute",
                  "activations, selective recompute", "activations, full recompute", "total"):
        assert gib(out, label) > 0, label
    # TP=2 halves the 8.03 B parameters (the norms stay whole); Adam's fp32 master + moments shard over DP.
    assert gib(out, "weights") == pytest.approx(4.015e9 * 2 / 2**30, abs=0.006)  # printed to 0.01 GiB
    assert gib(out, "optimizer state") == pytest.approx(4.015e9 * 12 / (4 * nodes) / 2**30, abs=0.006)
    assert gib(out, "activations, full recompute") < gib(out, "activations, no recompute")
    assert "<- configured" in out.split("activations, no recompute")[1].splitlines()[0]
    assert re.search(r"peak\s+[\d.]+ GiB per GPU of\s+80.00 GiB: fits", out)


def test_parameter_count_is_transformers_own(model_8b):
    """At TP=PP=1 the planned parameters are exactly those of transformers' LlamaForCausalLM of the config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        hf_params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**LLAMA_8B)).parameters())
    cfg = load_recipe(STAGE1, ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false"])
    stages = plan.plan(ModelSpec.from_dir(model_8b), plan.layout_from_recipe(cfg, world_size=8, on_gpu=True))
    assert [s.params for s in stages] == [hf_params]
    cfg = load_recipe(STAGE1, ["model.pipeline_model_parallel_size=2", "model.tensor_model_parallel_size=1",
                               "model.sequence_parallel=false"])
    first, last = plan.plan(ModelSpec.from_dir(model_8b), plan.layout_from_recipe(cfg, world_size=8, on_gpu=True))
    assert first.params + last.params == hf_params  # untied: the embedding first, the output layer last
    # 1F1B: the first stage holds PP=2 micro-batches of its 16 layers, the last one plus the logits.
    assert first.activations["none"] > last.activations["none"] - plan._logits_bytes(
        ModelSpec.from_dir(model_8b), plan.layout_from_recipe(cfg, world_size=8, on_gpu=True))


def test_recompute_and_attention_keys_are_read_when_the_recipe_has_them(model_8b):
    """The recompute / attention-backend keys come from another branch's schema: read with .get when present."""
    spec = ModelSpec.from_dir(model_8b)
    base = load_recipe(STAGE1, [])

    def total(**keys) -> tuple[int, plan.StagePlan]:
        cfg = OmegaConf.create(OmegaConf.to_container(base))  # without this branch's schema, as theirs has them
        cfg.model.update(keys)
        [stage] = plan.plan(spec, plan.layout_from_recipe(cfg, world_size=16, on_gpu=True))
        return stage.total, stage

    none, _ = total()
    full, stage = total(recompute_granularity="full")
    assert stage.configured == "full" and full < none
    local, stage_local = total(attention_backend="local")
    # The unfused path keeps an s x s fp32 softmax output and its bf16 copy per head (16 per TP rank), per layer.
    s = base.data.seq_length
    assert stage_local.activations["none"] - stage.activations["none"] == pytest.approx(
        32 * (16 * s * s * 6 - 4 * 16 * s) + 12 * s * s, rel=1e-9)
    assert stage_local.activations["selective"] < stage_local.activations["none"]
    with pytest.raises(plan.PlanError, match="model.recompute_granularity: 'everything'"):
        total(recompute_granularity="everything")


def test_auto_attention_on_a_cpu_is_planned_as_the_backend_the_model_builder_picks(model_8b):
    """On a CPU the builder's "auto" is SDPA (O(s) softmax statistics per query), not megatron's local attention
    with its s x s fp32 probabilities per head and s x s bool document mask per sequence."""
    from mathtir.megatron.model import auto_attention_backend

    assert auto_attention_backend(gpu=False) == "sdpa"
    spec = ModelSpec.from_dir(model_8b)

    def planned(backend: str) -> tuple[plan.Layout, plan.StagePlan]:
        cfg = load_recipe(STAGE1, [f"model.attention_backend={backend}"])
        layout = plan.layout_from_recipe(cfg, world_size=16, on_gpu=False)
        [stage] = plan.plan(spec, layout)
        return layout, stage

    layout, auto = planned("auto")
    _, sdpa = planned("sdpa")
    _, local = planned("local")
    assert layout.dtype_bytes == 4 and layout.pp == 1 and not layout.attention_dropout
    assert auto.activations == sdpa.activations and auto.total == sdpa.total
    s, b, heads = layout.seq_length, layout.micro_batch, spec.num_attention_heads // layout.tp
    per_layer = b * heads * (s * s * 4 - 4 * s)  # fp32 probabilities instead of the log-sum-exp per query
    masks = layout.micro_batches * b * s * s
    assert local.activations["none"] - auto.activations["none"] == spec.num_layers * per_layer + masks


def test_a_layout_that_cannot_fit_is_refused(model_8b, capsys):
    args = ["plan", str(STAGE1), "model.tensor_model_parallel_size=1", "model.sequence_parallel=false",
            "optim.use_distributed_optimizer=false", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "80",
            "--model", str(model_8b)]
    assert main(args) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", str(STAGE1), "--nodes", "1", "--gpus-per-node", "3", "--model", str(model_8b)]) == 2
    assert "does not divide the 3 launched ranks" in capsys.readouterr().err


def test_sbatch_check_refuses_on_a_gpu_node_and_never_blocks_a_cpu_run(model_8b, tmp_path):
    """slurm/common.sh's mathtir_plan_check as the stage scripts run it. The GPU node is a stand-in: an
    `nvidia-smi` on PATH answering the memory query as an 80 GB H100 does (no GPU can run here)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 81559\n")
    (fake / "nvidia-smi").chmod(0o755)
    script = 'source slurm/common.sh && mathtir_plan_check "$@"'
    too_big = ["1", "8", str(STAGE1), f"model.init_from={model_8b}", "model.tensor_model_parallel_size=1",
               "model.sequence_parallel=false", "optim.use_distributed_optimizer=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MATHTIR_PYTHON": os.sys.executable}
    gpu = subprocess.run(["bash", "-c", script, "check", *too_big], cwd=REPO, capture_output=True, text=True,
                         env={**env, "PATH": f"{fake}:{env['PATH']}"}, timeout=120)
    assert gpu.returncode == 3 and "of    79.00 GiB: DOES NOT FIT" in gpu.stdout, gpu.stdout + gpu.stderr
    cpu = subprocess.run(["bash", "-c", script, "check", *too_big], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=120)
    assert cpu.returncode == 0 and "fit not checked" in cpu.stdout and "per CPU rank" in cpu.stdout, cpu.stderr


def _saved_by_one_layer(out: Path) -> None:
    """Bytes autograd keeps for backward from one layer of a real CPU model (megatron's local spec with SDPA,
    fp32, a SmolLM2-like shape: 3:1 grouped-query heads, FFN 8/3 of hidden): the storages its saved tensors
    live in, once each, weights aside."""
    import torch

    from mathtir.megatron import parallel
    from mathtir.megatron.model import build_model

    parallel.initialize(1, 1, seed=0)
    config = {**LLAMA_8B, "hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 6,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512}
    (out / "config.json").write_text(json.dumps(config))
    (chunk,) = build_model(ModelSpec.from_dir(out), params_dtype=torch.float32, attention_backend="sdpa")
    weights = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    in_layer, saved = [False], {}

    def pack(t):
        storage = t.untyped_storage()
        if in_layer[0] and storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    layer = chunk.decoder.layers[0]
    layer.register_forward_pre_hook(lambda *_: in_layer.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: in_layer.__setitem__(0, False))
    seq = 256
    tokens = torch.randint(0, config["vocab_size"], (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunk(tokens, torch.arange(seq)[None], None, labels=tokens)
    (out / "result.json").write_text(json.dumps({"saved": sum(saved.values()), "seq": seq}))
    parallel.destroy()


def test_a_cpu_layer_keeps_what_the_plan_counts(tmp_path):
    """The activation count for a layer without fused kernels (a CPU run) is what autograd really keeps from
    one layer, byte for byte."""
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())
    spec = ModelSpec.from_dir(tmp_path)
    # the layout a CPU run of the stage 1 recipe gets, at the worker's shape: one rank, one sequence, SDPA
    cfg = load_recipe(STAGE1, ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false",
                               "model.attention_backend=sdpa", f"data.seq_length={r['seq']}"])
    layout = plan.layout_from_recipe(cfg, world_size=1, on_gpu=False)
    assert layout.micro_batch == 1 and not (layout.te_layers or layout.fused_swiglu)
    planned, _ = plan._layer_activations(spec, layout)
    assert planned == r["saved"]


if __name__ == "__main__":
    _saved_by_one_layer(Path(sys.argv[1]))
