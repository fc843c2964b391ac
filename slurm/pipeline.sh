#!/usr/bin/env bash
# The whole reproduction on a Slurm cluster, submitted as dependent jobs (run it on a login node; it returns
# at once after printing the job ids):
#   data (CoT, TIR)  ─┐
#   import HF → Megatron ─┴→ stage 1 CoT SFT → stage 2 TIR SFT [→ average last K] → export to HF → verify → evaluate
# With GENERATE_FROM, stage 2's TIR data is made rather than read: a teacher (a named model, or stage 1's model
# exported to HF) solves GENERATE_PROBLEMS through slurm/generate.sh, and the kept solutions are prepared:
#   [stage 1 → export stage 1 →] generate → data (TIR) → stage 2 ...
# Each job starts only when the ones it needs succeeded (afterok); a failed job cancels what depends on it.
# Before submitting anything, both training layouts are planned (`mathtir train plan`, the base model's shape,
# the training jobs' nodes and GPUs): a layout that cannot fit GPU_MEMORY_GB is refused here, not after the
# queue. Training jobs on CPUs (--gpus-per-node=0) are planned but never refused.
#
#   BASE_HF=/models/llm-jp-4-8b COT_DATA=/data/omr/cot.parquet TIR_DATA=/data/omr/tir.parquet \
#   EVAL_DATA=/data/dev.jsonl bash slurm/pipeline.sh
#
# Knobs (environment; defaults are the 8B recipes):
#   BASE_HF, COT_DATA, TIR_DATA, EVAL_DATA   required: the HF base model and the input files (TIR_DATA not
#                                            with GENERATE_FROM)
#   GENERATE_FROM                            "stage1" (the stage-1 model is the teacher) or a teacher's HF
#                                            directory (for an API teacher: its tokenizer's, with GENERATE_ARGS
#                                            "--backend openai --api-base URL --api-model NAME")
#   GENERATE_PROBLEMS, GENERATE_ARGS="..."   the problems with answers; extra ray_eval/generate.py flags
#   GENERATE_SBATCH_ARGS                     flags for the generation job (default: EVAL_SBATCH_ARGS)
#   RUN_ROOT=runs                            where every stage writes (data/, models/, stage1_cot/, ...)
#   COT_DATA_RECIPE, TIR_DATA_RECIPE         default nemo_configs/data_openmathreasoning.yaml for both
#   COT_DATA_OVERRIDES                       default: none
#   TIR_DATA_OVERRIDES                       default: TIR samples only, code/output pairs, sandbox re-execution
#                                            (set it empty for none)
#   DATA_PARTS=8                             array tasks per data set (1: one job per data set)
#   STAGE1_RECIPE=nemo_configs/stage1_cot.yaml  STAGE2_RECIPE=nemo_configs/stage2_tir.yaml
#   STAGE1_OVERRIDES, STAGE2_OVERRIDES       extra key=value overrides (space separated)
#   IMPORT_TP=1, EVAL_ARGS="..."             import layout; extra ray_eval/run.py flags
#   AVERAGE_LAST=0                           K >= 2: export the mean of stage 2's last K checkpoints
#                                            (`mathtir convert average`; set checkpoint.save_every_n_steps so
#                                            stage 2 keeps K) instead of its final one
#   GPU_MEMORY_GB=80                         memory per GPU of the training nodes, for the plan check
#   SBATCH_ARGS                              sbatch flags for every job (e.g. --partition=... --account=...)
#   TRAIN_SBATCH_ARGS, CPU_SBATCH_ARGS, EVAL_SBATCH_ARGS   flags for the training / CPU / evaluation jobs
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${MATHTIR_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}/slurm/common.sh"

: "${BASE_HF:?set BASE_HF to the Hugging Face base model directory}"
: "${COT_DATA:?set COT_DATA to the chain-of-thought training file(s), comma separated}"
GENERATE_FROM=${GENERATE_FROM:-}
if [ -n "$GENERATE_FROM" ]; then
  : "${GENERATE_PROBLEMS:?set GENERATE_PROBLEMS to the problems the teacher solves (with expected_answer)}"
else
  : "${TIR_DATA:?set TIR_DATA to the TIR training file(s), comma separated (or GENERATE_FROM to make them)}"
