//! `rlhf-settings`: the one definition of each algorithm setting — loss aggregation, the policy
//! and value losses, the KL penalty, reward shaping and the AdamW optimizer with its learning-rate
//! schedule — with the range rules every reader applies ([`SettingsError`] names the key).
//!
//! The run file embeds these types as they are (`algorithm.kl`, `algorithm.reward`,
//! `train.actor`, `train.critic`: `rlhf-config`), the reward-model and SFT job files embed
//! [`OptimizerConfig`] as `optim` (`rlhf-train`), `rlhf-algo` computes with them, and
//! `rlhf-proto` carries them to the workers as typed messages. Serde spelling is the run file's:
//! snake_case keys and values (`loss_agg: seq_mean_token_mean`, `estimator: k3`,
//! `schedule: cosine`); every struct denies unknown keys and fills missing ones from its
//! `Default`. Doc comments state each default (`rlhf-config`'s `defaults` test reads them).
//!
//! May use: serde and thiserror only. Knows nothing about tch, tonic/prost, figment, the
//! controller or the workers, so that both the config crate (no tch) and the algorithm crate
//! (no gRPC) can depend on it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A setting out of its range. `key` is the field's name inside its section (`lr`,
/// `attribute_weights.helpfulness`); [`SettingsError::under`] prefixes the section a reader
/// knows it by (`train.actor`, `optim`, `kl`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{key}` = {value}: {reason}")]
pub struct SettingsError {
    /// Dotted key of the value at fault.
    pub key: String,
    /// The value given.
    pub value: String,
    /// Why it is rejected and what is allowed.
    pub reason: String,
}

impl SettingsError {
    fn new(key: impl Into<String>, value: impl ToString, reason: impl Into<String>) -> Self {
        SettingsError {
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// The same error with `section.` put in front of its key.
    pub fn under(mut self, section: &str) -> Self {
        if !section.is_empty() {
            self.key = format!("{section}.{}", self.key);
        }
        self
    }
}

/// Result of the range checks.
pub type Result<T, E = SettingsError> = std::result::Result<T, E>;

fn check(key: &str, v: f64, ok: bool, reason: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(SettingsError::new(key, v, reason))
    }
}

fn finite(key: &str, v: f64) -> Result<()> {
    check(key, v, v.is_finite(), "must be finite")
}

fn positive(key: &str, v: f64) -> Result<()> {
    check(key, v, v.is_finite() && v > 0.0, "must be finite and > 0")
}

fn non_negative(key: &str, v: f64) -> Result<()> {
    check(key, v, v.is_finite() && v >= 0.0, "must be finite and >= 0")
}

/// How per-token losses are reduced to a scalar (the names follow verl's `loss_agg_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAgg {
    /// Mean over all response tokens of the minibatch: long responses weigh more.
    #[default]
    TokenMean,
    /// Sum over each sequence's tokens, mean over sequences (Dr. GRPO without the length bias
    /// of a per-sequence mean; the scale grows with length).
    SeqMeanTokenSum,
    /// Mean over each sequence's tokens, mean over sequences (the original GRPO).
    SeqMeanTokenMean,
}

/// Estimator of the per-token KL divergence from the reference, from tokens sampled from the
/// policy (Schulman, <http://joschu.net/blog/kl-approx.html>).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `log p - log q`: unbiased, can be negative; what InstructGPT and TRL put in the reward.
    #[default]
    K1,
    /// `(log p - log q)^2 / 2`: non-negative, biased, low variance.
    K2,
    /// `exp(log q - log p) - 1 - (log q - log p)`: unbiased and non-negative; what GRPO uses as
    /// a loss term.
    K3,
}

impl KlEstimator {
    /// The name used in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            KlEstimator::K1 => "k1",
            KlEstimator::K2 => "k2",
            KlEstimator::K3 => "k3",
        }
    }
}

