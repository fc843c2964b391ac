"""ModelSpec: what HF configs the builder accepts, and the clear refusals for what it cannot represent."""

from __future__ import annotations

import json

import pytest

from mathtir.models.llama import ModelSpec, UnsupportedModelError

LLAMA31 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128009,
}


def test_transformers4_style_llama31_config_is_read_completely():
    spec = ModelSpec.from_hf_config(LLAMA31)
    assert (spec.num_kv_heads, spec.head_dim, spec.rope_theta, spec.rope_type) == (8, 128, 500000.0, "llama3")
    assert spec.padded_vocab_size(1) == spec.padded_vocab_size(8) == 128256  # already a multiple of 128
    spec.check_parallel(8, 4)


def test_odd_vocab_is_padded_identically_for_power_of_two_tp():
    spec = ModelSpec.from_hf_config({**LLAMA31, "vocab_size": 250})
    assert spec.padded_vocab_size(1) == spec.padded_vocab_size(2) == 256  # TP-independent: reshardable
    assert spec.padded_vocab_size(3) % 3 == 0 and spec.padded_vocab_size(3) >= 250


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM"),
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "Qwen2ForCausalLM"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ],
)
def test_unsupported_fields_are_refused_by_name(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        ModelSpec.from_hf_config({**LLAMA31, **change})


def test_missing_field_and_bad_parallel_split_name_the_field(tmp_path):
    cfg = dict(LLAMA31)
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"config.json.*intermediate_size"):
        ModelSpec.from_dir(tmp_path)
    spec = ModelSpec.from_hf_config({**LLAMA31, "num_key_value_heads": 2})
    with pytest.raises(UnsupportedModelError, match="TP=4 does not divide num_key_value_heads=2"):
        spec.check_parallel(4, 1)
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers=32 is not divisible by PP"):
        spec.check_parallel(1, 3)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelSpec.from_dir(tmp_path / "nowhere")
