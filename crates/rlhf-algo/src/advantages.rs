//! Advantage estimators: GAE for PPO (Schulman et al. 2016, <https://arxiv.org/abs/1506.02438>)
//! and the critic-free REINFORCE family: REINFORCE with a running-mean baseline (Williams 1992),
//! RLOO (Ahmadian et al. 2024, <https://arxiv.org/abs/2402.14740>), GRPO group normalisation
//! (Shao et al. 2024, <https://arxiv.org/abs/2402.03300>) and REINFORCE++ (Hu 2025,
//! <https://arxiv.org/abs/2501.03262>). Also the returns the critic regresses on.
//!
//! Conventions: per-token tensors are `(batch, seq)`; `response_mask` selects the tokens the
//! policy generated. The trajectory of a row is its masked tokens in order: masked positions in
//! between (prompt, padding, or the user turns of a multi-turn episode) are skipped, so the value
//! bootstrapped at a token is the value of the next *response* token, and the last response token
//! is terminal. Outputs are 0 on masked positions. Rows of the same prompt are consecutive
//! (prompt-major, as `repeat_interleave(n)` lays them out) for the grouped estimators.
//! Nothing here tracks gradients: advantages and returns are constants of the loss.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{AlgoError, Result};
use crate::masked::{dims2, expect_shape, float_kind, sum_on, whiten_on, Checks, Mask};

/// Which advantage estimator a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdvantageEstimator {
    /// Generalised advantage estimation with a critic (PPO).
    #[default]
    Gae,
    /// Sequence return minus a running-mean baseline.
    Reinforce,
    /// Sequence return minus the mean return of the other samples of the same prompt.
    Rloo,
    /// Sequence return normalised by its prompt group's mean (and std).
    Grpo,
    /// Discounted per-token reward-to-go, whitened over the batch.
    ReinforcePlusPlus,
}

/// Advantage estimation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AdvantageConfig {
    /// The estimator. Default `gae`.
    pub estimator: AdvantageEstimator,
    /// Discount gamma. Default `1.0`: episodes are one response, and InstructGPT-style PPO does
    /// not discount within it.
    pub gamma: f64,
    /// GAE lambda. Default `0.95` (the usual PPO value, TRL and verl).
    pub lam: f64,
    /// Whiten advantages over the batch's response tokens. Default `None`: whiten GAE advantages
    /// (as TRL and verl do for PPO) and leave the REINFORCE-family estimates as they are
    /// (REINFORCE++ whitens by definition regardless of this switch).
    pub whiten: Option<bool>,
    /// GRPO: divide by the group's (unbiased) std as well as subtracting its mean. Default `true`
    /// (the GRPO paper); `false` is the mean-only variant of Dr. GRPO.
    pub grpo_scale_by_std: bool,
    /// GRPO: added to the group std before dividing. Default `1e-6` (verl).
    pub grpo_eps: f64,
    /// REINFORCE: decay of the exponential moving average that serves as baseline,
    /// `b <- decay * b + (1 - decay) * mean(batch returns)`. Default `0.9`, a memory of about ten
    /// steps: rewards drift as the policy improves, so an all-time mean would lag behind.
    pub baseline_decay: f64,
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        AdvantageConfig {
            estimator: AdvantageEstimator::Gae,
            gamma: 1.0,
            lam: 0.95,
            whiten: None,
            grpo_scale_by_std: true,
            grpo_eps: 1e-6,
            baseline_decay: 0.9,
        }
    }
}

impl AdvantageConfig {
    /// Checks ranges; errors name the key.
    pub fn validate(&self) -> Result<()> {
        unit_interval("advantage.gamma", self.gamma)?;
        unit_interval("advantage.lam", self.lam)?;
        unit_interval("advantage.baseline_decay", self.baseline_decay)?;
        if !(self.grpo_eps.is_finite() && self.grpo_eps >= 0.0) {
            return Err(AlgoError::Config {
                key: "advantage.grpo_eps",
                value: self.grpo_eps.to_string(),
                reason: "must be finite and >= 0",
            });
        }
        Ok(())
    }

