//! Checkpoints and exact resume with real `rlhf-worker` processes on loopback: a run stopped by
//! SIGTERM (and one killed with SIGKILL) and relaunched produces per-step metrics bitwise equal
//! to an uninterrupted run; a corrupt or truncated newest checkpoint falls back to the previous
//! one and says so (and TensorBoard, reading every launch's event file, shows the redone step's
//! newest metrics); a resume-breaking config change is refused naming the keys; a save that
//! fails (file-size limit, as on a full disk) leaves the previous checkpoint intact; and
//! `checkpoint.must_save_by` stops the run with a checkpoint before the budget; a reward script
//! that fails mid-run stops it with a checkpoint of the finished steps, and the relaunch after
//! the fix equals an uninterrupted run.
//!
//! Determinism: workers and the coordinator run with one libtorch thread
//! (`OMP_NUM_THREADS=1`, `workers[].threads: 1`), so every step's floating-point reductions
//! happen in the same order in both runs, and the metrics compare with `==` (timings aside).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const EXIT_PREEMPTED: i32 = 75;

mod common;
use common::{
    arithmetic_prompts, assert_tensorboard_shows_the_metrics, coord, jsonl, launch,
    read_tensorboard, tiny_model, worker_bin,
};

/// A tiny policy, an arithmetic prompt file and a PPO run file (critic and reference included,
/// so every kind of state is checkpointed), two workers with one thread each.
fn setup(dir: &Path, steps: u64, extra: &str) -> PathBuf {
    tiny_model(&dir.join("policy"));
    arithmetic_prompts(dir, 5);
    let yaml = format!(
        "run: {{name: t, dir: runs, seed: 5}}\n\
         launcher: {{worker_bin: {}, heartbeat_interval_ms: 100, heartbeat_timeout_ms: 2000, startup_timeout_s: 60}}\n\
         workers:\n  - {{name: a, roles: [actor, reference], threads: 1}}\n  - {{name: b, roles: [reward, critic], threads: 1}}\n\
         models:\n  policy: policy\n  reward: {{kind: exact_match}}\n\
         algorithm: {{name: ppo, kl: {{coef: 0.05, target: 1.0, horizon: 100}}}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 5}}\n\
         train: {{steps: {steps}, epochs: 2, minibatch_size: 4, micro_batch_size: 2, actor: {{lr: 1.0e-3, schedule: cosine, warmup_steps: 2}}, critic: {{lr: 1.0e-3}}}}\n\
         logging: {{progress: false, plot: false}}\n{extra}",
        worker_bin().display()
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    f
}

fn run_dir(dir: &Path) -> PathBuf {
    dir.join("runs/t")
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    jsonl(&run_dir(dir).join("metrics.jsonl"))
}

/// The metrics without wall-clock measurements (which differ between any two runs).
fn deterministic(rows: &[serde_json::Value]) -> Vec<serde_json::Value> {
    rows.iter()
        .map(|r| {
            let mut r = r.as_object().unwrap().clone();
            r.retain(|k, _| !k.starts_with("time/") && k != "tokens_per_s");
            serde_json::Value::Object(r)
        })
        .collect()
}

/// Asserts equal metrics, naming the first step and key that differ.
fn assert_same(got: &[serde_json::Value], want: &[serde_json::Value]) {
    assert_eq!(got.len(), want.len(), "number of steps");
    for (g, w) in got.iter().zip(want) {
        let (g, w) = (g.as_object().unwrap(), w.as_object().unwrap());
        for (k, wv) in w {
            assert_eq!(
                g.get(k),
                Some(wv),
                "step {}: `{k}` differs from the uninterrupted run",
                w["step"]
            );
        }
        assert_eq!(g.len(), w.len(), "step {}: keys differ", w["step"]);
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "launch failed:\n{}", stderr(out));
}

fn latest(dir: &Path) -> String {
    std::fs::read_to_string(run_dir(dir).join("checkpoints/LATEST"))
        .unwrap()
        .trim()
        .to_string()
}

/// Starts a run in the background with stderr piped, returning it once `step` appears in the
/// metrics file.
fn start_until_step(file: &Path, dir: &Path, step: u64, set: &[&str]) -> Child {
    let mut c = coord();
    c.arg("launch").arg(file);
    for s in set {
        c.args(["--set", s]);
    }
    let mut child = c.stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while (metrics(dir).len() as u64) < step {
        if let Ok(Some(s)) = child.try_wait() {
            let mut e = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut e).unwrap();
            panic!("run ended ({s}) before step {step}:\n{e}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no step {step} in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn wait_output(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("the coordinator did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut e = String::new();
    for l in BufReader::new(child.stderr.take().unwrap()).lines() {
        e.push_str(&l.unwrap());
        e.push('\n');
    }
    (status.code(), e)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child we spawned.
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0);
}

#[test]
fn sigterm_then_relaunch_equals_an_uninterrupted_run() {
    let full = tempfile::tempdir().unwrap();
    let f = setup(full.path(), 6, "checkpoint: {every: 0}\n");
    assert_ok(&launch(&f, &[]));
    let reference = deterministic(&metrics(full.path()));
    assert_eq!(reference.len(), 6);
    // The last step is always checkpointed, also with `every: 0`.
    assert_eq!(latest(full.path()), "step-000006");

    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path(), 6, "checkpoint: {every: 0}\n");
    let child = start_until_step(&f, tmp.path(), 2, &[]);
    signal(child.id(), libc::SIGTERM);
    let (code, err) = wait_output(child, Duration::from_secs(60));
    assert_eq!(code, Some(EXIT_PREEMPTED), "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    let stopped = metrics(tmp.path()).len() as u64;
    assert!((2..6).contains(&stopped), "stopped after {stopped}:\n{err}");
    assert_eq!(latest(tmp.path()), format!("step-{stopped:06}"));

    let out = launch(&f, &[]);
    assert_ok(&out);
    assert!(stderr(&out).contains("resuming from"), "{}", stderr(&out));
    assert_same(&deterministic(&metrics(tmp.path())), &reference);
}

/// The user's reward script of the next test (`kind: command`): exact match on the last number.
/// While `arm` exists in its directory it creates `fail` after answering step 1's 8 rows; while
/// `fail` exists it crashes on every row, as a reward service that went down would.
const FLAKY_REWARD: &str = r#"
import json, os, re, sys
served = 0
for line in sys.stdin:
    if os.path.exists("fail"):
        sys.stderr.write("reward.py: the scoring service is down\n")
        sys.stderr.flush()
        sys.exit(3)
    row = json.loads(line)
    nums = re.findall(r"-?\d+", row["response"])
    ok = bool(nums) and row["answer"] is not None and nums[-1] == row["answer"].strip()
    print(json.dumps({"score": 1.0 if ok else 0.0}), flush=True)
    served += 1
    if served == 8 and os.path.exists("arm"):
        open("fail", "w").close()
"#;

#[test]
fn a_failing_reward_stops_with_a_checkpoint_and_the_relaunch_resumes_exactly() {
    let with_script = |dir: &Path| {
        let f = setup(dir, 3, "checkpoint: {every: 0}\n");
        std::fs::write(dir.join("reward.py"), FLAKY_REWARD).unwrap();
        let yaml = std::fs::read_to_string(&f).unwrap().replace(
            "reward: {kind: exact_match}",
            &format!(
                "reward: {{kind: command, command: [{}, reward.py], concurrency: 1, timeout_s: 20}}",
                common::python().display()
            ),
        );
        std::fs::write(&f, yaml).unwrap();
        f
    };
    let full = tempfile::tempdir().unwrap();
    assert_ok(&launch(&with_script(full.path()), &[]));
    let reference = deterministic(&metrics(full.path()));
    assert_eq!(reference.len(), 3);

    let tmp = tempfile::tempdir().unwrap();
    let f = with_script(tmp.path());
    std::fs::write(tmp.path().join("arm"), "").unwrap();
    let out = launch(&f, &[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    // The error names the step, the checkpoint written for the finished one, and what the
    // script said; nothing of step 2 was recorded.
    assert!(
        err.contains("step 2: scoring failed; step 1 is checkpointed")
            && err.contains("the scoring service is down"),
        "{err}"
    );
    assert_eq!(latest(tmp.path()), "step-000001");
    assert_eq!(metrics(tmp.path()).len(), 1);

    // The reward is mended: the same command resumes from step 1 and ends as if nothing had
    // happened.
    std::fs::remove_file(tmp.path().join("arm")).unwrap();
    std::fs::remove_file(tmp.path().join("fail")).unwrap();
    let out = launch(&f, &[]);
    assert_ok(&out);
    assert!(stderr(&out).contains("resuming from"), "{}", stderr(&out));
    assert_same(&deterministic(&metrics(tmp.path())), &reference);
}

#[test]
fn sigkill_with_a_checkpoint_every_step_loses_nothing() {
    let full = tempfile::tempdir().unwrap();
    let f = setup(full.path(), 5, "checkpoint: {every: 1, keep_last: 2}\n");
    assert_ok(&launch(&f, &[]));
    let reference = deterministic(&metrics(full.path()));
    // Retention: the newest two.
    let mut dirs: Vec<String> = std::fs::read_dir(run_dir(full.path()).join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    dirs.sort();
    assert_eq!(dirs, ["step-000004", "step-000005"]);

    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path(), 5, "checkpoint: {every: 1, keep_last: 2}\n");
    let child = start_until_step(&f, tmp.path(), 3, &[]);
    signal(child.id(), libc::SIGKILL);
    let (code, _) = wait_output(child, Duration::from_secs(10));
    assert_eq!(code, None, "killed by a signal");
    // The orphaned workers notice the coordinator is gone and exit on their own; the relaunch
    // starts new ones and continues from the newest committed checkpoint.
    let out = launch(&f, &[]);
    assert_ok(&out);
    assert!(stderr(&out).contains("resuming from"), "{}", stderr(&out));
    assert_same(&deterministic(&metrics(tmp.path())), &reference);
}

#[test]
fn damaged_checkpoints_fall_back_and_changed_geometry_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path(), 3, "checkpoint: {every: 1, keep_last: 5}\n");
    assert_ok(&launch(&f, &[]));
    let ck = run_dir(tmp.path()).join("checkpoints");

    // A flipped byte in the newest checkpoint's weights: its checksum fails, step 2 is taken.
    let weights = ck.join("step-000003/actor/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 7] ^= 0x55;
    std::fs::write(&weights, &bytes).unwrap();
    let out = launch(&f, &["train.steps=4"]);
    assert_ok(&out);
    let err = stderr(&out);
    assert!(
        err.contains("step-000003") && err.contains("sha256"),
        "{err}"
    );
    assert!(err.contains("falling back"), "{err}");
    assert!(err.contains("step-000002"), "{err}");
    assert_eq!(metrics(tmp.path()).len(), 4);
    assert_eq!(latest(tmp.path()), "step-000004");

    // A truncated optimizer file in the newest: its size is wrong, step 3 (rewritten) is taken.
    let opt = ck.join("step-000004/actor");
    let file = std::fs::read_dir(&opt)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("optim"))
        .expect("an optimizer file");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    // LATEST naming a checkpoint that does not exist is not trusted either.
    std::fs::write(ck.join("LATEST"), "step-000009\n").unwrap();
    let out = launch(&f, &["train.steps=4"]);
    assert_ok(&out);
    let err = stderr(&out);
    assert!(err.contains("does not exist"), "{err}");
    assert!(err.contains("bytes, the manifest says"), "{err}");
    assert!(err.contains("step=3"), "{err}");

    // A missing file.
    std::fs::remove_file(ck.join("step-000004/controller.json")).unwrap();
    let out = launch(&f, &["train.steps=4"]);
    assert_ok(&out);
    assert!(stderr(&out).contains("is missing"), "{}", stderr(&out));

    // Batch geometry changed: refused before any worker starts, naming the keys.
    let out = launch(&f, &["rollout.batch_size=2", "train.minibatch_size=2"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("rollout.batch_size: 4 in the checkpoint, 2 now"),
        "{err}"
    );
    assert!(err.contains("train.minibatch_size"), "{err}");
    assert!(!err.contains("worker started"), "{err}");

    // TensorBoard: one event file per launch that ran (not the refused one). Step 3, done by
    // the first launch and again by the second after falling back to step 2, is in both files;
    // read in name order, TensorBoard shows the newest points, which are metrics.jsonl's.
    let tb = read_tensorboard(&run_dir(tmp.path()));
    assert_eq!(tb.files.len(), 4, "{:?}", tb.files);
    let step3: Vec<&String> = tb
        .scalars
        .iter()
        .filter(|(_, tag, step, _)| tag == "time/step_s" && *step == 3)
        .map(|(f, ..)| f)
        .collect();
    assert_eq!(step3, [&tb.files[0], &tb.files[1]]);
    assert_tensorboard_shows_the_metrics(&tb, &run_dir(tmp.path()));
}

#[test]
fn a_failed_save_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path(), 2, "checkpoint: {every: 1}\n");
    assert_ok(&launch(&f, &[]));
    assert_eq!(latest(tmp.path()), "step-000002");
    // Relaunch for one more step with a 64 KiB file-size limit (SIGXFSZ ignored, so writes
    // fail with EFBIG as on a full disk): the step runs, its checkpoint cannot be written.
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("trap '' XFSZ; ulimit -f 64; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_rlhf-coord"))
        .args(["launch"])
        .arg(&f)
        .args(["--set", "train.steps=3"])
        .env("RLHF_LOG", "info")
        .env("OMP_NUM_THREADS", "1");
    let out = c.output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("checkpoint of step 3") && err.contains("previous checkpoint"),
        "{err}"
    );
    let ck = run_dir(tmp.path()).join("checkpoints");
    assert_eq!(latest(tmp.path()), "step-000002");
    let names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains(".tmp-") || n == "step-000003"),
        "{names:?}"
    );
    // Without the limit the run resumes from step 2 and finishes.
    let out = launch(&f, &["train.steps=3"]);
    assert_ok(&out);
    assert!(stderr(&out).contains("step=2"), "{}", stderr(&out));
    assert_eq!(metrics(tmp.path()).len(), 3);
    assert_eq!(latest(tmp.path()), "step-000003");
}

