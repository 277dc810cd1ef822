#!/usr/bin/env bash
# Weight sync per RLHF step with a separate generator (disaggregated placement), for the tiny
# and small presets: after each step's training the actor broadcasts all its weights over
# rlhf-comm's TCP group to the generator worker, which stages them and swaps them in. Reported:
# bytes per sync, the sync phase's wall time (`time/sync_s` in metrics.jsonl: the SyncWeights
# RPCs on both ends, i.e. copying tensors out, the broadcast, copying them in) and what share of
# the step it is; next to it, the raw single-stream loopback TCP rate measured by rlhf-comm's
# comm_bench in the same run, and the time that rate would take for the same bytes.
#   ROUNDS (default 6) steps per preset; the first is left out of the means (warm-up).
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(scripts/setup-torch.sh)"
cargo build --release -q -p rlhf-coord -p rlhf-worker
cargo build --release -q -p rlhf-comm --example comm_bench
bin=$PWD/target/release
rounds=${ROUNDS:-6}
work=$(mktemp -d /tmp/wsync-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

for a in 0 1 2 3; do for b in 0 1 2 3; do
  echo "{\"prompt\": \"$a+$b=\", \"answer\": \"$((a + b))\"}"
done; done > "$work/prompts.jsonl"

# Raw loopback TCP between two processes, at the sizes the models have (the example prints
# one table row per size; the raw column is GB/s).
"$bin/examples/comm_bench" --max-mib 256 > "$work/comm.txt"

echo "| preset | MiB per sync | sync s (mean) | sync GB/s | share of step | raw TCP GB/s (same run) | raw time for the bytes s | sync / raw time |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for preset in tiny small; do
  "$bin/rlhf-coord" init-model --preset "$preset" --out "$work/$preset" 2>/dev/null
  cat > "$work/$preset.yaml" <<YAML
run: {name: $preset, dir: $work/runs, seed: 0}
launcher: {worker_bin: $bin/rlhf-worker}
workers:
  - {name: a, roles: [actor]}
  - {name: b, roles: [reward, reference, critic]}
  - {name: g, roles: [generator]}
models: {policy: $work/$preset, reward: {kind: exact_match}}
algorithm: {name: rloo, kl: {coef: 0.05}}
rollout: {prompts: $work/prompts.jsonl, batch_size: 2, samples_per_prompt: 2, max_new_tokens: 8}
train: {steps: $rounds, micro_batch_size: 4, replica_check_every: 0}
checkpoint: {every: 0}
logging: {progress: false, plot: false}
YAML
  "$bin/rlhf-coord" launch "$work/$preset.yaml" 2> "$work/$preset.log"
  python3 - "$preset" "$work/runs/$preset/metrics.jsonl" "$work/comm.txt" <<'PY'
import json, re, sys
preset, metrics, comm = sys.argv[1:]
rows = [json.loads(l) for l in open(metrics)][1:]
nbytes = rows[0]["sync/bytes"]
sync = sum(r["time/sync_s"] for r in rows) / len(rows)
step = sum(r["time/step_s"] for r in rows) / len(rows)
# Raw GB/s of the comm_bench row whose size is closest to the model's bytes.
best = None
for line in open(comm):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    m = re.match(r"(\d+) MiB", cells[0]) if cells else None
    if m and len(cells) >= 4:
        size = int(m.group(1)) << 20
        raw = float(cells[3])
        if best is None or abs(size - nbytes) < abs(best[0] - nbytes):
            best = (size, raw)
raw_s = nbytes / (best[1] * 1e9)
print(f"| {preset} | {nbytes / 2**20:.1f} | {sync:.3f} | {nbytes / sync / 1e9:.2f} | {100 * sync / step:.0f}% "
      f"| {best[1]:.2f} (at {best[0] >> 20} MiB) | {raw_s:.3f} | {sync / raw_s:.1f}x |")
PY
done
