#!/usr/bin/env python3
"""Independent PyTorch reference for the golden tests of the `rlhf-algo` crate.

Usage: algo_golden.py OUT.json

Generates fixed inputs (torch.manual_seed, float64) and computes, straight from the papers'
definitions, the quantities rlhf-algo implements: GAE advantages and returns, KL estimators,
PPO / policy-gradient losses with their gradients, clipped value losses with their gradients,
RLOO / GRPO / REINFORCE++ advantages, masked whitening, reward shaping, per-token rewards, the
adaptive KL controller, AdamW (torch.optim.AdamW itself) and gradient clipping
(torch.nn.utils.clip_grad_norm_). Inputs and outputs go to OUT.json; the Rust test
crates/rlhf-algo/tests/golden.rs reads it and compares.

The formulas here are deliberately written in a different form from the Rust code (explicit sums
over each response instead of backward recursions, objectives instead of losses, per-group Python
loops, masked_select instead of masked sums) so that a shared misreading is unlikely.

Conventions shared with the crate (see docs/algo.md): tensors are (batch, seq); the response
mask selects the tokens a row's trajectory consists of, in order; masked positions are skipped
and report 0; rows of one prompt are consecutive.
"""

import json
import math
import sys

import torch

torch.manual_seed(20240611)
DT = torch.float64


def enc(t):
    t = torch.as_tensor(t, dtype=DT).detach()
    return {"shape": list(t.shape), "data": [float(x) for x in t.reshape(-1).tolist()]}


def logprobs(b, t):
    # Plausible token logprobs: negative, mostly between -4 and 0.
    return -torch.rand(b, t, dtype=DT) * 4.0 - 1e-3


