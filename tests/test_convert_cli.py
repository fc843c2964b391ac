"""The converter CLIs as a user runs them: SmolLM2 and a tiny Llama through HF -> Megatron -> HF + verify."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def cli(script: str, *args, expect: int = 0) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "convert" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"{script} exited {proc.returncode}, expected {expect}:\n{out[-6000:]}"
    return out


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def assert_same_weights(src: Path, exported: Path) -> None:
    a, b = hf_tensors(src), hf_tensors(exported)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)


@pytest.fixture(scope="module")
def tiny_tp2_ckpt(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt") / "tiny_tp2"
    out = cli("hf_to_megatron.py", "--hf-dir", tiny_llama_dir, "--out", root, "--tp", 2, "--dtype", "fp32")
    assert "tp=2" in out
    return root


def test_tiny_llama_tp2_round_trip_keeps_weights_tokenizer_and_logits(tiny_llama_dir, tiny_tp2_ckpt, tmp_path):
    from transformers import AutoTokenizer

    assert (tiny_tp2_ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert json.loads((tiny_tp2_ckpt / "hf_config.json").read_text())["vocab_size"] == 49152
    # An iter_N directory works as --ckpt too; export always runs in one process at TP=1.
    cli("megatron_to_hf.py", "--ckpt", tiny_tp2_ckpt / "iter_0000000", "--out", tmp_path / "hf")
    assert_same_weights(tiny_llama_dir, tmp_path / "hf")
    for name in ("chat_template.jinja", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tiny_llama_dir / name).read_bytes(), name
    messages = [{"role": "user", "content": "1+1?"}]
    assert (AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(messages, tokenize=False)
            == AutoTokenizer.from_pretrained(tiny_llama_dir).apply_chat_template(messages, tokenize=False))

    out = cli("verify.py", "--hf-dir", tiny_llama_dir, "--ckpt", tiny_tp2_ckpt, "--tp", 2)
    assert "verify: PASSED" in out and "top5=1.0000" in out and "FAIL" not in out


def test_import_casting_to_bf16_at_tp1_exports_the_cast_weights(tiny_llama_dir, tmp_path):
    # TP=1 without a cast uses the file's own pages; a cast must go through memory of its own.
    assert all(t.dtype == torch.float32 for t in hf_tensors(tiny_llama_dir).values())
    cli("hf_to_megatron.py", "--hf-dir", tiny_llama_dir, "--out", tmp_path / "ckpt", "--dtype", "bf16")
    cli("megatron_to_hf.py", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "hf")
    src, exported = hf_tensors(tiny_llama_dir), hf_tensors(tmp_path / "hf")
    assert sorted(src) == sorted(exported)
    for name, tensor in src.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor.bfloat16()), name


def test_verify_fails_on_a_rewritten_special_token_id(tiny_llama_dir, tiny_tp2_ckpt, tmp_path):
    tampered = tmp_path / "ckpt"
    shutil.copytree(tiny_tp2_ckpt, tampered)
    gen_file = tampered / "tokenizer" / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    gen["eos_token_id"] = 0
    gen_file.write_text(json.dumps(gen))
    out = cli("verify.py", "--hf-dir", tiny_llama_dir, "--ckpt", tampered, expect=1)
    assert "FAIL generation_config.eos_token_id" in out and "verify: FAILED" in out
    assert "ok   logits" in out  # the weights are intact; only the identity check fails


def test_smollm2_round_trip_bit_exact_and_logits_parity(smollm2_hf_dir, tmp_path):
    root = tmp_path / "smollm2"
    cli("hf_to_megatron.py", "--hf-dir", smollm2_hf_dir, "--out", root)  # bf16 by default; PP/TP: parity test
    cli("megatron_to_hf.py", "--ckpt", root, "--out", tmp_path / "hf")
    assert_same_weights(smollm2_hf_dir, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    out = cli("verify.py", "--hf-dir", smollm2_hf_dir, "--ckpt", root)
    assert "verify: PASSED" in out and "ok   tokenizer.chat_template" in out
    # The derived tolerance stays orders of magnitude below what a wrong layout does to the logits (1-10).
    atol = float(re.search(r"\(atol ([0-9.e+-]+), derived\)", out).group(1))
    assert 1e-5 < atol < 1e-2, out


def test_cli_errors_name_the_problem(tiny_llama_dir, tiny_tp2_ckpt, tmp_path):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", no_weights / "config.json")
    out = cli("hf_to_megatron.py", "--hf-dir", no_weights, "--out", tmp_path / "x", expect=2)
    assert "no model.safetensors or model.safetensors.index.json" in out and str(no_weights) in out
    out = cli("hf_to_megatron.py", "--hf-dir", tiny_llama_dir, "--out", tiny_tp2_ckpt, expect=2)
    assert "already holds a checkpoint" in out

    # A checkpoint whose config no longer matches its tensors (another architecture's checkpoint).
    other = tmp_path / "other"
    shutil.copytree(tiny_tp2_ckpt, other)
    cfg = json.loads((other / "hf_config.json").read_text())
    cfg["intermediate_size"] *= 2
    (other / "hf_config.json").write_text(json.dumps(cfg))
    out = cli("megatron_to_hf.py", "--ckpt", other, "--out", tmp_path / "y", expect=2)
    assert re.search(r"decoder\.layers\.mlp\.linear_fc[12]\.weight' has shape \(2, \d+, \d+\) but the model expects", out)
    out = cli("verify.py", "--hf-dir", tiny_llama_dir, "--ckpt", other, expect=2)
    assert re.search(r"verify: error: .*linear_fc[12]\.weight' has shape \(2, \d+, \d+\) but the model expects", out)


def test_hf_side_errors_name_file_and_tensor(tiny_llama_dir, tmp_path):
    from mathtir.convert.safetensors import HFWeights
    from mathtir.megatron.checkpoint import resolve_root
    from mathtir.models.llama import ModelSpec, UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="TP=3 does not divide num_attention_heads=4"):
        ModelSpec.from_dir(tiny_llama_dir).check_parallel(3, 1)
    with pytest.raises(FileNotFoundError, match="not a mathtir checkpoint root"):
        resolve_root(tmp_path / "nowhere")

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 1}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape"):
        HFWeights(bad).check_against(ModelSpec.from_dir(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM"):
        ModelSpec.from_dir(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}))
    with pytest.raises(KeyError, match=r"model\.layers\.2\.input_layernorm\.weight.*missing"):
        HFWeights(bad).check_against(ModelSpec.from_dir(bad))
    (bad / "config.json").write_text(json.dumps(cfg))
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated: tensor '.*' ends at byte \d+, the file has"):
        HFWeights(bad)


def test_checkpoint_regions_read_in_place_or_by_torch_give_torchs_bytes(tiny_tp2_ckpt):
    """Export's reader puts a stored chunk's bytes straight into the destination where they are one run of
    it, or hands out where they lie, and leaves the rest to torch's reader (e.g. TP=2's column halves, a
    cast): all must equal what torch's own load of the whole tensors gives."""
    import torch.distributed.checkpoint as dcp

    from mathtir.convert.torch_dist import PartReader

    reader = PartReader(tiny_tp2_ckpt)
    expected = {key: torch.empty(shape) for key, shape in reader.stored_shapes.items()}  # stored in fp32
    dcp.load(expected, storage_reader=dcp.FileSystemReader(str(reader.dir)), no_dist=True)

    qkv, proj = "decoder.layers.self_attention.linear_qkv.weight", "decoder.layers.self_attention.linear_proj.weight"
    rows = torch.empty(1, 5, reader.stored_shapes[qkv][2])  # layer 1, rows 3..7: inside rank 0's chunk
    reader.read([(qkv, (1, 3, 0), rows)])
    assert reader.in_place_reads == 1 and torch.equal(rows, expected[qkv][1:2, 3:8])

    whole_proj = torch.empty(reader.stored_shapes[proj])  # every layer's two column halves
    reader.read([(proj, (0, 0, 0), whole_proj)])
    assert reader.in_place_reads == 1 and torch.equal(whole_proj, expected[proj])

    cast = torch.empty(reader.stored_shapes[qkv], dtype=torch.bfloat16)
    reader.read([(qkv, (0, 0, 0), cast)])
    assert reader.in_place_reads == 1 and torch.equal(cast, expected[qkv].to(torch.bfloat16))

    everything = {key: torch.full(shape, float("nan")) for key, shape in reader.stored_shapes.items()}
    reader.read([(key, (0,) * t.dim(), t) for key, t in everything.items()])
    assert reader.in_place_reads > 1
    for key, t in everything.items():
        assert torch.equal(t, expected[key]), key

    with pytest.raises(ValueError, match=r"region at \[0, 0, 1\] .* is outside tensor 'decoder\.layers"):
        reader.read([(proj, (0, 0, 1), whole_proj)])

    # Export copies file to file what byte_runs finds: the runs' bytes must be the region, row-major.
    def bytes_of(runs):
        return b"".join(path.read_bytes()[offset:offset + length] for path, offset, length in runs)

    embedding = "embedding.word_embeddings.weight"  # stored as TP=2's two row chunks
    runs = reader.byte_runs(embedding, (0, 0), reader.stored_shapes[embedding], torch.float32)
    assert len(runs) == 2 and bytes_of(runs) == expected[embedding].numpy().tobytes()
    runs = reader.byte_runs(qkv, (1, 3, 0), tuple(rows.shape), torch.float32)
    assert len(runs) == 1 and bytes_of(runs) == expected[qkv][1:2, 3:8].numpy().tobytes()
    assert reader.byte_runs(proj, (0, 0, 0), (1, *reader.stored_shapes[proj][1:]), torch.float32) is None
    assert reader.byte_runs(qkv, (1, 3, 0), tuple(rows.shape), torch.bfloat16) is None


@pytest.mark.parametrize("splice", [True, False])
def test_copy_run_copies_file_ranges_with_or_without_splice(tmp_path, monkeypatch, splice):
    """Export's file-to-file copy, and its fallback where sendfile is refused (EINVAL on some mounts)."""
    from mathtir.convert.safetensors import copy_run

    if not splice:
        def refuse(*_):
            raise OSError(errno.EINVAL, "no splice here")
        monkeypatch.setattr(os, "sendfile", refuse)
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 100)
    with open(src, "rb") as s, open(tmp_path / "out", "wb", buffering=0) as out:
        out.write(b"head")
        copy_run(out.fileno(), s.fileno(), 300, 1000, src)
        copy_run(out.fileno(), s.fileno(), 0, 7, src)
        with pytest.raises(ValueError, match="src: truncated"):
            copy_run(out.fileno(), s.fileno(), 25_590, 20, src)
    data = src.read_bytes()
    assert (tmp_path / "out").read_bytes() == b"head" + data[300:1300] + data[:7] + data[25_590:]
