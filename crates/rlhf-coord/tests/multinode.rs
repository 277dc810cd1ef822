//! Runs that span nodes, on a real multi-node Slurm on this machine (`scripts/slurm-local.sh up
//! --nodes 4`: every node in its own network namespace with its own address and host name, so
//! no loopback shortcut hides an addressing bug), and Slurm's own ways of stopping a job:
//!
//! 1. PPO with its roles on two nodes; workers bound to every interface advertise their host
//!    names, which the coordinator and the other nodes resolve.
//! 2. Three nodes: two data-parallel actor replicas and a generator on different nodes (TCP
//!    all-reduce and weight sync across the bridge); then the generator's node loses its link:
//!    the run stops within the heartbeat timeout naming the node, the job requeues itself,
//!    lands on the nodes that are still up, and resumes from the last checkpoint.
//! 3. Preemption as Slurm does it (`preempt/partition_prio`, `PreemptMode=REQUEUE`, a grace
//!    time, no `preempt_send_user_signal`): a higher-priority job takes the nodes, the run
//!    checkpoints at the step it was on, comes back by requeue and resumes; every step is in
//!    `metrics.jsonl` exactly once; again with `preempt_send_user_signal` (the job's USR1
//!    instead). Then `scancel --signal=TERM` of the job (only its tasks get it), then a plain
//!    `scancel`, which must not requeue; a preemption with `GraceTime=0` (Slurm requeues the
//!    job itself; it resumes from the last checkpoint); the time limit's USR1 warning.
//!
//! Needs root and Slurm (`scripts/test.sh` installs it and sets `RLHF_REQUIRE_SLURM=1`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::slurm::{steps, wait_for_step, Cluster};
use common::{arithmetic_prompts, tiny_model, worker_bin};

/// Seconds Slurm gives a preempted job (the debug partition's GraceTime).
const GRACE_S: u64 = 30;

fn run_file(dir: &Path, name: &str, nodes: usize, workers: &str, extra: &str) -> PathBuf {
    let yaml = format!(
        "run: {{name: {name}, dir: {}, seed: 3}}\n\
         launcher:\n  kind: slurm\n  bind: 0.0.0.0\n  worker_bin: {}\n  heartbeat_interval_ms: 300\n  heartbeat_timeout_ms: 3000\n  startup_timeout_s: 120\n  slurm: {{nodes: {nodes}, partition: debug, time: \"00:20:00\", signal_grace_s: 60, max_restarts: 2}}\n\
         workers:\n{workers}\
         models: {{policy: policy, reward: {{kind: exact_match}}}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 6}}\n\
         logging: {{progress: false, plot: false}}\n{extra}",
        dir.join("runs").display(),
        worker_bin().display()
    );
    let f = dir.join(format!("{name}.yaml"));
    std::fs::write(&f, yaml).unwrap();
    f
}

/// Submits a job to the `high` partition that needs job `id`'s two nodes to itself for `secs`
/// seconds (Slurm preempts `id` for it); returns its id.
fn preempt(cluster: &Cluster, id: &str, secs: u32) -> String {
    let nodes = cluster.job_field(id, "NodeList");
    let out = cluster.run(
        "sbatch",
        &[
            "--parsable",
            "--partition=high",
            "--output=/dev/null",
            "--exclusive",
            &format!("--nodelist={nodes}"),
            "-N2",
            "--wrap",
            &format!("sleep {secs}"),
        ],
    );
    out.trim().split(';').next().unwrap_or_default().to_string()
}

/// Waits for job `id` of run `run` to finish one more step, then cancels it (plain `scancel`)
/// and waits until it has left the queue; returns its output.
fn one_more_step_then_cancel(
    cluster: &Cluster,
    run: &Path,
    id: &str,
    step_limit: Duration,
    what: &str,
) -> String {
    let out = run.join(format!("slurm/slurm-{id}.out"));
    let before = steps(run).len() as u64;
    wait_for_step(run, before + 1, step_limit, &out);
    cluster.run("scancel", &[id]);
    cluster.wait_gone(
        id,
        Duration::from_secs(60),
        &format!("cancel after {what}"),
        &out,
    );
    log_of(run, id)
}