    /// Whether advantages get whitened after estimation (see [`AdvantageConfig::whiten`]).
    pub fn whitens(&self) -> bool {
        match self.estimator {
            AdvantageEstimator::ReinforcePlusPlus => false,
            e => self.whiten.unwrap_or(e == AdvantageEstimator::Gae),
        }
    }
}

fn unit_interval(key: &'static str, v: f64) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(AlgoError::Config {
            key,
            value: v.to_string(),
            reason: "must be in [0, 1]",
        })
    }
}

/// Per-token advantages and the returns a critic regresses on, both (b, t), 0 where masked.
#[derive(Debug)]
pub struct Advantages {
    /// A_t.
    pub advantages: Tensor,
    /// GAE: the lambda-return `A_t + V_t`; REINFORCE family: the discounted reward-to-go.
    pub returns: Tensor,
}

/// GAE advantages and lambda-returns from per-token `rewards` and critic `values` (b, t):
/// `delta_t = r_t + gamma * V_{t+1} - V_t`, `A_t = delta_t + gamma * lambda * A_{t+1}` over each
/// row's response tokens, with `V = 0` after the last one. Checks shapes, empty rows and
/// non-finite rewards/values on response tokens (one host transfer).
pub fn gae(
    rewards: &Tensor,
    values: &Tensor,
    response_mask: &Tensor,
    gamma: f64,
    lam: f64,
) -> Result<Advantages> {
    unit_interval("advantage.gamma", gamma)?;
    unit_interval("advantage.lam", lam)?;
    let m = checked_mask(rewards, Some(values), response_mask)?;
    let advantages = gae_on(&m, rewards, Some(values), gamma, lam)?;
    let returns = m.zero_out(&advantages.f_add(&values.f_detach()?)?)?;
    Ok(Advantages {
        advantages,
        returns,
    })
}

/// Discounted reward-to-go `G_t = r_t + gamma * G_{t+1}` over each row's response tokens (b, t).
pub fn discounted_returns(rewards: &Tensor, response_mask: &Tensor, gamma: f64) -> Result<Tensor> {
    unit_interval("advantage.gamma", gamma)?;
    let m = checked_mask(rewards, None, response_mask)?;
    gae_on(&m, rewards, None, gamma, 1.0)
}

/// REINFORCE++ advantages: the discounted reward-to-go of per-token `rewards` (which carry the
/// KL penalty), whitened over all response tokens of the batch (b, t).
pub fn reinforce_pp_advantages(
    rewards: &Tensor,
    response_mask: &Tensor,
    gamma: f64,
) -> Result<Tensor> {
    unit_interval("advantage.gamma", gamma)?;
    let m = checked_mask(rewards, None, response_mask)?;
    let returns = gae_on(&m, rewards, None, gamma, 1.0)?;
    whiten_on(&m, &returns, true)
}

/// RLOO advantages of per-sequence `scores` (b,): each score minus the mean score of the other
/// `group_size - 1` samples of its prompt, `A_i = r_i - (sum_j r_j - r_i) / (n - 1)`.
pub fn rloo_advantages(scores: &Tensor, group_size: i64) -> Result<Tensor> {
    check_groups("RLOO", scores, group_size)?;
    let _guard = tch::no_grad_guard();
    rloo_core(&scores.f_detach()?, group_size)
}

/// GRPO advantages of per-sequence `scores` (b,): `(r_i - mean_g) / (std_g + eps)` over the
/// prompt group `g`, with the unbiased std; only the mean is subtracted when `scale_by_std` is
/// false.
pub fn grpo_advantages(
    scores: &Tensor,
    group_size: i64,
    scale_by_std: bool,
    eps: f64,
) -> Result<Tensor> {
    check_groups("GRPO", scores, group_size)?;
    let _guard = tch::no_grad_guard();
    grpo_core(&scores.f_detach()?, group_size, scale_by_std, eps)
}

