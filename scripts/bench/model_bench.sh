#!/usr/bin/env bash
# Side-by-side throughput of rlhf-model and HF transformers on the same model files, the same
# machine and the same thread count, alternating the two ROUNDS times (noisy machines) and
# reporting each side's best round. Not part of the test suite.
#   MODEL (default: a `small` llama made by init-model), ROUNDS (3), THREADS (2)
#   WORKLOAD: "BATCH PROMPT_LEN NEW_TOKENS TRAIN_BATCH TRAIN_SEQ ITERS" (default "16 32 128 8 256 2")
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(scripts/setup-torch.sh --test-deps)"
cargo build --release -q -p rlhf-coord
cargo build --release -q -p rlhf-model --example bench_model
model=${MODEL:-target/bench/small-llama}
[ -f "$model/config.json" ] || target/release/rlhf-coord init-model --arch llama --preset small --out "$model" 2>/dev/null
rounds=${ROUNDS:-3}; threads=${THREADS:-2}
read -r -a w <<<"${WORKLOAD:-16 32 128 8 256 2}"
out=$(mktemp)
for r in $(seq "$rounds"); do
  target/release/examples/bench_model "$model" "${w[@]}" "$threads" | tee -a "$out"
  python scripts/bench/hf_bench.py "$model" "${w[@]}" "$threads" 2>/dev/null | tee -a "$out"
done
python - "$out" "${w[*]}" "$threads" "$model" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
best = {}
for r in rows:
    b = best.setdefault(r["impl"], {})
    for k, v in r.items():
        # Numbers only: rows also carry strings (impl, device).
        if isinstance(v, (int, float)):
            b[k] = max(b.get(k, 0), v)
ours, hf = best["rlhf-model"], best["transformers"]
print(f"\nmodel {sys.argv[4]}, workload (batch prompt_len new_tokens train_batch train_seq iters) = {sys.argv[2]}, threads {sys.argv[3]}")
print("| metric | rlhf-model | transformers | ratio |")
print("| --- | ---: | ---: | ---: |")
for k, name in [("gen_greedy_tok_s", "generation, greedy (tok/s)"),
                 ("gen_sampled_tok_s", "generation, top-p 0.9 (tok/s)"),
                 ("train_tok_s", "forward+backward+AdamW (tok/s)")]:
    print(f"| {name} | {ours[k]:.1f} | {hf[k]:.1f} | {ours[k] / hf[k]:.2f}x |")
PY
