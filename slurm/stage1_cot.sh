#!/usr/bin/env bash
# Stage 1 (chain-of-thought) SFT.   sbatch slurm/stage1_cot.sh [recipe.yaml] [key=value ...]
# Defaults: 2 nodes x 8 GPUs, nemo_configs/stage1_cot.yaml. Override any #SBATCH line on the command line,
# e.g. a CPU smoke run:  sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 --time=30 \
#   slurm/stage1_cot.sh nemo_configs/stage1_cot_smoke.yaml model.init_from=... data.train_dir=...
# Without Slurm (`bash slurm/stage1_cot.sh ...`) the same run starts locally with torchrun.
# Before any rank starts, `mathtir train plan` prints the layout's memory per GPU and stops a layout that cannot
# fit this node's GPUs (never on CPUs). USR1 before the time limit, and the SIGTERM of a preemption, make the
# trainer checkpoint and the job requeue itself (slurm/common.sh).
# Submit from the repository root (or set MATHTIR_ROOT); see slurm/common.sh for container and other knobs.
#SBATCH --job-name=stage1_cot
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${MATHTIR_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"

recipe=nemo_configs/stage1_cot.yaml
if [[ "${1:-}" == *.yaml ]]; then recipe=$1; shift; fi
# TP with sequence parallel: the GPU must run kernels in queue order for megatron's comm/GEMM overlap
# (asked in the image when one is set: Apptainer runs here; under pyxis the batch shell's Python answers)
mapfile -t in_image < <(mathtir_container_exec_prefix)
if "${in_image[@]}" "$(mathtir_python)" -m mathtir.train.recipe needs-single-cuda-connection "$recipe" "$@"; then
  export CUDA_DEVICE_MAX_CONNECTIONS=1
fi
mathtir_launch train "$recipe" "$@"