/// Per-sequence values (b,) repeated over each row's response tokens (b, t), 0 elsewhere.
pub fn broadcast_to_tokens(per_sequence: &Tensor, response_mask: &Tensor) -> Result<Tensor> {
    let (b, _) = dims2("response_mask", response_mask)?;
    expect_shape("per_sequence", per_sequence, &[b], "rows of response_mask")?;
    let m = Mask::new(
        "response_mask",
        response_mask,
        float_kind("per_sequence", per_sequence)?,
    )?;
    // (b,) -> (b, 1), broadcast against (b, t)
    m.zero_out(&per_sequence.f_unsqueeze(1)?.f_expand_as(&m.weight)?)
}

/// The REINFORCE baseline's state, to checkpoint with the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineState {
    /// Current baseline value; `None` until the first batch.
    pub value: Option<f64>,
    /// Batches seen.
    pub updates: u64,
}

/// Computes advantages and returns with the configured estimator, holding the state some
/// estimators carry between steps (the REINFORCE running-mean baseline).
#[derive(Debug, Clone)]
pub struct AdvantageCalculator {
    cfg: AdvantageConfig,
    baseline: BaselineState,
}

/// What [`AdvantageCalculator::compute`] needs for one rollout batch.
pub struct AdvantageInputs<'a> {
    /// Per-token rewards (b, t): the shaped scalar reward at each row's last response token plus
    /// any per-token KL penalty (see [`crate::reward::token_level_rewards`]).
    pub token_rewards: &'a Tensor,
    /// Critic values (b, t); required by GAE, ignored otherwise.
    pub values: Option<&'a Tensor>,
    /// 1 on response tokens (b, t).
    pub response_mask: &'a Tensor,
    /// Samples per prompt (consecutive rows); used by RLOO and GRPO, ignored otherwise.
    pub group_size: i64,
}

impl AdvantageCalculator {
    /// A calculator with a fresh baseline.
    pub fn new(cfg: AdvantageConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(AdvantageCalculator {
            cfg,
            baseline: BaselineState {
                value: None,
                updates: 0,
            },
        })
    }

    /// Restores a calculator from a checkpoint.
    pub fn from_state(cfg: AdvantageConfig, baseline: BaselineState) -> Result<Self> {
        cfg.validate()?;
        Ok(AdvantageCalculator { cfg, baseline })
    }

    /// The config it runs with.
    pub fn config(&self) -> &AdvantageConfig {
        &self.cfg
    }

    /// The state to checkpoint.
    pub fn state(&self) -> &BaselineState {
        &self.baseline
    }

