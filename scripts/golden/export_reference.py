"""Reference for `rlhf-coord export`: loads exported directories the way a user would and decodes
greedily with `transformers` (and `peft` for adapter-only exports).

Reads a job file (JSON list). Per job: `model` (a directory for `AutoModelForCausalLM` and
`AutoTokenizer`), optional `adapter` (a PEFT adapter directory applied with
`PeftModel.from_pretrained` on `model`), `prompt` (text, tokenized by the model directory's
tokenizer with its default special tokens) and `max_new_tokens`. Decoding is greedy with the
directory's `generation_config.json` (its EOS ids stop a row). Writes one JSON result per job:
the prompt's ids, the new ids (EOS included when reached), their text, and `is_peft`.

Usage: python export_reference.py JOBS.json OUT.json
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def run_job(job):
    tok = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(
        job["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    is_peft = False
    if job.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, job["adapter"])
        is_peft = True
    model.eval()
    enc = tok(job["prompt"], return_tensors="pt")
    with torch.no_grad():
        seq = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            do_sample=False,
            max_new_tokens=job["max_new_tokens"],
        )
    new = seq[0, enc["input_ids"].shape[1]:].tolist()
    return {
        "prompt_ids": enc["input_ids"][0].tolist(),
        "new_ids": new,
        "text": tok.decode(new, skip_special_tokens=True),
        "is_peft": is_peft,
    }


def main():
    jobs = json.load(open(sys.argv[1]))
    results = [run_job(j) for j in jobs]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
