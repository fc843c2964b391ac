"""A Llama-family HF `config.json`, validated: the architecture every stage reads (the megatron builder in
mathtir/megatron/model.py, the converters, the trainer).

Covers what llm-jp-4, Llama-3.x/Swallow and SmolLM2 use: GQA, SwiGLU, RMSNorm, RoPE with any base and
Llama-3 scaling with any factors, tied or untied embeddings. Anything else in the config that would change
the computation is refused by name rather than silently approximated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

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

    def hf_inv_freq(self):
        """RoPE inverse frequencies exactly as transformers computes them (incl. llama3 scaling), a tensor."""
        import torch
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
