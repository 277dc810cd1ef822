#!/usr/bin/env bash
# Side-by-side RLOO step time: TRL's RLOOTrainer (scripts/bench/trl_rloo.py, its own venv) and
# `rlhf-coord launch` on the same model files, prompts and settings (B prompts x N samples, T new
# tokens, E epochs, KL beta in the reward with k1, sequence-level loss aggregation, lr, grad clip),
# at two sizes (about 2M and 20M parameters), alternating the two ROUNDS times and keeping each
# side's best median step time (the first step of every run is warm-up). Not part of the tests.
#   ROUNDS (2), STEPS (5), THREADS (2): torch threads of TRL's one process and of our actor.
# Each round also times the step's GEMMs alone at its exact shapes (scripts/bench/rloo_floor.py):
# a lower bound on any synchronous implementation's step on this machine, printed beside both.
#   BASELINE: optional release directory of another build of ours (e.g. a worktree of an older
#   commit built with `cargo build --release -p rlhf-coord -p rlhf-worker`), run in the same
#   rounds as a third column, so a change is judged against its parent side by side.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(scripts/setup-torch.sh)"
cargo build --release -q -p rlhf-coord -p rlhf-worker
venv=${RLHF_BENCH_VENV:-$HOME/.cache/rlhf-coord/bench-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r scripts/bench/requirements-bench.txt
fi
PY=$venv/bin/python
# Both sides run with libgomp's default wait policy (spin briefly, then sleep). Forcing
# OMP_WAIT_POLICY=PASSIVE (every thread sleeps at once) made our multi-process step 2x slower in
# an A/B on 2026-11-23 (7.04 s vs 3.47 s at 20M); ACTIVE (spin forever) made it 23 s, since the
# idle workers' threads then never yield the cores. BENCH_OMP_WAIT_POLICY=... sets it for both.
if [ -n "${BENCH_OMP_WAIT_POLICY:-}" ]; then
  export OMP_WAIT_POLICY=$BENCH_OMP_WAIT_POLICY
else
  unset OMP_WAIT_POLICY
fi
rounds=${ROUNDS:-2}; steps=${STEPS:-5}; threads=${THREADS:-2}
B=8 N=4 T=32 E=1 K=0.05 LR=1e-5
w=target/bench/rloo
mkdir -p "$w"
[ -f target/bench/small-llama/config.json ] || target/release/rlhf-coord init-model --preset small --out target/bench/small-llama 2>/dev/null
: >"$w/prompts.jsonl"
for a in 11 12 13 14 15 16 17 18; do for b in 21 22 23 24; do
  echo "{\"prompt\": \"$a+$b=\", \"answer\": \"$((a + b))\"}" >>"$w/prompts.jsonl"
done; done
out=$w/results.jsonl
: >"$out"
for size in 2m 20m; do
  m=$w/llama-$size
  [ -f "$m/config.json" ] || $PY scripts/bench/trl_rloo.py make-model --size $size --tokenizer-from target/bench/small-llama --out "$m" >/dev/null
  cat >"$w/run-$size.yaml" <<YAML
run: {name: bench-$size, dir: runs, seed: 0}
workers:
  - {name: actor, roles: [actor], threads: $threads}
  - {name: reference, roles: [reference], threads: $threads}
  - {name: reward, roles: [reward, critic], threads: 1}
models: {policy: llama-$size, reward: {kind: exact_match}}
algorithm: {name: rloo, loss_agg: seq_mean_token_sum, kl: {coef: $K, estimator: k1, mode: reward}}
rollout: {prompts: prompts.jsonl, batch_size: $B, samples_per_prompt: $N, max_new_tokens: $T}
train: {steps: $steps, epochs: $E, micro_batch_size: $((B * N)), actor: {lr: $LR, max_grad_norm: 1.0}}
logging: {progress: false, plot: false}
YAML
  # Prompt tokens after the chat template (all prompts here have the same length).
  plen=$($PY -c "import json,sys; from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained(sys.argv[1]); p = json.loads(open(sys.argv[2]).readline())['prompt']
print(len(t.apply_chat_template([{'role': 'user', 'content': p}], add_generation_prompt=True, tokenize=True, return_dict=True)['input_ids']))" "$m" "$w/prompts.jsonl" 2>/dev/null)
  for r in $(seq "$rounds"); do
    $PY scripts/bench/rloo_floor.py --model "$m" --batch-size $B --samples $N --prompt-len "$plen" \
      --max-new-tokens $T --threads "$threads" |
      python3 -c "import json,sys; d=json.load(sys.stdin); d.update(impl='floor', size='$size'); print(json.dumps(d))" >>"$out"
    $PY scripts/bench/trl_rloo.py --policy "$m" --reward-kind exact_match --prompts "$w/prompts.jsonl" \
      --batch-size $B --samples $N --max-new-tokens $T --epochs $E --kl-coef $K --lr $LR \
      --steps "$steps" --threads "$threads" --out "$w/trl.json" >/dev/null 2>&1
    python3 -c "import json,sys; d=json.load(open('$w/trl.json')); print(json.dumps({'impl':'trl','size':'$size','step_s':d['step_time_s_median']}))" >>"$out"
    for impl in rlhf-coord ${BASELINE:+baseline}; do
      bin=target/release
      [ "$impl" = baseline ] && bin=$BASELINE
      rm -rf "$w/runs/bench-$size"
      "$bin/rlhf-coord" launch "$w/run-$size.yaml" >/dev/null 2>&1
      python3 - "$w/runs/bench-$size/metrics.jsonl" "$size" "$impl" >>"$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
med = lambda k: statistics.median(r[k] for r in rows)
print(json.dumps({"impl": sys.argv[3], "size": sys.argv[2], "step_s": med("time/step_s"),
                  "generate_s": med("time/generate_s"), "score_s": med("time/score_s"),
                  "train_s": med("time/train_s"),
                  "len": statistics.mean(r["response_len_mean"] for r in rows)}))
PY
    done
  done
done
python3 - "$out" "$rounds" "$steps" "$threads" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {}
for r in rows:
    k = (r["impl"], r["size"])
    best[k] = min(best.get(k, 1e9), r["step_s"])
print(f"\nRLOO, B=8 prompts x N=4 samples, T=32, E=1, KL 0.05 (k1, in reward), {sys.argv[3]} steps "
      f"(median of steps 2..), best of {sys.argv[2]} rounds, {sys.argv[4]} torch threads")
base = ("baseline", "2m") in best
print("| model | TRL RLOOTrainer (s/step) | rlhf-coord (s/step) | ratio | GEMM floor (s) | ratio |"
      + (" baseline (s/step) | ratio |" if base else ""))
print("| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if base else ""))
for size, name in [("2m", "llama 2.0M"), ("20m", "llama 20.5M")]:
    t, o, f = best[("trl", size)], best[("rlhf-coord", size)], best[("floor", size)]
    extra = f" {best[('baseline', size)]:.3f} | {best[('baseline', size)] / t:.2f}x |" if base else ""
    print(f"| {name} | {t:.3f} | {o:.3f} | {o / t:.2f}x | {f:.3f} | {f / t:.2f}x |" + extra)
# Phases of our best round per size (medians over its steps), and the floor's.
for impl in ["floor", "rlhf-coord"] + (["baseline"] if base else []):
    for size in ["2m", "20m"]:
        r = min((r for r in rows if r["impl"] == impl and r["size"] == size), key=lambda r: r["step_s"])
        print(f"{impl} {size}: generate {r['generate_s']:.3f} s, score {r['score_s']:.3f} s, "
              f"train {r['train_s']:.3f} s")
PY
