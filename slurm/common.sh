# Shared by the sbatch scripts in slurm/: find the repository, pick the Python, and launch ranks.
#   Under Slurm: one srun task per node, each running torchrun for that node's ranks; MASTER_ADDR/PORT come
#   from the allocation; optional container (pyxis --container-image, or apptainer for a .sif file).
#   Without Slurm: the same torchrun command on this machine.
# Environment knobs (all optional):
#   MATHTIR_ROOT             repository root (default: the sbatch submit directory, else this file's parent)
#   MATHTIR_PYTHON           interpreter (default: <root>/.venv/bin/python outside a container, else python3)
#   MATHTIR_NPROC_PER_NODE   ranks per node (default: GPUs on the node; 2 on a CPU-only machine)
#   MATHTIR_CONTAINER_IMAGE  container every step runs in (containers/: the train image for data, convert and
#                            train jobs, the eval image for eval.sh); MATHTIR_CONTAINER_RUNTIME=pyxis|apptainer
#                            (default: apptainer for a *.sif path, else pyxis); MATHTIR_CONTAINER_MOUNTS extra
#                            pyxis mounts
# shellcheck shell=bash

# The image is MATHTIR_CONTAINER_IMAGE and nothing else: a bare CONTAINER_IMAGE (an older spelling in the docs)
# would otherwise be ignored and the job would run on the host without a word.
if [ -n "${CONTAINER_IMAGE:-}" ] && [ -z "${MATHTIR_CONTAINER_IMAGE:-}" ]; then
  echo "mathtir: CONTAINER_IMAGE is set but the scripts read MATHTIR_CONTAINER_IMAGE; set that instead" >&2
  exit 2
fi

MATHTIR_ROOT=${MATHTIR_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$MATHTIR_ROOT" || { echo "mathtir: cannot cd to $MATHTIR_ROOT (set MATHTIR_ROOT)" >&2; exit 1; }

mathtir_python() {
  if [ -n "${MATHTIR_PYTHON:-}" ]; then echo "$MATHTIR_PYTHON"
  elif [ -z "${MATHTIR_CONTAINER_IMAGE:-}" ] && [ -x "$MATHTIR_ROOT/.venv/bin/python" ]; then
    echo "$MATHTIR_ROOT/.venv/bin/python"
  else echo python3; fi
}

mathtir_nproc_per_node() {
  if [ -n "${MATHTIR_NPROC_PER_NODE:-}" ]; then echo "$MATHTIR_NPROC_PER_NODE"; return; fi
  local gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  if [ "$gpus" -gt 0 ]; then echo "$gpus"; else echo 2; fi   # CPU smoke recipes use TP=2
}

# The container wrapper for srun (pyxis flags) or for the command itself (apptainer), one word per line.
mathtir_container_srun_args() {
  [ -n "${MATHTIR_CONTAINER_IMAGE:-}" ] || return 0
  [ "$(mathtir_container_runtime)" = pyxis ] || return 0
  echo "--container-image=$MATHTIR_CONTAINER_IMAGE"
  echo "--container-mounts=$MATHTIR_ROOT:$MATHTIR_ROOT${MATHTIR_CONTAINER_MOUNTS:+,$MATHTIR_CONTAINER_MOUNTS}"
  echo "--container-workdir=$MATHTIR_ROOT"
}

mathtir_container_exec_prefix() {
  [ -n "${MATHTIR_CONTAINER_IMAGE:-}" ] || return 0
  [ "$(mathtir_container_runtime)" = apptainer ] || return 0
  printf '%s\n' apptainer exec --nv --bind "$MATHTIR_ROOT" --pwd "$MATHTIR_ROOT" "$MATHTIR_CONTAINER_IMAGE"
}

mathtir_container_runtime() {
  if [ -n "${MATHTIR_CONTAINER_RUNTIME:-}" ]; then echo "$MATHTIR_CONTAINER_RUNTIME"
  elif [[ "${MATHTIR_CONTAINER_IMAGE:-}" == *.sif ]]; then echo apptainer
  else echo pyxis; fi
}

# The address of the allocation's first node as the other nodes reach it (NodeAddr, which is also right for
# emulated nodes whose names do not resolve).
mathtir_master_addr() {
  local head
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  scontrol show node "$head" --oneliner | tr ' ' '\n' | sed -n 's/^NodeAddr=//p'
}

# mathtir_plan_check NODES RANKS_PER_NODE RECIPE [key=value ...]: print the training layout's memory per device
# (`mathtir train plan`) and stop (exit 3) when it cannot fit the GPUs of this node, before any rank starts
# or loads a weight. Without a GPU (a CPU smoke run) it reports and never blocks. pipeline.sh runs the same
# check at submission, before anything waits in the queue.
mathtir_plan_check() {
  local nodes=$1 per_node=$2 mib
  shift 2
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n1 || true)
  local -a device=(--cpu)
  if [ -n "$mib" ]; then device=(--gpu-memory "$((mib / 1024))"); fi
  "$(mathtir_python)" -m mathtir train plan "$@" --nodes "$nodes" --gpus-per-node "$per_node" "${device[@]}"
}

