#!/usr/bin/env bash
# A/B of `rollout.async_generation` on the RLOO benchmark's configuration: the placement of
# scripts/bench/rloo_vs_trl.sh plus a `generator` worker (2 threads), once synchronous and once
# with one-step off-policy sampling, at both model sizes; median step time of steps 2.. and the
# phases. Run scripts/bench/rloo_vs_trl.sh first (it makes the models, prompts and run files
# under target/bench/rloo). Not part of the tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(scripts/setup-torch.sh)"
cargo build --release -q -p rlhf-coord -p rlhf-worker
w=target/bench/rloo
[ -f "$w/run-20m.yaml" ] || { echo "run scripts/bench/rloo_vs_trl.sh first" >&2; exit 2; }
cd "$w"
echo "| model | mode | step s | generate s | score s | train s | sync s | wait for prefetch s |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for size in 2m 20m; do
  for mode in sync async; do
    name=ab-$size-$mode
    sed -e "s/name: bench-$size/name: $name/" \
      -e 's/  - {name: reward, roles: \[reward, critic\], threads: 1}/&\n  - {name: gen, roles: [generator], threads: 2}/' \
      "run-$size.yaml" > "$name.yaml"
    [ "$mode" = async ] && sed -i 's/max_new_tokens: 32}/max_new_tokens: 32, async_generation: true}/' "$name.yaml"
    rm -rf "runs/$name"
    ../../release/rlhf-coord launch "$name.yaml" >/dev/null 2>&1
    python3 - "runs/$name/metrics.jsonl" "$size" "$mode" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
med = lambda k: statistics.median(r.get(k, 0.0) for r in rows)
print(f"| {sys.argv[2]} | {sys.argv[3]} | {med('time/step_s'):.3f} | {med('time/generate_s'):.3f} | "
      f"{med('time/score_s'):.3f} | {med('time/train_s'):.3f} | {med('time/sync_s'):.3f} | {med('time/wait_prefetch_s'):.3f} |")
PY
  done
done
