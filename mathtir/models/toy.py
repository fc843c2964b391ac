"""Tiny random Llama checkpoints for tests and demos.

`initializer_range` defaults to 0.2: with the usual 0.02 the attention logits are so flat that wrong RoPE,
a wrong causal mask or a mis-ordered QKV fusion barely move the output and parity checks pass anyway.
"""

from __future__ import annotations

from pathlib import Path

TOY_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def write_toy_llama(
    out_dir: str | Path, *, tokenizer_from: str | Path | None = None, seed: int = 0, **config_overrides
) -> Path:
    """Save a random fp32 `LlamaForCausalLM` (safetensors + config.json + generation_config.json) to `out_dir`.

    `config_overrides` are `LlamaConfig` fields (e.g. `rope_parameters={...}`, `tie_word_embeddings=True`).
    With `tokenizer_from` (an HF directory) its tokenizer and chat template are copied and the vocabulary
    size and bos/eos/pad ids are taken from it, so generated text decodes.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = {**TOY_DEFAULTS, **config_overrides}
    tokenizer = None
    if tokenizer_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        fields.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
        )
    config = LlamaConfig(**fields)
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
