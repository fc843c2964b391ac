#!/usr/bin/env bash
#SBATCH --job-name=mathtir-generate
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --output=runs/slurm-generate-%j.out
#
# TIR training data by rejection sampling (`mathtir generate`) on a Ray cluster started inside this allocation,
# the same cluster slurm/eval.sh starts: a teacher samples solutions on the GPU nodes, their code runs in the
# sandboxes of the CPU nodes, and the solutions that reach the known answer are written as
# OUTPUT/solutions/part-*.jsonl, the input of `mathtir data prepare`. As a heterogeneous job:
#   sbatch --nodes=1 --gpus-per-node=8 : --nodes=2 --partition=cpu --gpus-per-node=0 \
#     slurm/generate.sh --model "$PWD/teacher/hf" --data "$PWD/problems.jsonl" --output "$PWD/runs/generate"
# A served or commercial teacher needs no GPU node: --backend openai --api-base ... --api-model ... (and
# --api-mode chat for a chat API). Everything after the script name goes to ray_eval/generate.py (see `python
# ray_eval/generate.py --help`). Resubmitting the same command resumes the run (the shards' index).
#
# The Ray cluster (nodes, resources, ports, token, teardown) and its knobs: slurm/ray_cluster.sh.
set -euo pipefail

# shellcheck source=slurm/common.sh
source "${MATHTIR_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
RAY_JOB_SCRIPT=generate.sh RAY_JOB_DRIVER=ray_eval/generate.py
# shellcheck source=slurm/ray_cluster.sh
source "$MATHTIR_ROOT/slurm/ray_cluster.sh" "$@"