/// Where the KL penalty enters the objective.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlMode {
    /// Subtracted from the per-token reward (`-coef * kl(t)`; InstructGPT, HelpSteer2 PPO).
    #[default]
    Reward,
    /// Added to the policy loss as `coef * agg(kl(t))`, differentiated through the policy
    /// (GRPO).
    Loss,
}

/// `algorithm.kl:` — the KL penalty against the reference model; adaptive as in Ziegler et al.
/// 2019 (<https://arxiv.org/abs/1909.08593>, section 2.2) when `target` is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KlConfig {
    /// KL coefficient (initial value when adaptive); >= 0. Default: 0.003 (HelpSteer2's PPO).
    pub coef: f64,
    /// `k1`, `k2` or `k3`. Default: `k1`.
    pub estimator: KlEstimator,
    /// `reward` or `loss`. Default: `reward`.
    pub mode: KlMode,
    /// Target KL (nats per sequence) of the adaptive controller; > 0 when set. Default: null
    /// (fixed coefficient). Ziegler et al. use 6 for stylistic continuation.
    pub target: Option<f64>,
    /// Adaptive controller horizon in samples: the coefficient moves by at most 20% per
    /// `horizon` samples; >= 1. Default: 10000 (Ziegler et al., TRL).
    pub horizon: u64,
}

impl Default for KlConfig {
    fn default() -> Self {
        KlConfig {
            coef: 0.003,
            estimator: KlEstimator::K1,
            mode: KlMode::Reward,
            target: None,
            horizon: 10_000,
        }
    }
}

impl KlConfig {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        non_negative("coef", self.coef)?;
        if let Some(t) = self.target {
            positive("target", t)?;
            if self.horizon == 0 {
                return Err(SettingsError::new(
                    "horizon",
                    0,
                    "must be > 0 when target is set",
                ));
            }
        }
        Ok(())
    }
}

/// The KL-to-reference term of the actor's loss under [`KlMode::Loss`]: the coordinator sends
/// the run's estimator and its current coefficient when it creates the actor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KlLossTerm {
    /// Per-token estimator (GRPO uses k3).
    pub estimator: KlEstimator,
    /// Coefficient beta; finite and >= 0.
    pub coef: f64,
}

/// `algorithm.reward:` — turning reward-model outputs into the scalar reward.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardShapingConfig {
    /// Weights of a multi-attribute reward model's outputs, by attribute name; every attribute
    /// the model emits needs an entry (0 ignores it). A file, variable or `--set` that names
    /// this map replaces it whole. Default: HelpSteer2's "goodness",
    /// `{coherence: 0.45, correctness: 0.8, helpfulness: 0.65}`.
    pub attribute_weights: BTreeMap<String, f64>,
    /// Subtracted from the weighted reward before dividing by `std`. Default: 0.0.
    pub mean: f64,
    /// Divides the centred reward; > 0. Default: 1.0.
    pub std: f64,
    /// Clip the normalised reward to [-clip, clip]; > 0 when set. Default: null (off);
    /// DeepSpeed-Chat uses 5.
    pub clip: Option<f64>,
    /// Subtracted from the normalised reward of responses that hit `max_new_tokens` without EOS
    /// (TRL's `missing_eos_penalty`). Default: null (scored like any other response).
    pub truncation_penalty: Option<f64>,
}

