//! One launch per run directory: while another process holds `RUN/run.lock` a launch is
//! refused before it reads or writes anything there, naming the holder's host and pid; a lock
//! file left by a process that is gone is taken over. The launches stop right after taking the
//! run directory (`launcher.kind: slurm` outside a job, with no `sbatch` on PATH to submit to).

mod common;
use common::*;

use std::path::Path;

fn setup(dir: &Path) -> std::path::PathBuf {
    tiny_model(&dir.join("policy"));
    arithmetic_prompts(dir, 3);
    let yaml = format!(
        "run: {{name: t, dir: runs}}\n\
         launcher: {{kind: slurm, worker_bin: {}}}\n\
         models:\n  policy: policy\n  reward: {{kind: exact_match}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 4}}\n\
         logging: {{progress: false}}\n",
        worker_bin().display()
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    f
}

/// A launch that takes the run directory, then fails to submit (no `sbatch`).
fn launch_until_submit(f: &Path) -> std::process::Output {
    let no_tools = tempfile::tempdir().unwrap();
    coord()
        .arg("launch")
        .arg(f)
        .env_remove("SLURM_JOB_ID")
        .env("PATH", no_tools.path())
        .output()
        .unwrap()
}

/// It got past the lock: only the submission failed.
fn reached_submit(out: &std::process::Output) -> bool {
    !out.status.success() && text(out).contains("`sbatch` is not on PATH")
}

#[test]
fn a_second_launch_on_a_held_run_directory_is_refused_naming_host_and_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path());
    let run = tmp.path().join("runs/t");
    std::fs::create_dir_all(&run).unwrap();
    let host = rlhf_comm::net::host_name();
    let held = rlhf_ckpt::RunLock::acquire(&run, &host).unwrap();
    let out = launch_until_submit(&f);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("is in use by another launch"), "{t}");
    assert!(
        t.contains(&format!("host {host}, pid {}", std::process::id())),
        "{t}"
    );
    assert!(
        !run.join("config.resolved.yaml").exists(),
        "the refused launch wrote into the run directory"
    );
    drop(held);
    let out = launch_until_submit(&f);
    assert!(reached_submit(&out), "{}", text(&out));
}

#[test]
fn a_lock_left_by_a_dead_launch_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path());
    let run = tmp.path().join("runs/t");
    std::fs::create_dir_all(&run).unwrap();
    // What a launch killed with SIGKILL leaves: its name in the file, no flock held.
    std::fs::write(
        run.join(rlhf_ckpt::LOCK_FILE),
        r#"{"host":"node-gone","pid":4242,"since_unix":1}"#,
    )
    .unwrap();
    let out = launch_until_submit(&f);
    let t = text(&out);
    assert!(reached_submit(&out), "{t}");
    assert!(
        t.contains("took over the run directory lock") && t.contains("node-gone"),
        "{t}"
    );
    assert!(run.join("config.resolved.yaml").exists());
}

#[test]
fn dry_run_checks_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path());
    for kind in ["slurm", "local"] {
        let out = coord()
            .args(["launch", "--dry-run", "--set"])
            .arg(format!("launcher.kind={kind}"))
            .arg(&f)
            .env_remove("SLURM_JOB_ID")
            .output()
            .unwrap();
        assert!(out.status.success(), "{kind}: {}", text(&out));
        assert!(
            !tmp.path().join("runs").exists(),
            "{kind}: --dry-run created the run directory"
        );
    }
    // It still checks: a bad value fails the dry run.
    let out = coord()
        .args(["launch", "--dry-run", "--set", "rollout.batch_size=100"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("rollout.batch_size"), "{}", text(&out));
}

#[test]
fn a_relaunch_never_overwrites_steps_it_cannot_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path());
    let run = tmp.path().join("runs/t");
    std::fs::create_dir_all(&run).unwrap();
    // What a run leaves when its checkpoints are gone (deleted, or never written): metrics.
    let metrics: String = (1..=40).map(|s| format!("{{\"step\": {s}}}\n")).collect();
    std::fs::write(run.join("metrics.jsonl"), &metrics).unwrap();
    std::fs::write(run.join("samples.jsonl"), "{\"step\": 10}\n").unwrap();

    let out = launch_until_submit(&f);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("40 steps of metrics") && t.contains("--fresh"),
        "{t}"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
        metrics,
        "the refused launch changed metrics.jsonl"
    );

    // --fresh starts over, with the earlier run's files moved aside, not deleted.
    let out = coord()
        .args(["launch", "--fresh"])
        .arg(&f)
        .env_remove("SLURM_JOB_ID")
        .env("PATH", tmp.path().join("no-tools"))
        .output()
        .unwrap();
    assert!(reached_submit(&out), "{}", text(&out));
    assert!(!run.join("metrics.jsonl").exists());
    let previous: Vec<_> = std::fs::read_dir(run.join("previous"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(previous.len(), 1, "{previous:?}");
    assert_eq!(
        std::fs::read_to_string(previous[0].join("metrics.jsonl")).unwrap(),
        metrics
    );
    assert!(previous[0].join("samples.jsonl").exists());
    assert!(run.join(rlhf_ckpt::LOCK_FILE).exists());
}

#[test]
fn logging_level_and_format_come_from_the_run_file_and_the_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path());
    let dry = |args: &[&str]| {
        let out = coord()
            .args(["launch", "--dry-run", "--set", "launcher.kind=local"])
            .args(args)
            .arg(&f)
            .env_remove("RLHF_LOG")
            .env_remove("RLHF_LOG_FORMAT")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let info = "nothing was written";
    assert!(dry(&[]).contains(info));
    assert!(!dry(&["--set", "logging.level=warn"]).contains(info));
    assert!(!dry(&["-q"]).contains(info));
    // -v beats the key.
    assert!(dry(&["-v", "--set", "logging.level=warn"]).contains(info));
    let json = dry(&["--set", "logging.format=json"]);
    let line = json
        .lines()
        .find(|l| l.contains(info))
        .expect("the info line");
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(v["level"], "INFO");
}
