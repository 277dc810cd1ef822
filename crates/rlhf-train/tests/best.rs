//! The best checkpoint by the held-out metric and early stop, on jobs that overfit on purpose:
//! the held-out pairs are the training pairs with chosen and rejected swapped, so every step that
//! fits the training set makes held-out accuracy worse (the issue's "0.650 after epoch 1, 0.573 at
//! the end", made certain). The best evaluation's checkpoint survives `keep_last: 1`, is named by
//! `checkpoints/ranking.json`, is what the job exports, and scores what the ranking says; with
//! `train.early_stop` the job stops before its last step and says why; SFT ranks by held-out NLL.

mod common;

use std::path::Path;

use common::*;
use rlhf_train::{
    eval_reward_bench, train_reward_model, train_sft, CategoryMap, JobControl, OnBadRow,
    RewardModel,
};
use serde_json::{json, Value};

/// Pairwise rows of random filler responses (a preference to memorise, nothing to learn);
/// `swap` gives the opposite preferences.
fn pairs(n: usize, seed: u64, swap: bool) -> Vec<Value> {
    let mut r = rng(seed);
    (0..n)
        .map(|i| {
            let better = response(&mut r, 6, 0, false);
            let worse = response(&mut r, 6, 0, false);
            let (c, rj) = if swap {
                (worse, better)
            } else {
                (better, worse)
            };
            json!({"prompt": format!("Question {}?", i % 4), "chosen": c, "rejected": rj})
        })
        .collect()
}

/// `(step, eval)` of every evaluation in `metrics.jsonl`.
fn evals(run: &Path) -> Vec<(u64, Value)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("eval").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["eval"].clone()))
        .collect()
}

/// The step of the highest accuracy among `evals`, ties to the earlier step.
fn argmax(evals: &[(u64, Value)]) -> (u64, f64) {
    let mut best = (0, f64::NEG_INFINITY);
    for (s, e) in evals {
        let a = e["accuracy"].as_f64().unwrap();
        if a > best.1 {
            best = (*s, a);
        }
    }
    best
}

fn ranking(run: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(run.join("checkpoints/ranking.json")).unwrap()).unwrap()
}