#[test]
fn must_save_by_stops_with_a_checkpoint_before_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(
        tmp.path(),
        100_000,
        "checkpoint: {every: 0, must_save_by: 8}\n",
    );
    let t0 = Instant::now();
    let out = launch(&f, &[]);
    let took = t0.elapsed();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(EXIT_PREEMPTED), "{err}");
    assert!(err.contains("must_save_by"), "{err}");
    let steps = metrics(tmp.path()).len() as u64;
    assert!(steps > 0, "no step ran before the budget:\n{err}");
    assert_eq!(latest(tmp.path()), format!("step-{steps:06}"));
    // Stopped before the budget plus the checkpoint and teardown.
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn every_minutes_saves_by_wall_clock() {
    let tmp = tempfile::tempdir().unwrap();
    // 0.0001 minutes (6 ms) has always passed by the end of a step: a checkpoint per step.
    let f = setup(
        tmp.path(),
        3,
        "checkpoint: {every: 0, every_minutes: 0.0001, keep_last: 5}\n",
    );
    assert_ok(&launch(&f, &[]));
    for s in 1..=3 {
        let m = run_dir(tmp.path()).join(format!("checkpoints/step-{s:06}/manifest.json"));
        assert!(m.is_file(), "{} missing", m.display());
    }
}

