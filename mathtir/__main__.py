"""python -m mathtir ... (the `mathtir` command; torchrun -m mathtir train ... starts the trainer's ranks)."""

import sys

from mathtir.cli import main

if __name__ == "__main__":  # dist_checkpointing's writer starts spawn-mode processes: keep the guard
    sys.exit(main())
