//! `rlhf-algo`: the mathematics of RLHF training on libtorch tensors.
//!
//! Owns: advantage estimators (GAE; REINFORCE with a running-mean baseline, RLOO, GRPO,
//! REINFORCE++) and returns ([`advantages`]); the PPO clipped surrogate, policy-gradient, entropy,
//! KL and value losses with their metrics ([`losses`]); KL estimators k1/k2/k3 and the fixed and
//! adaptive KL controllers ([`kl`]); reward shaping, from multi-attribute reward-model outputs to
//! per-token rewards ([`reward`]); seeded shuffling of rows ([`shuffle`]); AdamW with exact
//! checkpointable state, LR schedules and gradient clipping ([`optim`], and its sharded form
//! [`sharded`]); and masked reductions ([`masked`]). The settings these take (KL, losses,
//! optimizer, reward shaping) are `rlhf-settings` types, re-exported here; the checkpointed
//! state ([`KlControllerState`], [`BaselineState`]) is this crate's own.
//!
//! May use: tch, serde, rand/rand_chacha, tracing, rlhf-settings. Knows nothing about gRPC,
//! prost, tokio, figment, the model architecture, or the controller: everything here is a function of `(batch, seq)`
//! tensors and a response mask, runs on whatever device its inputs live on, and keeps their
//! dtype. Bad input (mismatched shapes, an empty response, NaN or infinite values on response
//! tokens, too-small groups) is an [`AlgoError`] naming the tensor and row, never a silent NaN.
//! Each checked entry point costs at most one host transfer.
//!
//! Conventions and defaults are summarised in `docs/algo.md`.

pub mod advantages;
pub mod error;
pub mod kl;
pub mod losses;
pub mod masked;
pub mod optim;
pub mod reward;
pub mod sharded;
pub mod shuffle;

pub use advantages::{
    broadcast_to_tokens, discounted_returns, gae, grpo_advantages, reinforce_pp_advantages,
    rloo_advantages, AdvantageCalculator, AdvantageConfig, AdvantageEstimator, AdvantageInputs,
    Advantages, BaselineState,
};
pub use error::{AlgoError, Location, Result};
pub use kl::{kl_estimate, kl_penalty, mean_sequence_kl, KlController, KlControllerState};
pub use losses::{
    aggregate, policy_loss, value_loss, PolicyLoss, PolicyLossInputs, PolicyMetrics, ValueLoss,
    ValueLossInputs, ValueMetrics,
};
pub use masked::{masked_mean, masked_sum, masked_var, masked_whiten};
pub use optim::{clip_grad_norm, uses_weight_decay, AdamW, LrScheduler};
pub use reward::{
    combine_attributes, last_response_index, normalization_stats, shape_rewards,
    token_level_rewards, truncated_rows, HELPSTEER2_ATTRIBUTES,
};
pub use rlhf_settings::{
    KlConfig, KlEstimator, KlLossTerm, KlMode, LossAgg, LrSchedule, OptimizerConfig,
    PolicyLossConfig, PolicyLossKind, RewardShapingConfig, SettingsError, ValueLossConfig,
};
pub use sharded::{assemble, flat_len, LossScaler, Precision, ShardedAdamW};
pub use shuffle::shuffled_indices;
