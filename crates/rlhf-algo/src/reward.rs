//! Reward shaping: multi-attribute reward-model outputs to one scalar per response (weighted sum,
//! normalisation by stored statistics, truncation penalty, clipping), and the per-token reward
//! the advantage estimators consume: the scalar at each row's last response token plus
//! `-beta * kl_t` on every response token (InstructGPT, Ouyang et al. 2022).
//!
//! The default weights are HelpSteer2's "goodness" (Wang et al. 2024,
//! <https://arxiv.org/abs/2406.08673>): 0.65 helpfulness + 0.8 correctness + 0.45 coherence.

use std::collections::BTreeMap;

use rlhf_settings::RewardShapingConfig;
use tch::{Kind, Tensor};

use crate::error::{AlgoError, Result};
use crate::masked::{dims2, expect_shape, float_kind, Checks, Mask};

/// The five HelpSteer2 attributes, in the order SteerLM regression heads emit them.
pub const HELPSTEER2_ATTRIBUTES: [&str; 5] = [
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
];

fn cfg_err(key: &'static str, value: f64, reason: &'static str) -> AlgoError {
    AlgoError::Config {
        key,
        value: value.to_string(),
        reason,
    }
}

/// Weighted sum of attribute scores (b, a) whose columns are `attribute_names`, with weights
/// looked up by name: (b,). An attribute without a weight, or a weight for an attribute the model
/// does not emit, is an error naming it; so is a non-finite score (row and attribute column).
pub fn combine_attributes(
    attribute_scores: &Tensor,
    attribute_names: &[&str],
    weights: &BTreeMap<String, f64>,
) -> Result<Tensor> {
    let (_, a) = dims2("attribute_scores", attribute_scores)?;
    if a != attribute_names.len() as i64 {
        return Err(AlgoError::Shape {
            tensor: "attribute_scores",
            actual: attribute_scores.size(),
            expected: format!(
                "(batch, {}), one column per attribute name",
                attribute_names.len()
            ),
        });
    }
    let mut w = Vec::with_capacity(attribute_names.len());
    for name in attribute_names {
        match weights.get(*name) {
            Some(x) => w.push(*x),
            None => {
                return Err(AlgoError::Attribute {
                    name: name.to_string(),
                    reason: "is emitted by the reward model but has no weight; add it to reward.attribute_weights (0 ignores it)",
                })
            }
        }
    }
    if let Some(extra) = weights
        .keys()
        .find(|k| !attribute_names.contains(&k.as_str()))
    {
        return Err(AlgoError::Attribute {
            name: extra.clone(),
            reason:
                "has a weight but the reward model does not emit it; check reward.attribute_weights",
        });
    }
    let kind = float_kind("attribute_scores", attribute_scores)?;
    let mut checks = Checks::new();
    checks.finite("attribute_scores", attribute_scores, None)?;
    checks.run(&[])?;
    let w = Tensor::f_from_slice(&w)?
        .f_to_kind(kind)?
        .f_to_device(attribute_scores.device())?;
    // (b, a) x (a,) -> (b,)
    Ok(attribute_scores.f_detach()?.f_mv(&w)?)
}

/// Shapes per-sequence rewards (b,): `(r - mean) / std`, minus the truncation penalty where
/// `truncated` (b,) is set, then clipped. Non-finite inputs are an error naming the row.
pub fn shape_rewards(
    cfg: &RewardShapingConfig,
    rewards: &Tensor,
    truncated: Option<&Tensor>,
) -> Result<Tensor> {
    cfg.validate().map_err(|e| e.under("reward"))?;
    let b = rows_1d("rewards", rewards)?;
    float_kind("rewards", rewards)?;
    let mut checks = Checks::new();
    checks.finite("rewards", rewards, None)?;
    checks.run(&[])?;
    let mut r = rewards
        .f_detach()?
        .f_sub_scalar(cfg.mean)?
        .f_div_scalar(cfg.std)?;
    if let (Some(p), Some(tr)) = (cfg.truncation_penalty, truncated) {
        expect_shape("truncated", tr, &[b], "rewards")?;
        let flag = Mask::new("truncated", tr, r.f_kind()?)?;
        r = r.f_sub(&flag.weight.f_mul_scalar(p)?)?;
    }
    if let Some(c) = cfg.clip {
        r = r.f_clamp(-c, c)?;
    }
    Ok(r)
}

/// Mean and unbiased std of reward-model scores (n,), e.g. over the reward dataset's responses,
/// to store as [`RewardShapingConfig::mean`] and [`RewardShapingConfig::std`].
pub fn normalization_stats(scores: &Tensor) -> Result<(f64, f64)> {
    let n = rows_1d("scores", scores)?;
    if n < 2 {
        return Err(AlgoError::Shape {
            tensor: "scores",
            actual: scores.size(),
            expected: "at least 2 scores to estimate a std".into(),
        });
    }
    let x = scores.f_detach()?.f_to_kind(Kind::Double)?;
    let mut checks = Checks::new();
    checks.finite("scores", &x, None)?;
    let host = checks.run(&[&x.f_mean(None::<Kind>)?, &x.f_std(true)?])?;
    match host.as_slice() {
        [mean, std] => Ok((*mean, *std)),
        _ => Err(AlgoError::Shape {
            tensor: "scores",
            actual: scores.size(),
            expected: "(n,)".into(),
        }),
    }
}

