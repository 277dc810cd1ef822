"""transformers side of scripts/bench/model_bench.sh: the same workloads as
crates/rlhf-model/examples/bench_model.rs on the same model directory. Prints one JSON object.

Usage: hf_bench.py MODEL_DIR BATCH PROMPT_LEN NEW_TOKENS TRAIN_BATCH TRAIN_SEQ ITERS THREADS [DEVICE]
(DEVICE: cpu (default) or cuda[:N]; on CUDA every timing ends with a device synchronize)
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig


def ids(batch, length, vocab):
    return torch.tensor(
        [[(i * 7919 + j * 104729) % (vocab - 3) + 3 for j in range(length)] for i in range(batch)],
        dtype=torch.long,
    )


def main():
    d = sys.argv[1]
    batch, plen, new, tb, ts, iters, threads = map(int, sys.argv[2:9])
    device = torch.device(sys.argv[9] if len(sys.argv) > 9 else "cpu")
    torch.set_num_threads(threads)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").to(device)
    vocab = model.config.vocab_size
    prompts = ids(batch, plen, vocab).to(device)
    mask = torch.ones_like(prompts)
    model.eval()

    def gen(sample):
        cfg = GenerationConfig(
            max_new_tokens=new, min_new_tokens=new, do_sample=sample, top_p=0.9 if sample else None,
            temperature=1.0, top_k=None, eos_token_id=None, pad_token_id=0, bos_token_id=None,
        )
        model.generation_config = cfg
        with torch.no_grad():
            t = time.perf_counter()
            out = model.generate(input_ids=prompts, attention_mask=mask)
            sync()
            dt = time.perf_counter() - t
        assert out.shape[1] - plen == new
        return dt

    gen(False)
    g = min(gen(False) for _ in range(iters))
    s = min(gen(True) for _ in range(iters))

    model.train()
    x = ids(tb, ts, vocab).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        t = time.perf_counter()
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t

    step()
    tr = min(step() for _ in range(iters))
    print(json.dumps({
        "impl": "transformers",
        "device": str(device),
        "gen_greedy_tok_s": batch * new / g,
        "gen_sampled_tok_s": batch * new / s,
        "train_tok_s": tb * ts / tr,
    }))


if __name__ == "__main__":
    main()
