//! LoRA in the worker's roles, in process: an actor with adapters computes the reference's
//! log-probs with its adapters off (bitwise those of a reference role on the same files) and
//! switches them back on afterwards, also after an error; a role without adapters refuses the
//! request; weight sync moves the adapter tensors only, and digests cover base plus adapters.

use std::path::Path;

use rlhf_algo::{OptimizerConfig, PolicyLossConfig, Precision, ValueLossConfig};
use rlhf_model::init::{init_model, InitSpec, Preset};
use rlhf_model::{Family, LoraConfig, Target};
use rlhf_worker::roles::{Role, RoleDetail, RoleSpec, Seqs, TrainerSpec};
use tch::{Device, Kind, Tensor};

const RANK: usize = 4;

fn model(dir: &Path) {
    init_model(&InitSpec::new(Family::Llama, Preset::Tiny), dir).unwrap();
}

fn lora() -> LoraConfig {
    LoraConfig::new(RANK, 8.0, 0.0, Target::ALL.to_vec())
}

fn spec(dir: &Path, detail: RoleDetail) -> RoleSpec {
    RoleSpec {
        role_id: "r".into(),
        model_path: dir.to_path_buf(),
        device: Device::Cpu,
        dtype: Kind::Float,
        seed: 3,
        detail,
    }
}

fn actor(dir: &Path, lora: Option<LoraConfig>) -> Role {
    let t = TrainerSpec {
        policy_loss: PolicyLossConfig::default(),
        value_loss: ValueLossConfig::default(),
        optim: OptimizerConfig::default(),
        total_steps: 0,
        micro_batch_size: 4,
        gradient_checkpointing: false,
        temperature: 1.0,
        kl_loss: None,
        precision: Precision::Mixed,
        zero_stage: 0,
        lora,
    };
    Role::create(&spec(dir, RoleDetail::Actor(t))).unwrap().0
}

/// Three rows: a left-padded prompt of width 3, responses of 4 tokens.
fn seqs() -> Seqs {
    let ids = Tensor::from_slice(&[
        0i64, 5, 6, 7, 8, 9, 10, //
        11, 12, 13, 14, 15, 16, 17, //
        0, 0, 20, 21, 22, 23, 24,
    ])
    .view([3, 7]);
    let mask = Tensor::from_slice(&[
        0i64, 1, 1, 1, 1, 1, 1, //
        1, 1, 1, 1, 1, 1, 1, //
        0, 0, 1, 1, 1, 1, 1,
    ])
    .view([3, 7]);
    Seqs {
        input_ids: ids,
        attention_mask: mask,
        prompt_width: 3,
        response_len: 4,
    }
}

/// Sets every adapter's B to small random values: fresh adapters (B = 0) compute the base
/// model, so switching them off would change nothing.
fn train_adapters(role: &Role) {
    let Role::Actor(t) = role else {
        panic!("an actor")
    };
    let lora = t.dir.model.lora().expect("adapters");
    tch::no_grad(|| {
        for (k, (name, mut b)) in lora.named_tensors().into_iter().enumerate() {
            if name.contains("lora_B") {
                tch::manual_seed(k as i64);
                b.copy_(&(Tensor::randn(b.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
}

fn adapters_on(role: &Role) -> bool {
    let Role::Actor(t) = role else {
        panic!("an actor")
    };
    t.dir.model.lora().expect("adapters").enabled()
}

#[test]
fn adapters_off_gives_the_reference_log_probs_and_switches_them_back_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("policy");
    model(&dir);
    let mut reference = Role::create(&spec(&dir, RoleDetail::Reference)).unwrap().0;
    let mut act = actor(&dir, Some(lora()));
    train_adapters(&act);

    let want = reference.logprobs(seqs(), 1.0, false).unwrap();
    let on = act.logprobs(seqs(), 1.0, false).unwrap();
    let off = act.logprobs(seqs(), 1.0, true).unwrap();
    assert!(
        !on.allclose(&want, 1e-6, 1e-6, false),
        "trained adapters must change the log-probs"
    );
    // The same weights and the same code path: bitwise equal.
    assert_eq!(off, want, "adapters off must compute the reference");
    assert!(
        adapters_on(&act),
        "the adapters are back on after the request"
    );
    assert_eq!(act.logprobs(seqs(), 1.0, false).unwrap(), on);

    // A failed request (prompt width past the sequence) leaves the adapters on too.
    let mut bad = seqs();
    bad.prompt_width = 9;
    let e = act.logprobs(bad, 1.0, true).unwrap_err().to_string();
    assert!(e.contains("prompt_width"), "{e}");
    assert!(adapters_on(&act), "the adapters are back on after an error");

    // Roles without adapters refuse, naming the field.
    let mut plain = actor(&dir, None);
    let e = plain.logprobs(seqs(), 1.0, true).unwrap_err().to_string();
    assert!(
        e.contains("adapters_off") && e.contains("no LoRA adapters"),
        "{e}"
    );
    let e = reference
        .logprobs(seqs(), 1.0, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapters_off"), "{e}");
}

#[test]
fn weight_sync_moves_the_adapters_only_and_digests_cover_base_and_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("policy");
    model(&dir);
    let act = actor(&dir, Some(lora()));
    let lora_gen = Role::create(&spec(&dir, RoleDetail::Generator(Some(lora()))))
        .unwrap()
        .0;
    let plain_gen = Role::create(&spec(&dir, RoleDetail::Generator(None)))
        .unwrap()
        .0;

    let bytes = |v: &[(String, Tensor)]| -> usize {
        v.iter()
            .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    };
    let sent = act.sync_tensors("SyncWeights").unwrap();
    // Tiny preset: hidden 64, intermediate 176, q 64, k/v 32, 2 layers; rank * (in + out) per
    // adapted projection: q 128, k 96, v 96, o 128, gate/up/down 240 each = 1168 per layer.
    assert_eq!(bytes(&sent), 2 * RANK * 1168 * 4);
    assert!(
        sent.iter()
            .all(|(n, _)| n.ends_with("lora_A.weight") || n.ends_with("lora_B.weight")),
        "only adapter tensors are synced: {:?}",
        sent.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    // The LoRA generator receives into the same layout; a plain one would get full weights.
    let got = lora_gen.sync_tensors("SyncWeights").unwrap();
    let names = |v: &[(String, Tensor)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(&sent));
    let full = plain_gen.sync_tensors("SyncWeights").unwrap();
    assert!(bytes(&full) > 10 * bytes(&sent), "{}", bytes(&full));

    // Digests: the base weights then the adapters, the same list on actor and generator.
    let d = act.digest_tensors("WeightsDigest").unwrap();
    assert_eq!(d.len(), full.len() + sent.len());
    assert_eq!(names(&d[..full.len()]), names(&full));
    assert_eq!(names(&d[full.len()..]), names(&sent));
    assert_eq!(
        names(&lora_gen.digest_tensors("WeightsDigest").unwrap()),
        names(&d)
    );
}
