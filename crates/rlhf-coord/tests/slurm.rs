//! `launcher.kind: slurm` on a real single-node Slurm (Debian's slurm-wlm + munge, brought up on
//! loopback by `scripts/slurm-local.sh`): `plan` and `launch --dry-run` without Slurm; then on
//! the cluster a submitted PPO run whose coordinator starts its workers as separate Slurm tasks;
//! a preemption drill (USR1 to the batch shell → checkpoint → requeue → resume, with every step
//! in `metrics.jsonl` exactly once); a worker task killed, reported with its node; a job the
//! user cancels, which is not requeued; and a job that keeps stopping without progress, which
//! stops requeueing after `launcher.slurm.max_restarts`. Runs across nodes and Slurm's own preemption:
//! `multinode.rs`.
//!
//! Needs `sbatch`, `slurmctld`, `slurmd` and `munged` (`scripts/slurm-local.sh install`, which
//! `scripts/test.sh` runs). Without them the cluster test prints SKIPPED, unless
//! `RLHF_REQUIRE_SLURM=1` (set by `scripts/test.sh`), which turns that into a failure.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;
use common::slurm::{steps, wait_for_step, Cluster};
use common::{arithmetic_prompts, coord, text, tiny_model, worker_bin};

fn setup(dir: &Path, extra: &str) -> PathBuf {
    tiny_model(&dir.join("policy"));
    arithmetic_prompts(dir, 5);
    let yaml = format!(
        "run: {{name: s, dir: {}, seed: 2}}\n\
         launcher:\n  kind: slurm\n  worker_bin: {}\n  heartbeat_timeout_ms: 3000\n  startup_timeout_s: 120\n  slurm: {{nodes: 1, partition: debug, time: \"00:20:00\", signal_grace_s: 60}}\n\
         workers:\n  - {{name: a, roles: [actor, reference]}}\n  - {{name: b, roles: [reward, critic]}}\n\
         models: {{policy: policy, reward: {{kind: exact_match}}}}\n\
         algorithm: {{name: ppo, kl: {{coef: 0.05}}}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 6}}\n\
         train: {{steps: 4, micro_batch_size: 4}}\n\
         checkpoint: {{every: 0}}\n\
         logging: {{progress: false, plot: false}}\n{extra}",
        dir.join("runs").display(),
        worker_bin().display()
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    f
}

#[test]
fn plan_and_dry_run_need_no_slurm() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path(), "");
    let out = coord().arg("plan").arg(&f).output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for want in [
        "placement (slurm, 1 node(s))",
        "a              0     cpu      actor,reference",
        "b              0     cpu      reward,critic",
        "node 0 cpu",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@60",
        "#SBATCH --partition=debug",
    ] {
        assert!(t.contains(want), "missing {want:?}:\n{t}");
    }
    // A placement that cannot fit says by how much.
    let out = coord()
        .arg("plan")
        .arg(&f)
        .args(["--set", "launcher.slurm.mem_per_node_gib=0.001"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("more than its 0.001 GiB"),
        "{}",
        text(&out)
    );
    // More GPUs than the nodes have: refused by the config check, naming the key.
    let out = coord()
        .arg("plan")
        .arg(&f)
        .args([
            "--set",
            "workers.0.device=cuda:1",
            "--set",
            "launcher.slurm.gpus_per_node=1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("workers.0.device"), "{}", text(&out));

    let out = coord()
        .args(["launch", "--dry-run"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(script.starts_with("#!/bin/bash\n"), "{script}");
    assert!(script.contains(" launch "), "{script}");
    // No sbatch on PATH: a clear error before anything is submitted.
    let empty = tempfile::tempdir().unwrap();
    let out = coord()
        .arg("launch")
        .arg(&f)
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("`sbatch` is not on PATH"),
        "{}",
        text(&out)
    );
}

#[test]
fn runs_preempts_requeues_and_reports_dead_workers_on_real_slurm() {
    let Some(cluster) = Cluster::up() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path(), "");
    let run = tmp.path().join("runs/s");
    let out_of = |id: &str| run.join(format!("slurm/slurm-{id}.out"));

    // 0. sbatch refuses an unknown partition: a clear error, nothing submitted.
    let mut c = coord();
    c.env("SLURM_CONF", &cluster.conf)
        .arg("launch")
        .arg(&f)
        .args(["--set", "launcher.slurm.partition=nope"]);
    let out = c.output().unwrap();
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("sbatch refused the job") && t.contains("partition"),
        "{t}"
    );

    // A node list that does not resolve (as inside a job whose nodes DNS does not know): a clear
    // error before any worker starts.
    let mut c = coord();
    c.env("SLURM_CONF", &cluster.conf)
        .env("SLURM_JOB_ID", "424242")
        .env("SLURM_JOB_NODELIST", "no-such-node-rlhf")
        .arg("launch")
        .arg(&f);
    let out = c.output().unwrap();
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("`no-such-node-rlhf`") && t.contains("does not resolve"),
        "{t}"
    );
    assert!(!t.contains("worker started"), "{t}");

    // 1. A short PPO run: the coordinator in the batch step, two workers as Slurm tasks.
    let id = cluster.launch(&f, &[]);
    cluster.wait_gone(&id, Duration::from_secs(240), "PPO run", &out_of(&id));
    let log = std::fs::read_to_string(out_of(&id)).unwrap();
    assert_eq!(steps(&run), [1, 2, 3, 4], "{log}");
    assert!(log.contains("inside Slurm job"), "{log}");
    assert_eq!(log.matches("worker started").count(), 2, "{log}");
    assert!(log.contains("run finished"), "{log}");

    // 2. Preemption drill on a fresh run: USR1 to the batch shell mid-run → checkpoint, exit
    //    75, `scontrol requeue`; the requeued job resumes and finishes every step exactly once.
    std::fs::remove_dir_all(&run).unwrap();
    let id = cluster.launch(&f, &["train.steps=40", "rollout.max_new_tokens=16"]);
    wait_for_step(&run, 3, Duration::from_secs(240), &out_of(&id));
    let s = cluster
        .cmd("scancel")
        .args(["--signal=USR1", "--batch", &id])
        .status()
        .unwrap();
    assert!(s.success());
    cluster.wait_gone(
        &id,
        Duration::from_secs(400),
        "preemption drill",
        &out_of(&id),
    );
    let log = std::fs::read_to_string(out_of(&id)).unwrap();
    assert!(log.contains("SIGUSR1"), "{log}");
    assert!(log.contains("rlhf-coord: requeueing job"), "{log}");
    assert!(log.contains(&format!("job {id} start 1 ")), "{log}");
    assert!(log.contains("resuming from"), "{log}");
    assert_eq!(steps(&run), (1..=40).collect::<Vec<u64>>(), "{log}");

    // 3. A worker's Slurm task cancelled mid-run: the coordinator names the worker and its node
    //    and the job ends (not requeued) instead of hanging.
    std::fs::remove_dir_all(&run).unwrap();
    let id = cluster.launch(&f, &["train.steps=100000"]);
    wait_for_step(&run, 1, Duration::from_secs(240), &out_of(&id));
    let out = cluster
        .cmd("squeue")
        .args(["-h", "-s", "-j", &id, "-o", "%i %j"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let step = listing
        .lines()
        .find(|l| l.ends_with("rlhf-worker-b"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no worker step in:\n{listing}"))
        .to_string();
    // Killed, as a crash or the OOM killer would: a plain `scancel STEP` sends SIGTERM first,
    // which a worker holds and reports (the run would checkpoint and requeue).
    cluster.run("scancel", &["--signal=KILL", &step]);
    cluster.wait_gone(&id, Duration::from_secs(120), "dead worker", &out_of(&id));
    let log = std::fs::read_to_string(out_of(&id)).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(log.contains("worker `b`"), "{log}");
    assert!(log.contains(&format!("on node {}", host.trim())), "{log}");
    assert!(!log.contains("rlhf-coord: requeueing job"), "{log}");

    // 4. The user cancels the job (TERM to the batch shell and the steps): it is not requeued.
    std::fs::remove_dir_all(&run).unwrap();
    let id = cluster.launch(&f, &["train.steps=100000"]);
    wait_for_step(&run, 1, Duration::from_secs(240), &out_of(&id));
    assert!(cluster.cmd("scancel").arg(&id).status().unwrap().success());
    cluster.wait_gone(&id, Duration::from_secs(60), "user cancel", &out_of(&id));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!cluster.job_active(&id), "a cancelled job came back");
    let log = std::fs::read_to_string(out_of(&id)).unwrap();
    assert!(!log.contains("rlhf-coord: requeueing job"), "{log}");
    assert!(log.contains("not requeueing it"), "{log}");

    // 5. No endless requeue: a run that stops before its first step every time (here a
    //    must_save_by budget already spent at start) saves nothing new, so each restart counts
    //    against launcher.slurm.max_restarts and the job ends after one requeue.
    std::fs::remove_dir_all(&run).unwrap();
    let id = cluster.launch(
        &f,
        &[
            "checkpoint.must_save_by=0.001",
            "launcher.slurm.max_restarts=1",
        ],
    );
    cluster.wait_gone(&id, Duration::from_secs(120), "requeue guard", &out_of(&id));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!cluster.job_active(&id), "the job came back again");
    let log = std::fs::read_to_string(out_of(&id)).unwrap();
    assert_eq!(
        log.matches("rlhf-coord: requeueing job").count(),
        1,
        "{log}"
    );
    assert!(log.contains(&format!("job {id} start 1 ")), "{log}");
    assert!(
        log.contains(
            "2 restarts in a row ended without a new checkpoint (launcher.slurm.max_restarts = 1)"
        ),
        "{log}"
    );
    assert!(steps(&run).is_empty(), "{log}");
}