#[test]
fn a_second_signal_exits_at_once_and_kills_the_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path(), 100_000, "checkpoint: {every: 0}\n");
    // Longer steps, so the second signal surely arrives while the first waits for the step.
    let child = start_until_step(
        &f,
        tmp.path(),
        1,
        &["rollout.max_new_tokens=64", "rollout.batch_size=8"],
    );
    let pid = child.id();
    signal(pid, libc::SIGINT);
    // Two signals sent back to back may be delivered as one.
    std::thread::sleep(Duration::from_millis(100));
    signal(pid, libc::SIGINT);
    let (code, err) = wait_output(child, Duration::from_secs(10));
    assert_eq!(code, Some(76), "{err}");
    assert!(err.contains("second signal"), "{err}");
    // The workers were started by this coordinator; none may survive it.
    let workers: Vec<u32> = err
        .lines()
        .filter(|l| l.contains("worker started"))
        .filter_map(|l| {
            l.split("pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(workers.len(), 2, "{err}");
    std::thread::sleep(Duration::from_millis(300));
    for w in workers {
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(w as i32, 0) } == 0
            && !std::fs::read_to_string(format!("/proc/{w}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(!alive, "worker pid {w} survived the forced exit");
    }
}

/// A signal during start-up (the config checked, workers starting and loading) is honoured at
/// the first step boundary, not fatal; a repeated SIGTERM (Slurm sends more than one) does not
/// force the exit either.
#[test]
fn a_signal_during_start_up_stops_cleanly_and_repeated_terms_do_not_force() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path(), 100, "checkpoint: {every: 0}\n");
    let mut child = coord()
        .arg("launch")
        .arg(&f)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut err = String::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        err.push_str(&l);
        err.push('\n');
        // Workers are starting: the run stops at its first step boundary, after telling them
        // to stop, which keeps the process alive for the second signal. (Signalled before
        // the workers start, it can exit before the second signal lands.)
        if l.contains("worker started") {
            break;
        }
    }
    signal(child.id(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    signal(child.id(), libc::SIGTERM);
    for l in lines {
        err.push_str(&l.unwrap());
        err.push('\n');
    }
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(EXIT_PREEMPTED), "{err}");
    assert!(err.contains("stopped before the first step"), "{err}");
    assert!(err.contains("already stopping"), "{err}");
    assert!(metrics(tmp.path()).is_empty(), "{err}");
}
