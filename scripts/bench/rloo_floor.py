"""GEMM floor of one synchronous RLOO step: the time the matrix multiplies of the step take on
their own, at the step's exact shapes, with libtorch on this machine. No implementation that
runs the same model, batch and algorithm synchronously (generate, then reference log-probs, then
forward + backward + optimizer) can do fewer of them, so their time is a lower bound on its step
time; compare it with the measured steps of `rloo_vs_trl.sh` in the same run.

The shapes are those of the cheapest exact computation, which is what rlhf-coord does:
- generate: one prefill of each distinct prompt (B rows of P tokens), then T - 1 decode steps of
  B*N rows through every layer and the vocabulary projection;
- score (reference log-probs): the prompts once (B x P tokens) and each sample's T - 1 response
  tokens that predict a next one, the vocabulary projection at the B*N*T predicting positions;
- train: the same forward with gradients, i.e. 3x its GEMMs (forward, input grads, weight grads).
Attention score products (sequences of P + T <= 64 tokens), norms, activations, sampling and the
optimizer are left out, so the true floor is higher.

Usage: rloo_floor.py --model DIR --batch-size B --samples N --prompt-len P --max-new-tokens T
           [--threads 2] [--repeats 5]
Prints one JSON object: per-phase floors and their sum (seconds), best of --repeats.
"""
import argparse
import json
import time

import torch


def linears(cfg):
    """(out_features, in_features) of each linear layer of one decoder layer."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def timed(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (config.json is read)")
    p.add_argument("--batch-size", type=int, required=True, help="prompts per step (B)")
    p.add_argument("--samples", type=int, required=True, help="samples per prompt (N)")
    p.add_argument("--prompt-len", type=int, required=True, help="prompt tokens (P)")
    p.add_argument("--max-new-tokens", type=int, required=True, help="response tokens (T)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = json.load(open(f"{a.model}/config.json"))
    layers, vocab, h = cfg["num_hidden_layers"], cfg["vocab_size"], cfg["hidden_size"]
    ws = {s: torch.randn(*s) * 0.02 for s in set(linears(cfg) + [(vocab, h)])}
    rows = a.batch_size * a.samples

    def forward(m, head_m, weight_left=False):
        """GEMMs of a forward over m token rows, the vocabulary projection over head_m rows;
        `weight_left` computes (W x^T)^T, the faster form for a few rows (decode)."""
        x = {s: torch.randn(m, s[1]) for s in ws}
        xh = torch.randn(head_m, h)
        lin = (lambda x, w: w.mm(x.t())) if weight_left else torch.nn.functional.linear

        def run():
            for _ in range(layers):
                for s in linears(cfg):
                    lin(x[s], ws[s])
            lin(xh, ws[(vocab, h)])

        return run

    def backward(m, head_m):
        """Input and weight gradients of the same GEMMs (2 GEMMs per forward GEMM)."""
        gy = {s: torch.randn(m, s[0]) for s in ws}
        x = {s: torch.randn(m, s[1]) for s in ws}
        gh, xh = torch.randn(head_m, vocab), torch.randn(head_m, h)

        def run():
            for _ in range(layers):
                for s in linears(cfg):
                    gy[s].mm(ws[s])
                    gy[s].t().mm(x[s])
            gh.mm(ws[(vocab, h)])
            gh.t().mm(xh)

        return run

    b, n, pl, t = a.batch_size, a.samples, a.prompt_len, a.max_new_tokens
    prefill = timed(forward(b * pl, b), a.repeats)
    decode = min(timed(forward(rows, rows, w), a.repeats) for w in (False, True)) * (t - 1)
    tokens = b * pl + rows * (t - 1)
    fwd = timed(forward(tokens, rows * t), a.repeats)
    bwd = timed(backward(tokens, rows * t), a.repeats)
    out = {
        "generate_s": prefill + decode,
        "score_s": fwd,
        "train_s": fwd + bwd,
    }
    out["step_s"] = sum(out.values())
    print(json.dumps({k: round(v, 4) for k, v in out.items()}))


if __name__ == "__main__":
    main()
