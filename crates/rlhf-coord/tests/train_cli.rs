//! The reward-model and SFT subcommands end to end: `train-rm` (regression, then scaled
//! Bradley-Terry initialised from its helpfulness head, on HelpSteer2 and HelpSteer2-Preference
//! files incl. gzip and multi-turn prompts), `score`, `eval-rm`, `derive-pairs` + Bradley-Terry,
//! `sft`; bad rows (fail naming file:line and the command's own way to skip, skip with counts);
//! job-file errors naming key and line; `--stop-after` then resume; `eval-rm` on what
//! `derive-pairs` writes; the best checkpoint printed and an early stop named in the log.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf-coord"));
    c.env("RLHF_LOG", "warn");
    c
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "rlhf-coord failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "rlhf-coord succeeded unexpectedly");
    String::from_utf8(out.stderr).unwrap()
}

fn init(dir: &Path) {
    ok(bin()
        .args(["init-model", "--arch", "llama", "--preset", "tiny", "--out"])
        .arg(dir)
        .output()
        .unwrap());
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn write_gz(path: &Path, rows: &[Value]) {
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    for r in rows {
        writeln!(gz, "{r}").unwrap();
    }
    gz.finish().unwrap();
}

const MULTI_TURN: &str =
    "Hi there.\n<extra_id_1>Assistant\nHello, the model is here.\n<extra_id_1>User\nSay something.";

/// HelpSteer2 ratings rows in the published schema; every third prompt is multi-turn.
fn ratings(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let good = i % 5;
            let words: Vec<&str> = (0..6).map(|j| if j < good { "good" } else { "the" }).collect();
            json!({
                "prompt": if i % 3 == 0 { MULTI_TURN.to_string() } else { format!("Question {}?", i % 4) },
                "response": words.join(" "),
                "helpfulness": good, "correctness": 2, "coherence": 4 - good % 2,
                "complexity": 1, "verbosity": 3,
            })
        })
        .collect()
}

fn preferences(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "split": if i % 4 == 3 { "validation" } else { "train" },
                "prompt": if i % 2 == 0 { MULTI_TURN } else { "Say something." },
                "response_1": "good good the", "response_2": "the the the",
                "preference_strength": if i % 5 == 4 { 0 } else { -1 - (i as i64 % 3) },
                "preference_statement": "@Response 1 is better.", "preference_elaboration": "x",
                "three_most_similar_preferences": [], "all_preferences_unprocessed": [],
            })
        })
        .collect()
}

