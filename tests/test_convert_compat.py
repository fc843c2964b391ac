"""The CPU compatibility layer: version pinning, and exact resume of the distributed optimizer over torch AdamW."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_layer_refuses_an_unknown_megatron_version_and_missing_names(monkeypatch):
    import megatron.core

    from mathtir.megatron import compat

    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match=r"written for megatron-core 0\.16\.1.*found megatron-core 0\.99\.0"):
        compat._check_megatron_version()
    with pytest.raises(RuntimeError, match=r"megatron\.core\.tensor_parallel\.random\._no_such_name does not exist"):
        compat._replace("megatron.core.tensor_parallel.random", "_no_such_name", None)


def _resume_worker(root: Path) -> None:
    """Train 2 steps, checkpoint (model + distributed optimizer), train 3 more; then a fresh model and
    optimizer load the checkpoint and train the same 3 steps. The losses must agree exactly."""
    import torch
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mathtir.megatron import checkpoint, parallel
    from mathtir.megatron.model import build_model
    from mathtir.models.llama import ModelSpec
    from mathtir.models.toy import write_toy_llama

    parallel.initialize(1, 1, seed=0)
    spec = ModelSpec.from_dir(write_toy_llama(root / "hf"))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, spec.vocab_size, (2, 17), generator=gen) for _ in range(5)]
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)

    def fresh():
        (chunk,) = build_model(spec, params_dtype=torch.float32)
        ddp = DistributedDataParallel(config=chunk.config, module=chunk, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True))
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, bf16=False,
                                                     use_distributed_optimizer=True, clip_grad=1.0), [ddp])
        return chunk, ddp, opt

    def train(ddp, opt, steps):
        losses = []
        for tokens in steps:
            ddp.zero_grad_buffer()
            opt.zero_grad()
            loss = ddp(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
            loss.backward()
            finalize_model_grads([ddp])
            opt.step()
            losses.append(loss.item())
        return losses

    def state(chunk, opt, loading):
        model_state = checkpoint.model_sharded_state_dict([chunk])
        return {"model": model_state,
                "optimizer": checkpoint.optimizer_sharded_state_dict(opt, model_state, loading=loading)}

    chunk, ddp, opt = fresh()
    train(ddp, opt, batches[:2])
    result = _compare_with_megatrons_gather(checkpoint, chunk, opt)
    checkpoint.save(root / "ckpt", 2, state(chunk, opt, False), spec=spec)
    uninterrupted = train(ddp, opt, batches[2:])

    chunk, ddp, opt = fresh()  # a new process would start from here: the optimizer has never stepped
    loaded = checkpoint.load(root / "ckpt", state(chunk, opt, True))
    chunk.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    inner = opt.optimizer.state.values()
    step_tensors = [s["step"] for s in inner]
    result.update(steps=sorted({t.item() for t in step_tensors}), distinct=len({id(t) for t in step_tensors}),
                  params=len(step_tensors))
    result["resumed"] = train(ddp, opt, batches[2:])
    result["uninterrupted"] = uninterrupted
    (root / "result.json").write_text(json.dumps(result))
    parallel.destroy()


def _compare_with_megatrons_gather(checkpoint, chunk, opt) -> dict:
    """The optimizer entry a rank alone in its data-parallel group saves, against megatron's own gathered one:
    the same entries (metadata and values), and how many of ours are the optimizer's own tensors, not copies."""
    import dataclasses

    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    model_state = checkpoint.model_sharded_state_dict([chunk])
    ours = checkpoint.optimizer_sharded_state_dict(opt, model_state, loading=False)
    theirs = opt.sharded_state_dict(model_state, is_loading=False, metadata=checkpoint.OPTIMIZER_FORMAT)

    def entries(state):
        return {e.key: e for e in nested_values(state["param_state"])}

    ours_entries, theirs_entries = entries(ours), entries(theirs)
    differing = [key for key, e in ours_entries.items()
                 if key not in theirs_entries or not torch.equal(e.data, theirs_entries[key].data)
                 or {f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name != "data"}
                 != {f.name: getattr(theirs_entries[key], f.name) for f in dataclasses.fields(e) if f.name != "data"}]
    own_storage = {t.untyped_storage().data_ptr() for group in opt.optimizer.param_groups for p in group["params"]
                   for t in [p, *opt.optimizer.state[p].values()]}
    return {"entries": len(ours_entries), "megatron_entries": len(theirs_entries), "differing": differing,
            "same_top_level": ours.keys() == theirs.keys(),
            "own_tensors": sum(e.data.untyped_storage().data_ptr() in own_storage for e in ours_entries.values())}


@pytest.mark.slow
def test_distributed_optimizer_over_torch_adamw_resumes_exactly(tmp_path):
    """Also: what a rank alone in its data-parallel group saves is megatron's gathered optimizer entry, entry
    for entry, built on the optimizer's own tensors (no copy, mathtir.megatron.checkpoint)."""
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["entries"] == r["megatron_entries"] > 0 and r["differing"] == [] and r["same_top_level"], r
    assert r["own_tensors"] == r["entries"], r
    assert r["steps"] == [2.0]  # the loaded step, not 0 and not a shared counter
    assert r["distinct"] == r["params"] > 1  # one step tensor per param: torch AdamW increments each
    assert r["resumed"] == r["uninterrupted"], r


if __name__ == "__main__":
    _resume_worker(Path(sys.argv[1]))
