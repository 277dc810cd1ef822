"""Reward-model training throughput, the PyTorch side of scripts/bench/rm_bench.sh.

  prepare DIR SMALL_DIR LAYERS PAIRS WORDS
      Writes DIR/base: a random Llama causal LM with the `small` preset's shapes (from
      SMALL_DIR, made by `rlhf-coord init-model --preset small`) cut to LAYERS layers, saved by
      transformers, with SMALL_DIR's tokenizer files; and DIR/pairs.jsonl: PAIRS pairwise rows
      whose chosen/rejected conversations tokenize to the same length (WORDS words each).
  hf DIR BATCH STEPS WINDOW THREADS
      transformers `AutoModelForSequenceClassification` (1 label, fresh head) from DIR/base,
      trained with a plain PyTorch loop on the same pairs, the same batch and the same settings
      as the Rust job (Bradley-Terry loss, AdamW lr 1e-5 without weight decay, grad-norm clip 1.0,
      f32): prints one JSON object with the best samples/s (pairs/s) over windows of WINDOW
      steps after the first window (warm-up).
"""
import json
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F


def prepare(out, small, layers, pairs, words):
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(small)
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    base = os.path.join(out, "base")
    model.save_pretrained(base)
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        shutil.copy(os.path.join(small, f), os.path.join(base, f))
    n = sum(p.numel() for p in model.parameters())
    with open(os.path.join(out, "pairs.jsonl"), "w") as f:
        for i in range(pairs):
            body = " ".join(["the"] * (words - 1))
            f.write(json.dumps({"prompt": f"Question number {i % 10}?", "chosen": "good " + body,
                                "rejected": "small " + body}) + "\n")
    print(json.dumps({"params": n, "layers": layers}))


def hf(d, batch, steps, window, threads):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("BENCH_DEVICE", "cpu") != "cpu" else "cpu"
    base = os.path.join(d, "base")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=torch.float32, attn_implementation="sdpa"
    ).to(dev)
    model.config.pad_token_id = 0
    model.train()
    rows = [json.loads(l) for l in open(os.path.join(d, "pairs.jsonl"))]

    def ids(prompt, resp):
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": resp}]
        text = tok.apply_chat_template(msgs, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    chosen = [ids(r["prompt"], r["chosen"]) for r in rows]
    rejected = [ids(r["prompt"], r["rejected"]) for r in rows]
    lens = {len(x) for x in chosen + rejected}
    width = max(lens)

    def tensor(seqs):
        t = torch.zeros(len(seqs), width, dtype=torch.long)
        m = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            t[i, : len(s)] = torch.tensor(s)
            m[i, : len(s)] = 1
        return t.to(dev), m.to(dev)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        idx = torch.randperm(len(rows), generator=g)[:batch].tolist()
        t0 = time.perf_counter()
        x, m = tensor([chosen[i] for i in idx] + [rejected[i] for i in idx])
        r = model(input_ids=x, attention_mask=m).logits[:, 0]
        loss = -F.logsigmoid(r[:batch] - r[batch:]).mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    wins = [sum(times[i : i + window]) for i in range(window, len(times) - window + 1, window)]
    best = min(wins)
    print(json.dumps({"impl": "transformers+torch", "samples_per_s": window * batch / best,
                      "tokens_per_s": window * batch * 2 * width / best, "seq_len": sorted(lens)}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "prepare":
        prepare(args[0], args[1], *map(int, args[2:5]))
    else:
        hf(args[0], *map(int, args[1:5]))