/// Every step is in `metrics.jsonl` exactly once, in order.
fn assert_each_step_once(run: &Path, log: &str) {
    let s = steps(run);
    let expect: Vec<u64> = (1..=s.len() as u64).collect();
    assert_eq!(s, expect, "every step once, in order:\n{log}");
}

/// The step of the checkpoint `LATEST` names.
fn latest_step(run: &Path) -> u64 {
    let name = std::fs::read_to_string(run.join("checkpoints/LATEST")).unwrap();
    name.trim().trim_start_matches("step-").parse().unwrap()
}

fn log_of(run: &Path, id: &str) -> String {
    std::fs::read_to_string(run.join(format!("slurm/slurm-{id}.out"))).unwrap_or_default()
}

/// The number after `key` on the first line containing `marker`.
fn field_after(log: &str, marker: &str, key: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains(marker))
        .find_map(|l| l.split(key).nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {marker:?} line with {key}:\n{log}"))
}

/// Seconds since midnight UTC of a log line's leading RFC 3339 timestamp.
fn seconds_of_day(line: &str) -> Option<f64> {
    let clock = line.get(11..26)?; // HH:MM:SS.ffffff in 2026-12-06THH:MM:SS.ffffffZ
    let mut parts = clock.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn now_seconds_of_day() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    now % 86_400.0
}