/// Index of each row's last response token (b,) int64. Empty rows are an error.
pub fn last_response_index(response_mask: &Tensor) -> Result<Tensor> {
    let (_, t) = dims2("response_mask", response_mask)?;
    let m = Mask::new("response_mask", response_mask, Kind::Int64)?;
    let mut checks = Checks::new();
    checks.nonempty("response_mask", &m)?;
    checks.run(&[])?;
    last_index_on(&m, t)
}

fn last_index_on(m: &Mask, t: i64) -> Result<Tensor> {
    // Position + 1 on response tokens, 0 elsewhere; the row max is the last position + 1.
    let pos = Tensor::f_arange_start(1i64, t + 1, (Kind::Int64, m.on.device()))?;
    Ok(m.on
        .f_to_kind(Kind::Int64)?
        .f_mul(&pos)?
        .f_amax(1, false)?
        .f_sub_scalar(1)?)
}

/// Whether each row's response was cut without an EOS (b,) bool: its last response token is not
/// one of `eos_ids`. `response_ids` is aligned with `response_mask` (b, t).
pub fn truncated_rows(
    response_ids: &Tensor,
    response_mask: &Tensor,
    eos_ids: &[i64],
) -> Result<Tensor> {
    let (b, t) = dims2("response_ids", response_ids)?;
    expect_shape("response_mask", response_mask, &[b, t], "response_ids")?;
    if eos_ids.is_empty() {
        return Err(AlgoError::Config {
            key: "eos_ids",
            value: "[]".into(),
            reason: "must name at least one id",
        });
    }
    let last = last_response_index(response_mask)?;
    let tok = response_ids
        .f_gather(1, &last.f_unsqueeze(1)?, false)?
        .f_squeeze_dim(1)?; // (b,)
    let mut ends_with_eos = tok.f_eq(eos_ids[0])?;
    for id in &eos_ids[1..] {
        ends_with_eos = ends_with_eos.f_logical_or(&tok.f_eq(*id)?)?;
    }
    Ok(ends_with_eos.f_logical_not()?)
}

/// Per-token rewards (b, t): `scores` (b,) at each row's last response token, plus
/// `-kl_coef * kl` on every response token when `kl` (b, t) is given; 0 on masked positions.
pub fn token_level_rewards(
    scores: &Tensor,
    response_mask: &Tensor,
    kl: Option<&Tensor>,
    kl_coef: f64,
) -> Result<Tensor> {
    let (b, t) = dims2("response_mask", response_mask)?;
    expect_shape("scores", scores, &[b], "rows of response_mask")?;
    if let Some(k) = kl {
        expect_shape("kl", k, &[b, t], "response_mask")?;
    }
    if !kl_coef.is_finite() {
        return Err(cfg_err("kl.coef", kl_coef, "must be finite"));
    }
    let kind = float_kind("scores", scores)?;
    let m = Mask::new("response_mask", response_mask, kind)?;
    let mut checks = Checks::new();
    checks.nonempty("response_mask", &m)?;
    checks.finite("scores", scores, None)?;
    if let Some(k) = kl {
        checks.finite("kl", k, Some(&m))?;
    }
    checks.run(&[])?;
    let last = last_index_on(&m, t)?;
    let pos = Tensor::f_arange(t, (Kind::Int64, scores.device()))?;
    let at_last = pos.f_unsqueeze(0)?.f_eq_tensor(&last.f_unsqueeze(1)?)?; // (b, t)
                                                                           // (b,) -> (b, 1), broadcast over t
    let mut r = scores
        .f_detach()?
        .f_unsqueeze(1)?
        .f_expand([b, t], false)?
        .f_where_scalarother(&at_last, 0.0)?;
    if let Some(k) = kl {
        let penalty = m
            .zero_out(&k.f_detach()?.f_to_kind(kind)?)?
            .f_mul_scalar(-kl_coef)?;
        r = r.f_add(&penalty)?;
    }
    Ok(r)
}

