"""Check that a mathtir/megatron checkpoint is the same model as a Hugging Face directory.

    python convert/verify.py --hf-dir DIR --ckpt DIR [--tp N] [--atol X]

Compares vocabulary size, bos/eos/pad ids, RoPE parameters, head dim, KV heads and the tie flag, then runs
fixed prompts through both models in fp32 and prints the max-abs logit difference, cosine and top-5
agreement. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--ckpt", required=True, help="checkpoint root or iter_N directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size to run the megatron side at")
    parser.add_argument("--atol", type=float, default=1e-3, help="max allowed |logit difference| (fp32)")
    parser.add_argument("--min-cosine", type=float, default=0.99999)
    args = parser.parse_args()

    from mathtir import distributed
    from mathtir.models.conversion import resolve_root
    from mathtir.models.llama import ModelSpec, UnsupportedModelError
    from mathtir.models.parity import identity_checks, logits_parity

    try:
        root, _ = resolve_root(args.ckpt)
        ModelSpec.from_dir(root).check_parallel(args.tp, 1)
        checks = identity_checks(args.hf_dir, root)
    except (FileNotFoundError, ValueError, UnsupportedModelError) as e:
        print(f"verify: error: {e}", file=sys.stderr)
        return 2
    distributed.relaunch_under_torchrun(args.tp)
    distributed.initialize(args.tp, 1, seed=0)
    lead = distributed.rank() == 0
    failed = [c for c in checks if not c.ok]
    if lead:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.field}: hf={c.hf!r} ckpt={c.ckpt!r}")
    try:
        result = logits_parity(args.hf_dir, args.ckpt)
    except (FileNotFoundError, KeyError, ValueError) as e:  # e.g. a checkpoint of another config
        if lead:
            print(f"verify: error: {e}", file=sys.stderr)
        distributed.destroy()
        return 2
    logits_ok = (result["max_abs_diff"] <= args.atol and result["min_cosine"] >= args.min_cosine
                 and result["top1_agreement"] == 1.0)
    if lead:
        print(f"{'ok  ' if logits_ok else 'FAIL'} logits (tp={args.tp}, {result['positions']} positions): "
              f"max_abs_diff={result['max_abs_diff']:.3e} (atol {args.atol:g}) "
              f"min_cosine={result['min_cosine']:.8f} top1={result['top1_agreement']:.4f} "
              f"top5={result['top5_agreement']:.4f}")
        print("verify: PASSED" if logits_ok and not failed else "verify: FAILED")
    distributed.destroy()
    return 0 if logits_ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
