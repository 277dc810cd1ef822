#!/usr/bin/env bash
# The reward server's overhead per RLHF step at 512 responses (`models.reward.kind: http`):
# scripts/reward_server_example.py started on loopback, and crates/rlhf-worker's reward_bench
# example scoring the same 512 rows through it and through the in-process `exact_match` rule,
# alternating, for batch_size 16/64/512, concurrency 1/4 and short/long responses. Prints a
# Markdown table (docs/benchmarks.md).
#   ROUNDS (default 7) rounds per shape (the median is reported); ROWS (default 512);
#   PROFILE (default dev: optimized dependencies, as the test build; `release` for a release build).
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(scripts/setup-torch.sh)"
cargo build -q --profile "${PROFILE:-dev}" -p rlhf-worker --example reward_bench
work=$(mktemp -d /tmp/reward-bench.XXXXXX)
python3 scripts/reward_server_example.py --port 0 > "$work/server.out" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  grep -q '^listening on ' "$work/server.out" && break
  sleep 0.1
done
url="$(sed -n 's/^listening on //p' "$work/server.out")score"
[ "$url" != score ] || { echo "the example server did not start" >&2; exit 1; }
echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load average $(cut -d' ' -f1-3 /proc/loadavg); $(python3 --version)"
cargo run -q --profile "${PROFILE:-dev}" -p rlhf-worker --example reward_bench -- \
  --url "$url" --rows "${ROWS:-512}" --rounds "${ROUNDS:-7}"
