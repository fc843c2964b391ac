"""Training-step time and peak memory per attention backend, side by side in one run: megatron's local masked
attention (the baseline: s x s fp32 scores, mathtir's only path before the PyTorch kernels) against the
PyTorch-kernel backends of mathtir.megatron.attention (SDPA over document masks; on a GPU also flex).

    python bench/train_step.py                      # the demo's shape: SmolLM2-135M, seq 1024, micro-batch 1
    python bench/train_step.py --backends local,sdpa,flex --layers 4 --hidden 4096 --heads 32 --kv-heads 8 \\
        --ffn 14336 --vocab 128256 --seq 4096      # GPU: an 8B-shaped slice

Each backend runs in fresh child processes, `--rounds` of them in ABBA order (TP=PP=DP=1, the trainer's model,
optimizer and per-token loss on packed rows of several documents, masked as the trainer masks them), so its
peak RSS (CPU) or peak allocated memory (GPU) is its own. The parent prints one JSON report with each backend's step time, tokens/s,
MFU, peak memory (and of it: what is held between steps, alike for every backend, and the step's own above
it) and per-step losses (the same weights and tokens for every backend, so they must agree),
and the ratios to the first backend (the baseline). Model FLOPs per token follow mathtir.train.throughput.
MFU is against the matmul rate measured in the same run (best of several GEMMs: bf16 8192^3 on a GPU, fp32
2048^3 on a CPU); the device table's datasheet peak is printed next to it where the GPU is in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # SmolLM2-135M (the demo's model) and the demo's packed length and micro-batch
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--docs-per-row", type=int, default=4, help="documents packed into each row")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup); the median is reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backends", default="local,sdpa", help="comma-separated; the first is the baseline")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per backend, in ABBA order; the "
                   "median over all their timed steps is reported")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one backend, in a child process
    return p.parse_args(argv)


def hf_config(a) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
            "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab, "max_position_embeddings": max(a.seq, 2048),
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
            "initializer_range": 0.02, "hidden_act": "silu"}


def packed_batch(a, device):
    """Rows of `docs_per_row` documents of random lengths, the last followed by a padding tail."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.micro_batch, a.seq), generator=g)
    offsets = []
    for _ in range(a.micro_batch):
        cuts = torch.randperm(a.seq - 64, generator=g)[:a.docs_per_row - 1].add(1).sort().values
        offsets.append(torch.cat([torch.tensor([0]), cuts, torch.tensor([a.seq - 32])]).to(torch.int32))
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(a.micro_batch, a.seq)
    loss_mask[:, -32:] = 0
    return tokens.to(device), labels.to(device), loss_mask.to(device), offsets


