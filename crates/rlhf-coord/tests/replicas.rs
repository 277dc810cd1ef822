//! Roles with several instances, with real `rlhf-worker` processes on loopback whose tensors
//! flow between them over `rlhf-comm`'s TCP collectives:
//!
//! - a separate generator (disaggregated placement, weight sync after every step) gives per-step
//!   metrics bitwise equal to the colocated run, and its weights digest equals the actor's;
//! - two data-parallel actor and critic replicas (minibatch sharded, gradients all-reduced)
//!   match one replica running all the micro-batches, within a stated tolerance, and stay
//!   bitwise equal to each other (digests compared every step);
//! - with sharded optimizer state (ZeRO-1 and ZeRO-2) the replicas match the unsharded run within
//!   the same tolerance, and a ZeRO-1 checkpoint of 2 replicas resumes on 3 and on 1;
//! - a replica that stops answering mid-run (SIGSTOP) makes its peer's all-reduce fail within
//!   `launcher.collective_timeout_s`, and the run stops naming the rank and its address.
//!
//! One libtorch thread everywhere (`OMP_NUM_THREADS=1`, `threads: 1`) keeps reductions in a
//! fixed order, as in resume.rs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{arithmetic_prompts, coord, jsonl, launch, text, tiny_model, worker_bin};

/// A PPO run file over `workers` (YAML flow lines) in `dir`.
fn setup(dir: &Path, workers: &[&str], steps: u64, extra: &str) -> PathBuf {
    tiny_model(&dir.join("policy"));
    arithmetic_prompts(dir, 5);
    let workers: String = workers.iter().map(|w| format!("  - {w}\n")).collect();
    let yaml = format!(
        "run: {{name: t, dir: runs, seed: 9}}\n\
         launcher: {{worker_bin: {}, heartbeat_interval_ms: 100, heartbeat_timeout_ms: 30000, startup_timeout_s: 60, collective_timeout_s: 20}}\n\
         workers:\n{workers}\
         models:\n  policy: policy\n  reward: {{kind: exact_match}}\n\
         algorithm: {{name: ppo, kl: {{coef: 0.05}}}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 6}}\n\
         train: {{steps: {steps}, epochs: 2, minibatch_size: 4, micro_batch_size: 1, replica_check_every: 1, actor: {{lr: 2.0e-3}}, critic: {{lr: 1.0e-3}}}}\n\
         checkpoint: {{every: 0}}\n\
         logging: {{progress: false, plot: false}}\n{extra}",
        worker_bin().display()
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    f
}

type Row = serde_json::Map<String, serde_json::Value>;

fn metrics(dir: &Path) -> Vec<Row> {
    jsonl(&dir.join("runs/t/metrics.jsonl"))
        .into_iter()
        .map(|r| r.as_object().unwrap().clone())
        .collect()
}

/// Keys that are wall-clock measurements or describe the placement, not the training.
fn placement_or_time(k: &str) -> bool {
    k.starts_with("time/")
        || k == "tokens_per_s"
        || k.starts_with("sync/")
        || k.starts_with("replicas/")
}

/// Every training metric of every step of `got` equals `want`'s, bit for bit (`after`: what the
/// second run did differently, for the message).
fn assert_same_training(want: &[Row], got: &[Row], after: &str) {
    for (w, g) in want.iter().zip(got) {
        for (k, v) in w.iter().filter(|(k, _)| !placement_or_time(k)) {
            assert_eq!(
                g.get(k),
                Some(v),
                "step {}: `{k}` differs {after}",
                w["step"]
            );
        }
    }
}

/// `tmp/a` and `tmp/b`, created: the run directories of two runs to compare.
fn two_dirs(tmp: &Path, a: &str, b: &str) -> (PathBuf, PathBuf) {
    let dirs = (tmp.join(a), tmp.join(b));
    std::fs::create_dir_all(&dirs.0).unwrap();
    std::fs::create_dir_all(&dirs.1).unwrap();
    dirs
}

fn run_ok(file: &Path) -> String {
    let out = launch(file, &[]);
    assert!(out.status.success(), "launch failed:\n{}", text(&out));
    text(&out)
}

const COLOCATED: [&str; 2] = [
    "{name: a, roles: [actor, reference], threads: 1}",
    "{name: b, roles: [reward, critic], threads: 1}",
];

#[test]
fn a_separate_generator_matches_the_colocated_run_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = two_dirs(tmp.path(), "colocated", "generator");
    run_ok(&setup(&one, &COLOCATED, 3, ""));
    let mut split = COLOCATED.to_vec();
    split.push("{name: g, roles: [generator], threads: 1}");
    // The weight-sync group's TCP listeners over IPv6 (bracketed literals on the wire).
    let out = launch(&setup(&two, &split, 3, ""), &["launcher.bind=::1"]);
    let log = text(&out);
    assert!(out.status.success(), "launch failed:\n{log}");
    assert!(log.contains("generators hold the actor's weights"), "{log}");
    assert!(log.contains("address=[::1]:"), "{log}");

    let (want, got) = (metrics(&one), metrics(&two));
    assert_eq!(got.len(), 3);
    assert_same_training(&want, &got, "from the colocated run");
    for g in &got {
        // The weights went over the wire every step, and the generator's digest equalled the
        // actor's after each sync (the run stops otherwise).
        assert!(g["sync/bytes"].as_f64().unwrap() > 1e5, "{g:?}");
        assert_eq!(g["replicas/checked"], 1.0, "{g:?}");
        assert!(g["time/sync_s"].as_f64().unwrap() > 0.0);
    }
    // Training moved the weights (so an unsynced generator would have been caught).
    assert_ne!(want[0]["actor/pg_loss"], want[2]["actor/pg_loss"]);
}

