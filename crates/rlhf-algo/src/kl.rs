//! KL divergence to the frozen reference policy: per-token estimators and the coefficient
//! controllers (fixed, or adaptive towards a target as in Ziegler et al. 2019,
//! <https://arxiv.org/abs/1909.08593>, section 2.2).
//!
//! The estimators are Schulman's (<http://joschu.net/blog/kl-approx.html>) for
//! KL(pi || pi_ref) from tokens sampled from pi, with `log r = log pi_ref(x) - log pi(x)`:
//! `k1 = -log r` (unbiased, can be negative), `k2 = (log r)^2 / 2` (biased, low variance, >= 0),
//! `k3 = (r - 1) - log r` (unbiased, low variance, >= 0).

use rlhf_settings::{KlConfig, KlEstimator};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{AlgoError, Result};
use crate::masked::{dims2, expect_shape, float_kind, sum_on, Checks, Mask};

/// Largest |log r| fed to `exp` by k3: beyond it f32 would overflow (exp(89) > f32::MAX); verl
/// clamps at the same bound. Tokens past it get a clamped KL and no gradient through the exp.
const K3_MAX_LOG_RATIO: f64 = 20.0;

/// Elementwise KL estimate from `logprobs` (the sampling policy) and `ref_logprobs`, same shape,
/// differentiable w.r.t. `logprobs`. No mask is applied; see [`kl_penalty`] for the checked,
/// masked version.
pub fn kl_estimate(
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    estimator: KlEstimator,
) -> Result<Tensor> {
    expect_shape("ref_logprobs", ref_logprobs, &logprobs.size(), "logprobs")?;
    // log r = log pi_ref - log pi
    let log_ratio = ref_logprobs.f_detach()?.f_sub(logprobs)?;
    Ok(match estimator {
        KlEstimator::K1 => log_ratio.f_neg()?,
        KlEstimator::K2 => log_ratio.f_square()?.f_mul_scalar(0.5)?,
        KlEstimator::K3 => {
            let lr = log_ratio.f_clamp(-K3_MAX_LOG_RATIO, K3_MAX_LOG_RATIO)?;
            lr.f_exp()?.f_sub_scalar(1.0)?.f_sub(&lr)?
        }
    })
}

/// Per-token KL (b, t) for the tokens selected by `response_mask`, 0 elsewhere; differentiable
/// w.r.t. `logprobs`. Checks shapes, empty rows and non-finite logprobs on unmasked tokens.
pub fn kl_penalty(
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    response_mask: &Tensor,
    estimator: KlEstimator,
) -> Result<Tensor> {
    let (b, t) = dims2("logprobs", logprobs)?;
    expect_shape("ref_logprobs", ref_logprobs, &[b, t], "logprobs")?;
    expect_shape("response_mask", response_mask, &[b, t], "logprobs")?;
    let m = Mask::new(
        "response_mask",
        response_mask,
        float_kind("logprobs", logprobs)?,
    )?;
    let mut checks = Checks::new();
    checks.nonempty("response_mask", &m)?;
    checks.finite("logprobs", logprobs, Some(&m))?;
    checks.finite("ref_logprobs", ref_logprobs, Some(&m))?;
    checks.run(&[])?;
    let kl = kl_estimate(
        &m.zero_out(logprobs)?,
        &m.zero_out(ref_logprobs)?,
        estimator,
    )?;
    m.zero_out(&kl)
}

/// Mean over rows of the per-sequence summed KL: the quantity the adaptive controller compares
/// with its target (as TRL does). One host transfer.
pub fn mean_sequence_kl(kl: &Tensor, response_mask: &Tensor) -> Result<f64> {
    let (b, t) = dims2("kl", kl)?;
    expect_shape("response_mask", response_mask, &[b, t], "kl")?;
    let m = Mask::new("response_mask", response_mask, float_kind("kl", kl)?)?;
    let mut checks = Checks::new();
    checks.finite("kl", kl, Some(&m))?;
    let mean = sum_on(&m, &kl.f_detach()?, Some(1))?.f_mean(Kind::Double)?;
    let out = checks.run(&[&mean])?;
    Ok(out.first().copied().unwrap_or(0.0))
}

/// The KL coefficient as a value that evolves during training (fixed or adaptive).
#[derive(Debug, Clone, PartialEq)]
pub struct KlController {
    state: KlControllerState,
}

