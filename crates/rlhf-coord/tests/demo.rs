//! The learning assertion of the embedded default: the exact pipeline of scripts/demo.sh
//! (scripts/demo-data.sh, `sft configs/demo-warmup.yaml`, `launch configs/local.yaml`, seeded)
//! with only the paths moved into a temporary directory, must raise the exact-match reward
//! (fraction of correctly answered sums) by a clear margin over its 300 steps.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn embedded_default_raises_the_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let coord = env!("CARGO_BIN_EXE_rlhf-coord");
    let worker = Path::new(coord).with_file_name("rlhf-worker");
    run(Command::new("bash")
        .arg(repo().join("scripts/demo-data.sh"))
        .arg(t));
    run(Command::new(coord)
        .args([
            "init-model",
            "--arch",
            "llama",
            "--preset",
            "tiny",
            "--seed",
            "0",
            "--out",
        ])
        .arg(t.join("base")));
    let set = |k: &str, v: &Path| format!("{k}={}", v.display());
    run(Command::new(coord)
        .arg("sft")
        .arg(repo().join("configs/demo-warmup.yaml"))
        .args(["--set", &set("run_dir", &t.join("warmup-run"))])
        .args(["--set", &set("model", &t.join("base"))])
        .args(["--set", &set("output", &t.join("warm"))])
        .args(["--set", &set("data.train.path", &t.join("warmup.jsonl"))]));
    run(Command::new(coord)
        .arg("launch")
        .arg(repo().join("configs/local.yaml"))
        .args(["--set", &set("run.dir", &t.join("runs"))])
        .args(["--set", &set("models.policy", &t.join("warm"))])
        .args(["--set", &set("rollout.prompts", &t.join("prompts.jsonl"))])
        .args(["--set", &set("launcher.worker_bin", &worker)])
        .args(["--set", "logging.progress=false"]));
    let rewards: Vec<f64> = std::fs::read_to_string(t.join("runs/demo/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["reward_mean"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(rewards.len(), 300);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&rewards[..25]), mean(&rewards[250..]));
    eprintln!("demo reward: first 25 steps {first:.3}, last 50 steps {last:.3}");
    assert!(
        last >= first + 0.2,
        "the demo did not learn: mean reward {first:.3} (steps 1-25) -> {last:.3} (steps 251-300)"
    );
}
