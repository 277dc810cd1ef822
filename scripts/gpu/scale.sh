#!/usr/bin/env bash
# Issue 17's GPU run (docs/gpu.md, "Training at size"), on a machine with one CUDA GPU and
# PyTorch 2.11 but no Rust: run scripts/gpu/bundle.sh on a build machine, bring `.gpu/` and this
# checkout along, then from the repository root
#   scripts/gpu/scale.sh [OUT_DIR]                # ~6 minutes on an H200 (estimate; see docs/gpu.md)
# 1. a Qwen2.5-1.5B-shaped model (random weights, drawn on the GPU) trained by GRPO in bf16 mixed
#    precision with activation checkpointing (configs/gpu/grpo-1.5b.yaml);
# 2. a Llama-3-8B-shaped model trained as LoRA adapters (configs/gpu/lora-8b.yaml).
# For each: `rlhf-coord plan`'s estimate, the per-step phases and tokens/s from metrics.jsonl, the
# peak GPU memory of each worker process as nvidia-smi sees it (the caching allocator's reserved
# memory, an upper bound of the allocator's peak), and MFU (model FLOPs, 6·N per trained token
# and 2·N per generated or reference-scored token, over the GPU's dense bf16 peak, PEAK_TFLOPS,
# default 989 for H100/H200 SXM). OUT_DIR (default runs/gpu/scale) gets the logs, metrics and
# summary.txt.
# SMOKE=1 runs the same script on the CPU with tiny models (2 steps, short responses): a check
# of the script itself, for the build machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=${1:-runs/gpu/scale}
mkdir -p "$out" && out=$(cd "$out" && pwd)
: >"$out/summary.txt"
py=${PY:-python3}
smoke=${SMOKE:-0}
if [ "$smoke" = 1 ]; then
  C=${C:-$root/target/debug/rlhf-coord}
  dev=cpu
  presets="tiny tiny"
  smoke_set=(--set train.steps=2 --set rollout.max_new_tokens=8 --set rollout.batch_size=4
    --set train.minibatch_size=32 --set train.micro_batch_size=8 --set models.dtype=f32)
else
  rm -rf .gpu/bin
  tar -C .gpu -xJf .gpu/bins.tar.xz || { echo "no .gpu/bins.tar.xz: run scripts/gpu/bundle.sh first" >&2; exit 1; }
  C=$root/.gpu/bin/rlhf-coord
  site=$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
  export LD_LIBRARY_PATH=$site/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  dev=cuda
  presets="qwen2.5-1.5b llama3-8b"
  smoke_set=()
  nvidia-smi -L
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
step() { echo; echo "=== $1 (t=${SECONDS}s)"; }
result() { echo "RESULT $1 rc=$2" | tee -a "$out/summary.txt"; }

scripts/demo-data.sh runs/gpu/demo-assets >/dev/null
read -r p15 p8 <<<"$presets"

# Samples every worker process's GPU memory every 200 ms into $out/$1.gpumem (pid, MiB) until
# killed; prints nothing on the CPU.
sample_gpu_memory() {
  [ "$dev" = cuda ] || return 0
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 200 \
    >"$out/$1.gpumem" 2>/dev/null &
  echo $!
}

# One run: the model, the plan, the training run with the memory sampler beside it, the summary.
run_one() {
  local name=$1 preset=$2 arch=$3 cfg=configs/gpu/$1.yaml model=runs/gpu/$4
  step "$name: init-model --preset $preset"
  rm -rf "$model" "runs/gpu/$name"
  timeout 300 $C init-model --arch "$arch" --preset "$preset" --dtype bfloat16 --device "$dev" \
    --out "$model" 2>&1 | tail -1
  result "$name-init" "${PIPESTATUS[0]}"
  local run_cfg=$cfg
  if [ "$smoke" = 1 ]; then
    run_cfg=$out/$name.yaml
    sed 's/device: cuda/device: cpu/' "$cfg" >"$run_cfg"
    sed -i "s#\.\./\.\./runs/gpu#$root/runs/gpu#g" "$run_cfg"
  fi
  step "$name: plan"
  $C plan "$run_cfg" "${smoke_set[@]}" 2>&1 | tee "$out/$name.plan" | head -40
  step "$name: launch"
  local sampler
  sampler=$(sample_gpu_memory "$name")
  timeout 420 $C launch "$run_cfg" "${smoke_set[@]}" >"$out/$name.log" 2>&1
  result "$name" $?
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  tail -3 "$out/$name.log"
  cp "runs/gpu/$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null
  "$py" scripts/gpu/scale_summary.py "$out" "$name" "$model" | tee -a "$out/summary.txt"
}

run_one grpo-1.5b "$p15" qwen2 qwen2.5-1.5b
run_one lora-8b "$p8" llama llama3-8b
echo; echo "done in ${SECONDS}s"; cat "$out/summary.txt"
! grep -q "rc=[1-9]" "$out/summary.txt"
