"""Summarises one run of scripts/gpu/scale.sh: phases, tokens/s, peak GPU memory, MFU.

usage: scale_summary.py OUT_DIR NAME MODEL_DIR

Reads OUT_DIR/NAME.metrics.jsonl, OUT_DIR/NAME.gpumem (nvidia-smi samples: pid, MiB; absent on
the CPU), runs/gpu/NAME/config.resolved.yaml and MODEL_DIR's safetensors headers (the parameter
count N). Model FLOPs per step: 6·N per trained token (forward and backward; checkpointing's
recomputed forward is not counted, as MFU conventionally does not), 2·N per token the reference
scores and per generated token. MFU = those FLOPs / (step time · PEAK_TFLOPS, default 989, the
H100/H200 SXM dense bf16 peak). Prompt length: the demo prompts through the model's tokenizer and
chat template when transformers is present, else 16 tokens (stated in the output).
"""
import glob
import json
import os
import statistics
import struct
import sys

out, name, model = sys.argv[1], sys.argv[2], sys.argv[3]
peak_tflops = float(os.environ.get("PEAK_TFLOPS", "989"))


def params(model_dir):
    n = 0
    for f in glob.glob(os.path.join(model_dir, "*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for d in v["shape"]:
                    count *= d
                n += count
    return n


def prompt_tokens(model_dir):
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        rows = [json.loads(line) for line in open("runs/gpu/demo-assets/prompts.jsonl")]
        lens = [
            len(tok(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                            add_generation_prompt=True, tokenize=False))["input_ids"])
            for r in rows
        ]
        return statistics.mean(lens), "measured"
    except Exception as e:  # noqa: BLE001 - the summary must still print
        return 16.0, f"assumed ({type(e).__name__})"


def scalar(cfg_text, key):
    # The resolved config is YAML written by the coordinator; these keys are plain scalars.
    for line in cfg_text.splitlines():
        s = line.strip()
        if s.startswith(key + ":"):
            return s.split(":", 1)[1].strip()
    return None


metrics_path = os.path.join(out, f"{name}.metrics.jsonl")
if not os.path.exists(metrics_path):
    print(f"SUMMARY {name}: no metrics (the run failed; see {name}.log)")
    sys.exit(0)
rows = [json.loads(line) for line in open(metrics_path)]
cfg = open(f"runs/gpu/{name}/config.resolved.yaml").read()
batch = int(scalar(cfg, "batch_size"))
samples = int(scalar(cfg, "samples_per_prompt"))
epochs = int(scalar(cfg, "epochs"))
n = params(model)
p_len, p_how = prompt_tokens(model)
# Step 1 includes warm-up (allocator growth, first kernels); report the median of the rest.
steady = rows[1:] or rows


def med(key):
    vals = [r[key] for r in steady if key in r]
    return statistics.median(vals) if vals else float("nan")


resp = med("response_len_mean")
seqs = batch * samples
gen_tokens = seqs * resp
seq_tokens = seqs * (p_len + resp)
flops = 2 * n * gen_tokens + 2 * n * seq_tokens + 6 * n * seq_tokens * epochs
step_s = med("time/step_s")
mfu = flops / (step_s * peak_tflops * 1e12)
print(f"SUMMARY {name}: N={n / 1e9:.3f}B params, {len(rows)} steps, {seqs} responses/step, "
      f"prompt {p_len:.1f} tokens ({p_how}), response {resp:.1f} tokens (median of steps 2..)")
print(f"  step {step_s:.2f} s = generate {med('time/generate_s'):.2f} + score {med('time/score_s'):.2f} "
      f"+ train {med('time/train_s'):.2f} + sync {med('time/sync_s'):.2f} + controller {med('time/controller_s'):.3f}")
print(f"  generation {med('tokens_per_s'):.0f} tokens/s; trained {seq_tokens * epochs / med('time/train_s'):.0f} tokens/s; "
      f"MFU {100 * mfu:.1f}% of {peak_tflops:.0f} TFLOP/s ({flops / 1e12:.1f} TFLOP per step)")
print(f"  reward_mean by step: {[round(r['reward_mean'], 3) for r in rows]}")
mem_path = os.path.join(out, f"{name}.gpumem")
if os.path.exists(mem_path):
    peak = {}
    for line in open(mem_path):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[1].isdigit():
            peak[parts[0]] = max(peak.get(parts[0], 0), int(parts[1]))
    print(f"  peak GPU memory per process (nvidia-smi, MiB): {peak or 'no samples'}")
