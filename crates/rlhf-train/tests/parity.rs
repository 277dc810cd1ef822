//! Numerical parity of the reward-model losses with PyTorch (`scripts/golden/rm_losses.py`):
//! the MSE, Bradley-Terry, margin and scaled Bradley-Terry losses and their gradients on fixed
//! tensors (f64, 1e-12), and the regression and scaled-BT losses through a whole tiny model
//! saved as an HF `LlamaForSequenceClassification`, with parameter gradients (f32, relative
//! 1e-4), which also checks that transformers reads our reward-model files as we do.

mod common;

use std::path::{Path, PathBuf};

use rlhf_model::{sequence_scores, HeadKind, Model, SaveOptions};
use rlhf_train::losses::{bradley_terry_loss, regression_loss};
use rlhf_train::reward::load_with_head;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const GRADS: [&str; 4] = [
    "score.weight",
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.norm.weight",
];

fn t64(v: &[f64], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v).view(shape).set_requires_grad(true)
}

fn vec64(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).unwrap()
}

fn assert_close(ours: &[f64], theirs: &[f64], rel: f64, what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    let scale = theirs.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    let diff = ours
        .iter()
        .zip(theirs)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= rel * scale,
        "{what}: max abs diff {diff:e} vs scale {scale:e} (allowed relative {rel:e})"
    );
}

/// A tiny reward model with `labels` outputs, saved in HF layout.
fn reward_model(base: &Path, out: PathBuf, labels: usize) -> PathBuf {
    let head = HeadKind::Score { num_labels: labels };
    let (m, _) = load_with_head(base, head, Device::Cpu, Kind::Float, 11).unwrap();
    m.save(&out, &SaveOptions::default()).unwrap();
    rlhf_model::copy_side_files(base, &out).unwrap();
    out
}

fn padded(rows: &[Vec<i64>]) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let w = rows.iter().map(Vec::len).max().unwrap();
    let ids = rows
        .iter()
        .map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(0, w - r.len()))
                .collect()
        })
        .collect();
    let mask = rows
        .iter()
        .map(|r| {
            std::iter::repeat_n(1, r.len())
                .chain(std::iter::repeat_n(0, w - r.len()))
                .collect()
        })
        .collect();
    (ids, mask)
}

fn tensor2(rows: &[Vec<i64>]) -> Tensor {
    Tensor::from_slice(&rows.concat()).view([rows.len() as i64, rows[0].len() as i64])
}

fn grads_of(m: &Model) -> Vec<Vec<f64>> {
    let named = m.named_tensors();
    GRADS
        .iter()
        .map(|g| vec64(&named.iter().find(|(n, _)| n == g).unwrap().1.grad()))
        .collect()
}

