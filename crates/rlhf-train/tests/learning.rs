//! Learning tests on synthetic tasks whose true attribute is a known function of the text (the
//! number of "good"s in a response, the presence of "yes"): a tiny regression reward model
//! reaches Pearson >= 0.9 on held-out rows for each trained attribute, and a tiny Bradley-Terry
//! model >= 90% pairwise accuracy on held-out pairs.

mod common;

use common::*;
use rlhf_train::{train_reward_model, JobControl};

#[test]
fn regression_rm_learns_attributes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("base"), 1);
    let train = tmp.path().join("train.jsonl");
    let eval = tmp.path().join("eval.jsonl");
    write_jsonl(&train, &ratings_rows(480, 1));
    write_jsonl(&eval, &ratings_rows(120, 2));
    let mut cfg = rm_config(
        &tmp.path().join("run"),
        &model,
        "regression",
        &train,
        Some(&eval),
    );
    cfg.regression.attributes = vec!["helpfulness".into(), "coherence".into()];
    cfg.train.epochs = 3;
    let report = train_reward_model(&cfg, &JobControl::default()).unwrap();
    let ev = report.eval.unwrap();
    for a in ["helpfulness", "coherence"] {
        let r = ev[format!("pearson/{a}")].as_f64().unwrap();
        assert!(r >= 0.9, "held-out Pearson for {a} is {r:.3} < 0.9: {ev}");
    }
}

#[test]
fn bradley_terry_rm_learns_preferences() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("base"), 2);
    let train = tmp.path().join("train.jsonl");
    let eval = tmp.path().join("eval.jsonl");
    write_jsonl(&train, &preference_rows(240, 3, "train"));
    write_jsonl(&eval, &preference_rows(100, 4, "validation"));
    let mut cfg = rm_config(
        &tmp.path().join("run"),
        &model,
        "bradley_terry",
        &train,
        Some(&eval),
    );
    cfg.data.train.format = Some(rlhf_train::DataFormat::Helpsteer2Preference);
    cfg.data.eval.as_mut().unwrap().format = Some(rlhf_train::DataFormat::Helpsteer2Preference);
    cfg.train.epochs = 2;
    let report = train_reward_model(&cfg, &JobControl::default()).unwrap();
    let ev = report.eval.unwrap();
    let acc = ev["accuracy"].as_f64().unwrap();
    assert!(
        acc >= 0.9,
        "held-out pairwise accuracy {acc:.3} < 0.9: {ev}"
    );
}
