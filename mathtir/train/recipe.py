"""Training recipes (nemo_configs/stage*.yaml): the schema of trainer / model / data / optim / checkpoint /
logging sections, loading with ``key=value`` overrides, and validation that fails early naming the key.

    cfg = load_recipe("nemo_configs/stage1_cot.yaml", ["trainer.max_steps=10", "model.init_from=ckpt/"])
    validate_parallelism(cfg, world_size=8, num_attention_heads=32, num_query_groups=8, num_layers=32)

The sbatch scripts ask `python -m mathtir.train.recipe needs-single-cuda-connection RECIPE [key=value ...]`
(exit 0: yes) whether to export CUDA_DEVICE_MAX_CONNECTIONS=1 (`needs_single_cuda_connection`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, DictConfig

from mathtir.recipes import check, load_structured


@dataclass
class TrainerConfig:
    max_epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps even if epochs remain (smoke runs)
    seed: int = 1234  # model-parallel RNG (dropout) and the data order
    precision: str = "bf16-mixed"  # "bf16-mixed" or "fp32"; on CPU the trainer always runs fp32
    log_every_n_steps: int = 1
    progress_bar: bool | None = None  # None: only when stderr is a terminal


@dataclass
class ModelConfig:
    init_from: str = MISSING  # checkpoint root: imported (convert/hf_to_megatron.py) or a previous stage's
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    global_batch_size: int = 8
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # auto | te | sdpa | flex | local (docs/attention.md); auto: te with Transformer Engine on a GPU, else sdpa
    attention_backend: str = "auto"
    # Activation recompute: null (none), selective (attention's core only) or full (whole layers, then
    # recompute_method uniform|block and recompute_num_layers are required)
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    overlap_grad_reduce: bool = False  # DP gradient reduce-scatter/all-reduce overlapped with backward
    overlap_param_gather: bool = False  # distributed optimizer's param all-gather overlapped with forward
    fused_kernels: bool = True  # every fused kernel this machine has (bias-SwiGLU, RoPE, masked softmax)


@dataclass
class DataConfig:
    train_dir: str = MISSING  # packed shards written by `python -m mathtir.data prepare`
    seq_length: int = 4096  # must equal the shards' packed length (checked at start)


@dataclass
class SchedConfig:
    name: str = "CosineAnnealing"  # "CosineAnnealing" or "constant"
    warmup_steps: int = 0  # linear warmup from 0, in optimizer steps
    min_lr: float = 0.0  # the cosine ends here at the last step


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # not applied to biases and norm weights (megatron's default groups)
    clip_grad: float = 1.0  # global L2 norm; 0 disables clipping
    use_distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks
    sched: SchedConfig = field(default_factory=SchedConfig)


@dataclass
class CheckpointConfig:
    dir: str = MISSING  # this run's checkpoint root; a later stage's model.init_from points here
    save_every_n_steps: int = 0  # 0: only at the end and on the Slurm signal
    resume: bool = True  # continue from the latest checkpoint in `dir` when there is one


@dataclass
class LoggingConfig:
    tensorboard_dir: str | None = None  # None: <checkpoint.dir>/tensorboard
    peak_tflops_per_device: float | None = None  # for the MFU estimate; None: built-in table (H100/H200/CPU)


@dataclass
class RecipeConfig:
    name: str = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


PRECISIONS = ("bf16-mixed", "fp32")
SCHEDULES = ("CosineAnnealing", "constant")
OPTIMIZERS = ("adamw",)
RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load a recipe, apply ``key=value`` overrides, fill the schema defaults and validate the values."""
    cfg = load_structured(path, RecipeConfig, overrides, schema_home="mathtir/train/recipe.py")
    validate_values(cfg, str(path))
    return cfg


def validate_values(cfg: DictConfig, source: str = "recipe") -> None:
    """Checks that need only the recipe itself."""
    t, m, o, s = cfg.trainer, cfg.model, cfg.optim, cfg.optim.sched
    check(t.precision in PRECISIONS, source, "trainer.precision", f"'{t.precision}' is not one of {PRECISIONS}")
    check(t.max_epochs >= 1, source, "trainer.max_epochs", "must be >= 1")
    check(t.max_steps is None or t.max_steps >= 1, source, "trainer.max_steps", "must be >= 1 or null")
    check(t.log_every_n_steps >= 1, source, "trainer.log_every_n_steps", "must be >= 1")
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                "global_batch_size"):
        check(m[key] >= 1, source, f"model.{key}", f"must be >= 1, got {m[key]}")
    vp = m.virtual_pipeline_model_parallel_size
    check(vp is None or (vp >= 2 and m.pipeline_model_parallel_size >= 2), source,
           "model.virtual_pipeline_model_parallel_size", "needs pipeline_model_parallel_size >= 2 and a value >= 2")
    check(not m.sequence_parallel or m.tensor_model_parallel_size > 1, source, "model.sequence_parallel",
           "needs tensor_model_parallel_size > 1")
    check(cfg.data.seq_length >= 2, source, "data.seq_length", "must be >= 2")
    validate_model_knobs(cfg, source)
    check(o.name in OPTIMIZERS, source, "optim.name", f"'{o.name}' is not one of {OPTIMIZERS}")
    check(o.lr > 0, source, "optim.lr", "must be > 0")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), source, "optim.betas",
           f"must be two numbers in [0, 1), got {list(o.betas)}")
    check(o.weight_decay >= 0 and o.clip_grad >= 0 and o.eps > 0, source, "optim",
           "weight_decay and clip_grad must be >= 0, eps > 0")
    check(s.name in SCHEDULES, source, "optim.sched.name", f"'{s.name}' is not one of {SCHEDULES}")
    check(s.warmup_steps >= 0, source, "optim.sched.warmup_steps", "must be >= 0")
    check(0 <= s.min_lr <= o.lr, source, "optim.sched.min_lr", f"must be in [0, optim.lr={o.lr}]")
    check(cfg.checkpoint.save_every_n_steps >= 0, source, "checkpoint.save_every_n_steps", "must be >= 0")


