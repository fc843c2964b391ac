"""The memory a training layout needs per device, from the recipe and the model's config alone (nothing runs):
weights, gradients, optimizer state, activations (without recompute, with selective and with full recompute),
and whether the heaviest rank fits. `mathtir train plan` prints it; the sbatch scripts run it first.

What the trainer allocates, per rank of the heaviest pipeline stage:
- weights: this rank's TP/PP share of the parameters in the training dtype (bf16 on GPUs with bf16-mixed, else
  fp32). A pipeline's first stage holds the embedding, its last the output layer (with tied embeddings and
  PP > 1 the last stage keeps its own copy) and the final norm.
- gradients: megatron's DDP grad buffer, fp32 (the trainer reduces in fp32), one value per weight.
- optimizer: Adam's two moments in fp32, plus an fp32 master copy when the weights are bf16; the distributed
  optimizer shards all of it over the data-parallel ranks.
- activations, per layer and micro-batch of b sequences of s tokens (Korthikanti et al., "Reducing Activation
  Recomputation in Large Transformer Models", adapted to Llama: GQA, SwiGLU, RMSNorm, no dropout by default):
  the two norm inputs and the QKV and FC1 inputs (4sbh, divided by TP with sequence parallel), Q/K/V, the
  attention output, FC1's two halves and SwiGLU's output (s·b·(q + 2kv + q + 3f) / TP), dropout masks when
  dropout is on, and for megatron's unfused local attention the s x s probabilities (fp32 softmax output, and a
  bf16 copy on GPUs) per head; fused attention (TE, SDPA, flex) keeps O(s) instead. "auto" is counted as the
  backend the model builder resolves it to on the planned device (mathtir.megatron.model). Selective recompute
  recomputes core attention (the s x s term goes); full recompute keeps each recompute group's input plus one
  group's activations while it is recomputed. The first stage of a 1F1B pipeline holds PP micro-batches in
  flight (interleaved: more, megatron's warmup count), without a pipeline one micro-batch. The last stage adds
  the logits (fp32 in the vocab-parallel cross entropy, plus the output dtype's copy). Those counts are
  fused kernels'; unfused ops keep more (counted from the tensors autograd saves in a CPU layer): outside
  Transformer Engine's layer spec each RMSNorm its output and an fp32 statistic per token too, RoPE its
  rotated Q and K and the cos/sin tables for each; without megatron's bias-SwiGLU kernel, SwiGLU two more
  FFN-wide tensors.
- checkpoint save (transient, host memory): the optimizer state is saved fully reshardable. With data-parallel
  ranks, it is gathered onto data-parallel rank 0 of each model-parallel group over gloo (fp32 weights and
  both moments) and torch_dist's writer stages a copy of what it writes, besides the weights:
  SAVE_BYTES_PER_PARAM per parameter of the rank. A rank alone in its data-parallel group writes the
  optimizer's own tensors (mathtir.megatron.checkpoint); the writer stages only what are views into DDP's
  parameter buffer: the weights, and with fp32 weights the main params that alias them. On a CPU the save
  comes after the trainer handed the step's freed pages back (mathtir.memory.release_free_heap): weights,
  gradients, optimizer state and overhead plus the save, when that exceeds training's peak. On a GPU node
  it is host RAM, printed but not counted against the GPU. bench/train_memory.py measures both.
- overhead: a fixed per-process amount (GPU: CUDA context, NCCL buffers, cuBLAS workspace; CPU: the Python
  process with torch and megatron imported) and a share for allocator fragmentation. Both are stated constants,
  calibrated on CPU against measured peaks (bench/train_memory.py); the GPU constants are estimates until a GPU
  measurement replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
# The per-process constants (bytes) and the fragmentation share, see the module docstring.
GPU_PROCESS_OVERHEAD = 3.0 * GIB
GPU_FRAGMENTATION = 0.08
CPU_PROCESS_OVERHEAD = 0.55 * GIB
CPU_FRAGMENTATION = 0.10
SAVE_BYTES_PER_PARAM = 2 * 12 + 4  # the gathered fp32 optimizer state, its staged copy, the staged weights
ATTENTION_BACKENDS = ("auto", "te", "sdpa", "flex", "local")
RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = (None, "uniform", "block")


class PlanError(ValueError):
    """A recipe value the planner cannot account for, named by key."""


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vp: int | None
    dp: int
    micro_batch: int
    global_batch: int
    seq_length: int
    sequence_parallel: bool
    distributed_optimizer: bool
    dtype_bytes: int  # 2 for bf16-mixed on GPUs, 4 for fp32
    on_gpu: bool
    fused_attention: bool
    te_layers: bool  # Transformer Engine's layer spec: norms fused into the linears after them, RoPE fused
    fused_swiglu: bool  # megatron's bias-SwiGLU kernel (GPUs, model.fused_kernels)
    recompute_granularity: str | None
    recompute_method: str | None
    recompute_num_layers: int | None
    hidden_dropout: bool
    attention_dropout: bool

    @property
    def micro_batches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)


@dataclass(frozen=True)
class StagePlan:
    """Bytes per rank of one pipeline stage."""

    name: str
    params: int
    weights: int
    gradients: int
    optimizer: int
    activations: dict[str, int]  # "none", "selective", "full": the same stage under each recompute setting
    configured: str  # which of them the recipe runs
    overhead: int
    save: int  # transient host memory while a checkpoint is written
    on_gpu: bool

    @property
    def training(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations[self.configured] + self.overhead

    @property
    def total(self) -> int:
        """The device's peak: on a CPU the save's host memory is the same memory as training's."""
        return self.training if self.on_gpu else max(self.training,
                                                     self.training - self.activations[self.configured] + self.save)


