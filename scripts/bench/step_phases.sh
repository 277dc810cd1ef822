#!/usr/bin/env bash
# Wall time per training step split by phase (generate, score = reward + reference + critic in
# parallel, train, sync, controller overhead = step time not inside any worker call), averaged
# over the steps after the first, from a real `rlhf-coord launch` run's metrics.jsonl.
#   CONFIG (default configs/local.yaml, after scripts/demo.sh has made its assets), STEPS (50),
#   extra arguments are passed to launch (e.g. --set algorithm.name=ppo).
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(scripts/setup-torch.sh)"
cargo build --release -q -p rlhf-coord -p rlhf-worker
config=${CONFIG:-configs/local.yaml}
if [ "$config" = configs/local.yaml ] && [ ! -f runs/demo-assets/warm/config.json ]; then
  scripts/demo-data.sh runs/demo-assets
  [ -f runs/demo-assets/base/config.json ] || target/release/rlhf-coord init-model --preset tiny --seed 0 --out runs/demo-assets/base
  target/release/rlhf-coord sft configs/demo-warmup.yaml
fi
dir=$(mktemp -d)
target/release/rlhf-coord launch "$config" --set run.dir="$dir" --set run.name=bench \
  --set train.steps="${STEPS:-50}" --set logging.progress=false --set logging.plot=false "$@" 2>/dev/null
python3 - "$dir/bench/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]  # the first step warms up
keys = [("generate", "time/generate_s"), ("score (reward, reference, critic)", "time/score_s"),
        ("train (actor, critic)", "time/train_s"), ("sync", "time/sync_s"),
        ("controller overhead", "time/controller_s")]
step = sum(r["time/step_s"] for r in rows) / len(rows)
print(f"{len(rows)} steps, mean step {step * 1000:.1f} ms")
print("| phase | ms per step | share |")
print("| --- | ---: | ---: |")
for name, k in keys:
    v = sum(r[k] for r in rows) / len(rows)
    print(f"| {name} | {v * 1000:.1f} | {100 * v / step:.1f}% |")
PY
rm -rf "$dir"
