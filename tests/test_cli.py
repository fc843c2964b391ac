"""The `mathtir` command: one subcommand per stage, each with a --help that answers at once and does no work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HELP_COMMANDS = [
    [], ["data"], ["data", "prepare"], ["data", "demo"], ["train"], ["train", "plan"], ["convert"],
    ["convert", "import"], ["convert", "export"], ["convert", "verify"], ["convert", "average"], ["eval"],
    ["eval", "run"], ["eval", "compare"], ["generate"], ["sandbox"], ["sandbox", "selftest"], ["model"],
    ["model", "smollm2"], ["demo"],
]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "mathtir")
def test_every_help_answers_without_doing_work(tmp_path, command):
    """Run in an empty directory: --help must leave it empty (`mathtir model smollm2 --help` once wrote the
    model into a folder named --help) and must not start heavy machinery (no torch, Ray or megatron import)."""
    code = ("import sys; from mathtir.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as exit:\n    rc = exit.code\n"
            "heavy = [m for m in ('torch', 'ray', 'megatron', 'transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n"
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *command, "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower() or "mathtir" in proc.stdout
    assert "HEAVY []" in proc.stdout, proc.stdout
    assert list(Path(tmp_path).iterdir()) == []


def test_unknown_command_is_refused_with_the_list(capsys):
    from mathtir.cli import main

    assert main(["prepare"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'prepare'" in err and "data, train, convert, eval" in err


def test_console_script_is_installed():
    scripts = Path(sys.executable).parent
    proc = subprocess.run([str(scripts / "mathtir"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "mathtir train RECIPE" in proc.stdout