def validate_model_knobs(cfg: DictConfig, source: str = "recipe") -> None:
    """Attention backend, recompute and overlap keys: each value, and the combinations that cannot work."""
    from mathtir.megatron.attention import BACKENDS

    m, o = cfg.model, cfg.optim
    check(m.attention_backend in BACKENDS, source, "model.attention_backend",
          f"'{m.attention_backend}' is not one of {BACKENDS}")
    check(not (m.attention_backend == "flex" and m.attention_dropout > 0), source,
          "model.attention_backend", "flex has no attention dropout; model.attention_dropout must be 0 with it")
    granularity, method, layers = m.recompute_granularity, m.recompute_method, m.recompute_num_layers
    check(granularity in RECOMPUTE_GRANULARITIES, source, "model.recompute_granularity",
          f"'{granularity}' is not one of null, selective, full")
    check(method is None or method in RECOMPUTE_METHODS, source, "model.recompute_method",
          f"'{method}' is not one of {RECOMPUTE_METHODS} or null")
    check(layers is None or layers >= 1, source, "model.recompute_num_layers", f"must be >= 1 or null, got {layers}")
    if granularity == "full":
        check(method is not None and layers is not None, source, "model.recompute_granularity",
              "full recompute needs model.recompute_method (uniform|block) and model.recompute_num_layers")
    else:
        check(method is None and layers is None, source, "model.recompute_method",
              f"model.recompute_method and model.recompute_num_layers apply only to "
              f"model.recompute_granularity=full (it is {granularity})")
    check(not m.overlap_param_gather or o.use_distributed_optimizer, source, "model.overlap_param_gather",
          "needs optim.use_distributed_optimizer=true (it overlaps the distributed optimizer's all-gather)")
    check(not m.overlap_param_gather or m.overlap_grad_reduce, source, "model.overlap_param_gather",
          "needs model.overlap_grad_reduce=true (megatron overlaps the gather only with the reduce)")


def needs_single_cuda_connection(cfg: DictConfig) -> bool:
    """Tensor parallelism with sequence parallel overlaps its all-gather/reduce-scatter with the GEMMs only
    if the GPU runs kernels in the order they were queued: CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron's rule)."""
    return cfg.model.tensor_model_parallel_size > 1 and cfg.model.sequence_parallel


def validate_parallelism(cfg: DictConfig, *, world_size: int, num_attention_heads: int, num_query_groups: int,
                         num_layers: int, source: str = "recipe") -> int:
    """Checks that need the launch size and the model architecture; returns the data-parallel size."""
    m = cfg.model
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    check(world_size % (tp * pp) == 0, source, "model.tensor_model_parallel_size",
           f"TP={tp} x PP={pp} = {tp * pp} does not divide the {world_size} launched ranks")
    check(num_attention_heads % tp == 0, source, "model.tensor_model_parallel_size",
           f"TP={tp} does not divide the model's {num_attention_heads} attention heads")
    check(num_query_groups % tp == 0, source, "model.tensor_model_parallel_size",
           f"TP={tp} does not divide the model's {num_query_groups} key/value heads")
    stages = pp * (m.virtual_pipeline_model_parallel_size or 1)
    check(num_layers % stages == 0, source, "model.pipeline_model_parallel_size",
           f"{num_layers} layers do not split evenly over {stages} pipeline stages")
    if m.recompute_granularity == "full":
        per_chunk = num_layers // stages
        check(m.recompute_num_layers <= per_chunk, source, "model.recompute_num_layers",
              f"{m.recompute_num_layers} is more than the {per_chunk} layers of each of the {stages} pipeline "
              "stage(s) (model.pipeline_model_parallel_size x virtual stages)")
    dp = world_size // (tp * pp)
    check(m.global_batch_size % (m.micro_batch_size * dp) == 0, source, "model.global_batch_size",
           f"global batch {m.global_batch_size} is not divisible by micro batch {m.micro_batch_size} x "
           f"data-parallel size {dp} = {m.micro_batch_size * dp}")
    if m.virtual_pipeline_model_parallel_size:
        microbatches = m.global_batch_size // (m.micro_batch_size * dp)
        check(microbatches % pp == 0, source, "model.global_batch_size",
               f"the interleaved pipeline needs the {microbatches} micro-batches per step to divide by PP={pp}")
    return dp


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "needs-single-cuda-connection":
        sys.exit("usage: python -m mathtir.train.recipe needs-single-cuda-connection RECIPE [key=value ...]")
    sys.exit(0 if needs_single_cuda_connection(load_recipe(sys.argv[2], sys.argv[3:])) else 1)
