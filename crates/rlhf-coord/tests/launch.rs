//! `rlhf-coord launch` end to end with real `rlhf-worker` processes on loopback: PPO with every
//! role in its own process (its TensorBoard event file read back with tbparse), RLOO with
//! colocated roles, GRPO with the `math` reward (on JSONL, and on a Parquet dataset directory
//! together with a second, weighted reward source), a worker killed with SIGKILL mid-run (the
//! run stops non-zero naming the worker and role, without hanging), a frozen worker caught by
//! missed heartbeats, and bad inputs stopped before any training.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{
    arithmetic_prompts, assert_tensorboard_shows_the_metrics, coord, jsonl, launch,
    read_tensorboard, tiny_model, worker_bin, write_parquet,
};

/// A tiny policy, an arithmetic prompt file, and a run file with the given extra YAML.
fn setup(dir: &Path, extra: &str) -> PathBuf {
    tiny_model(&dir.join("policy"));
    arithmetic_prompts(dir, 4);
    let yaml = format!(
        "run: {{name: t, dir: runs, seed: 3}}\n\
         launcher: {{worker_bin: {}, heartbeat_interval_ms: 100, heartbeat_timeout_ms: 1500, startup_timeout_s: 60}}\n\
         models:\n  policy: policy\n  reward: {{kind: exact_match}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 6}}\n\
         train: {{steps: 3, micro_batch_size: 4, actor: {{lr: 1.0e-3}}, critic: {{lr: 1.0e-3}}}}\n\
         logging: {{progress: false}}\n{extra}",
        worker_bin().display()
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    f
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("runs/t/metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "launch failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ppo_with_every_role_in_its_own_process() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path(), "algorithm: {name: ppo, kl: {coef: 0.01}}\n");
    // Over IPv6: every address on the wire is a bracketed literal.
    let out = launch(&f, &["launcher.bind=::1", "logging.samples_every=2"]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("advertised=[::1]:"), "{err}");
    assert!(err.contains("address=[::1]:"), "{err}");
    for w in ["actor", "critic", "reward", "reference"] {
        assert!(
            err.contains(&format!("worker registered worker={w}")) || err.contains(w),
            "{err}"
        );
        assert!(tmp.path().join(format!("runs/t/logs/{w}.log")).exists());
    }
    let m = metrics(tmp.path());
    assert_eq!(m.len(), 3);
    for (i, row) in m.iter().enumerate() {
        assert_eq!(row["step"], i as u64 + 1);
        for k in [
            "reward_mean",
            "kl_mean",
            "actor/pg_loss",
            "critic/value_loss",
            "time/generate_s",
        ] {
            assert!(row[k].is_number(), "step {}: `{k}` missing in {row}", i + 1);
        }
    }
    let resolved = std::fs::read_to_string(tmp.path().join("runs/t/config.resolved.yaml")).unwrap();
    assert!(resolved.contains("name: ppo"), "{resolved}");
    let png = std::fs::read(tmp.path().join("runs/t/metrics.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // The TensorBoard event file, read back by tbparse: one file, every scalar of every
    // metrics line at its step, and step 2's samples as text.
    let run_dir = tmp.path().join("runs/t");
    let tb = read_tensorboard(&run_dir);
    assert_eq!(tb.files.len(), 1, "{:?}", tb.files);
    assert!(
        tb.files[0].starts_with("events.out.tfevents."),
        "{:?}",
        tb.files
    );
    assert_tensorboard_shows_the_metrics(&tb, &run_dir);
    assert_eq!(tb.text.len(), 1, "one sampled step: {:?}", tb.text);
    let (_, tag, step, text) = &tb.text[0];
    assert_eq!((tag.as_str(), *step), ("samples", 2));
    let samples = jsonl(&run_dir.join("samples.jsonl"));
    assert_eq!(samples.len(), 2);
    for s in &samples {
        assert!(
            text.contains(s["prompt"][0]["content"].as_str().unwrap()),
            "{text}"
        );
        for c in s["completions"].as_array().unwrap() {
            assert!(text.contains(c["text"].as_str().unwrap()), "{text}");
        }
    }
}

#[test]
fn rloo_with_colocated_roles() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(
        tmp.path(),
        "algorithm: {name: rloo, kl: {coef: 0.01, estimator: k3}}\n\
         workers:\n  - {name: policy-host, roles: [actor, reference]}\n  - {name: judge, roles: [reward, critic]}\n",
    );
    // Listening on every interface, as a multi-node run does: workers advertise this host's
    // name, which the coordinator resolves (it once refused anything but ip:port).
    let out = launch(
        &f,
        &[
            "train.steps=2",
            "launcher.bind=0.0.0.0",
            "logging.tensorboard=false",
        ],
    );
    assert_ok(&out);
    assert!(!tmp.path().join("runs/t/tensorboard").exists());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(&format!("address={}:", host.trim())), "{log}");
    // Not loopback: `launcher.tls: auto` turned mutual TLS on.
    assert!(log.contains("mutual TLS on"), "{log}");
    assert!(tmp.path().join("runs/t/tls/run.key").exists());
    let m = metrics(tmp.path());
    assert_eq!(m.len(), 2);
    assert!(
        m[1]["critic/value_loss"].is_null(),
        "rloo trains no critic: {}",
        m[1]
    );
    assert!(m[1]["actor/pg_loss"].is_number());
    assert!(!tmp.path().join("runs/t/logs/actor.log").exists());
    assert!(tmp.path().join("runs/t/logs/policy-host.log").exists());

    // An interface instead: its address is listened on and advertised by every process, and
    // NCCL is pointed at the same interface.
    std::fs::remove_dir_all(tmp.path().join("runs")).unwrap();
    let out = launch(&f, &["train.steps=1", "launcher.interface=lo"]);
    assert_ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("advertised=127.0.0.1:"), "{log}");
    let worker = std::fs::read_to_string(tmp.path().join("runs/t/logs/judge.log")).unwrap();
    assert!(worker.contains("advertised=127.0.0.1:"), "{worker}");
    assert!(worker.contains("nccl_ifname=lo"), "{worker}");
    assert!(
        worker.contains("tls=off"),
        "loopback needs no TLS: {worker}"
    );
    // A name this host does not have: refused before any worker starts, naming it.
    let out = launch(&f, &["launcher.interface=nope9"]);
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("interface `nope9` does not exist on host"),
        "{log}"
    );
    assert!(!log.contains("worker started"), "{log}");
}

