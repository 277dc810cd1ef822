//! Training losses over `(batch, seq)` per-token tensors: the PPO clipped surrogate (Schulman et
//! al. 2017, <https://arxiv.org/abs/1707.06347>) with optional dual clip (Ye et al. 2020,
//! <https://arxiv.org/abs/1912.09729>), the plain policy-gradient loss of the REINFORCE family,
//! an entropy bonus, a KL-to-reference loss term, and the clipped value loss. Each returns the
//! scalar loss (differentiable w.r.t. the new logprobs or values) with its metrics, fetched in the
//! same single host transfer as the input checks.

use rlhf_settings::{KlLossTerm, LossAgg, PolicyLossConfig, PolicyLossKind, ValueLossConfig};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{AlgoError, Result};
use crate::kl::kl_estimate;
use crate::masked::{dims2, expect_shape, float_kind, mean_on, sum_on, var_on, Checks, Mask};

/// Reduces a per-token quantity (b, t) to a scalar with `agg` over the tokens `response_mask`
/// selects. Rows without a selected token are an error (they would divide by zero).
pub fn aggregate(per_token: &Tensor, response_mask: &Tensor, agg: LossAgg) -> Result<Tensor> {
    let (b, t) = dims2("per_token", per_token)?;
    expect_shape("response_mask", response_mask, &[b, t], "per_token")?;
    let m = Mask::new(
        "response_mask",
        response_mask,
        float_kind("per_token", per_token)?,
    )?;
    let mut checks = Checks::new();
    checks.nonempty("response_mask", &m)?;
    checks.run(&[])?;
    aggregate_on(&m, per_token, agg)
}

pub(crate) fn aggregate_on(m: &Mask, x: &Tensor, agg: LossAgg) -> Result<Tensor> {
    Ok(match agg {
        LossAgg::TokenMean => mean_on(m, x, None)?,
        LossAgg::SeqMeanTokenSum => sum_on(m, x, Some(1))?.f_mean(None::<Kind>)?,
        LossAgg::SeqMeanTokenMean => mean_on(m, x, Some(1))?.f_mean(None::<Kind>)?,
    })
}

fn cfg_err(key: &'static str, value: f64, reason: &'static str) -> AlgoError {
    AlgoError::Config {
        key,
        value: value.to_string(),
        reason,
    }
}

/// Inputs of [`policy_loss`]; all (b, t).
pub struct PolicyLossInputs<'a> {
    /// Logprobs of the sampled tokens under the policy being trained (carries the gradient).
    pub logprobs: &'a Tensor,
    /// Logprobs recorded at rollout time.
    pub old_logprobs: &'a Tensor,
    /// Advantages.
    pub advantages: &'a Tensor,
    /// 1 on response tokens.
    pub response_mask: &'a Tensor,
    /// Per-token entropy of the policy (from the logits); needed for the entropy bonus and metric.
    pub entropy: Option<&'a Tensor>,
    /// Reference-policy logprobs; needed when a [`KlLossTerm`] is given.
    pub ref_logprobs: Option<&'a Tensor>,
}

/// Host-side metrics of one policy-loss evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PolicyMetrics {
    /// The policy-gradient part of the loss (before entropy and KL terms).
    pub pg_loss: f64,
    /// Fraction of response tokens whose clipped branch is active (0 for `pg`).
    pub clip_frac: f64,
    /// KL(pi_old || pi) per token, k3 estimate over response tokens: how far this update moved.
    pub approx_kl: f64,
    /// Mean per-token entropy over response tokens, when entropies were given.
    pub entropy: Option<f64>,
    /// Mean per-token KL to the reference (with the term's estimator), when a KL term was given.
    pub ref_kl: Option<f64>,
}

/// A loss to call `backward` on, and its metrics.
#[derive(Debug)]
pub struct PolicyLoss {
    /// Scalar loss: `pg - entropy_coef * entropy + kl_coef * kl`, aggregated with `cfg.agg`.
    pub loss: Tensor,
    /// Metrics.
    pub metrics: PolicyMetrics,
}

/// Bound on |log(pi / pi_old)| before `exp`: beyond it f32 overflows (verl clamps the same way).
const MAX_LOG_RATIO: f64 = 20.0;

