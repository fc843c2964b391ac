"""Is the megatron checkpoint the same model as the HF directory? Identity fields, then logits.

Identity: vocabulary size, bos/eos/pad ids (config, generation config and tokenizer), RoPE parameters, head
dim, KV heads, tie flag — the fields the reference systems' users found silently changed.
Logits: fixed prompts through both models in fp32; max-abs difference against a tolerance derived from the dtype
and the logits' scale (`logits_tolerance`), cosine, and top-1/top-5 agreement.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mathtir.convert.torch_dist import PartReader
from mathtir.megatron import checkpoint
from mathtir.megatron.model import build_model
from mathtir.models.llama import ModelSpec, rope_parameters

PROMPTS = (
    "What is 12 times 7? Answer: ",
    "東京は日本の首都です。富士山の高さは",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
)


@dataclass
class Check:
    field: str
    hf: object
    ckpt: object

    @property
    def ok(self) -> bool:
        return self.hf == self.ckpt


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _special_ids(tokenizer_dir: Path) -> dict:
    """bos/eos/pad ids as the tokenizer resolves them (None where the directory has no tokenizer)."""
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        return {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "len": len(tok),
            "chat_template": bool(tok.chat_template)}


def load_megatron(ckpt: str | Path, *, dtype: torch.dtype | None = None) -> tuple[ModelSpec, list]:
    """Build the model for the current parallel state and load the checkpoint's weights into it, in the
    stored dtype or, if given, in `dtype` (torch_dist casts while loading)."""
    root, iteration = checkpoint.resolve_root(ckpt)
    spec = ModelSpec.from_dir(root)
    dtype = dtype or PartReader(root, iteration).stored_dtype()
    chunks = build_model(spec, params_dtype=dtype, perform_initialization=False, attention_backend="local")
    checkpoint.load_model(root, chunks, iteration)
    return spec, chunks


def identity_checks(hf_dir: str | Path, root: str | Path) -> list[Check]:
    hf_dir, root = Path(hf_dir), Path(root)
    hf = _read_json(hf_dir / "config.json")
    ck = _read_json(root / checkpoint.HF_CONFIG_FILE)
    hf_spec, ck_spec = ModelSpec.from_hf_config(hf, source=str(hf_dir)), ModelSpec.from_hf_config(ck, source=str(root))
    checks = [
        Check("vocab_size", hf_spec.vocab_size, ck_spec.vocab_size),
        Check("bos_token_id", hf.get("bos_token_id"), ck.get("bos_token_id")),
        Check("eos_token_id", hf.get("eos_token_id"), ck.get("eos_token_id")),
        Check("pad_token_id", hf.get("pad_token_id"), ck.get("pad_token_id")),
        Check("rope_parameters", rope_parameters(hf), rope_parameters(ck)),
        Check("head_dim", hf_spec.head_dim, ck_spec.head_dim),
        Check("num_key_value_heads", hf_spec.num_kv_heads, ck_spec.num_kv_heads),
        Check("num_attention_heads", hf_spec.num_attention_heads, ck_spec.num_attention_heads),
        Check("num_hidden_layers", hf_spec.num_layers, ck_spec.num_layers),
        Check("hidden_size", hf_spec.hidden_size, ck_spec.hidden_size),
        Check("tie_word_embeddings", hf_spec.tie_word_embeddings, ck_spec.tie_word_embeddings),
    ]
    tok_dir = root / checkpoint.TOKENIZER_DIR
    hf_gen, ck_gen = _read_json(hf_dir / "generation_config.json"), _read_json(tok_dir / "generation_config.json")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in hf_gen or key in ck_gen:
            checks.append(Check(f"generation_config.{key}", hf_gen.get(key), ck_gen.get(key)))
    hf_tok, ck_tok = _special_ids(hf_dir), _special_ids(tok_dir)
    for key in sorted(set(hf_tok) | set(ck_tok)):
        checks.append(Check(f"tokenizer.{key}", hf_tok.get(key), ck_tok.get(key)))
    if hf_tok:
        # A tokenizer larger than the embedding would index past it.
        checks.append(Check("tokenizer fits vocab_size", True, hf_tok["len"] <= ck_spec.vocab_size))
    return checks


def prompt_ids(hf_dir: str | Path, vocab_size: int) -> list[torch.Tensor]:
    """Token ids of the fixed prompts (random ids, seeded, for directories without a tokenizer)."""
    hf_dir = Path(hf_dir)
    if (hf_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf_dir)
        return [torch.tensor([tok(p).input_ids]) for p in PROMPTS]
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, n), generator=gen) for n in (7, 19, 33, 48)]


def megatron_logits(chunks: list, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits [b, s, vocab] from a TP-sharded, single-stage model (gathered on every rank)."""
    from megatron.core import tensor_parallel

    (model,) = chunks
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, positions, None)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits[..., :vocab_size].float()