/// The host each worker registered from, from the coordinator's log.
fn registered_host(log: &str, worker: &str) -> String {
    log.lines()
        .filter(|l| l.contains("worker registered") && l.contains(&format!("worker={worker} ")))
        .find_map(|l| l.split("host=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("worker {worker} never registered:\n{log}"))
        .to_string()
}

#[test]
fn runs_span_nodes_and_survive_slurms_own_stops() {
    let Some(cluster) = Cluster::up_nodes(
        4,
        &[
            ("RLHF_SLURM_GRACE_TIME", &GRACE_S.to_string()),
            ("RLHF_SLURM_SLURMD_TIMEOUT", "10"),
        ],
    ) else {
        return;
    };
    assert_eq!(cluster.nodes.len(), 4, "{:?}", cluster.nodes);
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(&tmp.path().join("policy"));
    arithmetic_prompts(tmp.path(), 5);

    // 1. PPO with its roles on two nodes.
    let f = run_file(
        tmp.path(),
        "ppo",
        2,
        "  - {name: a, roles: [actor, reference], node: 0}\n  - {name: b, roles: [reward, critic], node: 1}\n",
        "algorithm: {name: ppo, kl: {coef: 0.05}}\ntrain: {steps: 3, micro_batch_size: 4}\ncheckpoint: {every: 0}\n",
    );
    let run = tmp.path().join("runs/ppo");
    let id = cluster.launch(&f, &[]);
    let out = run.join(format!("slurm/slurm-{id}.out"));
    cluster.wait_gone(&id, Duration::from_secs(240), "PPO on two nodes", &out);
    let log = log_of(&run, &id);
    assert_eq!(steps(&run), [1, 2, 3], "{log}");
    assert!(log.contains("run finished"), "{log}");
    let (ha, hb) = (registered_host(&log, "a"), registered_host(&log, "b"));
    assert_ne!(ha, hb, "both workers on one node:\n{log}");
    for h in [&ha, &hb] {
        assert!(
            cluster.nodes.contains(h),
            "{h} is not a node of {:?}",
            cluster.nodes
        );
    }
    // Registered by host name, not by a loopback address.
    assert!(log.contains(&format!("address={hb}:")), "{log}");

    // 2. Replicas and a generator on three nodes; then the generator's node loses its link.
    let f = run_file(
        tmp.path(),
        "dp",
        3,
        "  - {name: a0, roles: [actor, reference, reward, critic], node: 0}\n  - {name: a1, roles: [actor], node: 1}\n  - {name: g, roles: [generator], node: 2}\n",
        "algorithm: {name: rloo, kl: {coef: 0.05}}\ntrain: {steps: 40, micro_batch_size: 4, replica_check_every: 2}\ncheckpoint: {every: 2}\n",
    );
    let run = tmp.path().join("runs/dp");
    let id = cluster.launch(&f, &[]);
    let out = run.join(format!("slurm/slurm-{id}.out"));
    wait_for_step(&run, 3, Duration::from_secs(240), &out);
    let log = log_of(&run, &id);
    assert!(log.contains("forming collective group"), "{log}");
    let lost = registered_host(&log, "g");
    let first_nodes = cluster.job_field(&id, "NodeList");
    let t_down = Instant::now();
    let down_at = now_seconds_of_day();
    cluster.link(&lost, false);
    cluster.wait_until(
        Duration::from_secs(120),
        "requeue after the link loss",
        &out,
        || log_of(&run, &id).contains("rlhf-coord: requeueing job"),
    );
    let log = log_of(&run, &id);
    let stopped = log
        .lines()
        .find(|l| l.contains("missed heartbeats"))
        .unwrap_or_else(|| panic!("no heartbeat loss reported:\n{log}"));
    assert!(stopped.contains(&format!("on node {lost}")), "{stopped}");
    assert!(stopped.contains("worker `g`"), "{stopped}");
    // Noticed within the heartbeat timeout (3 s) and its check interval (a tenth of it).
    let noticed = log
        .lines()
        .filter(|l| l.contains("missed heartbeats") || l.contains("stopping the run"))
        .find_map(seconds_of_day)
        .unwrap_or_else(|| panic!("no timestamped heartbeat loss:\n{log}"))
        - down_at;
    assert!(
        noticed < 3.3 + 1.0,
        "noticed {noticed:.1} s after the link went down:\n{log}"
    );
    let requeued = t_down.elapsed();
    // The requeue must beat slurmctld's own verdict on the node (SlurmdTimeout = 10 s above):
    // after that the job is cancelled for the node's failure instead of requeued. The tear-down
    // does not wait on the lost node for this (measured 5.0 s; 15 s when it did).
    assert!(
        requeued < Duration::from_secs(10),
        "requeue asked {:.1} s after the link went down, after SlurmdTimeout:\n{log}",
        requeued.as_secs_f64()
    );
    // The requeued job starts on the nodes that are up and resumes from the newest checkpoint.
    cluster.wait_until(
        Duration::from_secs(180),
        "resume after the link loss",
        &out,
        || log_of(&run, &id).contains("resuming from"),
    );
    wait_for_step(
        &run,
        steps(&run).len() as u64 + 2,
        Duration::from_secs(180),
        &out,
    );
    let now_nodes = cluster.job_field(&id, "NodeList");
    eprintln!(
        "link down: run stopped {noticed:.1} s later, requeue asked {:.1} s later; nodes {first_nodes} -> {now_nodes}",
        requeued.as_secs_f64()
    );
    cluster.link(&lost, true);
    assert!(cluster.run("scancel", &[&id]).is_empty());
    cluster.wait_gone(&id, Duration::from_secs(120), "cancel after resume", &out);
    let log = log_of(&run, &id);
    assert!(log.contains(&format!("job {id} start 1 ")), "{log}");
    assert_each_step_once(&run, &log);
    // The same run on two nodes instead of three (the generator moves to node 1): it resumes.
    let done = latest_step(&run);
    let id = cluster.launch(
        &f,
        &[
            "launcher.slurm.nodes=2",
            "workers.2.node=1",
            &format!("train.steps={}", done + 2),
        ],
    );
    let out = run.join(format!("slurm/slurm-{id}.out"));
    cluster.wait_gone(&id, Duration::from_secs(240), "resume on two nodes", &out);
    let log = log_of(&run, &id);
    assert!(log.contains("resuming from"), "{log}");
    assert!(log.contains("run finished"), "{log}");
    assert_eq!(steps(&run), (1..=done + 2).collect::<Vec<u64>>(), "{log}");

    // 3. Preemption by a higher-priority job, without preempt_send_user_signal.
    let f = run_file(
        tmp.path(),
        "pre",
        2,
        "  - {name: a, roles: [actor, reference], node: 0}\n  - {name: b, roles: [reward, critic], node: 1}\n",
        "algorithm: {name: rloo, kl: {coef: 0.05}}\ntrain: {steps: 30, micro_batch_size: 4}\ncheckpoint: {every: 0}\n",
    );
    let run = tmp.path().join("runs/pre");
    let id = cluster.launch(&f, &[]);
    let out = run.join(format!("slurm/slurm-{id}.out"));
    wait_for_step(&run, 3, Duration::from_secs(240), &out);
    let t_preempt = Instant::now();
    let submitted = now_seconds_of_day();
    let high = preempt(&cluster, &id, 5);
    cluster.wait_until(Duration::from_secs(120), "preemption", &out, || {
        log_of(&run, &id).contains("rlhf-coord: requeueing job")
    });
    let stopped_after = t_preempt.elapsed();
    assert!(
        stopped_after < Duration::from_secs(GRACE_S),
        "checkpoint and requeue took {stopped_after:?}, more than the {GRACE_S} s grace time"
    );
    let log = log_of(&run, &id);
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("checkpoint saved"), "{log}");
    assert!(!log.contains("exited unexpectedly"), "{log}");
    cluster.wait_gone(&high, Duration::from_secs(120), "the preempting job", &out);
    cluster.wait_gone(
        &id,
        Duration::from_secs(400),
        "resume after preemption",
        &out,
    );
    let log = log_of(&run, &id);
    assert!(log.contains(&format!("job {id} start 1 ")), "{log}");
    assert!(log.contains("resuming from"), "{log}");
    assert!(log.contains("run finished"), "{log}");
    assert_eq!(steps(&run), (1..=30).collect::<Vec<u64>>(), "{log}");
    assert_eq!(cluster.job_field(&id, "JobState"), "COMPLETED", "{log}");
    // Nothing lost: the checkpoint is of the step the run was on when the signal came, and the
    // requeued run continues right after it.
    let saved = field_after(&log, "writing a checkpoint before stopping", "step=");
    let restored = field_after(&log, "state restored; continuing", "step=");
    let done_before = log
        .split(&format!("job {id} start 1 "))
        .next()
        .unwrap()
        .matches("rlhf_coord::metrics: step ")
        .count() as u64;
    assert_eq!((saved, restored), (done_before, done_before), "{log}");
    let at = |marker: &str| {
        log.lines()
            .filter(|l| l.contains(marker))
            .find_map(seconds_of_day)
            .unwrap_or_else(|| panic!("no {marker:?} line:\n{log}"))
    };
    let signalled = at("a worker was signalled");
    eprintln!(
        "preemption timeline (s after the preempting job was submitted): workers' SIGTERM reported {:.1}, \
         checkpoint of step {saved} committed {:.1}, requeue asked {:.1}; requeued job's \
         coordinator found the checkpoint {:.1}, state restored {:.1}, next step done {:.1}; steps lost 0",
        signalled - submitted,
        at("checkpoint committed") - submitted,
        stopped_after.as_secs_f64(),
        at("resuming from") - submitted,
        at("state restored") - submitted,
        log.lines()
            .filter(|l| l.contains(&format!("metrics: step {}:", saved + 1)))
            .find_map(seconds_of_day)
            .unwrap_or(f64::NAN)
            - submitted,
    );

    // 3b. The same preemption on a cluster that sets preempt_send_user_signal: Slurm sends the
    //     job's --signal (B:USR1, to the batch step: the coordinator) instead of SIGTERM.
    let conf = std::fs::read_to_string(&cluster.conf).unwrap();
    let off = "# SlurmctldParameters=preempt_send_user_signal";
    assert!(conf.contains(off), "{conf}");
    let on = conf.replace(off, "SlurmctldParameters=preempt_send_user_signal\n#");
    std::fs::write(&cluster.conf, &on).unwrap();
    cluster.run("scontrol", &["reconfigure"]);
    std::thread::sleep(Duration::from_secs(2));
    std::fs::remove_dir_all(&run).unwrap();
    let id = cluster.launch(&f, &["train.steps=100000"]);
    let out = run.join(format!("slurm/slurm-{id}.out"));
    wait_for_step(&run, 2, Duration::from_secs(240), &out);
    preempt(&cluster, &id, 2);
    cluster.wait_until(
        Duration::from_secs(240),
        "resume after a USR1 preemption",
        &out,
        || log_of(&run, &id).contains(&format!("job {id} start 1 ")),
    );
    let log = one_more_step_then_cancel(
        &cluster,
        &run,
        &id,
        Duration::from_secs(180),
        "a USR1 preemption",
    );
    assert!(log.contains("signal=\"SIGUSR1\""), "{log}");
    assert!(log.contains("rlhf-coord: requeueing job"), "{log}");
    assert!(log.contains("resuming from"), "{log}");
    assert_each_step_once(&run, &log);
    std::fs::write(&cluster.conf, &conf).unwrap();
    cluster.run("scontrol", &["reconfigure"]);
    std::thread::sleep(Duration::from_secs(2));

    // 4. `scancel --signal=TERM JOB` reaches only the tasks (the workers), which hold it and
    //    tell the coordinator: the run checkpoints and requeues. Then a plain `scancel`: the
    //    job ends and stays ended.
    std::fs::remove_dir_all(&run).unwrap();
    let id = cluster.launch(&f, &["train.steps=100000"]);
    let out = run.join(format!("slurm/slurm-{id}.out"));
    wait_for_step(&run, 2, Duration::from_secs(240), &out);
    cluster.run("scancel", &["--signal=TERM", &id]);
    cluster.wait_until(
        Duration::from_secs(120),
        "requeue after scancel --signal=TERM",
        &out,
        || log_of(&run, &id).contains("rlhf-coord: requeueing job"),
    );
    let log = log_of(&run, &id);
    assert!(log.contains("SIGTERM at worker"), "{log}");
    cluster.wait_until(
        Duration::from_secs(180),
        "resume after scancel --signal",
        &out,
        || log_of(&run, &id).contains(&format!("job {id} start 1 ")),
    );
    // A plain scancel signals every process and SIGKILLs them after KillWait (5 s here), so
    // the run may or may not get to checkpoint; what matters is that it stays ended.
    one_more_step_then_cancel(
        &cluster,
        &run,
        &id,
        Duration::from_secs(180),
        "plain scancel",
    );
    std::thread::sleep(Duration::from_secs(12));
    assert!(!cluster.job_active(&id), "a cancelled job came back");
    let log = log_of(&run, &id);
    assert_eq!(
        log.matches("rlhf-coord: requeueing job").count(),
        1,
        "{log}"
    );
    assert!(!log.contains(&format!("job {id} start 2 ")), "{log}");

    // 5. Preemption with GraceTime=0: Slurm kills and requeues the job at once; it comes back
    //    and resumes from the last checkpoint, every step still exactly once.
    cluster.run(
        "scontrol",
        &["update", "PartitionName=debug", "GraceTime=0"],
    );
    std::fs::remove_dir_all(&run).unwrap();
    let id = cluster.launch(&f, &["train.steps=12", "checkpoint.every=2"]);
    let out = run.join(format!("slurm/slurm-{id}.out"));
    wait_for_step(&run, 5, Duration::from_secs(240), &out);
    preempt(&cluster, &id, 2);
    cluster.wait_until(
        Duration::from_secs(240),
        "resume after GraceTime=0",
        &out,
        || log_of(&run, &id).contains(&format!("job {id} start 1 ")),
    );
    cluster.wait_gone(
        &id,
        Duration::from_secs(300),
        "finish after GraceTime=0",
        &out,
    );
    let log = log_of(&run, &id);
    assert!(log.contains("resuming from"), "{log}");
    assert_eq!(steps(&run), (1..=12).collect::<Vec<u64>>(), "{log}");
    assert_eq!(cluster.job_field(&id, "JobState"), "COMPLETED", "{log}");

    // 6. The time limit: Slurm's USR1 `signal_grace_s` before it (the sbatch script's
    //    --signal=B:USR1@N) stops the run with a checkpoint, and the job comes back. Slurm may
    //    send it up to 60 s early: with 2 minutes and 45 s of grace it comes 15 to 75 s after
    //    the start, once the coordinator handles signals (with 1 minute it could come while
    //    the coordinator was still loading, which is what the sbatch script's `trap` is for).
    std::fs::remove_dir_all(&run).unwrap();
    let id = cluster.launch(
        &f,
        &[
            "train.steps=100000",
            "launcher.slurm.time=00:02:00",
            "launcher.slurm.signal_grace_s=45",
        ],
    );
    let out = run.join(format!("slurm/slurm-{id}.out"));
    cluster.wait_until(
        Duration::from_secs(240),
        "resume after the time-limit warning",
        &out,
        || log_of(&run, &id).contains("resuming from"),
    );
    let log = one_more_step_then_cancel(
        &cluster,
        &run,
        &id,
        Duration::from_secs(120),
        "the time limit",
    );
    assert!(log.contains("SIGUSR1"), "{log}");
    assert!(log.contains("rlhf-coord: requeueing job"), "{log}");
    assert_each_step_once(&run, &log);
}
