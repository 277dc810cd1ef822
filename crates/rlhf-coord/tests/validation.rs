//! MT-Bench validation inside `rlhf-coord launch`, with real worker processes: the reward-model
//! judge over all 80 questions (both turns), checkpoints ranked by the score with the best one
//! protected from retention, `rlhf-coord status` showing the ranking, the scores in TensorBoard;
//! and an OpenAI-compatible judge server started by the test on loopback, which rates some
//! answers and returns garbage for others: the run goes on and the garbage is counted as missing.
//!
//! The MT-Bench files are read from `../shared/data/mt_bench` (never copied into the repo;
//! `RLHF_MT_BENCH_DIR` overrides the location); where they are absent (a fresh clone) the tests
//! run on `rlhf_eval::fixture`, 80 questions in MT-Bench's format and shape.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;

fn mt_bench_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("validation_mt_bench");
        rlhf_eval::fixture::shared_or_fixture(&scratch).unwrap()
    })
    .clone()
}

mod common;
use common::{
    assert_tensorboard_shows_the_metrics, coord, jsonl, read_tensorboard, tiny_model, worker_bin,
};

fn setup(dir: &Path, extra: &str) -> PathBuf {
    tiny_model(&dir.join("policy"));
    let mut prompts = String::new();
    for i in 0..8 {
        prompts.push_str(&format!("{{\"prompt\": \"Say something nice #{i}\"}}\n"));
    }
    std::fs::write(dir.join("prompts.jsonl"), prompts).unwrap();
    // A HelpSteer2-style multi-attribute reward model, trained for two steps from the policy on
    // a few synthetic ratings rows: its judgments mean little, but every part of the pipeline
    // (five heads, goodness weights, normalisation) is the real one.
    let mut rows = String::new();
    for i in 0..16 {
        let good = i % 5;
        let words: Vec<&str> = (0..6)
            .map(|j| if j < good { "good" } else { "the" })
            .collect();
        rows.push_str(&format!(
            "{{\"prompt\": \"Question {i}?\", \"response\": \"{}\", \"helpfulness\": {good}, \"correctness\": 2, \"coherence\": 3, \"complexity\": 1, \"verbosity\": 2}}\n",
            words.join(" ")
        ));
    }
    std::fs::write(dir.join("ratings.jsonl"), rows).unwrap();
    std::fs::write(
        dir.join("rm.yaml"),
        "run_dir: rm-run\nmodel: policy\nobjective: regression\n\
         data:\n  train:\n    path: ratings.jsonl\n\
         train:\n  batch_size: 8\n  micro_batch_size: 8\n  max_steps: 2\n",
    )
    .unwrap();
    let out = coord()
        .arg("train-rm")
        .arg(dir.join("rm.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let validation = if extra.contains("validation:") {
        String::new()
    } else {
        format!(
            "validation: {{every: 2, mt_bench: {}, max_new_tokens: 8, batch_size: 32}}\n",
            mt_bench_dir().display()
        )
    };
    let yaml = format!(
        "run: {{name: v, dir: runs, seed: 1}}\n\
         launcher: {{worker_bin: {}, startup_timeout_s: 60}}\n\
         workers:\n  - {{name: a, roles: [actor, reference]}}\n  - {{name: b, roles: [reward, critic]}}\n\
         models: {{policy: policy, reward: {{kind: model, path: rm-run/model}}}}\n\
         algorithm: {{name: rloo, kl: {{coef: 0.05}}}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 2, samples_per_prompt: 2, max_new_tokens: 4}}\n\
         train: {{steps: 4, micro_batch_size: 4}}\n\
         {validation}logging: {{progress: false, plot: false}}\n{extra}",
        worker_bin().display(),
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    f
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "launch failed:\n{err}");
    err
}

fn lines(p: &Path) -> Vec<serde_json::Value> {
    assert!(p.is_file(), "{} missing", p.display());
    jsonl(p)
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn reward_model_judge_scores_all_80_questions_and_ranks_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(
        tmp.path(),
        "checkpoint: {every: 0, keep_last: 1, keep_best: 1}\n",
    );
    let out = coord()
        .arg("launch")
        .arg(&f)
        .args(["--set", "validation.at_start=true"])
        .output()
        .unwrap();
    let log = ok(&out);
    let run = tmp.path().join("runs/v");
    let m = lines(&run.join("metrics.jsonl"));
    let row_of = |step: u64| m.iter().find(|r| r["step"] == step).unwrap().clone();
    // validation.at_start: the initial policy's score is step 0, the baseline.
    let baseline = json(&run.join("validation/step-000000/scores.json"));
    assert_eq!(
        row_of(0)["validation/mt_bench"].as_f64(),
        baseline["overall"].as_f64()
    );
    assert!(log.contains("MT-Bench of the initial policy"), "{log}");
    // TensorBoard holds the same scalars, the step-0 baseline and the validation keys included.
    let tb = read_tensorboard(&run);
    assert!(
        tb.scalars
            .iter()
            .any(|(_, tag, step, _)| tag == "validation/mt_bench" && *step == 0),
        "no step-0 validation in TensorBoard"
    );
    assert_tensorboard_shows_the_metrics(&tb, &run);
    // Log fields are plain values, not Rust debug forms.
    assert!(
        !log.contains("Some(") && !log.contains("RewardModel"),
        "{log}"
    );
    let mut scores = vec![];
    for step in [2u64, 4] {
        let dir = run.join(format!("validation/step-{step:06}"));
        let answers = lines(&dir.join("answers.jsonl"));
        assert_eq!(answers.len(), 80);
        let judgments = lines(&dir.join("judgments.jsonl"));
        assert_eq!(judgments.len(), 160);
        for j in &judgments {
            let r = j["rating"]
                .as_f64()
                .unwrap_or_else(|| panic!("unrated: {j}"));
            assert!((1.0..=10.0).contains(&r), "{j}");
        }
        let s = json(&dir.join("scores.json"));
        let overall = s["overall"].as_f64().unwrap();
        let mean: f64 = judgments
            .iter()
            .map(|j| j["rating"].as_f64().unwrap())
            .sum::<f64>()
            / 160.0;
        assert!((overall - mean).abs() < 1e-9, "{overall} vs {mean}");
        assert_eq!(s["per_category"].as_object().unwrap().len(), 8, "{s}");
        assert!(s["truncated_prompts"].is_u64(), "{s}");
        let row = &row_of(step);
        assert_eq!(row["validation/mt_bench"].as_f64(), Some(overall), "{row}");
        assert!(row["validation/writing"].is_number(), "{row}");
        scores.push((step, overall));
    }
    // The ranking: both validated checkpoints, best first; retention (keep_last 1) kept the
    // newest for resume and the best (protected) one.
    let ranking = json(&run.join("checkpoints/ranking.json"));
    let entries = ranking["entries"].as_array().unwrap();
    scores.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let steps: Vec<u64> = entries
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = scores.iter().map(|s| s.0).collect();
    let kept_best = format!("step-{:06}", want[0]);
    assert_eq!(ranking["best"], kept_best.as_str());
    let ck = run.join("checkpoints");
    assert!(ck.join(&kept_best).join("PROTECTED").exists());
    assert!(ck.join("step-000004").is_dir(), "the newest is kept");
    assert_eq!(steps, want);

    let st = coord().arg("status").arg(&run).output().unwrap();
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(st.status.success());
    assert!(text.contains("step 4/4 (100.0%)"), "{text}");
    assert!(text.contains(&format!("best: {kept_best}")), "{text}");
    assert!(text.contains(&format!("     1  {kept_best}")), "{text}");
    assert!(text.contains("cut prompts"), "{text}");
    assert!(text.contains("state       finished"), "{text}");
}

/// A minimal OpenAI-compatible chat-completions server: rates first-turn prompts `[[7]]` and
/// answers second-turn prompts (FastChat's multi-turn templates mention "<|The Start of
/// Assistant A's Conversation with User|>") with text that has no rating. Returns its base URL.
fn judge_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut len = 0usize;
                let mut line = String::new();
                let mut first = true;
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if first {
                        assert!(line.starts_with("POST /v1/chat/completions"), "{line}");
                        first = false;
                    }
                    let l = line.to_ascii_lowercase();
                    if let Some(v) = l.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).unwrap();
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let text = req["messages"].to_string();
                let content = if text.contains("Conversation with User") {
                    "I cannot decide."
                } else {
                    "The answer is short. Rating: [[7]]"
                };
                let resp = serde_json::json!({
                    "id": "x", "object": "chat.completion", "model": req["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}]
                })
                .to_string();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{resp}",
                    resp.len()
                );
            });
        }
    });
    url
}

