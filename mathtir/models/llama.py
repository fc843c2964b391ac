"""Llama-family HF `config.json` -> megatron-core `TransformerConfig` + `GPTModel`.

Covers what llm-jp-4, Llama-3.x/Swallow and SmolLM2 use: GQA, SwiGLU, RMSNorm, RoPE with any base and
Llama-3 scaling with any factors, tied or untied embeddings. Anything else in the config that would change
the computation is refused by name rather than silently approximated.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# Vocabulary rows are padded to a multiple of this (and of TP). A TP-independent multiple keeps the
# global embedding shape equal across TP sizes, so a checkpoint written at TP=2 loads at TP=1.
VOCAB_PAD_MULTIPLE = 128


class UnsupportedModelError(ValueError):
    """The HF config describes something this converter/builder cannot represent exactly."""


@dataclass(frozen=True)
class ModelSpec:
    """The validated architecture; `hf_config` is kept verbatim as the source of truth for export."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    rope_type: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    initializer_range: float
    bos_token_id: int | list[int] | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    hf_config: dict = field(repr=False, compare=False, hash=False)
    source: str = "config"

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelSpec:
        """From an HF model dir (config.json) or a mathtir checkpoint root (hf_config.json)."""
        path = Path(path)
        for name in ("config.json", "hf_config.json"):
            if (path / name).is_file():
                cfg_file = path / name
                break
        else:
            raise FileNotFoundError(f"{path}: no config.json (HF model dir) or hf_config.json (mathtir checkpoint)")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
        return cls.from_hf_config(cfg, source=str(cfg_file))

    @classmethod
    def from_hf_config(cls, cfg: dict, *, source: str = "config") -> ModelSpec:
        def need(key):
            if key not in cfg:
                raise UnsupportedModelError(f"{source}: required field {key!r} is missing")
            return cfg[key]

        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type != "llama" or any(a not in SUPPORTED_ARCHITECTURES for a in archs):
            raise UnsupportedModelError(
                f"{source}: architecture {archs or model_type!r} (model_type={model_type!r}) is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'llama')"
            )
        refuse = {
            "hidden_act": (cfg.get("hidden_act", "silu"), "silu"),
            "attention_bias": (bool(cfg.get("attention_bias", False)), False),
            "mlp_bias": (bool(cfg.get("mlp_bias", False)), False),
            "pretraining_tp": (cfg.get("pretraining_tp", 1), 1),
        }
        for key, (value, wanted) in refuse.items():
            if value != wanted:
                raise UnsupportedModelError(f"{source}: field {key}={value!r} is not supported (only {wanted!r})")

        rope = rope_parameters(cfg)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"{source}: field rope_parameters.rope_type={rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if rope_type == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in rope:
                    raise UnsupportedModelError(f"{source}: llama3 rope scaling lacks field {key!r}")
        if "rope_theta" not in rope:
            raise UnsupportedModelError(f"{source}: required field 'rope_theta' is missing")

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise UnsupportedModelError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            ffn_hidden_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope["rope_theta"]),
            rope_type=rope_type,
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            hf_config=cfg,
            source=source,
        )

    def padded_vocab_size(self, tp: int) -> int:
        multiple = math.lcm(VOCAB_PAD_MULTIPLE, tp)
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tp: int, pp: int, vp: int | None = None) -> None:
        """Refuse splits megatron cannot do exactly for this model, naming the field that fails."""
        for name, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.ffn_hidden_size),
        ):
            if value % tp:
                raise UnsupportedModelError(f"{self.source}: TP={tp} does not divide {name}={value}")
        stages = pp * (vp or 1)
        if self.num_layers % stages:
            raise UnsupportedModelError(
                f"{self.source}: num_hidden_layers={self.num_layers} is not divisible by PP*VP={stages}"
            )

    def hf_inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies exactly as transformers computes them (incl. llama3 scaling)."""
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        inv_freq = LlamaRotaryEmbedding(LlamaConfig.from_dict(self.hf_config)).inv_freq
        return inv_freq.detach().float().clone().as_subclass(torch.Tensor)  # nn.Buffer -> plain tensor


def rope_parameters(cfg: dict) -> dict:
    """transformers 5 writes `rope_parameters`; 4.x configs carry `rope_theta` + `rope_scaling`."""
    if cfg.get("rope_parameters"):
        return dict(cfg["rope_parameters"])
    rope = dict(cfg.get("rope_scaling") or {})
    if "rope_theta" in cfg:
        rope["rope_theta"] = cfg["rope_theta"]
    else:
        rope.setdefault("rope_theta", 10000.0)
    return rope


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
        # Fusions need Apex/TE kernels; they are exact-equivalent opt-ins on GPU via overrides.
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


def layer_block_spec(config, *, use_te: bool, vp_stage: int | None):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
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
    use_te: bool | None = None,
    meta: bool = False,
    **config_overrides,
) -> list:
    """One `GPTModel` chunk per virtual pipeline stage of this rank (usually one), on the current device,
    or with `meta` on the meta device: shapes and sharding without memory, e.g. as a checkpoint's template.

    TP/PP/VP sizes come from megatron's parallel state (mathtir.distributed.initialize). `config_overrides`
    go to `TransformerConfig` (e.g. recompute_granularity, calculate_per_token_loss).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from mathtir import cpu_compat

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    spec.check_parallel(tp, pp, vp)
    config = transformer_config(spec, tp=tp, pp=pp, vp=vp, params_dtype=params_dtype,
                                sequence_parallel=sequence_parallel,
                                perform_initialization=perform_initialization, **config_overrides)
    use_te = te_available() if use_te is None else use_te
    inv_freq = spec.hf_inv_freq()
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        # Tied embeddings across pipeline stages all-reduce the weight through a literal `.cuda()`.
        with cpu_compat.cuda_on_cpu(), torch.device("meta") if meta else contextlib.nullcontext():
            model = GPTModel(
                config=config,
                transformer_layer_spec=layer_block_spec(config, use_te=use_te, vp_stage=stage),
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
