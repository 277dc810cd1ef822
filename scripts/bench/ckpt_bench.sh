#!/usr/bin/env bash
# Checkpoint cost of an RLHF run for the tiny and small presets: bytes per checkpoint, save time
# (workers' SaveState + manifest with sha256 + fsync + rename) and load time on resume, against
# the disk's sequential write speed measured in the same run with `dd ... conv=fsync` into the
# same directory. Target: save throughput >= 50% of the disk's.
#   ROUNDS (default 3) saves are timed per preset (checkpoint.every = 1, one per step);
#   WORK (default a fresh mktemp -d under /tmp): the directory on the disk being measured.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(scripts/setup-torch.sh)"
cargo build --release -q -p rlhf-coord -p rlhf-worker
bin=$PWD/target/release
rounds=${ROUNDS:-3}
work=${WORK:-$(mktemp -d /tmp/ckpt-bench.XXXXXX)}
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

disk_mb_s() {
  # $1 MiB of zeros in 1 MiB blocks, fsync'd before dd reports; MB/s (10^6 bytes) from its line.
  dd if=/dev/zero of="$work/dd.bin" bs=1M count="$1" conv=fsync 2>&1 | tail -1 |
    python3 -c 'import re,sys; l=sys.stdin.read(); b,s=re.search(r"^(\d+) bytes.*copied, ([\d.]+) s",l).groups(); print(f"{int(b)/float(s)/1e6:.1f}")'
  rm -f "$work/dd.bin"
}

for a in 0 1 2 3; do for b in 0 1 2 3; do
  echo "{\"prompt\": \"$a+$b=\", \"answer\": \"$((a + b))\"}"
done; done > "$work/prompts.jsonl"

echo "| preset | checkpoint MiB | save s | save MB/s | dd 1 GiB MB/s | save / dd 1 GiB | dd same size MB/s | save / dd same size | load s |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for preset in tiny small; do
  "$bin/rlhf-coord" init-model --preset "$preset" --out "$work/$preset" 2>/dev/null
  cat > "$work/$preset.yaml" <<YAML
run: {name: $preset, dir: $work/runs, seed: 0}
launcher: {worker_bin: $bin/rlhf-worker}
workers:
  - {name: a, roles: [actor]}
  - {name: b, roles: [reward, reference, critic]}
models: {policy: $work/$preset, reward: {kind: exact_match}}
algorithm: {name: rloo, kl: {coef: 0.05}}
rollout: {prompts: $work/prompts.jsonl, batch_size: 2, samples_per_prompt: 2, max_new_tokens: 4}
train: {steps: $rounds, micro_batch_size: 4}
checkpoint: {every: 1, keep_last: 1}
logging: {progress: false, plot: false}
YAML
  disk1=$(disk_mb_s 1024)
  RLHF_LOG=info "$bin/rlhf-coord" launch "$work/$preset.yaml" 2> "$work/$preset.save.log"
  disk2=$(disk_mb_s 1024)
  mib=$(du -sm "$work/runs/$preset/checkpoints/step-$(printf %06d "$rounds")" | cut -f1)
  same=$(disk_mb_s "$mib")
  RLHF_LOG=info "$bin/rlhf-coord" launch "$work/$preset.yaml" --set train.steps=$((rounds + 1)) \
    2> "$work/$preset.load.log"
  python3 - "$preset" "$work/$preset.save.log" "$work/$preset.load.log" "$disk1" "$disk2" "$same" <<'PY'
import re, sys
preset, save_log, load_log, d1, d2, same = sys.argv[1:]
strip = lambda s: re.sub(r"\x1b\[[0-9;]*m", "", s)
saves = [(int(re.search(r"bytes=(\d+)", l).group(1)), float(re.search(r" secs=([\d.e-]+)", l).group(1)))
         for l in map(strip, open(save_log)) if "checkpoint saved" in l]
loads = [float(re.search(r" secs=([\d.e-]+)", l).group(1))
         for l in map(strip, open(load_log)) if "state restored" in l]
assert saves and loads, "no checkpoint lines in the logs"
b = sum(x[0] for x in saves) / len(saves)
s = sum(x[1] for x in saves) / len(saves)
disk = (float(d1) + float(d2)) / 2
mbs = b / s / 1e6
same = float(same)
print(f"| {preset} | {b / 2**20:.1f} | {s:.3f} | {mbs:.1f} | {disk:.1f} | {100 * mbs / disk:.0f}% | {same:.1f} | {100 * mbs / same:.0f}% | {loads[0]:.3f} |")
PY
done