fi
: "${EVAL_DATA:?set EVAL_DATA to the evaluation problems (.jsonl or .parquet)}"
RUN_ROOT=$(realpath -m "${RUN_ROOT:-runs}")
COT_DATA_RECIPE=${COT_DATA_RECIPE:-nemo_configs/data_openmathreasoning.yaml}
TIR_DATA_RECIPE=${TIR_DATA_RECIPE:-nemo_configs/data_openmathreasoning.yaml}
read -r -a cot_overrides <<< "${COT_DATA_OVERRIDES:-}"
read -r -a tir_overrides <<< "${TIR_DATA_OVERRIDES-filters.modes=[tir] filters.require_code=true \
filters.code_output_pairs=true filters.no_boxed_before_code=true verify.enabled=true}"
DATA_PARTS=${DATA_PARTS:-8}
STAGE1_RECIPE=${STAGE1_RECIPE:-nemo_configs/stage1_cot.yaml}
STAGE2_RECIPE=${STAGE2_RECIPE:-nemo_configs/stage2_tir.yaml}
IMPORT_TP=${IMPORT_TP:-1}
AVERAGE_LAST=${AVERAGE_LAST:-0}
GPU_MEMORY_GB=${GPU_MEMORY_GB:-80}
read -r -a common <<< "${SBATCH_ARGS:-}"
read -r -a train_flags <<< "${TRAIN_SBATCH_ARGS:-}"
read -r -a cpu_flags <<< "${CPU_SBATCH_ARGS:-}"
read -r -a eval_flags <<< "${EVAL_SBATCH_ARGS:-}"
read -r -a stage1_overrides <<< "${STAGE1_OVERRIDES:-}"
read -r -a stage2_overrides <<< "${STAGE2_OVERRIDES:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
read -r -a generate_flags <<< "${GENERATE_SBATCH_ARGS-${EVAL_SBATCH_ARGS:-}}"
read -r -a generate_args <<< "${GENERATE_ARGS:-}"
mkdir -p "$RUN_ROOT/logs"

# submit NAME DEPENDENCIES SBATCH_FLAGS... -- SCRIPT ARGS...: prints the job id.
submit() {
  local name=$1 deps=$2; shift 2
  local flags=()
  while [ "$1" != -- ]; do flags+=("$1"); shift; done
  shift
  local dep_flag=()
  [ -n "$deps" ] && dep_flag=("--dependency=afterok:$deps")
  sbatch --parsable --job-name="mathtir-$name" --output="$RUN_ROOT/logs/$name-%j.out" \
    "${dep_flag[@]}" "${common[@]}" "${flags[@]}" "$@" | cut -d';' -f1
}

# prepare NAME RECIPE INPUTS DEPENDENCIES OVERRIDES...: prints the id of the job that finishes the data set:
# one job, or the merge job after an array of parts (prepare_data.sh prints its id last).
prepare() {
  local name=$1 recipe=$2 inputs=$3 deps=$4; shift 4
  local args=("$recipe" "inputs=[$inputs]" "output_dir=$RUN_ROOT/data/$name" "tokenizer=$BASE_HF"
              "decontam.eval_sets=[$EVAL_DATA]" "$@")
  if [ "$DATA_PARTS" -gt 1 ]; then
    bash slurm/prepare_data.sh --parts "$DATA_PARTS" --after "$deps" --sbatch "${common[*]} ${cpu_flags[*]}" \
      "${args[@]}" | tail -n1
  else
    submit "data_$name" "$deps" "${cpu_flags[@]}" -- slurm/prepare_data.sh "${args[@]}"
  fi
}

# The training jobs' size as sbatch will see it: the scripts' #SBATCH defaults, then SBATCH_ARGS, then
# TRAIN_SBATCH_ARGS (later flags win, as on sbatch's command line).
train_nodes=2 train_gpus=8
for flag in "${common[@]}" "${train_flags[@]}"; do
  case "$flag" in
    --nodes=*|-N*) train_nodes=${flag#--nodes=}; train_nodes=${train_nodes#-N} ;;
    --gpus-per-node=*) train_gpus=${flag#--gpus-per-node=} ;;
  esac
done
plan_stage() {
  local recipe=$1; shift
  local -a device=(--gpus-per-node "$train_gpus" --gpu-memory "$GPU_MEMORY_GB")
  if [ "$train_gpus" = 0 ]; then device=(--gpus-per-node "$(mathtir_nproc_per_node)" --cpu); fi
  local report rc=0
  local -a in_image
  mapfile -t in_image < <(mathtir_container_exec_prefix)  # an Apptainer image runs here too; pyxis only in jobs
  report="$RUN_ROOT/logs/plan-$(basename "$recipe" .yaml).txt"
  "${in_image[@]}" "$(mathtir_python)" -m mathtir train plan "$recipe" "$@" --model "$BASE_HF" \
    --nodes "$train_nodes" "${device[@]}" > "$report" 2>&1 || rc=$?
  case $rc in
    0) ;;
    2|3) cat "$report" >&2; echo "mathtir pipeline: $recipe refused by the plan; nothing submitted" >&2; exit 1 ;;
    # e.g. this login node's Python lacks the packages the container has: the training job checks again.
    *) echo "mathtir pipeline: could not plan $recipe here (exit $rc, $report); submitting anyway" >&2 ;;
  esac
}
plan_stage "$STAGE1_RECIPE" "${stage1_overrides[@]}"
plan_stage "$STAGE2_RECIPE" "${stage2_overrides[@]}"

