#!/usr/bin/env bash
# Training-state memory per actor replica against the number of replicas N and
# `train.zero_stage`, next to `rlhf-coord plan`'s estimate, and the step time of ZeRO stages
# 0, 1 and 2 at N = 2; `small` preset (27.8M parameters, f32), RLOO, every actor replica alone
# in its worker on the CPU (TCP collectives). Numbers in docs/benchmarks.md ("Sharded optimizer
# state (ZeRO) on CPU").
#
# Memory: each worker logs the peak resident set of every TrainStep (`train step memory ...
# peak_rss_bytes=`, the kernel's high-water mark reset when the step starts); the table shows
# the last step's peak of the largest replica less the process baseline, the same measurement
# on the `tiny` preset (0.1M parameters) at the same N less plan's estimate for it.
# Time: the N = 2 runs of the three stages are interleaved (0 1 2 0 1 2 ...) ROUNDS times, as
# the machine is shared; `time/train_s` and `time/step_s` of every step but each run's first.
#
# Usage: scripts/bench/zero_bench.sh            (ROUNDS=3 STEPS=4 NEW_TOKENS=64 PROFILE=release)
# PROFILE=debug uses the dev profile's binaries (libtorch is optimised either way; our own
# loops, e.g. the TCP ring's sums, are at opt-level 1 there).
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(scripts/setup-torch.sh)"
profile=${PROFILE:-release}
if [ "$profile" = release ]; then
  cargo build --release -q -p rlhf-coord -p rlhf-worker
else
  cargo build -q -p rlhf-coord -p rlhf-worker
fi
bin=${CARGO_TARGET_DIR:-$PWD/target}/$profile
rounds=${ROUNDS:-3}
steps=${STEPS:-4}
new_tokens=${NEW_TOKENS:-64}
work=$(mktemp -d /tmp/zero-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); $profile build"
echo "command: ROUNDS=$rounds STEPS=$steps NEW_TOKENS=$new_tokens PROFILE=$profile scripts/bench/zero_bench.sh"

for preset in tiny small; do
  "$bin/rlhf-coord" init-model --preset "$preset" --out "$work/$preset" > /dev/null
done
for a in 0 1 2 3; do for b in 0 1 2 3; do
  echo "{\"prompt\": \"$a+$b=\", \"answer\": \"$((a + b))\"}"
