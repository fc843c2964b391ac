"""Stage 1 / stage 2 SFT on megatron-core: a Trainer whose steps are named methods (torchtitan's shape).

    Trainer(cfg).run() = setup() -> load() -> step() for each remaining step, save() when due -> close()

setup: the recipe checked against the model and the data (before any process group starts), then process
groups, the model chunk(s) for this rank's TP/PP position, megatron's DDP, optimizer and LR schedule.
load: weights from an imported checkpoint or a previous stage, or this run's own latest checkpoint when
resuming (then also optimizer, schedule, data position and RNG streams).

Parallelism is applied from outside the model: mathtir.megatron.model builds the GPTModel chunk(s), megatron's
DDP wraps them for data parallelism, and megatron's pipeline schedule runs the micro-batches. The loss is the
exact per-token mean over every trained token of the global batch (all micro-batches, DP ranks and PP stages):
the loss function returns (masked sum, token count) and megatron divides the gradients by the global count
(`calculate_per_token_loss`).

Data order (mathtir.train.batches.SampleStream): step k consumes stream positions [k*G, (k+1)*G) of the
seeded epoch permutations for global batch G; data rank d takes its contiguous G/DP slice, cut into
micro-batches. So the samples of a step never depend on the TP/PP/DP layout, and resuming needs only the step.

Exit on request: on SIGTERM (what Slurm sends every task at a preemption with GraceTime, and before the kill at
the time limit or on scancel), on SIGUSR1 (`--signal=USR1@N`), or when the file named by $MATHTIR_STOP_FILE
appears (slurm/common.sh creates it when the batch shell is signalled), the trainer finishes the step in flight,
saves a checkpoint, writes "<stop file>.saved" and exits 0; the batch script then requeues the job. Any rank's
signal stops all ranks after the same step (the flags are all-reduced every step).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from mathtir.memory import release_free_heap
from mathtir.recipes import ConfigError
from mathtir.shards import PackedDataset
from mathtir.train.batches import SampleStream, attention_mask_for
from mathtir.train.loss import global_loss, loss_func
from mathtir.train.recipe import validate_parallelism
from mathtir.train.throughput import peak_tflops, train_flops_per_token

RESOLVED_CONFIG_FILE = "resolved_config.yaml"


@dataclass(frozen=True)
class Schedule:
    """How the packed sequences become optimizer steps."""

    global_batch: int
    micro_batch: int
    micro_batches_per_step: int
    steps_in_epochs: int  # what the epochs hold; the LR schedule spans these even when max_steps stops early
    total_steps: int
    dropped: int  # sequences of the final epoch that do not fill a batch


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        m = cfg.model
        self.tp, self.pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
        self.vp = m.virtual_pipeline_model_parallel_size
        self.run_root = Path(cfg.checkpoint.dir)
        self.start_step = 0
        self.stop_signal: str | None = None

    def _on_stop_signal(self, signum, _frame) -> None:
        # Only a flag: the handler runs between bytecodes, possibly inside a step; the loop acts on it.
        self.stop_signal = signal.Signals(signum).name

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._check_inputs()
        self._init_processes()
        self._build_model()
        self._build_optimizer()
        self._write_resolved_config()

    def _write_resolved_config(self) -> None:
        """The recipe as this run applies it, with what was decided at start (attention backend, fused
        kernels, layout, versions), to <checkpoint.dir>/resolved_config.yaml and the log."""
        import megatron.core

        from mathtir.files import atomic_write_text

        resolved = OmegaConf.to_container(self.cfg, resolve=True)
        # read back from megatron's own config objects: what the model and DDP really run with
        config, ddp_config = self.chunks[0].config, self.model[0].ddp_config
        resolved["resolved"] = {
            "attention_backend": self.attention_backend,
            "fused_kernels": {name: getattr(config, name) for name in self.fusions},
            "recompute": {name: getattr(config, name) for name in
                          ("recompute_granularity", "recompute_method", "recompute_num_layers")},
            "overlap": {name: getattr(ddp_config, name) for name in ("overlap_grad_reduce", "overlap_param_gather")},
            "core_attention": type(self.chunks[0].decoder.layers[0].self_attention.core_attention).__name__,
            "tensor_parallel": self.tp, "pipeline_parallel": self.pp, "data_parallel": self.dp,
            "virtual_pipeline": self.vp, "world_size": self.world_size, "device": str(self.device),
            "params_dtype": str(self.params_dtype).removeprefix("torch."),
            "torch": str(torch.__version__), "megatron_core": megatron.core.__version__,
            "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
        }
        if self.rank != 0:
            return
        text = OmegaConf.to_yaml(OmegaConf.create(resolved))
        self.run_root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_root / RESOLVED_CONFIG_FILE, text)
        self.log(f"mathtir.train: resolved config ({self.run_root / RESOLVED_CONFIG_FILE}):\n{text.rstrip()}")

    def _check_inputs(self) -> None:
        """Everything that can be refused from the recipe, the model's config and the data alone."""
        from mathtir.megatron import checkpoint
        from mathtir.megatron.model import resolve_attention_backend
        from mathtir.models.llama import ModelSpec

        cfg, m = self.cfg, self.cfg.model
        try:
            self.attention_backend = resolve_attention_backend(m.attention_backend)
        except ValueError as exc:
            raise ConfigError(f"model.attention_backend={m.attention_backend}: {exc}") from exc
        resume_iteration = checkpoint.latest_iteration(self.run_root) if cfg.checkpoint.resume else None
        self.resuming = resume_iteration is not None
        self.init_root = self.run_root if self.resuming else Path(m.init_from)
        if checkpoint.latest_iteration(self.init_root) is None:
            raise ConfigError(f"model.init_from: {self.init_root} has no checkpoint (latest_checkpointed_iteration"
                              ".txt); import one with `mathtir convert import` or point at a finished stage")
        self.spec = ModelSpec.from_dir(self.init_root)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.dp = validate_parallelism(cfg, world_size=self.world_size, num_attention_heads=self.spec.num_attention_heads,
                                       num_query_groups=self.spec.num_kv_heads, num_layers=self.spec.num_layers)
        self.dataset = PackedDataset(cfg.data.train_dir)
        if self.dataset.seq_length != cfg.data.seq_length:
            raise ConfigError(f"data.seq_length={cfg.data.seq_length} but {cfg.data.train_dir} is packed to "
                              f"{self.dataset.seq_length} tokens")
        if m.sequence_parallel and self.dataset.seq_length % self.tp:
            raise ConfigError(f"data.seq_length={self.dataset.seq_length} must divide by TP={self.tp} for sequence "
                              "parallel")
        global_batch, micro_batch = m.global_batch_size, m.micro_batch_size
        stream_length = len(self.dataset) * cfg.trainer.max_epochs
        steps_in_epochs = stream_length // global_batch
        total_steps = min(steps_in_epochs, cfg.trainer.max_steps or steps_in_epochs)
        if total_steps < 1:
            raise ConfigError(f"{cfg.data.train_dir}: {len(self.dataset)} packed sequences x {cfg.trainer.max_epochs} "
                              f"epoch(s) is less than one global batch of {global_batch}")
        self.schedule = Schedule(global_batch, micro_batch, global_batch // (micro_batch * self.dp), steps_in_epochs,
                                 total_steps, stream_length - steps_in_epochs * global_batch)

    def _init_processes(self) -> None:
        from megatron.core import parallel_state as mpu

        from mathtir.megatron import compat, parallel

        self.on_gpu = torch.cuda.is_available()
        # Exact resume with megatron's torch-AdamW fallback (no Apex/TE), on GPUs as on CPUs (where
        # parallel.initialize installs it with the rest of the CPU layer); a no-op with Apex/TE.
        compat.fix_torch_adam_checkpoints()
        parallel.initialize(self.tp, self.pp, seed=self.cfg.trainer.seed, vp=self.vp)
        self.rank = dist.get_rank()
        self.dp_rank, self.dp_group = mpu.get_data_parallel_rank(), mpu.get_data_parallel_group()
        self.is_last_stage = mpu.is_pipeline_last_stage(ignore_virtual=True)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self.bf16 = self.on_gpu and self.cfg.trainer.precision == "bf16-mixed"
        self.params_dtype = torch.bfloat16 if self.bf16 else torch.float32
        if self.cfg.trainer.precision == "bf16-mixed" and not self.on_gpu:
            self.log("mathtir.train: no GPU, running fp32 (trainer.precision=bf16-mixed applies on GPUs)")

    def _build_model(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        from mathtir.megatron.model import build_model, fused_kernels

        m = self.cfg.model
        # The interleaved (virtual) pipeline with the default batched p2p trains silently wrong: unbatched p2p.
        p2p = dict(overlap_p2p_comm=True, batch_p2p_comm=False) if self.vp else {}
        recompute = dict(recompute_granularity=m.recompute_granularity, recompute_method=m.recompute_method,
                         recompute_num_layers=m.recompute_num_layers)
        self.fusions = fused_kernels(m.fused_kernels)
        self.chunks = build_model(self.spec, params_dtype=self.params_dtype, sequence_parallel=m.sequence_parallel,
                                  hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
                                  attention_backend=self.attention_backend, calculate_per_token_loss=True,
                                  **recompute, **self.fusions, **p2p)  # per-token loss: the exact global mean
        if self.on_gpu:  # megatron builds most weights on the GPU already; the torch norms land on the CPU otherwise
            for chunk in self.chunks:
                chunk.cuda(torch.cuda.current_device())
        model_config = self.chunks[0].config
        self.use_te_packing = self.attention_backend == "te"
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=m.overlap_grad_reduce,
                                                   overlap_param_gather=m.overlap_param_gather,
                                                   use_distributed_optimizer=self.cfg.optim.use_distributed_optimizer)
        self.model = [DistributedDataParallel(config=model_config, ddp_config=ddp_config, module=chunk,
                                              disable_bucketing=i > 0) for i, chunk in enumerate(self.chunks)]
        model_config.no_sync_func = [c.no_sync for c in self.model] if len(self.model) > 1 else self.model[0].no_sync
        model_config.finalize_model_grads_func = finalize_model_grads
        if m.overlap_grad_reduce:  # the schedule starts each chunk's bucket reduce as its grads are ready
            grad_sync = [c.start_grad_sync for c in self.model]
            model_config.grad_sync_func = grad_sync if len(self.model) > 1 else grad_sync[0]
        # overlap_param_gather needs nothing here: DDP's forward pre-hooks wait for each bucket's params.

    def _build_optimizer(self) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.pipeline_parallel import get_forward_backward_func

        o, s = self.cfg.optim, self.schedule
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.sched.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.clip_grad,
            bf16=self.bf16, params_dtype=self.params_dtype, use_distributed_optimizer=o.use_distributed_optimizer),
            self.model)
        # The schedule spans the epochs even when max_steps stops early, so a smoke run sees the real LR shape.
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.sched.min_lr, lr_warmup_steps=o.sched.warmup_steps,
            lr_decay_steps=max(s.steps_in_epochs, o.sched.warmup_steps + 1),
            lr_decay_style="cosine" if o.sched.name == "CosineAnnealing" else "constant",
            start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=s.steps_in_epochs,
            wd_incr_style="constant")
        self.forward_backward = get_forward_backward_func()
        self.stream = SampleStream(self.dataset, self.cfg.trainer.seed)

    # ------------------------------------------------------------------------------------------------- load
    def load(self) -> None:
        """Weights from `init_root`; when resuming this run, also optimizer, schedule, data position, RNG."""
        from megatron.core import tensor_parallel
        from megatron.core.dist_checkpointing import load_common_state_dict

        from mathtir.megatron import checkpoint

        self.layout = [self.tp, self.pp, self.dp]
        self.resumed_layout = None
        if self.resuming:
            common = load_common_state_dict(str(checkpoint.iteration_to_read(self.run_root, None)))
            self.resumed_layout = common["data"]["layout"]
        loaded = checkpoint.load(self.init_root, self._sharded_state(loading=True))
        checkpoint.load_into(self.chunks, loaded["model"], self.init_root)
        if not self.resuming:
            self.log(f"mathtir.train: initialised from {self.init_root} "
                     f"(iteration {checkpoint.latest_iteration(self.init_root)})")
            return
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["scheduler"])
        self.start_step = int(loaded["data"]["step"])
        saved = {k: loaded["data"][k] for k in ("global_batch_size", "seed", "num_sequences")}
        expected = {"global_batch_size": self.schedule.global_batch, "seed": self.cfg.trainer.seed,
                    "num_sequences": len(self.dataset)}
        if saved != expected:
            raise ConfigError(f"{self.run_root}: checkpoint was written with {saved}; resuming exactly needs the "
                              "same global batch, seed and data (or set checkpoint.resume=false and a new dir)")
        if "rng" in loaded:
            _restore_rng(loaded["rng"], self.dp_rank, tensor_parallel)
        else:
            self.log(f"mathtir.train: checkpoint layout TP/PP/DP={self.resumed_layout}, now {self.layout}: weights, "
                     "optimizer and data position resharded; RNG streams reseeded (they are per rank)")
        self.log(f"mathtir.train: resumed {self.run_root} at step {self.start_step}")

    def _sharded_state(self, loading: bool) -> dict:
        """The checkpoint's sharded entries for this rank: model, and for this run's own checkpoints the
        optimizer and (for the layout that wrote them) the RNG streams."""
        from megatron.core import parallel_state as mpu
        from megatron.core import tensor_parallel

        from mathtir.megatron import checkpoint

        model_state = checkpoint.model_sharded_state_dict(self.chunks)
        state = {"model": model_state}
        if loading and not self.resuming:
            return state  # a new stage: weights only
        state["optimizer"] = checkpoint.optimizer_sharded_state_dict(self.optimizer, model_state, loading=loading)
        # Per-rank RNG streams only mean something for the layout that wrote them.
        if not loading or self.resumed_layout == self.layout:
            state["rng"] = _sharded_rng_state(mpu, tensor_parallel, self.dp_group)
        return state

    # ------------------------------------------------------------------------------------------------- step
    def step(self, step: int) -> dict:
        """One optimizer step over the global batch of `step`; returns its metrics (known on every rank)."""
        s = self.schedule
        started = time.perf_counter()
        for c in self.model:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        first = step * s.global_batch + self.dp_rank * (s.global_batch // self.dp)
        batches = self.stream.micro_batches(first, s.micro_batches_per_step, s.micro_batch)
        reduced = self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=[iter(batches) for _ in self.model] if self.vp else iter(batches),
            model=self.model if self.vp else self.model[0], num_microbatches=s.micro_batches_per_step,
            seq_length=self.dataset.seq_length, micro_batch_size=s.micro_batch, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used; the scheduler then moves it
        self.scheduler.step(increment=1)
        loss, trained_tokens = global_loss(reduced, self.is_last_stage, self.dp_group, self.device)
        return {"loss": loss, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                "trained_tokens": trained_tokens, "step_time_s": time.perf_counter() - started}

    def _forward_step(self, data_iterator, chunk):
        batch = next(data_iterator)
        device = self.device
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        # RoPE is relative, so positions need no reset at document starts; only the mask keeps documents apart.
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        doc_offsets, seq_length = batch["doc_offsets"], tokens.shape[1]
        if self.use_te_packing:  # TE's varlen kernels: the micro-batch as one row of documents, no s x s mask
            packed = _packed_seq_params(doc_offsets, seq_length, device)
            per_token_loss = chunk(tokens.reshape(1, -1), position_ids.reshape(1, -1), None,
                                   labels=labels.reshape(1, -1), packed_seq_params=packed)
            return per_token_loss, partial(loss_func, batch["loss_mask"].to(device))
        attention_mask = attention_mask_for(self.attention_backend, doc_offsets, seq_length)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        per_token_loss = chunk(tokens, position_ids, attention_mask, labels=labels)
        return per_token_loss, partial(loss_func, batch["loss_mask"].to(device))

    # ------------------------------------------------------------------------------------------------- save
    def save(self, step: int) -> None:
        from mathtir.megatron import checkpoint

        release_free_heap()
        if self.cfg.model.overlap_param_gather:  # the step's updated params are gathered only by the next forward
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)
        state = self._sharded_state(loading=False)
        state["scheduler"] = self.scheduler.state_dict()
        state["data"] = {"step": step, "consumed_samples": step * self.schedule.global_batch,
                         "global_batch_size": self.schedule.global_batch, "seed": self.cfg.trainer.seed,
                         "num_sequences": len(self.dataset), "layout": self.layout}
        state["args"] = OmegaConf.to_container(self.cfg, resolve=True)
        checkpoint.save(self.run_root, step, state, spec=self.spec, tokenizer_src=self.init_root)
        self.log(f"mathtir.train: saved {self.run_root} iteration {step}")

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> int:
        # Trapped first thing: a signal during setup or load is then honoured after the first step rather than
        # killing the rank (or being lost where the launcher left it ignored, see slurm/common.sh). The
        # previous handlers come back afterwards, for callers that train in-process.
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in STOP_SIGNALS}
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        self.setup()
        self.load()
        cfg, s = self.cfg, self.schedule
        self.log(f"mathtir.train: {len(self.dataset)} packed sequences of {self.dataset.seq_length} tokens x "
                 f"{cfg.trainer.max_epochs} epoch(s) = {s.steps_in_epochs} steps of {s.global_batch} (TP={self.tp} "
                 f"PP={self.pp} DP={self.dp}, {s.micro_batches_per_step} micro-batches of {s.micro_batch} per rank); "
                 f"the last {s.dropped} sequence(s) of the final epoch do not fill a batch and are not trained on; "
                 f"running steps {self.start_step}..{s.total_steps - 1}")
        tokens_per_step = s.global_batch * self.dataset.seq_length
        flops_per_step = train_flops_per_token(self.spec, self.dataset.seq_length) * tokens_per_step
        peak = peak_tflops(cfg.logging.peak_tflops_per_device, self.on_gpu)
        self.tensorboard = _tensorboard(cfg, self.rank)
        self.progress = _progress_bar(cfg, self.rank, self.start_step, s.total_steps)
        stop_file = os.environ.get("MATHTIR_STOP_FILE")
        save_every = cfg.checkpoint.save_every_n_steps
        last_saved = self.start_step if self.resuming else None
        for step in range(self.start_step, s.total_steps):
            release_free_heap()  # what the last step freed stays with the heap: a rank grew 1.3 -> 1.9 GB in 8 steps
            metrics = self.step(step)
            done = step + 1
            if done % cfg.trainer.log_every_n_steps == 0:
                elapsed = metrics["step_time_s"]
                self._report(done, {
                    "step": done, "epoch": round(done * s.global_batch / len(self.dataset), 4),
                    "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                    "trained_tokens": metrics["trained_tokens"], "tokens_per_s": round(tokens_per_step / elapsed, 1),
                    "mfu": round(flops_per_step / elapsed / self.world_size / (peak * 1e12), 4) if peak else None,
                    "step_time_s": round(elapsed, 4), "memory_gb": round(_memory_gb(self.on_gpu), 3)})
            if self.progress:
                self.progress.update(1)
                self.progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            stop_requested = _any_rank(self.stop_signal is not None
                                       or (stop_file is not None and self.rank == 0 and os.path.exists(stop_file)))
            if done == s.total_steps or stop_requested or (save_every and done % save_every == 0):
                if last_saved != done:
                    self.save(done)
                    last_saved = done
            if stop_requested and done < s.total_steps:
                if self.rank == 0 and stop_file is not None:
                    Path(stop_file + ".saved").write_text(f"iteration {done}\n")
                cause = f"{self.stop_signal} received" if self.stop_signal else "stop file or another rank's signal"
                self.log(f"mathtir.train: stop requested ({cause}): checkpoint {done} saved, exiting for the requeue")
                break
        self.close()
        return 0

    def _report(self, step: int, record: dict) -> None:
        """One JSON line per logged step on rank 0 (the job log), and the same scalars to TensorBoard."""
        if self.rank != 0:
            return
        print(json.dumps(record), flush=True)
        if self.tensorboard:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb"):  # None: not measured
                if record[key] is not None:
                    self.tensorboard.add_scalar(f"train/{key}", record[key], step)

    def close(self) -> None:
        if self.progress:
            self.progress.close()
        if self.tensorboard:
            self.tensorboard.close()
        dist.barrier()

    def log(self, message: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(message, file=sys.stderr, flush=True)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def train(cfg: DictConfig) -> int:
    return Trainer(cfg).run()


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
