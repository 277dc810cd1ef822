#!/usr/bin/env bash
# The main job: a real RLHF run on this machine. Installs PyTorch (libtorch) and builds on first
# use, makes a tiny Llama and the arithmetic data (scripts/demo-data.sh), warms the model up
# with a short SFT (configs/demo-warmup.yaml), then runs `rlhf-coord launch configs/local.yaml`:
# RLOO with an exact-match reward over three worker processes, with a progress bar. Results:
# runs/demo/metrics.jsonl and runs/demo/metrics.png (reward and KL per step).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup-torch.sh)"
cargo build --release -p rlhf-coord -p rlhf-worker --features rlhf-coord/https
bin=target/release/rlhf-coord
assets=runs/demo-assets
scripts/demo-data.sh "$assets"
[ -f "$assets/base/config.json" ] || $bin init-model --arch llama --preset tiny --seed 0 --out "$assets/base"
[ -f "$assets/warm/config.json" ] || $bin sft configs/demo-warmup.yaml
rm -rf runs/demo
$bin launch configs/local.yaml "$@"
echo "metrics: runs/demo/metrics.jsonl   plot: runs/demo/metrics.png"
