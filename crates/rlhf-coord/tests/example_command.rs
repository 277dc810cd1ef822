//! The second example run, configs/example-command.yaml: GRPO with prompts from a Parquet file
//! (scripts/example-data.sh) and the reward from the shipped configs/example-reward.py as a
//! `command` process pool, run as shipped with only the paths moved (3 steps); and a reward
//! script that crashes on every row from step 2 on, which stops the run naming the row with the
//! script's stderr, leaving the step-1 checkpoint and no other.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{jsonl, launch, python, repo, text, tiny_model, worker_bin};

/// The example's inputs in `dir`: its Parquet prompts and a tiny policy.
fn inputs(dir: &Path) {
    let out = Command::new("bash")
        .arg(repo().join("scripts/example-data.sh"))
        .arg(dir)
        .env("PYTHON", python())
        .output()
        .unwrap();
    assert!(out.status.success(), "example-data.sh: {}", text(&out));
    tiny_model(&dir.join("policy"));
}

/// `launch configs/example-command.yaml` with its paths moved into `dir` and `extra` settings.
fn launch_example(dir: &Path, extra: &[&str]) -> Output {
    let sets = [
        format!("run.dir={}", dir.join("runs").display()),
        format!("models.policy={}", dir.join("policy").display()),
        format!("rollout.prompts={}", dir.join("prompts.parquet").display()),
        format!("launcher.worker_bin={}", worker_bin().display()),
        "logging.progress=false".to_string(),
    ];
    let mut all: Vec<&str> = sets.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    launch(&repo().join("configs/example-command.yaml"), &all)
}

#[test]
fn the_example_run_scores_with_the_shipped_script() {
    let tmp = tempfile::tempdir().unwrap();
    inputs(tmp.path());
    let out = launch_example(tmp.path(), &["train.steps=3"]);
    assert!(out.status.success(), "launch failed:\n{}", text(&out));
    let run = tmp.path().join("runs/example-command");
    let m = jsonl(&run.join("metrics.jsonl"));
    assert_eq!(m.len(), 3);
    for row in &m {
        let num = |k: &str| {
            row[k]
                .as_f64()
                .unwrap_or_else(|| panic!("no number {k} in {row}"))
        };
        let (correct, format) = (num("attribute/correct"), num("attribute/format"));
        assert!((0.0..=1.0).contains(&correct) && (0.0..=1.0).contains(&format));
        // The script's score is correct + 0.1 * format: the components are its own.
        assert!(
            (num("score_mean") - (correct + 0.1 * format)).abs() < 1e-4,
            "{row}"
        );
        assert!(num("reward_mean").is_finite());
    }
    let state = std::fs::read_to_string(run.join("run_state.json")).unwrap();
    assert!(state.contains("finished"), "{state}");
}

#[test]
fn a_script_crashing_on_every_row_stops_the_run_with_its_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    inputs(tmp.path());
    // Scores step 1's 64 rows (8 prompts x 8 samples), then fails every row it is given, in
    // every process and every restart: the count of answered rows lives in a file.
    std::fs::write(
        tmp.path().join("crash.py"),
        r#"import json, sys
for line in sys.stdin:
    with open("answered.log", "a+") as f:
        f.seek(0)
        if len(f.readlines()) >= 64:
            raise RuntimeError("the grader lost its database")
        f.write("row\n")
    print(json.dumps({"score": 0.5, "correct": 0, "format": 1}), flush=True)
"#,
    )
    .unwrap();
    let workdir = format!("models.reward.workdir={}", tmp.path().display());
    let out = launch_example(
        tmp.path(),
        &[
            "train.steps=3",
            "checkpoint.every=1",
            "models.reward.command=[python3, crash.py]",
            &workdir,
        ],
    );
    let log = text(&out);
    assert!(!out.status.success(), "the run went on:\n{log}");
    for want in [
        "Score: models.reward.kind command: row ",
        "failed twice in process ",
        "`python3 crash.py` in ",
        "the process exited (exit status: 1)",
        "stderr ended with:",
        "RuntimeError: the grader lost its database",
    ] {
        assert!(log.contains(want), "missing {want:?} in:\n{log}");
    }
    let run = tmp.path().join("runs/example-command");
    assert_eq!(jsonl(&run.join("metrics.jsonl")).len(), 1);
    // Step 1's checkpoint is complete and the only one: nothing of step 2 was written.
    let ck = run.join("checkpoints");
    let mut names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["LATEST", "step-000001"], "{}", ck.display());
    assert_eq!(
        std::fs::read_to_string(ck.join("LATEST")).unwrap().trim(),
        "step-000001"
    );
    let state = std::fs::read_to_string(run.join("run_state.json")).unwrap();
    assert!(
        state.contains("failed") && state.contains("row "),
        "{state}"
    );
}
