"""PyTorch reference for the reward-model losses of rlhf-train (crates/rlhf-train/src/losses.rs).

Two levels, both with gradients:
  1. the loss functions on fixed tensors: SteerLM regression (MSE), Bradley-Terry with margin
     and with per-pair weights (scaled BT), each mean-reduced over the batch;
  2. the same losses through a whole HF `*ForSequenceClassification` model made by the Rust test
     (transformers reads the score head at the last non-pad token, as rlhf-model does), with the
     gradients of selected parameters.

Reads a job file (JSON), writes results (JSON).
Usage: python rm_losses.py JOB.json OUT.json
"""
import json
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification


def mse(pred, target):
    # Per example: mean over attributes; then mean over the batch (= F.mse_loss overall).
    return F.mse_loss(pred, target)


def bt(chosen, rejected, margin=None, weight=None):
    d = chosen - rejected
    if margin is not None:
        d = d - margin
    loss = -F.logsigmoid(d)
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def functional(job):
    t = lambda k: torch.tensor(job[k], dtype=torch.float64, requires_grad=True)
    out = {}
    pred, target = t("pred"), torch.tensor(job["target"], dtype=torch.float64)
    loss = mse(pred, target)
    loss.backward()
    out["mse"] = {"loss": loss.item(), "grad_pred": pred.grad.flatten().tolist()}
    for name, use_m, use_w in [("bt", False, False), ("bt_margin", True, False), ("bt_scaled", False, True)]:
        c, r = t("chosen"), t("rejected")
        m = torch.tensor(job["margin"], dtype=torch.float64) if use_m else None
        w = torch.tensor(job["weight"], dtype=torch.float64) if use_w else None
        loss = bt(c, r, m, w)
        loss.backward()
        out[name] = {"loss": loss.item(), "grad_chosen": c.grad.tolist(), "grad_rejected": r.grad.tolist()}
    return out


def through_model(case):
    model = AutoModelForSequenceClassification.from_pretrained(
        case["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    model.train()
    ids = torch.tensor(case["input_ids"], dtype=torch.long)
    mask = torch.tensor(case["attention_mask"], dtype=torch.long)
    scores = model(input_ids=ids, attention_mask=mask).logits.float()  # (b, num_labels)
    if case["kind"] == "regression":
        loss = mse(scores, torch.tensor(case["target"], dtype=torch.float32))
    else:
        b = ids.shape[0] // 2
        s = scores[:, 0]
        margin = torch.tensor(case["margin"], dtype=torch.float32) if case.get("margin") else None
        weight = torch.tensor(case["weight"], dtype=torch.float32) if case.get("weight") else None
        loss = bt(s[:b], s[b:], margin, weight)
    loss.backward()
    params = dict(model.named_parameters())
    grads = {n: params[n].grad.flatten().tolist() for n in case["grads"]}
    return {"loss": loss.item(), "scores": scores.detach().flatten().tolist(), "grads": grads}


def main():
    job = json.load(open(sys.argv[1]))
    torch.manual_seed(0)
    out = {"functional": functional(job["functional"]), "models": [through_model(c) for c in job["models"]]}
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
