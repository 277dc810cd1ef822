//! Numerical parity with HF `transformers` on models made by `init-model`: logits of a padded
//! batch (max abs diff 1e-4, f32), 32 greedy tokens from `generate()`, tokenizer encoding and
//! chat template rendering, and loading the (sharded) files `save_pretrained` writes.

mod common;

use std::path::{Path, PathBuf};

use rlhf_model::config::Config;
use rlhf_model::{
    generate, GenerationConfig, LoadOptions, Model, ModelDir, SaveOptions, Tokenizer,
};
use rlhf_model::{ChatMessage, Family};
use serde_json::json;
use tch::{Device, Kind, Tensor};

const NEW_TOKENS: usize = 32;

/// Re-creates the weights of `dir` for an edited config, with random (non-zero) biases so the
/// bias paths are exercised.
fn rebuild(dir: &Path, seed: i64, edit: impl FnOnce(&mut serde_json::Value)) {
    common::edit_config(dir, edit);
    let cfg = Config::from_dir(dir).unwrap();
    let m = Model::new(cfg, Device::Cpu, Kind::Float, seed).unwrap();
    tch::no_grad(|| {
        for (name, mut t) in m.named_tensors() {
            if name.ends_with(".bias") {
                t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
    m.save(dir, &SaveOptions::default()).unwrap();
}

struct Case {
    name: &'static str,
    dir: PathBuf,
}

fn cases(root: &Path) -> Vec<Case> {
    let mut v = vec![];
    // Llama with grouped-query attention (4 heads over 2 KV heads), untied.
    let d = common::tiny(
        &root.join("llama_gqa"),
        Family::Llama,
        Some(false),
        Some(2),
        1,
    );
    v.push(Case {
        name: "llama_gqa",
        dir: d,
    });
    // Llama, tied embeddings, attention bias, Llama 3 rope scaling, plain MHA.
    let d = common::tiny(
        &root.join("llama_tied"),
        Family::Llama,
        Some(true),
        Some(4),
        2,
    );
    rebuild(&d, 2, |c| {
        c["attention_bias"] = json!(true);
        c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
    });
    v.push(Case {
        name: "llama_tied_bias_rope3",
        dir: d,
    });
    // Qwen2: q/k/v bias, tied embeddings, GQA.
    let d = common::tiny(&root.join("qwen2"), Family::Qwen2, None, None, 3);
    rebuild(&d, 3, |_| {});
    v.push(Case {
        name: "qwen2",
        dir: d,
    });
    // Mistral with a sliding window shorter than the sequences.
    let d = common::tiny(&root.join("mistral"), Family::Mistral, None, None, 4);
    common::edit_config(&d, |c| c["sliding_window"] = json!(8));
    v.push(Case {
        name: "mistral_window8",
        dir: d,
    });
    v
}

fn prompts() -> Vec<Vec<i64>> {
    // Ids inside the tokenizer's vocabulary; three lengths so left padding matters.
    vec![
        vec![17, 42, 101, 7, 250, 33, 64, 12, 99, 300, 5, 71],
        vec![3, 88, 150, 23, 9, 61, 200],
        vec![44, 1, 120],
    ]
}

fn padded(prompts: &[Vec<i64>], pad: i64) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let w = prompts.iter().map(Vec::len).max().unwrap();
    let ids = prompts
        .iter()
        .map(|p| {
            std::iter::repeat_n(pad, w - p.len())
                .chain(p.iter().copied())
                .collect()
        })
        .collect();
    let mask = prompts
        .iter()
        .map(|p| {
            std::iter::repeat_n(0, w - p.len())
                .chain(std::iter::repeat_n(1, p.len()))
                .collect()
        })
        .collect();
    (ids, mask)
}

fn to_tensor(rows: &[Vec<i64>]) -> Tensor {
    let w = rows[0].len() as i64;
    Tensor::from_slice(&rows.concat()).view([rows.len() as i64, w])
}

#[test]
fn matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases(tmp.path());
    let (ids, mask) = padded(&prompts(), 0);
    let text = "The coordinator schedules work: generate, score, train.";
    let messages = vec![
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "What is two plus two?"),
    ];
    let jobs: Vec<_> = cases
        .iter()
        .map(|c| {
            json!({
                "model": c.dir, "input_ids": ids, "attention_mask": mask,
                "max_new_tokens": NEW_TOKENS, "pad_id": 0, "text": text,
                "messages": messages, "resave_to": c.dir.with_extension("hf"),
                "max_shard_size": "200KB",
            })
        })
        .collect();
    let jobs_path = tmp.path().join("jobs.json");
    let out_path = tmp.path().join("out.json");
    std::fs::write(&jobs_path, serde_json::to_vec(&jobs).unwrap()).unwrap();
    common::run_python("hf_reference.py", &[&jobs_path, &out_path]);
    let results: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&out_path).unwrap()).unwrap();

    let ids_t = to_tensor(&ids);
    let mask_t = to_tensor(&mask);
    for (case, res) in cases.iter().zip(&results) {
        let md = ModelDir::load(&case.dir, &LoadOptions::default()).unwrap();
        let _g = tch::no_grad_guard();
        let ours = md
            .model
            .logits(&md.model.forward_padded(&ids_t, &mask_t).unwrap())
            .unwrap();
        let shape: Vec<i64> = serde_json::from_value(res["logits_shape"].clone()).unwrap();
        let flat: Vec<f32> = serde_json::from_value(res["logits"].clone()).unwrap();
        let theirs = Tensor::from_slice(&flat).view(shape.as_slice());
        assert_eq!(ours.size(), theirs.size(), "{}", case.name);
        // Padding positions hold garbage in both; compare real tokens only.
        let real = mask_t.ne(0).unsqueeze(2);
        let diff = ((&ours - &theirs).abs() * real).max().double_value(&[]);
        assert!(
            diff < 1e-4,
            "{}: logits differ from transformers by {diff}",
            case.name
        );

        let gen = generate(&md.model, &prompts(), &GenerationConfig::greedy(NEW_TOKENS)).unwrap();
        let ours_greedy: Vec<Vec<i64>> = gen.rows().unwrap().into_iter().map(|r| r.0).collect();
        let theirs_greedy: Vec<Vec<i64>> = serde_json::from_value(res["greedy"].clone()).unwrap();
        assert_eq!(
            ours_greedy, theirs_greedy,
            "{}: greedy tokens differ",
            case.name
        );

        let tok = Tokenizer::from_dir(&case.dir).unwrap();
        let enc: Vec<i64> = serde_json::from_value(res["encoded"].clone()).unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            enc,
            "{}: encoding",
            case.name
        );
        assert_eq!(
            tok.render_chat(&messages, true).unwrap(),
            res["chat"].as_str().unwrap(),
            "{}: chat template",
            case.name
        );

        // Files written by save_pretrained (sharded at 200KB) load to the same weights.
        let hf_dir = case.dir.with_extension("hf");
        assert!(
            hf_dir.join("model.safetensors.index.json").exists(),
            "{}: expected HF to shard",
            case.name
        );
        let m2 = Model::load(&hf_dir, &LoadOptions::default()).unwrap();
        let again = m2
            .logits(&m2.forward_padded(&ids_t, &mask_t).unwrap())
            .unwrap();
        let d2 = ((&ours - &again).abs() * mask_t.ne(0).unsqueeze(2))
            .max()
            .double_value(&[]);
        assert_eq!(
            d2, 0.0,
            "{}: HF-saved shards load to different weights",
            case.name
        );
    }
}
