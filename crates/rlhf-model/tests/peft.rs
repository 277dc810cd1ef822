//! LoRA files against `peft`: adapters we attach and save in PEFT's format load with
//! `PeftModel.from_pretrained` and give our logits; adapters PEFT makes and saves load into our
//! model and give PEFT's logits; our merged checkpoint loads in `transformers` as a plain model.
//! Tiny Llama (GQA, untied) and Qwen2 (q/k/v bias, tied) models, f32, max abs diff 1e-4.

mod common;

use std::path::Path;

use rlhf_model::{Family, LoadOptions, LoraConfig, Model, SaveOptions, Target};
use serde_json::json;
use tch::{Kind, Tensor};

const TOL: f64 = 1e-4;

/// Two left-padded rows.
fn batch() -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let ids = vec![vec![0, 0, 5, 6, 7, 8, 9, 10], vec![1, 2, 3, 4, 5, 6, 7, 8]];
    let mask = vec![vec![0, 0, 1, 1, 1, 1, 1, 1], vec![1; 8]];
    (ids, mask)
}

fn to_tensor(rows: &[Vec<i64>]) -> Tensor {
    Tensor::from_slice(&rows.concat()).view([rows.len() as i64, rows[0].len() as i64])
}

fn our_logits(m: &Model) -> Tensor {
    let (ids, mask) = batch();
    let _g = tch::no_grad_guard();
    m.logits(
        &m.forward_padded(&to_tensor(&ids), &to_tensor(&mask))
            .unwrap(),
    )
    .unwrap()
}

/// Max abs difference over the real (unpadded) positions.
fn diff(ours: &Tensor, theirs: &serde_json::Value) -> f64 {
    let shape: Vec<i64> = serde_json::from_value(theirs["logits_shape"].clone()).unwrap();
    let flat: Vec<f32> = serde_json::from_value(theirs["logits"].clone()).unwrap();
    let theirs = Tensor::from_slice(&flat).view(shape.as_slice());
    assert_eq!(ours.size(), theirs.size());
    let real = to_tensor(&batch().1).ne(0).unsqueeze(2);
    ((ours - theirs).abs() * real).max().double_value(&[])
}

/// Every adapter tensor random (B too: fresh adapters compute nothing).
fn randomize(m: &Model, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (_, mut t) in m.lora().unwrap().named_tensors() {
            t.copy_(&(Tensor::randn(t.size(), (Kind::Float, tch::Device::Cpu)) * 0.05));
        }
    });
}

struct Case {
    name: &'static str,
    base: std::path::PathBuf,
    /// What our model carries (then saved for PEFT).
    ours: LoraConfig,
    /// What PEFT makes (then loaded by us).
    peft: serde_json::Value,
}

fn cases(root: &Path) -> Vec<Case> {
    vec![
        Case {
            name: "llama_gqa",
            base: common::tiny(&root.join("llama"), Family::Llama, Some(false), Some(2), 1),
            ours: LoraConfig::new(4, 8.0, 0.05, Target::ALL.to_vec()),
            peft: json!({"r": 2, "lora_alpha": 5, "seed": 3,
                         "target_modules": ["q_proj", "v_proj", "down_proj"]}),
        },
        Case {
            name: "qwen2",
            base: common::tiny(&root.join("qwen2"), Family::Qwen2, None, None, 2),
            ours: LoraConfig::new(3, 6.0, 0.0, vec![Target::K, Target::O, Target::Up]),
            peft: json!({"r": 4, "lora_alpha": 4, "seed": 4, "use_rslora": true,
                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"]}),
        },
    ]
}

#[test]
fn adapters_round_trip_through_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let (ids, mask) = batch();
    let cases = cases(tmp.path());
    let mut ours = vec![];
    let mut jobs = vec![];
    for (k, c) in cases.iter().enumerate() {
        let mut m = Model::load(&c.base, &LoadOptions::default()).unwrap();
        let base = our_logits(&m);
        m.add_lora(c.ours.clone(), 0).unwrap();
        randomize(&m, 10 + k as i64);
        let d = (our_logits(&m) - base).abs().max().double_value(&[]);
        assert!(d > 1e-3, "{}: our adapters changed nothing ({d})", c.name);
        let adapter = c.base.with_extension("ours");
        m.save_lora(&adapter, Some(c.base.to_str().unwrap()))
            .unwrap();
        let merged = c.base.with_extension("merged");
        m.save_merged(&merged, &SaveOptions::default()).unwrap();
        ours.push(our_logits(&m));
        let common = json!({"input_ids": ids, "attention_mask": mask});
        let job = |extra: serde_json::Value| {
            let mut j = common.clone();
            j.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            j
        };
        jobs.push(job(json!({"base": c.base, "load_adapter": adapter})));
        jobs.push(job(json!({"base": merged})));
        let mut spec = c.peft.clone();
        spec["dir"] = json!(c.base.with_extension("peft"));
        jobs.push(job(json!({"base": c.base, "make_adapter": spec})));
    }
    let jobs_path = tmp.path().join("jobs.json");
    let out_path = tmp.path().join("out.json");
    std::fs::write(&jobs_path, serde_json::to_vec(&jobs).unwrap()).unwrap();
    common::run_python("peft_reference.py", &[&jobs_path, &out_path]);
    let results: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&out_path).unwrap()).unwrap();
    assert_eq!(results.len(), 3 * cases.len());

    for ((c, ours), res) in cases.iter().zip(&ours).zip(results.chunks(3)) {
        let d = diff(ours, &res[0]);
        assert!(d < TOL, "{}: peft with our adapter differs by {d}", c.name);
        let d = diff(ours, &res[1]);
        assert!(
            d < TOL,
            "{}: transformers on our merged model differs by {d}",
            c.name
        );

        // PEFT's adapter into a fresh copy of the base: PEFT's logits.
        let mut m = Model::load(&c.base, &LoadOptions::default()).unwrap();
        m.load_lora(&c.base.with_extension("peft")).unwrap();
        let lora = m.lora().unwrap().config();
        assert_eq!(lora.rank, c.peft["r"].as_u64().unwrap() as usize);
        assert_eq!(
            lora.use_rslora,
            c.peft["use_rslora"].as_bool().unwrap_or(false)
        );
        let theirs = our_logits(&m);
        let d = diff(&theirs, &res[2]);
        assert!(
            d < TOL,
            "{}: our model with peft's adapter differs by {d}",
            c.name
        );
        // And it is not the base model (the adapter did something).
        m.set_adapters_enabled(false);
        let d = diff(&our_logits(&m), &res[2]);
        assert!(d > 1e-3, "{}: peft's adapter changed nothing ({d})", c.name);
    }
}
