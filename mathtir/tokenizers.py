"""Tokenizer loading from a local directory, the one way every stage does it (no hub is reachable)."""

from __future__ import annotations

from pathlib import Path

from mathtir.readers import DataError


def load_tokenizer(path: str | Path, *, require_fast: bool = False):
    """The HF tokenizer saved in directory `path` (a model directory or a checkpoint's tokenizer/ copy).

    `require_fast`: refuse tokenizers without a tokenizer.json (data preparation tokenizes in Rust batches and
    reads character offsets). Raises DataError naming the directory."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise DataError(f"{path}: tokenizer directory not found (a local HF model or tokenizer directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot load a tokenizer from this directory ({exc})") from exc
    if require_fast and not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{path}: a fast (Rust) tokenizer is needed; this directory has no tokenizer.json")
    return tokenizer


# Tokenizer classes only transformers 5 knows, and the 4.x class that loads the same tokenizer.json.
_V5_ONLY_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_tokenizer_config(config: dict) -> dict:
    """tokenizer_config.json that transformers 4.x loads too: transformers 5 saves fast tokenizers as
    `TokenizersBackend`, a class 4.x does not have ("Tokenizer class TokenizersBackend does not exist");
    `PreTrainedTokenizerFast` reads the same tokenizer.json in both."""
    config = dict(config)
    if config.get("tokenizer_class") in _V5_ONLY_CLASSES:
        config["tokenizer_class"] = _V5_ONLY_CLASSES[config["tokenizer_class"]]
    return config