impl Default for RewardShapingConfig {
    fn default() -> Self {
        // HelpSteer2 (Wang et al., 2024), §4: goodness = 0.65*helpfulness + 0.8*correctness
        // + 0.45*coherence.
        let attribute_weights = [
            ("helpfulness", 0.65),
            ("correctness", 0.8),
            ("coherence", 0.45),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        RewardShapingConfig {
            attribute_weights,
            mean: 0.0,
            std: 1.0,
            clip: None,
            truncation_penalty: None,
        }
    }
}

impl RewardShapingConfig {
    /// Checks ranges; the error names the field (a weight by its attribute).
    pub fn validate(&self) -> Result<()> {
        for (name, w) in &self.attribute_weights {
            finite(&format!("attribute_weights.{name}"), *w)?;
        }
        finite("mean", self.mean)?;
        positive("std", self.std)?;
        if let Some(c) = self.clip {
            positive("clip", c)?;
        }
        if let Some(p) = self.truncation_penalty {
            finite("truncation_penalty", p)?;
        }
        Ok(())
    }
}

/// Which policy loss the actor minimises (Schulman et al. 2017,
/// <https://arxiv.org/abs/1707.06347>).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PolicyLossKind {
    /// `max(-A r, -A clip(r, 1-eps, 1+eps))` with `r = pi / pi_old` (PPO).
    #[default]
    Ppo,
    /// `-A log pi` (vanilla REINFORCE-family policy gradient; exact only on-policy).
    Pg,
}

/// The actor's loss. The run file spells these `algorithm.clip_eps`, `dual_clip`,
/// `entropy_coef` and `loss_agg`; the coordinator assembles them.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyLossConfig {
    /// The loss. Default `ppo`: every estimator trains through the clipped surrogate; with one
    /// pass over fresh samples the ratio is 1 and it reduces to the plain policy gradient.
    pub kind: PolicyLossKind,
    /// PPO clip range epsilon, in (0, 1). Default 0.2 (Schulman et al. 2017).
    pub clip_eps: f64,
    /// Dual-clip bound `c > 1` for negative advantages: the loss of a token with `A < 0` is at
    /// most `-c A`. Default `None` (off); Ye et al. 2020 (<https://arxiv.org/abs/1912.09729>)
    /// use 3.
    pub dual_clip: Option<f64>,
    /// Weight of the entropy bonus (subtracted from the loss). Default 0.0: LLM RLHF practice
    /// (InstructGPT, TRL, verl) does not use one; the entropy is still reported.
    pub entropy_coef: f64,
    /// Loss aggregation. Default `token_mean`.
    pub agg: LossAgg,
}

impl Default for PolicyLossConfig {
    fn default() -> Self {
        PolicyLossConfig {
            kind: PolicyLossKind::Ppo,
            clip_eps: 0.2,
            dual_clip: None,
            entropy_coef: 0.0,
            agg: LossAgg::TokenMean,
        }
    }
}

impl PolicyLossConfig {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        check(
            "clip_eps",
            self.clip_eps,
            self.clip_eps > 0.0 && self.clip_eps < 1.0,
            "must be in (0, 1)",
        )?;
        if let Some(c) = self.dual_clip {
            check(
                "dual_clip",
                c,
                c.is_finite() && c > 1.0,
                "must be finite and > 1",
            )?;
        }
        finite("entropy_coef", self.entropy_coef)
    }
}

/// The critic's loss (the run file's `algorithm.value_clip` and `loss_agg`).
#[derive(Clone, Debug, PartialEq)]
pub struct ValueLossConfig {
    /// Clip range of the new value around the rollout value; > 0 when set, `None` disables
    /// clipping. Default 0.2 (the PPO reference implementation, TRL's `cliprange_value`).
    pub clip: Option<f64>,
    /// Loss aggregation. Default `token_mean`.
    pub agg: LossAgg,
}

impl Default for ValueLossConfig {
    fn default() -> Self {
        ValueLossConfig {
            clip: Some(0.2),
            agg: LossAgg::TokenMean,
        }
    }
}

impl ValueLossConfig {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        match self.clip {
            Some(c) => positive("clip", c),
            None => Ok(()),
        }
    }
}

/// Learning-rate schedule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr` throughout (HelpSteer2 PPO). Needs `warmup_steps: 0`.
    #[default]
    Constant,
    /// Linear warm-up from `lr / warmup_steps` to `lr` over `warmup_steps`, then constant.
    Warmup,
    /// Linear warm-up, then cosine decay to `min_lr_ratio * lr` at the last optimizer step of
    /// the run (`train.steps` in the run file, the job's length in a job file).
    Cosine,
}

