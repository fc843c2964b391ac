"""mathtir/megatron-core checkpoint -> Hugging Face directory.

    python convert/megatron_to_hf.py --ckpt DIR --out DIR [--hf-template DIR]

--ckpt is a checkpoint root (its latest iteration) or one of its iter_NNNNNNN directories, written by
hf_to_megatron or the trainer at any TP/PP. Writes safetensors shards with an index, config.json,
generation_config.json, the tokenizer files and chat template (from --hf-template if given, else the
copy kept in the checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint root or iter_N directory")
    parser.add_argument("--out", required=True, help="HF directory to write")
    parser.add_argument("--hf-template", help="HF directory whose tokenizer/chat template/generation config to copy")
    args = parser.parse_args()

    from mathtir import distributed
    from mathtir.models.conversion import export_hf, resolve_root
    from mathtir.models.llama import ModelSpec, UnsupportedModelError

    try:
        root, _ = resolve_root(args.ckpt)
        ModelSpec.from_dir(root)
    except (FileNotFoundError, ValueError, UnsupportedModelError) as e:
        print(f"megatron_to_hf: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    # One process: a checkpoint of any TP/PP is read layer by layer into the TP=1/PP=1 layout.
    distributed.initialize(1, 1, seed=0)
    try:
        out = export_hf(args.ckpt, args.out, hf_template=args.hf_template)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"megatron_to_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"megatron_to_hf: wrote {out} in {time.perf_counter() - start:.1f}s")
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
