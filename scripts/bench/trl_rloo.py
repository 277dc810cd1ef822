"""TRL side of the side-by-side RLOO benchmark: the same RLOO configuration as an `rlhf-coord` run
(model files, prompts, batch, samples per prompt, response length, epochs, KL) in TRL's
`RLOOTrainer` on CPU, timing each RLOO step (generate + score + update). Prints one JSON object and
writes it to --out.

Runs in the benchmark venv (scripts/bench/requirements-bench.txt), e.g.
    python -m venv ~/.cache/rlhf-coord/bench-venv
    ~/.cache/rlhf-coord/bench-venv/bin/pip install -r scripts/bench/requirements-bench.txt

Usage:
    trl_rloo.py --policy DIR --reward-kind exact_match|model [--reward DIR] --prompts FILE.jsonl \
        --batch-size B --samples N --max-new-tokens T --epochs E --kl-coef K --lr LR --steps S \
        [--threads 2] [--seed 0] [--no-chat-template] --out result.json
    trl_rloo.py make-model --size 2m|20m --tokenizer-from DIR --out DIR [--seed 0]

One RLOO step here = one generation batch of B prompts x N samples, then E optimizer steps over it
(TRL's `num_iterations`), i.e. what rlhf-coord calls a step (rollout + `train.epochs` passes, one
optimizer step per pass with the default `train.minibatch_size`). The first step is warm-up and is
left out of the median. `make-model` writes the benchmark's model directories (config, f32
safetensors, the tokenizer of an `rlhf-coord init-model` directory).
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

# The benchmark configurations of `make-model` (Llama, untied embeddings, vocab as the `small`
# preset of `rlhf-coord init-model`).
SIZES = {
    # 2,032,768 parameters
    "2m": dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2),
    # 20,453,760 parameters
    "20m": dict(vocab_size=4096, hidden_size=384, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=6, num_key_value_heads=2),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="policy (and reference) model directory, HF layout")
    p.add_argument("--reward-kind", required=True, choices=["exact_match", "model"])
    p.add_argument("--reward", help="reward model directory (--reward-kind model)")
    p.add_argument("--prompts", required=True, help="JSONL: `prompt` string or `messages` list, `answer`")
    p.add_argument("--batch-size", type=int, required=True, help="prompts per step (B)")
    p.add_argument("--samples", type=int, required=True, help="samples per prompt (N >= 2)")
    p.add_argument("--max-new-tokens", type=int, required=True, help="response length (T)")
    p.add_argument("--epochs", type=int, default=1, help="passes over each rollout batch (E)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="KL coefficient (beta)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--steps", type=int, required=True, help="RLOO steps, the first one is warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = off (rlhf-coord default: 1.0)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="plain prompts, as rollout.chat_template: false")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.reward_kind == "model" and not a.reward:
        p.error("--reward-kind model needs --reward DIR")
    if a.samples < 2:
        p.error("RLOO needs --samples >= 2")
    if a.steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up)")
    return a


# ---- exact-match reward: a port of crates/rlhf-worker/src/reward_rules.rs (last_number) ----

def last_number(s):
    """The last number in `s` (optional sign, decimals, `1,234` = 1234), as rlhf-coord reads it."""

    def digit(c):
        return "0" <= c <= "9"

    end = len(s)
    # Find the last digit, then walk back over digits, separators and decimal points.
    while end > 0 and not digit(s[end - 1]):
        end -= 1
    if end == 0:
        return None
    start = end
    while start > 0:
        c = s[start - 1]
        sep = c in ",." and start >= 2 and digit(s[start - 2]) and start < end
        if digit(c) or sep:
            start -= 1
        else:
            break
    if start > 0 and s[start - 1] == "-":
        start -= 1
    try:
        return float(s[start:end].replace(",", ""))
    except ValueError:
        return None


def exact_match_reward(prompts, completions, answer, **kwargs):
    out = []
    for c, ref in zip(completions, answer, strict=True):
        text = c[-1]["content"] if isinstance(c, list) else c
        got, want = last_number(text), last_number(str(ref))
        out.append(1.0 if got is not None and want is not None and got == want else 0.0)
    return out


def load_prompts(path, chat):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not JSON: {e}")
            if "prompt" in obj:
                messages = [{"role": "user", "content": obj["prompt"]}]
            elif "messages" in obj:
                messages = [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
            else:
                sys.exit(f"{path}:{n}: needs a `prompt` string or a `messages` list")
            prompt = messages if chat else "\n".join(m["content"] for m in messages)
            ans = obj.get("answer")
            rows.append({"prompt": prompt, "answer": "" if ans is None else str(ans)})
    if not rows:
        sys.exit(f"{path}: no prompts")
    return rows


def make_model(argv):
    p = argparse.ArgumentParser(prog="trl_rloo.py make-model")
    p.add_argument("--size", required=True, choices=sorted(SIZES))
    p.add_argument("--tokenizer-from", required=True, help="an `rlhf-coord init-model` directory")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[a.size]
    # config.json in the fields and style `rlhf-coord init-model` writes
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **s,
        "head_dim": s["hidden_size"] // s["num_attention_heads"], "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0, "dtype": "float32",
        "initializer_range": 0.02,
    }
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    hf = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "dtype")}
    model = LlamaForCausalLM(LlamaConfig(**hf)).to(torch.float32)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if "rotary_emb" not in k}
    save_file(sd, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": [2, 0], "pad_token_id": 0}, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = os.path.join(a.tokenizer_from, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(a.out, name))
    n = sum(v.numel() for v in sd.values())
    print(json.dumps({"out": a.out, "size": a.size, "params": n, "config": s}))


def main(argv):
    if argv and argv[0] == "make-model":
        return make_model(argv[1:])
    a = parse_args(argv)
    # Thread counts must be in place before torch starts its pools.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["WANDB_DISABLED"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    torch.set_num_threads(a.threads)
    import datasets
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    rows = load_prompts(a.prompts, chat=not a.no_chat_template)
    if len(rows) < a.batch_size:
        sys.exit(f"{a.prompts}: {len(rows)} prompts, fewer than --batch-size {a.batch_size}")
    if a.reward_kind == "exact_match" and any(r["answer"] == "" for r in rows):
        sys.exit(f"{a.prompts}: exact_match needs an `answer` on every row")
    dataset = datasets.Dataset.from_list(rows)

    outdir = tempfile.mkdtemp(prefix="trl-rloo-")
    cfg = RLOOConfig(
        output_dir=outdir,
        # batch: one generation batch = B prompts x N samples = one optimizer step per pass
        per_device_train_batch_size=a.batch_size * a.samples,  # sequences, not prompts
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=a.samples,
        num_iterations=a.epochs,
        max_steps=a.steps * a.epochs,  # optimizer steps
        max_completion_length=a.max_new_tokens,
        # sampling: plain temperature-1 sampling, transformers generate (no vLLM, no paged/CB)
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        use_vllm=False, use_transformers_continuous_batching=False,
        # objective
        beta=a.kl_coef,
        epsilon=0.2,
        normalize_advantages=False,
        mask_truncated_completions=False,
        reward_clip_range=None,
        # optimizer: AdamW, constant lr, no warm-up, no weight decay, grad clip as rlhf-coord
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=a.max_grad_norm,
        # precision / device: f32 on CPU, no gradient checkpointing (TRL defaults: bf16, on)
        use_cpu=True,
        bf16=False, fp16=False,
        gradient_checkpointing=False,
        torch_compile=False,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
        disable_dropout=True,
        # no logging, eval, checkpoints
        report_to="none",
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        # data
        shuffle_dataset=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=a.seed,
        data_seed=a.seed,
    )

    reward_funcs = exact_match_reward if a.reward_kind == "exact_match" else a.reward

    class StepTimer(TrainerCallback):
        """Wall time of each RLOO step: on_step_begin of its first optimizer step (generation
        happens inside it) to on_step_end of its E-th."""

        def __init__(self):
            self.opt_times, self.steps, self._t0, self._s0 = [], [], None, None
            self.metrics = {"completions/mean_length": [], "reward": [], "kl": []}

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()
            if state.global_step % a.epochs == 0:
                self._s0 = self._t0

        def on_step_end(self, args, state, control, **kw):
            t = time.perf_counter()
            self.opt_times.append(t - self._t0)
            if state.global_step % a.epochs == 0:
                self.steps.append(t - self._s0)
                # TRL clears its metrics when it logs (here only at the end): keep each step's.
                for k, v in self.metrics.items():
                    got = trainer._metrics["train"].get(k)
                    v.append(got[-1] if got else None)

    timer = StepTimer()
    trainer = RLOOTrainer(
        model=a.policy,
        reward_funcs=reward_funcs,
        args=cfg,
        train_dataset=dataset,
        callbacks=[timer],
    )

    # Phase split of each step (generate / reward / log-probs of policy+reference / update),
    # by wrapping the trainer's own methods.
    phases = {"generate": [], "reward": [], "prepare": []}

    def wrap(name, key):
        f = getattr(trainer, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                phases[key].append(time.perf_counter() - t)

        setattr(trainer, name, timed)

    wrap("_generate", "generate")
    wrap("_calculate_rewards", "reward")
    wrap("_generate_and_score_completions", "prepare")

    params = sum(p.numel() for p in trainer.model.parameters())
    threads_seen = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    trainer.train()
    load_after = os.getloadavg()[0]

    if len(timer.steps) != a.steps:
        sys.exit(f"timed {len(timer.steps)} steps, expected {a.steps}")
    timed = timer.steps[1:]  # the first step is warm-up
    gen, rew, prep = phases["generate"][1:], phases["reward"][1:], phases["prepare"][1:]
    logprobs = [p - g - r for p, g, r in zip(prep, gen, rew)]
    update = [s - p for s, p in zip(timed, prep)]
    med = statistics.median
    m = timer.metrics
    result = {
        "impl": "trl",
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "steps": a.steps,
        "warmup_steps": 1,
        "step_time_s_median": med(timed),
        "step_times": timed,
        "warmup_step_time_s": timer.steps[0],
        "phase_s_median": {
            "generate": med(gen),
            "reward": med(rew),
            "logprobs_policy_ref": med(logprobs),
            "update": med(update),  # E x (forward + backward + clip + AdamW)
        },
        "optimizer_step_times": timer.opt_times,
        # per step, warm-up included
        "completion_len_mean": m["completions/mean_length"],
        "reward_mean": m["reward"],
        "kl_mean": m["kl"],
        "params": params,
        "threads": threads_seen,
        # 1-minute load average before/after the run: other processes on the machine inflate and
        # scatter the times (OpenMP threads wait for preempted peers); compare quiet runs only
        "loadavg_1m": [load_before, load_after],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "config": {
            "policy": os.path.abspath(a.policy), "reward_kind": a.reward_kind,
            "reward": a.reward and os.path.abspath(a.reward), "prompts": os.path.abspath(a.prompts),
            "batch_size": a.batch_size, "samples": a.samples, "max_new_tokens": a.max_new_tokens,
            "epochs": a.epochs, "kl_coef": a.kl_coef, "lr": a.lr, "seed": a.seed,
            "max_grad_norm": a.max_grad_norm, "chat_template": not a.no_chat_template,
            "optim": getattr(cfg.optim, "value", str(cfg.optim)),
            "per_device_train_batch_size": cfg.per_device_train_batch_size,
        },
    }
    shutil.rmtree(outdir, ignore_errors=True)
    text = json.dumps(result, indent=2)
    with open(a.out, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
