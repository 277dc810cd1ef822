"""Numerical reference for rlhf-model, computed with HF `transformers` on the same files.

Reads a job file (JSON) listing model directories and inputs; writes one JSON result per job:
logits of a left-padded batch, 32 greedy tokens from `generate()`, the tokenizer's encoding and
rendered chat template, and (optionally) a copy of the model re-saved by `save_pretrained`
(sharded) so the Rust loader is tested on files HF wrote.

Usage: python hf_reference.py JOBS.json OUT.json
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


def run_job(job):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        job["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    ids = torch.tensor(job["input_ids"], dtype=torch.long)
    mask = torch.tensor(job["attention_mask"], dtype=torch.long)
    out = {"model": job["model"]}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    out["logits_shape"] = list(logits.shape)
    out["logits"] = logits.flatten().tolist()
    # Greedy decoding with no stop token, so every row yields exactly max_new_tokens.
    gen_cfg = GenerationConfig(
        max_new_tokens=job["max_new_tokens"],
        do_sample=False,
        eos_token_id=None,
        pad_token_id=job["pad_id"],
        bos_token_id=None,
    )
    # Replace the model's own generation config (whose eos ids would otherwise be merged in).
    model.generation_config = gen_cfg
    with torch.no_grad():
        seq = model.generate(input_ids=ids, attention_mask=mask)
    out["greedy"] = seq[:, ids.shape[1]:].tolist()
    tok = AutoTokenizer.from_pretrained(job["model"])
    out["encoded"] = tok(job["text"], add_special_tokens=False)["input_ids"]
    out["chat"] = tok.apply_chat_template(
        job["messages"], add_generation_prompt=True, tokenize=False
    )
    if job.get("resave_to"):
        model.save_pretrained(job["resave_to"], max_shard_size=job.get("max_shard_size", "200KB"))
    return out


def main():
    jobs = json.load(open(sys.argv[1]))
    results = [run_job(j) for j in jobs]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