# The logits gate's tolerance, derived rather than tuned. Both sides compute in fp32 with different kernels
# (fused QKV, other summation orders): a dot product of length K rounds with a typical relative error of
# sqrt(K) * eps, and the residual stream carries those of every layer, which add up like a random walk
# (sqrt(L)). Scaled by the logits' own magnitude, with a safety factor for the softmax/norm steps in between:
#     atol = SAFETY * eps_fp32 * max|logit| * sqrt(hidden) * sqrt(layers)
# SmolLM2 (576 x 30, logits up to ~30) gets ~2e-3; a wrong weight layout moves logits by 1-10 (a naive QKV
# concat ~11, a wrong SwiGLU split ~11, missing RoPE scaling ~3), three orders of magnitude above it.
FP32_EPS = float(torch.finfo(torch.float32).eps)
TOLERANCE_SAFETY = 4.0


def logits_tolerance(spec: ModelSpec, logit_scale: float) -> float:
    return TOLERANCE_SAFETY * FP32_EPS * logit_scale * math.sqrt(spec.hidden_size) * math.sqrt(spec.num_layers)


def logits_parity(hf_dir: str | Path, ckpt: str | Path) -> dict:
    """Collective over the TP ranks (PP=1). Every rank returns the same figures.

    Top-1/top-5 agreement are counted where they are decided: a position whose reference top-1 (or 5th/6th)
    logits lie within the tolerance of each other may order them either way in float arithmetic."""
    from transformers import LlamaForCausalLM

    spec, chunks = load_megatron(ckpt, dtype=torch.float32)
    for chunk in chunks:
        chunk.eval()
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    pairs = []
    for ids in prompt_ids(hf_dir, spec.vocab_size):
        ours = megatron_logits(chunks, ids, spec.vocab_size)[0]
        with torch.no_grad():
            ref = hf_model(ids).logits[0].float()
        pairs.append((ours, ref))
    tolerance = logits_tolerance(spec, max(ref.abs().max().item() for _, ref in pairs))
    max_abs, min_cos, top1, top5, decided1, decided5, positions = 0.0, 1.0, 0, 0, 0, 0, 0
    for ours, ref in pairs:
        max_abs = max(max_abs, (ours - ref).abs().max().item())
        min_cos = min(min_cos, torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item())
        top6 = ref.topk(6).values
        clear1 = (top6[:, 0] - top6[:, 1]) > 2 * tolerance
        clear5 = (top6[:, 4] - top6[:, 5]) > 2 * tolerance
        top1 += ((ours.argmax(-1) == ref.argmax(-1)) & clear1).sum().item()
        ours5, ref5 = ours.topk(5).indices.sort().values, ref.topk(5).indices.sort().values
        top5 += ((ours5 == ref5).all(-1) & clear5).sum().item()
        decided1, decided5 = decided1 + clear1.sum().item(), decided5 + clear5.sum().item()
        positions += ref.shape[0]
    return {"max_abs_diff": max_abs, "tolerance": tolerance, "min_cosine": min_cos,
            "top1_agreement": top1 / max(decided1, 1), "top5_agreement": top5 / max(decided5, 1),
            "decided_top1": decided1, "positions": positions}