/// `train.actor:` / `train.critic:` (and a job file's `optim:`) — an AdamW optimizer
/// (Loshchilov & Hutter 2019, <https://arxiv.org/abs/1711.05101>).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Learning rate; > 0. Default: 1e-6 for the actor, 1e-5 for the critic.
    pub lr: f64,
    /// Decoupled weight decay, applied to matrices only; >= 0. Default: 0.0.
    pub weight_decay: f64,
    /// Gradient-norm clip; > 0 when set. Default: 1.0 (null = off; HF Trainer, TRL, verl).
    pub max_grad_norm: Option<f64>,
    /// Adam beta1, in [0, 1). Default: 0.9.
    pub beta1: f64,
    /// Adam beta2, in [0, 1). Default: 0.999.
    pub beta2: f64,
    /// Adam epsilon; > 0. Default: 1e-8.
    pub eps: f64,
    /// `constant`, `warmup` or `cosine`. Default: `constant`.
    pub schedule: LrSchedule,
    /// Warm-up steps for `warmup` and `cosine`. Default: 0.
    pub warmup_steps: u64,
    /// `cosine` only: final lr as a fraction of `lr`, in [0, 1]. Default: 0.0.
    pub min_lr_ratio: f64,
}

impl OptimizerConfig {
    /// The actor's defaults (`lr: 1e-6`).
    pub fn actor() -> Self {
        OptimizerConfig {
            lr: 1e-6,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
        }
    }

    /// The critic's defaults (`lr: 1e-5`, the rest as the actor's).
    pub fn critic() -> Self {
        OptimizerConfig {
            lr: 1e-5,
            ..OptimizerConfig::actor()
        }
    }

    /// Checks ranges; the error names the field. The schedule's horizon is checked by
    /// [`OptimizerConfig::check_horizon`] once the run's length is known.
    pub fn validate(&self) -> Result<()> {
        non_negative("lr", self.lr)?;
        check(
            "beta1",
            self.beta1,
            (0.0..1.0).contains(&self.beta1),
            "must be in [0, 1)",
        )?;
        check(
            "beta2",
            self.beta2,
            (0.0..1.0).contains(&self.beta2),
            "must be in [0, 1)",
        )?;
        positive("eps", self.eps)?;
        non_negative("weight_decay", self.weight_decay)?;
        if let Some(c) = self.max_grad_norm {
            positive("max_grad_norm", c)?;
        }
        check(
            "min_lr_ratio",
            self.min_lr_ratio,
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "must be in [0, 1]",
        )?;
        if self.schedule == LrSchedule::Constant && self.warmup_steps != 0 {
            return Err(SettingsError::new(
                "warmup_steps",
                self.warmup_steps,
                "must be 0 for the constant schedule; use schedule `warmup`",
            ));
        }
        Ok(())
    }

    /// [`OptimizerConfig::validate`], and for `cosine` that the warm-up ends before
    /// `total_steps`, the optimizer steps of the whole run, where the decay reaches its floor.
    pub fn check_horizon(&self, total_steps: u64) -> Result<()> {
        self.validate()?;
        if self.schedule == LrSchedule::Cosine && total_steps <= self.warmup_steps {
            return Err(SettingsError::new(
                "warmup_steps",
                self.warmup_steps,
                format!(
                    "must be below the run's {total_steps} optimizer steps for the cosine \
                     schedule; lower it or train longer"
                ),
            ));
        }
        Ok(())
    }
}

impl Default for OptimizerConfig {
    /// The actor's defaults. Through the loader, `train.critic` fields default to
    /// [`OptimizerConfig::critic`]; only a bare serde deserialisation uses this for both.
    fn default() -> Self {
        OptimizerConfig::actor()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `yaml`, checks it equals `expected`, and that writing it back reads the same.
    fn round_trip<T>(yaml: &str, expected: &T)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let parsed: T = serde_norway::from_str(yaml).unwrap();
        assert_eq!(&parsed, expected, "{yaml}");
        let written = serde_norway::to_string(&parsed).unwrap();
        assert_eq!(&serde_norway::from_str::<T>(&written).unwrap(), expected);
    }