/// The actor loss for one (micro-)batch. Checks shapes, empty rows and non-finite inputs on
/// response tokens; garbage on masked positions neither reaches the loss nor its gradient.
pub fn policy_loss(
    cfg: &PolicyLossConfig,
    inputs: &PolicyLossInputs<'_>,
    kl: Option<KlLossTerm>,
) -> Result<PolicyLoss> {
    cfg.validate().map_err(|e| e.under("policy_loss"))?;
    let (b, t) = dims2("logprobs", inputs.logprobs)?;
    let shape = [b, t];
    expect_shape("old_logprobs", inputs.old_logprobs, &shape, "logprobs")?;
    expect_shape("advantages", inputs.advantages, &shape, "logprobs")?;
    expect_shape("response_mask", inputs.response_mask, &shape, "logprobs")?;
    if let Some(e) = inputs.entropy {
        expect_shape("entropy", e, &shape, "logprobs")?;
    }
    let ref_logprobs = match (kl, inputs.ref_logprobs) {
        (Some(_), None) => return Err(AlgoError::MissingField {
            field: "ref_logprobs",
            hint:
                "a KL loss term needs reference logprobs; compute them or use the KL-in-reward mode",
        }),
        (Some(_), Some(r)) => {
            expect_shape("ref_logprobs", r, &shape, "logprobs")?;
            Some(r)
        }
        (None, _) => None,
    };
    if cfg.entropy_coef != 0.0 && inputs.entropy.is_none() {
        return Err(AlgoError::MissingField {
            field: "entropy",
            hint: "policy_loss.entropy_coef is non-zero; pass per-token entropies or set it to 0",
        });
    }
    if let Some(k) = kl {
        if !(k.coef.is_finite() && k.coef >= 0.0) {
            return Err(cfg_err("kl.coef", k.coef, "must be finite and >= 0"));
        }
    }
    let m = Mask::new(
        "response_mask",
        inputs.response_mask,
        float_kind("logprobs", inputs.logprobs)?,
    )?;
    let mut checks = Checks::new();
    checks.nonempty("response_mask", &m)?;
    checks.finite("logprobs", inputs.logprobs, Some(&m))?;
    checks.finite("old_logprobs", inputs.old_logprobs, Some(&m))?;
    checks.finite("advantages", inputs.advantages, Some(&m))?;
    if let Some(e) = inputs.entropy {
        checks.finite("entropy", e, Some(&m))?;
    }
    if let Some(r) = ref_logprobs {
        checks.finite("ref_logprobs", r, Some(&m))?;
    }

    let logprobs = m.zero_out(inputs.logprobs)?;
    let old = m.zero_out(&inputs.old_logprobs.f_detach()?)?;
    let adv = m.zero_out(&inputs.advantages.f_detach()?)?;
    let log_ratio = logprobs
        .f_sub(&old)?
        .f_clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)?;

    let (per_token, clip_frac) = match cfg.kind {
        PolicyLossKind::Ppo => {
            let ratio = log_ratio.f_exp()?;
            let unclipped = adv.f_neg()?.f_mul(&ratio)?;
            let clipped = adv
                .f_neg()?
                .f_mul(&ratio.f_clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)?)?;
            let mut per_token = unclipped.f_maximum(&clipped)?;
            if let Some(c) = cfg.dual_clip {
                let bound = adv.f_mul_scalar(-c)?;
                let capped = per_token.f_minimum(&bound)?;
                per_token = capped.f_where_self(&adv.f_lt(0.0)?, &per_token)?;
            }
            let active = clipped.f_gt_tensor(&unclipped)?.f_to_kind(adv.f_kind()?)?;
            (per_token, mean_on(&m, &active, None)?)
        }
        PolicyLossKind::Pg => (
            adv.f_neg()?.f_mul(&logprobs)?,
            Tensor::f_zeros([], (Kind::Double, adv.device()))?,
        ),
    };
    let pg_loss = aggregate_on(&m, &per_token, cfg.agg)?;
    let mut loss = pg_loss.shallow_clone();

    // k3 of KL(pi_old || pi) from samples of pi_old: (r - 1) - log r with r = pi / pi_old.
    let approx_kl = {
        let lr = log_ratio.f_detach()?;
        mean_on(&m, &lr.f_exp()?.f_sub_scalar(1.0)?.f_sub(&lr)?, None)?
    };
    let mut extra = vec![pg_loss.f_detach()?, clip_frac, approx_kl];

    let entropy_slot = match inputs.entropy {
        Some(e) => {
            let e = m.zero_out(e)?;
            if cfg.entropy_coef != 0.0 {
                loss =
                    loss.f_sub(&aggregate_on(&m, &e, cfg.agg)?.f_mul_scalar(cfg.entropy_coef)?)?;
            }
            extra.push(mean_on(&m, &e.f_detach()?, None)?);
            Some(extra.len() - 1)
        }
        None => None,
    };
    let kl_slot = match (kl, ref_logprobs) {
        (Some(k), Some(r)) => {
            let per_token_kl =
                m.zero_out(&kl_estimate(&logprobs, &m.zero_out(r)?, k.estimator)?)?;
            loss = loss.f_add(&aggregate_on(&m, &per_token_kl, cfg.agg)?.f_mul_scalar(k.coef)?)?;
            extra.push(mean_on(&m, &per_token_kl.f_detach()?, None)?);
            Some(extra.len() - 1)
        }
        _ => None,
    };
    let refs: Vec<&Tensor> = extra.iter().collect();
    let host = checks.run(&refs)?;
    let at = |i: usize| host.get(i).copied().unwrap_or(f64::NAN);
    let metrics = PolicyMetrics {
        pg_loss: at(0),
        clip_frac: at(1),
        approx_kl: at(2),
        entropy: entropy_slot.map(at),
        ref_kl: kl_slot.map(at),
    };
    Ok(PolicyLoss { loss, metrics })
}

