//! `launcher.kind: slurm` on a real single-node Slurm (Debian's slurm-wlm + munge, brought up on
//! loopback by `scripts/slurm-local.sh`): `plan` and `launch --dry-run` without Slurm; then on
//! the cluster a submitted PPO run whose coordinator starts its workers as separate Slurm tasks;
//! a preemption drill (USR1 to the batch shell → checkpoint → requeue → resume, with every step
//! in `metrics.jsonl` exactly once); and a worker task cancelled by Slurm, reported with its
//! node.
//!
//! Needs `sbatch`, `slurmctld`, `slurmd` and `munged` (`scripts/slurm-local.sh install`, which
//! `scripts/test.sh` runs). Without them the cluster test prints SKIPPED, unless
//! `RLHF_REQUIRE_SLURM=1` (set by `scripts/test.sh`), which turns that into a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{arithmetic_prompts, coord, repo, text, tiny_model, worker_bin};

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

/// A Slurm cluster from `scripts/slurm-local.sh up`, torn down on drop.
struct Cluster {
    dir: String,
    conf: String,
}

impl Cluster {
    fn up() -> Option<Cluster> {
        let have = Command::new("sh")
            .args([
                "-c",
                "command -v sbatch && command -v slurmctld && command -v munged",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !have {
            assert!(
                std::env::var("RLHF_REQUIRE_SLURM").as_deref() != Ok("1"),
                "RLHF_REQUIRE_SLURM=1 but Slurm is not installed (scripts/slurm-local.sh install)"
            );
            eprintln!("SKIPPED: Slurm is not installed (scripts/slurm-local.sh install)");
            return None;
        }
        let out = Command::new(repo().join("scripts/slurm-local.sh"))
            .arg("up")
            .output()
            .unwrap();
        assert!(out.status.success(), "slurm-local.sh up:\n{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {k}=")))
                .map(|v| v.trim_matches(|c| c == '"' || c == '\'').to_string())
                .unwrap_or_else(|| panic!("no {k} in:\n{stdout}"))
        };
        Some(Cluster {
            dir: get("RLHF_SLURM_DIR"),
            conf: get("SLURM_CONF"),
        })
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn launch(&self, f: &Path, set: &[&str]) -> String {
        let mut c = coord();
        c.env("SLURM_CONF", &self.conf).arg("launch").arg(f);
        for s in set {
            c.args(["--set", s]);
        }
        let out = c.output().unwrap();
        let t = text(&out);
        assert!(out.status.success(), "launch (submit):\n{t}");
        t.split("submitted job ")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .unwrap_or_else(|| panic!("no job id in:\n{t}"))
            .trim()
            .to_string()
    }

    fn job_active(&self, id: &str) -> bool {
        let out = self
            .cmd("squeue")
            .args(["-h", "-j", id, "-o", "%T"])
            .output()
            .unwrap();
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }

    fn wait_gone(&self, id: &str, limit: Duration, what: &str, out_file: &Path) {
        let t0 = Instant::now();
        while self.job_active(id) {
            if t0.elapsed() > limit {
                let _ = self.cmd("scancel").arg(id).status();
                panic!(
                    "{what}: job {id} still active after {limit:?}; its output:\n{}",
                    std::fs::read_to_string(out_file).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/slurm-local.sh"))
            .args(["down", &self.dir])
            .status();
    }
}

fn steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .collect()
}

fn wait_for_step(run: &Path, step: u64, limit: Duration, out_file: &Path) {
    let t0 = Instant::now();
    while (steps(run).len() as u64) < step {
        assert!(
            t0.elapsed() < limit,
            "no step {step} after {limit:?}; job output:\n{}",
            std::fs::read_to_string(out_file).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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
    assert!(log.contains("requeueing job"), "{log}");
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
    assert!(cluster
        .cmd("scancel")
        .arg(&step)
        .status()
        .unwrap()
        .success());
    cluster.wait_gone(&id, Duration::from_secs(120), "dead worker", &out_of(&id));
    let log = std::fs::read_to_string(out_of(&id)).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(log.contains("worker `b`"), "{log}");
    assert!(log.contains(&format!("on node {}", host.trim())), "{log}");
    assert!(!log.contains("requeueing"), "{log}");

    // 4. The user cancels the job (TERM to the batch shell and the steps): it is not requeued.
    std::fs::remove_dir_all(&run).unwrap();
    let id = cluster.launch(&f, &["train.steps=100000"]);
    wait_for_step(&run, 1, Duration::from_secs(240), &out_of(&id));
    assert!(cluster.cmd("scancel").arg(&id).status().unwrap().success());
    cluster.wait_gone(&id, Duration::from_secs(60), "user cancel", &out_of(&id));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!cluster.job_active(&id), "a cancelled job came back");
    let log = std::fs::read_to_string(out_of(&id)).unwrap();
    assert!(!log.contains("requeueing"), "{log}");
}