    #[test]
    fn enums_use_the_run_file_spelling() {
        for (yaml, v) in [
            ("token_mean", LossAgg::TokenMean),
            ("seq_mean_token_sum", LossAgg::SeqMeanTokenSum),
            ("seq_mean_token_mean", LossAgg::SeqMeanTokenMean),
        ] {
            round_trip(yaml, &v);
            assert_eq!(serde_norway::to_string(&v).unwrap().trim(), yaml);
        }
        for (yaml, v) in [
            ("k1", KlEstimator::K1),
            ("k2", KlEstimator::K2),
            ("k3", KlEstimator::K3),
        ] {
            round_trip(yaml, &v);
            assert_eq!(serde_norway::to_string(&v).unwrap().trim(), yaml);
            assert_eq!(v.as_str(), yaml);
        }
        for (yaml, v) in [("reward", KlMode::Reward), ("loss", KlMode::Loss)] {
            round_trip(yaml, &v);
            assert_eq!(serde_norway::to_string(&v).unwrap().trim(), yaml);
        }
        for (yaml, v) in [
            ("constant", LrSchedule::Constant),
            ("warmup", LrSchedule::Warmup),
            ("cosine", LrSchedule::Cosine),
        ] {
            round_trip(yaml, &v);
            assert_eq!(serde_norway::to_string(&v).unwrap().trim(), yaml);
        }
        // The kebab-case spelling the algorithm crate once had is not the run file's.
        assert!(serde_norway::from_str::<LossAgg>("token-mean").is_err());
    }

