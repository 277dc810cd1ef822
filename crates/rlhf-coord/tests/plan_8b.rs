//! `rlhf-coord plan` on `cluster/example.yaml` with Llama-3-8B-shaped model directories (config
//! and safetensors headers only, no weights): the sharded training state per GPU, and what
//! still keeps it from fitting; under `models.lora` with the policy as reference, no reference
//! memory and the generators' adapters.

use std::path::Path;

mod common;
use common::{coord, text};

fn llama3_8b(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let (h, i, v, layers) = (4096u64, 14336u64, 128256u64, 32);
    std::fs::write(
        dir.join("config.json"),
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": v, "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": false, "torch_dtype": "bfloat16"
        })
        .to_string(),
    )
    .unwrap();
    let mut shapes: Vec<(String, Vec<u64>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
        ("lm_head.weight".into(), vec![v, h]),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![1024, h]),
            ("self_attn.v_proj.weight", vec![1024, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            shapes.push((format!("{p}{n}"), s));
        }
    }
    // The header, then a hole as long as the data it describes (a sparse file: no disk blocks).
    // plan reads shapes and offsets and checks the file is that long, never the data.
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (n, s) in shapes {
        let bytes = 2 * s.iter().product::<u64>();
        header.insert(
            n,
            serde_json::json!({"dtype": "BF16", "shape": s, "data_offsets": [off, off + bytes]}),
        );
        off += bytes;
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut f = (h.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(h.as_bytes());
    let len = f.len() as u64 + off;
    let path = dir.join("model.safetensors");
    std::fs::write(&path, f).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// `rlhf-coord plan cluster/example.yaml` over 8B-shaped models in `d`, with `extra` settings.
fn plan(d: &Path, extra: &[&str]) -> std::process::Output {
    for m in ["policy", "rm", "reward"] {
        llama3_8b(&d.join(m));
    }
    std::fs::write(d.join("p.jsonl"), "{\"prompt\":\"hi\"}\n").unwrap();
    std::fs::create_dir_all(d.join("mt")).unwrap();
    std::fs::write(
        d.join("mt/question.jsonl"),
        "{\"question_id\":1,\"category\":\"writing\",\"turns\":[\"hi\"]}\n",
    )
    .unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster/example.yaml");
    let set = |k: &str, v: &Path| format!("{k}={}", v.display());
    coord()
        .arg("plan")
        .arg(&example)
        .args(["--set", &set("models.policy", &d.join("policy"))])
        .args(["--set", &set("models.critic", &d.join("rm"))])
        .args(["--set", &set("models.reward.path", &d.join("reward"))])
        .args(["--set", &set("rollout.prompts", &d.join("p.jsonl"))])
        .args(["--set", &set("validation.mt_bench", &d.join("mt"))])
        .args(extra.iter().flat_map(|e| ["--set", e]))
        .output()
        .unwrap()
}

#[test]
fn example_yaml_at_8b_shards_the_training_state_to_60_gib_per_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let out = plan(tmp.path(), &[]);
    let t = text(&out);
    // Per actor or critic GPU (4 replicas, ZeRO 2, bf16 with f32 masters, 8.03e9 parameters):
    // weights 2P, grads 2P + 4P/4, optimizer 4P/4 + 8P/4 = 59.8 GiB in all.
    for dev in ["node 0 cuda:0", "node 1 cuda:3"] {
        let line = t.lines().find(|l| l.contains(dev)).unwrap_or_default();
        assert!(
            line.contains("14.958    22.436    22.436"),
            "{dev}: {line}\n{t}"
        );
    }
    // Generators: weights and a quarter of the rollout's KV cache (32 x 3072 tokens).
    let gen = t.lines().find(|l| l.contains("node 0 cuda:4")).unwrap();
    assert!(
        gen.contains("14.958     0.000     0.000    12.000"),
        "{gen}"
    );
    // With the gradients accumulated in place (stages 0/1) or one bucket at a time (stage 2)
    // the run fits: ~59.8 GiB of state plus ~2.2 GiB of checkpointed activations per training
    // GPU on 80 GB.
    assert!(out.status.success(), "{t}");
    let actor = t.lines().find(|l| l.contains("node 0 cuda:0")).unwrap();
    assert!(actor.contains("62.005"), "{actor}\n{t}");
}

#[test]
fn lora_with_the_policy_as_reference_counts_no_reference_and_the_generators_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let out = plan(tmp.path(), &["models.lora={}"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    // Reward and reference share node 1 cuda:4: only the reward model's 8B weights remain
    // (the reference is the actor's base with adapters off).
    let judges = t.lines().find(|l| l.contains("node 1 cuda:4")).unwrap();
    assert!(
        judges.contains("14.958     0.000     0.000"),
        "{judges}\n{t}"
    );
    // A generator holds the base plus rank-8 adapters on all seven projections: 20,971,520
    // bf16 values, 0.039 GiB.
    let gen = t.lines().find(|l| l.contains("node 0 cuda:4")).unwrap();
    assert!(
        gen.contains("14.997     0.000     0.000    12.000"),
        "{gen}\n{t}"
    );
}

#[test]
fn a_critic_placed_for_an_algorithm_without_one_counts_nothing() {
    // GRPO creates no critic (only PPO trains one), so the four critic GPUs hold nothing.
    let tmp = tempfile::tempdir().unwrap();
    let out = plan(
        tmp.path(),
        &["algorithm.name=grpo", "rollout.samples_per_prompt=4"],
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let critic = t.lines().find(|l| l.contains("node 1 cuda:3")).unwrap();
    assert!(
        critic.contains("0.000     0.000     0.000     0.000      0.000"),
        "{critic}\n{t}"
    );
}
