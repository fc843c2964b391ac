# shellcheck shell=bash
# A Ray cluster inside a Slurm allocation, then a driver on it that samples TIR trajectories: sourced (after
# slurm/common.sh) by slurm/eval.sh and slurm/generate.sh with their arguments, which set RAY_JOB_SCRIPT (their
# name, for messages) and RAY_JOB_DRIVER (the ray_eval/ script the arguments go to).
#
# In a heterogeneous job the first component's nodes host the sampler actors with their GPUs and the other
# components' nodes the sandbox actors (custom resource "sandbox", EVAL_SANDBOX_PER_NODE units each). In a
# plain job the first EVAL_GPU_NODES nodes (default: 1) are the sampler nodes and the rest sandbox nodes
# (so request GPUs only where they are used, e.g. a CPU partition job plus a GPU node); with a single node
# it hosts both. With MATHTIR_CONTAINER_IMAGE (slurm/common.sh) the Ray head, the workers and the driver
# all run in that image, each as an srun step. The Ray head runs on the first node; its dashboard / Jobs API
# binds to that node's internal address (or EVAL_DASHBOARD_HOST, e.g. 127.0.0.1), never 0.0.0.0. Token authentication is on by default
# with a fresh token for this job, shared with every Ray process of the job through the environment.
# Every other port a Ray process of the job opens (GCS, Ray Client, node and object managers, dashboard
# agent, runtime env agent, workers) is fixed per job and checks the token; the agents' HTTP ports and the Ray
# Client bind the node's internal address (its Slurm NodeAddr), while Ray 2.60's core gRPC servers (GCS,
# raylet, workers) and the dashboard agent's gRPC port bind every interface of a node whose address is not
# loopback, with no option to narrow them.
# The servers that would answer without the token are not started: the agents' Prometheus exporter
# (RAY_enable_metrics_collection=0) and the autoscaler monitor with its metrics port (--no-monitor; an
# allocation's nodes are fixed). Left, because Ray 2.60 has no switch for it: the dashboard head's own
# read-only Prometheus exporter (port 44227, every interface). README, security notes.
# Ray is torn down (steps killed by pid) when the calling script ends, however it ends.
#
# Knobs: EVAL_GPU_NODES, EVAL_SANDBOX_PER_NODE (default: CPUs/4), EVAL_RAY_PORT (the first of the job's eight
#        Ray ports, 1000 apart; default 21000 + job id % 1000),
#        EVAL_DASHBOARD_HOST, EVAL_RAY_AUTH_MODE (token|disabled), EVAL_OBJECT_STORE_MB (default 2048),
#        MATHTIR_PYTHON / MATHTIR_ROOT (slurm/common.sh).

: "${RAY_JOB_SCRIPT:?set by the sourcing script}" "${RAY_JOB_DRIVER:?set by the sourcing script}"
[ -n "${SLURM_JOB_ID:-}" ] || { echo "$RAY_JOB_SCRIPT: submit with sbatch (locally: python $RAY_JOB_DRIVER ...)" >&2; exit 2; }