def response_masks():
    # Prompt prefix, response, right padding; a full row; a multi-turn row with a gap; a one-token
    # response; and a scattered mask.
    rows = [
        [0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
        [0, 1, 0, 1, 1, 0, 1, 0, 1, 1],
    ]
    return torch.tensor(rows, dtype=DT)


def positions(mask_row):
    return [i for i, m in enumerate(mask_row.tolist()) if m != 0]


# ---------------------------------------------------------------------------------------------
# GAE (Schulman et al. 2016, eq. 16): A_k = sum_l (gamma lambda)^l delta_{k+l} over the response
# tokens k of a row, delta_k = r_k + gamma V_{k+1} - V_k, with V = 0 after the last token.


def gae_reference(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        pos = positions(mask[b])
        n = len(pos)
        r = [float(rewards[b, p]) for p in pos]
        v = [float(values[b, p]) for p in pos] + [0.0]
        delta = [r[k] + gamma * v[k + 1] - v[k] for k in range(n)]
        for k in range(n):
            adv[b, pos[k]] = sum((gamma * lam) ** l * delta[k + l] for l in range(n - k))
    returns = (adv + values) * mask
    return adv, returns


def reward_to_go(rewards, mask, gamma):
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        pos = positions(mask[b])
        r = [float(rewards[b, p]) for p in pos]
        for k in range(len(pos)):
            out[b, pos[k]] = sum(gamma**l * r[k + l] for l in range(len(pos) - k))
    return out


def whiten_reference(x, mask):
    sel = torch.masked_select(x, mask.bool())
    mean = sel.mean()
    var = sel.var(unbiased=True)
    return ((x - mean) / torch.sqrt(var + 1e-8)) * mask


def gae_cases():
    mask = response_masks()
    b, t = mask.shape
    rewards = torch.randn(b, t, dtype=DT) * 0.1
    values = torch.randn(b, t, dtype=DT)
    cases = []
    for gamma, lam in [(1.0, 0.95), (0.99, 0.95), (0.9, 0.5), (1.0, 1.0), (0.0, 0.0)]:
        adv, ret = gae_reference(rewards, values, mask, gamma, lam)
        cases.append({"gamma": gamma, "lam": lam, "advantages": enc(adv), "returns": enc(ret)})
    return {"rewards": enc(rewards), "values": enc(values), "mask": enc(mask), "cases": cases}


# ---------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence"): samples x ~ pi, r = pi_ref(x) / pi(x).


def kl_cases():
    lp = logprobs(4, 7)
    ref = lp + torch.randn(4, 7, dtype=DT) * 0.5
    r = torch.exp(ref) / torch.exp(lp)
    return {
        "logprobs": enc(lp),
        "ref_logprobs": enc(ref),
        "k1": enc(-torch.log(r)),
        "k2": enc(0.5 * torch.log(r) ** 2),
        "k3": enc((r - 1.0) - torch.log(r)),
    }


# ---------------------------------------------------------------------------------------------
# Policy losses. PPO (Schulman et al. 2017, eq. 7) maximises min(r A, clip(r, 1-e, 1+e) A); dual
# clip (Ye et al. 2020, eq. 4) additionally takes max(., c A) when A < 0. The loss is minus the
# objective, aggregated over response tokens.


def agg_reference(per_token, mask, mode):
    if mode == "token_mean":
        return torch.masked_select(per_token, mask.bool()).mean()
    rows = []
    for b in range(per_token.shape[0]):
        sel = torch.masked_select(per_token[b], mask[b].bool())
        rows.append(sel.sum() if mode == "seq_mean_token_sum" else sel.mean())
    return torch.stack(rows).mean()


def ppo_cases():
    mask = response_masks()
    b, t = mask.shape
    old = logprobs(b, t)
    new0 = old + torch.randn(b, t, dtype=DT) * 0.4
    adv = torch.randn(b, t, dtype=DT)
    # Make sure the dual clip has work: a few response tokens with A < 0 and ratio e^1.3 > 3.
    hits = [(i, j) for i in range(b) for j in range(t) if mask[i, j] != 0 and adv[i, j] < 0][:3]
    for i, j in hits:
        new0[i, j] = old[i, j] + 1.3
    ent = torch.rand(b, t, dtype=DT) * 3.0
    ref = old + torch.randn(b, t, dtype=DT) * 0.2
    cases = []
    configs = []
    for mode in ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]:
        for dual in [None, 3.0]:
            configs.append({"kind": "ppo", "clip_eps": 0.2, "dual_clip": dual, "agg": mode})
    configs.append({"kind": "ppo", "clip_eps": 0.1, "dual_clip": None, "agg": "token_mean"})
    configs.append({"kind": "pg", "clip_eps": 0.2, "dual_clip": None, "agg": "token_mean"})
    configs.append({"kind": "pg", "clip_eps": 0.2, "dual_clip": None, "agg": "seq_mean_token_mean"})
    configs.append(
        {"kind": "ppo", "clip_eps": 0.2, "dual_clip": 3.0, "agg": "seq_mean_token_sum",
         "entropy_coef": 0.01, "kl": {"estimator": "k3", "coef": 0.05}}
    )
    configs.append(
        {"kind": "ppo", "clip_eps": 0.2, "dual_clip": None, "agg": "token_mean",
         "entropy_coef": 0.0, "kl": {"estimator": "k1", "coef": 0.1}}
    )
    for cfg in configs:
        new = new0.clone().requires_grad_(True)
        ratio = torch.exp(new - old)
        if cfg["kind"] == "ppo":
            e = cfg["clip_eps"]
            unclipped_obj = ratio * adv
            clipped_obj = torch.clamp(ratio, 1.0 - e, 1.0 + e) * adv
            obj = torch.min(unclipped_obj, clipped_obj)
            dual_active = 0
            if cfg["dual_clip"] is not None:
                floor = cfg["dual_clip"] * adv
                dual_active = int(((adv < 0) & (floor > obj) & mask.bool()).sum())
                obj = torch.where(adv < 0, torch.max(obj, floor), obj)
            clipped = (clipped_obj < unclipped_obj).to(DT)
        else:
            obj = new * adv
            clipped = torch.zeros_like(adv)
            dual_active = 0
        loss = agg_reference(-obj, mask, cfg["agg"])
        pg = loss.detach().clone()
        coef = cfg.get("entropy_coef", 0.0)
        if coef:
            loss = loss - coef * agg_reference(ent, mask, cfg["agg"])
        ref_kl = None
        if "kl" in cfg:
            rr = torch.exp(ref) / torch.exp(new)
            k = {"k1": -torch.log(rr), "k2": 0.5 * torch.log(rr) ** 2, "k3": rr - 1 - torch.log(rr)}[cfg["kl"]["estimator"]]
            loss = loss + cfg["kl"]["coef"] * agg_reference(k, mask, cfg["agg"])
            ref_kl = float(torch.masked_select(k.detach(), mask.bool()).mean())
        loss.backward()
        r = ratio.detach()
        approx_kl = torch.masked_select((r - 1) - torch.log(r), mask.bool()).mean()
        cases.append({
            "config": cfg,
            "loss": float(loss.detach()),
            "pg_loss": float(pg),
            "grad": enc(new.grad),
            "clip_frac": float(torch.masked_select(clipped, mask.bool()).mean()),
            "approx_kl": float(approx_kl),
            "entropy": float(torch.masked_select(ent, mask.bool()).mean()),
            "ref_kl": ref_kl,
            "dual_active": dual_active,
        })
    return {
        "old_logprobs": enc(old),
        "logprobs": enc(new0),
        "advantages": enc(adv),
        "entropy": enc(ent),
        "ref_logprobs": enc(ref),
        "mask": enc(mask),
        "cases": cases,
    }


# ---------------------------------------------------------------------------------------------
# Clipped value loss (PPO2 baselines / InstructGPT): 0.5 max((V - R)^2, (V_old + clip(V - V_old)
# - R)^2); explained variance 1 - Var(R - V) / Var(R).


def value_cases():
    mask = response_masks()
    b, t = mask.shape
    old = torch.randn(b, t, dtype=DT)
    new0 = old + torch.randn(b, t, dtype=DT) * 0.4
    ret = old + torch.randn(b, t, dtype=DT) * 0.5
    cases = []
    for clip in [0.2, 0.05, None]:
        for mode in ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]:
            v = new0.clone().requires_grad_(True)
            err = (v - ret) ** 2
            if clip is None:
                per_token = err
                clipped = torch.zeros_like(err)
            else:
                v_clip = torch.max(torch.min(v, old + clip), old - clip)
                err_clip = (v_clip - ret) ** 2
                per_token = torch.max(err, err_clip)
                # Clipped branch larger and the clip saturated (not rounding noise inside it).
                clipped = ((err_clip > err) & ((v - old).abs() > clip)).to(DT)
            loss = 0.5 * agg_reference(per_token, mask, mode)
            loss.backward()
            sel_r = torch.masked_select(ret, mask.bool())
            sel_v = torch.masked_select(new0, mask.bool())
            ev = 1.0 - torch.var(sel_r - sel_v) / (torch.var(sel_r) + 1e-8)
            cases.append({
                "clip": clip,
                "agg": mode,
                "loss": float(loss.detach()),
                "grad": enc(v.grad),
                "clip_frac": float(torch.masked_select(clipped, mask.bool()).mean()),
                "explained_variance": float(ev),
                "value_mean": float(sel_v.mean()),
                "return_mean": float(sel_r.mean()),
            })
    return {"values": enc(new0), "old_values": enc(old), "returns": enc(ret), "mask": enc(mask), "cases": cases}