#[test]
fn train_rm_score_eval_and_scaled_bt_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    init(&d.join("base"));
    write_gz(&d.join("ratings.jsonl.gz"), &ratings(24));
    // Relative paths resolve against the job file's directory.
    std::fs::write(
        d.join("reg.yaml"),
        "run_dir: runs/reg\nmodel: base\nobjective: regression\n\
         data:\n  train:\n    path: ratings.jsonl.gz\n\
         train:\n  batch_size: 8\n  micro_batch_size: 4\n  max_steps: 3\n\
         optim:\n  lr: 0.001\n",
    )
    .unwrap();
    let out = ok(bin()
        .arg("train-rm")
        .arg(d.join("reg.yaml"))
        .arg("--json")
        .output()
        .unwrap());
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["steps"], 3);
    assert_eq!(report["data"][0]["used"], 24);
    let model = d.join("runs/reg/model");
    let spec: Value =
        serde_json::from_slice(&std::fs::read(model.join("rlhf_reward.json")).unwrap()).unwrap();
    assert_eq!(spec["head"], "regression");
    assert_eq!(spec["attributes"].as_array().unwrap().len(), 5);
    assert_eq!(spec["goodness_weights"]["correctness"], 0.8);
    assert!(d.join("runs/reg/config.resolved.yaml").exists());
    assert!(d
        .join("runs/reg/checkpoints/step-000003/manifest.json")
        .exists());

    // score: per-row reward = (goodness - mean) / std, with the attribute outputs.
    let plain_rows = d.join("rows.jsonl");
    write_jsonl(&plain_rows, &ratings(4));
    let out = ok(bin()
        .arg("score")
        .arg(&model)
        .arg("--data")
        .arg(&plain_rows)
        .arg("--json")
        .output()
        .unwrap());
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    let (mean, std) = (
        spec["mean"].as_f64().unwrap(),
        spec["std"].as_f64().unwrap(),
    );
    for r in &rows {
        let a = &r["attributes"];
        let g = 0.65 * a["helpfulness"].as_f64().unwrap()
            + 0.8 * a["correctness"].as_f64().unwrap()
            + 0.45 * a["coherence"].as_f64().unwrap();
        let reward = r["reward"].as_f64().unwrap();
        assert!(((g - mean) / std - reward).abs() < 1e-9, "{r}");
    }
    assert_eq!(rows[1]["line"], 2);

    // eval-rm on RewardBench rows, with the published category map.
    let bench = d.join("bench.jsonl");
    let bench_rows: Vec<Value> = ["alpacaeval-easy", "mt-bench-hard", "math-prm", "hep-go", "custom"]
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"prompt": "Say something.", "chosen": "good good good", "rejected": "the", "subset": s, "id": i}))
        .collect();
    write_jsonl(&bench, &bench_rows);
    let out = ok(bin()
        .arg("eval-rm")
        .arg(&model)
        .arg(&bench)
        .arg("--json")
        .output()
        .unwrap());
    let r: Value = serde_json::from_str(&out).unwrap();
    let cats = r["categories"].as_object().unwrap();
    assert_eq!(cats.len(), 3, "{r}");
    assert_eq!(r["unmapped"], json!(["custom"]));
    let mean_cats = cats.values().map(|v| v.as_f64().unwrap()).sum::<f64>() / 3.0;
    assert!((r["overall"].as_f64().unwrap() - mean_cats).abs() < 1e-12);
    let table = ok(bin()
        .arg("eval-rm")
        .arg(&model)
        .arg(&bench)
        .output()
        .unwrap());
    assert!(
        table.contains("| Chat Hard |") && table.contains("overall"),
        "{table}"
    );

    // Scaled Bradley-Terry on HelpSteer2-Preference (train split), initialised from the
    // regression model's helpfulness head; ties and the validation split are counted.
    write_gz(&d.join("prefs.jsonl.gz"), &preferences(20));
    std::fs::write(
        d.join("sbt.yaml"),
        "run_dir: runs/sbt\nmodel: runs/reg/model\nobjective: scaled_bradley_terry\n\
         bradley_terry:\n  init_from_attribute: helpfulness\n\
         data:\n  train:\n    path: prefs.jsonl.gz\n    split: train\n\
         train:\n  batch_size: 4\n  micro_batch_size: 2\n  max_steps: 2\n",
    )
    .unwrap();
    let out = ok(bin()
        .arg("train-rm")
        .arg(d.join("sbt.yaml"))
        .arg("--json")
        .output()
        .unwrap());
    let report: Value = serde_json::from_str(&out).unwrap();
    let stats = &report["data"][0];
    assert_eq!(stats["rows"], 20);
    assert_eq!(stats["filtered"]["another split"], 5);
    assert_eq!(stats["filtered"]["tie (preference_strength 0)"], 3);
    assert_eq!(stats["used"], 12);
    assert_eq!(report["reward_spec"]["head"], "bradley_terry");
}

#[test]
fn bad_rows_fail_naming_file_and_line_or_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    init(&d.join("base"));
    let mut rows = ratings(6);
    rows[2]["helpfulness"] = json!(7);
    rows[4].as_object_mut().unwrap().remove("verbosity");
    let mut text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    text.push_str("{not json\n");
    std::fs::write(d.join("ratings.jsonl"), text).unwrap();
    let job = d.join("job.yaml");
    std::fs::write(
        &job,
        "run_dir: run\nmodel: base\nobjective: regression\n\
         data:\n  train:\n    path: ratings.jsonl\n\
         train:\n  batch_size: 2\n  micro_batch_size: 2\n  max_steps: 1\n",
    )
    .unwrap();
    let err = fails(bin().arg("train-rm").arg(&job).output().unwrap());
    assert!(
        err.contains("ratings.jsonl:3:")
            && err.contains("`helpfulness` = 7")
            && err.contains("outside 0..4"),
        "{err}"
    );
    // A job's hint names its job-file key, not the other commands' flag.
    assert!(
        err.contains("`data.on_bad_row: skip`") && !err.contains("--on-bad-row"),
        "{err}"
    );
    let out = ok(bin()
        .arg("train-rm")
        .arg(&job)
        .args(["--set", "data.on_bad_row=skip"])
        .output()
        .unwrap());
    assert!(out.contains("7 rows, 4 used, 3 bad rows skipped"), "{out}");

    // The same policy for `score`.
    let err = fails(
        bin()
            .arg("score")
            .arg(d.join("run/model"))
            .arg("--data")
            .arg(d.join("ratings.jsonl"))
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("ratings.jsonl:7:") && err.contains("not JSON"),
        "{err}"
    );
    // The hint names the flag this command takes, not the job files' key.
    assert!(
        err.contains("rerun with `--on-bad-row skip`") && !err.contains("data.on_bad_row"),
        "{err}"
    );
}

