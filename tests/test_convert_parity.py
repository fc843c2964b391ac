"""HF <-> megatron parity on tiny random Llamas, across TP=1/2 and PP=2, in one torchrun launch.

One 2-rank launch (each costs ~7 s of imports) runs every configuration: import at TP=2 and at PP=2,
load at TP=1 and TP=2 (torch_dist resharding), fp32 logits against transformers, and export back to HF
bit-exact. Configs use initializer_range 0.2 so RoPE, mask and QKV/fc1 layout bugs move logits by >1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0, "low_freq_factor": 2.0,
               "high_freq_factor": 8.0, "original_max_position_embeddings": 64}
CONFIGS = {
    # name: write_toy_llama overrides
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, vocab_size=256),
    "gqa_tied_llama3_oddvocab": dict(num_key_value_heads=2, tie_word_embeddings=True, vocab_size=250,
                                     rope_parameters=LLAMA3_ROPE),
    "gqa4to1_untied_llama3_headdim": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=12,
                                          vocab_size=300, rope_parameters={**LLAMA3_ROPE, "factor": 16.0}),
}
TOLERANCE = 1e-4  # fp32 logits, issue 4


def _worker(base: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from mathtir.convert import exporter, importer, verify
    from mathtir.megatron import parallel
    from mathtir.models.toy import write_toy_llama

    parallel.initialize(1, 1, seed=0)
    rank = parallel.rank()
    if rank == 0:
        for name, overrides in CONFIGS.items():
            write_toy_llama(base / name / "hf", seed=len(name), **overrides)
    parallel.barrier()

    results: dict[str, dict] = {}

    def logits_diff(name: str, ckpt: Path) -> float:
        hf_dir = base / name / "hf"
        spec, chunks = verify.load_megatron(ckpt, dtype=torch.float32)
        ref_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        worst = 0.0
        for ids in verify.prompt_ids(hf_dir, spec.vocab_size):
            ours = verify.megatron_logits(chunks, ids, spec.vocab_size)
            with torch.no_grad():
                ref = ref_model(ids).logits
            worst = max(worst, (ours - ref).abs().max().item())
        return worst

    for name in CONFIGS:
        hf_dir, r = base / name / "hf", results.setdefault(name, {})
        parallel.initialize(2, 1, seed=0)
        importer.import_hf(hf_dir, base / name / "tp2", dtype=torch.float32, tp=2, pp=1)
        r["tp2_on_tp2"] = logits_diff(name, base / name / "tp2")
        parallel.initialize(1, 2, seed=0)
        importer.import_hf(hf_dir, base / name / "pp2", dtype=torch.float32, tp=1, pp=2)
        parallel.initialize(1, 1, seed=0)  # two data-parallel replicas: both ranks load the whole model
        r["tp2_on_tp1"] = logits_diff(name, base / name / "tp2")
        r["pp2_on_tp1"] = logits_diff(name, base / name / "pp2")
        out = exporter.export_hf(base / name / "tp2", base / name / f"export_r{rank}")
        src = load_file(str(hf_dir / "model.safetensors"))
        exported = {}
        for f in sorted(out.glob("*.safetensors")):
            exported.update(load_file(str(f)))
        r["export_names_equal"] = sorted(src) == sorted(exported)
        r["export_bit_exact"] = r["export_names_equal"] and all(torch.equal(src[k], exported[k]) for k in src)
        parallel.initialize(2, 1, seed=0)
        r["pp2_on_tp2"] = logits_diff(name, base / name / "pp2")
    if rank == 0:
        (base / "results.json").write_text(json.dumps(results, indent=1))
    parallel.destroy()


@pytest.mark.slow
def test_tiny_llamas_match_hf_at_tp1_tp2_pp2_and_round_trip_bit_exact(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(CONFIGS)
    for name, r in results.items():
        for key in ("tp2_on_tp2", "tp2_on_tp1", "pp2_on_tp1", "pp2_on_tp2"):
            assert r[key] <= TOLERANCE, (name, key, r[key])
        assert r["export_names_equal"] and r["export_bit_exact"], (name, r)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
