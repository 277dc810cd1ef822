#!/usr/bin/env bash
# The main job, for now: make a small random Llama-family model in HF layout and generate from
# it through the chat template. Installs PyTorch (libtorch) and builds on first use.
#   DEMO_DIR  where the model goes (default: runs/demo-model)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup-torch.sh)"
cargo build --release -p rlhf-coord
dir=${DEMO_DIR:-runs/demo-model}
[ -f "$dir/config.json" ] || target/release/rlhf-coord init-model --arch llama --preset small --out "$dir"
target/release/rlhf-coord generate "$dir" --prompt "What is reinforcement learning from human feedback?" \
  --chat --temperature 0.8 --top-p 0.95 --max-new-tokens 48 --seed 1
