"""An export read by transformers 4.57 (the line vLLM 0.11 images pin), in a side virtualenv of its own: the same
tokens and the same logits as the source model read by this environment's transformers 5.

Before the export carried the 4.x config fields, 4.57 read SmolLM2's rope base 100000 as its default 10000
(logits off by whole units: a different model), and failed on the tokenizer class transformers 5 saves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cache_lock

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# torch==2.13.0 is the CPU wheel of this platform's index (any other spec pulls the CUDA build).
OLD_LOADER = ("transformers==4.57.*", "torch==2.13.0")
TEXTS = ["箱に赤い玉が7個と白い玉が5個入っています。", "def f(x):\n    return x ** 2 + 1\nprint(f(3))",
         "<|im_start|>user\n1+1は?<|im_end|>\n"]

READ_WITH_OLD_LOADER = r"""
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, ids_path, out_path = sys.argv[1:]
texts, ids = json.loads(open(ids_path).read())
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
result = {"version": transformers.__version__, "rope_theta": model.config.rope_theta, "logits": logits.tolist()}
try:  # reported, not raised: the model and the tokenizer are checked separately
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result["tokens"] = [tokenizer.encode(t) for t in texts]
except (ValueError, OSError) as exc:
    result["tokenizer_error"] = str(exc)
json.dump(result, open(out_path, "w"))
"""


@pytest.fixture(scope="session")
def old_loader_python(model_cache_dir: Path) -> Path:
    """A virtualenv with transformers 4.57 and nothing of this project, built once per cache directory."""
    venv = model_cache_dir / "venv-transformers-4.57"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    with cache_lock(model_cache_dir, "venv-transformers-4.57"):
        if stamp.is_file() and stamp.read_text() == " ".join(OLD_LOADER):
            return python
        subprocess.run([sys._base_executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *OLD_LOADER], check=True, timeout=1800)
        stamp.write_text(" ".join(OLD_LOADER))
    return python


def _convert(args: list) -> None:
    proc = subprocess.run([sys.executable, "-m", "mathtir", "convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 100000.0},
                                  {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0,
                                   "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                                   "original_max_position_embeddings": 64}], ids=["smollm2-rope", "llama3-rope"])
def test_transformers_457_reads_the_export_as_the_source(old_loader_python, smollm2_hf_dir, tmp_path, rope):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mathtir.convert.verify import logits_tolerance
    from mathtir.models.llama import ModelSpec
    from mathtir.models.toy import write_toy_llama

    source = write_toy_llama(tmp_path / "source", tokenizer_from=smollm2_hf_dir, rope_parameters=rope,
                             max_position_embeddings=512)
    _convert(["import", "--hf-dir", source, "--out", tmp_path / "ckpt", "--dtype", "fp32"])
    _convert(["export", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "export"])

    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = [i for text in TEXTS for i in tokenizer.encode(text)][:200]  # long enough for RoPE to matter
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0]
    (tmp_path / "ids.json").write_text(json.dumps([TEXTS, ids]))
    proc = subprocess.run([str(old_loader_python), "-c", READ_WITH_OLD_LOADER, str(tmp_path / "export"),
                           str(tmp_path / "ids.json"), str(tmp_path / "old.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    old = json.loads((tmp_path / "old.json").read_text())
    assert old["version"].startswith("4.57.")
    assert old["rope_theta"] == rope["rope_theta"]
    spec = ModelSpec.from_hf_config(json.loads((source / "config.json").read_text()))
    tolerance = logits_tolerance(spec, reference.abs().max().item())
    diff = (torch.tensor(old["logits"]) - reference).abs().max().item()
    assert diff <= tolerance, f"logits differ by {diff} > {tolerance}"
    assert "tokenizer_error" not in old, old["tokenizer_error"]
    assert old["tokens"] == [tokenizer.encode(text) for text in TEXTS]
    # and transformers 5 still reads the exported tokenizer as the source's
    exported = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert [exported.encode(text) for text in TEXTS] == old["tokens"]
    messages = [{"role": "user", "content": "1+1は?"}]
    assert (exported.apply_chat_template(messages, tokenize=False)
            == tokenizer.apply_chat_template(messages, tokenize=False))


def test_config_fields_for_both_loader_lines_from_either_spelling():
    from mathtir.convert.exporter import loader_portable_config

    v5 = {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "dtype": "bfloat16"}
    config = loader_portable_config(v5, torch.bfloat16)
    assert (config["rope_theta"], config["rope_scaling"], config["torch_dtype"], config["dtype"]) == (
        100000.0, None, "bfloat16", "bfloat16")
    # a 4.x config with the older "type" key keeps its scaling for 4.x and gains rope_parameters for 5
    v4 = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "float32"}
    config = loader_portable_config(v4, torch.float32)
    assert config["rope_scaling"] == {"type": "linear", "factor": 2.0}
    assert config["rope_parameters"] == {"type": "linear", "factor": 2.0, "rope_theta": 500000.0}