#[test]
fn two_data_parallel_replicas_match_one_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = two_dirs(tmp.path(), "single", "dp");
    // One replica: each minibatch of 4 sequences is 4 micro-batches of 1.
    run_ok(&setup(&one, &COLOCATED, 3, ""));
    // Two actor and two critic replicas: 2 sequences each, 2 micro-batches of 1 per replica,
    // gradients summed over the replicas; generation sharded over the two actors.
    let dp = [
        "{name: a, roles: [actor, reference], threads: 1}",
        "{name: a2, roles: [actor, critic], threads: 1}",
        "{name: b, roles: [reward, critic], threads: 1}",
    ];
    let log = run_ok(&setup(&two, &dp, 3, ""));
    assert!(log.contains("actor_replicas=2"), "{log}");
    assert!(log.contains("critic_replicas=2"), "{log}");

    let (want, got) = (metrics(&one), metrics(&two));
    assert_eq!(got.len(), 3);
    // Stated tolerance: the two runs differ only in the order float32 sums are taken (gradient
    // accumulation vs. the ring all-reduce; batch shapes in generation), ~1e-7 relative per
    // operation; over 3 steps x 2 epochs of AdamW that stays far below 1e-3.
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(
            g["replicas/checked"], 1.0,
            "replicas were not compared: {g:?}"
        );
        for (k, v) in w.iter().filter(|(k, _)| !placement_or_time(k)) {
            let (a, b) = (v.as_f64().unwrap(), g[k].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-3 * a.abs().max(1.0),
                "step {}: `{k}` = {b} with two replicas, {a} with one",
                w["step"]
            );
        }
    }
}