def run_backend(a) -> dict:
    """One backend's steps in this process: median step time and peak memory."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mathtir.megatron import parallel
    from mathtir.megatron.model import build_model, fused_kernels
    from mathtir.models.llama import ModelSpec
    from mathtir.train.batches import attention_mask_for
    from mathtir.train.loss import loss_func

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    parallel.initialize(1, 1, seed=0)
    spec = ModelSpec.from_hf_config(hf_config(a), source="bench")
    (chunk,) = build_model(spec, params_dtype=dtype, attention_backend=a.worker, calculate_per_token_loss=True,
                           **fused_kernels(True))  # as the trainer's default recipe
    if gpu:
        chunk.cuda()
    config = chunk.config
    model = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), module=chunk)
    config.no_sync_func, config.finalize_model_grads_func = model.no_sync, finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-5, weight_decay=0.1, clip_grad=1.0, bf16=gpu, params_dtype=dtype,
        use_distributed_optimizer=True), [model])
    tokens, labels, loss_mask, offsets = packed_batch(a, device)
    positions = torch.arange(a.seq, device=device).expand_as(tokens)
    forward_backward = get_forward_backward_func()

    def forward_step(data_iterator, chunk):
        next(data_iterator)
        mask = attention_mask_for(a.worker, offsets, a.seq)  # as the trainer builds it, every micro-batch
        mask = None if mask is None else mask.to(device)
        losses = chunk(tokens, positions, mask, labels=labels)
        return losses, lambda out: loss_func(loss_mask, out)

    losses = []

    def step() -> float:
        started = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        (reduced,) = forward_backward(forward_step_func=forward_step, data_iterator=iter([None]), model=model,
                                      num_microbatches=1, seq_length=a.seq, micro_batch_size=a.micro_batch)
        optimizer.step()
        if gpu:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        masked_sum, count = reduced["lm loss"].tolist()
        losses.append(round(masked_sum / count, 6))
        return elapsed

    def memory_now() -> int:
        if gpu:
            return torch.cuda.memory_allocated()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    for _ in range(a.warmup):
        step()
    # After a step the optimizer's state exists: what is held now (weights, gradient buffer, Adam moments,
    # the runtime) every backend holds alike; the peak above it is the step's own (activations, attention,
    # logits), the part an attention backend can change.
    held = memory_now()
    times = [step() for _ in range(a.steps)]
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    parallel.destroy()
    return {"step_s": round(statistics.median(times), 4), "step_s_all": [round(t, 4) for t in times],
            "peak_memory_gb": round(peak / 2**30, 3), "held_between_steps_gb": round(held / 2**30, 3),
            "memory_kind": "max allocated" if gpu else "peak RSS", "losses": losses}


def matmul_tflops(gpu: bool, trials: int = 7) -> float:
    """Best of several single GEMMs (bf16 8192^3 on a GPU, fp32 2048^3 on a CPU): on a shared machine the
    best one is the closest to the real peak."""
    n, device, dtype = (8192, "cuda", torch.bfloat16) if gpu else (2048, "cpu", torch.float32)
    x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    x @ y
    best = float("inf")
    for _ in range(trials):
        if gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        x @ y
        if gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e12


def main() -> None:
    a = parse_args()
    if a.worker:
        print(json.dumps(run_backend(a)))
        return
    from mathtir.models.llama import ModelSpec
    from mathtir.train.throughput import PEAK_TFLOPS, train_flops_per_token

    gpu = torch.cuda.is_available()
    spec = ModelSpec.from_hf_config(hf_config(a), source="bench")
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads), no GPU: fp32"
    datasheet = next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if gpu else None
    peak = matmul_tflops(gpu)
    peak_kind = "measured bf16 8192^3 GEMM" if gpu else "measured fp32 2048^3 GEMM"
    tokens_per_step = a.micro_batch * a.seq
    flops_per_step = train_flops_per_token(spec, a.seq) * tokens_per_step
    backends = a.backends.split(",")
    results = {}
    # Rounds in ABBA order (the second round reversed, and so on): on a shared machine the load drifts, and
    # alternating gives every backend the same share of good and bad moments.
    runs = {backend: [] for backend in backends}
    for round_index in range(a.rounds):
        for backend in backends if round_index % 2 == 0 else backends[::-1]:
            res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", backend], cwd=REPO,
                                 capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise SystemExit(f"bench/train_step.py: backend {backend} failed (exit status {res.returncode}):\n"
                                 f"{res.stderr[-3000:]}")
            runs[backend].append(json.loads(res.stdout.splitlines()[-1]))
    for backend, worker_runs in runs.items():
        times = [t for r in worker_runs for t in r["step_s_all"]]
        step_s = statistics.median(times)
        tflops = flops_per_step / step_s / 1e12
        results[backend] = {
            "step_s": round(step_s, 4), "step_s_all": times, "tokens_per_s": round(tokens_per_step / step_s, 1),
            "model_tflops": round(tflops, 3), "mfu": round(tflops / peak, 4),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in worker_runs),
            "held_between_steps_gb": max(r["held_between_steps_gb"] for r in worker_runs),
            "step_memory_gb": max(round(r["peak_memory_gb"] - r["held_between_steps_gb"], 3) for r in worker_runs),
            "memory_kind": worker_runs[0]["memory_kind"], "losses": worker_runs[0]["losses"],
            "losses_repeat_exactly": all(r["losses"] == worker_runs[0]["losses"] for r in worker_runs)}
    baseline = results[backends[0]]
    ratios = {b: {"step_time_vs_" + backends[0]: round(r["step_s"] / baseline["step_s"], 3),
                  "peak_memory_vs_" + backends[0]: round(r["peak_memory_gb"] / baseline["peak_memory_gb"], 3),
                  "step_memory_vs_" + backends[0]: round(r["step_memory_gb"] / baseline["step_memory_gb"], 3)}
              for b, r in results.items() if b != backends[0]}
    shape = {k: getattr(a, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq",
                                        "micro_batch", "docs_per_row")}
    print(json.dumps({"device": name, "shape": shape, "peak_tflops": round(peak, 3), "peak_kind": peak_kind,
                      "datasheet_bf16_tflops": datasheet, "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
