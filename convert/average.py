"""The element-wise mean of several checkpoints of one model, written as a new checkpoint.

    python convert/average.py ARGS...   (the same as: mathtir convert average ARGS...; --help lists them)
"""

import sys
from pathlib import Path

# The package of this checkout, also when it is not installed (a cluster's shared copy of the repository).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mathtir.convert.cli import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing's writer starts spawn-mode processes: keep the guard
    sys.exit(main(["average", *sys.argv[1:]], prog="convert/average.py"))
