//! The actor's and the reference's libtorch work of one RLOO step of `scripts/bench/rloo_vs_trl.sh`
//! in one process, phase by phase, for profiling (`perf record` on one phase) without the
//! control plane: generate (B distinct prompts x N samples, temperature 1), reference log-probs
//! (no grad), train (forward with gradients, PPO loss, backward, clip, AdamW).
//!
//! Usage: profile_rloo MODEL_DIR PHASE ITERS [THREADS]   (PHASE: all, gen, ref, train)
//! REF_ROWS=n: the reference forward in chunks of n rows, as the reference worker runs it.
//! Prints each phase's best and median time over ITERS (after one warm-up).

use std::path::PathBuf;
use std::time::Instant;

use rlhf_algo::{policy_loss, AdamW, OptimizerConfig, PolicyLossConfig, PolicyLossInputs};
use rlhf_model::{
    generate, token_logprobs_from, Entropy, GenerationConfig, LoadOptions, Model, Sampling,
};
use tch::Kind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 3 {
        return Err("usage: profile_rloo MODEL_DIR PHASE ITERS [THREADS]".into());
    }
    let phase = a[1].as_str();
    let iters: usize = a[2].parse()?;
    tch::set_num_threads(a.get(3).map(|t| t.parse()).transpose()?.unwrap_or(2));
    let model = Model::load(&PathBuf::from(&a[0]), &LoadOptions::default())?;
    let reference = Model::load(&PathBuf::from(&a[0]), &LoadOptions::default())?;
    let (b, n, plen, t) = (8usize, 4usize, 18usize, 32usize);
    let vocab = model.config.vocab_size as i64;
    let prompts: Vec<Vec<i64>> = (0..b * n)
        .map(|i| {
            let p = i / n;
            (0..plen)
                .map(|j| ((p * 7919 + j * 104_729) as i64) % (vocab - 3) + 3)
                .collect()
        })
        .collect();
    let cfg = GenerationConfig {
        sampling: Sampling::Sample {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        },
        ..GenerationConfig::greedy(t)
    };
    let params: Vec<(String, tch::Tensor)> = model.named_tensors();
    let mut opt = AdamW::new(params, &OptimizerConfig::default())?;
    let loss_cfg = PolicyLossConfig::default();
    let mut times: Vec<(&str, Vec<f64>)> =
        vec![("gen", vec![]), ("ref", vec![]), ("train", vec![])];
    let out = generate(&model, &prompts, &cfg)?;
    for it in 0..=iters {
        let mut clock = |k: usize, t0: Instant| {
            if it > 0 {
                times[k].1.push(t0.elapsed().as_secs_f64());
            }
        };
        if phase == "all" || phase == "gen" {
            let t0 = Instant::now();
            generate(&model, &prompts, &cfg)?;
            clock(0, t0);
        }
        let from = out.prompt_width - 1;
        if phase == "all" || phase == "ref" {
            let t0 = Instant::now();
            let _g = tch::no_grad_guard();
            // REF_ROWS: rows per forward, as the reference worker splits its batch.
            let rows = out.sequences.size()[0];
            let chunk = std::env::var("REF_ROWS").map_or(Ok(rows), |v| v.parse())?;
            for start in (0..rows).step_by(chunk.max(1) as usize) {
                let n = chunk.min(rows - start);
                token_logprobs_from(
                    &reference,
                    &out.sequences.narrow(0, start, n),
                    &out.attention_mask.narrow(0, start, n),
                    from,
                    1.0,
                    Entropy::Off,
                )?;
            }
            clock(1, t0);
        }
        if phase == "all" || phase == "train" {
            let t0 = Instant::now();
            opt.zero_grad()?;
            let lp = token_logprobs_from(
                &model,
                &out.sequences,
                &out.attention_mask,
                from,
                1.0,
                Entropy::Metric,
            )?;
            let mask = out.response_mask.to_kind(Kind::Float);
            let adv = mask.randn_like();
            let l = policy_loss(
                &loss_cfg,
                &PolicyLossInputs {
                    logprobs: &lp.logprobs,
                    old_logprobs: &out.response_logprobs,
                    advantages: &adv,
                    response_mask: &mask,
                    entropy: lp.entropy.as_ref(),
                    ref_logprobs: None,
                },
                None,
            )?;
            let t1 = Instant::now();
            l.loss.backward();
            let t2 = Instant::now();
            opt.clip_grad_norm(Some(1.0))?;
            let t3 = Instant::now();
            opt.step(1e-5)?;
            if std::env::var_os("PROFILE_SPLIT").is_some() && it > 0 {
                eprintln!(
                    "fwd {:.4} bwd {:.4} clip {:.4} adamw {:.4}",
                    (t1 - t0).as_secs_f64(),
                    (t2 - t1).as_secs_f64(),
                    (t3 - t2).as_secs_f64(),
                    t3.elapsed().as_secs_f64()
                );
            }
            clock(2, t0);
        }
    }
    for (name, mut v) in times {
        if v.is_empty() {
            continue;
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("{name}: best {:.4} s, median {:.4} s", v[0], v[v.len() / 2]);
    }
    Ok(())
}