done; done > "$work/prompts.jsonl"
# The longest chat-templated prompt of PRESET's tokenizer in tokens: plan's sequence is
# max_prompt_tokens + max_new_tokens, so setting it to this makes it the length runs train on.
prompt_len() {
  python3 - "$work/$1" "$work/prompts.jsonl" <<'EOF'
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
lines = open(sys.argv[2]).read().splitlines()
def length(line):
    chat = [{"role": "user", "content": json.loads(line)["prompt"]}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    # transformers 5 answers a BatchEncoding, 4 a list of ids.
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
print(max(length(l) for l in lines))
EOF
}
declare -A prompt_tokens=([tiny]=$(prompt_len tiny) [small]=$(prompt_len small))
echo "prompt tokens: small ${prompt_tokens[small]}, tiny ${prompt_tokens[tiny]}; new tokens: $new_tokens"

# run NAME PRESET N STAGE STEPS: one launch; its directory is $work/runs/NAME.
run() {
  local name=$1 preset=$2 n=$3 stage=$4 nsteps=$5 actors="" i
  for i in $(seq 1 "$n"); do
    actors+="  - {name: a$i, roles: [actor], threads: 1}"$'\n'
  done
  cat > "$work/$name.yaml" <<EOF
run: {name: $name, dir: runs, seed: 3}
launcher: {worker_bin: $bin/rlhf-worker, heartbeat_timeout_ms: 120000, startup_timeout_s: 300, collective_timeout_s: 300}
workers:
$actors  - {name: b, roles: [reference, reward, critic], threads: 1}
models: {policy: $preset, reward: {kind: exact_match}}
algorithm: {name: rloo, kl: {coef: 0.05}}
rollout: {prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: $new_tokens, max_prompt_tokens: ${prompt_tokens[$preset]}}
train: {steps: $nsteps, epochs: 1, micro_batch_size: 2, zero_stage: $stage, replica_check_every: 0}
checkpoint: {every: 0}
logging: {progress: false, plot: false}
EOF
  "$bin/rlhf-coord" plan --json "$work/$name.yaml" > "$work/$name.plan.json"
  # Blocks above 64 KiB come from mmap and go back to the OS when freed, so the resident set
  # follows the live tensors (the plan_memory test does the same); glibc's default keeps freed
  # heap pages resident, ~140 MiB of slack from the second step on.
  MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 RLHF_LOG=info "$bin/rlhf-coord" launch "$work/$name.yaml" \
    > "$work/$name.out" 2>&1 || { cat "$work/$name.out"; exit 1; }
}

for n in 1 2 4; do
  run "base-n$n" tiny "$n" 0 2
done
for r in $(seq 1 "$rounds"); do
  for stage in 0 1 2; do
    run "n2-z$stage-r$r" small 2 "$stage" "$steps"
  done
done
for n in 1 4; do
  for stage in 0 1 2; do
    # One replica shards nothing: stages 1 and 2 are stage 0 there.
    if [ "$n" = 1 ] && [ "$stage" != 0 ]; then continue; fi
    run "n$n-z$stage" small "$n" "$stage" 2
  done
done

python3 - "$work" "$rounds" <<'EOF'
import json, re, statistics, sys
from pathlib import Path
work, rounds = Path(sys.argv[1]), int(sys.argv[2])
MIB = 2**20

def peaks(name):
    """Last TrainStep's peak resident set of each actor worker, by worker."""
    out = {}
    for log in sorted((work / "runs" / name / "logs").glob("a*.log")):
        lines = [l for l in log.read_text().splitlines() if "train step memory" in l]
        assert lines, f"{log}: no train step memory line"
        assert "peak_since_step_start=true" in lines[-1], lines[-1]
        out[log.stem] = int(re.search(r"peak_rss_bytes=(\d+)", lines[-1]).group(1))
    return out

def plan(name):
    v = json.loads((work / f"{name}.plan.json").read_text())
    return {w["name"]: w["roles"]["actor"] for w in v["workers"] if "actor" in w["roles"]}

def baseline(n):
    p, q = peaks(f"base-n{n}"), plan(f"base-n{n}")
    return max(p[w] - q[w]["total"] for w in p)

print()
print("| N | zero_stage | plan weights / grads / optim. / activ. MiB | plan total MiB | measured peak − baseline MiB (largest replica) | measured / plan | baseline MiB |")
print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
for n, stage, name in [(1, 0, "n1-z0")] + [(2, s, f"n2-z{s}-r1") for s in (0, 1, 2)] + [(4, s, f"n4-z{s}") for s in (0, 1, 2)]:
    p, q, b = peaks(name), plan(name), baseline(n)
    w = max(p, key=p.get)
    e = q[w]
    got = p[w] - b
    parts = " / ".join(f"{e[k] / MIB:.0f}" for k in ("weights", "grads", "optimizer", "activations"))
    print(f"| {n} | {stage} | {parts} | {e['total'] / MIB:.0f} | {got / MIB:.0f} | {got / e['total']:.2f} | {b / MIB:.0f} |")

print()
print("Step time at N = 2 (every step but each run's first; all rounds):")
print()
print("| zero_stage | steps | train s min | train s median | step s min | step s median | peak − baseline MiB per round |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
for stage in (0, 1, 2):
    train, step, mem = [], [], []
    for r in range(1, rounds + 1):
        name = f"n2-z{stage}-r{r}"
        rows = [json.loads(l) for l in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        train += [row["time/train_s"] for row in rows[1:]]
        step += [row["time/step_s"] for row in rows[1:]]
        mem.append(f"{(max(peaks(name).values()) - baseline(2)) / MIB:.0f}")
    print(f"| {stage} | {len(train)} | {min(train):.2f} | {statistics.median(train):.2f} | {min(step):.2f} | {statistics.median(step):.2f} | {', '.join(mem)} |")
EOF