    #[test]
    fn kl_config_round_trips_with_defaults_for_missing_keys() {
        round_trip(
            "coef: 0.05\nestimator: k3\nmode: loss\ntarget: 6.0\nhorizon: 500\n",
            &KlConfig {
                coef: 0.05,
                estimator: KlEstimator::K3,
                mode: KlMode::Loss,
                target: Some(6.0),
                horizon: 500,
            },
        );
        round_trip(
            "estimator: k2\n",
            &KlConfig {
                estimator: KlEstimator::K2,
                ..KlConfig::default()
            },
        );
        round_trip("{}", &KlConfig::default());
        let e = serde_norway::from_str::<KlConfig>("coeff: 0.1\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `coeff`"), "{e}");
    }

    #[test]
    fn reward_shaping_round_trips_and_the_map_is_replaced() {
        let mut weights = BTreeMap::new();
        weights.insert("helpfulness".to_owned(), 1.0);
        round_trip(
            "attribute_weights: {helpfulness: 1.0}\nmean: 0.5\nstd: 2.0\nclip: 5.0\n\
             truncation_penalty: 1.0\n",
            &RewardShapingConfig {
                attribute_weights: weights,
                mean: 0.5,
                std: 2.0,
                clip: Some(5.0),
                truncation_penalty: Some(1.0),
            },
        );
        let d = RewardShapingConfig::default();
        assert_eq!(d.attribute_weights.len(), 3);
        assert_eq!(
            (
                d.attribute_weights["helpfulness"],
                d.attribute_weights["correctness"],
                d.attribute_weights["coherence"]
            ),
            (0.65, 0.8, 0.45)
        );
        round_trip("clip: null\n", &d);
        assert!(serde_norway::from_str::<RewardShapingConfig>("scale: 1\n").is_err());
    }

    #[test]
    fn optimizer_round_trips_every_field() {
        round_trip(
            "lr: 2.0e-6\nweight_decay: 0.01\nmax_grad_norm: null\nbeta1: 0.8\nbeta2: 0.95\n\
             eps: 1.0e-6\nschedule: cosine\nwarmup_steps: 10\nmin_lr_ratio: 0.1\n",
            &OptimizerConfig {
                lr: 2e-6,
                weight_decay: 0.01,
                max_grad_norm: None,
                beta1: 0.8,
                beta2: 0.95,
                eps: 1e-6,
                schedule: LrSchedule::Cosine,
                warmup_steps: 10,
                min_lr_ratio: 0.1,
            },
        );
        round_trip("lr: 1.0e-5\n", &OptimizerConfig::critic());
        round_trip("{}", &OptimizerConfig::actor());
        // The job files' old `total_steps` override is not a key: the horizon is the run's.
        let e = serde_norway::from_str::<OptimizerConfig>("total_steps: 5\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `total_steps`"), "{e}");
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        let e = KlConfig {
            coef: -1.0,
            ..KlConfig::default()
        }
        .validate()
        .unwrap_err()
        .under("algorithm.kl");
        assert_eq!(e.key, "algorithm.kl.coef");
        assert_eq!(
            e.to_string(),
            "invalid `algorithm.kl.coef` = -1: must be finite and >= 0"
        );
        let horizon = KlConfig {
            target: Some(6.0),
            horizon: 0,
            ..KlConfig::default()
        };
        assert_eq!(horizon.validate().unwrap_err().key, "horizon");
        // Without a target the horizon is unused.
        KlConfig {
            horizon: 0,
            ..KlConfig::default()
        }
        .validate()
        .unwrap();

        let mut r = RewardShapingConfig::default();
        r.attribute_weights.insert("verbosity".into(), f64::NAN);
        assert_eq!(r.validate().unwrap_err().key, "attribute_weights.verbosity");
        let r = RewardShapingConfig {
            std: 0.0,
            ..RewardShapingConfig::default()
        };
        assert_eq!(r.validate().unwrap_err().key, "std");

        let p = PolicyLossConfig {
            clip_eps: 1.0,
            ..PolicyLossConfig::default()
        };
        assert_eq!(p.validate().unwrap_err().key, "clip_eps");
        let p = PolicyLossConfig {
            dual_clip: Some(1.0),
            ..PolicyLossConfig::default()
        };
        assert_eq!(p.validate().unwrap_err().key, "dual_clip");
        let v = ValueLossConfig {
            clip: Some(0.0),
            ..ValueLossConfig::default()
        };
        assert_eq!(v.validate().unwrap_err().key, "clip");
        ValueLossConfig {
            clip: None,
            ..ValueLossConfig::default()
        }
        .validate()
        .unwrap();

        for (o, key) in [
            (
                OptimizerConfig {
                    beta2: 1.0,
                    ..OptimizerConfig::actor()
                },
                "beta2",
            ),
            (
                OptimizerConfig {
                    eps: 0.0,
                    ..OptimizerConfig::actor()
                },
                "eps",
            ),
            (
                OptimizerConfig {
                    max_grad_norm: Some(-1.0),
                    ..OptimizerConfig::actor()
                },
                "max_grad_norm",
            ),
            (
                OptimizerConfig {
                    warmup_steps: 3,
                    ..OptimizerConfig::actor()
                },
                "warmup_steps",
            ),
        ] {
            assert_eq!(o.validate().unwrap_err().key, key, "{o:?}");
        }
        let cosine = OptimizerConfig {
            schedule: LrSchedule::Cosine,
            warmup_steps: 10,
            ..OptimizerConfig::actor()
        };
        cosine.validate().unwrap();
        cosine.check_horizon(11).unwrap();
        let e = cosine.check_horizon(10).unwrap_err().under("train.actor");
        assert_eq!(e.key, "train.actor.warmup_steps");
        assert!(e.reason.contains("10 optimizer steps"), "{e}");
    }

    #[test]
    fn defaults_are_valid() {
        KlConfig::default().validate().unwrap();
        RewardShapingConfig::default().validate().unwrap();
        PolicyLossConfig::default().validate().unwrap();
        ValueLossConfig::default().validate().unwrap();
        OptimizerConfig::actor().check_horizon(1).unwrap();
        OptimizerConfig::critic().check_horizon(1).unwrap();
    }
}