#[test]
fn grpo_with_the_math_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(
        tmp.path(),
        "algorithm: {name: grpo}\nworkers:\n  - {name: all, roles: [actor, reward, reference]}\n",
    );
    // References as math datasets write them; the verifier reads them by value.
    let mut rows = String::new();
    for (a, b) in [(1, 2), (3, 4), (2, 2), (5, 1)] {
        rows.push_str(&format!(
            "{{\"prompt\": \"{a}+{b}=\", \"answer\": \"The sum is $\\\\boxed{{{}}}$.\"}}\n",
            a + b
        ));
    }
    std::fs::write(tmp.path().join("prompts.jsonl"), rows).unwrap();
    // `incorrect` away from exact_match's 0 shows whose scores the run trained on.
    let out = launch(
        &f,
        &[
            "train.steps=2",
            "models.reward.kind=math",
            "models.reward.incorrect=0.25",
        ],
    );
    assert_ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("reward_outputs=[\"math\"]"), "{log}");
    let m = metrics(tmp.path());
    assert_eq!(m.len(), 2);
    for row in &m {
        let r = row["reward_mean"].as_f64().unwrap();
        assert!((0.25..=1.0).contains(&r), "{row}");
        assert!(row["actor/pg_loss"].is_number(), "{row}");
    }

    // The same from a Hugging Face dataset directory written by pyarrow: chat messages and
    // answers in columns of other names, the train split in two shards beside a test split.
    let row = |a: u32, b: u32| {
        serde_json::json!({
            "conversation": [
                {"role": "system", "content": "Add."},
                {"role": "user", "content": format!("{a}+{b}=")},
            ],
            "solution": format!("\\frac{{{}}}{{1}}", a + b),
        })
    };
    let hf = tmp.path().join("hf");
    write_parquet(
        tmp.path(),
        serde_json::json!([
            {"path": hf.join("data/train-00000-of-00002.parquet"), "rows": [row(1, 2), row(3, 4)]},
            {"path": hf.join("data/train-00001-of-00002.parquet"), "rows": [row(2, 2), row(5, 1)]},
            {"path": hf.join("data/test-00000-of-00001.parquet"), "rows": [row(9, 9)]},
        ]),
    );
    // Scored by two sources at once (models.rewards): the math verifier and, at half weight,
    // exact match on the last number; each is logged on its own.
    let several = tmp.path().join("several.yaml");
    std::fs::write(
        &several,
        std::fs::read_to_string(&f).unwrap().replace(
            "  reward: {kind: exact_match}\n",
            "  rewards:\n    - {kind: math, incorrect: 0.25}\n    - {name: exact, kind: exact_match, weight: 0.5}\n",
        ),
    )
    .unwrap();
    let out = launch(
        &several,
        &[
            "run.name=hf",
            "train.steps=1",
            &format!("rollout.prompts={}", hf.display()),
            "rollout.split=train",
            "rollout.messages_key=conversation",
            "rollout.answer_key=solution",
        ],
    );
    assert_ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("reward_outputs=[\"math: math\", \"exact: exact_match\"]"),
        "{log}"
    );
    let m = jsonl(&tmp.path().join("runs/hf/metrics.jsonl"));
    assert_eq!(m.len(), 1);
    let (math, exact) = (
        m[0]["attribute/math"].as_f64().unwrap(),
        m[0]["attribute/exact"].as_f64().unwrap(),
    );
    assert!(
        (0.25..=1.0).contains(&math) && (0.0..=1.0).contains(&exact),
        "{}",
        m[0]
    );
    let score = m[0]["score_mean"].as_f64().unwrap();
    assert!((score - (math + 0.5 * exact)).abs() < 1e-5, "{}", m[0]);
    // The test split alone is one prompt, fewer than a batch: the run refuses it, counting it.
    let out = launch(
        &f,
        &[
            "run.name=hf-test",
            &format!("rollout.prompts={}", hf.display()),
            "rollout.split=test",
            "rollout.messages_key=conversation",
            "rollout.answer_key=solution",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("has only 1 prompts"), "{err}");
}

