"""Reference for rlhf-model's LoRA files, computed with `peft` (pinned in requirements-test.txt).

Reads a job file (JSON list); per job loads the base model with `transformers`, then either
loads the adapter directory `load_adapter` with `PeftModel.from_pretrained` (files we wrote) or
makes random adapters as described by `make_adapter` (`LoraConfig(init_lora_weights=False)`, so
A and B are both non-zero) and saves them with `save_pretrained` (files we then read), and runs
one forward on `input_ids`/`attention_mask`. Writes one JSON result per job: the logits.

Usage: python peft_reference.py JOBS.json OUT.json
"""
import json
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM


def run_job(job):
    model = AutoModelForCausalLM.from_pretrained(
        job["base"], dtype=torch.float32, attn_implementation="sdpa"
    )
    if job.get("load_adapter"):
        model = PeftModel.from_pretrained(model, job["load_adapter"])
    elif job.get("make_adapter"):
        spec = job["make_adapter"]
        torch.manual_seed(spec["seed"])
        cfg = LoraConfig(
            r=spec["r"],
            lora_alpha=spec["lora_alpha"],
            lora_dropout=0.0,
            target_modules=spec["target_modules"],
            use_rslora=spec.get("use_rslora", False),
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
        model.save_pretrained(spec["dir"])
    model.eval()
    ids = torch.tensor(job["input_ids"], dtype=torch.long)
    mask = torch.tensor(job["attention_mask"], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return {"logits_shape": list(logits.shape), "logits": logits.flatten().tolist()}


def main():
    jobs = json.load(open(sys.argv[1]))
    results = [run_job(j) for j in jobs]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