/// Inputs of [`value_loss`]; all (b, t).
pub struct ValueLossInputs<'a> {
    /// Values predicted by the critic being trained (carries the gradient).
    pub values: &'a Tensor,
    /// Values recorded at rollout time.
    pub old_values: &'a Tensor,
    /// Regression targets (see [`crate::advantages::Advantages::returns`]).
    pub returns: &'a Tensor,
    /// 1 on response tokens.
    pub response_mask: &'a Tensor,
}

/// Host-side metrics of one value-loss evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValueMetrics {
    /// The loss value.
    pub value_loss: f64,
    /// Fraction of response tokens where the clipped branch is the larger one and the clip
    /// saturates (|v - old| > clip): the tokens the clip took the gradient from.
    pub clip_frac: f64,
    /// `1 - Var(returns - values) / (Var(returns) + 1e-8)` over response tokens (unbiased
    /// variances): 1 is a perfect critic, 0 no better than a constant, negative worse.
    pub explained_variance: f64,
    /// Mean predicted value over response tokens.
    pub value_mean: f64,
    /// Mean return over response tokens.
    pub return_mean: f64,
}

/// A critic loss to call `backward` on, and its metrics.
#[derive(Debug)]
pub struct ValueLoss {
    /// Scalar loss `0.5 * max((V - R)^2, (V_clip - R)^2)` aggregated with `cfg.agg`, where
    /// `V_clip = V_old + clip(V - V_old, -c, c)`; `0.5 * (V - R)^2` without clipping.
    pub loss: Tensor,
    /// Metrics.
    pub metrics: ValueMetrics,
}

