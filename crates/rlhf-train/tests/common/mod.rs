//! Helpers shared by this crate's integration tests: tiny models made on the spot, synthetic
//! data in the published schemas, job configs, and the Python reference interpreter.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlhf_model::init::{init_model, InitSpec, Preset};
use rlhf_model::Family;
use rlhf_train::{RmJobConfig, SftJobConfig};
use serde_json::{json, Value};

/// A random `tiny` Llama (hidden 64, 2 layers, ChatML template) in `dir`.
pub fn tiny_model(dir: &Path, seed: i64) -> PathBuf {
    let mut spec = InitSpec::new(Family::Llama, Preset::Tiny);
    spec.seed = seed;
    init_model(&spec, dir).expect("init_model");
    dir.to_path_buf()
}

pub fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

pub fn write_jsonl_gz(path: &Path, rows: &[Value]) {
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    for r in rows {
        writeln!(gz, "{r}").unwrap();
    }
    gz.finish().unwrap();
}

const FILLER: &[&str] = &[
    "the", "model", "policy", "token", "reward", "prompt", "data", "state", "score", "value",
    "small", "sea", "travel", "square",
];
const PROMPTS: &[&str] = &[
    "What is the capital of the sea?",
    "Tell me about the reward model.",
    "How does the policy travel?",
    "Say something small.",
];

/// A response of `len` words with `good` copies of the keyword "good" and, when `yes`, one
/// "yes", at random places among filler words.
pub fn response(rng: &mut ChaCha8Rng, len: usize, good: usize, yes: bool) -> String {
    let mut words: Vec<&str> = (0..len)
        .map(|_| FILLER[rng.random_range(0..FILLER.len())])
        .collect();
    let mut slots: Vec<usize> = (0..len).collect();
    for i in (1..slots.len()).rev() {
        let j = rng.random_range(0..=i);
        slots.swap(i, j);
    }
    for &s in slots.iter().take(good) {
        words[s] = "good";
    }
    if yes {
        words[slots[good]] = "yes";
    }
    words.join(" ")
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// HelpSteer2 ratings rows where helpfulness is the number of "good"s (0..4) and coherence is
/// 4 when the response says "yes" (else 0); the other attributes are noise.
pub fn ratings_rows(n: usize, seed: u64) -> Vec<Value> {
    let mut r = rng(seed);
    (0..n)
        .map(|_| {
            let good = r.random_range(0..=4usize);
            let yes = r.random_bool(0.5);
            let p = PROMPTS[r.random_range(0..PROMPTS.len())];
            json!({
                "prompt": p,
                "response": response(&mut r, 7, good, yes),
                "helpfulness": good,
                "correctness": r.random_range(0..=4),
                "coherence": if yes { 4 } else { 0 },
                "complexity": r.random_range(0..=4),
                "verbosity": r.random_range(0..=4),
            })
        })
        .collect()
}

/// HelpSteer2-Preference rows: the response with more "good"s is preferred, by a strength that
/// grows with the difference; the preferred side is random. Multi-turn prompts now and then.
pub fn preference_rows(n: usize, seed: u64, split: &str) -> Vec<Value> {
    let mut r = rng(seed);
    (0..n)
        .map(|i| {
            let a = r.random_range(0..=3usize);
            let b = r.random_range(a + 1..=4usize);
            let (better, worse) = (response(&mut r, 7, b, false), response(&mut r, 7, a, false));
            let strength = ((b - a) as i64).min(3);
            let first_better = r.random_bool(0.5);
            let (r1, r2, s) = if first_better {
                (better, worse, -strength)
            } else {
                (worse, better, strength)
            };
            let prompt = if i % 3 == 0 {
                "Hi there.\n<extra_id_1>Assistant\nHello, the model is here.\n<extra_id_1>User\nSay something small.".to_string()
            } else {
                PROMPTS[r.random_range(0..PROMPTS.len())].to_string()
            };
            json!({
                "split": split, "prompt": prompt, "response_1": r1, "response_2": r2,
                "preference_strength": s,
                "preference_statement": "@Response 2 is better.",
                "preference_elaboration": "ignored",
                "three_most_similar_preferences": [], "all_preferences_unprocessed": []
            })
        })
        .collect()
}

/// A reward-model job config over `train` (and `eval`) in `run`.
pub fn rm_config(
    run: &Path,
    model: &Path,
    objective: &str,
    train: &Path,
    eval: Option<&Path>,
) -> RmJobConfig {
    let mut v = json!({
        "run_dir": run, "model": model, "objective": objective,
        "data": {"train": {"path": train}},
        "train": {"batch_size": 16, "micro_batch_size": 8, "epochs": 1, "log_every": 1000},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
    });
    if let Some(e) = eval {
        v["data"]["eval"] = json!({"path": e});
    }
    serde_json::from_value(v).unwrap()
}

pub fn sft_config(run: &Path, model: &Path, train: &Path) -> SftJobConfig {
    serde_json::from_value(json!({
        "run_dir": run, "model": model,
        "data": {"train": {"path": train}},
        "train": {"batch_size": 4, "micro_batch_size": 2, "epochs": 1, "log_every": 1000},
        "optim": {"lr": 1e-3},
    }))
    .unwrap()
}

/// The venv interpreter that has torch + transformers (scripts/setup-torch.sh --test-deps).
pub fn python() -> PathBuf {
    if let Ok(v) = std::env::var("RLHF_TORCH_VENV") {
        let p = Path::new(&v).join("bin/python");
        if p.exists() {
            return p;
        }
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = Path::new(&home).join(".cache/rlhf-coord/torch-venv/bin/python");
    if p.exists() {
        return p;
    }
    PathBuf::from("python3")
}

/// Runs a script from `scripts/golden/` and panics with its stderr on failure.
pub fn run_python(script: &str, args: &[&Path]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("scripts/golden").join(script);
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "{} failed (did you run `scripts/setup-torch.sh --test-deps`?):\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
