"""The trainer on CPU (gloo, 2 ranks): parallel layouts (TP, DP, PP, interleaved PP) agree, SmolLM2 learns, bad input fails clearly.

torchrun launches cost ~7 s each, so one launch of this file (see `__main__` at the bottom) runs several
trainings in a row, each with its own recipe overrides; the tests read the JSON step records it prints.
The helpers here (packed test shards, a random initial checkpoint, record parsing) are reused by
tests/test_train_slurm.py.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SMOKE = REPO / "nemo_configs" / "stage1_cot_smoke.yaml"
LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


# ---------------------------------------------------------------------------- helpers (shared with slurm tests)
def write_packed_shards(out: Path, documents: list[tuple[np.ndarray, np.ndarray]], *, seq_length: int,
                        pad_id: int) -> Path:
    """Packed shards in the data contract's format, from (token ids, trained flags) documents."""
    from mathtir.data.pack import pack_minimum_slack, packed_row
    from mathtir.shards import FORMAT_VERSION, write_shards

    bins = pack_minimum_slack([len(ids) for ids, _ in documents], seq_length)
    rows = [packed_row([documents[i] for i in b], seq_length, pad_id) for b in bins]
    shards = write_shards(out, rows, rows_per_shard=16, row_group_size=4)
    (out / "manifest.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "seq_length": seq_length, "tokenizer": {"pad_id": pad_id},
        "shards": [vars(s) for s in shards]}))
    return out


def random_documents(n: int, *, vocab: int, seq_length: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Documents with a prompt (untrained) and a response (trained) part; a repeated motif makes them learnable."""
    rng = np.random.default_rng(seed)
    motif = rng.integers(3, vocab, 8)
    docs = []
    for _ in range(n):
        length = int(rng.integers(seq_length // 6, seq_length // 2))
        ids = np.resize(np.concatenate([motif, rng.integers(3, vocab, 4)]), length).astype(np.int32)
        trained = np.zeros(length, dtype=np.int8)
        trained[length // 3:] = 1
        docs.append((ids, trained))
    return docs


def make_random_init_checkpoint(hf_dir: Path, root: Path) -> Path:
    """Iteration 0 ("model" only) of a randomly initialised megatron model for the HF config in `hf_dir`,
    as convert/hf_to_megatron.py would write it (the weights' values do not matter for these tests)."""
    if not (root / "latest_checkpointed_iteration.txt").is_file():
        subprocess.run([PYTHON, __file__, "make-init", str(hf_dir), str(root)], check=True, cwd=REPO,
                       env={**os.environ, **LAUNCH_ENV}, timeout=300)
    return root


def step_records(text: str) -> list[dict]:
    """The trainer's per-step JSON lines."""
    out = []
    for line in text.splitlines():
        if line.startswith("{") and '"step"' in line:
            out.append(json.loads(line))
    return out


def torchrun(args: list[str], *, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *args], cwd=REPO, env={**os.environ, **LAUNCH_ENV}, capture_output=True, text=True,
                          timeout=timeout, check=False)


# Fixed paths under the session's base temp dir: test_train_slurm.py imports these fixtures too, and the
# second module then finds the files instead of building them again.
@pytest.fixture(scope="session")
def tiny_llama4_dir(tmp_path_factory, smollm2_hf_dir) -> Path:
    """The tiny random Llama with 4 layers instead of 2, so that PP=2 x VP=2 has a layer per stage."""
    from mathtir.models.toy import write_toy_llama

    out = tmp_path_factory.getbasetemp() / "tiny_llama4"
    if not (out / "config.json").is_file():
        write_toy_llama(out, tokenizer_from=smollm2_hf_dir, num_hidden_layers=4)
    return out


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory, tiny_llama4_dir) -> Path:
    return make_random_init_checkpoint(tiny_llama4_dir, tmp_path_factory.getbasetemp() / "tiny_init")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_llama4_dir) -> Path:
    out = tmp_path_factory.getbasetemp() / "tiny_shards"
    if not (out / "manifest.json").is_file():
        vocab = json.loads((tiny_llama4_dir / "config.json").read_text())["vocab_size"]
        docs = random_documents(160, vocab=vocab, seq_length=128, seed=0)
        write_packed_shards(out, docs, seq_length=128, pad_id=2)
    return out


@pytest.fixture(scope="session")
def smollm2_init(tmp_path_factory, smollm2_hf_dir) -> Path:
    """The real SmolLM2 weights imported the way users do it (bf16, like a real HF import)."""
    root = tmp_path_factory.getbasetemp() / "smollm2_init"
    if not (root / "latest_checkpointed_iteration.txt").is_file():
        subprocess.run([PYTHON, str(REPO / "convert" / "hf_to_megatron.py"), "--hf-dir", str(smollm2_hf_dir),
                        "--out", str(root)], check=True, cwd=REPO, env={**os.environ, **LAUNCH_ENV}, timeout=300)
    return root