cot=$(prepare stage1_cot "$COT_DATA_RECIPE" "$COT_DATA" "" "${cot_overrides[@]}")
import=$(submit import "" "${cpu_flags[@]}" -- slurm/convert.sh hf_to_megatron \
  --hf-dir "$BASE_HF" --out "$RUN_ROOT/models/base" --tp "$IMPORT_TP")
stage1=$(submit stage1_cot "$cot:$import" "${train_flags[@]}" -- slurm/stage1_cot.sh "$STAGE1_RECIPE" \
  "model.init_from=$RUN_ROOT/models/base" "data.train_dir=$RUN_ROOT/data/stage1_cot" \
  "checkpoint.dir=$RUN_ROOT/stage1_cot" "${stage1_overrides[@]}")
export_stage1='' generate=''
if [ -n "$GENERATE_FROM" ]; then
  teacher=$GENERATE_FROM
  if [ "$GENERATE_FROM" = stage1 ]; then
    teacher=$RUN_ROOT/hf/stage1_cot
    export_stage1=$(submit export_stage1 "$stage1" "${cpu_flags[@]}" -- slurm/convert.sh megatron_to_hf \
      --ckpt "$RUN_ROOT/stage1_cot" --out "$teacher" --hf-template "$BASE_HF")
  fi
  generate=$(submit generate "$export_stage1" "${generate_flags[@]}" -- slurm/generate.sh \
    --model "$teacher" --data "$GENERATE_PROBLEMS" --output "$RUN_ROOT/generate" "${generate_args[@]}")
  tir=$(prepare stage2_tir "$TIR_DATA_RECIPE" "$RUN_ROOT/generate/solutions/*.jsonl" "$generate" \
    "${tir_overrides[@]}")
else
  tir=$(prepare stage2_tir "$TIR_DATA_RECIPE" "$TIR_DATA" "" "${tir_overrides[@]}")
fi
stage2=$(submit stage2_tir "$stage1:$tir" "${train_flags[@]}" -- slurm/stage2_tir.sh "$STAGE2_RECIPE" \
  "model.init_from=$RUN_ROOT/stage1_cot" "data.train_dir=$RUN_ROOT/data/stage2_tir" \
  "checkpoint.dir=$RUN_ROOT/stage2_tir" "${stage2_overrides[@]}")
final_ckpt=$RUN_ROOT/stage2_tir before_export=$stage2 average=
if [ "$AVERAGE_LAST" -ge 2 ]; then
  final_ckpt=$RUN_ROOT/stage2_tir_avg$AVERAGE_LAST
  average=$(submit average "$stage2" "${cpu_flags[@]}" -- slurm/convert.sh average \
    --ckpt "$RUN_ROOT/stage2_tir" --last "$AVERAGE_LAST" --out "$final_ckpt")
  before_export=$average
fi
export_=$(submit export "$before_export" "${cpu_flags[@]}" -- slurm/convert.sh megatron_to_hf \
  --ckpt "$final_ckpt" --out "$RUN_ROOT/hf/stage2_tir" --hf-template "$BASE_HF")
verify=$(submit verify "$export_" "${cpu_flags[@]}" -- slurm/convert.sh verify \
  --hf-dir "$RUN_ROOT/hf/stage2_tir" --ckpt "$final_ckpt")
evaluate=$(submit eval "$verify" "${eval_flags[@]}" -- slurm/eval.sh \
  --model "$RUN_ROOT/hf/stage2_tir" --data "$EVAL_DATA" --output "$RUN_ROOT/eval/stage2_tir" "${eval_args[@]}")

cat <<EOF
mathtir pipeline submitted (outputs under $RUN_ROOT, job logs in $RUN_ROOT/logs):
  data stage1_cot  $cot
  import           $import
  stage1_cot       $stage1${export_stage1:+
  export_stage1    $export_stage1}${generate:+
  generate         $generate}
  data stage2_tir  $tir
  stage2_tir       $stage2${average:+
  average          $average}
  export           $export_
  verify           $verify
  eval             $evaluate
EOF