#[test]
fn job_file_errors_name_key_and_line() {
    // A missing job file: the OS error is said once, not once per layer of the error chain.
    let msg = fails(
        bin()
            .arg("train-rm")
            .arg("/nonexistent/job.yaml")
            .output()
            .unwrap(),
    );
    assert!(msg.contains("/nonexistent/job.yaml"), "{msg}");
    assert_eq!(msg.matches("os error 2").count(), 1, "{msg}");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("base")).unwrap();
    std::fs::write(d.join("t.jsonl"), "").unwrap();
    let job = d.join("job.yaml");
    let base =
        "run_dir: run\nmodel: base\nobjective: regression\ndata:\n  train:\n    path: t.jsonl\n";
    std::fs::write(&job, format!("{base}train:\n  batch_size: 0\n")).unwrap();
    let err = fails(bin().arg("train-rm").arg(&job).output().unwrap());
    assert!(
        err.contains("train.batch_size") && err.contains("job.yaml:8"),
        "{err}"
    );
    std::fs::write(&job, format!("{base}trian:\n  steps: 1\n")).unwrap();
    let err = fails(bin().arg("train-rm").arg(&job).output().unwrap());
    assert!(err.contains("trian"), "{err}");
    std::fs::write(
        &job,
        "run_dir: run\nmodel: base\ndata:\n  train:\n    path: t.jsonl\n",
    )
    .unwrap();
    let err = fails(bin().arg("train-rm").arg(&job).output().unwrap());
    assert!(err.contains("objective"), "{err}");
    std::fs::write(&job, base).unwrap();
    let err = fails(
        bin()
            .arg("train-rm")
            .arg(&job)
            .args(["--set", "regression.attributes=[verbosity]"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("regression.goodness_weights"), "{err}");
    let err = fails(
        bin()
            .arg("train-rm")
            .arg(&job)
            .args(["--set", "train.micro_batch_size=0"])
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("train.micro_batch_size") && err.contains("from --set"),
        "{err}"
    );
}

#[test]
fn derive_pairs_bt_sft_and_stop_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    init(&d.join("base"));
    write_jsonl(&d.join("ratings.jsonl"), &ratings(20));
    // A bare file name, as a user types it: written into the working directory (it once wrote
    // the file, then failed fsyncing the parent directory "").
    let out = ok(bin()
        .current_dir(d)
        .arg("derive-pairs")
        .arg(d.join("ratings.jsonl"))
        .arg("--out")
        .arg("pairs.jsonl")
        .output()
        .unwrap());
    assert!(out.contains("pairs written"), "{out}");
    let pairs: Vec<Value> = std::fs::read_to_string(d.join("pairs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!pairs.is_empty());
    for p in &pairs {
        assert!(
            p["chosen_helpfulness"].as_f64() > p["rejected_helpfulness"].as_f64(),
            "{p}"
        );
    }

    let job = d.join("bt.yaml");
    std::fs::write(
        &job,
        "run_dir: run\nmodel: base\nobjective: bradley_terry\nbradley_terry:\n  margin: 0.5\n\
         data:\n  train:\n    path: pairs.jsonl\n\
         train:\n  batch_size: 2\n  micro_batch_size: 1\n  max_steps: 3\n",
    )
    .unwrap();
    let out = ok(bin()
        .arg("train-rm")
        .arg(&job)
        .args(["--stop-after", "1"])
        .output()
        .unwrap());
    assert!(out.contains("stopped after step 1"), "{out}");
    let out = ok(bin()
        .arg("train-rm")
        .arg(&job)
        .arg("--resume")
        .output()
        .unwrap());
    assert!(
        out.contains("resumed from step 1") && out.contains("trained 3 steps"),
        "{out}"
    );
    // eval-rm reads the pair file as derive-pairs wrote it (no `subset`): one subset, `all`.
    let out = ok(bin()
        .arg("eval-rm")
        .arg(d.join("run/model"))
        .arg(d.join("pairs.jsonl"))
        .arg("--json")
        .output()
        .unwrap());
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["subsets"]["all"]["rows"], pairs.len(), "{r}");
    assert_eq!(r["unmapped"], json!(["all"]));

    // SFT on chat rows (messages, and HelpSteer2 prompt + response with turns).
    let chat = d.join("chat.jsonl");
    write_jsonl(
        &chat,
        &[
            json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "good day"}]}),
            json!({"prompt": MULTI_TURN, "response": "the model is good"}),
            json!({"prompt": "Say something.", "response": "good"}),
        ],
    );
    std::fs::write(
        d.join("sft.yaml"),
        "run_dir: sft\nmodel: base\ndata:\n  train:\n    path: chat.jsonl\n\
         train:\n  batch_size: 2\n  micro_batch_size: 2\n  epochs: 2\n",
    )
    .unwrap();
    let out = ok(bin()
        .arg("sft")
        .arg(d.join("sft.yaml"))
        .args(["--set", "optim.lr=0.001"])
        .output()
        .unwrap());
    assert!(out.contains("trained 4 steps"), "{out}");
    assert!(d.join("sft/model/tokenizer.json").exists());
    ok(bin()
        .arg("generate")
        .arg(d.join("sft/model"))
        .args([
            "--prompt",
            "Hi",
            "--chat",
            "--greedy",
            "--max-new-tokens",
            "3",
        ])
        .output()
        .unwrap());
}

