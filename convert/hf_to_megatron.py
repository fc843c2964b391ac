"""Hugging Face Llama directory -> mathtir/megatron-core distributed checkpoint (torch_dist, iteration 0).

    python convert/hf_to_megatron.py --hf-dir DIR --out DIR [--tp N] [--pp N] [--dtype bf16|fp32]

With --tp/--pp > 1 it re-launches itself under torchrun (or runs under an existing torchrun/srun world).
The checkpoint loads at any TP/PP, not only the one it was written at.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint root to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel ranks used for the conversion")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel ranks used for the conversion")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the stored weights")
    args = parser.parse_args()

    import torch

    from mathtir import checkpoint, distributed
    from mathtir.models.conversion import DTYPES, HFWeights, import_hf
    from mathtir.models.llama import ModelSpec, UnsupportedModelError

    try:
        # Validate before any rank starts, so a bad input gives one clear message.
        spec = ModelSpec.from_dir(args.hf_dir)
        spec.check_parallel(args.tp, args.pp)
        HFWeights(args.hf_dir).check_against(spec)
        if checkpoint.latest_iteration(args.out) is not None:
            raise FileExistsError(f"{args.out} already holds a checkpoint; choose a new --out")
    except (FileExistsError, FileNotFoundError, KeyError, ValueError, UnsupportedModelError) as e:
        print(f"hf_to_megatron: error: {e}", file=sys.stderr)
        return 2
    distributed.relaunch_under_torchrun(args.tp * args.pp)

    start = time.perf_counter()
    distributed.initialize(args.tp, args.pp, seed=0)
    world = torch.distributed.get_world_size()
    if world != args.tp * args.pp:
        print(f"hf_to_megatron: error: launched with {world} ranks, need tp*pp = {args.tp * args.pp}", file=sys.stderr)
        return 2
    target = import_hf(args.hf_dir, args.out, dtype=DTYPES[args.dtype], tp=args.tp, pp=args.pp)
    if distributed.rank() == 0:
        print(f"hf_to_megatron: wrote {target} (tp={args.tp} pp={args.pp} dtype={args.dtype}) "
              f"in {time.perf_counter() - start:.1f}s")
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