fn rows_1d(name: &'static str, x: &Tensor) -> Result<i64> {
    match x.size().as_slice() {
        &[b] => Ok(b),
        actual => Err(AlgoError::Shape {
            tensor: name,
            actual: actual.to_vec(),
            expected: "(batch,)".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1(x: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(x).unwrap()
    }

    /// HelpSteer2's goodness over all five SteerLM heads (complexity and verbosity weigh 0).
    fn goodness() -> BTreeMap<String, f64> {
        let mut w = RewardShapingConfig::default().attribute_weights;
        w.insert("complexity".into(), 0.0);
        w.insert("verbosity".into(), 0.0);
        w
    }

    #[test]
    fn goodness_uses_the_helpsteer2_weights() {
        let scores =
            Tensor::from_slice(&[4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 4.0, 4.0]).reshape([2, 5]);
        let r = combine_attributes(&scores, &HELPSTEER2_ATTRIBUTES, &goodness()).unwrap();
        let want = [0.65 * 4.0 + 0.8 * 3.0 + 0.45 * 2.0, 0.0];
        for (a, b) in v1(&r).iter().zip(want) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn attribute_mismatches_are_named() {
        let w = goodness();
        let s = Tensor::zeros([1, 2], (Kind::Double, tch::Device::Cpu));
        match combine_attributes(&s, &["helpfulness", "humor"], &w) {
            Err(AlgoError::Attribute { name, .. }) => assert_eq!(name, "humor"),
            other => panic!("expected attribute error, got {other:?}"),
        }
        let w2: BTreeMap<String, f64> =
            [("helpfulness".to_string(), 1.0), ("extra".to_string(), 0.0)].into();
        let s1 = Tensor::zeros([1, 1], (Kind::Double, tch::Device::Cpu));
        match combine_attributes(&s1, &["helpfulness"], &w2) {
            Err(AlgoError::Attribute { name, .. }) => assert_eq!(name, "extra"),
            other => panic!("expected attribute error, got {other:?}"),
        }
        let nan = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0, f64::NAN]).reshape([1, 5]);
        match combine_attributes(&nan, &HELPSTEER2_ATTRIBUTES, &w) {
            Err(AlgoError::NonFinite { tensor, at, .. }) => {
                assert_eq!(
                    (tensor, at.row, at.column),
                    ("attribute_scores", 0, Some(4))
                )
            }
            other => panic!("expected non-finite error, got {other:?}"),
        }
    }

    #[test]
    fn shaping_normalises_penalises_then_clips() {
        let cfg = RewardShapingConfig {
            mean: 1.0,
            std: 2.0,
            truncation_penalty: Some(0.5),
            clip: Some(2.0),
            ..Default::default()
        };
        let r = Tensor::from_slice(&[3.0, 3.0, 11.0, -9.0]);
        let truncated = Tensor::from_slice(&[false, true, false, true]);
        let out = shape_rewards(&cfg, &r, Some(&truncated)).unwrap();
        assert_eq!(v1(&out), vec![1.0, 0.5, 2.0, -2.0]);
        let no_flags = shape_rewards(&cfg, &r, None).unwrap();
        assert_eq!(v1(&no_flags), vec![1.0, 1.0, 2.0, -2.0]);
        let bad = Tensor::from_slice(&[0.0, f64::INFINITY]);
        assert!(matches!(
            shape_rewards(&cfg, &bad, None),
            Err(AlgoError::NonFinite {
                tensor: "rewards",
                at: crate::error::Location {
                    row: 1,
                    column: None
                },
                ..
            })
        ));
        let cfg = RewardShapingConfig {
            std: 0.0,
            ..Default::default()
        };
        match shape_rewards(&cfg, &r, None) {
            Err(AlgoError::Settings(e)) => assert_eq!(e.key, "reward.std"),
            other => panic!("expected a settings error, got {other:?}"),
        }
    }

    #[test]
    fn normalization_stats_are_mean_and_unbiased_std() {
        let (m, s) = normalization_stats(&Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])).unwrap();
        assert!((m - 2.5).abs() < 1e-12);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-7);
    }

    #[test]
    fn truncation_is_read_from_the_last_response_token() {
        let ids = Tensor::from_slice(&[5i64, 6, 2, 0, 5, 6, 7, 8, 9, 2, 0, 0]).reshape([3, 4]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0]).reshape([3, 4]);
        let tr = truncated_rows(&ids, &mask, &[2]).unwrap();
        assert_eq!(
            Vec::<bool>::try_from(&tr).unwrap(),
            vec![false, true, false]
        );
        let tr = truncated_rows(&ids, &mask, &[2, 8]).unwrap();
        assert_eq!(
            Vec::<bool>::try_from(&tr).unwrap(),
            vec![false, false, false]
        );
    }

    #[test]
    fn token_rewards_put_the_score_last_and_kl_everywhere() {
        let scores = Tensor::from_slice(&[1.0, -2.0]);
        let mask = Tensor::from_slice(&[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]).reshape([2, 4]);
        let kl = Tensor::from_slice(&[9.0, 0.1, 0.2, 9.0, 0.3, f64::NAN, 0.4, 0.5]).reshape([2, 4]);
        let r = token_level_rewards(&scores, &mask, Some(&kl), 0.5).unwrap();
        let r = Vec::<Vec<f64>>::try_from(&r).unwrap();
        let want = [
            [0.0, -0.05, 1.0 - 0.1, 0.0],
            [-0.15, 0.0, -0.2, -2.0 - 0.25],
        ];
        for (row, w) in r.iter().zip(want) {
            for (a, b) in row.iter().zip(w) {
                assert!((a - b).abs() < 1e-12, "{r:?}");
            }
        }
        let empty = Tensor::from_slice(&[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]).reshape([2, 4]);
        assert!(matches!(
            token_level_rewards(&scores, &empty, None, 0.0),
            Err(AlgoError::EmptyRow { row: 0, .. })
        ));
    }
}
