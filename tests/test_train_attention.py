"""Attention backends, recompute/overlap knobs and checkpoint compatibility between layer specs (CPU).

* PyTorch-kernel attention (SDPA over document masks) equals megatron's local masked attention: the kernels
  alone (values and gradients), and whole trainings at TP=2 (sequence parallel), PP=2 and DP=2 in one
  2-rank torchrun launch (the pattern of tests/test_train.py), where recompute and the DP overlaps are
  also checked against the plain run.
* A checkpoint without Transformer Engine `_extra_state` (importer, CPU runs) loads into modules that carry
  it, as TE layers do; a checkpoint with it loads into the local spec; nothing else missing is tolerated.
* The new recipe keys refuse impossible values and combinations, naming the keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_train import LAUNCH_ENV, PYTHON, REPO, SMOKE, tiny_init, tiny_llama4_dir, tiny_shards, torchrun  # noqa: F401


def _resolved(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


def _worker(command: str, *args: str) -> subprocess.CompletedProcess:
    """A world-of-one worker of this file in its own process (megatron's parallel state is per process)."""
    return subprocess.run([PYTHON, __file__, command, *args], cwd=REPO, env={**os.environ, **LAUNCH_ENV},
                          capture_output=True, text=True, timeout=600, check=False)


# ---------------------------------------------------------------------------- kernels
def test_document_ids_give_the_block_causal_mask():
    import torch

    from mathtir.megatron.attention import document_ids, document_spans, one_document_per_row
    from mathtir.train.batches import block_causal_mask

    offsets = [torch.tensor([0, 3, 7]), torch.tensor([0, 10]), torch.tensor([0, 4])]
    ids = document_ids(offsets, 10)
    assert ids.tolist()[0] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]  # the padding after the last document: one more
    spans = document_spans(ids)
    assert spans == [[(0, 3), (3, 7), (7, 10)], [(0, 10)], [(0, 4), (4, 10)]]
    allowed = torch.zeros(3, 1, 10, 10, dtype=torch.bool)  # causal inside each span = the block-causal mask
    for b, row in enumerate(spans):
        for start, end in row:
            allowed[b, 0, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(allowed, ~block_causal_mask(offsets, 10))
    assert one_document_per_row(offsets[1:]) and not one_document_per_row(offsets)


def test_sdpa_core_attention_equals_megatron_local_attention():
    res = _worker("kernels")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.splitlines()[-1])
    for case, errors in report.items():
        assert errors["output"] < 1e-5 and errors["grads"] < 1e-5, (case, errors)