#[test]
fn losses_and_gradients_match_pytorch() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::tiny_model(&tmp.path().join("base"), 5);
    let reg_dir = reward_model(&base, tmp.path().join("reg"), 5);
    let bt_dir = reward_model(&base, tmp.path().join("bt"), 1);

    // Level 1: the functions on fixed tensors.
    let pred = [0.5, 3.2, -1.0, 2.0, 4.1, 0.0, 1.5, 2.5, 3.0, 0.3];
    let target = [1.0, 3.0, 0.0, 2.0, 4.0, 1.0, 1.0, 2.0, 4.0, 0.0];
    let chosen = [1.2, -0.3, 0.8, 2.5];
    let rejected = [0.1, 0.4, 0.8, -1.0];
    let margin = [1.0, 2.0, 0.5, 3.0];
    let weight = [1.0, 3.0, 2.0, 1.0];

    // Level 2: through the model; token ids avoid the pad id 0.
    let rows: Vec<Vec<i64>> = vec![
        vec![17, 42, 101, 7, 250, 33, 64, 12],
        vec![3, 88, 150, 23, 9],
        vec![44, 19, 120, 301, 77, 5, 66],
        vec![5, 6, 7, 8, 9, 10],
    ];
    let (ids, mask) = padded(&rows);
    let reg_target: Vec<Vec<f64>> = (0..4)
        .map(|i| (0..5).map(|a| ((i * 5 + a) % 5) as f64 * 0.8).collect())
        .collect();
    let bt_margin = vec![1.0, 0.0];
    let bt_weight = vec![2.0, 3.0];

    let job = json!({
        "functional": {"pred": [pred[..5].to_vec(), pred[5..].to_vec()],
                       "target": [target[..5].to_vec(), target[5..].to_vec()],
                       "chosen": chosen, "rejected": rejected, "margin": margin, "weight": weight},
        "models": [
            {"model": reg_dir, "kind": "regression", "input_ids": ids, "attention_mask": mask,
             "target": reg_target, "grads": GRADS},
            {"model": bt_dir, "kind": "bt", "input_ids": ids, "attention_mask": mask,
             "margin": bt_margin, "weight": bt_weight, "grads": GRADS},
        ],
    });
    let job_path = tmp.path().join("job.json");
    let out_path = tmp.path().join("out.json");
    std::fs::write(&job_path, serde_json::to_vec(&job).unwrap()).unwrap();
    common::run_python("rm_losses.py", &[&job_path, &out_path]);
    let res: Value = serde_json::from_slice(&std::fs::read(&out_path).unwrap()).unwrap();
    let f = &res["functional"];

    // MSE.
    let p = t64(&pred, &[2, 5]);
    let loss = regression_loss(&p, &Tensor::from_slice(&target).view([2, 5]))
        .unwrap()
        .mean(Kind::Double);
    loss.backward();
    assert_close(
        &[loss.double_value(&[])],
        &[f["mse"]["loss"].as_f64().unwrap()],
        1e-12,
        "mse loss",
    );
    assert_close(
        &vec64(&p.grad()),
        &floats(&f["mse"]["grad_pred"]),
        1e-12,
        "mse grad",
    );
    // Bradley-Terry, plain / margin / scaled.
    for (name, m, w) in [
        ("bt", None, None),
        ("bt_margin", Some(&margin), None),
        ("bt_scaled", None, Some(&weight)),
    ] {
        let c = t64(&chosen, &[4]);
        let r = t64(&rejected, &[4]);
        let mt = m.map(|m| Tensor::from_slice(m));
        let wt = w.map(|w| Tensor::from_slice(w));
        let loss = bradley_terry_loss(&c, &r, mt.as_ref(), wt.as_ref())
            .unwrap()
            .mean(Kind::Double);
        loss.backward();
        assert_close(
            &[loss.double_value(&[])],
            &[f[name]["loss"].as_f64().unwrap()],
            1e-12,
            name,
        );
        assert_close(
            &vec64(&c.grad()),
            &floats(&f[name]["grad_chosen"]),
            1e-12,
            name,
        );
        assert_close(
            &vec64(&r.grad()),
            &floats(&f[name]["grad_rejected"]),
            1e-12,
            name,
        );
    }

    // Through the models.
    let (ids_t, mask_t) = (tensor2(&ids), tensor2(&mask));
    let opts = rlhf_model::LoadOptions::default();
    let reg = Model::load(&reg_dir, &opts).unwrap();
    let scores = sequence_scores(&reg, &ids_t, &mask_t).unwrap();
    let tgt = Tensor::from_slice(&reg_target.concat())
        .view([4, 5])
        .to_kind(Kind::Float);
    let loss = regression_loss(&scores, &tgt).unwrap().mean(Kind::Float);
    loss.backward();
    let theirs = &res["models"][0];
    assert_close(
        &vec64(&scores),
        &floats(&theirs["scores"]),
        1e-4,
        "regression scores",
    );
    assert_close(
        &[loss.double_value(&[])],
        &[theirs["loss"].as_f64().unwrap()],
        1e-5,
        "regression loss",
    );
    for (g, ours) in GRADS.iter().zip(grads_of(&reg)) {
        assert_close(
            &ours,
            &floats(&theirs["grads"][g]),
            1e-4,
            &format!("regression grad {g}"),
        );
    }

    let bt = Model::load(&bt_dir, &opts).unwrap();
    let s = sequence_scores(&bt, &ids_t, &mask_t)
        .unwrap()
        .squeeze_dim(1);
    let (m, w) = (
        Tensor::from_slice(&bt_margin).to_kind(Kind::Float),
        Tensor::from_slice(&bt_weight).to_kind(Kind::Float),
    );
    let loss = bradley_terry_loss(&s.narrow(0, 0, 2), &s.narrow(0, 2, 2), Some(&m), Some(&w))
        .unwrap()
        .mean(Kind::Float);
    loss.backward();
    let theirs = &res["models"][1];
    assert_close(
        &[loss.double_value(&[])],
        &[theirs["loss"].as_f64().unwrap()],
        1e-5,
        "bt loss",
    );
    for (g, ours) in GRADS.iter().zip(grads_of(&bt)) {
        assert_close(
            &ours,
            &floats(&theirs["grads"][g]),
            1e-4,
            &format!("bt grad {g}"),
        );
    }
}