    /// Advantages and returns for one batch. The REINFORCE family reduces the per-token rewards
    /// to a per-sequence return (their sum) and spreads the sequence advantage over the response
    /// tokens. Checks inputs first (one host transfer); REINFORCE also updates its baseline after
    /// using it, so the baseline never contains the batch it is subtracted from (except on the
    /// first batch, which has no history and uses its own mean).
    pub fn compute(&mut self, inputs: &AdvantageInputs<'_>) -> Result<Advantages> {
        let est = self.cfg.estimator;
        let values = match (est, inputs.values) {
            (AdvantageEstimator::Gae, None) => {
                return Err(AlgoError::MissingField {
                    field: "values",
                    hint:
                        "GAE needs critic values; compute them or pick a REINFORCE-family estimator",
                })
            }
            (AdvantageEstimator::Gae, Some(v)) => Some(v),
            _ => None,
        };
        if matches!(est, AdvantageEstimator::Rloo | AdvantageEstimator::Grpo) {
            let (b, _) = dims2("token_rewards", inputs.token_rewards)?;
            check_group_shape(estimator_name(est), "token_rewards", b, inputs.group_size)?;
        }
        let (b, t) = dims2("token_rewards", inputs.token_rewards)?;
        expect_shape(
            "response_mask",
            inputs.response_mask,
            &[b, t],
            "token_rewards",
        )?;
        if let Some(v) = values {
            expect_shape("values", v, &[b, t], "token_rewards")?;
        }
        let m = Mask::new(
            "response_mask",
            inputs.response_mask,
            float_kind("token_rewards", inputs.token_rewards)?,
        )?;
        let mut checks = Checks::new();
        checks.nonempty("response_mask", &m)?;
        checks.finite("token_rewards", inputs.token_rewards, Some(&m))?;
        if let Some(v) = values {
            checks.finite("values", v, Some(&m))?;
        }
        let _guard = tch::no_grad_guard();
        let rewards = inputs.token_rewards.f_detach()?;
        let scores = sum_on(&m, &rewards, Some(1))?; // (b,)
        let batch_mean = scores.f_mean(Kind::Double)?;
        let host = checks.run(&[&batch_mean])?;
        let gamma = self.cfg.gamma;

        let mut out = match est {
            AdvantageEstimator::Gae => {
                let v = values.ok_or(AlgoError::MissingField {
                    field: "values",
                    hint: "GAE needs critic values",
                })?;
                let advantages = gae_on(&m, &rewards, Some(v), gamma, self.cfg.lam)?;
                let returns = m.zero_out(&advantages.f_add(&v.f_detach()?)?)?;
                Advantages {
                    advantages,
                    returns,
                }
            }
            AdvantageEstimator::ReinforcePlusPlus => {
                let returns = gae_on(&m, &rewards, None, gamma, 1.0)?;
                let advantages = whiten_on(&m, &returns, true)?;
                Advantages {
                    advantages,
                    returns,
                }
            }
            AdvantageEstimator::Reinforce | AdvantageEstimator::Rloo | AdvantageEstimator::Grpo => {
                let per_seq = match est {
                    AdvantageEstimator::Rloo => rloo_core(&scores, inputs.group_size)?,
                    AdvantageEstimator::Grpo => grpo_core(
                        &scores,
                        inputs.group_size,
                        self.cfg.grpo_scale_by_std,
                        self.cfg.grpo_eps,
                    )?,
                    _ => {
                        let mean = host.first().copied().unwrap_or(0.0);
                        let baseline = self.baseline.value.unwrap_or(mean);
                        let d = self.cfg.baseline_decay;
                        self.baseline.value = Some(d * baseline + (1.0 - d) * mean);
                        self.baseline.updates += 1;
                        scores.f_sub_scalar(baseline)?
                    }
                };
                // (b,) -> (b, 1), broadcast over the response tokens
                let advantages = m.zero_out(&per_seq.f_unsqueeze(1)?.f_expand_as(&m.weight)?)?;
                let returns = gae_on(&m, &rewards, None, gamma, 1.0)?;
                Advantages {
                    advantages,
                    returns,
                }
            }
        };
        if self.cfg.whitens() {
            out.advantages = whiten_on(&m, &out.advantages, true)?;
        }
        Ok(out)
    }
}

fn estimator_name(e: AdvantageEstimator) -> &'static str {
    match e {
        AdvantageEstimator::Gae => "GAE",
        AdvantageEstimator::Reinforce => "REINFORCE",
        AdvantageEstimator::Rloo => "RLOO",
        AdvantageEstimator::Grpo => "GRPO",
        AdvantageEstimator::ReinforcePlusPlus => "REINFORCE++",
    }
}

/// Shape, emptiness and finiteness checks shared by the per-token estimators.
fn checked_mask(rewards: &Tensor, values: Option<&Tensor>, response_mask: &Tensor) -> Result<Mask> {
    let (b, t) = dims2("rewards", rewards)?;
    expect_shape("response_mask", response_mask, &[b, t], "rewards")?;
    if let Some(v) = values {
        expect_shape("values", v, &[b, t], "rewards")?;
    }
    let m = Mask::new(
        "response_mask",
        response_mask,
        float_kind("rewards", rewards)?,
    )?;
    let mut checks = Checks::new();
    checks.nonempty("response_mask", &m)?;
    checks.finite("rewards", rewards, Some(&m))?;
    if let Some(v) = values {
        checks.finite("values", v, Some(&m))?;
    }
    checks.run(&[])?;
    Ok(m)
}