#[test]
fn overfitting_reward_model_keeps_exports_and_stops_on_its_best_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("base"), 5);
    let train = tmp.path().join("train.jsonl");
    let held_out = tmp.path().join("held_out.jsonl");
    write_jsonl(&train, &pairs(16, 1, false));
    write_jsonl(&held_out, &pairs(16, 1, true));
    let cfg = |run: &str| {
        let mut c = rm_config(
            &tmp.path().join(run),
            &model,
            "bradley_terry",
            &train,
            Some(&held_out),
        );
        // 2 steps per epoch, 6 epochs, an evaluation per step, a high learning rate.
        c.train.batch_size = 8;
        c.train.micro_batch_size = 8;
        c.train.epochs = 6;
        c.train.eval_every = Some(1);
        c.optim.lr = 2e-3;
        c.checkpoint.keep_last = 1;
        c
    };

    let full = cfg("full");
    let report = train_reward_model(&full, &JobControl::default()).unwrap();
    assert!(report.finished && report.steps == 12 && report.early_stop.is_none());
    let evs = evals(&full.run_dir);
    assert_eq!(evs.len(), 12, "one evaluation per step: {evs:?}");
    let (best_step, best_acc) = argmax(&evs);
    let last_acc = evs.last().unwrap().1["accuracy"].as_f64().unwrap();
    assert!(
        best_step < 12 && best_acc > last_acc,
        "the held-out set contradicts the training set, so accuracy must fall: {evs:?}"
    );
    // The ranking names the best evaluation, whose checkpoint survived keep_last: 1.
    let r = ranking(&full.run_dir);
    assert_eq!(r["metric"], "accuracy");
    assert_eq!(r["best"], rlhf_ckpt::dir_name(best_step));
    assert_eq!(r["entries"][0]["score"].as_f64(), Some(best_acc));
    let kept: Vec<u64> = rlhf_ckpt::list(&full.run_dir)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, [best_step, 12], "the best and the newest are kept");
    let best_dir = full
        .run_dir
        .join("checkpoints")
        .join(rlhf_ckpt::dir_name(best_step));
    assert!(rlhf_ckpt::is_protected(&best_dir));
    let b = report.best.as_ref().unwrap();
    assert_eq!(
        (b.step, b.value, b.checkpoint.as_path()),
        (best_step, best_acc, best_dir.as_path())
    );

    // The export is the best checkpoint's weights, and it scores what the ranking says, read as
    // eval-rm reads a pair file without `subset`.
    assert_eq!(report.output_step, Some(best_step));
    assert_eq!(
        report.eval.as_ref().unwrap()["accuracy"].as_f64(),
        Some(best_acc)
    );
    let out = full.output_dir();
    assert!(
        std::fs::read(out.join("model.safetensors")).unwrap()
            == std::fs::read(best_dir.join("model/model.safetensors")).unwrap(),
        "the exported weights are not the best checkpoint's"
    );
    let rm = RewardModel::load(&out, tch::Device::Cpu).unwrap();
    let bench =
        eval_reward_bench(&rm, &held_out, OnBadRow::Fail, &CategoryMap::default(), 8).unwrap();
    assert_eq!(bench.subsets["all"].rows, 16);
    assert_eq!(bench.subsets["all"].accuracy, best_acc);

    // With early stop the job ends after `patience` evaluations without improvement, saying so.
    let mut stopping = cfg("stopping");
    stopping.train.early_stop = Some(rlhf_train::config::EarlyStopConfig {
        patience: 2,
        min_delta: 0.0,
    });
    let report = train_reward_model(&stopping, &JobControl::default()).unwrap();
    assert!(report.finished && report.steps < 12, "{report:?}");
    let why = report.early_stop.clone().unwrap();
    assert!(
        why.contains("early stop") && why.contains("patience 2") && why.contains("accuracy"),
        "{why}"
    );
    let evs = evals(&stopping.run_dir);
    let (best_step, best_acc) = argmax(&evs);
    assert_eq!(evs.last().unwrap().0, report.steps);
    assert_eq!(
        evs.iter().filter(|(s, _)| *s > best_step).count(),
        2,
        "stopped at the second evaluation after the best: {evs:?}"
    );
    assert_eq!(
        ranking(&stopping.run_dir)["best"],
        rlhf_ckpt::dir_name(best_step)
    );
    assert_eq!(report.best.as_ref().unwrap().value, best_acc);
    // Run again, it trains nothing more: the stop is part of the checkpoint.
    let again = train_reward_model(&stopping, &JobControl::default()).unwrap();
    assert_eq!(
        (again.steps, again.resumed_from),
        (report.steps, Some(report.steps))
    );
    assert!(again.early_stop.is_some() && again.output_step == Some(best_step));
}

#[test]
fn sft_ranks_checkpoints_by_held_out_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("base"), 6);
    let chat = |user: &str, reply: &str| {
        json!({"messages": [{"role": "user", "content": user},
                            {"role": "assistant", "content": reply}]})
    };
    let train = tmp.path().join("train.jsonl");
    let held_out = tmp.path().join("held_out.jsonl");
    write_jsonl(
        &train,
        &[chat("Hi", "good day"), chat("Say something.", "the sea")],
    );
    write_jsonl(
        &held_out,
        &[chat("Hi", "the model"), chat("Say something.", "small")],
    );
    let mut cfg = sft_config(&tmp.path().join("run"), &model, &train);
    cfg.data.eval = Some(rlhf_train::config::DataSource {
        path: held_out,
        ..Default::default()
    });
    cfg.train.batch_size = 2;
    cfg.train.epochs = 6;
    cfg.train.eval_every = Some(2);
    cfg.checkpoint.keep_last = 1;
    cfg.checkpoint.export = rlhf_train::config::ExportChoice::Last;
    let report = train_sft(&cfg, &JobControl::default()).unwrap();
    let evs = evals(&cfg.run_dir);
    assert_eq!(evs.len(), 3);
    let best = evs
        .iter()
        .min_by(|a, b| {
            a.1["nll"]
                .as_f64()
                .unwrap()
                .total_cmp(&b.1["nll"].as_f64().unwrap())
        })
        .unwrap();
    let r = ranking(&cfg.run_dir);
    assert_eq!(
        (r["metric"].as_str(), r["higher_is_better"].as_bool()),
        (Some("nll"), Some(false))
    );
    assert_eq!(r["best"], rlhf_ckpt::dir_name(best.0));
    assert_eq!(report.best.as_ref().unwrap().step, best.0);
    // `export: last` writes the last step's weights, still keeping the best checkpoint.
    assert_eq!(report.output_step, Some(6));
    assert!(cfg
        .run_dir
        .join("checkpoints")
        .join(rlhf_ckpt::dir_name(best.0))
        .join("model/model.safetensors")
        .exists());
}
