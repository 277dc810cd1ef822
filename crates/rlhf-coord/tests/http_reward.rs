//! `rlhf-coord launch` with `models.reward.kind: http` against scripts/reward_server_example.py
//! started by the test on loopback: a GRPO run scores every response through the server (the
//! prompt rows' other columns reach it; its components land in metrics.jsonl as
//! `attribute/...`); with the server gone the next step stops the run naming the URL, the last
//! checkpoint intact and nothing half-written; with a server back the run resumes and finishes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

mod common;
use common::{jsonl, launch, python, repo, tiny_model, worker_bin};

/// The example server, killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// scripts/reward_server_example.py on `port` (0: a free one), logging the rows it receives to
/// `log`.
fn start_server(port: u16, log: &Path) -> Server {
    let mut child = Command::new(python())
        .arg(repo().join("scripts/reward_server_example.py"))
        .args(["--port", &port.to_string(), "--log"])
        .arg(log)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("the server said {line:?}"))
        .trim();
    Server {
        url: format!("{base}score"),
        child,
    }
}

/// A tiny policy, four sums with their answers and two more columns, and a GRPO run file with
/// colocated roles and a checkpoint every step.
fn setup(dir: &Path, url: &str) -> PathBuf {
    tiny_model(&dir.join("policy"));
    let mut rows = String::new();
    for (a, b) in [(1, 2), (3, 4), (2, 2), (5, 1)] {
        rows.push_str(&format!(
            "{{\"prompt\": \"{a}+{b}=\", \"answer\": \"{}\", \"max_chars\": 3, \"source\": \"sum-{a}-{b}\"}}\n",
            a + b
        ));
    }
    std::fs::write(dir.join("prompts.jsonl"), rows).unwrap();
    let yaml = format!(
        "run: {{name: t, dir: runs, seed: 3}}\n\
         launcher: {{worker_bin: {}, startup_timeout_s: 60}}\n\
         workers:\n  - {{name: all, roles: [actor, reward, reference]}}\n\
         models:\n  policy: policy\n  reward: {{kind: http, url: \"{url}\", retries: 1, timeout_s: 5}}\n\
         algorithm: {{name: grpo}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 6}}\n\
         train: {{steps: 2, micro_batch_size: 8, actor: {{lr: 1.0e-3}}}}\n\
         checkpoint: {{every: 1}}\n\
         logging: {{progress: false, plot: false}}\n",
        worker_bin().display()
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    f
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn checkpoints(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("runs/t/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn grpo_scores_through_the_reward_server_and_stops_cleanly_when_it_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("received.jsonl");
    let server = start_server(0, &log);
    let f = setup(tmp.path(), &server.url);
    let out = launch(&f, &[]);
    assert!(out.status.success(), "launch failed:\n{}", stderr(&out));

    // Every response of both steps reached the server with its prompt row's columns: 4 prompts
    // x 2 samples per step, one request each (batch_size 64).
    let received = jsonl(&log);
    assert_eq!(received.len(), 16, "{received:?}");
    for row in &received {
        let prompt = row["prompt"].as_str().unwrap();
        let (a, b) = prompt.trim_end_matches('=').split_once('+').unwrap();
        assert_eq!(row["extra"]["source"], format!("sum-{a}-{b}"), "{row}");
        assert_eq!(row["extra"]["max_chars"], 3, "{row}");
        let sum: u32 = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
        assert_eq!(row["answer"], sum.to_string(), "{row}");
        assert!(row["response"].is_string(), "{row}");
    }
    // The server's components, averaged over each step's rows, are the step's attributes.
    let metrics = jsonl(&tmp.path().join("runs/t/metrics.jsonl"));
    assert_eq!(metrics.len(), 2);
    for (step, m) in metrics.iter().enumerate() {
        let rows = &received[step * 8..(step + 1) * 8];
        let penalty: f64 = rows
            .iter()
            .map(|r| {
                -0.001 * (r["response"].as_str().unwrap().chars().count() as f64 - 3.0).max(0.0)
            })
            .sum::<f64>()
            / 8.0;
        let got = m["attribute/length_penalty"].as_f64().unwrap();
        assert!(
            (got - penalty).abs() < 1e-5,
            "step {}: {got} != {penalty}: {m}",
            step + 1
        );
        let correct = m["attribute/correct"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&correct), "{m}");
        assert!(
            m["reward_mean"].is_number() && m["actor/pg_loss"].is_number(),
            "{m}"
        );
    }
    assert!(checkpoints(tmp.path()).contains(&"step-000002".to_string()));

    // The server gone: step 3 fails after its retry, naming the URL and the rows; step 2's
    // checkpoint stays the latest and nothing of step 3 is left half-written.
    let url = server.url.clone();
    drop(server);
    let out = launch(&f, &["train.steps=3"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "models.reward.kind http: POST {url} (rows 0 to 7) failed after 2 attempts"
        )) && err.contains("Score")
            && err.contains("step 3: scoring failed"),
        "{err}"
    );
    let names = checkpoints(tmp.path());
    assert!(
        !names
            .iter()
            .any(|n| n.contains("tmp") || n == "step-000003"),
        "{names:?}"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("runs/t/checkpoints/LATEST"))
            .unwrap()
            .trim(),
        "step-000002"
    );
    assert_eq!(jsonl(&tmp.path().join("runs/t/metrics.jsonl")).len(), 2);

    // The server back at its address (a different URL is a different reward, which a resume
    // refuses): the run resumes from step 2 and finishes.
    let port = url.rsplit(':').next().unwrap().trim_end_matches("/score");
    let _server = start_server(port.parse().unwrap(), &log);
    let out = launch(&f, &["train.steps=3"]);
    assert!(out.status.success(), "launch failed:\n{}", stderr(&out));
    assert_eq!(jsonl(&tmp.path().join("runs/t/metrics.jsonl")).len(), 3);
    assert_eq!(jsonl(&log).len(), 24);
}
