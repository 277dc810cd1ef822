//! Peak memory and step time of one training forward + backward with and without activation
//! checkpointing per decoder layer (`train.gradient_checkpointing`), against the arithmetic.
//! Run by `scripts/bench/grad_ckpt_bench.sh`; numbers in docs/benchmarks.md.
//!
//! Usage: ckpt_memory LAYERS HIDDEN INTER HEADS KV_HEADS VOCAB BATCH SEQ [ROUNDS] [ITERS]
//!
//! Each measurement runs in a fresh child process (this binary again, `--child`), so the peak
//! resident set is that run's own: the child builds a random f32 model on the CPU, does one
//! warm-up step (allocating the weights' gradients, which both modes keep), resets the kernel's
//! high-water mark (`/proc/self/clear_refs`, 5), then runs ITERS steps and reports the peak
//! over the resident set before them: the step's activations and temporaries. glibc's mmap
//! threshold is pinned (`MALLOC_MMAP_THRESHOLD_`) so freed tensors leave the resident set at
//! once instead of staying in the heap. Modes alternate for ROUNDS rounds (these machines are
//! noisy); each side keeps its smallest peak and its fastest step.
//!
//! The arithmetic, in f32 values per token (h hidden, i intermediate, kv = kv_heads * head_dim),
//! of what a plain backward keeps per layer (libtorch's saved tensors): the residual stream in
//! and after attention (2h), each RMSNorm's normalised value and output (2 x 2h), the rotated
//! queries and keys, the values, SDPA's output and its contiguous copy (3h + 2kv; flash
//! attention on the CPU keeps no t x t matrix), the MLP's gate, SiLU, up and product (4i):
//! `A = 9h + 2kv + 4i`. Plain: `L * A`. Checkpointed: the `L` layer inputs plus one layer's
//! graph while it is recomputed, `L * h + A`. The head (logits and their gradient, a few
//! vocab-sized rows per token) is the same for both and not counted.

use std::process::Command;
use std::time::Instant;

use rlhf_model::config::HfConfig;
use rlhf_model::{token_logprobs_checkpointed, token_logprobs_from, Entropy, Model};
use tch::{Device, Kind, Tensor};

const USAGE: &str =
    "usage: ckpt_memory LAYERS HIDDEN INTER HEADS KV_HEADS VOCAB BATCH SEQ [ROUNDS] [ITERS]";

#[derive(Clone, Copy)]
struct Shape {
    layers: i64,
    hidden: i64,
    inter: i64,
    heads: i64,
    kv_heads: i64,
    vocab: i64,
    batch: i64,
    seq: i64,
}

impl Shape {
    fn parse(a: &[String]) -> Result<Shape, Box<dyn std::error::Error>> {
        let n = |i: usize| -> Result<i64, Box<dyn std::error::Error>> {
            Ok(a.get(i).ok_or(USAGE)?.parse::<i64>()?)
        };
        Ok(Shape {
            layers: n(0)?,
            hidden: n(1)?,
            inter: n(2)?,
            heads: n(3)?,
            kv_heads: n(4)?,
            vocab: n(5)?,
            batch: n(6)?,
            seq: n(7)?,
        })
    }

    fn args(&self) -> Vec<String> {
        [
            self.layers,
            self.hidden,
            self.inter,
            self.heads,
            self.kv_heads,
            self.vocab,
            self.batch,
            self.seq,
        ]
        .iter()
        .map(i64::to_string)
        .collect()
    }

    /// Bytes of saved activations: (plain, checkpointed), see the file comment.
    fn estimate(&self) -> (f64, f64) {
        let (h, i) = (self.hidden as f64, self.inter as f64);
        let kv = (self.kv_heads * (self.hidden / self.heads)) as f64;
        let per_layer = 9.0 * h + 2.0 * kv + 4.0 * i;
        let tokens = (self.batch * self.seq) as f64;
        let l = self.layers as f64;
        (
            tokens * l * per_layer * 4.0,
            tokens * (l * h + per_layer) * 4.0,
        )
    }
}

/// A field of /proc/self/status in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> Result<f64, Box<dyn std::error::Error>> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| format!("no {field} in /proc/self/status"))?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed status line")?
        .parse()?;
    Ok(kb * 1024.0)
}