# ---------------------------------------------------------------------------------------------
# Critic-free estimators over groups of n consecutive samples of one prompt.


def rloo_reference(scores, n):
    out = []
    for g in range(len(scores) // n):
        group = [float(x) for x in scores[g * n:(g + 1) * n]]
        for i in range(n):
            others = group[:i] + group[i + 1:]
            out.append(group[i] - sum(others) / len(others))
    return torch.tensor(out, dtype=DT)


def grpo_reference(scores, n, scale, eps):
    out = []
    for g in range(len(scores) // n):
        group = scores[g * n:(g + 1) * n]
        centred = group - group.mean()
        out.append(centred / (group.std(unbiased=True) + eps) if scale else centred)
    return torch.cat(out)


def grouped_cases():
    scores = torch.randn(12, dtype=DT) * 2.0 + 1.0
    rloo = [{"n": n, "advantages": enc(rloo_reference(scores, n))} for n in [2, 3, 4, 6]]
    grpo = [
        {"n": n, "scale_by_std": s, "eps": 1e-6, "advantages": enc(grpo_reference(scores, n, s, 1e-6))}
        for n in [2, 4, 6]
        for s in [True, False]
    ]
    return {"scores": enc(scores), "rloo": rloo, "grpo": grpo}


def per_token_cases():
    mask = response_masks()
    b, t = mask.shape
    rewards = torch.randn(b, t, dtype=DT)
    x = torch.randn(b, t, dtype=DT) * 3.0 + 0.5
    pp = []
    for gamma in [1.0, 0.95]:
        rtg = reward_to_go(rewards, mask, gamma)
        pp.append({"gamma": gamma, "returns": enc(rtg), "advantages": enc(whiten_reference(rtg, mask))})
    return {"rewards": enc(rewards), "x": enc(x), "mask": enc(mask), "whiten": enc(whiten_reference(x, mask)),
            "reinforce_pp": pp}


# ---------------------------------------------------------------------------------------------
# Reward shaping: HelpSteer2 goodness, normalisation, truncation penalty, clipping; per-token
# reward = score at the last response token - beta * kl on every response token.


def reward_cases():
    attrs = torch.rand(6, 5, dtype=DT) * 4.0
    weights = {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45, "complexity": 0.0, "verbosity": 0.0}
    goodness = 0.65 * attrs[:, 0] + 0.8 * attrs[:, 1] + 0.45 * attrs[:, 2]
    truncated = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)
    mean, std, penalty, clip = 2.5, 1.5, 1.0, 1.2
    shaped = []
    for pen, clp in [(None, None), (penalty, None), (penalty, clip)]:
        r = (goodness - mean) / std
        if pen is not None:
            r = r - pen * truncated.to(DT)
        if clp is not None:
            r = r.clamp(-clp, clp)
        shaped.append({"truncation_penalty": pen, "clip": clp, "rewards": enc(r)})
    mask = response_masks()
    b, t = mask.shape
    scores = torch.randn(b, dtype=DT)
    kl = torch.randn(b, t, dtype=DT) * 0.1
    beta = 0.05
    tok = torch.zeros(b, t, dtype=DT)
    for i in range(b):
        pos = positions(mask[i])
        for p in pos:
            tok[i, p] = -beta * kl[i, p]
        tok[i, pos[-1]] += scores[i]
    return {
        "attributes": enc(attrs),
        "attribute_names": ["helpfulness", "correctness", "coherence", "complexity", "verbosity"],
        "weights": weights,
        "goodness": enc(goodness),
        "truncated": [bool(x) for x in truncated.tolist()],
        "mean": mean,
        "std": std,
        "shaped": shaped,
        "scores": enc(scores),
        "kl": enc(kl),
        "mask": enc(mask),
        "kl_coef": beta,
        "token_rewards": enc(tok),
    }


# ---------------------------------------------------------------------------------------------
# Adaptive KL controller (Ziegler et al. 2019, sec. 2.2): e_t = clip(KL_t / KL_target - 1, -0.2,
# 0.2), beta_{t+1} = beta_t (1 + K_beta e_t) with K_beta = n_samples / horizon.


def kl_controller_cases():
    beta, target, horizon = 0.2, 6.0, 10000
    observed = [8.0, 30.0, 0.5, 6.0, 5.7, 6.3, 1e-3, 100.0]
    n = [128, 256, 64, 128, 128, 512, 1000, 64]
    coefs = []
    for kl, k in zip(observed, n):
        e = min(max((kl - target) / target, -0.2), 0.2)
        beta = beta * (1.0 + (k / horizon) * e)
        coefs.append(beta)
    return {"init": 0.2, "target": target, "horizon": horizon, "observed": observed, "n": n, "coefs": coefs}


# ---------------------------------------------------------------------------------------------
# AdamW: torch.optim.AdamW itself, with a decayed matrix and an undecayed bias; and
# torch.nn.utils.clip_grad_norm_.


def adamw_cases():
    w0 = torch.randn(3, 4, dtype=DT)
    b0 = torch.randn(4, dtype=DT)
    grads = [(torch.randn(3, 4, dtype=DT), torch.randn(4, dtype=DT)) for _ in range(6)]
    lrs = [1e-2, 2e-2, 3e-2, 3e-2, 1.5e-2, 1e-3]
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.AdamW(
        [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
        lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )
    for (gw, gb), lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        w.grad = gw.clone()
        b.grad = gb.clone()
        opt.step()
    g1 = torch.randn(5, 2, dtype=DT) * 2.0
    g2 = torch.randn(3, dtype=DT) * 2.0
    p1 = torch.zeros(5, 2, dtype=DT, requires_grad=True)
    p2 = torch.zeros(3, dtype=DT, requires_grad=True)
    p1.grad, p2.grad = g1.clone(), g2.clone()
    norm = torch.nn.utils.clip_grad_norm_([p1, p2], max_norm=1.0)
    return {
        "adamw": {
            "weight": enc(w0), "bias": enc(b0), "lrs": lrs, "betas": [0.9, 0.95], "eps": 1e-8,
            "weight_decay": 0.1,
            "grads": [{"weight": enc(gw), "bias": enc(gb)} for gw, gb in grads],
            "final_weight": enc(w.detach()), "final_bias": enc(b.detach()),
        },
        "clip": {
            "grads": [enc(g1), enc(g2)], "max_norm": 1.0, "norm": float(norm),
            "clipped": [enc(p1.grad), enc(p2.grad)],
        },
    }


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: algo_golden.py OUT.json")
    out = {
        "torch_version": torch.__version__,
        "gae": gae_cases(),
        "kl": kl_cases(),
        "ppo": ppo_cases(),
        "value": value_cases(),
        "grouped": grouped_cases(),
        "per_token": per_token_cases(),
        "reward": reward_cases(),
        "kl_controller": kl_controller_cases(),
        "optim": adamw_cases(),
    }
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, allow_nan=False)


if __name__ == "__main__":
    main()
