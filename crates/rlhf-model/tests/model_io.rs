//! Loading, saving, generation and heads without a Python reference: KV-cache decoding equals
//! full recompute, save→load→save is byte-identical (single file and sharded), seeded sampling
//! is reproducible, score heads read the last real token, and every bad input named in the
//! model-core issue yields an error that names the file, key or tensor.

mod common;

use std::path::Path;

use rlhf_model::{
    generate, sequence_scores, token_logprobs, token_logprobs_from, token_values, Entropy, Family,
    GenerationConfig, HeadKind, LoadOptions, Model, ModelDir, ModelError, Sampling, SaveOptions,
};
use tch::{Device, Kind, Tensor};

fn load(dir: &Path) -> Model {
    Model::load(dir, &LoadOptions::default()).unwrap()
}

fn err_of<T>(r: rlhf_model::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn kv_cache_generation_equals_full_recompute() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Llama, None, None, 7);
    let m = load(&dir);
    // Rows 0 and 3 share a prompt: its prefill runs once and is copied to both.
    let prompts = vec![
        vec![5i64, 9, 13, 200, 31],
        vec![8i64, 2_i64.pow(7)],
        vec![77i64; 9],
        vec![5i64, 9, 13, 200, 31],
    ];
    let cfg = GenerationConfig {
        sampling: Sampling::Sample {
            temperature: 0.7,
            top_k: None,
            top_p: None,
        },
        seed: 3,
        ..GenerationConfig::greedy(20)
    };
    let out = generate(&m, &prompts, &cfg).unwrap();
    // Recompute every generated token's log-prob with one full forward over the sequences.
    let _g = tch::no_grad_guard();
    let full = token_logprobs(&m, &out.sequences, &out.attention_mask, 0.7, false).unwrap();
    let p = out.prompt_width;
    let n = out.response_ids.size()[1];
    let recomputed = full.logprobs.narrow(1, p - 1, n) * &out.response_mask;
    let diff = (recomputed - &out.response_logprobs)
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        diff < 1e-4,
        "cached decoding differs from full recompute by {diff}"
    );
}

#[test]
fn greedy_cache_matches_argmax_of_full_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Qwen2, None, None, 8);
    let m = load(&dir);
    // A repeated prompt (shared prefill) decodes as if it had its own.
    let prompts = vec![
        vec![5i64, 9, 13],
        vec![8i64, 100, 3, 4, 5, 6],
        vec![5i64, 9, 13],
    ];
    let out = generate(&m, &prompts, &GenerationConfig::greedy(16)).unwrap();
    let _g = tch::no_grad_guard();
    let hidden = m
        .forward_padded(&out.sequences, &out.attention_mask)
        .unwrap();
    let argmax = m.logits(&hidden).unwrap().argmax(-1, false);
    let p = out.prompt_width;
    let n = out.response_ids.size()[1];
    let expect = argmax.narrow(1, p - 1, n);
    assert!(
        expect.equal(&out.response_ids),
        "cached greedy != argmax of full forward"
    );
}

#[test]
fn save_load_save_is_byte_identical_single_and_sharded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("a"), Family::Llama, Some(true), None, 9);
    let original = std::fs::read(dir.join("model.safetensors")).unwrap();
    let m = load(&dir);
    let b = tmp.path().join("b");
    m.save(&b, &SaveOptions::default()).unwrap();
    assert_eq!(
        std::fs::read(b.join("model.safetensors")).unwrap(),
        original
    );

    // Sharded save, then load it and save as one file again.
    let c = tmp.path().join("c");
    let sharded = SaveOptions {
        max_shard_bytes: 100_000,
        ..Default::default()
    };
    m.save(&c, &sharded).unwrap();
    let index = std::fs::read_to_string(c.join("model.safetensors.index.json")).unwrap();
    assert!(
        index.contains("model-00002-of-"),
        "expected several shards: {index}"
    );
    assert!(!c.join("model.safetensors").exists());
    let m2 = load(&c);
    let d = tmp.path().join("d");
    m2.save(&d, &SaveOptions::default()).unwrap();
    assert_eq!(
        std::fs::read(d.join("model.safetensors")).unwrap(),
        original
    );

    // Re-saving a sharded directory as one file removes the stale shards and index.
    m2.save(&c, &SaveOptions::default()).unwrap();
    assert!(!c.join("model.safetensors.index.json").exists());
    assert!(std::fs::read_dir(&c).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("model-")));
}

