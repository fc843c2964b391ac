"""Conversion speed and memory against the floor: a raw safetensors read+write copy of the same bytes.

    python bench/convert.py [--synthetic-layers 16] [--rounds 3] [--work DIR]

Models: the real SmolLM2-135M (bf16) and a synthetic Llama (~1B parameters with the default 16 layers,
bf16) written to safetensors. Each operation runs in a fresh process (so allocator state and caches from
one do not flatter the next; the files are in the page cache for all, dirty pages flushed before each) and
reports its own time and peak RSS above the process's baseline after imports (the kernel's VmHWM, reset
before the operation; torch_dist's writer processes are forked and share the model's pages, so they add no
copy; where import hands the writers memory-mapped pages of the HF files, those are the page cache the floor
reads through too; what export copies file to file with sendfile never enters the process).

Targets (issue 4): time <= 2x the floor (the durable one for import, see JUDGED_AGAINST); peak RSS (per
rank) <= model size / TP + 2x the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# floor+fsync is the floor made durable. torch_dist's writer fsyncs every file it writes (megatron-core
# hard-codes it: a checkpoint must survive a crashed node), so import is judged against the durable floor;
# export writes HF shards without fsync and is judged against the plain one. Both ratios are printed.
# export reads the checkpoint the round's import wrote; import-tp2 is the import on two ranks.
OPERATIONS = ("floor", "floor+fsync", "import", "import-tp2", "export")
JUDGED_AGAINST = {"import": "floor+fsync", "import-tp2": "floor+fsync", "export": "floor"}
GiB = 1024**3


def synthetic_config(layers: int) -> dict:
    """Llama-shaped, ~1B parameters at 16 layers (hidden 2048, GQA 32/8, SwiGLU 5632, vocab 32000)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
    }


def write_synthetic(out: Path, layers: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from mathtir.convert.rules import expected_hf_shapes
    from mathtir.models.llama import ModelSpec

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = synthetic_config(layers)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
               for name, shape in expected_hf_shapes(ModelSpec.from_hf_config(cfg)).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS, so import-time peaks do not count."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def run_operation(op: str, src: Path, dst: Path) -> dict:
    """Inside a fresh process (one per rank for import-tp2): everything imported first, then one timed
    operation."""
    # Imports count toward the baseline, not the operation (the RoPE check imports transformers' Llama).
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401  (build_model imports it when first called)
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from safetensors.torch import load_file, save_file

    from mathtir.convert import exporter, importer
    from mathtir.megatron import parallel

    tp = 2 if op == "import-tp2" else 1
    parallel.initialize(tp, 1, seed=0)
    baseline = _reset_peak_rss()
    parallel.barrier()
    start = time.perf_counter()
    if op in ("floor", "floor+fsync"):
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.glob("*.safetensors")):
            save_file(load_file(str(f)), str(dst / f.name), metadata={"format": "pt"})
            if op == "floor+fsync":
                with open(dst / f.name, "rb") as written:
                    os.fsync(written.fileno())
    elif op in ("import", "import-tp2"):
        importer.import_hf(src, dst, dtype=torch.bfloat16, tp=tp, pp=1)
    elif op == "export":
        exporter.export_hf(src, dst)
    seconds = time.perf_counter() - start
    parallel.destroy()
    return {"seconds": seconds, "peak_rss_above_baseline": _status_kib("VmHWM") - baseline, "baseline_rss": baseline}


def measure(op: str, src: Path, dst: Path) -> dict:
    """One operation in fresh process(es); with several ranks, the slowest rank's time and the largest
    rank's peak RSS."""
    launcher = [sys.executable]
    if op == "import-tp2":
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    os.sync()  # the previous operation's dirty pages are not this one's to flush
    with tempfile.TemporaryDirectory() as results:
        proc = subprocess.run([*launcher, __file__, "--op", op, str(src), str(dst), results], capture_output=True,
                              text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{op} {src} failed:\n{proc.stderr[-4000:]}")
        ranks = [json.loads(f.read_text()) for f in Path(results).glob("rank*.json")]
    return {"seconds": max(r["seconds"] for r in ranks),
            "peak_rss_above_baseline": max(r["peak_rss_above_baseline"] for r in ranks)}


def model_bytes(hf_dir: Path) -> tuple[int, int]:
    from mathtir.convert.safetensors import HFWeights

    weights = HFWeights(hf_dir)
    sizes = [math.prod(weights.shape(n)) * 2 for n in weights.file_of]  # bf16
    return sum(sizes), max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-layers", type=int, default=16)
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of floor/import/export; the fastest counts")
    parser.add_argument("--op", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.op:  # one rank of one measurement: its result goes to a file of its own
        src, dst, results = args.paths
        result = run_operation(args.op, src, dst)
        (results / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))
        return

    from mathtir.models.llama import ModelSpec
    from mathtir.models.smollm2 import materialize

    work = args.work or Path(tempfile.mkdtemp(prefix="mathtir-bench-convert-"))
    models = {
        "smollm2-135m": materialize(Path.home() / ".cache" / "mathtir" / "smollm2-135m-instruct"),
        f"synthetic-{args.synthetic_layers}L": write_synthetic(work / "synthetic", args.synthetic_layers),
    }
    print(f"{'model':<16} {'op':<11} {'seconds':>8} {'x floor':>8} {'x durable':>9} {'peak RSS':>9} "
          f"{'RSS target':>10}  verdict (against)")
    for name, hf_dir in models.items():
        size, largest = model_bytes(hf_dir)
        try:
            ModelSpec.from_dir(hf_dir).check_parallel(2, 1)
            operations = OPERATIONS
        except ValueError as e:  # SmolLM2's 9 heads do not split in two
            print(f"# {name}: no import-tp2: {e}")
            operations = tuple(op for op in OPERATIONS if op != "import-tp2")
        # Rounds of every operation, side by side; each one's fastest round counts (a busy shared machine
        # and its disk only ever slow an operation down). Peak RSS is the largest seen.
        runs: dict[str, list[dict]] = {op: [] for op in operations}
        for _ in range(args.rounds):
            for op in operations:
                shutil.rmtree(work / name / op, ignore_errors=True)
                src = work / name / "import" if op == "export" else hf_dir
                runs[op].append(measure(op, src, work / name / op))
        best = {op: {"seconds": min(r["seconds"] for r in rs),
                     "peak_rss_above_baseline": max(r["peak_rss_above_baseline"] for r in rs)}
                for op, rs in runs.items()}
        print(f"# {name}: {size / GiB:.2f} GiB bf16, largest tensor {largest / GiB:.3f} GiB")
        for op, r in best.items():
            ratios = {floor: r["seconds"] / best[floor]["seconds"] for floor in ("floor", "floor+fsync")}
            rss = r["peak_rss_above_baseline"]
            rss_target = size / (2 if op == "import-tp2" else 1) + 2 * largest
            verdict = ""
            if op in JUDGED_AGAINST:
                met = ratios[JUDGED_AGAINST[op]] <= 2.0 and rss <= rss_target
                verdict = f"{'ok' if met else 'MISSES TARGET'} ({JUDGED_AGAINST[op]})"
            print(f"{name:<16} {op:<11} {r['seconds']:>8.2f} {ratios['floor']:>8.2f} {ratios['floor+fsync']:>9.2f} "
                  f"{rss / GiB:>8.2f}G {rss_target / GiB:>9.2f}G  {verdict}")

if __name__ == "__main__":
    main()