/// The critic loss for one (micro-)batch, with the same checks as [`policy_loss`].
pub fn value_loss(cfg: &ValueLossConfig, inputs: &ValueLossInputs<'_>) -> Result<ValueLoss> {
    cfg.validate().map_err(|e| e.under("value_loss"))?;
    let (b, t) = dims2("values", inputs.values)?;
    let shape = [b, t];
    expect_shape("old_values", inputs.old_values, &shape, "values")?;
    expect_shape("returns", inputs.returns, &shape, "values")?;
    expect_shape("response_mask", inputs.response_mask, &shape, "values")?;
    let m = Mask::new(
        "response_mask",
        inputs.response_mask,
        float_kind("values", inputs.values)?,
    )?;
    let mut checks = Checks::new();
    checks.nonempty("response_mask", &m)?;
    checks.finite("values", inputs.values, Some(&m))?;
    checks.finite("old_values", inputs.old_values, Some(&m))?;
    checks.finite("returns", inputs.returns, Some(&m))?;

    let values = m.zero_out(inputs.values)?;
    let old = m.zero_out(&inputs.old_values.f_detach()?)?;
    let returns = m.zero_out(&inputs.returns.f_detach()?)?;
    let unclipped = values.f_sub(&returns)?.f_square()?;
    let (per_token, clip_frac) = match cfg.clip {
        Some(c) => {
            let delta = values.f_sub(&old)?;
            let v_clip = old.f_add(&delta.f_clamp(-c, c)?)?;
            let clipped = v_clip.f_sub(&returns)?.f_square()?;
            // Active = the clipped branch wins *and* the clamp saturates. Inside the range
            // `old + (v - old)` differs from `v` by rounding alone, so without the second test
            // the metric would count float noise (and differ between equal runs that sum in
            // another order, e.g. data-parallel vs. one replica).
            let active = clipped
                .f_gt_tensor(&unclipped)?
                .f_logical_and(&delta.f_abs()?.f_gt(c)?)?
                .f_to_kind(values.f_kind()?)?;
            (unclipped.f_maximum(&clipped)?, mean_on(&m, &active, None)?)
        }
        None => (
            unclipped,
            Tensor::f_zeros([], (Kind::Double, values.device()))?,
        ),
    };
    let loss = aggregate_on(&m, &per_token, cfg.agg)?.f_mul_scalar(0.5)?;

    let v = values.f_detach()?;
    let residual_var = var_on(&m, &returns.f_sub(&v)?)?;
    let explained = residual_var
        .f_div(&var_on(&m, &returns)?.f_add_scalar(1e-8)?)?
        .f_neg()?
        .f_add_scalar(1.0)?;
    let extra = [
        loss.f_detach()?,
        clip_frac,
        explained,
        mean_on(&m, &v, None)?,
        mean_on(&m, &returns, None)?,
    ];
    let refs: Vec<&Tensor> = extra.iter().collect();
    let host = checks.run(&refs)?;
    let at = |i: usize| host.get(i).copied().unwrap_or(f64::NAN);
    let metrics = ValueMetrics {
        value_loss: at(0),
        clip_frac: at(1),
        explained_variance: at(2),
        value_mean: at(3),
        return_mean: at(4),
    };
    Ok(ValueLoss { loss, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_settings::KlEstimator;

    fn t2(rows: &[&[f64]]) -> Tensor {
        let b = rows.len() as i64;
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).reshape([b, -1])
    }

    fn grad_of(x: &Tensor, loss: &Tensor) -> Vec<Vec<f64>> {
        let g = Tensor::run_backward(&[loss], &[x], false, false);
        Vec::<Vec<f64>>::try_from(&g[0]).unwrap()
    }

    #[test]
    fn aggregation_modes_by_hand() {
        let x = t2(&[&[1.0, 2.0, 3.0], &[4.0, 0.0, 0.0]]);
        let m = t2(&[&[1.0, 1.0, 1.0], &[1.0, 0.0, 0.0]]);
        let v = |agg| aggregate(&x, &m, agg).unwrap().double_value(&[]);
        assert_eq!(v(LossAgg::TokenMean), 10.0 / 4.0);
        assert_eq!(v(LossAgg::SeqMeanTokenSum), (6.0 + 4.0) / 2.0);
        assert_eq!(v(LossAgg::SeqMeanTokenMean), (2.0 + 4.0) / 2.0);
        let empty = t2(&[&[1.0, 1.0, 1.0], &[0.0, 0.0, 0.0]]);
        assert!(matches!(
            aggregate(&x, &empty, LossAgg::TokenMean),
            Err(AlgoError::EmptyRow { row: 1, .. })
        ));
    }

    #[test]
    fn ppo_clips_in_both_directions() {
        // ratio 1.5 with A > 0 is clipped (no gradient); ratio 0.5 with A < 0 is clipped too.
        let old = t2(&[&[0.0, 0.0, 0.0]]);
        let lp = t2(&[&[1.5f64.ln(), 0.5f64.ln(), 1.1f64.ln()]]).set_requires_grad(true);
        let adv = t2(&[&[1.0, -1.0, 2.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0]]);
        let inputs = PolicyLossInputs {
            logprobs: &lp,
            old_logprobs: &old,
            advantages: &adv,
            response_mask: &mask,
            entropy: None,
            ref_logprobs: None,
        };
        let out = policy_loss(&PolicyLossConfig::default(), &inputs, None).unwrap();
        let want = (-1.2 + 0.8 - 2.2) / 3.0;
        assert!((out.loss.double_value(&[]) - want).abs() < 1e-12);
        assert!((out.metrics.clip_frac - 2.0 / 3.0).abs() < 1e-12);
        assert!(out.metrics.approx_kl > 0.0);
        let g = grad_of(&lp, &out.loss);
        assert_eq!(g[0][0], 0.0);
        assert_eq!(g[0][1], 0.0);
        assert!((g[0][2] - (-2.0 * 1.1 / 3.0)).abs() < 1e-12);
    }

    #[test]
    fn dual_clip_caps_negative_advantage_losses() {
        let old = t2(&[&[0.0, 0.0]]);
        let lp = t2(&[&[5f64.ln(), 5f64.ln()]]);
        let adv = t2(&[&[-1.0, 1.0]]);
        let mask = t2(&[&[1.0, 1.0]]);
        let inputs = PolicyLossInputs {
            logprobs: &lp,
            old_logprobs: &old,
            advantages: &adv,
            response_mask: &mask,
            entropy: None,
            ref_logprobs: None,
        };
        let cfg = PolicyLossConfig {
            dual_clip: Some(3.0),
            agg: LossAgg::SeqMeanTokenSum,
            ..Default::default()
        };
        let out = policy_loss(&cfg, &inputs, None).unwrap();
        // Token 0: max(5, 1.2) = 5 capped at 3; token 1: max(-5, -1.2) = -1.2.
        assert!((out.loss.double_value(&[]) - (3.0 - 1.2)).abs() < 1e-12);
        let no_dual = policy_loss(
            &PolicyLossConfig {
                dual_clip: None,
                ..cfg
            },
            &inputs,
            None,
        )
        .unwrap();
        assert!((no_dual.loss.double_value(&[]) - (5.0 - 1.2)).abs() < 1e-12);
    }

    #[test]
    fn entropy_bonus_and_kl_term_enter_the_loss() {
        let lp = t2(&[&[-1.0, -2.0]]).set_requires_grad(true);
        let old = lp.detach();
        let rf = t2(&[&[-1.5, -2.0]]);
        let adv = t2(&[&[0.0, 0.0]]);
        let ent = t2(&[&[2.0, 4.0]]);
        let mask = t2(&[&[1.0, 1.0]]);
        let inputs = PolicyLossInputs {
            logprobs: &lp,
            old_logprobs: &old,
            advantages: &adv,
            response_mask: &mask,
            entropy: Some(&ent),
            ref_logprobs: Some(&rf),
        };
        let cfg = PolicyLossConfig {
            entropy_coef: 0.1,
            ..Default::default()
        };
        let kl = KlLossTerm {
            estimator: KlEstimator::K1,
            coef: 0.5,
        };
        let out = policy_loss(&cfg, &inputs, Some(kl)).unwrap();
        // pg = 0, entropy mean 3, k1 mean (0.5 + 0) / 2.
        assert!((out.loss.double_value(&[]) - (-0.3 + 0.5 * 0.25)).abs() < 1e-12);
        assert_eq!(out.metrics.entropy, Some(3.0));
        assert_eq!(out.metrics.ref_kl, Some(0.25));
        assert_eq!(out.metrics.approx_kl, 0.0);
        let g = grad_of(&lp, &out.loss);
        assert!((g[0][0] - 0.25).abs() < 1e-12 && (g[0][1] - 0.25).abs() < 1e-12);
        let no_entropy = PolicyLossInputs {
            entropy: None,
            ..inputs
        };
        assert!(matches!(
            policy_loss(&cfg, &no_entropy, None),
            Err(AlgoError::MissingField {
                field: "entropy",
                ..
            })
        ));
        let no_ref = PolicyLossInputs {
            ref_logprobs: None,
            ..inputs
        };
        assert!(matches!(
            policy_loss(&cfg, &no_ref, Some(kl)),
            Err(AlgoError::MissingField {
                field: "ref_logprobs",
                ..
            })
        ));
    }

    #[test]
    fn garbage_on_masked_tokens_reaches_neither_loss_nor_gradient() {
        let lp = t2(&[&[f64::NAN, -1.0, f64::NEG_INFINITY]]).set_requires_grad(true);
        let old = t2(&[&[f64::INFINITY, -1.1, 0.0]]);
        let adv = t2(&[&[f64::NAN, 0.7, 1.0]]);
        let mask = t2(&[&[0.0, 1.0, 0.0]]);
        let inputs = PolicyLossInputs {
            logprobs: &lp,
            old_logprobs: &old,
            advantages: &adv,
            response_mask: &mask,
            entropy: None,
            ref_logprobs: None,
        };
        for agg in [
            LossAgg::TokenMean,
            LossAgg::SeqMeanTokenSum,
            LossAgg::SeqMeanTokenMean,
        ] {
            let cfg = PolicyLossConfig {
                agg,
                dual_clip: Some(3.0),
                ..Default::default()
            };
            let out = policy_loss(&cfg, &inputs, None).unwrap();
            assert!(out.loss.double_value(&[]).is_finite());
            let g = grad_of(&lp, &out.loss);
            assert_eq!(g[0][0], 0.0);
            assert_eq!(g[0][2], 0.0);
            assert!(g[0][1].is_finite() && g[0][1] != 0.0);
        }
    }

    #[test]
    fn nan_advantage_on_a_response_token_is_an_error() {
        let lp = t2(&[&[-1.0, -1.0], &[-1.0, -1.0]]);
        let adv = t2(&[&[0.0, 1.0], &[f64::NAN, 1.0]]);
        let mask = t2(&[&[1.0, 1.0], &[1.0, 1.0]]);
        let inputs = PolicyLossInputs {
            logprobs: &lp,
            old_logprobs: &lp,
            advantages: &adv,
            response_mask: &mask,
            entropy: None,
            ref_logprobs: None,
        };
        match policy_loss(&PolicyLossConfig::default(), &inputs, None) {
            Err(AlgoError::NonFinite { tensor, at, .. }) => {
                assert_eq!(tensor, "advantages");
                assert_eq!((at.row, at.column), (1, Some(0)));
            }
            other => panic!("expected a non-finite error, got {other:?}"),
        }
    }

    #[test]
    fn value_loss_clips_around_old_values() {
        let v = t2(&[&[1.0, 0.0]]).set_requires_grad(true);
        let old = t2(&[&[0.0, 0.0]]);
        let ret = t2(&[&[2.0, 1.0]]);
        let mask = t2(&[&[1.0, 1.0]]);
        let inputs = ValueLossInputs {
            values: &v,
            old_values: &old,
            returns: &ret,
            response_mask: &mask,
        };
        let out = value_loss(&ValueLossConfig::default(), &inputs).unwrap();
        // Token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(1, 1) = 1.
        assert!((out.loss.double_value(&[]) - 0.5 * (3.24 + 1.0) / 2.0).abs() < 1e-12);
        assert!((out.metrics.clip_frac - 0.5).abs() < 1e-12);
        let g = grad_of(&v, &out.loss);
        // Token 0 takes the clipped branch, whose gradient w.r.t. V is zero.
        assert_eq!(g[0][0], 0.0);
        assert!((g[0][1] - 0.5 * 2.0 * (0.0 - 1.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn explained_variance_of_a_perfect_and_a_constant_critic() {
        let ret = t2(&[&[1.0, 2.0, 3.0, 4.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0, 1.0]]);
        let cfg = ValueLossConfig {
            clip: None,
            ..Default::default()
        };
        let perfect = ValueLossInputs {
            values: &ret,
            old_values: &ret,
            returns: &ret,
            response_mask: &mask,
        };
        assert!(
            (value_loss(&cfg, &perfect)
                .unwrap()
                .metrics
                .explained_variance
                - 1.0)
                .abs()
                < 1e-9
        );
        let c = t2(&[&[2.5, 2.5, 2.5, 2.5]]);
        let constant = ValueLossInputs {
            values: &c,
            old_values: &c,
            returns: &ret,
            response_mask: &mask,
        };
        let m = value_loss(&cfg, &constant).unwrap().metrics;
        assert!(m.explained_variance.abs() < 1e-8);
        assert_eq!((m.value_mean, m.return_mean, m.clip_frac), (2.5, 2.5, 0.0));
    }

    #[test]
    fn out_of_range_settings_are_refused_naming_the_key() {
        let (lp, mask) = (t2(&[&[-1.0, -2.0]]), t2(&[&[1.0, 1.0]]));
        let inputs = PolicyLossInputs {
            logprobs: &lp,
            old_logprobs: &lp,
            advantages: &lp,
            response_mask: &mask,
            entropy: None,
            ref_logprobs: None,
        };
        let bad = PolicyLossConfig {
            clip_eps: 0.0,
            ..Default::default()
        };
        match policy_loss(&bad, &inputs, None) {
            Err(AlgoError::Settings(e)) => assert_eq!(e.key, "policy_loss.clip_eps"),
            other => panic!("expected a settings error, got {other:?}"),
        }
        let bad = ValueLossConfig {
            clip: Some(-1.0),
            ..Default::default()
        };
        let inputs = ValueLossInputs {
            values: &lp,
            old_values: &lp,
            returns: &lp,
            response_mask: &mask,
        };
        match value_loss(&bad, &inputs) {
            Err(AlgoError::Settings(e)) => assert_eq!(e.key, "value_loss.clip"),
            other => panic!("expected a settings error, got {other:?}"),
        }
    }
}