fn check_group_shape(
    estimator: &'static str,
    tensor: &'static str,
    rows: i64,
    group_size: i64,
) -> Result<()> {
    if group_size < 2 {
        return Err(AlgoError::GroupSize {
            estimator,
            group_size,
        });
    }
    if rows % group_size != 0 {
        return Err(AlgoError::NotDivisible {
            tensor,
            rows,
            what: "group size",
            by: group_size,
        });
    }
    Ok(())
}

fn check_groups(estimator: &'static str, scores: &Tensor, group_size: i64) -> Result<()> {
    float_kind("scores", scores)?;
    let b = match scores.size().as_slice() {
        &[b] => b,
        actual => {
            return Err(AlgoError::Shape {
                tensor: "scores",
                actual: actual.to_vec(),
                expected: "(batch,)".into(),
            })
        }
    };
    check_group_shape(estimator, "scores", b, group_size)?;
    let mut checks = Checks::new();
    checks.finite("scores", scores, None)?;
    checks.run(&[])?;
    Ok(())
}

fn rloo_core(scores: &Tensor, n: i64) -> Result<Tensor> {
    let grouped = scores.f_view([-1, n])?; // (groups, n)
    let total = grouped.f_sum_dim_intlist(1, true, None::<Kind>)?; // (groups, 1)
    let others_mean = total.f_sub(&grouped)?.f_div_scalar((n - 1) as f64)?;
    Ok(grouped.f_sub(&others_mean)?.f_reshape([-1])?) // (b,)
}

fn grpo_core(scores: &Tensor, n: i64, scale_by_std: bool, eps: f64) -> Result<Tensor> {
    let grouped = scores.f_view([-1, n])?; // (groups, n)
    let centered = grouped.f_sub(&grouped.f_mean_dim(1, true, None::<Kind>)?)?;
    let adv = if scale_by_std {
        let std = grouped.f_std_dim(1, true, true)?; // (groups, 1), unbiased
                                                     // A group of equal scores has std 0; with eps = 0 that would be 0 / 0, so divide by 1.
        let denom = std.f_add_scalar(eps)?;
        centered.f_div(&denom.f_where_scalarother(&denom.f_gt(0.0)?, 1.0)?)?
    } else {
        centered
    };
    Ok(adv.f_reshape([-1])?) // (b,)
}

