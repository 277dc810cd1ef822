//! One launch per run directory: while another process holds `RUN/run.lock` a launch is
//! refused before it reads or writes anything there, naming the holder's host and pid; a lock
//! file left by a process that is gone is taken over. The launches stop after `prepare`
//! (`launcher.kind: slurm` with `--dry-run` outside a job), which is where the lock is taken.

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

fn dry_run(f: &Path) -> std::process::Output {
    coord()
        .args(["launch", "--dry-run"])
        .arg(f)
        .env_remove("SLURM_JOB_ID")
        .output()
        .unwrap()
}

#[test]
fn a_second_launch_on_a_held_run_directory_is_refused_naming_host_and_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path());
    let run = tmp.path().join("runs/t");
    std::fs::create_dir_all(&run).unwrap();
    let host = rlhf_comm::net::host_name();
    let held = rlhf_ckpt::RunLock::acquire(&run, &host).unwrap();
    let out = dry_run(&f);
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
    let out = dry_run(&f);
    assert!(out.status.success(), "{}", text(&out));
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
    let out = dry_run(&f);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("took over the run directory lock") && t.contains("node-gone"),
        "{t}"
    );
    assert!(run.join("config.resolved.yaml").exists());
}