# mathtir_launch COMMAND ARGS...: run `python -m mathtir COMMAND ARGS...` on every rank of the job (or locally).
# For `train`, mathtir_plan_check runs first (inside the container, on the first node).
# Stopping for a requeue, two ways in:
#   - the batch shell receives USR1 (`--signal=B:USR1@<seconds>`, before the time limit) or TERM: it asks the
#     trainer through MATHTIR_STOP_FILE to checkpoint and exit. Bash runs a trap only between foreground
#     commands, so the launch runs in the background and the shell waits for it.
#   - a preemption (PreemptMode=REQUEUE with a GraceTime) sends SIGTERM to the job's tasks, not to the batch
#     shell; the trainer traps it itself. torchrun would forward it and SIGKILL the ranks 30 s later, before a
#     large checkpoint is written, so the per-node torchrun ignores TERM (and USR1, which it would die of) and
#     waits for its ranks to exit; Slurm's SIGKILL at the end of the grace time still ends everything.
# Either way the trainer finishes its step, saves, writes "$MATHTIR_STOP_FILE.saved" and exits 0, and this
# shell requeues the job at once (not waiting for the end of a grace time, nor depending on a --signal
# having asked for it); the requeued run resumes from that checkpoint. The grace time must cover one step
# plus one checkpoint save.
mathtir_launch() {
  local python nproc
  python=$(mathtir_python)
  nproc=$(mathtir_nproc_per_node)
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    if [ "$1" = train ]; then mathtir_plan_check 1 "$nproc" "${@:2}" || exit; fi
    exec "$python" -m torch.distributed.run --standalone --nproc-per-node="$nproc" -m mathtir "$@"
  fi

  export MASTER_ADDR MASTER_PORT MATHTIR_STOP_FILE MATHTIR_ROOT
  MASTER_ADDR=$(mathtir_master_addr)
  # Below the kernel's ephemeral range (32768+ by default), where any outgoing connection may hold a port, and
  # below the job ports of slurm/ray_cluster.sh (21000+).
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 1000))}
  mkdir -p "$MATHTIR_ROOT/runs/.slurm"
  MATHTIR_STOP_FILE="$MATHTIR_ROOT/runs/.slurm/stop-$SLURM_JOB_ID"  # on the shared filesystem rank 0 sees
  rm -f "$MATHTIR_STOP_FILE" "$MATHTIR_STOP_FILE.saved"
  echo "mathtir: $(date -u +%FT%TZ) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s)," \
       "$nproc rank(s) per node, master $MASTER_ADDR:$MASTER_PORT"

  local -a srun_args exec_prefix
  mapfile -t srun_args < <(mathtir_container_srun_args)
  mapfile -t exec_prefix < <(mathtir_container_exec_prefix)
  trap 'echo "mathtir: USR1 received: checkpoint, then requeue"; touch "$MATHTIR_STOP_FILE"' USR1
  trap 'echo "mathtir: TERM received: checkpoint, then requeue"; touch "$MATHTIR_STOP_FILE"' TERM
  # SLURM_NODEID is per task, so it is expanded inside the task, not here. An ignored signal stays ignored
  # across exec; torchrun re-arms only what PET_SIGNALS_TO_HANDLE lists, the trainer re-arms TERM and USR1.
  # shellcheck disable=SC2016
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${srun_args[@]}" "${exec_prefix[@]}" bash -c '
    if [ "$SLURM_NODEID" = 0 ] && [ "$2" = train ]; then
      source "$MATHTIR_ROOT/slurm/common.sh" && mathtir_plan_check "$SLURM_JOB_NUM_NODES" "$1" "${@:3}" || exit
    fi
    trap "" TERM USR1
    export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
    exec "$0" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --node-rank="$SLURM_NODEID" \
      --nproc-per-node="$1" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" -m mathtir "${@:2}"
  ' "$python" "$nproc" "$@" &
  local step=$! rc=0
  # `wait` returns early (>128) when the trap fires; keep waiting until the step itself has ended.
  while true; do
    rc=0
    wait "$step" || rc=$?
    kill -0 "$step" 2>/dev/null || break
  done
  trap - USR1 TERM
  if [ -e "$MATHTIR_STOP_FILE.saved" ]; then
    echo "mathtir: $(date -u +%FT%TZ) checkpoint saved ($(cat "$MATHTIR_STOP_FILE.saved")); requeueing job $SLURM_JOB_ID"
    rm -f "$MATHTIR_STOP_FILE" "$MATHTIR_STOP_FILE.saved"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  rm -f "$MATHTIR_STOP_FILE"
  return "$rc"
}
