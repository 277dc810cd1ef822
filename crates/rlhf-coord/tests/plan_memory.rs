//! `rlhf-coord plan`'s memory estimate per trainer replica against what real `rlhf-worker`
//! processes hold on CPU: RLOO with two data-parallel actor replicas, each alone in its worker,
//! on the `small` preset (27.8M parameters, f32), so that the training state (hundreds of MiB)
//! dominates the process's own memory.
//!
//! Measured: the peak resident set of each actor worker during its last TrainStep (the worker
//! logs `peak_rss_bytes` per step: the kernel's high-water mark, reset when the step starts).
//! The process's baseline (libtorch's code and threads, the gRPC server, allocator slack; what
//! plan does not count) is the same measurement on the `tiny` preset (0.1M parameters) with
//! the same settings, minus plan's estimate for it. Compared, per replica:
//! - measured minus baseline against plan's total for ZeRO stage 0, ZeRO stage 2 and stage 0
//!   with activation checkpointing;
//! - what ZeRO-2 saves over stage 0 (plan: half the f32 accumulator and of the moments at
//!   N = 2), and what checkpointing saves, against plan's differences. A plan that stopped
//!   dividing by N, or counted checkpointing wrongly, misses these by far more than the
//!   tolerance.
//!
//! The workers run with `MALLOC_MMAP_THRESHOLD_=65536`, so that their resident set follows
//! the live tensors (see `run`). Tolerance: 20% of plan's figure, for the per-op temporaries
//! plan leaves out and what is left of the heap's fragmentation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;
use common::{coord, text, worker_bin};

const PROMPT: &str = "What is 12 + 34?";
const ACTORS: [&str; 2] = ["a1", "a2"];
/// The share of plan's figure the measurement may differ by.
const TOLERANCE: f64 = 0.2;
const MIB: f64 = (1u64 << 20) as f64;