#[test]
fn http_judge_on_loopback_with_unparseable_judgments() {
    let tmp = tempfile::tempdir().unwrap();
    let url = judge_server();
    let f = setup(
        tmp.path(),
        &format!(
            "validation: {{every: 2, mt_bench: {}, max_new_tokens: 4, max_questions: 10, judge: http, http: {{url: \"{url}\", model: judge, api_key_env: \"\", timeout_s: 10}}}}\n",
            mt_bench_dir().display()
        ),
    );
    let out = coord()
        .arg("launch")
        .arg(&f)
        .args(["--set", "train.steps=2"])
        .output()
        .unwrap();
    let err = ok(&out);
    assert!(err.contains("MT-Bench"), "{err}");
    let run = tmp.path().join("runs/v");
    let s = json(&run.join("validation/step-000002/scores.json"));
    assert_eq!(s["overall"].as_f64(), Some(7.0), "{s}");
    assert_eq!(s["turn1"].as_f64(), Some(7.0), "{s}");
    assert!(s["turn2"].is_null(), "{s}");
    assert_eq!(s["missing"].as_u64(), Some(10), "{s}");
    assert_eq!(s["unparseable"].as_u64(), Some(10), "{s}");
    let ranking = json(&run.join("checkpoints/ranking.json"));
    assert_eq!(ranking["entries"][0]["score"].as_f64(), Some(7.0));
    assert!(ranking["entries"][0]["judge"]
        .as_str()
        .unwrap()
        .contains("judge"));

    // Nobody listening: every judgment fails, the score is missing, and the run still finishes.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        format!("http://{a}/v1")
    };
    let out = coord()
        .arg("launch")
        .arg(&f)
        .args([
            "--set",
            "train.steps=4",
            "--set",
            &format!("validation.http.url={dead}"),
        ])
        .output()
        .unwrap();
    let err = ok(&out);
    assert!(err.contains("no rating"), "{err}");
    let s = json(&run.join("validation/step-000004/scores.json"));
    assert!(s["overall"].is_null(), "{s}");
    assert_eq!(s["missing"].as_u64(), Some(20), "{s}");
    let ranking = json(&run.join("checkpoints/ranking.json"));
    let last = ranking["entries"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["step"].as_u64(), Some(4));
    assert!(last["score"].is_null());
    assert_eq!(ranking["best"], "step-000002");
}