/// Starts a long run in the background and returns it once a step has completed.
fn start_long_run(dir: &Path) -> Child {
    let f = setup(dir, "algorithm: {name: grpo}\n");
    let mut child = coord()
        .env("RLHF_LOG_FORMAT", "json")
        .args(["launch"])
        .arg(&f)
        .args(["--set", "train.steps=100000"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while metrics(dir).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no step completed within 60 s"
        );
        if let Some(s) = child.try_wait().unwrap() {
            let mut e = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut e).unwrap();
            panic!("run ended early ({s}): {e}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// The pid of a worker, from the coordinator's JSON log lines read so far.
fn worker_pid(lines: &mut impl Iterator<Item = String>, name: &str) -> i32 {
    for l in lines {
        let v: serde_json::Value = match serde_json::from_str(&l) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let f = &v["fields"];
        if f["message"] == "worker started" && f["worker"] == name {
            return f["pid"].as_i64().unwrap() as i32;
        }
    }
    panic!("no `worker started` line for {name}");
}

fn finish(
    mut child: Child,
    rest: impl Iterator<Item = String>,
    limit: Duration,
) -> (i32, String, Duration) {
    let t0 = Instant::now();
    let text: Vec<String> = rest.collect(); // reads until the coordinator closes stderr
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!(
                "the coordinator did not exit within {limit:?}:\n{}",
                text.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code().unwrap_or(-1), text.join("\n"), t0.elapsed())
}

#[test]
fn sigkill_of_a_worker_stops_the_run_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = start_long_run(tmp.path());
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let pid = worker_pid(&mut lines, "reward");
    let killed = Instant::now();
    unsafe_kill(pid, 9);
    let (code, log, _) = finish(child, lines, Duration::from_secs(30));
    let took = killed.elapsed();
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("worker `reward` (roles: reward)"), "{log}");
    assert!(log.contains("SIGKILL"), "{log}");
    // Reported within the heartbeat timeout (1.5 s) plus tear-down.
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn a_frozen_worker_is_caught_by_missed_heartbeats() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = start_long_run(tmp.path());
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let pid = worker_pid(&mut lines, "reference");
    unsafe_kill(pid, 19); // SIGSTOP: alive but silent
    let (code, log, _) = finish(child, lines, Duration::from_secs(40));
    unsafe_kill(pid, 9);
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("worker `reference` (roles: reference)"),
        "{log}"
    );
    assert!(log.contains("missed heartbeats"), "{log}");
}

fn unsafe_kill(pid: i32, sig: i32) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    // SIGKILL after the run ended may find the worker already reaped.
    assert!(ok || sig == 9, "kill -{sig} {pid} failed");
}