#[test]
fn varstore_names_equal_checkpoint_keys() {
    let tmp = tempfile::tempdir().unwrap();
    for (family, tied) in [(Family::Llama, false), (Family::Qwen2, true)] {
        let dir = common::tiny(
            &tmp.path().join(format!("{family:?}")),
            family,
            Some(tied),
            None,
            1,
        );
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut keys: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        keys.sort();
        let names: Vec<String> = load(&dir)
            .named_tensors()
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(names, keys);
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_top_k_1_is_greedy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Llama, None, None, 2);
    let m = load(&dir);
    let prompts = vec![vec![1i64, 2, 3], vec![40i64, 41]];
    let sample = |seed, top_k, top_p| {
        let cfg = GenerationConfig {
            sampling: Sampling::Sample {
                temperature: 1.0,
                top_k,
                top_p,
            },
            seed,
            ..GenerationConfig::greedy(12)
        };
        generate(&m, &prompts, &cfg).unwrap().response_ids
    };
    assert!(sample(1, None, Some(0.9)).equal(&sample(1, None, Some(0.9))));
    assert!(!sample(1, None, None).equal(&sample(2, None, None)));
    let greedy = generate(&m, &prompts, &GenerationConfig::greedy(12)).unwrap();
    assert!(sample(5, Some(1), None).equal(&greedy.response_ids));
    // A tiny top_p keeps only the most likely token: greedy again.
    assert!(sample(6, None, Some(1e-6)).equal(&greedy.response_ids));
}

#[test]
fn a_batch_sampled_in_shards_matches_the_whole_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Llama, None, None, 2);
    let m = load(&dir);
    let prompts = vec![
        vec![1i64, 2, 3],
        vec![40i64, 41],
        vec![7i64],
        vec![9i64, 10, 11, 12],
    ];
    let run = |rows: &[Vec<i64>], first_row| {
        let cfg = GenerationConfig {
            sampling: Sampling::Sample {
                temperature: 1.0,
                top_k: None,
                top_p: None,
            },
            seed: 11,
            first_row,
            ..GenerationConfig::greedy(12)
        };
        generate(&m, rows, &cfg).unwrap().rows().unwrap()
    };
    let whole = run(&prompts, 0);
    let mut shards = run(&prompts[..1], 0);
    shards.extend(run(&prompts[1..3], 1));
    shards.extend(run(&prompts[3..], 3));
    for (i, (w, s)) in whole.iter().zip(&shards).enumerate() {
        assert_eq!(
            w.0, s.0,
            "row {i}: tokens differ between the whole batch and its shard"
        );
        for (a, b) in w.1.iter().zip(&s.1) {
            assert!((a - b).abs() < 1e-5, "row {i}: log-prob {a} vs {b}");
        }
    }
    // Rows do not share a stream: the same prompt in two rows samples different tokens.
    let twice = run(&[prompts[0].clone(), prompts[0].clone()], 0);
    assert_ne!(twice[0].0, twice[1].0);
}

#[test]
fn stops_on_stop_ids_and_masks_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Llama, None, None, 2);
    let m = load(&dir);
    let prompts = vec![vec![1i64, 2, 3], vec![40i64, 41]];
    let free = generate(&m, &prompts, &GenerationConfig::greedy(10)).unwrap();
    let rows = free.rows().unwrap();
    // Use row 0's third token as the stop id: row 0 must stop there, inclusive.
    let stop = rows[0].0[2];
    let cfg = GenerationConfig {
        stop_ids: vec![stop],
        pad_id: 0,
        ..GenerationConfig::greedy(10)
    };
    let out = generate(&m, &prompts, &cfg).unwrap();
    let r = out.rows().unwrap();
    let first = rows[0].0.iter().position(|&t| t == stop).unwrap();
    assert_eq!(r[0].0, rows[0].0[..=first].to_vec());
    assert!(out.finished[0]);
    let masked_lp = (out.response_logprobs * (out.response_mask.ones_like() - &out.response_mask))
        .abs()
        .sum(Kind::Float)
        .double_value(&[]);
    assert_eq!(masked_lp, 0.0, "log-probs after the stop must be zero");
}