/// The backward recursion shared by GAE (with values) and reward-to-go (`values = None`,
/// `lam = 1`). One step per token column, vectorised over rows; masked columns of a row leave
/// its running advantage and next value untouched, which is what skips them.
fn gae_on(
    m: &Mask,
    rewards: &Tensor,
    values: Option<&Tensor>,
    gamma: f64,
    lam: f64,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let (b, t) = dims2("rewards", rewards)?;
    let r = m.zero_out(&rewards.f_detach()?)?;
    let v = match values {
        Some(v) => m.zero_out(&v.f_detach()?.f_to_kind(r.f_kind()?)?)?,
        None => r.f_zeros_like()?,
    };
    let options = (r.f_kind()?, r.device());
    let mut next_value = Tensor::f_zeros([b], options)?;
    let mut running = Tensor::f_zeros([b], options)?;
    let mut columns = Vec::with_capacity(t.max(0) as usize);
    for i in (0..t).rev() {
        let on = m.on.f_select(1, i)?;
        let v_i = v.f_select(1, i)?;
        let delta = r
            .f_select(1, i)?
            .f_add(&next_value.f_mul_scalar(gamma)?)?
            .f_sub(&v_i)?;
        let a = delta.f_add(&running.f_mul_scalar(gamma * lam)?)?;
        running = a.f_where_self(&on, &running)?;
        next_value = v_i.f_where_self(&on, &next_value)?;
        columns.push(a.f_where_scalarother(&on, 0.0)?);
    }
    columns.reverse();
    if columns.is_empty() {
        return Ok(r.f_zeros_like()?);
    }
    Ok(Tensor::f_stack(&columns, 1)?) // (b, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(rows: &[&[f64]]) -> Tensor {
        let b = rows.len() as i64;
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).reshape([b, -1])
    }

    fn rows(x: &Tensor) -> Vec<Vec<f64>> {
        Vec::<Vec<f64>>::try_from(x).unwrap()
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} != {b:?}");
        }
    }

    #[test]
    fn gae_by_hand_on_one_row() {
        // Prompt token, three response tokens, one pad.
        let r = t2(&[&[9.0, 0.0, 0.0, 1.0, 7.0]]);
        let v = t2(&[&[5.0, 0.5, 0.25, 0.75, 3.0]]);
        let m = t2(&[&[0.0, 1.0, 1.0, 1.0, 0.0]]);
        let (g, l) = (0.9, 0.5);
        let out = gae(&r, &v, &m, g, l).unwrap();
        let d3 = 1.0 - 0.75;
        let d2 = 0.0 + g * 0.75 - 0.25;
        let d1 = 0.0 + g * 0.25 - 0.5;
        let a3 = d3;
        let a2 = d2 + g * l * a3;
        let a1 = d1 + g * l * a2;
        close(&rows(&out.advantages)[0], &[0.0, a1, a2, a3, 0.0]);
        close(
            &rows(&out.returns)[0],
            &[0.0, a1 + 0.5, a2 + 0.25, a3 + 0.75, 0.0],
        );
    }

    #[test]
    fn gae_skips_gaps_inside_a_response() {
        // A masked observation token between two response tokens is invisible to the recursion.
        let r = t2(&[&[0.0, 123.0, 2.0], &[0.0, 2.0, 0.0]]);
        let v = t2(&[&[1.0, -50.0, 0.5], &[1.0, 0.5, 0.0]]);
        let m = t2(&[&[1.0, 0.0, 1.0], &[1.0, 1.0, 0.0]]);
        let out = gae(&r, &v, &m, 0.99, 0.95).unwrap();
        let a = rows(&out.advantages);
        close(&[a[0][0], a[0][2]], &[a[1][0], a[1][1]]);
        assert_eq!(a[0][1], 0.0);
    }

    #[test]
    fn gae_keeps_dtype_and_ignores_nan_padding() {
        let r = t2(&[&[f64::NAN, 1.0, f64::INFINITY]]).to_kind(Kind::Float);
        let v = t2(&[&[f64::NAN, 0.5, f64::NAN]]).to_kind(Kind::Float);
        let m = t2(&[&[0.0, 1.0, 0.0]]);
        let out = gae(&r, &v, &m, 1.0, 0.95).unwrap();
        assert_eq!(out.advantages.kind(), Kind::Float);
        let a = Vec::<f32>::try_from(out.advantages.view([-1])).unwrap();
        assert_eq!(a, vec![0.0, 0.5, 0.0]);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let r = t2(&[&[1.0, 2.0], &[1.0, f64::NAN]]);
        let v = t2(&[&[0.0, 0.0], &[0.0, 0.0]]);
        let m = t2(&[&[1.0, 1.0], &[1.0, 1.0]]);
        match gae(&r, &v, &m, 1.0, 0.95) {
            Err(AlgoError::NonFinite { tensor, at, .. }) => {
                assert_eq!(tensor, "rewards");
                assert_eq!((at.row, at.column), (1, Some(1)));
            }
            other => panic!("expected non-finite, got {other:?}"),
        }
        let empty = t2(&[&[1.0, 1.0], &[0.0, 0.0]]);
        match gae(&v, &v, &empty, 1.0, 0.95) {
            Err(AlgoError::EmptyRow { tensor, row }) => {
                assert_eq!((tensor, row), ("response_mask", 1))
            }
            other => panic!("expected empty row, got {other:?}"),
        }
        match gae(&v, &t2(&[&[0.0, 0.0, 0.0]]), &m, 1.0, 0.95) {
            Err(AlgoError::Shape { tensor, .. }) => assert_eq!(tensor, "values"),
            other => panic!("expected shape error, got {other:?}"),
        }
        match gae(&v, &v, &m, 1.5, 0.95) {
            Err(AlgoError::Config { key, .. }) => assert_eq!(key, "advantage.gamma"),
            other => panic!("expected config error, got {other:?}"),
        }
    }

    #[test]
    fn rloo_and_grpo_by_hand() {
        let s = Tensor::from_slice(&[1.0, 2.0, 3.0, 10.0, 10.0, 16.0]);
        let a = Vec::<f64>::try_from(rloo_advantages(&s, 3).unwrap()).unwrap();
        close(
            &a,
            &[
                1.0 - 2.5,
                2.0 - 2.0,
                3.0 - 1.5,
                10.0 - 13.0,
                10.0 - 13.0,
                16.0 - 10.0,
            ],
        );
        let g = Vec::<f64>::try_from(grpo_advantages(&s, 3, true, 0.0).unwrap()).unwrap();
        close(
            &g,
            &[
                -1.0,
                0.0,
                1.0,
                -2.0 / 12f64.sqrt(),
                -2.0 / 12f64.sqrt(),
                4.0 / 12f64.sqrt(),
            ],
        );
        let g = Vec::<f64>::try_from(grpo_advantages(&s, 3, false, 0.0).unwrap()).unwrap();
        close(&g, &[-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]);
        // Equal scores with eps = 0 give zero advantages, not 0 / 0.
        let flat = Tensor::from_slice(&[0.5, 0.5, 0.5, 1.0, 2.0, 3.0]);
        let g = Vec::<f64>::try_from(grpo_advantages(&flat, 3, true, 0.0).unwrap()).unwrap();
        close(&g, &[0.0, 0.0, 0.0, -1.0, 0.0, 1.0]);
    }

    #[test]
    fn grouped_estimators_reject_bad_groups() {
        let s = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0]);
        match rloo_advantages(&s, 1) {
            Err(AlgoError::GroupSize {
                estimator,
                group_size,
            }) => assert_eq!((estimator, group_size), ("RLOO", 1)),
            other => panic!("expected group-size error, got {other:?}"),
        }
        match grpo_advantages(&s, 3, true, 1e-6) {
            Err(AlgoError::NotDivisible { rows, by, .. }) => assert_eq!((rows, by), (4, 3)),
            other => panic!("expected divisibility error, got {other:?}"),
        }
        let s = Tensor::from_slice(&[1.0, 2.0, f64::NEG_INFINITY, 4.0]);
        match rloo_advantages(&s, 2) {
            Err(AlgoError::NonFinite { tensor, at, .. }) => {
                assert_eq!((tensor, at.row, at.column), ("scores", 2, None))
            }
            other => panic!("expected non-finite, got {other:?}"),
        }
    }

    #[test]
    fn reinforce_pp_whitens_reward_to_go() {
        let r = t2(&[&[0.0, 1.0, 0.0], &[2.0, 0.0, 3.0]]);
        let m = t2(&[&[1.0, 1.0, 0.0], &[1.0, 1.0, 1.0]]);
        let rtg = discounted_returns(&r, &m, 0.5).unwrap();
        close(&rows(&rtg)[0], &[0.5, 1.0, 0.0]);
        close(&rows(&rtg)[1], &[2.0 + 0.75, 1.5, 3.0]);
        let a = reinforce_pp_advantages(&r, &m, 0.5).unwrap();
        let mean = crate::masked::masked_mean(&a, &m, None)
            .unwrap()
            .double_value(&[]);
        assert!(mean.abs() < 1e-12);
    }

    #[test]
    fn calculator_spreads_sequence_advantages_and_tracks_the_baseline() {
        let cfg = AdvantageConfig {
            estimator: AdvantageEstimator::Reinforce,
            baseline_decay: 0.5,
            ..Default::default()
        };
        let mut calc = AdvantageCalculator::new(cfg).unwrap();
        let r = t2(&[&[0.0, 1.0, 0.0], &[0.0, 0.0, 3.0]]);
        let m = t2(&[&[0.0, 1.0, 1.0], &[0.0, 1.0, 1.0]]);
        let inputs = AdvantageInputs {
            token_rewards: &r,
            values: None,
            response_mask: &m,
            group_size: 1,
        };
        // First batch: the baseline is the batch mean 2.0.
        let out = calc.compute(&inputs).unwrap();
        close(&rows(&out.advantages)[0], &[0.0, -1.0, -1.0]);
        close(&rows(&out.advantages)[1], &[0.0, 1.0, 1.0]);
        assert_eq!(calc.state().value, Some(2.0));
        let r2 = t2(&[&[0.0, 6.0, 0.0], &[0.0, 0.0, 6.0]]);
        let inputs = AdvantageInputs {
            token_rewards: &r2,
            values: None,
            response_mask: &m,
            group_size: 1,
        };
        let out = calc.compute(&inputs).unwrap();
        close(&rows(&out.advantages)[0], &[0.0, 4.0, 4.0]);
        assert_eq!(calc.state().value, Some(4.0));
        close(&rows(&out.returns)[0], &[0.0, 6.0, 0.0]);
    }

    #[test]
    fn calculator_gae_whitens_by_default_and_needs_values() {
        let mut calc = AdvantageCalculator::new(AdvantageConfig::default()).unwrap();
        let r = t2(&[&[0.0, 1.0, 0.0], &[0.0, 0.0, 3.0]]);
        let v = t2(&[&[0.1, 0.2, 0.3], &[0.4, 0.5, 0.6]]);
        let m = t2(&[&[0.0, 1.0, 1.0], &[1.0, 1.0, 1.0]]);
        let no_values = AdvantageInputs {
            token_rewards: &r,
            values: None,
            response_mask: &m,
            group_size: 1,
        };
        match calc.compute(&no_values) {
            Err(AlgoError::MissingField { field, .. }) => assert_eq!(field, "values"),
            other => panic!("expected missing values, got {other:?}"),
        }
        let inputs = AdvantageInputs {
            token_rewards: &r,
            values: Some(&v),
            response_mask: &m,
            group_size: 1,
        };
        let out = calc.compute(&inputs).unwrap();
        let mean = crate::masked::masked_mean(&out.advantages, &m, None)
            .unwrap()
            .double_value(&[]);
        let var = crate::masked::masked_var(&out.advantages, &m)
            .unwrap()
            .double_value(&[]);
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-6);
        let raw = gae(&r, &v, &m, 1.0, 0.95).unwrap();
        assert!(raw.returns.allclose(&out.returns, 0.0, 0.0, false));
    }

    #[test]
    fn calculator_rloo_checks_group_size() {
        let cfg = AdvantageConfig {
            estimator: AdvantageEstimator::Rloo,
            ..Default::default()
        };
        let mut calc = AdvantageCalculator::new(cfg).unwrap();
        let r = t2(&[&[1.0], &[2.0], &[3.0]]);
        let m = t2(&[&[1.0], &[1.0], &[1.0]]);
        let inputs = AdvantageInputs {
            token_rewards: &r,
            values: None,
            response_mask: &m,
            group_size: 2,
        };
        match calc.compute(&inputs) {
            Err(AlgoError::NotDivisible { tensor, .. }) => assert_eq!(tensor, "token_rewards"),
            other => panic!("expected divisibility error, got {other:?}"),
        }
        let inputs = AdvantageInputs {
            token_rewards: &r,
            values: None,
            response_mask: &m,
            group_size: 3,
        };
        let out = calc.compute(&inputs).unwrap();
        close(
            &Vec::<f64>::try_from(out.advantages.view([-1])).unwrap(),
            &[-1.5, 0.0, 1.5],
        );
    }
}