# ---------------------------------------------------------------------------- trainings in one launch
BACKEND_LAYOUTS = {
    "tp2": ["model.tensor_model_parallel_size=2", "model.sequence_parallel=true"],
    "pp2": ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false",
            "model.pipeline_model_parallel_size=2"],
    "dp2": ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false"],
}
KNOB_RUNS = {  # name: (layout, extra overrides); each is compared with the SDPA run of its layout
    "tp2_recompute_full": ("tp2", ["model.recompute_granularity=full", "model.recompute_method=uniform",
                                   "model.recompute_num_layers=1"]),
    "pp2_recompute_selective": ("pp2", ["model.recompute_granularity=selective"]),
    "dp2_overlap": ("dp2", ["model.overlap_grad_reduce=true", "model.overlap_param_gather=true"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_init, tiny_shards) -> dict:  # noqa: F811
    work = tmp_path_factory.mktemp("attention_runs")
    common = [str(SMOKE), f"model.init_from={tiny_init}", f"data.train_dir={tiny_shards}", "trainer.max_steps=4",
              "model.global_batch_size=4", "model.micro_batch_size=2", "checkpoint.save_every_n_steps=0"]
    plan = {}
    for layout, extra in BACKEND_LAYOUTS.items():
        for backend in ("local", "sdpa"):
            name = f"{backend}_{layout}"
            plan[name] = [*common, *extra, f"model.attention_backend={backend}", f"checkpoint.dir={work / name}"]
    for name, (layout, extra) in KNOB_RUNS.items():
        plan[name] = [*common, *BACKEND_LAYOUTS[layout], *extra, f"checkpoint.dir={work / name}"]
    (work / "plan.json").write_text(json.dumps(plan))
    res = torchrun([str(REPO / "tests" / "test_train.py"), "run-plan", str(work / "plan.json")])
    (work / "launch.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-5000:]
    out, current = {"dirs": work, "stderr": res.stderr}, None
    for line in res.stdout.splitlines():
        if line.startswith("RUN "):
            current = line.split()[1]
            out[current] = []
        elif current and line.startswith("{"):
            out[current].append(json.loads(line))
    return out


@pytest.mark.parametrize("layout", list(BACKEND_LAYOUTS))
def test_sdpa_losses_equal_the_local_masked_path(runs, layout):
    local, sdpa = runs[f"local_{layout}"], runs[f"sdpa_{layout}"]
    assert len(local) == len(sdpa) == 4
    for backend, core in (("local", "DotProductAttention"), ("sdpa", "SdpaCoreAttention")):
        resolved = _resolved(runs["dirs"] / f"{backend}_{layout}" / "resolved_config.yaml")
        assert resolved["resolved"]["core_attention"] == core
    np.testing.assert_allclose([r["loss"] for r in sdpa], [r["loss"] for r in local], rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in sdpa], [r["grad_norm"] for r in local], rtol=1e-4)
    assert sdpa[-1]["loss"] < sdpa[0]["loss"]  # the runs really train


@pytest.mark.parametrize("name", list(KNOB_RUNS))
def test_recompute_and_overlap_do_not_change_the_losses(runs, name):
    layout, _ = KNOB_RUNS[name]
    np.testing.assert_allclose([r["loss"] for r in runs[name]], [r["loss"] for r in runs[f"sdpa_{layout}"]],
                               rtol=0, atol=1e-5)
    # the knobs reached megatron (the resolved config reads them back from its config objects)
    resolved = _resolved(runs["dirs"] / name / "resolved_config.yaml")["resolved"]
    plain = _resolved(runs["dirs"] / f"sdpa_{layout}" / "resolved_config.yaml")["resolved"]
    expected = {"tp2_recompute_full": ("recompute", {"recompute_granularity": "full", "recompute_method": "uniform",
                                                     "recompute_num_layers": 1}),
                "pp2_recompute_selective": ("recompute", {"recompute_granularity": "selective",
                                                          "recompute_method": None, "recompute_num_layers": None}),
                "dp2_overlap": ("overlap", {"overlap_grad_reduce": True, "overlap_param_gather": True})}[name]
    assert resolved[expected[0]] == expected[1]
    assert plain[expected[0]] != expected[1]


def test_resolved_config_is_written_to_the_run_dir_and_the_log(runs):
    resolved = _resolved(runs["dirs"] / "tp2_recompute_full" / "resolved_config.yaml")
    assert resolved["model"]["attention_backend"] == "auto"
    assert resolved["resolved"]["attention_backend"] == "sdpa"  # auto on a machine without TE and GPU
    assert resolved["model"]["recompute_granularity"] == "full"
    assert resolved["resolved"]["tensor_parallel"] == 2 and resolved["resolved"]["data_parallel"] == 1
    assert resolved["resolved"]["core_attention"] == "SdpaCoreAttention"
    assert resolved["resolved"]["fused_kernels"] == {"bias_activation_fusion": False, "apply_rope_fusion": False,
                                                     "masked_softmax_fusion": False}  # none on this CPU
    assert f"resolved config ({runs['dirs'] / 'tp2_recompute_full' / 'resolved_config.yaml'})" in runs["stderr"]


# ---------------------------------------------------------------------------- recipe keys
@pytest.mark.parametrize(("overrides", "message"), [
    (["model.attention_backend=fast"], "key 'model.attention_backend': 'fast' is not one of"),
    (["model.recompute_granularity=some"], "key 'model.recompute_granularity': 'some' is not one of"),
    (["model.recompute_granularity=full"], "key 'model.recompute_granularity': full recompute needs "
                                           "model.recompute_method (uniform|block) and model.recompute_num_layers"),
    (["model.recompute_granularity=selective", "model.recompute_method=block"],
     "key 'model.recompute_method': model.recompute_method and model.recompute_num_layers apply only to "
     "model.recompute_granularity=full (it is selective)"),
    (["model.recompute_granularity=full", "model.recompute_method=chunked", "model.recompute_num_layers=1"],
     "key 'model.recompute_method': 'chunked' is not one of"),
    (["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=0"],
     "key 'model.recompute_num_layers': must be >= 1"),
    (["model.overlap_param_gather=true"], "key 'model.overlap_param_gather': needs model.overlap_grad_reduce=true"),
    (["model.overlap_grad_reduce=true", "model.overlap_param_gather=true", "optim.use_distributed_optimizer=false"],
     "key 'model.overlap_param_gather': needs optim.use_distributed_optimizer=true"),
    (["model.attention_backend=flex", "model.attention_dropout=0.1"],
     "key 'model.attention_backend': flex has no attention dropout"),
])
def test_impossible_knob_combinations_are_refused_naming_the_keys(overrides, message):
    from mathtir.recipes import ConfigError
    from mathtir.train.recipe import load_recipe

    with pytest.raises(ConfigError) as err:
        load_recipe(SMOKE, ["model.init_from=x", "data.train_dir=y", *overrides])
    assert message in str(err.value)


def test_knobs_this_machine_cannot_run_are_refused_at_start(tmp_path, capsys, tiny_init, tiny_shards):  # noqa: F811
    """Checks that need the model or the machine: before any process group starts, exit status 2."""
    from mathtir.train.cli import main

    common = [str(SMOKE), f"model.init_from={tiny_init}", f"data.train_dir={tiny_shards}",
              "model.tensor_model_parallel_size=1", "model.sequence_parallel=false", "model.global_batch_size=2",
              "model.micro_batch_size=2", f"checkpoint.dir={tmp_path / 'x'}"]
    # the tiny model has 4 layers (one pipeline stage here): block recompute of 5 of them is impossible
    assert main([*common, "model.recompute_granularity=full", "model.recompute_method=block",
                 "model.recompute_num_layers=5"]) == 2
    assert "key 'model.recompute_num_layers': 5 is more than the 4 layers" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        assert main([*common, "model.attention_backend=te"]) == 2
        assert "model.attention_backend=te: attention backend 'te' needs Transformer Engine" in capsys.readouterr().err
        assert main([*common, "model.attention_backend=flex"]) == 2
        assert "model.attention_backend=flex: attention backend 'flex' needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize(("script", "overrides", "expected"), [
    ("stage1_cot.sh", [], "1"),  # TP=2 with sequence parallel
    ("stage1_cot.sh", ["model.sequence_parallel=false"], "unset"),
    ("stage2_tir.sh", ["model.tensor_model_parallel_size=2"], "1"),
    ("stage2_tir.sh", ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false"], "unset"),
])
def test_sbatch_scripts_set_cuda_device_max_connections_for_tp_with_sequence_parallel(tmp_path, script, overrides,
                                                                                     expected, tiny_init):  # noqa: F811
    """The script runs locally (no Slurm); its interpreter is wrapped so that the launch itself only reports the
    variable the ranks would see, while the recipe check runs for real."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/bin/bash
if [ "$2" = torch.distributed.run ]; then echo "CUDA_DEVICE_MAX_CONNECTIONS=${{CUDA_DEVICE_MAX_CONNECTIONS:-unset}}"; exit 0; fi
exec {PYTHON} "$@"
""")
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "CUDA_DEVICE_MAX_CONNECTIONS")}
    # a real model to plan for: the scripts check the layout's memory before any rank starts
    overrides = [*overrides, f"model.init_from={tiny_init}"]
    res = subprocess.run(["bash", str(REPO / "slurm" / script), *overrides], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**env, **LAUNCH_ENV, "MATHTIR_PYTHON": str(wrapper),
                                                      "MATHTIR_ROOT": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == f"CUDA_DEVICE_MAX_CONNECTIONS={expected}"


# ---------------------------------------------------------------------------- checkpoints across layer specs
def test_checkpoints_load_across_te_and_local_layer_specs(tmp_path):
    res = _worker("extra-state", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.splitlines()[-1])
    # local checkpoint -> modules with TE extra state: loads, says so, weights identical
    assert report["local_into_te"]["max_abs_diff"] == 0.0
    assert report["local_into_te"]["extra_state_objects_in_template"] == 9  # 2 layers x 4 linears + final norm
    local_iter = tmp_path / "local" / "iter_0000000"
    assert (f"mathtir: {local_iter} has no Transformer Engine _extra_state for 1 module(s) (written by the local "
            "layer spec") in res.stderr  # the final norm's ShardedObject
    assert f"mathtir: {tmp_path / 'local'} has no Transformer Engine _extra_state for 2 module(s)" in res.stderr
    # TE-like checkpoint -> local spec: loads, weights identical; and back into TE-like modules: the saved
    # extra states (linears, final norm) are restored, not replaced
    assert report["te_into_local"]["max_abs_diff"] == 0.0
    assert report["te_into_te"]["restored_extra_states"] == 9
    # anything else missing is still an error that names it
    assert "tensor 'decoder.layers.self_attention.linear_qkv.bias' is missing" in report["missing_bias"]


# ---------------------------------------------------------------------------- workers
def _kernels() -> None:
    """SdpaCoreAttention vs megatron's DotProductAttention on the same q/k/v (GQA, packed documents, causal)."""
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from mathtir.megatron import parallel
    from mathtir.megatron.attention import SdpaCoreAttention, document_ids
    from mathtir.megatron.model import transformer_config
    from mathtir.models.llama import ModelSpec
    from mathtir.models.toy import write_toy_llama
    from mathtir.train.batches import block_causal_mask

    parallel.initialize(1, 1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = ModelSpec.from_dir(write_toy_llama(Path(tmp), num_attention_heads=8, num_key_value_heads=2))
    config = transformer_config(spec, tp=1, pp=1, vp=None, params_dtype=torch.float32, sequence_parallel=False,
                                perform_initialization=False)
    kw = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    local, sdpa = DotProductAttention(**kw), SdpaCoreAttention(**kw)
    s, b, hn = 48, 2, spec.head_dim
    gen = torch.Generator().manual_seed(0)
    offsets = [torch.tensor([0, 10, 31, 40]), torch.tensor([0, 20])]
    cases = {"documents": (block_causal_mask(offsets, s), document_ids(offsets, s)), "causal": (None, None)}
    report = {}
    for case, (local_mask, doc_ids) in cases.items():
        q = torch.randn(s, b, spec.num_attention_heads, hn, generator=gen)
        k, v = (torch.randn(s, b, spec.num_kv_heads, hn, generator=gen) for _ in range(2))
        outs, grads = [], []
        for module, mask in ((local, local_mask), (sdpa, doc_ids)):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = module(*leaves, mask)
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            outs.append(out.detach())
            grads.append(torch.cat([t.grad.flatten() for t in leaves]))
        report[case] = {"output": (outs[0] - outs[1]).abs().max().item(),
                        "grads": (grads[0] - grads[1]).abs().max().item()}
    print(json.dumps(report))


TE_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _give_te_extra_state(chunk) -> None:
    """Make the modules that Transformer Engine's layer spec gives extra state carry it the way TE's do:
    `get_extra_state`/`set_extra_state` on the class, so `state_dict()` lists `_extra_state`. megatron's
    sharded state dict then turns it into a ShardedObject for the linears and the final norm (whose TE
    counterparts save it), while the attention core's sharded state dict leaves it out, as
    TEDotProductAttention's does. The local spec's linears already declare an empty one (megatron keeps
    them TE-compatible); the local attention core and the torch norm do not."""
    import torch

    def get_extra_state(self):
        return getattr(self, "te_extra_state", torch.tensor([7, 7, 7], dtype=torch.uint8))

    def set_extra_state(self, state):
        self.te_extra_state = state

    for name, module in chunk.named_modules():
        if name.rsplit(".", 1)[-1] in (*TE_LINEARS, "core_attention", "final_layernorm"):
            cls = type(module)
            module.__class__ = type(f"{cls.__name__}WithExtraState", (cls,),
                                    {"get_extra_state": get_extra_state, "set_extra_state": set_extra_state})


def _extra_state(root: str) -> None:
    import torch
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from mathtir.megatron import checkpoint, parallel
    from mathtir.megatron.model import build_model
    from mathtir.models.llama import ModelSpec
    from mathtir.models.toy import write_toy_llama

    root = Path(root)
    parallel.initialize(1, 1, seed=0)
    spec = ModelSpec.from_dir(write_toy_llama(root / "hf"))

    def fresh(**overrides):
        (chunk,) = build_model(spec, attention_backend="local", **overrides)
        return chunk

    def max_abs_diff(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return max((sa[k] - sb[k]).abs().max().item() for k in sa if not k.endswith("_extra_state"))

    written = fresh()
    checkpoint.save(root / "local", 0, {"model": checkpoint.model_sharded_state_dict([written])}, spec=spec)
    report = {}

    te_like = fresh()
    _give_te_extra_state(te_like)
    template = checkpoint.model_sharded_state_dict([te_like])
    extra = [v for v in nested_values(template) if isinstance(v, ShardedObject) and v.key.endswith("_extra_state")]
    checkpoint.load_model(root / "local", [te_like])
    report["local_into_te"] = {"max_abs_diff": max_abs_diff(written, te_like),
                               "extra_state_objects_in_template": len(extra)}

    for module in te_like.modules():  # a TE-written checkpoint: each module's extra state is its own
        if hasattr(module, "te_extra_state"):
            module.te_extra_state = torch.tensor([1, 2, 3], dtype=torch.uint8)
    checkpoint.save(root / "te", 0, {"model": checkpoint.model_sharded_state_dict([te_like])}, spec=spec)
    local = fresh()
    checkpoint.load_model(root / "te", [local])
    report["te_into_local"] = {"max_abs_diff": max_abs_diff(written, local)}
    te_again = fresh()
    _give_te_extra_state(te_again)
    checkpoint.load_model(root / "te", [te_again])
    report["te_into_te"] = {"restored_extra_states": sum(
        1 for m in te_again.modules() if getattr(m, "te_extra_state", None) is not None
        and m.te_extra_state.tolist() == [1, 2, 3])}

    with_bias = fresh(add_qkv_bias=True)
    try:
        checkpoint.load_model(root / "local", [with_bias])
        report["missing_bias"] = "loaded"
    except KeyError as exc:
        report["missing_bias"] = str(exc)
    print(json.dumps(report))
    parallel.destroy()


if __name__ == "__main__":
    {"kernels": _kernels, "extra-state": _extra_state}[sys.argv[1]](*sys.argv[2:])
