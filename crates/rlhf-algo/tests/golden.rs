//! Golden tests: rlhf-algo against the independent PyTorch reference in
//! `scripts/golden/algo_golden.py`, which is run once per test binary into a temp dir. Covers GAE,
//! the KL estimators, PPO / PG losses and value losses with their gradients, RLOO, GRPO,
//! REINFORCE++, whitening, reward shaping, the adaptive KL controller, AdamW and grad clipping.
//! Agreement is required to 1e-6 (relative above 1) in f64.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use rlhf_algo::*;
use serde_json::Value;
use tch::{Kind, Tensor};

const TOL: f64 = 1e-6;

/// The venv python that setup-torch.sh prepared, else `python3` on PATH; whichever imports torch.
fn python() -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(venv) = std::env::var("RLHF_TORCH_VENV") {
        candidates.push(Path::new(&venv).join("bin").join("python"));
    }
    candidates.push(PathBuf::from("python3"));
    for c in &candidates {
        let ok = Command::new(c)
            .args(["-c", "import torch"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return c.clone();
        }
    }
    panic!(
        "no python with torch found (tried {candidates:?}); run `eval \"$(scripts/setup-torch.sh)\"` so \
         RLHF_TORCH_VENV points at the torch venv, or install torch for python3"
    );
}

fn golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/golden/algo_golden.py");
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("algo_golden.json");
        let run = Command::new(python())
            .arg(&script)
            .arg(&out)
            .output()
            .expect("run the golden script");
        assert!(
            run.status.success(),
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&run.stderr)
        );
        let text = std::fs::read_to_string(&out).expect("read golden json");
        serde_json::from_str(&text).expect("parse golden json")
    })
}

fn tensor(v: &Value) -> Tensor {
    let shape: Vec<i64> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let data: Vec<f64> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    Tensor::from_slice(&data).reshape(shape)
}

fn f(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("expected a number, got {v}"))
}

fn close(what: &str, got: f64, want: f64) {
    let tol = TOL * want.abs().max(1.0);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (diff {})",
        (got - want).abs()
    );
}

fn assert_tensor(what: &str, got: &Tensor, want: &Value) {
    let want_t = tensor(want);
    assert_eq!(got.size(), want_t.size(), "{what}: shape");
    let g = Vec::<f64>::try_from(got.to_kind(Kind::Double).reshape([-1])).unwrap();
    let w = Vec::<f64>::try_from(want_t.reshape([-1])).unwrap();
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        close(&format!("{what}[{i}]"), *a, *b);
    }
}

fn agg(name: &str) -> LossAgg {
    serde_json::from_value(Value::String(name.into())).unwrap()
}

#[test]
fn golden_gae() {
    let g = &golden()["gae"];
    let (r, v, m) = (
        tensor(&g["rewards"]),
        tensor(&g["values"]),
        tensor(&g["mask"]),
    );
    for case in g["cases"].as_array().unwrap() {
        let (gamma, lam) = (f(&case["gamma"]), f(&case["lam"]));
        let out = gae(&r, &v, &m, gamma, lam).unwrap();
        assert_tensor(
            &format!("gae advantages g={gamma} l={lam}"),
            &out.advantages,
            &case["advantages"],
        );
        assert_tensor(
            &format!("gae returns g={gamma} l={lam}"),
            &out.returns,
            &case["returns"],
        );
    }
}

#[test]
fn golden_kl_estimators() {
    let g = &golden()["kl"];
    let (lp, rf) = (tensor(&g["logprobs"]), tensor(&g["ref_logprobs"]));
    for (key, est) in [
        ("k1", KlEstimator::K1),
        ("k2", KlEstimator::K2),
        ("k3", KlEstimator::K3),
    ] {
        assert_tensor(key, &kl_estimate(&lp, &rf, est).unwrap(), &g[key]);
        let ones = lp.ones_like();
        assert_tensor(key, &kl_penalty(&lp, &rf, &ones, est).unwrap(), &g[key]);
    }
}