def layout_from_recipe(cfg, *, world_size: int, on_gpu: bool) -> Layout:
    """The layout the trainer would run `cfg` at on `world_size` ranks; recipe keys this branch's schema may not
    have yet (attention backend, recompute) are read when present."""
    m = cfg.model
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    backend = m.get("attention_backend") or "auto"
    if backend not in ATTENTION_BACKENDS:
        raise PlanError(f"model.attention_backend: {backend!r} is not one of {ATTENTION_BACKENDS}")
    granularity = m.get("recompute_granularity")
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise PlanError(f"model.recompute_granularity: {granularity!r} is not one of {RECOMPUTE_GRANULARITIES}")
    method = m.get("recompute_method")
    if method not in RECOMPUTE_METHODS:
        raise PlanError(f"model.recompute_method: {method!r} is not one of {RECOMPUTE_METHODS}")
    if backend == "auto":
        from mathtir.megatron.model import auto_attention_backend

        backend = auto_attention_backend(gpu=on_gpu)
    return Layout(tp=tp, pp=pp, vp=m.virtual_pipeline_model_parallel_size, dp=world_size // (tp * pp),
                  micro_batch=m.micro_batch_size, global_batch=m.global_batch_size, seq_length=cfg.data.seq_length,
                  sequence_parallel=bool(m.sequence_parallel) and tp > 1,
                  distributed_optimizer=bool(cfg.optim.use_distributed_optimizer),
                  dtype_bytes=2 if on_gpu and cfg.trainer.precision == "bf16-mixed" else 4, on_gpu=on_gpu,
                  fused_attention=backend != "local", te_layers=backend == "te",
                  fused_swiglu=on_gpu and bool(m.get("fused_kernels", True)), recompute_granularity=granularity,
                  recompute_method=method or "uniform",
                  recompute_num_layers=m.get("recompute_num_layers") or 1,
                  hidden_dropout=m.hidden_dropout > 0, attention_dropout=m.attention_dropout > 0)


def plan(spec, layout: Layout) -> list[StagePlan]:
    """The first and (when PP > 1) the last pipeline stage: between them they hold the most."""
    L = layout
    h, f, layers = spec.hidden_size, spec.ffn_hidden_size, spec.num_layers
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    vocab = spec.padded_vocab_size(L.tp)
    layer_params = (h * (q + 2 * kv) + q * h + 3 * h * f) // L.tp + 2 * h
    stage_layers = layers // L.pp
    embedding = vocab * h // L.tp
    stages = [("first stage", stage_layers * layer_params + embedding, True, L.pp == 1)]
    if L.pp > 1:
        stages.append(("last stage", stage_layers * layer_params + embedding + h, False, True))
    elif not spec.tie_word_embeddings:
        stages[0] = ("all layers", stages[0][1] + embedding + h, True, True)
    else:
        stages[0] = ("all layers", stages[0][1] + h, True, True)
    return [_stage(name, params, first, last, spec, L) for name, params, first, last in stages]