#[test]
fn score_heads_read_the_last_real_token_and_values_cover_every_predicting_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Llama, None, None, 4);
    let rm = Model::load(
        &dir,
        &LoadOptions {
            head: Some(HeadKind::Score { num_labels: 5 }),
            seed: 11,
            ..Default::default()
        },
    )
    .unwrap();
    let _g = tch::no_grad_guard();
    let ids_left = Tensor::from_slice(&[0i64, 0, 7, 8, 9, 5, 6, 7, 8, 9]).view([2, 5]);
    let mask_left = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 5]);
    let ids_right = Tensor::from_slice(&[7i64, 8, 9, 0, 0, 5, 6, 7, 8, 9]).view([2, 5]);
    let mask_right = Tensor::from_slice(&[1i64, 1, 1, 0, 0, 1, 1, 1, 1, 1]).view([2, 5]);
    let a = sequence_scores(&rm, &ids_left, &mask_left).unwrap();
    let b = sequence_scores(&rm, &ids_right, &mask_right).unwrap();
    assert_eq!(a.size(), [2, 5]);
    let d = (a - b).abs().max().double_value(&[]);
    assert!(d < 1e-5, "left and right padding score differently: {d}");

    let critic = Model::load(
        &dir,
        &LoadOptions {
            head: Some(HeadKind::Score { num_labels: 1 }),
            ..Default::default()
        },
    )
    .unwrap();
    let v = token_values(&critic, &ids_right, &mask_right, 0).unwrap();
    // One value per position that predicts a next token (all but the last).
    assert_eq!(v.size(), [2, 4]);
    // A reward head saved and reloaded keeps its architecture and labels.
    let out = tmp.path().join("rm");
    rm.save(&out, &SaveOptions::default()).unwrap();
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(
        cfg.contains("LlamaForSequenceClassification") && cfg.contains("LABEL_4"),
        "{cfg}"
    );
    let again = load(&out);
    assert_eq!(again.config.head, HeadKind::Score { num_labels: 5 });
    let err = sequence_scores(&rm, &ids_left, &ids_left.zeros_like()).unwrap_err();
    assert!(err.to_string().contains("row 0"), "{err}");
}

#[test]
fn training_forward_has_gradients_and_entropy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Qwen2, None, None, 5);
    let m = load(&dir);
    let ids = Tensor::from_slice(&[3i64, 4, 5, 6, 7, 8]).view([1, 6]);
    let out = token_logprobs(&m, &ids, &ids.ones_like(), 1.0, true).unwrap();
    let ent = out.entropy.unwrap();
    assert_eq!(out.logprobs.size(), [1, 5]);
    let max_ent = (m.config.vocab_size as f64).ln();
    let e = ent.max().double_value(&[]);
    assert!(
        e > 0.0 && e <= max_ent + 1e-4,
        "entropy {e} out of (0, ln V]"
    );
    out.logprobs.sum(Kind::Float).backward();
    let grads: f64 = m
        .named_tensors()
        .iter()
        .map(|(_, t)| t.grad().abs().sum(Kind::Float).double_value(&[]))
        .sum();
    assert!(grads > 0.0, "no gradient reached the weights");
}

