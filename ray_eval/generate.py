"""TIR training data by rejection sampling as a Ray job (thin launcher of `mathtir generate`).

    ray job submit --working-dir . -- python ray_eval/generate.py --model DIR --data problems.jsonl --output runs/gen
    python ray_eval/generate.py ...   # no RAY_ADDRESS: an embedded Ray on this machine

`python ray_eval/generate.py --help` lists every option.
"""

import sys
from pathlib import Path

# Import mathtir from the directory this script came with (a job's uploaded working directory), not from
# whatever copy happens to be installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mathtir.eval.generation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="ray_eval/generate.py"))