@pytest.fixture(scope="session")
def smollm2_shards(tmp_path_factory, smollm2_hf_dir) -> Path:
    """Short English arithmetic Q/A (no chat template: its system prompt would triple the tokens); only the
    answers (and eos) are trained on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(48):
        a, b = (int(x) for x in rng.integers(10, 99, 2))
        prompt = f"Question: What is {a} plus {b}?\nAnswer: "
        answer = f"{a} plus {b} is {a + b}. The answer is \\boxed{{{a + b}}}.{tok.eos_token}"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        docs.append((np.array(p_ids + a_ids, dtype=np.int32),
                     np.array([0] * len(p_ids) + [1] * len(a_ids), dtype=np.int8)))
    return write_packed_shards(tmp_path_factory.getbasetemp() / "smollm2_shards", docs, seq_length=64,
                               pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


# ---------------------------------------------------------------------------- one launch, several runs
LAYOUTS = {
    "tp2": ["model.tensor_model_parallel_size=2", "model.sequence_parallel=true"],
    "dp2": ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false"],
    "pp2": ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false",
            "model.pipeline_model_parallel_size=2"],
    # the interleaved schedule (two model chunks per pipeline rank)
    "pp2_vp2": ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false",
                "model.pipeline_model_parallel_size=2", "model.virtual_pipeline_model_parallel_size=2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_init, tiny_shards, smollm2_init, smollm2_shards) -> dict[str, list[dict]]:
    """One 2-rank launch: SmolLM2 (TP=1, DP=2, distributed optimizer), then the tiny model in four layouts
    and a resume at another layout."""
    work = tmp_path_factory.mktemp("runs")
    common = [f"model.init_from={tiny_init}", f"data.train_dir={tiny_shards}", "trainer.max_steps=4",
              "model.global_batch_size=4", "model.micro_batch_size=1", "checkpoint.save_every_n_steps=0"]
    # SmolLM2 first, while the process is fresh: it is the memory-hungry run (~6 GB on rank 0 when it saves).
    plan = {"smollm2": [str(REPO / "nemo_configs" / "smollm2_smoke.yaml"), f"model.init_from={smollm2_init}",
                        f"data.train_dir={smollm2_shards}", "data.seq_length=64", "trainer.max_epochs=10",
                        "trainer.max_steps=4", "model.global_batch_size=2", f"checkpoint.dir={work / 'smol'}"]}
    plan.update({name: [str(SMOKE), *common, *extra, f"checkpoint.dir={work / name}"]
                 for name, extra in LAYOUTS.items()})
    # The TP=2 run's final checkpoint resumed at PP=2 for two more steps, against TP=2 running 6 steps straight.
    plan["tp2_6_steps"] = [*plan["tp2"], "trainer.max_steps=6", f"checkpoint.dir={work / 'tp2_6_steps'}"]
    plan["tp2_resumed_at_pp2"] = [*plan["pp2"], "trainer.max_steps=6", f"checkpoint.dir={work / 'tp2'}"]
    (work / "plan.json").write_text(json.dumps(plan))
    res = torchrun([__file__, "run-plan", str(work / "plan.json")])
    (work / "launch.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-5000:]
    runs, current = {"dirs": str(work)}, None
    for line in res.stdout.splitlines():
        if line.startswith("RUN "):
            current = line.split()[1]
            runs[current] = []
        elif current and line.startswith("{"):
            runs[current].append(json.loads(line))
    return runs


def test_tp_dp_pp_layouts_give_the_same_losses(runs):
    layout_runs = {name: runs[name] for name in LAYOUTS}
    # max_steps only stops early: the first 4 steps of a 6-step run are the 4-step run's (same LR schedule)
    np.testing.assert_allclose([r["loss"] for r in runs["tp2_6_steps"][:4]], [r["loss"] for r in runs["tp2"]],
                               rtol=0, atol=1e-6)
    losses = {name: [r["loss"] for r in records] for name, records in layout_runs.items()}
    assert all(len(v) == 4 for v in losses.values()), losses
    for name in ("dp2", "pp2", "pp2_vp2"):
        np.testing.assert_allclose(losses[name], losses["tp2"], rtol=0, atol=1e-4, err_msg=name)
    grad_norms = {name: [r["grad_norm"] for r in records] for name, records in layout_runs.items()}
    np.testing.assert_allclose(grad_norms["pp2"], grad_norms["tp2"], rtol=1e-3)
    np.testing.assert_allclose(grad_norms["dp2"], grad_norms["tp2"], rtol=1e-3)
    np.testing.assert_allclose(grad_norms["pp2_vp2"], grad_norms["tp2"], rtol=1e-3)
    # The loss moves (the steps really update the weights) and every record has the logged fields.
    assert losses["tp2"][-1] < losses["tp2"][0]
    for key in ("lr", "grad_norm", "tokens_per_s", "trained_tokens", "memory_gb", "mfu"):
        assert key in layout_runs["tp2"][0]
    # Linear warmup over 2 steps from 0, then cosine decay.
    lrs = [r["lr"] for r in layout_runs["tp2"]]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3) and lrs[3] < lrs[2]


def test_checkpoint_resumes_at_another_layout(runs):
    """torch_dist + fully_reshardable optimizer state: a TP=2 checkpoint continues at PP=2 as TP=2 would."""
    resumed, straight = runs["tp2_resumed_at_pp2"], runs["tp2_6_steps"]
    assert [r["step"] for r in resumed] == [5, 6]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in straight[4:]], rtol=0, atol=1e-4)
    np.testing.assert_allclose([r["lr"] for r in resumed], [r["lr"] for r in straight[4:]], rtol=1e-12)
    assert list((Path(runs["dirs"]) / "tp2" / "tensorboard").glob("events.out.tfevents.*"))


def test_smollm2_finetuning_lowers_the_loss(runs):
    records = runs["smollm2"]
    losses = [r["loss"] for r in records]
    assert len(losses) == 4, records
    # Step 1 runs at lr 0 (warmup starts at 0), so it measures the imported model; three steps later the
    # loss on this small, repetitive task must be clearly lower.
    assert 0.3 < losses[0] < 5.0, losses  # real pretrained weights: far below ln(vocab) = 10.8
    assert losses[-1] < 0.7 * losses[0], losses


def test_config_errors_are_reported_before_any_work(tmp_path, capsys, tiny_init, tiny_shards):
    """Bad input stops the run with one clear line naming the key or file, before any process group starts."""
    from mathtir.train.cli import main

    common = [f"model.init_from={tiny_init}", f"data.train_dir={tiny_shards}", f"checkpoint.dir={tmp_path / 'x'}"]
    assert main([str(SMOKE), *common, "optim.sched.warmup_step=3"]) == 2
    assert "unknown key 'optim.sched.warmup_step'" in capsys.readouterr().err
    assert main([str(REPO / "nemo_configs" / "smollm2_smoke.yaml"), *common, "data.seq_length=256"]) == 2
    assert f"data.seq_length=256 but {tiny_shards} is packed to 128 tokens" in capsys.readouterr().err
    assert main([str(SMOKE), *common, f"model.init_from={tmp_path / 'none'}"]) == 2
    assert f"model.init_from: {tmp_path / 'none'} has no checkpoint" in capsys.readouterr().err
    assert main([str(REPO / "nemo_configs" / "smollm2_smoke.yaml"), *common, f"data.train_dir={tmp_path}"]) == 2
    assert f"{tmp_path / 'manifest.json'}: no manifest" in capsys.readouterr().err
    # TP=2 needs 2 launched ranks (this process is a world of one).
    assert main([str(SMOKE), *common]) == 2
    assert "does not divide the 1 launched ranks" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- driver (run under torchrun)
def _run_plan(plan_file: str) -> None:
    import torch.distributed as dist

    from mathtir.train.recipe import load_recipe
    from mathtir.train.trainer import train

    plan = json.loads(Path(plan_file).read_text())
    for name, argv in plan.items():
        if int(os.environ["RANK"]) == 0:
            print(f"RUN {name}", flush=True)
        train(load_recipe(argv[0], argv[1:]))
        gc.collect()  # the previous run's model and optimizer before the next one allocates
    dist.destroy_process_group()


def _make_init(hf_dir: str, root: str) -> None:
    from mathtir.megatron import checkpoint, parallel
    from mathtir.megatron.model import build_model
    from mathtir.models.llama import ModelSpec

    parallel.initialize(1, 1, seed=0)
    spec = ModelSpec.from_dir(hf_dir)
    chunks = build_model(spec)
    checkpoint.save(root, 0, {"model": checkpoint.model_sharded_state_dict(chunks)}, spec=spec,
                    tokenizer_src=hf_dir)
    parallel.destroy()


if __name__ == "__main__":
    {"run-plan": _run_plan, "make-init": _make_init}[sys.argv[1]](*sys.argv[2:])
