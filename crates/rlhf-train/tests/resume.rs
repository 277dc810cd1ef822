//! Checkpoint and resume of the training jobs (CPU): a job stopped after k steps and resumed
//! ends with bitwise-identical weights and optimizer state to an uninterrupted run, also when
//! the newest checkpoint is corrupted and resume falls back to the one before; a resumed run
//! logs each step once; a checkpoint over different data is refused.

mod common;

use std::path::Path;

use common::*;
use rlhf_train::{train_reward_model, train_sft, JobControl, TrainError};
use serde_json::json;

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn stop_at(k: u64) -> JobControl {
    JobControl {
        stop_after: Some(k),
        ..Default::default()
    }
}

#[test]
fn reward_model_resumes_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("base"), 3);
    let train = tmp.path().join("train.jsonl");
    write_jsonl(&train, &ratings_rows(44, 5));
    let cfg = |run: &str| {
        let mut c = rm_config(&tmp.path().join(run), &model, "regression", &train, None);
        // 44 rows in batches of 8: 6 steps per epoch, the last one short; 2 epochs.
        c.train.batch_size = 8;
        c.train.micro_batch_size = 3;
        c.train.epochs = 2;
        c.train.log_every = 1;
        c.checkpoint.every = Some(4);
        c.checkpoint.keep_last = 3;
        c
    };
    let a = cfg("a");
    let ra = train_reward_model(&a, &JobControl::default()).unwrap();
    assert!(ra.finished && ra.steps == 12 && ra.resumed_from.is_none());

    let b = cfg("b");
    // Stop inside the second epoch, after a checkpoint at step 4 and before the one at 8.
    let rb = train_reward_model(&b, &stop_at(7)).unwrap();
    assert!(!rb.finished && rb.steps == 7 && rb.output.is_none());
    let ck = b.run_dir.join("checkpoints");
    assert_eq!(
        std::fs::read_to_string(ck.join("LATEST")).unwrap().trim(),
        "step-000007"
    );
    // Corrupt the newest checkpoint: resume must verify, reject it and take step 4.
    let w = ck.join("step-000007/model/model.safetensors");
    let mut data = bytes(&w);
    let last = data.len() - 1;
    data[last] ^= 1;
    std::fs::write(&w, data).unwrap();
    let rb = train_reward_model(&b, &JobControl::default()).unwrap();
    assert_eq!(rb.resumed_from, Some(4));
    assert!(rb.finished && rb.steps == 12);

    for f in [
        "model/model.safetensors",
        "model/rlhf_reward.json",
        "model/config.json",
    ] {
        assert!(
            bytes(&a.run_dir.join(f)) == bytes(&b.run_dir.join(f)),
            "{f} differs between the uninterrupted and the resumed run"
        );
    }
    for f in ["optimizer.safetensors", "model/model.safetensors"] {
        let p = format!("checkpoints/step-000012/{f}");
        assert!(
            bytes(&a.run_dir.join(&p)) == bytes(&b.run_dir.join(&p)),
            "{p} differs"
        );
    }
    // The resumed run's log has every step once.
    let steps: Vec<u64> = std::fs::read_to_string(b.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    // Retention kept the newest three.
    let kept: Vec<u64> = rlhf_ckpt::list(&b.run_dir)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, [7, 8, 12]);

    // Rerunning a finished job trains nothing and writes the same model again.
    let again = train_reward_model(&a, &JobControl::default()).unwrap();
    assert_eq!((again.steps, again.resumed_from), (12, Some(12)));

    // Other data under the same run directory is refused, naming the checkpoint.
    write_jsonl(&train, &ratings_rows(44, 6));
    let e = train_reward_model(&a, &JobControl::default()).unwrap_err();
    assert!(matches!(e, TrainError::Resume { .. }), "{e}");
    assert!(e.to_string().contains("training data differs"), "{e}");
}

#[test]
fn sft_resumes_bitwise_and_resume_can_be_required() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("base"), 4);
    let train = tmp.path().join("chat.jsonl");
    let mut r = rng(9);
    let rows: Vec<_> = (0..10)
        .map(|i| {
            let reply = response(&mut r, 5, i % 3, i % 2 == 0);
            if i % 2 == 0 {
                json!({"messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Say something small."},
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": "Again."},
                    {"role": "assistant", "content": "good good"}]})
            } else {
                json!({"prompt": "Hi<extra_id_1>Assistant\nHello.<extra_id_1>User\nTalk.", "response": reply})
            }
        })
        .collect();
    write_jsonl(&train, &rows);
    let cfg = |run: &str| sft_config(&tmp.path().join(run), &model, &train);
    let a = cfg("a");
    let e = train_sft(
        &a,
        &JobControl {
            require_resume: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("no valid checkpoint"), "{e}");
    let ra = train_sft(&a, &JobControl::default()).unwrap();
    assert_eq!(ra.steps, 3);
    let b = cfg("b");
    assert!(!train_sft(&b, &stop_at(1)).unwrap().finished);
    let rb = train_sft(
        &b,
        &JobControl {
            require_resume: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(rb.resumed_from, Some(1));
    assert!(
        bytes(&a.run_dir.join("model/model.safetensors"))
            == bytes(&b.run_dir.join("model/model.safetensors")),
        "SFT weights differ after resume"
    );
    // The exported SFT model carries the tokenizer and loads as a causal LM.
    let md = rlhf_model::ModelDir::load(&b.run_dir.join("model"), &Default::default()).unwrap();
    assert_eq!(md.model.config.head, rlhf_model::HeadKind::CausalLm);
}