#[test]
fn golden_policy_losses_and_gradients() {
    let g = &golden()["ppo"];
    let old = tensor(&g["old_logprobs"]);
    let adv = tensor(&g["advantages"]);
    let ent = tensor(&g["entropy"]);
    let rf = tensor(&g["ref_logprobs"]);
    let mask = tensor(&g["mask"]);
    for (i, case) in g["cases"].as_array().unwrap().iter().enumerate() {
        let c = &case["config"];
        let cfg = PolicyLossConfig {
            kind: if c["kind"] == "pg" {
                PolicyLossKind::Pg
            } else {
                PolicyLossKind::Ppo
            },
            clip_eps: f(&c["clip_eps"]),
            dual_clip: c["dual_clip"].as_f64(),
            entropy_coef: c.get("entropy_coef").and_then(Value::as_f64).unwrap_or(0.0),
            agg: agg(c["agg"].as_str().unwrap()),
        };
        let kl = c.get("kl").map(|k| KlLossTerm {
            estimator: serde_json::from_value(k["estimator"].clone()).unwrap(),
            coef: f(&k["coef"]),
        });
        let lp = tensor(&g["logprobs"]).set_requires_grad(true);
        let inputs = PolicyLossInputs {
            logprobs: &lp,
            old_logprobs: &old,
            advantages: &adv,
            response_mask: &mask,
            entropy: Some(&ent),
            ref_logprobs: Some(&rf),
        };
        let out = policy_loss(&cfg, &inputs, kl).unwrap();
        let what = format!("policy case {i} {c}");
        close(
            &format!("{what}: loss"),
            out.loss.double_value(&[]),
            f(&case["loss"]),
        );
        close(
            &format!("{what}: pg_loss"),
            out.metrics.pg_loss,
            f(&case["pg_loss"]),
        );
        close(
            &format!("{what}: clip_frac"),
            out.metrics.clip_frac,
            f(&case["clip_frac"]),
        );
        close(
            &format!("{what}: approx_kl"),
            out.metrics.approx_kl,
            f(&case["approx_kl"]),
        );
        close(
            &format!("{what}: entropy"),
            out.metrics.entropy.unwrap(),
            f(&case["entropy"]),
        );
        match case["ref_kl"].as_f64() {
            Some(k) => close(&format!("{what}: ref_kl"), out.metrics.ref_kl.unwrap(), k),
            None => assert_eq!(out.metrics.ref_kl, None, "{what}"),
        }
        let grad = Tensor::run_backward(&[&out.loss], &[&lp], false, false);
        assert_tensor(&format!("{what}: grad"), &grad[0], &case["grad"]);
    }
    // The fixture must exercise clipping, or the clip branches would go untested.
    let fracs: Vec<f64> = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| f(&c["clip_frac"]))
        .collect();
    assert!(
        fracs.iter().any(|&x| x > 0.1),
        "fixture clips too little: {fracs:?}"
    );
    let dual: Vec<i64> = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["dual_active"].as_i64().unwrap())
        .collect();
    assert!(
        dual.iter().any(|&x| x > 0),
        "fixture never reaches the dual-clip bound: {dual:?}"
    );
}

#[test]
fn golden_value_losses_and_gradients() {
    let g = &golden()["value"];
    let old = tensor(&g["old_values"]);
    let ret = tensor(&g["returns"]);
    let mask = tensor(&g["mask"]);
    for (i, case) in g["cases"].as_array().unwrap().iter().enumerate() {
        let cfg = ValueLossConfig {
            clip: case["clip"].as_f64(),
            agg: agg(case["agg"].as_str().unwrap()),
        };
        let v = tensor(&g["values"]).set_requires_grad(true);
        let inputs = ValueLossInputs {
            values: &v,
            old_values: &old,
            returns: &ret,
            response_mask: &mask,
        };
        let out = value_loss(&cfg, &inputs).unwrap();
        let what = format!("value case {i} clip={:?} agg={:?}", cfg.clip, cfg.agg);
        close(
            &format!("{what}: loss"),
            out.loss.double_value(&[]),
            f(&case["loss"]),
        );
        close(
            &format!("{what}: metric loss"),
            out.metrics.value_loss,
            f(&case["loss"]),
        );
        close(
            &format!("{what}: clip_frac"),
            out.metrics.clip_frac,
            f(&case["clip_frac"]),
        );
        close(
            &format!("{what}: ev"),
            out.metrics.explained_variance,
            f(&case["explained_variance"]),
        );
        close(
            &format!("{what}: value_mean"),
            out.metrics.value_mean,
            f(&case["value_mean"]),
        );
        close(
            &format!("{what}: return_mean"),
            out.metrics.return_mean,
            f(&case["return_mean"]),
        );
        let grad = Tensor::run_backward(&[&out.loss], &[&v], false, false);
        assert_tensor(&format!("{what}: grad"), &grad[0], &case["grad"]);
    }
}

