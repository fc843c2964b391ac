"""Training-step throughput and MFU of the megatron-core path the trainer uses, side by side with a plain
Hugging Face `LlamaForCausalLM` + torch AdamW step of the same shape on the same tokens (the baseline).

    python bench/train_step.py                      # CPU: a small Llama shape; GPU: an 8B-shaped 4-layer slice
    python bench/train_step.py --layers 2 --hidden 4096 --heads 32 --kv-heads 8 --ffn 14336 --vocab 128256 \\
        --seq 4096 --micro-batch 1 --steps 10

One process (TP=PP=DP=1). Model FLOPs per token follow mathtir.train.throughput (6 x matmul params + attention scores).
MFU: on a GPU against the dense bf16 peak of the device table in mathtir.train.throughput; on a CPU against the fp32 GEMM
rate measured here (a 2048^3 matmul), since CPUs have no meaningful datasheet peak for this -- so CPU MFU says
how close the step gets to this machine's own matmul speed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def parse_args():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4 if gpu else 2)
    p.add_argument("--hidden", type=int, default=4096 if gpu else 512)
    p.add_argument("--heads", type=int, default=32 if gpu else 8)
    p.add_argument("--kv-heads", type=int, default=8 if gpu else 4)
    p.add_argument("--ffn", type=int, default=14336 if gpu else 1536)
    p.add_argument("--vocab", type=int, default=128256 if gpu else 8192)
    p.add_argument("--seq", type=int, default=4096 if gpu else 256)
    p.add_argument("--micro-batch", type=int, default=1 if gpu else 2)
    p.add_argument("--steps", type=int, default=10 if gpu else 4, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2 if gpu else 1)
    p.add_argument("--skip-baseline", action="store_true", help="only the megatron-core step")
    return p.parse_args()


def hf_config(a) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
            "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab, "max_position_embeddings": max(a.seq, 2048),
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
            "initializer_range": 0.02, "hidden_act": "silu"}


def timed(step, warmup: int, steps: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - started) / steps


def megatron_step_fn(spec, a, tokens, labels, mask, dtype):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mathtir.megatron import parallel
    from mathtir.megatron.model import build_model
    from mathtir.train.loss import loss_func

    parallel.initialize(1, 1, seed=0)
    (chunk,) = build_model(spec, params_dtype=dtype, calculate_per_token_loss=True)
    if torch.cuda.is_available():
        chunk.cuda()
    config = chunk.config
    model = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), module=chunk)
    config.no_sync_func, config.finalize_model_grads_func = model.no_sync, finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-5, weight_decay=0.1, clip_grad=1.0, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_distributed_optimizer=True), [model])
    positions = torch.arange(a.seq, device=tokens.device).expand_as(tokens)
    forward_backward = get_forward_backward_func()

    def forward_step(data_iterator, chunk):
        next(data_iterator)
        # attention_mask=None: the plain causal mask (the trainer adds the document mask for packed rows)
        return chunk(tokens, positions, None, labels=labels), lambda out: loss_func(mask, out)

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=forward_step, data_iterator=iter([None]), model=model,
                         num_microbatches=1, seq_length=a.seq, micro_batch_size=a.micro_batch)
        optimizer.step()

    return step


def hf_step_fn(spec, tokens, labels, mask, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_dict(spec.hf_config)).to(tokens.device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=False)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens).logits.float()
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        ((losses * mask.flatten()).sum() / mask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def cpu_matmul_tflops(n: int = 2048, trials: int = 7) -> float:
    """Best of several single GEMMs: on a shared machine the best one is the closest to the real peak."""
    x, y = torch.randn(n, n), torch.randn(n, n)
    x @ y
    best = float("inf")
    for _ in range(trials):
        started = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e12


def main() -> None:
    from mathtir.models.llama import ModelSpec
    from mathtir.train.throughput import PEAK_TFLOPS, train_flops_per_token

    a = parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    spec = ModelSpec.from_hf_config(hf_config(a), source="bench")
    if gpu:
        name = torch.cuda.get_device_name()
        peak, peak_kind = next((v for k, v in PEAK_TFLOPS.items() if k in name), None), "datasheet bf16 dense"
    else:
        name = f"CPU ({torch.get_num_threads()} threads) -- no GPU on this machine; CPU figures"
        peak, peak_kind = cpu_matmul_tflops(), "measured fp32 2048^3 GEMM"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.micro_batch, a.seq), generator=g).to(device)
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones(a.micro_batch, a.seq, device=device)
    tokens_per_step = a.micro_batch * a.seq
    flops_per_step = train_flops_per_token(spec, a.seq) * tokens_per_step
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    results = {}
    runs = [("megatron-core", lambda: megatron_step_fn(spec, a, tokens, labels, mask, dtype))]
    if not a.skip_baseline:
        runs.append(("hf-transformers", lambda: hf_step_fn(spec, tokens, labels, mask, dtype)))
    for label, make in runs:
        seconds = timed(make(), a.warmup, a.steps, sync)
        tflops = flops_per_step / seconds / 1e12
        results[label] = {"step_s": round(seconds, 4), "tokens_per_s": round(tokens_per_step / seconds, 1),
                          "model_tflops": round(tflops, 3), "mfu": round(tflops / peak, 4) if peak else None}
        if gpu:
            results[label]["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()

    shape = {k: getattr(a, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq",
                                        "micro_batch")}
    report = {"device": name, "dtype": str(dtype).removeprefix("torch."), "shape": shape,
              "peak_tflops": round(peak, 3) if peak else None, "peak_kind": peak_kind,
              "params_millions": round(_param_count(spec) / 1e6, 1), "results": results}
    if len(results) == 2:
        report["megatron_over_hf_tokens_per_s"] = round(
            results["megatron-core"]["tokens_per_s"] / results["hf-transformers"]["tokens_per_s"], 3)
    print(json.dumps(report, indent=2))


def _param_count(spec) -> int:
    h = spec.hidden_size
    per_layer = (2 * h * spec.head_dim * spec.num_attention_heads + 2 * h * spec.head_dim * spec.num_kv_heads
                 + 3 * h * spec.ffn_hidden_size + 2 * h)
    return spec.num_layers * per_layer + 2 * h * spec.vocab_size + h


if __name__ == "__main__":
    main()
