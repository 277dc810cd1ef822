#!/usr/bin/env bash
# Writes the embedded demo's data into DIR (default runs/demo-assets):
#   prompts.jsonl  every single-digit sum "a+b=" with a, b in 0..4 and its `answer` (RL prompts)
#   warmup.jsonl   the same prompts with their answers, for the short SFT warm-up that teaches the
#                  chat format (number, then end of turn) and leaves most sums still wrong
set -euo pipefail
dir=${1:-runs/demo-assets}
mkdir -p "$dir"
: >"$dir/prompts.jsonl"
: >"$dir/warmup.jsonl"
for a in 0 1 2 3 4; do
  for b in 0 1 2 3 4; do
    echo "{\"prompt\": \"$a+$b=\", \"answer\": \"$((a + b))\"}" >>"$dir/prompts.jsonl"
    echo "{\"prompt\": \"$a+$b=\", \"response\": \"$((a + b))\"}" >>"$dir/warmup.jsonl"
  done
done
