"""Checkpoint integrity: every file of an iteration has its size and hash (XXH3) recorded by the rank that wrote it,
and export, verify and the trainer's load refuse a damaged one by name (exit 2) instead of reading damage
into the weights or failing in a traceback that names no file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import REPO, tiny_init, tiny_llama4_dir, tiny_shards  # noqa: F401  (session fixtures)

from mathtir.megatron import checkpoint

pytestmark = pytest.mark.slow
SMOKE = REPO / "nemo_configs" / "stage1_cot_smoke.yaml"


def cli(script: str, *args, expect: int) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "convert" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"{script} exited {proc.returncode}, expected {expect}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def tp2_ckpt(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity") / "tp2"
    cli("hf_to_megatron.py", "--hf-dir", tiny_llama_dir, "--out", root, "--tp", 2, "--dtype", "fp32", expect=0)
    return root


def _iteration(root: Path) -> Path:
    return checkpoint.iteration_dir(root, checkpoint.latest_iteration(root))


def _largest_data_file(ckpt_dir: Path) -> Path:
    return max(ckpt_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)


def truncate_distcp(ckpt_dir: Path) -> Path:
    victim = _largest_data_file(ckpt_dir)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    return victim


def empty_metadata(ckpt_dir: Path) -> Path:
    victim = ckpt_dir / ".metadata"
    victim.write_bytes(b"")
    return victim


def flip_4k(ckpt_dir: Path) -> Path:
    """4 KiB of inverted bytes in the middle of a data file: size unchanged, the archive still parses."""
    victim = _largest_data_file(ckpt_dir)
    middle = victim.stat().st_size // 2
    with open(victim, "r+b") as f:
        f.seek(middle)
        block = f.read(4096)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in block))
    return victim


DAMAGE = {"truncated-distcp": truncate_distcp, "empty-metadata": empty_metadata, "flipped-4k": flip_4k}


def damaged_copy(root: Path, tmp_path: Path, damage) -> tuple[Path, Path]:
    copy = tmp_path / "damaged"
    shutil.copytree(root, copy)
    return copy, damage(_iteration(copy))


def test_every_file_has_the_checksum_of_what_its_rank_wrote(tp2_ckpt):
    ckpt_dir = _iteration(tp2_ckpt)
    recorded = json.loads((ckpt_dir / checkpoint.CHECKSUMS_FILE).read_text())
    on_disk = {p.name for p in ckpt_dir.iterdir() if p.is_file()} - {checkpoint.CHECKSUMS_FILE}
    assert recorded["algorithm"] == checkpoint.ALGORITHM and set(recorded["files"]) == on_disk
    assert {name[:4] for name in on_disk if name.endswith(".distcp")} == {"__0_", "__1_"}  # both ranks' files
    for name, entry in recorded["files"].items():
        assert checkpoint.file_checksum(ckpt_dir / name) == entry, name


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_export_names_and_refuses_a_damaged_file(tp2_ckpt, tmp_path, damage):
    copy, victim = damaged_copy(tp2_ckpt, tmp_path, DAMAGE[damage])
    out = cli("megatron_to_hf.py", "--ckpt", copy, "--out", tmp_path / "hf", expect=2)
    assert f"megatron_to_hf: error: damaged checkpoint, refused (1 file(s)): {victim}:" in out, out
    assert "Traceback" not in out and not list((tmp_path / "hf").glob("*.safetensors"))


def test_verify_names_a_damaged_checkpoint_file_and_a_truncated_safetensors(tiny_llama_dir, tp2_ckpt, tmp_path):
    copy, victim = damaged_copy(tp2_ckpt, tmp_path, flip_4k)
    out = cli("verify.py", "--hf-dir", tiny_llama_dir, "--ckpt", copy, expect=2)
    assert f"verify: error: damaged checkpoint, refused (1 file(s)): {victim}: xxh3_64" in out, out

    hf = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, hf)
    weights = hf / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 4096)
    out = cli("verify.py", "--hf-dir", hf, "--ckpt", tp2_ckpt, expect=2)
    assert f"verify: error: {weights}: truncated: tensor" in out and "Traceback" not in out, out


def test_trainer_refuses_a_damaged_init_checkpoint(tiny_init, tiny_shards, tmp_path, capsys):  # noqa: F811
    """The trainer's load (here: a world of one at TP=1) checks the checksums before megatron reads a byte."""
    from mathtir.train.cli import main

    copy, victim = damaged_copy(tiny_init, tmp_path, flip_4k)
    assert main([str(SMOKE), f"model.init_from={copy}", f"data.train_dir={tiny_shards}",
                 f"checkpoint.dir={tmp_path / 'run'}", "model.tensor_model_parallel_size=1",
                 "model.sequence_parallel=false"]) == 2
    err = capsys.readouterr().err
    assert f"mathtir train: error: damaged checkpoint, refused (1 file(s)): {victim}: xxh3_64" in err, err
    assert checkpoint.latest_iteration(tmp_path / "run") is None
