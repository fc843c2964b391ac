"""mathtir data {prepare,merge,demo} ...

    prepare CONFIG [key=value ...]                       whole preparation: records -> packed shards
    prepare CONFIG [key=value ...] --part I --num-parts N  phase 1 for one slice (a Slurm array task)
    merge CONFIG [key=value ...] --num-parts N           phase 2: dedup + pack the N slices into shards
    demo --out DIR [--seed S] [--train N] [--eval N]     write the synthetic Japanese arithmetic demo data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mathtir.readers import DataError
from mathtir.recipes import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mathtir data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "merge"):
        p = sub.add_parser(name)
        p.add_argument("config", help="data recipe, e.g. nemo_configs/data_demo_tir.yaml")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. seq_length=2048")
        p.add_argument("--num-parts", type=int, default=None)
        if name == "prepare":
            p.add_argument("--part", type=int, default=None, help="only phase 1 for this slice (needs --num-parts)")
    p = sub.add_parser("demo")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=1000, help="training problems")
    p.add_argument("--eval", type=int, default=100, help="held-out evaluation problems")
    p.add_argument("--sandbox-workers", type=int, default=2)
    args = parser.parse_args(argv)

    try:
        if args.command == "demo":
            from mathtir.data.demo import write_demo_data

            for path in write_demo_data(args.out, seed=args.seed, n_train=args.train, n_eval=args.eval,
                                        sandbox_workers=args.sandbox_workers).values():
                print(path)
            return 0
        from mathtir.data.merge import merge
        from mathtir.data.part import prepare_part
        from mathtir.data.prepare import prepare
        from mathtir.data.recipe import load_data_recipe

        cfg = load_data_recipe(args.config, args.overrides)
        if args.command == "merge":
            merge(cfg, args.num_parts or 1)
        elif args.part is not None:
            if args.num_parts is None:
                parser.error("--part needs --num-parts")
            prepare_part(cfg, args.part, args.num_parts)
            return 0
        elif args.num_parts not in (None, 1):
            parser.error("--num-parts without --part: use `merge` to combine parts")
        else:
            prepare(cfg)
        report = Path(cfg.output_dir) / "report.md"
        print(report.read_text())
        print(f"manifest: {Path(cfg.output_dir) / 'manifest.json'}")
        return 0
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

