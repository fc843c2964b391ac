"""mathtir train RECIPE [key=value ...]: stage 1 / stage 2 SFT on megatron-core (mathtir.train.trainer).

    torchrun --nproc-per-node=N -m mathtir train nemo_configs/stage1_cot.yaml [key=value ...]
    sbatch slurm/stage1_cot.sh [RECIPE] [key=value ...]      (runs exactly this on every node)

Without torchrun the process is a world of one. Overrides use the recipe's dotted keys
(`optim.lr=1e-5 model.tensor_model_parallel_size=4`). Bad recipes, overrides, data or checkpoints stop the run
before any work with one line naming the key or file (exit 2).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    import torch.distributed as dist

    from mathtir.megatron.checkpoint import CheckpointDamagedError
    from mathtir.recipes import ConfigError
    from mathtir.train.recipe import load_recipe
    from mathtir.train.trainer import train

    try:
        return train(load_recipe(argv[0], argv[1:]))
    except (ConfigError, FileNotFoundError, CheckpointDamagedError) as exc:
        print(f"mathtir train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
