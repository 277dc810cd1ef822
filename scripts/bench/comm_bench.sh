#!/usr/bin/env bash
# Bandwidth of rlhf-comm's TCP collectives (world 2: two OS processes on loopback) against the
# raw single-stream TCP throughput between the same two processes, measured in the same run:
# broadcast and all-reduce bus bandwidth per message size, 1 MiB to MAX_MIB in powers of 4.
# Target: >= 70% of raw for messages >= 64 MiB. Not part of the test suite.
#   MAX_MIB (default 1024): largest message; each rank holds one buffer of this size.
#   COMM_CHUNK_KIB: the group's chunk (frame) size, default the crate's (4096).
# When iperf3 is installed its single-stream loopback result is printed as a second reference.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p rlhf-comm --example comm_bench
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$CARGO_TARGET_DIR/release/examples/comm_bench" --max-mib "${MAX_MIB:-1024}"
if command -v iperf3 >/dev/null; then
  port=$((20000 + RANDOM % 20000))
  iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
  sleep 0.5
  iperf3 -c 127.0.0.1 -p "$port" -t 3 -f g | awk '/receiver/ {print "iperf3 single stream (reference): " $(NF-2) " " $(NF-1)}'
  wait
fi