#[test]
fn sigusr1_checkpoints_then_stops() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    init(&d.join("base"));
    write_jsonl(&d.join("ratings.jsonl"), &ratings(8));
    let job = d.join("job.yaml");
    std::fs::write(
        &job,
        "run_dir: run\nmodel: base\nobjective: regression\n\
         data:\n  train:\n    path: ratings.jsonl\n\
         train:\n  batch_size: 2\n  micro_batch_size: 2\n  max_steps: 1000000\n  log_every: 1\n",
    )
    .unwrap();
    let mut child = bin()
        .arg("train-rm")
        .arg(&job)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = d.join("run/metrics.jsonl");
    let start = Instant::now();
    while !std::fs::read_to_string(&metrics).is_ok_and(|m| m.lines().count() >= 2) {
        assert!(child.try_wait().unwrap().is_none(), "train-rm exited early");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no training progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-USR1", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("train-rm did not stop after SIGUSR1");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = ok(child.wait_with_output().unwrap());
    assert!(out.contains("stopped after step"), "{out}");
    let latest = std::fs::read_to_string(d.join("run/checkpoints/LATEST")).unwrap();
    let step: u64 = latest.trim().trim_start_matches("step-").parse().unwrap();
    assert!(
        out.contains(&format!("stopped after step {step};")),
        "{out} vs {latest}"
    );
}

#[test]
fn early_stop_is_logged_and_the_best_checkpoint_printed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    init(&d.join("base"));
    // Preferences between random filler answers, held out reversed: every step of memorising
    // the training pairs makes held-out accuracy worse.
    let words = [
        "the", "sea", "model", "small", "travel", "square", "token", "data",
    ];
    let answer = |i: usize, salt: usize| -> String {
        (0..6)
            .map(|j| words[(i * 7 + j * 3 + salt * 5 + i * j) % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let rows = |swap: bool| -> Vec<Value> {
        (0..16)
            .map(|i| {
                let (a, b) = (answer(i, 1), answer(i, 2));
                let (c, r) = if swap { (b, a) } else { (a, b) };
                json!({"prompt": format!("Question {}?", i % 4), "chosen": c, "rejected": r})
            })
            .collect()
    };
    write_jsonl(&d.join("train.jsonl"), &rows(false));
    write_jsonl(&d.join("held_out.jsonl"), &rows(true));
    let job = d.join("bt.yaml");
    std::fs::write(
        &job,
        "run_dir: run\nmodel: base\nobjective: bradley_terry\n\
         data:\n  train:\n    path: train.jsonl\n  eval:\n    path: held_out.jsonl\n\
         train:\n  batch_size: 8\n  micro_batch_size: 8\n  epochs: 6\n  eval_every: 1\n\
         \x20 early_stop:\n    patience: 1\n\
         optim:\n  lr: 0.002\n\
         checkpoint:\n  keep_last: 1\n",
    )
    .unwrap();
    let out = bin().arg("train-rm").arg(&job).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = ok(out);
    assert!(
        stderr.contains("early stop: held-out accuracy has not got higher")
            && stderr.contains("train.early_stop.patience 1"),
        "the log does not say why it stopped:\n{stderr}"
    );
    let ranking: Value =
        serde_json::from_slice(&std::fs::read(d.join("run/checkpoints/ranking.json")).unwrap())
            .unwrap();
    let best = ranking["best"].as_str().unwrap();
    let step: u64 = best.trim_start_matches("step-").parse().unwrap();
    assert!(
        stdout.contains("stopped before the last step: early stop")
            && stdout.contains(&format!("best checkpoint: step {step} (held-out accuracy"))
            && stdout.contains(&format!("checkpoints/{best}")),
        "{stdout}"
    );
    assert!(d
        .join("run/checkpoints")
        .join(best)
        .join("model/model.safetensors")
        .exists());
    let trained: u64 = stdout
        .split("trained ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(trained < 12, "no early stop: {stdout}");
}
