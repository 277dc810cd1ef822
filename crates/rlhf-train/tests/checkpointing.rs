//! `train.gradient_checkpointing` in the SFT and reward-model jobs: a short run with it ends
//! with the same weights and held-out metrics as the same run without it.

mod common;

use std::path::Path;

use common::*;
use rlhf_train::{train_reward_model, train_sft, JobControl};
use serde_json::json;

/// Largest weight difference between the exported models of two runs, and the largest weight
/// change of the first run from `base` (so a run that trained nothing cannot pass).
fn weight_diffs(a: &Path, b: &Path, base: &Path) -> (f64, f64) {
    let load = |p: &Path| {
        rlhf_model::ModelDir::load(p, &Default::default())
            .unwrap()
            .model
            .named_tensors()
    };
    let (wa, wb) = (load(a), load(b));
    // The base is a causal LM; a reward model has a score head instead of lm_head.
    let w0: std::collections::HashMap<_, _> = load(base).into_iter().collect();
    assert_eq!(wa.len(), wb.len());
    let mut diff = 0f64;
    let mut moved = 0f64;
    for ((na, ta), (nb, tb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        diff = diff.max((ta - tb).abs().max().double_value(&[]));
        if na.contains("layers.0.") {
            moved = moved.max((ta - &w0[na]).abs().max().double_value(&[]));
        }
    }
    (diff, moved)
}

#[test]
fn checkpointed_sft_and_reward_model_runs_equal_the_plain_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("base"), 5);

    let chat = tmp.path().join("chat.jsonl");
    let mut r = rng(3);
    let rows: Vec<_> = (0..8)
        .map(|i| {
            json!({"messages": [
                {"role": "user", "content": "Say something small."},
                {"role": "assistant", "content": response(&mut r, 5, i % 3, i % 2 == 0)}]})
        })
        .collect();
    write_jsonl(&chat, &rows);
    let sft = |run: &str, on: bool| {
        let mut c = sft_config(&tmp.path().join(run), &model, &chat);
        c.train.gradient_checkpointing = on;
        train_sft(&c, &JobControl::default()).unwrap();
        c.run_dir.join("model")
    };
    let (plain, ckpt) = (sft("sft-plain", false), sft("sft-ckpt", true));
    let (diff, moved) = weight_diffs(&plain, &ckpt, &model);
    // Two AdamW steps at lr 1e-3 move a weight by up to ~2e-3.
    assert!(moved > 1e-4, "SFT did not train layer 0 (moved {moved})");
    assert!(diff < 1e-6, "SFT: checkpointed weights differ by {diff}");

    let train = tmp.path().join("ratings.jsonl");
    let eval = tmp.path().join("eval.jsonl");
    write_jsonl(&train, &ratings_rows(32, 1));
    write_jsonl(&eval, &ratings_rows(16, 2));
    let rm = |run: &str, on: bool| {
        let mut c = rm_config(
            &tmp.path().join(run),
            &model,
            "regression",
            &train,
            Some(&eval),
        );
        c.regression.attributes = vec!["helpfulness".into()];
        c.train.gradient_checkpointing = on;
        let report = train_reward_model(&c, &JobControl::default()).unwrap();
        (c.run_dir.join("model"), report.eval.unwrap())
    };
    let ((plain, ev_plain), (ckpt, ev_ckpt)) = (rm("rm-plain", false), rm("rm-ckpt", true));
    let (diff, moved) = weight_diffs(&plain, &ckpt, &model);
    assert!(moved > 1e-4, "RM did not train layer 0 (moved {moved})");
    assert!(diff < 1e-6, "RM: checkpointed weights differ by {diff}");
    let (a, b) = (
        ev_plain["mse"].as_f64().unwrap(),
        ev_ckpt["mse"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() <= 1e-6 * a.abs().max(1.0),
        "eval mse {a} vs {b}"
    );
}