/// Everything a checkpoint needs to restore a [`KlController`] exactly. Serialises losslessly
/// with serde_json (this crate enables its `float_roundtrip` feature).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlControllerState {
    /// Current coefficient beta.
    pub coef: f64,
    /// Target KL per sequence; `None` for a fixed coefficient.
    pub target: Option<f64>,
    /// Horizon in samples.
    pub horizon: u64,
    /// Number of updates applied so far (for logging and sanity checks on resume).
    pub updates: u64,
}

impl KlController {
    /// A controller starting at `cfg.coef`; adaptive when `cfg.target` is set.
    pub fn new(cfg: &KlConfig) -> Result<Self> {
        cfg.validate().map_err(|e| e.under("kl"))?;
        Ok(KlController {
            state: KlControllerState {
                coef: cfg.coef,
                target: cfg.target,
                horizon: cfg.horizon,
                updates: 0,
            },
        })
    }

    /// Restores a controller from a checkpoint.
    pub fn from_state(state: KlControllerState) -> Result<Self> {
        let cfg = KlConfig {
            coef: state.coef,
            target: state.target,
            horizon: state.horizon,
            ..KlConfig::default()
        };
        cfg.validate().map_err(|e| e.under("kl"))?;
        Ok(KlController { state })
    }

    /// The state to checkpoint.
    pub fn state(&self) -> &KlControllerState {
        &self.state
    }

    /// The current coefficient beta.
    pub fn coef(&self) -> f64 {
        self.state.coef
    }

