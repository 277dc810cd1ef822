//! Throughput of this crate on one model directory, for `scripts/bench/model_bench.sh`, which
//! runs it side by side with `scripts/bench/hf_bench.py` (transformers) on the same files.
//! Prints one JSON object: generation and training tokens/s.
//!
//! Usage: bench_model MODEL_DIR BATCH PROMPT_LEN NEW_TOKENS TRAIN_BATCH TRAIN_SEQ ITERS THREADS [DEVICE]
//! (DEVICE: cpu (default), cuda or cuda:N; on CUDA every timing ends with a device synchronize).

use std::path::PathBuf;
use std::time::Instant;

use rlhf_model::{generate, token_logprobs, GenerationConfig, LoadOptions, Model, Sampling};
use tch::{nn::OptimizerConfig, Device, Kind, Tensor};

fn prompts(batch: usize, len: usize, vocab: i64) -> Vec<Vec<i64>> {
    // The same deterministic ids the Python side builds: (i * 7919 + j * 104729) % (vocab - 3) + 3.
    (0..batch)
        .map(|i| {
            (0..len)
                .map(|j| ((i * 7919 + j * 104_729) as i64) % (vocab - 3) + 3)
                .collect()
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 8 && a.len() != 9 {
        return Err("usage: bench_model MODEL_DIR BATCH PROMPT_LEN NEW_TOKENS TRAIN_BATCH TRAIN_SEQ ITERS THREADS [DEVICE]".into());
    }
    let device_name = a.get(8).map(String::as_str).unwrap_or("cpu");
    let device = rlhf_model::config::device_from_str(device_name)
        .ok_or_else(|| format!("DEVICE `{device_name}`: expected cpu, cuda or cuda:N"))?;
    // Work queued on a GPU is finished before a clock is read.
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let dir = PathBuf::from(&a[0]);
    let n = |i: usize| a[i].parse::<usize>();
    let (batch, plen, new, tb, ts, iters, threads) =
        (n(1)?, n(2)?, n(3)?, n(4)?, n(5)?, n(6)?, n(7)?);
    tch::set_num_threads(threads as i32);
    let mut model = Model::load(
        &dir,
        &LoadOptions {
            device,
            ..Default::default()
        },
    )?;
    let vocab = model.config.vocab_size as i64;

    let ps = prompts(batch, plen, vocab);
    let greedy = GenerationConfig::greedy(new);
    let sampled = GenerationConfig {
        sampling: Sampling::Sample {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.9),
        },
        ..GenerationConfig::greedy(new)
    };
    let mut gen_greedy = f64::MAX;
    let mut gen_sampled = f64::MAX;
    generate(&model, &ps, &greedy)?; // warm-up
    for _ in 0..iters {
        let t = Instant::now();
        let out = generate(&model, &ps, &greedy)?;
        sync();
        assert_eq!(out.response_ids.size()[1] as usize, new);
        gen_greedy = gen_greedy.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        generate(&model, &ps, &sampled)?;
        sync();
        gen_sampled = gen_sampled.min(t.elapsed().as_secs_f64());
    }

    let ids: Vec<i64> = prompts(tb, ts, vocab).concat();
    let ids = Tensor::from_slice(&ids)
        .view([tb as i64, ts as i64])
        .to_device(device);
    let mask = ids.ones_like();
    let mut opt = tch::nn::AdamW::default().build(model.var_store_mut(), 1e-5)?;
    let mut step = || -> Result<(), Box<dyn std::error::Error>> {
        let lp = token_logprobs(&model, &ids, &mask, 1.0, false)?;
        let loss = -lp.logprobs.mean(Kind::Float);
        opt.zero_grad();
        loss.backward();
        opt.step();
        Ok(())
    };
    step()?; // warm-up
    let mut train = f64::MAX;
    for _ in 0..iters {
        let t = Instant::now();
        step()?;
        sync();
        train = train.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "rlhf-model",
            "device": device_name,
            "gen_greedy_tok_s": (batch * new) as f64 / gen_greedy,
            "gen_sampled_tok_s": (batch * new) as f64 / gen_sampled,
            "train_tok_s": (tb * ts) as f64 / train,
        })
    );
    Ok(())
}
