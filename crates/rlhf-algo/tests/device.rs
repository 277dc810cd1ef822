//! Device and dtype: every tensor-producing entry point returns its result on the inputs' device
//! and in their dtype, and f32 results agree with the f64 ones. Runs on the CPU by default; with
//! `RLHF_TEST_CUDA=1` it runs on GPU 0 instead (and fails if there is none).

use rlhf_algo::*;
use tch::{Device, Kind, Tensor};

struct Inputs {
    rewards: Tensor,
    values: Tensor,
    logprobs: Tensor,
    old: Tensor,
    reference: Tensor,
    mask: Tensor,
}

fn inputs(kind: Kind, dev: Device) -> Inputs {
    let (b, t) = (8, 16);
    let lens = Tensor::from_slice(&[16i64, 3, 9, 1, 12, 16, 5, 7]).unsqueeze(1);
    // (1, t) < (b, 1) -> (b, t): row i has lens[i] response tokens.
    let mask = Tensor::arange(t, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .lt_tensor(&lens);
    // Deterministic pseudo-random values (tch's global RNG is shared with concurrent tests).
    let mut salt = 0.0;
    let mut make = |scale: f64| {
        salt += 1.0;
        let i = Tensor::arange(b * t, (Kind::Double, Device::Cpu)).reshape([b, t]);
        ((&i * (1.7 + salt * 0.37) + salt).sin() * 1.3 + (&i * 0.11).cos() * 0.4) * scale
    };
    let logprobs = -make(1.0).abs();
    Inputs {
        rewards: make(0.5).to_kind(kind).to_device(dev),
        values: make(1.0).to_kind(kind).to_device(dev),
        old: (&logprobs + make(0.2)).to_kind(kind).to_device(dev),
        reference: (&logprobs + make(0.3)).to_kind(kind).to_device(dev),
        logprobs: logprobs.to_kind(kind).to_device(dev),
        mask: mask.to_device(dev),
    }
}

fn check(what: &str, x: &Tensor, kind: Kind, dev: Device) {
    assert_eq!(x.device(), dev, "{what}: device");
    assert_eq!(x.kind(), kind, "{what}: dtype");
}

/// Every output of the pipeline, as host f64 vectors, after checking device and dtype.
fn pipeline(kind: Kind, dev: Device) -> Vec<(String, Vec<f64>)> {
    let x = inputs(kind, dev);
    let mut out = Vec::new();
    let mut keep = |what: &str, t: &Tensor| {
        check(what, t, kind, dev);
        out.push((
            what.to_string(),
            Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap(),
        ));
    };
    let kl = kl_penalty(&x.old, &x.reference, &x.mask, KlEstimator::K3).unwrap();
    keep("kl", &kl);
    let scores = x.rewards.select(1, 0);
    let tok = token_level_rewards(&scores, &x.mask, Some(&kl), 0.05).unwrap();
    keep("token rewards", &tok);
    let adv = gae(&tok, &x.values, &x.mask, 1.0, 0.95).unwrap();
    keep("gae advantages", &adv.advantages);
    keep("gae returns", &adv.returns);
    keep(
        "whitened",
        &masked_whiten(&adv.advantages, &x.mask, true).unwrap(),
    );
    keep(
        "reinforce++",
        &reinforce_pp_advantages(&tok, &x.mask, 1.0).unwrap(),
    );
    keep("rloo", &rloo_advantages(&scores, 4).unwrap());
    keep("grpo", &grpo_advantages(&scores, 4, true, 1e-6).unwrap());
    let shaped = shape_rewards(
        &RewardShapingConfig {
            mean: 0.1,
            std: 2.0,
            clip: Some(1.0),
            ..Default::default()
        },
        &scores,
        None,
    );
    keep("shaped", &shaped.unwrap());

    let lp = x.logprobs.set_requires_grad(true);
    let inputs = PolicyLossInputs {
        logprobs: &lp,
        old_logprobs: &x.old,
        advantages: &adv.advantages,
        response_mask: &x.mask,
        entropy: None,
        ref_logprobs: Some(&x.reference),
    };
    let cfg = PolicyLossConfig {
        dual_clip: Some(3.0),
        ..Default::default()
    };
    let pl = policy_loss(
        &cfg,
        &inputs,
        Some(KlLossTerm {
            estimator: KlEstimator::K3,
            coef: 0.1,
        }),
    )
    .unwrap();
    keep("policy loss", &pl.loss);
    let g = Tensor::run_backward(&[&pl.loss], &[&lp], false, false);
    keep("policy grad", &g[0]);

    let v = x.values.set_requires_grad(true);
    let vin = ValueLossInputs {
        values: &v,
        old_values: &x.values,
        returns: &adv.returns,
        response_mask: &x.mask,
    };
    let vl = value_loss(&ValueLossConfig::default(), &vin).unwrap();
    keep("value loss", &vl.loss);
    let g = Tensor::run_backward(&[&vl.loss], &[&v], false, false);
    keep("value grad", &g[0]);
    out
}

#[test]
fn outputs_stay_on_the_input_device_and_dtype_and_f32_tracks_f64() {
    let dev = rlhf_model::cuda::test_device();
    let f64_out = pipeline(Kind::Double, dev);
    let f32_out = pipeline(Kind::Float, dev);
    for ((what, a), (_, b)) in f64_out.iter().zip(&f32_out) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "{what}[{i}]: f64 {x} vs f32 {y}"
            );
        }
    }
}
