#!/usr/bin/env bash
# The GPU checks, on a machine with one CUDA GPU and PyTorch (2.11, any CUDA build) but no Rust:
# run scripts/gpu/bundle.sh on a build machine, bring `.gpu/` and this checkout along, then
#   scripts/gpu/checks.sh [OUT_DIR]
# from the repository root. Runs, each under a timeout: the CUDA-gated tests (rlhf-comm NCCL,
# rlhf-algo and rlhf-model device tests), the demo's SFT warm-up and 300 RLOO steps with three
# worker processes on the GPU (configs/gpu/), PPO with four processes and a checkpoint resume, a
# separate generator process on the same GPU (collective_backend auto and tcp: weight sync over
# TCP; nccl: refused with a clear error, NCCL cannot run two ranks on one GPU), and the model
# benchmark against transformers on CUDA. OUT_DIR (default runs/gpu/out) gets the logs,
# metrics.jsonl/png of the RLOO run, bench.jsonl and summary.txt (one RESULT line per check).
# Environment: PY (python with torch, default python3), NCCL_LIB (libnccl.so.2; default: the
# one in PY's site-packages), BENCH (workload for bench_model, default "64 64 128 16 512 3 4").
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=${1:-runs/gpu/out}
mkdir -p "$out" && out=$(cd "$out" && pwd)
: >"$out/summary.txt"
py=${PY:-python3}
rm -rf .gpu/bin runs/gpu/demo runs/gpu/ppo runs/gpu/gen runs/gpu/gentcp runs/gpu/gennccl
tar -C .gpu -xJf .gpu/bins.tar.xz || { echo "no .gpu/bins.tar.xz: run scripts/gpu/bundle.sh first" >&2; exit 1; }
bin=$root/.gpu/bin
site=$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
export LD_LIBRARY_PATH=$site/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export RLHF_NCCL_LIBRARY=${NCCL_LIB:-$(find "$site" -name 'libnccl.so.2' | head -1)}
export RLHF_TEST_CUDA=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
echo "libtorch: $site/torch/lib  nccl: $RLHF_NCCL_LIBRARY"
nvidia-smi -L
step() { echo; echo "=== $1 (t=${SECONDS}s)"; }
result() { echo "RESULT $1 rc=$2" | tee -a "$out/summary.txt"; }
# A run's per-step sync bytes, sync seconds and reward.
syncs() {
  "$py" -c "import json; r=[json.loads(l) for l in open('runs/gpu/$1/metrics.jsonl')]
print('$1 (step, sync/bytes, time/sync_s, reward_mean):', [(x['step'], x.get('sync/bytes'), round(x.get('time/sync_s', 0), 4), x['reward_mean']) for x in r])"
}
C=$bin/rlhf-coord

step "rlhf-comm NCCL tests"
timeout 120 "$bin/nccl" --test-threads=1 --nocapture 2>&1 | tail -25; result nccl "${PIPESTATUS[0]}"
step "rlhf-algo device tests"
timeout 90 "$bin/algo-device" 2>&1 | tail -6; result algo-device "${PIPESTATUS[0]}"
step "rlhf-model device tests"
timeout 120 "$bin/model-device" --test-threads=1 2>&1 | tail -8; result model-device "${PIPESTATUS[0]}"

step "demo data, tiny model, SFT warm-up on cuda"
scripts/demo-data.sh runs/gpu/demo-assets
[ -f runs/gpu/demo-assets/base/config.json ] ||
  $C init-model --arch llama --preset tiny --seed 0 --out runs/gpu/demo-assets/base 2>&1 | tail -1
timeout 120 $C sft configs/gpu/warmup.yaml 2>&1 | tail -2; result sft "${PIPESTATUS[0]}"

step "RLOO demo, 300 steps, 3 worker processes on cuda"
timeout 240 $C launch configs/gpu/rloo.yaml >"$out/rloo.log" 2>&1; result rloo $?
tail -2 "$out/rloo.log"
cp runs/gpu/demo/metrics.jsonl runs/gpu/demo/metrics.png "$out/" 2>/dev/null
"$py" -c "import json; r=[json.loads(l) for l in open('runs/gpu/demo/metrics.jsonl')]
w=[x['reward_mean'] for x in r]; s=sorted(x['time/step_s'] for x in r)
print(f'RLOO on cuda: {len(r)} steps, reward first 25 {sum(w[:25])/25:.3f}, last 50 {sum(w[-50:])/50:.3f}, median step {s[len(s)//2]:.4f} s')"

step "PPO, 4 worker processes on cuda, checkpoint every 2 steps; relaunch to 6 resumes"
timeout 120 $C launch configs/gpu/ppo.yaml >"$out/ppo.log" 2>&1; result ppo $?
timeout 120 $C launch configs/gpu/ppo.yaml --set train.steps=6 >"$out/ppo-resume.log" 2>&1
rc=$?; grep -q "resuming from checkpoint" "$out/ppo-resume.log" || rc=99
result ppo-resume $rc; echo "metrics rows: $(wc -l <runs/gpu/ppo/metrics.jsonl) (want 6)"

step "separate generator process on the same GPU"
for backend in auto tcp; do
  timeout 120 $C launch configs/gpu/gen.yaml --set launcher.collective_backend=$backend \
    --set run.name=gen-$backend >"$out/gen-$backend.log" 2>&1
  result "generator-$backend" $?
  grep "forming collective group" "$out/gen-$backend.log" | head -2; syncs "gen-$backend"
done
timeout 60 $C launch configs/gpu/gen.yaml --set launcher.collective_backend=nccl \
  --set run.name=gen-nccl >"$out/gen-nccl.log" 2>&1
rc=$?; grep "NCCL cannot run two ranks on one GPU" "$out/gen-nccl.log" || rc=0
result "generator-nccl-refused(want rc=1)" $rc

step "model benchmark on cuda: rlhf-model vs transformers $("$py" -c 'import transformers; print(transformers.__version__)')"
[ -f runs/gpu/small/config.json ] || $C init-model --arch llama --preset small --out runs/gpu/small 2>&1 | tail -1
read -r -a w <<<"${BENCH:-64 64 128 16 512 3 4}"
for r in 1 2; do
  timeout 120 "$bin/bench_model" runs/gpu/small "${w[@]}" cuda 2>&1 | tail -1 | tee -a "$out/bench.jsonl"
  timeout 120 "$py" scripts/bench/hf_bench.py runs/gpu/small "${w[@]}" cuda 2>/dev/null | tail -1 | tee -a "$out/bench.jsonl"
done
echo; echo "done in ${SECONDS}s"; cat "$out/summary.txt"
! grep -qv "rc=0$\|want rc=1) rc=1$" "$out/summary.txt"