#[test]
fn a_stalled_replica_fails_its_peer_within_the_collective_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The second actor replica only trains (a generator samples), so stopping it can only show
    // up inside a gradient all-reduce; heartbeats have a 30 s timeout, the collectives 2 s.
    let workers = [
        "{name: a, roles: [actor, reference], threads: 1}",
        "{name: a2, roles: [actor], threads: 1}",
        "{name: b, roles: [reward, critic, generator], threads: 1}",
    ];
    let file = setup(dir, &workers, 200, "");
    let log_path = dir.join("coord.log");
    let mut child = coord()
        .arg("launch")
        .arg(&file)
        .args([
            "--set",
            "launcher.collective_timeout_s=2",
            "--set",
            "algorithm.name=rloo",
        ])
        .stderr(std::fs::File::create(&log_path).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while metrics(dir).len() < 2 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended early:\n{}",
            std::fs::read_to_string(&log_path).unwrap()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no step 2 in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The replica's pid, from the coordinator's "placing roles" line.
    let log = std::fs::read_to_string(&log_path).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("placing roles") && l.contains("worker=a2"))
        .unwrap_or_else(|| panic!("no placing line for a2:\n{log}"));
    let pid: i32 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on a worker process this test's run started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if stopped.elapsed() > Duration::from_secs(25) {
            let _ = child.kill();
            // SAFETY: kill(2) on the worker process this test's run started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the run did not stop within 25 s of the replica stalling");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let waited = stopped.elapsed();
    // SAFETY: as above; the coordinator's tear-down may already have killed it.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!status.success(), "{log}");
    assert!(log.contains("all_reduce"), "{log}");
    assert!(
        log.contains("rank 1"),
        "the error should name the stalled rank:\n{log}"
    );
    assert!(
        log.contains("worker `a`"),
        "the error should name the reporting worker:\n{log}"
    );
    assert!(waited < Duration::from_secs(15), "stopped after {waited:?}");
}

