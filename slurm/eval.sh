#!/usr/bin/env bash
#SBATCH --job-name=mathtir-eval
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --output=runs/slurm-eval-%j.out
#
# Majority-vote TIR evaluation on a Ray cluster started inside this allocation. Samplers need GPUs, the
# sandboxes only CPUs, so ask for GPU nodes and CPU nodes separately, as a heterogeneous job (no GPU idles):
#   sbatch --nodes=1 --gpus-per-node=8 : --nodes=2 --partition=cpu --gpus-per-node=0 \
#     slurm/eval.sh --model "$PWD/ckpt/hf" --data "$PWD/test.jsonl" --output "$PWD/runs/eval"
# Everything after the script name goes to ray_eval/run.py (see `python ray_eval/run.py --help`).
#
# The Ray cluster (nodes, resources, ports, token, teardown) and its knobs: slurm/ray_cluster.sh.
set -euo pipefail

# shellcheck source=slurm/common.sh
source "${MATHTIR_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
RAY_JOB_SCRIPT=eval.sh RAY_JOB_DRIVER=ray_eval/run.py
# shellcheck source=slurm/ray_cluster.sh
source "$MATHTIR_ROOT/slurm/ray_cluster.sh" "$@"
