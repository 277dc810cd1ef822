//! `rlhf-algo`: the mathematics of RLHF training on libtorch tensors.
//!
//! Owns: advantage estimators (GAE; REINFORCE with a running-mean baseline, RLOO, GRPO,
//! REINFORCE++) and returns ([`advantages`]); the PPO clipped surrogate, policy-gradient, entropy,
//! KL and value losses with their metrics ([`losses`]); KL estimators k1/k2/k3 and the fixed and
//! adaptive KL controllers ([`kl`]); reward shaping, from multi-attribute reward-model outputs to
//! per-token rewards ([`reward`]); the rollout buffer with seeded minibatching and
//! micro-batching ([`buffer`]); AdamW with exact checkpointable state, LR schedules and gradient
//! clipping ([`optim`]); and masked reductions ([`masked`]).
//!
//! May use: tch, serde, rand/rand_chacha, tracing. Knows nothing about gRPC, tokio, figment, the
//! model architecture, or the controller: everything here is a function of `(batch, seq)`
//! tensors and a response mask, runs on whatever device its inputs live on, and keeps their
//! dtype. Bad input (mismatched shapes, an empty response, NaN or infinite values on response
//! tokens, too-small groups) is an [`AlgoError`] naming the tensor and row, never a silent NaN.
//! Each checked entry point costs at most one host transfer.
//!
//! Conventions and defaults are summarised in `docs/algo.md`.

pub mod advantages;
pub mod buffer;
pub mod error;
pub mod kl;
pub mod losses;
pub mod masked;
pub mod optim;
pub mod reward;
pub mod sharded;

use serde::{Deserialize, Serialize};

pub use advantages::{
    broadcast_to_tokens, discounted_returns, gae, grpo_advantages, reinforce_pp_advantages,
    rloo_advantages, AdvantageCalculator, AdvantageConfig, AdvantageEstimator, AdvantageInputs,
    Advantages, BaselineState,
};
pub use buffer::{shuffled_indices, BufferConfig, MicroBatch, RolloutBatch, RolloutBuffer};
pub use error::{AlgoError, Location, Result};
pub use kl::{
    kl_estimate, kl_penalty, mean_sequence_kl, KlConfig, KlController, KlControllerState,
    KlEstimator, KlMode,
};
pub use losses::{
    aggregate, policy_loss, value_loss, KlLossTerm, LossAgg, PolicyLoss, PolicyLossConfig,
    PolicyLossInputs, PolicyLossKind, PolicyMetrics, ValueLoss, ValueLossConfig, ValueLossInputs,
    ValueMetrics,
};
pub use masked::{masked_mean, masked_sum, masked_var, masked_whiten};
pub use optim::{
    clip_grad_norm, uses_weight_decay, AdamW, LrSchedule, LrScheduleKind, OptimConfig,
};
pub use reward::{
    combine_attributes, last_response_index, normalization_stats, shape_rewards,
    token_level_rewards, truncated_rows, RewardConfig, HELPSTEER2_ATTRIBUTES,
};
pub use sharded::{assemble, flat_len, LossScaler, Precision, ShardedAdamW};

/// Every algorithm setting of a run, for the config crate to embed under one key.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlgoConfig {
    /// Advantage estimation. Default: GAE, gamma 1.0, lambda 0.95.
    pub advantage: AdvantageConfig,
    /// Actor loss. Default: PPO, clip 0.2, token-mean.
    pub policy_loss: PolicyLossConfig,
    /// Critic loss. Default: value clip 0.2, token-mean.
    pub value_loss: ValueLossConfig,
    /// KL penalty. Default: k1 in the reward, fixed coefficient 3e-3.
    pub kl: KlConfig,
    /// Reward shaping. Default: HelpSteer2 goodness weights, no normalisation or clipping.
    pub reward: RewardConfig,
    /// Optimizer. Default: AdamW, constant LR 1e-7, grad-norm clip 1.0.
    pub optim: OptimConfig,
    /// Minibatching. Default: minibatch 128, micro-batch 2, one epoch.
    pub buffer: BufferConfig,
}

impl AlgoConfig {
    /// Validates every section; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        self.advantage.validate()?;
        self.policy_loss.validate()?;
        self.value_loss.validate()?;
        self.kl.validate()?;
        self.reward.validate()?;
        self.optim.validate()?;
        self.buffer.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones_and_valid() {
        let c = AlgoConfig::default();
        c.validate().unwrap();
        assert_eq!(c.advantage.estimator, AdvantageEstimator::Gae);
        assert_eq!((c.advantage.gamma, c.advantage.lam), (1.0, 0.95));
        assert_eq!(
            (c.policy_loss.clip_eps, c.value_loss.clip),
            (0.2, Some(0.2))
        );
        assert_eq!(
            (c.kl.estimator, c.kl.mode, c.kl.coef),
            (KlEstimator::K1, KlMode::Reward, 3e-3)
        );
        assert_eq!(c.reward.attribute_weights.get("correctness"), Some(&0.8));
        assert_eq!(c.optim.lr, 1e-7);
    }

    #[test]
    fn config_round_trips_and_rejects_unknown_keys() {
        let c = AlgoConfig::default();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<AlgoConfig>(&json).unwrap(), c);
        let partial: AlgoConfig =
            serde_json::from_str(r#"{"advantage": {"estimator": "rloo"}}"#).unwrap();
        assert_eq!(partial.advantage.estimator, AdvantageEstimator::Rloo);
        assert_eq!(partial.advantage.lam, 0.95);
        assert!(serde_json::from_str::<AlgoConfig>(r#"{"advantage": {"lambda": 0.9}}"#).is_err());
        assert!(serde_json::from_str::<AlgoConfig>(r#"{"ppo": {}}"#).is_err());
        let bad = AlgoConfig {
            buffer: BufferConfig {
                epochs: 0,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(AlgoError::Config {
                key: "buffer.epochs",
                ..
            })
        ));
    }
}