#[test]
fn async_generation_trains_one_step_off_policy_and_resumes_exactly_at_scheduled_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, parts) = two_dirs(tmp.path(), "whole", "parts");
    let mut split = COLOCATED.to_vec();
    split.push("{name: g, roles: [generator], threads: 1}");
    let async_on = "rollout.async_generation=true";
    let f = setup(&whole, &split, 5, "");
    // (setup's `checkpoint: {every: 0}` is overridden: scheduled checkpoints at 2 and 4.)
    let out = launch(&f, &[async_on, "checkpoint.every=2"]);
    assert!(out.status.success(), "{}", text(&out));
    let m = metrics(&whole);
    let off: Vec<f64> = m
        .iter()
        .map(|r| r["rollout/off_policy"].as_f64().unwrap())
        .collect();
    // Step 1 samples in place; a step after a scheduled checkpoint (2, 4) too; the others were
    // sampled while the previous step trained.
    assert_eq!(off, [0.0, 1.0, 0.0, 1.0, 0.0], "{m:?}");

    // Stop after step 2 (the run's last step then), continue to 5: equal to the whole run.
    let f = setup(&parts, &split, 2, "");
    let out = launch(&f, &[async_on, "checkpoint.every=2"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = launch(&f, &[async_on, "checkpoint.every=2", "train.steps=5"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("resuming from"), "{}", text(&out));
    let got = metrics(&parts);
    assert_eq!(got.len(), 5);
    assert_same_training(&m, &got, "after the resume");
}

#[test]
fn data_parallel_replicas_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, parts) = two_dirs(tmp.path(), "whole", "parts");
    let dp = [
        "{name: a, roles: [actor, reference], threads: 1}",
        "{name: a2, roles: [actor, critic], threads: 1}",
        "{name: b, roles: [reward, critic], threads: 1}",
    ];
    run_ok(&setup(&whole, &dp, 4, ""));
    // Two steps, then two more from the checkpoint: every replica must load it (replica 1
    // keeping its own weights fails the digest check right after the resume, before training).
    let f = setup(&parts, &dp, 2, "");
    run_ok(&f);
    let out = launch(&f, &["train.steps=4"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("resuming from"), "{}", text(&out));
    let (want, got) = (metrics(&whole), metrics(&parts));
    assert_eq!(got.len(), 4);
    assert_same_training(&want, &got, "after the resume");
    for g in &got {
        assert_eq!(g["replicas/checked"], 1.0);
    }
}

/// Every training metric of `got`'s steps equals `want`'s within the stated tolerance
/// (`what`: the run compared, for the message).
fn assert_close_training(want: &[Row], got: &[Row], what: &str) {
    for g in got {
        let w = want
            .iter()
            .find(|w| w["step"] == g["step"])
            .unwrap_or_else(|| panic!("{what}: step {} not in the reference", g["step"]));
        for (k, v) in w.iter().filter(|(k, _)| !placement_or_time(k)) {
            let (a, b) = (v.as_f64().unwrap(), g[k].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-3 * a.abs().max(1.0),
                "step {}: `{k}` = {b} {what}, {a} unsharded",
                w["step"]
            );
        }
    }
}

#[test]
fn sharded_optimizer_state_matches_unsharded_and_resumes_on_other_replica_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let dp = [
        "{name: a, roles: [actor, reference], threads: 1}",
        "{name: a2, roles: [actor, critic], threads: 1}",
        "{name: b, roles: [reward, critic], threads: 1}",
    ];
    // The reference: two replicas, every replica holding the whole optimizer state.
    let (plain, stage2) = two_dirs(tmp.path(), "plain", "stage2");
    run_ok(&setup(&plain, &dp, 4, ""));
    let want = metrics(&plain);
    assert_eq!(want.len(), 4);
    // ZeRO-2: gradients reduce-scattered after every micro-batch, each replica updating half
    // of the master weights and moments, updated weights all-gathered. Same tolerance as the
    // replica test above (only the order of f32 sums differs); digests are compared every
    // step, so the all-gathered replicas are bitwise equal.
    let out = launch(&setup(&stage2, &dp, 4, ""), &["train.zero_stage=2"]);
    assert!(out.status.success(), "{}", text(&out));
    let got = metrics(&stage2);
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|g| g["replicas/checked"] == 1.0));
    assert_close_training(&want, &got, "with ZeRO-2");

    // ZeRO-1 for 2 steps with a checkpoint, then resumed on 3 replicas and on 1.
    let stage1 = tmp.path().join("stage1");
    std::fs::create_dir_all(&stage1).unwrap();
    let file = setup(&stage1, &dp, 2, "");
    let out = launch(&file, &["train.zero_stage=1", "checkpoint.every=2"]);
    assert!(out.status.success(), "{}", text(&out));
    let ckpt = stage1.join("runs/t/checkpoints/step-000002/actor/optimizer.safetensors");
    assert!(
        ckpt.is_file(),
        "no gathered optimizer state at {}",
        ckpt.display()
    );
    let three = [
        "{name: a, roles: [actor, reference], threads: 1}",
        "{name: a2, roles: [actor, critic], threads: 1}",
        "{name: a3, roles: [actor], threads: 1}",
        "{name: b, roles: [reward, critic], threads: 1}",
    ];
    // Both resumes start from the same run directory (its paths are part of the checkpoint's
    // config): a copy taken now is put back before the second.
    let runs = stage1.join("runs");
    let saved = tmp.path().join("runs-after-step-2");
    copy_dir(&runs, &saved);
    for (name, workers, stage) in [("three", &three[..], "1"), ("one", &COLOCATED[..], "0")] {
        std::fs::remove_dir_all(&runs).unwrap();
        copy_dir(&saved, &runs);
        let file = setup(&stage1, workers, 4, "");
        let zero = format!("train.zero_stage={stage}");
        let out = launch(&file, &[zero.as_str()]);
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        assert!(log.contains("resuming from"), "{log}");
        let got = metrics(&stage1);
        assert_eq!(got.len(), 4, "{name}");
        assert_close_training(&want, &got[2..], &format!("resumed on {name} replica(s)"));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}
