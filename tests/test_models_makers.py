"""The model makers every other component's tests stand on: SmolLM2 from its GGUF, tiny random Llamas."""

from __future__ import annotations

import json

import pytest
import torch


def test_smollm2_dir_is_a_plain_bf16_llama_that_answers(smollm2_hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mathtir.models.smollm2 import materialize

    cfg = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg  # a GGUF leftover would make transformers treat it as quantized
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    gen = json.loads((smollm2_hf_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (cfg["bos_token_id"], cfg["eos_token_id"])
    assert materialize(smollm2_hf_dir) == smollm2_hf_dir  # idempotent: a finished dir is returned as is

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir)
    assert model.dtype == torch.bfloat16
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == cfg["eos_token_id"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in prompt
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, ids.shape[1]:])


def test_materialize_refuses_a_half_written_directory(tmp_path):
    from mathtir.models.smollm2 import materialize

    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a complete SmolLM2 directory"):
        materialize(tmp_path / "partial")


def test_toy_llama_takes_tokenizer_ids_and_overrides(tmp_path, smollm2_hf_dir):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from mathtir.models.toy import write_toy_llama

    d = write_toy_llama(tmp_path / "toy", tokenizer_from=smollm2_hf_dir, tie_word_embeddings=True, seed=3)
    tok = AutoTokenizer.from_pretrained(d)
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.vocab_size == len(tok) == 49152
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert cfg.tie_word_embeddings and tok.chat_template
    model = LlamaForCausalLM.from_pretrained(d)
    # initializer_range 0.2 (not 0.02) so that RoPE/mask/fusion bugs move the logits visibly
    assert 0.15 < model.model.layers[0].self_attn.q_proj.weight.std().item() < 0.25
    again = write_toy_llama(tmp_path / "toy2", tokenizer_from=smollm2_hf_dir, tie_word_embeddings=True, seed=3)
    assert torch.equal(LlamaForCausalLM.from_pretrained(again).lm_head.weight, model.lm_head.weight)
