"""Stage 1 / stage 2 SFT on megatron-core: one readable training loop (torchtitan style).

    torchrun --nproc-per-node=N -m mathtir.train nemo_configs/stage1_cot.yaml [key=value ...]
    (or `sbatch slurm/stage1_cot.sh`, which runs exactly this on every node)

Top to bottom: recipe -> process groups -> model (from an imported checkpoint or a previous stage, or this
run's own latest checkpoint when resuming) -> DDP + optimizer + LR schedule -> the step loop -> checkpoints.

Parallelism is applied from outside the model: mathtir.models.llama builds the megatron GPTModel chunk(s) for
this rank's tensor/pipeline position, megatron's DDP wraps them for data parallelism, and megatron's pipeline
schedule runs the micro-batches. The loss is the exact per-token mean over every trained token of the global
batch (all micro-batches, DP ranks and PP stages): the loss function returns (masked sum, token count) and
megatron divides the gradients by the global count (`calculate_per_token_loss`).

Data order: the packed sequences form one stream, epoch after epoch, each epoch a seeded permutation
(mathtir.data.loader.epoch_order). Step k consumes stream positions [k*G, (k+1)*G) for global batch G; data
rank d takes its contiguous G/DP slice, cut into micro-batches. So the samples of a step never depend on the
TP/PP/DP layout, and resuming needs only the step number.

Exit on request: when the file named by $MATHTIR_STOP_FILE appears (slurm/common.sh creates it on the Slurm
signal), the trainer saves a checkpoint, writes "<stop file>.saved" and exits 0; the batch script requeues.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from mathtir.config import ConfigError, load_recipe, validate_parallelism

# Peak dense bf16 TFLOP/s per device for the MFU estimate (None: unknown, MFU not reported).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        return train(load_recipe(argv[0], argv[1:]))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"mathtir.train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: DictConfig) -> int:
    # megatron-core imports are deferred so `--help` and config errors stay fast.
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mathtir import checkpoint, cpu_compat, distributed
    from mathtir.data.loader import PackedDataset, collate, epoch_order
    from mathtir.models.llama import ModelSpec, build_model, te_available

    m, o = cfg.model, cfg.optim
    tp, pp, vp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.virtual_pipeline_model_parallel_size

    # ---------------------------------------------------------------- where the weights come from
    run_root = Path(cfg.checkpoint.dir)
    resume_iteration = checkpoint.latest_iteration(run_root) if cfg.checkpoint.resume else None
    init_root = run_root if resume_iteration is not None else Path(m.init_from)
    if checkpoint.latest_iteration(init_root) is None:
        raise ConfigError(f"model.init_from: {init_root} has no checkpoint (latest_checkpointed_iteration.txt); "
                          "import one with convert/hf_to_megatron.py or point at a finished stage")
    spec = ModelSpec.from_dir(init_root)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp = validate_parallelism(cfg, world_size=world_size, num_attention_heads=spec.num_attention_heads,
                              num_query_groups=spec.num_kv_heads, num_layers=spec.num_layers)
    dataset = PackedDataset(cfg.data.train_dir)
    if dataset.seq_length != cfg.data.seq_length:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} but {cfg.data.train_dir} is packed to "
                          f"{dataset.seq_length} tokens")
    if m.sequence_parallel and dataset.seq_length % tp:
        raise ConfigError(f"data.seq_length={dataset.seq_length} must divide by TP={tp} for sequence parallel")

    # ---------------------------------------------------------------- processes, precision
    on_gpu = torch.cuda.is_available()
    cpu_compat.activate()  # on CPU: megatron's hard-coded CUDA calls land on the CPU (a no-op on GPUs)
    # Exact resume with megatron's torch-AdamW fallback (no Apex/TE), on CPU and GPU alike; a no-op otherwise.
    cpu_compat.fix_torch_adam_checkpoints()
    distributed.initialize(tp, pp, seed=cfg.trainer.seed, vp=vp)
    rank = dist.get_rank()
    dp_rank, dp_group = mpu.get_data_parallel_rank(), mpu.get_data_parallel_group()
    is_last_stage = mpu.is_pipeline_last_stage(ignore_virtual=True)
    bf16 = on_gpu and cfg.trainer.precision == "bf16-mixed"
    params_dtype = torch.bfloat16 if bf16 else torch.float32
    log = partial(_log, rank == 0)
    if cfg.trainer.precision == "bf16-mixed" and not on_gpu:
        log("mathtir.train: no GPU, running fp32 (trainer.precision=bf16-mixed applies on GPUs)")

    # ---------------------------------------------------------------- model, DDP, optimizer, schedule
    # The interleaved (virtual) pipeline with the default batched p2p trains silently wrong: unbatched p2p.
    p2p = dict(overlap_p2p_comm=True, batch_p2p_comm=False) if vp else {}
    chunks = build_model(spec, params_dtype=params_dtype, sequence_parallel=m.sequence_parallel,
                         hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
                         calculate_per_token_loss=True, **p2p)  # the exact global per-token mean
    if on_gpu:  # megatron builds most weights on the GPU already; the torch norms land on the CPU otherwise
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    model_config = chunks[0].config
    use_te_packing = te_available()
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=o.use_distributed_optimizer)
    model = [DistributedDataParallel(config=model_config, ddp_config=ddp_config, module=chunk,
                                     disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    model_config.no_sync_func = [c.no_sync for c in model] if len(model) > 1 else model[0].no_sync
    model_config.finalize_model_grads_func = finalize_model_grads

    with cpu_compat.cuda_on_cpu():  # megatron's optimizer asserts CUDA tensor types
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.sched.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.clip_grad,
            bf16=bf16, params_dtype=params_dtype, use_distributed_optimizer=o.use_distributed_optimizer), model)

    global_batch, micro_batch = m.global_batch_size, m.micro_batch_size
    micro_batches_per_step = global_batch // (micro_batch * dp)
    stream_length = len(dataset) * cfg.trainer.max_epochs
    steps_in_epochs = stream_length // global_batch
    total_steps = min(steps_in_epochs, cfg.trainer.max_steps or steps_in_epochs)
    if total_steps < 1:
        raise ConfigError(f"{cfg.data.train_dir}: {len(dataset)} packed sequences x {cfg.trainer.max_epochs} "
                          f"epoch(s) is less than one global batch of {global_batch}")
    # The schedule spans the epochs even when max_steps stops early, so a smoke run sees the real LR shape.
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.sched.min_lr, lr_warmup_steps=o.sched.warmup_steps,
        lr_decay_steps=max(steps_in_epochs, o.sched.warmup_steps + 1),
        lr_decay_style="cosine" if o.sched.name == "CosineAnnealing" else "constant",
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=steps_in_epochs, wd_incr_style="constant")

    # ---------------------------------------------------------------- load weights (and state when resuming)
    layout = [tp, pp, dp]
    resumed_layout = None
    if init_root == run_root:
        from megatron.core.dist_checkpointing import load_common_state_dict

        common = load_common_state_dict(str(checkpoint.iteration_dir(run_root, resume_iteration)))
        resumed_layout = common["data"]["layout"]

    @cpu_compat.cuda_on_cpu()  # the distributed optimizer gathers its state through CUDA buffers
    def checkpoint_state(loading: bool) -> dict:
        model_state = checkpoint.model_sharded_state_dict(chunks)
        state = {"model": model_state}
        if loading and init_root != run_root:
            return state  # a new stage: weights only
        # fully_reshardable: the optimizer state can be loaded at another TP/PP (dp_reshardable cannot);
        # mem_efficient: gathered over gloo onto DP rank 0 only, not onto every rank (memory).
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=loading, metadata={
            "distrib_optim_sharding_type": "fully_reshardable",
            "distrib_optim_fully_reshardable_mem_efficient": True})
        # Per-rank RNG streams only mean something for the layout that wrote them.
        if not loading or resumed_layout == layout:
            state["rng"] = _sharded_rng_state(mpu, tensor_parallel, dp_group)
        return state

    start_step = 0
    template = checkpoint_state(loading=True)
    loaded = checkpoint.load(init_root, template)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model"] if len(chunks) == 1 else loaded["model"][f"vp{i}"])
    if init_root == run_root:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        start_step = int(loaded["data"]["step"])
        saved = {k: loaded["data"][k] for k in ("global_batch_size", "seed", "num_sequences")}
        if saved != {"global_batch_size": global_batch, "seed": cfg.trainer.seed, "num_sequences": len(dataset)}:
            raise ConfigError(f"{run_root}: checkpoint was written with {saved}; resuming exactly needs the same "
                              "global batch, seed and data (or set checkpoint.resume=false and a new dir)")
        if "rng" in loaded:
            _restore_rng(loaded["rng"], dp_rank, tensor_parallel)
        else:
            log(f"mathtir.train: checkpoint layout TP/PP/DP={resumed_layout}, now {layout}: weights, optimizer and "
                "data position resharded; RNG streams reseeded (they are per rank)")
        log(f"mathtir.train: resumed {run_root} at step {start_step}")
    else:
        log(f"mathtir.train: initialised from {init_root} (iteration {checkpoint.latest_iteration(init_root)})")
    del loaded, template

    def save(step: int) -> None:
        state = checkpoint_state(loading=False)
        state["scheduler"] = scheduler.state_dict()
        state["data"] = {"step": step, "consumed_samples": step * global_batch, "global_batch_size": global_batch,
                         "seed": cfg.trainer.seed, "num_sequences": len(dataset), "layout": layout}
        state["args"] = OmegaConf.to_container(cfg, resolve=True)
        checkpoint.save(run_root, step, state, spec=spec, tokenizer_src=init_root)
        log(f"mathtir.train: saved {run_root} iteration {step}")

    # ---------------------------------------------------------------- data: the seeded sample stream
    orders: dict[int, list[int]] = {}

    def sample_at(position: int) -> dict:
        epoch, index = divmod(position, len(dataset))
        if epoch not in orders:
            orders.clear()
            orders[epoch] = epoch_order(len(dataset), epoch, cfg.trainer.seed)
        return dataset[orders[epoch][index]]

    def micro_batches(step: int) -> list[dict]:
        first = step * global_batch + dp_rank * (global_batch // dp)
        return [collate([sample_at(first + mb * micro_batch + j) for j in range(micro_batch)])
                for mb in range(micro_batches_per_step)]

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        # RoPE is relative, so positions need no reset at document starts; only the mask keeps documents apart.
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        if use_te_packing:  # TE's varlen kernels: the micro-batch as one row of documents, no s x s mask
            packed = _packed_seq_params(batch["doc_offsets"], tokens.shape[1], device)
            per_token_loss = chunk(tokens.reshape(1, -1), position_ids.reshape(1, -1), None,
                                   labels=labels.reshape(1, -1), packed_seq_params=packed)
        else:
            per_token_loss = chunk(tokens, position_ids, batch["attention_mask"].to(device), labels=labels)
        return per_token_loss, partial(loss_func, batch["loss_mask"].to(device))

    # ---------------------------------------------------------------- the loop
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    forward_backward = get_forward_backward_func()
    tokens_per_step = global_batch * dataset.seq_length
    flops_per_step = _train_flops_per_token(spec, dataset.seq_length) * tokens_per_step
    peak = _peak_tflops(cfg, on_gpu)
    dropped = stream_length - steps_in_epochs * global_batch
    log(f"mathtir.train: {len(dataset)} packed sequences of {dataset.seq_length} tokens x {cfg.trainer.max_epochs} "
        f"epoch(s) = {steps_in_epochs} steps of {global_batch} (TP={tp} PP={pp} DP={dp}, {micro_batches_per_step} "
        f"micro-batches of {micro_batch} per rank); the last {dropped} sequence(s) of the final epoch do not fill a "
        f"batch and are not trained on; running steps {start_step}..{total_steps - 1}")
    tensorboard = _tensorboard(cfg, rank)
    progress = _progress_bar(cfg, rank, start_step, total_steps)
    stop_file = os.environ.get("MATHTIR_STOP_FILE")
    save_every = cfg.checkpoint.save_every_n_steps
    last_saved = start_step if init_root == run_root else None

    for step in range(start_step, total_steps):
        started = time.perf_counter()
        for c in model:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        batches = micro_batches(step)
        with cpu_compat.cuda_on_cpu():
            reduced = forward_backward(
                forward_step_func=forward_step, data_iterator=[iter(batches) for _ in model] if vp else iter(batches),
                model=model if vp else model[0], num_microbatches=micro_batches_per_step,
                seq_length=dataset.seq_length, micro_batch_size=micro_batch, forward_only=False)
            _, grad_norm, _ = optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used; the scheduler then moves it
        scheduler.step(increment=1)
        loss, trained_tokens = _global_loss(reduced, is_last_stage, dp_group, mpu, device)
        elapsed = time.perf_counter() - started
        done = step + 1

        if rank == 0 and done % cfg.trainer.log_every_n_steps == 0:
            record = {
                "step": done, "epoch": round(done * global_batch / len(dataset), 4), "loss": loss,
                "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                "trained_tokens": trained_tokens, "tokens_per_s": round(tokens_per_step / elapsed, 1),
                "mfu": round(flops_per_step / elapsed / world_size / (peak * 1e12), 4) if peak else None,
                "step_time_s": round(elapsed, 4), "memory_gb": round(_memory_gb(on_gpu), 3),
            }
            print(json.dumps(record), flush=True)
            if tensorboard:
                for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb"):  # None: not measured
                    if record[key] is not None:
                        tensorboard.add_scalar(f"train/{key}", record[key], done)
        if progress:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")

        stop_requested = _any_rank(stop_file is not None and rank == 0 and os.path.exists(stop_file))
        if done == total_steps or stop_requested or (save_every and done % save_every == 0):
            if last_saved != done:
                save(done)
                last_saved = done
        if stop_requested and done < total_steps:
            if rank == 0:
                Path(stop_file + ".saved").write_text(f"iteration {done}\n")
            log(f"mathtir.train: stop requested: checkpoint {done} saved, exiting for the requeue")
            break

    if progress:
        progress.close()
    if tensorboard:
        tensorboard.close()
    dist.barrier()
    return 0


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(sum of trained-token losses, trained-token count, for logging): megatron's per-token loss contract.

    megatron does not ignore any label value (not even -100): the 0/1 mask is what excludes prompt, padding
    and cross-document tokens.
    """
    mask = loss_mask.reshape(-1).float()
    masked_sum = (per_token_loss.reshape(-1).float() * mask).sum()
    count = mask.sum()
    return masked_sum, count.to(torch.int), {"lm loss": torch.stack([masked_sum.detach(), count])}


