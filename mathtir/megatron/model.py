"""The megatron-core `GPTModel` for a Llama `ModelSpec`: its `TransformerConfig`, layer spec (Transformer Engine
where available, else megatron's local layers with torch norms and PyTorch attention kernels) and RoPE frequencies
taken from transformers.

Attention backends (`model.attention_backend`, docs/attention.md): "te" the Transformer Engine spec; "sdpa"
and "flex" the local spec with mathtir.megatron.attention's core attention; "local" megatron's own
`DotProductAttention` (the unfused reference). "auto" is "te" where TE and a GPU are present, else "sdpa".
"""

from __future__ import annotations

import contextlib

import torch

from mathtir.models.llama import ModelSpec


def transformer_config(spec: ModelSpec, *, tp: int, pp: int, vp: int | None, params_dtype: torch.dtype,
                       sequence_parallel: bool, perform_initialization: bool, **overrides):
    from megatron.core.transformer import TransformerConfig

    fields = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        init_method_std=spec.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=perform_initialization,
        # Fusions need Apex/TE kernels or a GPU; `fused_kernels()` turns on those this machine has.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


class TorchRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm that, unlike megatron's WrappedTorchNorm, allows sequence parallelism: its weight is
    tagged so megatron all-reduces its grads over TP (each TP rank saw only part of the sequence)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, device="cpu" if config.use_cpu_initialization else None,
                         dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def te_available() -> bool:
    """Transformer Engine layers and packed attention: only with TE installed and a GPU present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def auto_attention_backend(*, gpu: bool) -> str:
    """The backend "auto" stands for on a machine with or without a GPU: Transformer Engine where it can run
    here, else SDPA. The model builder asks about this machine, the training planner (mathtir.train.plan)
    about the device it plans for (a GPU run planned where TE cannot run gets SDPA: both keep O(s) attention
    memory)."""
    return "te" if gpu and te_available() else "sdpa"


def resolve_attention_backend(requested: str) -> str:
    """The backend `requested` ("auto" resolved) if this machine can run it; ValueError naming why not."""
    from mathtir.megatron.attention import BACKENDS

    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {BACKENDS}")
    if requested == "auto":
        return auto_attention_backend(gpu=torch.cuda.is_available())
    if requested == "te" and not te_available():
        raise ValueError("attention backend 'te' needs Transformer Engine and a GPU; use auto, sdpa or local")
    if requested == "flex" and not torch.cuda.is_available():
        raise ValueError("attention backend 'flex' needs a GPU (flex_attention has no CPU backward); use sdpa")
    return requested


def fused_kernels(enabled: bool) -> dict[str, bool]:
    """The `TransformerConfig` fusion flags: with `enabled`, each fused kernel this machine has (bias-SwiGLU
    on a GPU, RoPE with Transformer Engine, megatron's masked softmax with its CUDA extension); all
    off otherwise. All are exact-equivalent reformulations of the unfused ops."""
    import importlib.util

    gpu = torch.cuda.is_available()
    flags = {
        "bias_activation_fusion": gpu,
        "apply_rope_fusion": te_available(),
        "masked_softmax_fusion": gpu and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
    }
    return {name: enabled and available for name, available in flags.items()}


def layer_block_spec(config, *, attention_backend: str, vp_stage: int | None):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from mathtir.megatron.attention import FlexCoreAttention, SdpaCoreAttention

    if attention_backend == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention_backend in ("sdpa", "flex"):
        core = SdpaCoreAttention if attention_backend == "sdpa" else FlexCoreAttention
        layer.submodules.self_attention.submodules.core_attention = core
    norm = ModuleSpec(module=TorchRMSNorm)
    layer.submodules.input_layernorm = norm
    layer.submodules.pre_mlp_layernorm = norm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=norm
    )


def build_model(
    spec: ModelSpec,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    perform_initialization: bool = True,
    attention_backend: str = "auto",
    meta: bool = False,
    **config_overrides,
) -> list:
    """One `GPTModel` chunk per virtual pipeline stage of this rank (usually one), on the current device,
    or with `meta` on the meta device: shapes and sharding without memory, e.g. as a checkpoint's template.

    TP/PP/VP sizes come from megatron's parallel state (mathtir.megatron.parallel.initialize). `config_overrides`
    go to `TransformerConfig` (e.g. recompute_granularity, calculate_per_token_loss). The converters, which only
    need shapes or a reference forward, pass attention_backend="local".
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    spec.check_parallel(tp, pp, vp)
    config = transformer_config(spec, tp=tp, pp=pp, vp=vp, params_dtype=params_dtype,
                                sequence_parallel=sequence_parallel,
                                perform_initialization=perform_initialization, **config_overrides)
    attention_backend = resolve_attention_backend(attention_backend)
    inv_freq = spec.hf_inv_freq()
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = GPTModel(
                config=config,
                transformer_layer_spec=layer_block_spec(config, attention_backend=attention_backend, vp_stage=stage),
                vocab_size=spec.padded_vocab_size(tp),
                max_sequence_length=spec.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                parallel_output=True,
                share_embeddings_and_output_weights=spec.tie_word_embeddings,
                position_embedding_type="rope",
                # The base must be given here: model.rotary_base is not what RoPE uses.
                rotary_base=spec.rope_theta,
                vp_stage=stage,
            )
        # megatron hard-codes llama3 scaling's low/high factors and original length; use transformers'
        # frequencies for every config so any factors (and the default case) match HF exactly.
        rotary = model.rotary_pos_emb
        rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
        chunks.append(model)
    return chunks