def _stage(name: str, params: int, first: bool, last: bool, spec, L: Layout) -> StagePlan:
    master = 4 if L.dtype_bytes == 2 else 0  # fp32 master weights exist only beside bf16 weights
    optimizer = params * (8 + master)
    if L.distributed_optimizer:
        optimizer //= L.dp
    per_layer_none, per_layer_input = _layer_activations(spec, L)
    per_layer_selective = per_layer_none - _core_attention_bytes(spec, L)
    chunks_in_flight = _chunks_in_flight(L, first)
    layers_per_chunk = spec.num_layers // (L.pp * (L.vp or 1))
    stored_layers = chunks_in_flight * layers_per_chunk
    every = min(L.recompute_num_layers, layers_per_chunk)
    if L.recompute_method == "block":  # the first `every` layers of each chunk keep only their input
        full_per_chunk = every * per_layer_input + (layers_per_chunk - every) * per_layer_none
        full = chunks_in_flight * full_per_chunk + (every * per_layer_none if every else 0)
    else:  # uniform: a checkpoint every `every` layers, one group live while it is recomputed
        groups = -(-layers_per_chunk // every)
        full = chunks_in_flight * groups * per_layer_input + every * per_layer_none
    extra = _batch_bytes(spec, L) + (_logits_bytes(spec, L) if last else 0)
    activations = {"none": stored_layers * per_layer_none + extra,
                   "selective": stored_layers * per_layer_selective + extra, "full": full + extra}
    configured = {None: "none", "selective": "selective", "full": "full"}[L.recompute_granularity]
    weights, gradients = params * L.dtype_bytes, params * 4
    base = GPU_PROCESS_OVERHEAD if L.on_gpu else CPU_PROCESS_OVERHEAD
    share = GPU_FRAGMENTATION if L.on_gpu else CPU_FRAGMENTATION
    overhead = int(base + share * (weights + gradients + optimizer + activations[configured]))
    if L.distributed_optimizer and L.dp == 1:  # the optimizer's own tensors; staged: views of the param buffer
        save = params * (L.dtype_bytes + (4 if L.dtype_bytes == 4 else 0))
    else:
        save = params * SAVE_BYTES_PER_PARAM
    return StagePlan(name, params, weights, gradients, optimizer, activations, configured, overhead, save, L.on_gpu)


def _layer_activations(spec, L: Layout) -> tuple[int, int]:
    """(bytes one layer keeps for backward for one micro-batch, bytes of the layer's input alone)."""
    s, b, h, f, e = L.seq_length, L.micro_batch, spec.hidden_size, spec.ffn_hidden_size, L.dtype_bytes
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    replicated = 4 * s * b * h * e + (2 * s * b * h if L.hidden_dropout else 0)
    if L.sequence_parallel:
        replicated //= L.tp
    split = s * b * (q + 2 * kv + q + 3 * f) * e // L.tp
    rope_tables = 0
    if not L.te_layers:  # unfused, as measured on CPU: each torch RMSNorm keeps its output besides its input
        # and an fp32 statistic per token, RoPE its rotated copies of Q and K and its cos/sin tables for each
        replicated += (2 * s * b * h * e + 2 * s * b * 4) // (L.tp if L.sequence_parallel else 1)
        split += s * b * (q + kv) * e // L.tp
        rope_tables = 2 * 2 * s * spec.head_dim * 4
    if not L.fused_swiglu:  # the unfused SwiGLU keeps SiLU's output and its product's other factor
        split += 2 * s * b * f * e // L.tp
    layer_input = s * b * h * e // (L.tp if L.sequence_parallel else 1)
    return replicated + split + rope_tables + _core_attention_bytes(spec, L), layer_input


def _core_attention_bytes(spec, L: Layout) -> int:
    s, b, heads = L.seq_length, L.micro_batch, spec.num_attention_heads // L.tp
    if L.fused_attention:
        return 4 * b * heads * s  # the softmax statistics (log-sum-exp) per query
    probs = 4 + (L.dtype_bytes if L.dtype_bytes != 4 else 0)  # fp32 softmax output (+ its bf16 copy on GPUs)
    return b * heads * s * s * (probs + (1 if L.attention_dropout else 0))


def _chunks_in_flight(L: Layout, first: bool) -> int:
    """Model-chunk forward passes whose activations are held at once (megatron's schedules)."""
    if L.pp == 1:
        return 1
    if not first:
        return L.vp or 1
    if L.vp:
        return min(L.micro_batches * L.vp, (L.pp - 1) * 2 + (L.vp - 1) * L.pp + 1)
    return min(L.micro_batches, L.pp)


def _batch_bytes(spec, L: Layout) -> int:
    """The step's micro-batches as the trainer builds them: token/label/mask rows, and for the local attention
    path each sequence's s x s document mask (bool)."""
    s, b, n = L.seq_length, L.micro_batch, L.micro_batches
    return n * b * (3 * 8 * s + (0 if L.fused_attention else s * s))


def _logits_bytes(spec, L: Layout) -> int:
    s, b, vocab = L.seq_length, L.micro_batch, spec.padded_vocab_size(L.tp) // L.tp
    return s * b * vocab * (4 + L.dtype_bytes)


def fits(stages: list[StagePlan], device_bytes: int) -> bool:
    return max(st.total for st in stages) <= device_bytes


def render(stages: list[StagePlan], layout: Layout, device_bytes: int | None, *, nodes: int, per_node: int) -> str:
    L = layout
    kind = "GPU" if L.on_gpu else "CPU rank"
    lines = [f"layout: {nodes} node(s) x {per_node} {kind}(s) = {nodes * per_node} ranks: TP={L.tp} PP={L.pp}"
             f"{f' VP={L.vp}' if L.vp else ''} DP={L.dp}, {L.micro_batches} micro-batch(es) of {L.micro_batch} x "
             f"{L.seq_length} tokens per rank and step; {'bf16' if L.dtype_bytes == 2 else 'fp32'} weights, "
             f"{'distributed' if L.distributed_optimizer else 'replicated'} optimizer, "
             f"{'fused' if L.fused_attention else 'local (s x s)'} attention"
             f"{', sequence parallel' if L.sequence_parallel else ''}"]
    for st in stages:
        a = st.activations
        lines += [f"per {kind} ({st.name}, {st.params / 1e9:.3f} B parameters):",
                  f"  weights              {_gib(st.weights)}",
                  f"  gradients (fp32)     {_gib(st.gradients)}",
                  f"  optimizer state      {_gib(st.optimizer)}",
                  f"  activations, no recompute         {_gib(a['none'])}{_mark(st, 'none')}",
                  f"  activations, selective recompute  {_gib(a['selective'])}{_mark(st, 'selective')}",
                  f"  activations, full recompute       {_gib(a['full'])}{_mark(st, 'full')}",
                  f"  overhead             {_gib(st.overhead)}",
                  f"  training             {_gib(st.training)}",
                  f"  checkpoint save      {_gib(st.save)} transient host memory of data-parallel rank 0"
                  f"{' (counted: the same memory on a CPU)' if not L.on_gpu else ' (not on the GPU)'}",
                  f"  total                {_gib(st.total)}"]
    peak = max(st.total for st in stages)
    if device_bytes is None:
        lines.append(f"peak {_gib(peak)} per {kind}; fit not checked (no device memory given)")
    else:
        verdict = "fits" if peak <= device_bytes else "DOES NOT FIT"
        lines.append(f"peak {_gib(peak)} per {kind} of {_gib(device_bytes)}: {verdict}")
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def _mark(st: StagePlan, which: str) -> str:
    return "   <- configured" if st.configured == which else ""