def _global_loss(reduced: list[dict], is_last_stage: bool, dp_group, mpu, device) -> tuple[float, int]:
    """The step's per-token mean loss over the whole global batch, known on every rank."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if is_last_stage:
        for item in reduced:
            totals += item["lm loss"].to(torch.float64)
        dist.all_reduce(totals, group=dp_group)
    # Only the last pipeline stage has the loss; the others contribute zeros.
    dist.all_reduce(totals, group=mpu.get_pipeline_model_parallel_group())
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(t.item())


def _cpu_group():
    """A gloo group for small control messages (works under NCCL too)."""
    global _CONTROL_GROUP
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return _CONTROL_GROUP


_CONTROL_GROUP = None


def _packed_seq_params(doc_offsets: list[torch.Tensor], seq_length: int, device):
    """thd-format boundaries for a micro-batch flattened to one row: every document of every packed sequence,
    plus each sequence's padding tail as its own segment (so the boundaries cover every position)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    bounds = []
    for row, offsets in enumerate(doc_offsets):
        row_bounds = offsets.tolist()
        if row_bounds[-1] < seq_length:
            row_bounds.append(seq_length)
        bounds.extend(row * seq_length + b for b in (row_bounds if row == 0 else row_bounds[1:]))
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _sharded_rng_state(mpu, tensor_parallel, dp_group):
    """This rank's RNG streams, gathered over DP into one object per (PP, TP) position (megatron's layout)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    gathered = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(gathered, state, group=dp_group)
    pp_rank, tp_rank = mpu.get_pipeline_model_parallel_rank(), mpu.get_tensor_model_parallel_rank()
    return ShardedObject("rng_state", gathered,
                         (mpu.get_pipeline_model_parallel_world_size(), mpu.get_tensor_model_parallel_world_size()),
                         (pp_rank, tp_rank), replica_id=mpu.get_data_parallel_rank())


def _restore_rng(per_dp_rank: list[dict], dp_rank: int, tensor_parallel) -> None:
    state = per_dp_rank[dp_rank]
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _train_flops_per_token(spec, seq_length: int) -> float:
    """Model FLOPs per trained token, forward + backward: 6 x (matmul parameters) + attention scores.

    Matmul parameters: attention projections (q, o: h x q_dim each; k, v: h x kv_dim each), SwiGLU (3 x h x ffn) per
    layer, and the output layer (h x vocab). Attention: 12 x layers x h x s (QK^T and AV, fwd + bwd, full s x s
    as computed with a mask).
    """
    h, layers, ffn = spec.hidden_size, spec.num_layers, spec.ffn_hidden_size
    q_dim, kv_dim = spec.head_dim * spec.num_attention_heads, spec.head_dim * spec.num_kv_heads
    per_layer = 2 * h * q_dim + 2 * h * kv_dim + 3 * h * ffn
    return 6.0 * (layers * per_layer + h * spec.vocab_size) + 12.0 * layers * h * seq_length


def _peak_tflops(cfg: DictConfig, on_gpu: bool) -> float | None:
    if cfg.logging.peak_tflops_per_device:
        return float(cfg.logging.peak_tflops_per_device)
    if not on_gpu:
        return None  # no meaningful table value for CPUs; set logging.peak_tflops_per_device to get an MFU
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _memory_gb(on_gpu: bool) -> float:
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _tensorboard(cfg: DictConfig, rank: int):
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(cfg.logging.tensorboard_dir or str(Path(cfg.checkpoint.dir) / "tensorboard"))


def _progress_bar(cfg: DictConfig, rank: int, start: int, total: int):
    interactive = cfg.trainer.progress_bar if cfg.trainer.progress_bar is not None else sys.stderr.isatty()
    if rank != 0 or not interactive:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", file=sys.stderr)


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":  # dist_checkpointing's writer starts spawn-mode processes: keep the guard
    sys.exit(main())
