#!/usr/bin/env bash
# Peak memory and step time of a training forward + backward with and without activation
# checkpointing (`train.gradient_checkpointing`), against the arithmetic: three shapes, each
# mode in fresh processes (crates/rlhf-model/examples/ckpt_memory.rs). Numbers in
# docs/benchmarks.md ("Activation checkpointing").
# Usage: scripts/bench/grad_ckpt_bench.sh [ROUNDS] [ITERS]   (default 2 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(scripts/setup-torch.sh)"
cargo build --release -q -p rlhf-model --example ckpt_memory
bin=${CARGO_TARGET_DIR:-target}/release/examples/ckpt_memory
rounds=${1:-2}
iters=${2:-2}
#         layers hidden inter heads kv vocab batch seq
for shape in "8 512 1408 8 4 4096 4 256" \
             "8 512 1408 8 4 4096 1 1024" \
             "16 256 704 4 4 512 8 256"; do
  # shellcheck disable=SC2086
  "$bin" $shape "$rounds" "$iters"
  echo
done
