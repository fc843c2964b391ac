#!/usr/bin/env bash
# HF <-> Megatron checkpoint conversion and verification on one node of the cluster.
#   sbatch slurm/convert.sh hf_to_megatron --hf-dir DIR --out DIR [--tp N] [--pp N] [--dtype bf16|fp32]
#   sbatch slurm/convert.sh megatron_to_hf --ckpt DIR --out DIR [--hf-template DIR]
#   sbatch slurm/convert.sh verify --hf-dir DIR --ckpt DIR [--tp N]
#   sbatch slurm/convert.sh average --ckpt RUN --last K --out DIR [--tp N] [--pp N]
# One srun task runs the CLI, which starts torchrun with tp*pp ranks on the node when --tp/--pp > 1.
# Conversion streams tensor by tensor, so a CPU node works too: sbatch --gpus-per-node=0 slurm/convert.sh ...
# Without Slurm (`bash slurm/convert.sh ...`) the same command runs locally.
# Submit from the repository root (or set MATHTIR_ROOT); see slurm/common.sh for container and other knobs.
#SBATCH --job-name=convert
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${MATHTIR_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"

tool=${1:-}
case "$tool" in
  hf_to_megatron|megatron_to_hf|verify|average) shift ;;
  *) echo "usage: slurm/convert.sh hf_to_megatron|megatron_to_hf|verify|average ARGS... (got '${tool}')" >&2; exit 2 ;;
esac

python=$(mathtir_python)
if [ -z "${SLURM_JOB_ID:-}" ]; then
  exec "$python" "convert/$tool.py" "$@"
fi
mapfile -t srun_args < <(mathtir_container_srun_args)
mapfile -t exec_prefix < <(mathtir_container_exec_prefix)
echo "mathtir: job $SLURM_JOB_ID: convert/$tool.py $*"
srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 "${srun_args[@]}" "${exec_prefix[@]}" "$python" "convert/$tool.py" "$@"