/// Model, prompts and run file for `preset` under `dir`; returns the run file and the prompt's
/// length in tokens (what `rollout.max_prompt_tokens` is set to, so that plan's sequence length
/// is the one the run trains on).
fn setup(dir: &Path, preset: &str) -> (PathBuf, usize) {
    std::fs::create_dir_all(dir).unwrap();
    let model = dir.join("policy");
    let out = coord()
        .args(["init-model", "--preset", preset, "--out"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "init-model: {}", text(&out));
    let tok = rlhf_model::Tokenizer::from_dir(&model).unwrap();
    let msg = rlhf_model::ChatMessage {
        role: "user".into(),
        content: PROMPT.into(),
    };
    let prompt_tokens = tok.encode_messages(&[msg], true, true).unwrap().len();
    // One prompt: every row is as long as every other, and as long as plan assumes.
    let line = format!("{{\"prompt\": \"{PROMPT}\", \"answer\": \"46\"}}\n");
    std::fs::write(dir.join("prompts.jsonl"), line.repeat(4)).unwrap();
    let yaml = format!(
        "run: {{name: t, dir: runs, seed: 3}}\n\
         launcher: {{worker_bin: {}, heartbeat_interval_ms: 200, heartbeat_timeout_ms: 120000, startup_timeout_s: 180, collective_timeout_s: 180}}\n\
         workers:\n  - {{name: a1, roles: [actor], threads: 1}}\n  - {{name: a2, roles: [actor], threads: 1}}\n  - {{name: b, roles: [reference, reward, critic], threads: 1}}\n\
         models: {{policy: policy, reward: {{kind: exact_match}}}}\n\
         algorithm: {{name: rloo, kl: {{coef: 0.05}}}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 2, samples_per_prompt: 2, max_new_tokens: 160, max_prompt_tokens: {prompt_tokens}}}\n\
         train: {{steps: 2, epochs: 1, micro_batch_size: 2, replica_check_every: 0}}\n\
         checkpoint: {{every: 0}}\n\
         logging: {{progress: false, plot: false}}\n",
        worker_bin().display()
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    (f, prompt_tokens)
}

/// `rlhf-coord plan --json`'s estimate for the actor on each actor worker, in bytes.
fn planned(file: &Path, set: &[&str]) -> Vec<u64> {
    let mut c = coord();
    c.args(["plan", "--json"]).arg(file);
    for s in set {
        c.args(["--set", s]);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "plan: {}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    ACTORS
        .iter()
        .map(|name| {
            let w = v["workers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|w| w["name"] == *name)
                .unwrap_or_else(|| panic!("no worker {name} in {v}"));
            w["roles"]["actor"]["total"].as_u64().unwrap()
        })
        .collect()
}

/// `key=VALUE` of a log line, as a number.
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(&format!("{key}="))? + key.len() + 1..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The peak resident set of `worker`'s last TrainStep, from its log.
fn measured(run_dir: &Path, worker: &str) -> u64 {
    let path = run_dir.join(format!("logs/{worker}.log"));
    let log = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("train step memory"))
        .collect();
    // Two RL steps of one optimizer step each.
    assert_eq!(lines.len(), 2, "{}:\n{log}", path.display());
    let last = lines[1];
    assert!(
        last.contains("peak_since_step_start=true"),
        "the high-water mark could not be reset (/proc/self/clear_refs), so the peak includes the model load: {last}"
    );
    field(last, "peak_rss_bytes").unwrap_or_else(|| panic!("no peak_rss_bytes in {last}"))
}

/// Plan's estimate and the measured peak of each actor replica for one run.
struct Run {
    plan: Vec<u64>,
    peak: Vec<u64>,
}

fn run(dir: &Path, preset: &str, set: &[&str]) -> Run {
    let (file, _) = setup(dir, preset);
    let plan = planned(&file, set);
    let mut c = coord();
    c.arg("launch").arg(&file);
    for s in set {
        c.args(["--set", s]);
    }
    // glibc then maps every block over 64 KiB on its own and unmaps it when freed, so the
    // resident set follows the live tensors, which is what plan estimates. The worker's own
    // setting (blocks up to 32 MiB from a never-trimmed heap, malloc.rs) keeps freed heap
    // pages resident and measured ~140 MiB above this from the second step on
    // (docs/benchmarks.md).
    let out = c.env("MALLOC_MMAP_THRESHOLD_", "65536").output().unwrap();
    assert!(out.status.success(), "{preset} {set:?}: {}", text(&out));
    let run_dir = dir.join("runs/t");
    let peak = ACTORS.iter().map(|w| measured(&run_dir, w)).collect();
    Run { plan, peak }
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / MIB)
}

/// `got` within TOLERANCE of plan's `want` (`what` names the comparison).
fn check(errors: &mut Vec<String>, what: &str, got: f64, want: f64) {
    let line = format!(
        "{what}: measured {}, plan {} ({:+.1}%)",
        mib(got),
        mib(want),
        100.0 * (got - want) / want
    );
    eprintln!("{line}");
    if (got - want).abs() > TOLERANCE * want {
        errors.push(line);
    }
}

#[test]
fn plan_estimates_the_peak_memory_of_trainer_replicas_within_20_percent() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let base = run(&t.join("tiny"), "tiny", &[]);
    let runs: BTreeMap<&str, Run> = [
        ("zero0", vec!["train.zero_stage=0"]),
        ("zero2", vec!["train.zero_stage=2"]),
        (
            "zero0+ckpt",
            vec!["train.zero_stage=0", "train.gradient_checkpointing=true"],
        ),
    ]
    .into_iter()
    .map(|(name, set)| (name, run(&t.join(name), "small", &set)))
    .collect();

    let mut errors = vec![];
    for r in 0..ACTORS.len() {
        // The process's own memory: the tiny run's peak less what plan counts in it.
        let baseline = base.peak[r] as f64 - base.plan[r] as f64;
        eprintln!(
            "replica {r}: baseline {} (tiny: peak {}, plan {})",
            mib(baseline),
            mib(base.peak[r] as f64),
            mib(base.plan[r] as f64)
        );
        for (name, run) in &runs {
            check(
                &mut errors,
                &format!("replica {r} {name}, peak less baseline"),
                run.peak[r] as f64 - baseline,
                run.plan[r] as f64,
            );
        }
        let saved = |a: &str, b: &str| {
            let (a, b) = (&runs[a], &runs[b]);
            (
                a.peak[r] as f64 - b.peak[r] as f64,
                a.plan[r] as f64 - b.plan[r] as f64,
            )
        };
        let (got, want) = saved("zero0", "zero2");
        check(
            &mut errors,
            &format!("replica {r}, saved by ZeRO-2 on 2 replicas"),
            got,
            want,
        );
        let (got, want) = saved("zero0", "zero0+ckpt");
        check(
            &mut errors,
            &format!("replica {r}, saved by activation checkpointing"),
            got,
            want,
        );
    }
    assert!(
        errors.is_empty(),
        "plan is off by more than {}%:\n  {}",
        TOLERANCE * 100.0,
        errors.join("\n  ")
    );
}
