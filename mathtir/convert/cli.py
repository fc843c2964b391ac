"""mathtir convert {import,export,verify,average}: HF <-> megatron checkpoints, their parity check, averaging.

    mathtir convert import --hf-dir DIR --out DIR [--tp N] [--pp N] [--dtype bf16|fp32]
    mathtir convert export --ckpt DIR --out DIR [--hf-template DIR]
    mathtir convert verify --hf-dir DIR --ckpt DIR [--tp N] [--atol X]
    mathtir convert average --ckpt RUN (--last K | --iterations N,M,...) --out DIR [--tp N] [--pp N]
    mathtir convert average --ckpt RUN_A/iter_N --ckpt RUN_B/iter_M ... --out DIR

import writes a torch_dist checkpoint (iteration 0) that loads at any TP/PP; with --tp/--pp > 1 it re-launches
itself under torchrun (or runs inside an existing torchrun/srun world). export takes a checkpoint root (its
latest iteration) or one of its iter_NNNNNNN directories, written at any TP/PP, and writes safetensors shards
with an index, config.json, generation_config.json, the tokenizer files and chat template (from --hf-template if
given, else the copy kept in the checkpoint). verify compares vocabulary size, bos/eos/pad ids, RoPE parameters,
head dim, KV heads and the tie flag, then runs fixed prompts through both models in fp32: max-abs logit
difference, cosine and top-1/top-5 agreement; exit 1 on any failure. average writes the element-wise mean of
the weights of a run's last K checkpoints (or the named iterations, or iter_N directories of runs of the same
model) as a new checkpoint root at the last input's iteration, weights only, loaded at --tp/--pp (any layout:
inputs are resharded on load); inputs whose hf_config.json or tensor shapes differ are refused by name. Bad
input: exit 2 with the reason.
`convert/hf_to_megatron.py`, `convert/megatron_to_hf.py` and `convert/verify.py` are the same commands.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from mathtir.models.llama import UnsupportedModelError

T = TypeVar("T")

INPUT_ERRORS = (FileExistsError, FileNotFoundError, KeyError, ValueError, UnsupportedModelError)


class _Refused(Exception):
    """A bad input, its reason already printed: the command exits 2."""


def build_parser(prog: str = "mathtir convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="HF directory -> megatron checkpoint")
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint root to write")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel ranks used for the conversion")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel ranks used for the conversion")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the stored weights")
    p = sub.add_parser("export", help="megatron checkpoint -> HF directory")
    p.add_argument("--ckpt", required=True, help="checkpoint root or iter_N directory")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--hf-template", help="HF directory whose tokenizer/chat template/generation config to copy")
    p = sub.add_parser("verify", help="is the checkpoint the same model as the HF directory? (logits parity)")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt", required=True, help="checkpoint root or iter_N directory")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size to run the megatron side at")
    p.add_argument("--atol", type=float, default=None,
                   help="max allowed |logit difference| (default: derived from fp32 and the logits' scale)")
    p.add_argument("--min-cosine", type=float, default=0.99999)
    p = sub.add_parser("average", help="element-wise mean of several checkpoints -> new checkpoint")
    p.add_argument("--ckpt", required=True, action="append",
                   help="a run's checkpoint root (with --last/--iterations), or iter_N directories (repeat)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--last", type=int, help="average the run's last K complete checkpoints")
    which.add_argument("--iterations", type=_iteration_list, help="average these iterations, e.g. 800,900,1000")
    p.add_argument("--out", required=True, help="checkpoint root to write")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel ranks to load and average at")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel ranks to load and average at")
    return parser


def _iteration_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated iteration numbers, got {text!r}") from None


def main(argv: list[str] | None = None, prog: str = "mathtir convert") -> int:
    args = build_parser(prog).parse_args(argv)
    command = {"import": import_checkpoint, "export": export_checkpoint, "verify": verify_checkpoint,
               "average": average_checkpoints}[args.command]
    try:
        return command(args)
    except _Refused:
        return 2


def _fail(tool: str, error: Exception) -> int:
    print(f"{tool}: error: {error}", file=sys.stderr)
    return 2


def _start_ranks(tool: str, args: argparse.Namespace, check_inputs: Callable[[], T]) -> tuple[T, float]:
    """Run `check_inputs` and refuse an --out that already holds a checkpoint before any rank starts, so a
    bad input gives one clear message; then start the args.tp * args.pp ranks (a plain process re-launches
    itself under torchrun when more than one is needed; inside a torchrun/srun world each rank joins it).
    Returns what `check_inputs` returned and when the ranks started; raises _Refused when the command must
    exit 2."""
    import torch

    from mathtir.megatron import checkpoint, parallel

    try:
        checked = check_inputs()
        if checkpoint.latest_iteration(args.out) is not None:
            raise FileExistsError(f"{args.out} already holds a checkpoint; choose a new --out")
    except INPUT_ERRORS as e:
        _fail(tool, e)
        raise _Refused from e
    parallel.relaunch_under_torchrun(args.tp * args.pp)

    start = time.perf_counter()
    parallel.initialize(args.tp, args.pp, seed=0)
    world = torch.distributed.get_world_size()
    if world != args.tp * args.pp:
        _fail(tool, ValueError(f"launched with {world} ranks, need tp*pp = {args.tp * args.pp}"))
        raise _Refused
    return checked, start


def import_checkpoint(args: argparse.Namespace) -> int:
    from mathtir.convert.importer import import_hf
    from mathtir.convert.safetensors import DTYPES, HFWeights
    from mathtir.megatron import parallel
    from mathtir.models.llama import ModelSpec

    def check_inputs() -> None:
        spec = ModelSpec.from_dir(args.hf_dir)
        spec.check_parallel(args.tp, args.pp)
        HFWeights(args.hf_dir).check_against(spec)

    _, start = _start_ranks("hf_to_megatron", args, check_inputs)
    target = import_hf(args.hf_dir, args.out, dtype=DTYPES[args.dtype], tp=args.tp, pp=args.pp)
    if parallel.rank() == 0:
        print(f"hf_to_megatron: wrote {target} (tp={args.tp} pp={args.pp} dtype={args.dtype}) "
              f"in {time.perf_counter() - start:.1f}s")
    parallel.destroy()
    return 0


def export_checkpoint(args: argparse.Namespace) -> int:
    from mathtir.convert.exporter import export_hf
    from mathtir.megatron import checkpoint, parallel
    from mathtir.models.llama import ModelSpec

    try:
        root, iteration = checkpoint.resolve_root(args.ckpt)
        ModelSpec.from_dir(root)
        checkpoint.iteration_to_read(root, iteration)  # damaged files named before anything is written
    except INPUT_ERRORS as e:
        return _fail("megatron_to_hf", e)
    start = time.perf_counter()
    # One process: a checkpoint of any TP/PP is read layer by layer into the TP=1/PP=1 layout.
    parallel.initialize(1, 1, seed=0)
    try:
        out = export_hf(args.ckpt, args.out, hf_template=args.hf_template)
    except INPUT_ERRORS as e:
        return _fail("megatron_to_hf", e)
    print(f"megatron_to_hf: wrote {out} in {time.perf_counter() - start:.1f}s")
    parallel.destroy()
    return 0


def verify_checkpoint(args: argparse.Namespace) -> int:
    from mathtir.convert.safetensors import HFWeights
    from mathtir.convert.verify import identity_checks, logits_parity
    from mathtir.megatron import checkpoint, parallel
    from mathtir.models.llama import ModelSpec

    try:
        root, iteration = checkpoint.resolve_root(args.ckpt)
        ModelSpec.from_dir(root).check_parallel(args.tp, 1)
        checks = identity_checks(args.hf_dir, root)
        # Damaged files named here, once, before any rank starts: the HF side's safetensors headers against
        # their sizes, the checkpoint's files against their checksums.
        HFWeights(args.hf_dir)
        checkpoint.iteration_to_read(root, iteration)
    except INPUT_ERRORS as e:
        return _fail("verify", e)
    parallel.relaunch_under_torchrun(args.tp)
    parallel.initialize(args.tp, 1, seed=0)
    lead = parallel.rank() == 0
    failed = [c for c in checks if not c.ok]
    if lead:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.field}: hf={c.hf!r} ckpt={c.ckpt!r}")
    try:
        result = logits_parity(args.hf_dir, args.ckpt)
    except INPUT_ERRORS as e:  # e.g. a checkpoint of another config
        parallel.destroy()
        return _fail("verify", e) if lead else 2
    atol = args.atol if args.atol is not None else result["tolerance"]
    logits_ok = (result["max_abs_diff"] <= atol and result["min_cosine"] >= args.min_cosine
                 and result["top1_agreement"] == 1.0)
    if lead:
        print(f"{'ok  ' if logits_ok else 'FAIL'} logits (tp={args.tp}, {result['positions']} positions): "
              f"max_abs_diff={result['max_abs_diff']:.3e} (atol {atol:.3e}"
              f"{'' if args.atol is not None else ', derived'}) "
              f"min_cosine={result['min_cosine']:.8f} top1={result['top1_agreement']:.4f} "
              f"top5={result['top5_agreement']:.4f}")
        print("verify: PASSED" if logits_ok and not failed else "verify: FAILED")
    parallel.destroy()
    return 0 if logits_ok and not failed else 1


def average_checkpoints(args: argparse.Namespace) -> int:
    from mathtir.convert.average import Source, average, select_sources
    from mathtir.megatron import parallel
    from mathtir.models.llama import ModelSpec

    def check_inputs() -> list[Source]:
        sources = select_sources(args.ckpt, last=args.last, iterations=args.iterations)
        ModelSpec.from_dir(sources[0].root).check_parallel(args.tp, args.pp)
        return sources

    sources, start = _start_ranks("average", args, check_inputs)
    lead = parallel.rank() == 0
    try:
        target = average(sources, args.out)
    except INPUT_ERRORS as e:  # a stored tensor of another shape than the config implies
        parallel.destroy()
        return _fail("average", e) if lead else 2
    if lead:
        print(f"average: wrote {target}, the mean of {len(sources)} checkpoints "
              f"({', '.join(str(s.dir) for s in sources)}; tp={args.tp} pp={args.pp}) "
              f"in {time.perf_counter() - start:.1f}s")
    parallel.destroy()
    return 0