#[test]
fn reduced_precision_loads_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Llama, None, None, 6);
    for kind in [Kind::BFloat16, Kind::Half] {
        let m = Model::load(
            &dir,
            &LoadOptions {
                dtype: Some(kind),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(m.named_tensors()[0].1.kind(), kind);
        let out = generate(&m, &[vec![1, 2, 3]], &GenerationConfig::greedy(4)).unwrap();
        assert!(!bool::try_from(out.response_logprobs.isnan().any()).unwrap());
        let saved = tmp.path().join(format!("{kind:?}"));
        m.save(&saved, &SaveOptions::default()).unwrap();
        let cfg = std::fs::read_to_string(saved.join("config.json")).unwrap();
        assert!(cfg.contains(rlhf_model::config::kind_to_str(kind)), "{cfg}");
    }
}

#[test]
fn bad_inputs_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Llama, None, None, 1);

    // Missing config.json.
    let e = err_of(Model::load(
        &tmp.path().join("nope"),
        &LoadOptions::default(),
    ));
    assert!(e.contains("nope/config.json"), "{e}");

    // Malformed config.json: file and line.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("config.json"),
        "{\n  \"vocab_size\": 10,\n  oops\n}",
    )
    .unwrap();
    let e = err_of(Model::load(&bad, &LoadOptions::default()));
    assert!(e.contains("bad/config.json") && e.contains("line 3"), "{e}");

    // Unknown architecture.
    let arch = tmp.path().join("arch");
    common::tiny(&arch, Family::Llama, None, None, 1);
    common::edit_config(&arch, |c| {
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"])
    });
    let e = err_of(Model::load(&arch, &LoadOptions::default()));
    assert!(
        e.contains("architectures") && e.contains("GPTNeoXForCausalLM"),
        "{e}"
    );

    // Wrong shape: config says a different intermediate size than the weights.
    let shape = tmp.path().join("shape");
    common::tiny(&shape, Family::Llama, None, None, 1);
    common::edit_config(&shape, |c| c["intermediate_size"] = serde_json::json!(100));
    let e = err_of(Model::load(&shape, &LoadOptions::default()));
    assert!(
        e.contains("model.safetensors")
            && e.contains("mlp")
            && e.contains("[64, 100]")
            && e.contains("[64, 176]"),
        "{e}"
    );

    // Missing tensor: one more layer than the file has.
    let missing = tmp.path().join("missing");
    common::tiny(&missing, Family::Llama, None, None, 1);
    common::edit_config(&missing, |c| c["num_hidden_layers"] = serde_json::json!(3));
    let e = err_of(Model::load(&missing, &LoadOptions::default()));
    assert!(
        e.contains("model.layers.2.") && e.contains("missing"),
        "{e}"
    );

    // Tokenizer larger than the embedding.
    let vocab = tmp.path().join("vocab");
    common::tiny(&vocab, Family::Llama, None, None, 1);
    let m = load(&vocab);
    let mut small = m.config.clone();
    small.vocab_size = 100;
    let sm = Model::new(small, Device::Cpu, Kind::Float, 0).unwrap();
    sm.save(&vocab, &SaveOptions::default()).unwrap();
    let e = match ModelDir::load(&vocab, &LoadOptions::default()) {
        Ok(_) => panic!("expected a vocab error"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("tokenizer.json") && e.contains("100 rows"),
        "{e}"
    );

    // Prompt longer than the context.
    let m = load(&dir);
    let long = vec![vec![1i64; 600]];
    let Err(e) = generate(&m, &long, &GenerationConfig::greedy(4)) else {
        panic!("expected PromptTooLong")
    };
    assert!(
        matches!(
            e,
            ModelError::PromptTooLong {
                len: 600,
                max: 512,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("600 tokens") && e.to_string().contains("512"));

    // Token ids outside the vocabulary, bad sampling parameters.
    let e = err_of(generate(&m, &[vec![1, 9999]], &GenerationConfig::greedy(4)));
    assert!(e.contains("9999"), "{e}");
    let cfg = GenerationConfig {
        sampling: Sampling::Sample {
            temperature: 0.0,
            top_k: None,
            top_p: None,
        },
        ..GenerationConfig::greedy(4)
    };
    let e = err_of(generate(&m, &[vec![1, 2]], &cfg));
    assert!(e.contains("temperature"), "{e}");

    // A truncated safetensors file: error, no model.
    let trunc = tmp.path().join("trunc");
    common::tiny(&trunc, Family::Llama, None, None, 1);
    let f = trunc.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(Model::load(&trunc, &LoadOptions::default()));
    assert!(
        e.contains("model.safetensors") && e.contains("safetensors"),
        "{e}"
    );
}

#[test]
fn chat_template_jinja_file_takes_precedence() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Llama, None, None, 1);
    let msgs = [rlhf_model::ChatMessage::new("user", "hi")];
    let tok = rlhf_model::Tokenizer::from_dir(&dir).unwrap();
    assert!(tok
        .render_chat(&msgs, true)
        .unwrap()
        .starts_with("<|im_start|>user"));
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}",
    )
    .unwrap();
    let tok = rlhf_model::Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(
        tok.render_chat(&msgs, true).unwrap(),
        "[user] hi\n[assistant] "
    );
    std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}").unwrap();
    let e = tok_err(&dir);
    assert!(e.contains("chat template"), "{e}");
}

fn tok_err(dir: &Path) -> String {
    let tok = rlhf_model::Tokenizer::from_dir(dir).unwrap();
    let msgs = [rlhf_model::ChatMessage::new("user", "hi")];
    tok.render_chat(&msgs, false).unwrap_err().to_string()
}

#[test]
fn logprobs_from_a_position_equal_the_full_ones_sliced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Llama, None, None, 6);
    let m = load(&dir);
    let ids =
        Tensor::from_slice(&[3i64, 4, 5, 6, 7, 8, 9, 10, 3, 4, 5, 6, 7, 8, 9, 11]).view([2, 8]);
    let mask =
        Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 8]);
    let full = token_logprobs(&m, &ids, &mask, 0.7, true).unwrap();
    for from in [0i64, 3, 6] {
        let part = token_logprobs_from(&m, &ids, &mask, from, 0.7, Entropy::Metric).unwrap();
        assert_eq!(part.logprobs.size(), [2, 7 - from]);
        let want = full.logprobs.narrow(1, from, 7 - from);
        let d = (&part.logprobs - &want).abs().max().double_value(&[]);
        assert!(d < 1e-5, "from {from}: max diff {d}");
        let e = part.entropy.unwrap();
        assert!(!e.requires_grad(), "a metric entropy carries no gradient");
        let d = (&e - full.entropy.as_ref().unwrap().narrow(1, from, 7 - from))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-5, "entropy from {from}: max diff {d}");
    }
    let Err(err) = token_logprobs_from(&m, &ids, &mask, 7, 1.0, Entropy::Off) else {
        panic!("from = 7 leaves no token to score")
    };
    assert!(err.to_string().contains("from"), "{err}");
}
