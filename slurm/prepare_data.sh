#!/usr/bin/env bash
# Data preparation on CPU nodes: records -> verified, deduplicated, packed shards (mathtir data).
#   bash slurm/prepare_data.sh --parts N [--after JOBID] recipe.yaml [key=value ...]
#       submits an array job of N tasks (task i prepares every N-th record; with --after, once job JOBID, e.g.
#       the one writing the inputs, succeeded) and a merge job that starts when all of them succeeded; prints
#       both job ids, the merge job's id last (chain later stages on it: sbatch --dependency=afterok:<id> ...).
#   sbatch slurm/prepare_data.sh recipe.yaml [key=value ...]     the whole preparation in one job
#   bash slurm/prepare_data.sh recipe.yaml [key=value ...]       the same without Slurm, on this machine
# A rerun skips parts that are already done (their outputs are written atomically), so a failed or
# preempted array can simply be resubmitted. Override #SBATCH lines on the command line (sbatch flags) or
# pass them to the submitter after --sbatch: bash slurm/prepare_data.sh --parts 8 --sbatch "--partition=cpu" ...
#SBATCH --job-name=prepare_data
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=08:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${MATHTIR_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"

parts=1 after=
sbatch_extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --parts) parts=$2; shift 2 ;;
    --after) after=$2; shift 2 ;;
    --sbatch) read -r -a sbatch_extra <<< "$2"; shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: bash slurm/prepare_data.sh [--parts N] recipe.yaml [key=value ...]" >&2; exit 2; }

# Submitter: the array of parts, then the merge once every part succeeded.
if [ "$parts" -gt 1 ]; then
  script="$MATHTIR_ROOT/slurm/prepare_data.sh"
  after_flag=()
  [ -z "$after" ] || after_flag=("--dependency=afterok:$after")
  array_id=$(sbatch --parsable --array="0-$((parts - 1))" --job-name=prepare_data_part \
    --output="%x-%A_%a.out" "${after_flag[@]}" "${sbatch_extra[@]}" "$script" "$@")
  array_id=${array_id%%;*}
  merge_id=$(sbatch --parsable --dependency="afterok:$array_id" --job-name=prepare_data_merge \
    --export="ALL,MATHTIR_DATA_MERGE_PARTS=$parts" "${sbatch_extra[@]}" "$script" "$@")
  merge_id=${merge_id%%;*}
  echo "prepare_data: array job $array_id ($parts parts), merge job $merge_id"
  echo "$merge_id"
  exit 0
fi

python=$(mathtir_python)
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  if [ "${SLURM_ARRAY_TASK_MIN:-0}" -ne 0 ]; then
    echo "prepare_data: array indices must start at 0 (got ${SLURM_ARRAY_TASK_MIN})" >&2; exit 2
  fi
  command=(prepare "$@" --part "$SLURM_ARRAY_TASK_ID" --num-parts "$((SLURM_ARRAY_TASK_MAX + 1))")
elif [ -n "${MATHTIR_DATA_MERGE_PARTS:-}" ]; then
  command=(merge "$@" --num-parts "$MATHTIR_DATA_MERGE_PARTS")
else
  command=(prepare "$@")
fi

if [ -z "${SLURM_JOB_ID:-}" ]; then
  exec "$python" -m mathtir data "${command[@]}"
fi
mapfile -t srun_args < <(mathtir_container_srun_args)
mapfile -t exec_prefix < <(mathtir_container_exec_prefix)
echo "prepare_data: job $SLURM_JOB_ID on $(hostname): mathtir data ${command[*]}"
srun --ntasks=1 "${srun_args[@]}" "${exec_prefix[@]}" "$python" -m mathtir data "${command[@]}"