#[test]
fn golden_rloo_and_grpo() {
    let g = &golden()["grouped"];
    let scores = tensor(&g["scores"]);
    for case in g["rloo"].as_array().unwrap() {
        let n = case["n"].as_i64().unwrap();
        assert_tensor(
            &format!("rloo n={n}"),
            &rloo_advantages(&scores, n).unwrap(),
            &case["advantages"],
        );
    }
    for case in g["grpo"].as_array().unwrap() {
        let n = case["n"].as_i64().unwrap();
        let scale = case["scale_by_std"].as_bool().unwrap();
        let got = grpo_advantages(&scores, n, scale, f(&case["eps"])).unwrap();
        assert_tensor(
            &format!("grpo n={n} scale={scale}"),
            &got,
            &case["advantages"],
        );
    }
}

#[test]
fn golden_rloo_and_grpo_through_the_calculator() {
    // The calculator sums per-token rewards into the sequence score before the group baseline.
    let g = &golden()["grouped"];
    let scores = tensor(&g["scores"]);
    let b = scores.size()[0];
    // Score split over two response tokens of a 3-token row: (b,) -> (b, 3).
    let half = scores.unsqueeze(1) * 0.5;
    let rewards = Tensor::cat(
        &[
            half.shallow_clone(),
            half,
            Tensor::zeros([b, 1], (Kind::Double, tch::Device::Cpu)),
        ],
        1,
    );
    let mask = Tensor::from_slice(&[1.0, 1.0, 0.0])
        .unsqueeze(0)
        .expand([b, 3], false);
    let rloo = g["rloo"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["n"] == 4)
        .unwrap();
    let mut calc = AdvantageCalculator::new(AdvantageConfig {
        estimator: AdvantageEstimator::Rloo,
        ..Default::default()
    })
    .unwrap();
    let inputs = AdvantageInputs {
        token_rewards: &rewards,
        values: None,
        response_mask: &mask,
        group_size: 4,
    };
    let out = calc.compute(&inputs).unwrap();
    assert_tensor(
        "calculator rloo",
        &out.advantages.select(1, 0),
        &rloo["advantages"],
    );
    assert_tensor(
        "calculator rloo",
        &out.advantages.select(1, 1),
        &rloo["advantages"],
    );
    let grpo = g["grpo"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["n"] == 4 && c["scale_by_std"] == true)
        .unwrap();
    let mut calc = AdvantageCalculator::new(AdvantageConfig {
        estimator: AdvantageEstimator::Grpo,
        ..Default::default()
    })
    .unwrap();
    let out = calc.compute(&inputs).unwrap();
    assert_tensor(
        "calculator grpo",
        &out.advantages.select(1, 1),
        &grpo["advantages"],
    );
}

#[test]
fn golden_whitening_and_reinforce_pp() {
    let g = &golden()["per_token"];
    let mask = tensor(&g["mask"]);
    assert_tensor(
        "whiten",
        &masked_whiten(&tensor(&g["x"]), &mask, true).unwrap(),
        &g["whiten"],
    );
    let r = tensor(&g["rewards"]);
    for case in g["reinforce_pp"].as_array().unwrap() {
        let gamma = f(&case["gamma"]);
        assert_tensor(
            "reward-to-go",
            &discounted_returns(&r, &mask, gamma).unwrap(),
            &case["returns"],
        );
        assert_tensor(
            "reinforce++",
            &reinforce_pp_advantages(&r, &mask, gamma).unwrap(),
            &case["advantages"],
        );
        let cfg = AdvantageConfig {
            estimator: AdvantageEstimator::ReinforcePlusPlus,
            gamma,
            ..Default::default()
        };
        let mut calc = AdvantageCalculator::new(cfg).unwrap();
        let inputs = AdvantageInputs {
            token_rewards: &r,
            values: None,
            response_mask: &mask,
            group_size: 1,
        };
        let out = calc.compute(&inputs).unwrap();
        assert_tensor(
            "calculator reinforce++",
            &out.advantages,
            &case["advantages"],
        );
        assert_tensor(
            "calculator reinforce++ returns",
            &out.returns,
            &case["returns"],
        );
    }
}