#[test]
fn bad_inputs_stop_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path(), "");
    // A prompt file with a bad line names the line.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"1+1=\", \"answer\": \"2\"}\n{\"prompt\": 5}\n",
    )
    .unwrap();
    let out = launch(&f, &[&format!("rollout.prompts={}", bad.display())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.jsonl:2") && err.contains("must be a string"),
        "{err}"
    );
    // A row without the answer the exact-match reward needs.
    std::fs::write(&bad, "{\"prompt\": \"1+1=\"}\n").unwrap();
    let err = String::from_utf8_lossy(
        &launch(&f, &[&format!("rollout.prompts={}", bad.display())]).stderr,
    )
    .to_string();
    assert!(
        err.contains("bad.jsonl:1") && err.contains("answer"),
        "{err}"
    );
    // A Parquet prompts file: a null prompt is named by file and row (from 0); a missing
    // column by the columns the file has.
    let pq = tmp.path().join("bad.parquet");
    write_parquet(
        tmp.path(),
        serde_json::json!([{"path": &pq, "rows": [
            {"prompt": "1+1=", "answer": "2"},
            {"prompt": null, "answer": "3"},
        ]}]),
    );
    let err = String::from_utf8_lossy(
        &launch(&f, &[&format!("rollout.prompts={}", pq.display())]).stderr,
    )
    .to_string();
    assert!(
        err.contains("bad.parquet: row 1 (counting from 0): the prompt is null"),
        "{err}"
    );
    let err = String::from_utf8_lossy(
        &launch(
            &f,
            &[
                &format!("rollout.prompts={}", pq.display()),
                "rollout.answer_key=solution",
            ],
        )
        .stderr,
    )
    .to_string();
    assert!(
        err.contains("bad.parquet: no column `solution` (rollout.answer_key); the file has columns: prompt (Utf8), answer (Utf8)"),
        "{err}"
    );
    // A missing worker binary.
    let err = String::from_utf8_lossy(
        &launch(&f, &["launcher.worker_bin=/nonexistent/rlhf-worker"]).stderr,
    )
    .to_string();
    assert!(
        err.contains("worker binary not found at /nonexistent/rlhf-worker"),
        "{err}"
    );
    // More new tokens than the policy's context leaves after the longest prompt.
    let err =
        String::from_utf8_lossy(&launch(&f, &["rollout.max_new_tokens=100000"]).stderr).to_string();
    assert!(
        err.contains("rollout.max_new_tokens") && err.contains("more than the policy's context"),
        "{err}"
    );
    // A damaged weights file and an unsupported architecture, found before any worker starts.
    let copy = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(tmp.path().join("policy")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        dir
    };
    let damaged = copy("policy-damaged");
    let weights = damaged.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let err = String::from_utf8_lossy(
        &launch(&f, &[&format!("models.policy={}", damaged.display())]).stderr,
    )
    .to_string();
    assert!(
        err.contains("models.policy") && err.contains("truncated or damaged"),
        "{err}"
    );
    let gpt2 = copy("policy-gpt2");
    let config = std::fs::read_to_string(gpt2.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&config).unwrap();
    v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    v["model_type"] = serde_json::json!("gpt2");
    std::fs::write(gpt2.join("config.json"), v.to_string()).unwrap();
    let err = String::from_utf8_lossy(
        &launch(&f, &[&format!("models.policy={}", gpt2.display())]).stderr,
    )
    .to_string();
    assert!(
        err.contains("models.policy") && err.contains("gpt2"),
        "{err}"
    );
    // None of these bad inputs left a run directory behind.
    assert!(!tmp.path().join("runs").exists());
    // A worker that dies during start-up: its exit and log tail are reported.
    let script = tmp.path().join("dying-worker.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'cannot open device' >&2\nexit 3\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let out = launch(&f, &[&format!("launcher.worker_bin={}", script.display())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("exit code 3") && err.contains("cannot open device"),
        "{err}"
    );
    // A coordinator port in use.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let err = String::from_utf8_lossy(&launch(&f, &[&format!("launcher.port={port}")]).stderr)
        .to_string();
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")) && err.contains("in use"),
        "{err}"
    );
    drop(busy);
    // A missing model directory names the key and the line.
    let out = launch(&f, &["models.policy=/nonexistent/model"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("models.policy"), "{err}");
    assert!(metrics(tmp.path()).is_empty());
}
