"""mathtir train RECIPE [key=value ...]: stage 1 / stage 2 SFT on megatron-core (mathtir.train.trainer).

    torchrun --nproc-per-node=N -m mathtir train nemo_configs/stage1_cot.yaml [key=value ...]
    sbatch slurm/stage1_cot.sh [RECIPE] [key=value ...]      (runs exactly this on every node)
    mathtir train plan RECIPE [key=value ...] --nodes N --gpus-per-node G [--gpu-memory GB] [--model DIR] [--cpu]

`plan` prints the memory per GPU of the recipe's layout on N x G GPUs (mathtir.train.plan: weights, gradients,
optimizer state, activations without / with selective / with full recompute, overhead) and, given
--gpu-memory (GiB per device, e.g. 80), whether it fits: exit 0 if it does or was not checked, 3 if it does not
(2: bad input).
The model's shape comes from --model (an HF directory or a checkpoint root), else from model.init_from. --cpu
plans a CPU run (fp32, G ranks per node, --gpu-memory then the memory per rank).

Without torchrun the process is a world of one. Overrides use the recipe's dotted keys
(`optim.lr=1e-5 model.tensor_model_parallel_size=4`). Bad recipes, overrides, data or checkpoints stop the run
before any work with one line naming the key or file (exit 2).
"""

from __future__ import annotations

import sys

DOES_NOT_FIT = 3  # `mathtir train plan`'s exit status for a layout that cannot fit (2 is bad input)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "plan":
        return plan_main(argv[1:])
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


def plan_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="mathtir train plan", description="memory per device of a layout")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True, help="ranks per node")
    parser.add_argument("--gpu-memory", type=float, help="GiB per device; without it the fit is not checked")
    parser.add_argument("--model", help="HF directory or checkpoint root for the model's shape "
                                        "(default: model.init_from)")
    parser.add_argument("--cpu", action="store_true", help="plan a CPU run (fp32)")
    args = parser.parse_intermixed_args(argv)

    from mathtir.models.llama import ModelSpec, UnsupportedModelError
    from mathtir.recipes import ConfigError
    from mathtir.train import plan
    from mathtir.train.recipe import load_recipe, validate_parallelism

    try:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError(f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node}: both must be >= 1")
        cfg = load_recipe(args.recipe, args.overrides)
        spec = ModelSpec.from_dir(args.model or cfg.model.init_from)
        world = args.nodes * args.gpus_per_node
        validate_parallelism(cfg, world_size=world, num_attention_heads=spec.num_attention_heads,
                             num_query_groups=spec.num_kv_heads, num_layers=spec.num_layers, source=args.recipe)
        layout = plan.layout_from_recipe(cfg, world_size=world, on_gpu=not args.cpu)
        stages = plan.plan(spec, layout)
    except (ConfigError, FileNotFoundError, UnsupportedModelError, ValueError) as exc:
        print(f"mathtir train plan: error: {exc}", file=sys.stderr)
        return 2
    device_bytes = None if args.gpu_memory is None else int(args.gpu_memory * plan.GIB)
    print(f"mathtir train plan: {args.recipe} with {spec.num_layers} layers x {spec.hidden_size} hidden "
          f"({spec.source})")
    print(plan.render(stages, layout, device_bytes, nodes=args.nodes, per_node=args.gpus_per_node))
    return 0 if device_bytes is None or plan.fits(stages, device_bytes) else DOES_NOT_FIT
