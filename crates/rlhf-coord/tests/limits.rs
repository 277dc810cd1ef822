//! `rlhf-coord launch` refuses sizes past its limits before any worker starts: a batch whose
//! LogProbs request or TrainStep request would exceed the gRPC message limit names the key to
//! lower, a prompt row whose columns would make a Score request too large names the row, and a
//! prompts line longer than the line cap names the file and line.

use std::path::{Path, PathBuf};

mod common;
use common::{arithmetic_prompts, coord, launch, tiny_model, worker_bin};

/// A tiny policy, an arithmetic prompt file, and a run file (as tests/launch.rs's).
fn setup(dir: &Path) -> PathBuf {
    tiny_model(&dir.join("policy"));
    arithmetic_prompts(dir, 4);
    let yaml = format!(
        "run: {{name: t, dir: runs, seed: 3}}\n\
         launcher: {{worker_bin: {}, startup_timeout_s: 60}}\n\
         models:\n  policy: policy\n  reward: {{kind: exact_match}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 6}}\n\
         train: {{steps: 1, micro_batch_size: 4, actor: {{lr: 1.0e-3}}, critic: {{lr: 1.0e-3}}}}\n\
         logging: {{progress: false}}\n",
        worker_bin().display()
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    f
}

#[test]
fn oversized_batches_and_prompt_lines_stop_before_any_worker_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path());
    let run_dir = tmp.path().join("runs/t");

    // 4 prompts x 10000 samples x (512 + 6) tokens x 16 bytes: 316 MiB of ids and masks in
    // the reference's LogProbs request, over the 256 MiB limit.
    let out = launch(&f, &["rollout.samples_per_prompt=10000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("rollout.batch_size")
            && err.contains("LogProbs/Values request")
            && err.contains("40000 rows")
            && err.contains("gRPC message limit"),
        "{err}"
    );
    assert!(!run_dir.exists(), "the run started: {err}");

    // Short sequences with a minibatch of its own: the LogProbs request (600000 rows x 22
    // tokens x 16 bytes, 201 MiB) fits, the TrainStep request (+ 20 bytes per response token,
    // 270 MiB) does not, and names train.minibatch_size.
    let out = launch(
        &f,
        &[
            "rollout.max_prompt_tokens=16",
            "rollout.samples_per_prompt=150000",
            "train.minibatch_size=600000",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("train.minibatch_size") && err.contains("TrainStep request"),
        "{err}"
    );
    assert!(!run_dir.exists(), "the run started: {err}");

    // A prompts line over the cap (1 MiB at the default rollout.max_prompt_tokens).
    let long = tmp.path().join("long.jsonl");
    let mut text = String::from("{\"prompt\": \"1+1=\", \"answer\": \"2\"}\n{\"prompt\": \"");
    text.push_str(&"x".repeat(2 << 20));
    text.push_str("\", \"answer\": \"2\"}\n");
    std::fs::write(&long, text).unwrap();
    let out = launch(&f, &[&format!("rollout.prompts={}", long.display())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("long.jsonl:2") && err.contains("longer than 1048576 bytes"),
        "{err}"
    );
    assert!(!run_dir.exists(), "the run started: {err}");

    // A row whose other columns (sent to the reward with every sample) are large: 600 KB x 4
    // prompts x 128 samples could make a 300 MiB Score request. Named with its row.
    let wide = tmp.path().join("wide.jsonl");
    let mut text = String::new();
    for i in 0..4 {
        text.push_str(&format!(
            "{{\"prompt\": \"{i}+1=\", \"answer\": \"{}\"",
            i + 1
        ));
        if i == 2 {
            text.push_str(&format!(", \"tests\": \"{}\"", "y".repeat(600_000)));
        }
        text.push_str("}\n");
    }
    std::fs::write(&wide, text).unwrap();
    let out = launch(
        &f,
        &[
            &format!("rollout.prompts={}", wide.display()),
            "rollout.samples_per_prompt=128",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("rollout.batch_size")
            && err.contains("Score request")
            && err.contains("number 2 counting from 0")
            && err.contains("wide.jsonl"),
        "{err}"
    );
    assert!(!run_dir.exists(), "the run started: {err}");
    // With fewer samples it fits.
    let out = coord()
        .arg("launch")
        .arg(&f)
        .arg("--dry-run")
        .args(["--set", &format!("rollout.prompts={}", wide.display())])
        .args(["--set", "rollout.samples_per_prompt=2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