/// One measured run in this process: prints `peak_bytes step_seconds`.
fn child(ckpt: bool, s: Shape, iters: usize) -> Result<(), Box<dyn std::error::Error>> {
    tch::set_num_threads(1);
    let hf: HfConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": s.vocab, "hidden_size": s.hidden,
        "intermediate_size": s.inter, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "max_position_embeddings": s.seq + 1, "tie_word_embeddings": false
    }))?;
    let config = hf.resolve(std::path::Path::new("config.json"))?;
    let model = Model::new(config, Device::Cpu, Kind::Float, 0)?;
    // Distinct rows (no shared prefix), no padding: the plain path of both forwards.
    let ids: Vec<i64> = (0..s.batch * (s.seq + 1))
        .map(|j| (j * 104_729 + 7919) % (s.vocab - 3) + 3)
        .collect();
    let ids = Tensor::from_slice(&ids).view([s.batch, s.seq + 1]);
    let mask = ids.ones_like();
    let step = || -> Result<(), Box<dyn std::error::Error>> {
        if ckpt {
            let (lp, c) = token_logprobs_checkpointed(&model, &ids, &mask, 0, 1.0, Entropy::Off)?;
            let loss = lp.logprobs.mean(Kind::Float);
            drop(lp);
            loss.f_backward()?;
            drop(loss);
            c.backward()?;
        } else {
            let lp = token_logprobs_from(&model, &ids, &mask, 0, 1.0, Entropy::Off)?;
            let loss = lp.logprobs.mean(Kind::Float);
            drop(lp);
            loss.f_backward()?;
        }
        // Zeroed in place: the gradient buffers stay allocated, as in training.
        for (_, mut t) in model.named_tensors() {
            t.zero_grad();
        }
        Ok(())
    };
    step()?;
    std::fs::write("/proc/self/clear_refs", "5")?;
    let base = status_bytes("VmRSS")?;
    let mut best = f64::INFINITY;
    for _ in 0..iters {
        let t0 = Instant::now();
        step()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let peak = status_bytes("VmHWM")? - base;
    println!("{peak} {best}");
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.first().map(String::as_str) == Some("--child") {
        let ckpt = a.get(1).map(String::as_str) == Some("ckpt");
        let s = Shape::parse(&a[3..])?;
        return child(ckpt, s, a[2].parse()?);
    }
    let s = Shape::parse(&a)?;
    let rounds: usize = a.get(8).map_or(Ok(2), |r| r.parse())?;
    let iters: usize = a.get(9).map_or(Ok(2), |r| r.parse())?;
    let exe = std::env::current_exe()?;
    let mut best = [(f64::INFINITY, f64::INFINITY); 2];
    for _ in 0..rounds {
        for (k, mode) in ["plain", "ckpt"].iter().enumerate() {
            let out = Command::new(&exe)
                .args(["--child", mode, &iters.to_string()])
                .args(s.args())
                .env("MALLOC_MMAP_THRESHOLD_", "65536")
                .env("OMP_NUM_THREADS", "1")
                .output()?;
            if !out.status.success() {
                return Err(format!(
                    "{mode} child failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            let text = String::from_utf8(out.stdout)?;
            let mut f = text.split_whitespace().map(str::parse::<f64>);
            let (peak, secs) = (f.next().ok_or("no peak")??, f.next().ok_or("no time")??);
            best[k] = (best[k].0.min(peak), best[k].1.min(secs));
        }
    }
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let (est_plain, est_ckpt) = s.estimate();
    let [(plain, t_plain), (ckpt, t_ckpt)] = best;
    println!(
        "shape: layers {} hidden {} inter {} heads {}/{} vocab {} batch {} seq {} ({} tokens)",
        s.layers,
        s.hidden,
        s.inter,
        s.heads,
        s.kv_heads,
        s.vocab,
        s.batch,
        s.seq,
        s.batch * s.seq
    );
    println!(
        "peak over baseline, MiB: plain {:.0}, checkpointed {:.0}, saved {:.0}",
        mib(plain),
        mib(ckpt),
        mib(plain - ckpt)
    );
    println!(
        "arithmetic, MiB: plain {:.0}, checkpointed {:.0}, saved {:.0} (measured/arithmetic saving {:.2})",
        mib(est_plain),
        mib(est_ckpt),
        mib(est_plain - est_ckpt),
        (plain - ckpt) / (est_plain - est_ckpt)
    );
    println!(
        "step s (best of {rounds}x{iters}, 1 thread): plain {t_plain:.3}, checkpointed {t_ckpt:.3} (+{:.0}%)",
        (t_ckpt / t_plain - 1.0) * 100.0
    );
    Ok(())
}