#[test]
fn golden_reward_shaping() {
    let g = &golden()["reward"];
    let names: Vec<&str> = g["attribute_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    // The run file's default weights name the three attributes goodness uses; a five-head
    // SteerLM model needs complexity and verbosity listed at 0.
    let mut weights = RewardShapingConfig::default().attribute_weights;
    weights.insert("complexity".into(), 0.0);
    weights.insert("verbosity".into(), 0.0);
    let python_weights: std::collections::BTreeMap<String, f64> =
        serde_json::from_value(g["weights"].clone()).unwrap();
    assert_eq!(
        weights, python_weights,
        "default weights must be HelpSteer2 goodness"
    );
    let goodness = combine_attributes(&tensor(&g["attributes"]), &names, &weights).unwrap();
    assert_tensor("goodness", &goodness, &g["goodness"]);
    let flags: Vec<bool> = g["truncated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_bool().unwrap())
        .collect();
    let truncated = Tensor::from_slice(&flags);
    for case in g["shaped"].as_array().unwrap() {
        let cfg = RewardShapingConfig {
            mean: f(&g["mean"]),
            std: f(&g["std"]),
            truncation_penalty: case["truncation_penalty"].as_f64(),
            clip: case["clip"].as_f64(),
            ..Default::default()
        };
        assert_tensor(
            "shaped",
            &shape_rewards(&cfg, &goodness, Some(&truncated)).unwrap(),
            &case["rewards"],
        );
    }
    let tok = token_level_rewards(
        &tensor(&g["scores"]),
        &tensor(&g["mask"]),
        Some(&tensor(&g["kl"])),
        f(&g["kl_coef"]),
    )
    .unwrap();
    assert_tensor("token rewards", &tok, &g["token_rewards"]);
}

#[test]
fn golden_adaptive_kl_controller() {
    let g = &golden()["kl_controller"];
    let cfg = KlConfig {
        coef: f(&g["init"]),
        target: Some(f(&g["target"])),
        horizon: g["horizon"].as_u64().unwrap(),
        ..Default::default()
    };
    let mut c = KlController::new(&cfg).unwrap();
    let observed = g["observed"].as_array().unwrap();
    let n = g["n"].as_array().unwrap();
    for (i, ((kl, n), want)) in observed
        .iter()
        .zip(n)
        .zip(g["coefs"].as_array().unwrap())
        .enumerate()
    {
        let got = c.update(f(kl), n.as_u64().unwrap()).unwrap();
        close(&format!("kl coef after update {i}"), got, f(want));
    }
}

#[test]
fn golden_adamw_and_grad_clipping() {
    let g = &golden()["optim"]["adamw"];
    let w = tensor(&g["weight"]).set_requires_grad(true);
    let b = tensor(&g["bias"]).set_requires_grad(true);
    let betas = g["betas"].as_array().unwrap();
    let cfg = OptimizerConfig {
        beta1: f(&betas[0]),
        beta2: f(&betas[1]),
        eps: f(&g["eps"]),
        weight_decay: f(&g["weight_decay"]),
        ..Default::default()
    };
    let params = vec![
        ("layer.weight".to_string(), w.shallow_clone()),
        ("layer.bias".to_string(), b.shallow_clone()),
    ];
    let mut opt = AdamW::new(params, &cfg).unwrap();
    assert_eq!(
        opt.groups(),
        vec![("layer.weight", true), ("layer.bias", false)]
    );
    for (grads, lr) in g["grads"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["lrs"].as_array().unwrap())
    {
        opt.zero_grad().unwrap();
        let loss = (&w * tensor(&grads["weight"])).sum(Kind::Double)
            + (&b * tensor(&grads["bias"])).sum(Kind::Double);
        loss.backward();
        opt.step(f(lr)).unwrap();
    }
    assert_tensor("adamw weight", &w.detach(), &g["final_weight"]);
    assert_tensor("adamw bias", &b.detach(), &g["final_bias"]);

    let c = &golden()["optim"]["clip"];
    let grads: Vec<Tensor> = c["grads"].as_array().unwrap().iter().map(tensor).collect();
    let params: Vec<Tensor> = grads
        .iter()
        .map(|g| g.zeros_like().set_requires_grad(true))
        .collect();
    let loss = params
        .iter()
        .zip(&grads)
        .map(|(p, g)| (p * g).sum(Kind::Double))
        .fold(Tensor::from(0.0f64), |a, x| a + x);
    loss.backward();
    let refs: Vec<&Tensor> = params.iter().collect();
    let norm = clip_grad_norm(&refs, c["max_norm"].as_f64()).unwrap();
    close("pre-clip norm", norm, f(&c["norm"]));
    for (i, (p, want)) in params
        .iter()
        .zip(c["clipped"].as_array().unwrap())
        .enumerate()
    {
        assert_tensor(&format!("clipped grad {i}"), &p.grad(), want);
    }
}