PYTHON=$(mathtir_python)
RAY="$(dirname "$PYTHON")/ray"
[ -x "$RAY" ] || RAY=ray
# Every step runs in the container image when one is set: srun's pyxis flags or an apptainer prefix.
mapfile -t CONTAINER_SRUN_ARGS < <(mathtir_container_srun_args)
mapfile -t CONTAINER_EXEC < <(mathtir_container_exec_prefix)
# NODES with, per node, the srun flag that selects its component of a heterogeneous job (empty otherwise).
NODES=() NODE_GROUP_ARGS=()
if [ -n "${SLURM_HET_SIZE:-}" ]; then
  for group in $(seq 0 $(( SLURM_HET_SIZE - 1 ))); do
    nodelist_var="SLURM_JOB_NODELIST_HET_GROUP_$group"
    mapfile -t group_nodes < <(scontrol show hostnames "${!nodelist_var}")
    NODES+=("${group_nodes[@]}")
    for _ in "${group_nodes[@]}"; do NODE_GROUP_ARGS+=("--het-group=$group"); done
    if [ "$group" -eq 0 ]; then GPU_NODES=${#group_nodes[@]}; fi
  done
else
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  for _ in "${NODES[@]}"; do NODE_GROUP_ARGS+=(""); done
  GPU_NODES=${EVAL_GPU_NODES:-1}
fi
# step INDEX COMMAND...: COMMAND as an srun step on node INDEX, in the container image when one is set.
step() {
  local index=$1; shift
  local -a group=()
  [ -z "${NODE_GROUP_ARGS[$index]}" ] || group=("${NODE_GROUP_ARGS[$index]}")
  srun "${group[@]}" --nodes=1 --ntasks=1 --overlap -w "${NODES[$index]}" "${CONTAINER_SRUN_ARGS[@]}" \
    "${CONTAINER_EXEC[@]}" "$@"
}
CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
SANDBOX_PER_NODE=${EVAL_SANDBOX_PER_NODE:-$(( CPUS / 4 > 0 ? CPUS / 4 : 1 ))}
GPUS_PER_NODE=0
if command -v nvidia-smi >/dev/null 2>&1; then GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
# Every port the job's Ray listens on is fixed per job, so that a firewall can name them: eight, 1000 apart,
# from 21000 + job id % 1000 (21000-28999: above Ray's worker ports 10002-19999 and the trainer's master port,
# slurm/common.sh). All stay below the kernel's ephemeral range: a port in it can be held at any moment by an
# outgoing connection of any process on the node (a Ray Client port of 34009 once failed that way).
RAY_PORT=${EVAL_RAY_PORT:-$(( 21000 + SLURM_JOB_ID % 1000 ))}
DASHBOARD_PORT=$(( RAY_PORT + 1000 ))
CLIENT_PORT=$(( RAY_PORT + 2000 ))
NODE_MANAGER_PORT=$(( RAY_PORT + 3000 ))
OBJECT_MANAGER_PORT=$(( RAY_PORT + 4000 ))
AGENT_LISTEN_PORT=$(( RAY_PORT + 5000 ))
AGENT_GRPC_PORT=$(( RAY_PORT + 6000 ))
RUNTIME_ENV_AGENT_PORT=$(( RAY_PORT + 7000 ))
EPHEMERAL_FIRST=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
if [ "$RAY_PORT" -lt 1024 ] || [ "$RUNTIME_ENV_AGENT_PORT" -ge "$EPHEMERAL_FIRST" ]; then
  echo "$RAY_JOB_SCRIPT: EVAL_RAY_PORT=$RAY_PORT: the job's Ray ports $RAY_PORT-$RUNTIME_ENV_AGENT_PORT (8, 1000" \
       "apart) must lie between 1024 and the kernel's ephemeral range ($EPHEMERAL_FIRST+)" >&2
  exit 2
fi
HEAD_IP=$(mathtir_master_addr)
DASHBOARD_HOST=${EVAL_DASHBOARD_HOST:-$HEAD_IP}
OBJECT_STORE_BYTES=$(( ${EVAL_OBJECT_STORE_MB:-2048} * 1024 * 1024 ))
# A short per-job temp dir: Ray puts unix sockets under it (107-byte path limit).
RAY_TMP="/tmp/ray-$SLURM_JOB_ID"

export RAY_AUTH_MODE=${EVAL_RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  RAY_AUTH_TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')  # the host needs no Python
  export RAY_AUTH_TOKEN
fi
export RAY_USAGE_STATS_ENABLED=0
# Workers at the normal priority (Ray's default niceness 15 starves them beside another job's busy processes
# on a shared node; mathtir/eval/embedded_ray.py ray_env).
export RAY_worker_niceness=0
# No Prometheus exporter in the agents: it binds every interface and answers without the token.
export RAY_enable_metrics_collection=0

# The resources one node offers: samplers need GPUs, sandboxes the "sandbox" resource. A node's IP is its
# NodeAddr (emulated nodes share a hostname), which is also what Ray binds.
node_args() {
  local index=$1 node=$2 ip
  ip=$(scontrol show node "$node" --oneliner | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
  local args=("--node-ip-address=$ip" "--num-cpus=$CPUS" "--temp-dir=$RAY_TMP-$index"
              "--object-store-memory=$OBJECT_STORE_BYTES" "--disable-usage-stats"
              "--node-manager-port=$NODE_MANAGER_PORT" "--object-manager-port=$OBJECT_MANAGER_PORT"
              "--dashboard-agent-listen-port=$AGENT_LISTEN_PORT" "--dashboard-agent-grpc-port=$AGENT_GRPC_PORT"
              "--runtime-env-agent-port=$RUNTIME_ENV_AGENT_PORT")
  if [ "$index" -lt "$GPU_NODES" ]; then
    args+=("--num-gpus=$GPUS_PER_NODE")
    # With one node it hosts the sandboxes as well.
    if [ "${#NODES[@]}" -eq 1 ]; then args+=("--resources={\"sandbox\": $SANDBOX_PER_NODE}"); fi
  else
    args+=("--num-gpus=0" "--resources={\"sandbox\": $SANDBOX_PER_NODE}")
  fi
  printf '%s\n' "${args[@]}"
}

STEP_PIDS=()
teardown() {
  local pid
  for pid in "${STEP_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${STEP_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap teardown EXIT

mapfile -t HEAD_ARGS < <(node_args 0 "${NODES[0]}")
echo "$RAY_JOB_SCRIPT: Ray head on ${NODES[0]} ($HEAD_IP:$RAY_PORT), dashboard $DASHBOARD_HOST:$DASHBOARD_PORT," \
     "${#NODES[@]} node(s), $GPU_NODES sampler node(s), $SANDBOX_PER_NODE sandbox unit(s) per sandbox node"
step 0 "$RAY" start --head --block --no-monitor --port="$RAY_PORT" --dashboard-host="$DASHBOARD_HOST" \
  --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$CLIENT_PORT" "${HEAD_ARGS[@]}" &
HEAD_PID=$!
STEP_PIDS+=("$HEAD_PID")

export RAY_ADDRESS="$HEAD_IP:$RAY_PORT"
NODES_ALIVE_PY='
import sys, ray
ray.init(logging_level="ERROR")
alive = sum(n["Alive"] for n in ray.nodes())
sys.exit(0 if alive >= int(sys.argv[1]) else 1)'
# A probe against a head that has died would wait for its GCS far beyond the deadline: each is bounded, and
# the head's step is checked between them (a head that fails to start, e.g. on a port in use, ends the job).
wait_for_nodes() {
  local want=$1 deadline=$(( SECONDS + 300 ))
  until step 0 timeout 60 "$PYTHON" -c "$NODES_ALIVE_PY" "$want" 2>/dev/null
  do
    kill -0 "$HEAD_PID" 2>/dev/null || { echo "$RAY_JOB_SCRIPT: the Ray head exited (its log is above)" >&2; exit 1; }
    [ "$SECONDS" -lt "$deadline" ] || { echo "$RAY_JOB_SCRIPT: fewer than $want Ray node(s) after 300 s" >&2; exit 1; }
    sleep 5
  done
}
wait_for_nodes 1

for index in $(seq 1 $(( ${#NODES[@]} - 1 ))); do
  mapfile -t WORKER_ARGS < <(node_args "$index" "${NODES[$index]}")
  step "$index" "$RAY" start --block --address="$RAY_ADDRESS" "${WORKER_ARGS[@]}" &
  STEP_PIDS+=($!)
done
wait_for_nodes "${#NODES[@]}"
echo "$RAY_JOB_SCRIPT: all ${#NODES[@]} Ray node(s) joined; starting $RAY_JOB_DRIVER"

step 0 "$PYTHON" "$RAY_JOB_DRIVER" "$@"
