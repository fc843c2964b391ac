"""mathtir eval {run,compare}: majority-vote TIR evaluation, and the paired comparison of two runs.

    mathtir eval run --model DIR --data problems.jsonl --output runs/eval [...]   (= python ray_eval/run.py ...)
    mathtir eval compare RUN_A RUN_B [--out report.md] [--names base,tuned]

`mathtir eval run --help` and `mathtir eval compare --help` list every option.
"""

from __future__ import annotations

import sys

COMMANDS = {"run": "majority-vote TIR evaluation (an embedded Ray, or the cluster in RAY_ADDRESS)",
            "compare": "paired comparison of two finished runs on the same problems"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__ + "\ncommands:\n" + "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items()))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "run":
        from mathtir.eval.job import main as run

        return run(argv[1:])
    from mathtir.eval.compare import main as compare

    return compare(argv[1:])