    /// Feeds the KL observed in one step (`observed_kl`, mean nats per sequence, see
    /// [`mean_sequence_kl`]) over `n_samples` sequences and returns the new coefficient. Fixed
    /// controllers ignore the observation. Adaptive: `e = clip(kl / target - 1, -0.2, 0.2)`,
    /// `beta *= 1 + e * n_samples / horizon` (Ziegler et al. 2019, as implemented in TRL).
    pub fn update(&mut self, observed_kl: f64, n_samples: u64) -> Result<f64> {
        if !observed_kl.is_finite() {
            return Err(AlgoError::NonFinite {
                tensor: "observed_kl",
                at: crate::error::Location {
                    row: 0,
                    column: None,
                },
                value: observed_kl,
            });
        }
        if let Some(target) = self.state.target {
            let error = (observed_kl / target - 1.0).clamp(-0.2, 0.2);
            let mult = 1.0 + error * n_samples as f64 / self.state.horizon as f64;
            self.state.coef *= mult;
        }
        self.state.updates += 1;
        tracing::debug!(
            observed_kl,
            n_samples,
            coef = self.state.coef,
            "kl controller update"
        );
        Ok(self.state.coef)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v).reshape([1, -1])
    }

    #[test]
    fn estimators_match_their_formulas() {
        let lp = t(&[-1.0, -2.0, -0.5]);
        let rf = t(&[-1.5, -1.0, -0.5]);
        let k1 = Vec::<f64>::try_from(kl_estimate(&lp, &rf, KlEstimator::K1).unwrap().view([-1]))
            .unwrap();
        assert_eq!(k1, vec![0.5, -1.0, 0.0]);
        let k2 = Vec::<f64>::try_from(kl_estimate(&lp, &rf, KlEstimator::K2).unwrap().view([-1]))
            .unwrap();
        assert_eq!(k2, vec![0.125, 0.5, 0.0]);
        let k3 = Vec::<f64>::try_from(kl_estimate(&lp, &rf, KlEstimator::K3).unwrap().view([-1]))
            .unwrap();
        let want = [(-0.5f64).exp() - 1.0 + 0.5, 1f64.exp() - 2.0, 0.0];
        for (a, b) in k3.iter().zip(want) {
            assert!((a - b).abs() < 1e-15);
        }
    }

    #[test]
    fn k3_stays_finite_for_extreme_ratios_in_f32() {
        let lp = t(&[-200.0]).to_kind(Kind::Float);
        let rf = t(&[-0.1]).to_kind(Kind::Float);
        let k3 = kl_estimate(&lp, &rf, KlEstimator::K3).unwrap();
        assert_eq!(k3.kind(), Kind::Float);
        assert!(k3.double_value(&[0, 0]).is_finite());
    }

    #[test]
    fn penalty_is_masked_and_rejects_nan_on_response_tokens() {
        let lp = t(&[f64::NAN, -1.0, -2.0]);
        let rf = t(&[0.0, -1.5, -2.0]);
        let mask = t(&[0.0, 1.0, 1.0]);
        let kl = kl_penalty(&lp, &rf, &mask, KlEstimator::K1).unwrap();
        assert_eq!(
            Vec::<f64>::try_from(kl.view([-1])).unwrap(),
            vec![0.0, 0.5, 0.0]
        );
        let bad = t(&[-1.0, f64::INFINITY, -2.0]);
        match kl_penalty(&bad, &rf, &mask, KlEstimator::K1) {
            Err(AlgoError::NonFinite { tensor, at, .. }) => {
                assert_eq!(tensor, "logprobs");
                assert_eq!((at.row, at.column), (0, Some(1)));
            }
            other => panic!("expected a non-finite error, got {other:?}"),
        }
    }

    #[test]
    fn mean_sequence_kl_sums_tokens_then_averages_rows() {
        let kl = Tensor::from_slice(&[1.0, 2.0, 9.0, 3.0, 0.0, 0.0]).reshape([2, 3]);
        let mask = Tensor::from_slice(&[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]).reshape([2, 3]);
        assert_eq!(mean_sequence_kl(&kl, &mask).unwrap(), 3.0);
    }

    #[test]
    fn fixed_controller_does_not_move() {
        let mut c = KlController::new(&KlConfig::default()).unwrap();
        assert_eq!(c.update(100.0, 128).unwrap(), 3e-3);
        assert_eq!(c.state().updates, 1);
    }

    #[test]
    fn adaptive_controller_moves_towards_target_and_is_capped() {
        let cfg = KlConfig {
            coef: 0.2,
            target: Some(6.0),
            horizon: 10_000,
            ..KlConfig::default()
        };
        let mut c = KlController::new(&cfg).unwrap();
        // KL far above target: the error saturates at +0.2.
        let up = c.update(60.0, 1000).unwrap();
        assert!((up - 0.2 * 1.02).abs() < 1e-15);
        // KL below target decreases the coefficient: 3 / 6 - 1 = -0.5, capped at -0.2.
        let down = c.update(3.0, 1000).unwrap();
        assert!((down - up * (1.0 - 0.2 * 0.1)).abs() < 1e-15);
        // Inside the cap the error is proportional: 6.6 / 6 - 1 = 0.1.
        let again = c.update(6.6, 1000).unwrap();
        assert!((again - down * (1.0 + 0.1 * 0.1)).abs() < 1e-15);
        match c.update(f64::NAN, 1) {
            Err(AlgoError::NonFinite { tensor, .. }) => assert_eq!(tensor, "observed_kl"),
            other => panic!("expected a non-finite error, got {other:?}"),
        }
    }

    #[test]
    fn controller_state_round_trips_exactly_through_json() {
        let cfg = KlConfig {
            coef: 0.1,
            target: Some(6.0),
            horizon: 777,
            ..KlConfig::default()
        };
        let mut c = KlController::new(&cfg).unwrap();
        for (i, kl) in [7.3, 1.1, 6.2, 12.0, 0.3].iter().enumerate() {
            c.update(*kl, 64 + i as u64).unwrap();
        }
        let json = serde_json::to_string(c.state()).unwrap();
        let mut restored = KlController::from_state(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(restored.coef().to_bits(), c.coef().to_bits());
        assert_eq!(restored, c);
        assert_eq!(
            restored.update(5.0, 64).unwrap().to_bits(),
            c.update(5.0, 64).unwrap().to_bits()
        );
    }

    #[test]
    fn config_validation_names_the_key() {
        let cfg = KlConfig {
            coef: -1.0,
            ..KlConfig::default()
        };
        match KlController::new(&cfg) {
            Err(AlgoError::Settings(e)) => assert_eq!(e.key, "kl.coef"),
            other => panic!("expected a settings error, got {other:?}"),
        }
        let restored = KlController::from_state(KlControllerState {
            coef: 0.1,
            target: Some(-1.0),
            horizon: 10,
            updates: 3,
        });
        match restored {
            Err(AlgoError::Settings(e)) => assert_eq!(e.key, "kl.target"),
            other => panic!("expected a settings error, got {other:?}"),
        }
    }

    #[test]
    fn a_saved_controller_state_still_loads() {
        // controller.json of a checkpoint written before the settings moved to rlhf-settings.
        let old = r#"{"coef":0.0031415,"target":6.0,"horizon":10000,"updates":12}"#;
        let c = KlController::from_state(serde_json::from_str(old).unwrap()).unwrap();
        assert_eq!(c.coef(), 0.0031415);
        assert_eq!(serde_json::to_string(c.state()).unwrap(), old);
    }
}
