//! The typed settings messages of `worker.proto` (`PolicyLossSettings`, `ValueLossSettings`,
//! `KlLossSettings`, `OptimizerSettings` and their enums) converted to and from the
//! `rlhf-settings` types. Conversions from the wire destructure every field (a new field does
//! not compile until it is handled) and refuse unset enums and out-of-range values with a
//! [`SettingsFieldError`] naming the field, relative to the `TrainerSpec` that holds it.

use rlhf_settings::{
    KlEstimator, KlLossTerm, LossAgg, LrSchedule, OptimizerConfig, PolicyLossConfig,
    PolicyLossKind, SettingsError, ValueLossConfig,
};

use crate::pb;

/// A settings message that does not convert: `field` is its dotted path in the `TrainerSpec`
/// (`optimizer.beta2`, `policy_loss.agg`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {reason}")]
pub struct SettingsFieldError {
    /// Dotted path of the field at fault.
    pub field: String,
    /// What is wrong and what is allowed.
    pub reason: String,
}

impl SettingsFieldError {
    fn range(section: &str, e: SettingsError) -> Self {
        SettingsFieldError {
            field: format!("{section}.{}", e.key),
            reason: format!("{}: {}", e.value, e.reason),
        }
    }

    fn unset(field: &str, allowed: &str) -> Self {
        SettingsFieldError {
            field: field.to_owned(),
            reason: format!("unset or unknown enum value; expected one of {allowed}"),
        }
    }
}

impl From<LossAgg> for pb::LossAgg {
    fn from(a: LossAgg) -> Self {
        match a {
            LossAgg::TokenMean => pb::LossAgg::TokenMean,
            LossAgg::SeqMeanTokenSum => pb::LossAgg::SeqMeanTokenSum,
            LossAgg::SeqMeanTokenMean => pb::LossAgg::SeqMeanTokenMean,
        }
    }
}

fn loss_agg(field: &str, v: i32) -> Result<LossAgg, SettingsFieldError> {
    match pb::LossAgg::try_from(v) {
        Ok(pb::LossAgg::TokenMean) => Ok(LossAgg::TokenMean),
        Ok(pb::LossAgg::SeqMeanTokenSum) => Ok(LossAgg::SeqMeanTokenSum),
        Ok(pb::LossAgg::SeqMeanTokenMean) => Ok(LossAgg::SeqMeanTokenMean),
        Ok(pb::LossAgg::Unspecified) | Err(_) => Err(SettingsFieldError::unset(
            field,
            "token_mean, seq_mean_token_sum, seq_mean_token_mean",
        )),
    }
}

impl From<KlEstimator> for pb::KlEstimator {
    fn from(e: KlEstimator) -> Self {
        match e {
            KlEstimator::K1 => pb::KlEstimator::K1,
            KlEstimator::K2 => pb::KlEstimator::K2,
            KlEstimator::K3 => pb::KlEstimator::K3,
        }
    }
}

fn kl_estimator(field: &str, v: i32) -> Result<KlEstimator, SettingsFieldError> {
    match pb::KlEstimator::try_from(v) {
        Ok(pb::KlEstimator::K1) => Ok(KlEstimator::K1),
        Ok(pb::KlEstimator::K2) => Ok(KlEstimator::K2),
        Ok(pb::KlEstimator::K3) => Ok(KlEstimator::K3),
        Ok(pb::KlEstimator::Unspecified) | Err(_) => {
            Err(SettingsFieldError::unset(field, "k1, k2, k3"))
        }
    }
}

impl From<LrSchedule> for pb::LrSchedule {
    fn from(s: LrSchedule) -> Self {
        match s {
            LrSchedule::Constant => pb::LrSchedule::Constant,
            LrSchedule::Warmup => pb::LrSchedule::Warmup,
            LrSchedule::Cosine => pb::LrSchedule::Cosine,
        }
    }
}

fn lr_schedule(field: &str, v: i32) -> Result<LrSchedule, SettingsFieldError> {
    match pb::LrSchedule::try_from(v) {
        Ok(pb::LrSchedule::Constant) => Ok(LrSchedule::Constant),
        Ok(pb::LrSchedule::Warmup) => Ok(LrSchedule::Warmup),
        Ok(pb::LrSchedule::Cosine) => Ok(LrSchedule::Cosine),
        Ok(pb::LrSchedule::Unspecified) | Err(_) => {
            Err(SettingsFieldError::unset(field, "constant, warmup, cosine"))
        }
    }
}

impl From<PolicyLossKind> for pb::PolicyLossKind {
    fn from(k: PolicyLossKind) -> Self {
        match k {
            PolicyLossKind::Ppo => pb::PolicyLossKind::Ppo,
            PolicyLossKind::Pg => pb::PolicyLossKind::Pg,
        }
    }
}

fn policy_loss_kind(field: &str, v: i32) -> Result<PolicyLossKind, SettingsFieldError> {
    match pb::PolicyLossKind::try_from(v) {
        Ok(pb::PolicyLossKind::Ppo) => Ok(PolicyLossKind::Ppo),
        Ok(pb::PolicyLossKind::Pg) => Ok(PolicyLossKind::Pg),
        Ok(pb::PolicyLossKind::Unspecified) | Err(_) => {
            Err(SettingsFieldError::unset(field, "ppo, pg"))
        }
    }
}

impl From<&PolicyLossConfig> for pb::PolicyLossSettings {
    fn from(c: &PolicyLossConfig) -> Self {
        let PolicyLossConfig {
            kind,
            clip_eps,
            dual_clip,
            entropy_coef,
            agg,
        } = *c;
        pb::PolicyLossSettings {
            kind: pb::PolicyLossKind::from(kind) as i32,
            clip_eps,
            dual_clip,
            entropy_coef,
            agg: pb::LossAgg::from(agg) as i32,
        }
    }
}

impl TryFrom<pb::PolicyLossSettings> for PolicyLossConfig {
    type Error = SettingsFieldError;

    fn try_from(m: pb::PolicyLossSettings) -> Result<Self, Self::Error> {
        let pb::PolicyLossSettings {
            kind,
            clip_eps,
            dual_clip,
            entropy_coef,
            agg,
        } = m;
        let c = PolicyLossConfig {
            kind: policy_loss_kind("policy_loss.kind", kind)?,
            clip_eps,
            dual_clip,
            entropy_coef,
            agg: loss_agg("policy_loss.agg", agg)?,
        };
        c.validate()
            .map_err(|e| SettingsFieldError::range("policy_loss", e))?;
        Ok(c)
    }
}

impl From<&ValueLossConfig> for pb::ValueLossSettings {
    fn from(c: &ValueLossConfig) -> Self {
        let ValueLossConfig { clip, agg } = *c;
        pb::ValueLossSettings {
            clip,
            agg: pb::LossAgg::from(agg) as i32,
        }
    }
}

impl TryFrom<pb::ValueLossSettings> for ValueLossConfig {
    type Error = SettingsFieldError;

    fn try_from(m: pb::ValueLossSettings) -> Result<Self, Self::Error> {
        let pb::ValueLossSettings { clip, agg } = m;
        let c = ValueLossConfig {
            clip,
            agg: loss_agg("value_loss.agg", agg)?,
        };
        c.validate()
            .map_err(|e| SettingsFieldError::range("value_loss", e))?;
        Ok(c)
    }
}

impl From<KlLossTerm> for pb::KlLossSettings {
    fn from(t: KlLossTerm) -> Self {
        let KlLossTerm { estimator, coef } = t;
        pb::KlLossSettings {
            coef,
            estimator: pb::KlEstimator::from(estimator) as i32,
        }
    }
}

impl TryFrom<pb::KlLossSettings> for KlLossTerm {
    type Error = SettingsFieldError;

    fn try_from(m: pb::KlLossSettings) -> Result<Self, Self::Error> {
        let pb::KlLossSettings { coef, estimator } = m;
        if !(coef.is_finite() && coef > 0.0) {
            return Err(SettingsFieldError {
                field: "kl_loss.coef".into(),
                reason: format!("{coef}: must be finite and > 0; leave kl_loss unset for no term"),
            });
        }
        Ok(KlLossTerm {
            estimator: kl_estimator("kl_loss.estimator", estimator)?,
            coef,
        })
    }
}

/// The wire form of an optimizer over a run of `total_steps` optimizer steps.
pub fn optimizer_settings(c: &OptimizerConfig, total_steps: u64) -> pb::OptimizerSettings {
    let OptimizerConfig {
        lr,
        weight_decay,
        max_grad_norm,
        beta1,
        beta2,
        eps,
        schedule,
        warmup_steps,
        min_lr_ratio,
    } = *c;
    pb::OptimizerSettings {
        lr,
        weight_decay,
        max_grad_norm,
        beta1,
        beta2,
        eps,
        schedule: pb::LrSchedule::from(schedule) as i32,
        warmup_steps,
        min_lr_ratio,
        total_steps,
    }
}

/// The optimizer and the run's optimizer steps from the wire, checked as
/// [`OptimizerConfig::check_horizon`] does.
pub fn optimizer_from_settings(
    m: pb::OptimizerSettings,
) -> Result<(OptimizerConfig, u64), SettingsFieldError> {
    let pb::OptimizerSettings {
        lr,
        weight_decay,
        max_grad_norm,
        beta1,
        beta2,
        eps,
        schedule,
        warmup_steps,
        min_lr_ratio,
        total_steps,
    } = m;
    let c = OptimizerConfig {
        lr,
        weight_decay,
        max_grad_norm,
        beta1,
        beta2,
        eps,
        schedule: lr_schedule("optimizer.schedule", schedule)?,
        warmup_steps,
        min_lr_ratio,
    };
    c.check_horizon(total_steps)
        .map_err(|e| SettingsFieldError::range("optimizer", e))?;
    Ok((c, total_steps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_the_wire() {
        let p = PolicyLossConfig {
            kind: PolicyLossKind::Pg,
            clip_eps: 0.1,
            dual_clip: Some(3.0),
            entropy_coef: 0.01,
            agg: LossAgg::SeqMeanTokenSum,
        };
        assert_eq!(
            PolicyLossConfig::try_from(pb::PolicyLossSettings::from(&p)).unwrap(),
            p
        );
        for v in [
            ValueLossConfig {
                clip: None,
                agg: LossAgg::SeqMeanTokenMean,
            },
            ValueLossConfig::default(),
        ] {
            assert_eq!(
                ValueLossConfig::try_from(pb::ValueLossSettings::from(&v)).unwrap(),
                v
            );
        }
        for estimator in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            let t = KlLossTerm {
                estimator,
                coef: 0.05,
            };
            assert_eq!(
                KlLossTerm::try_from(pb::KlLossSettings::from(t)).unwrap(),
                t
            );
        }
        for schedule in [LrSchedule::Constant, LrSchedule::Warmup, LrSchedule::Cosine] {
            let o = OptimizerConfig {
                lr: 3e-6,
                weight_decay: 0.01,
                max_grad_norm: None,
                beta1: 0.8,
                beta2: 0.95,
                eps: 1e-6,
                schedule,
                warmup_steps: if schedule == LrSchedule::Constant {
                    0
                } else {
                    4
                },
                min_lr_ratio: 0.1,
            };
            assert_eq!(
                optimizer_from_settings(optimizer_settings(&o, 40)).unwrap(),
                (o, 40)
            );
        }
    }

    #[test]
    fn out_of_range_and_unset_fields_are_named() {
        let mut m = pb::PolicyLossSettings::from(&PolicyLossConfig::default());
        m.clip_eps = 1.5;
        let e = PolicyLossConfig::try_from(m).unwrap_err();
        assert_eq!(e.field, "policy_loss.clip_eps");
        assert!(
            e.reason.contains("1.5") && e.reason.contains("(0, 1)"),
            "{e}"
        );
        m.clip_eps = 0.2;
        m.agg = 0;
        let e = PolicyLossConfig::try_from(m).unwrap_err();
        assert_eq!(e.field, "policy_loss.agg");
        m.agg = 99;
        assert_eq!(
            PolicyLossConfig::try_from(m).unwrap_err().field,
            "policy_loss.agg"
        );

        let mut v = pb::ValueLossSettings::from(&ValueLossConfig::default());
        v.clip = Some(-0.1);
        assert_eq!(
            ValueLossConfig::try_from(v).unwrap_err().field,
            "value_loss.clip"
        );

        let e = KlLossTerm::try_from(pb::KlLossSettings {
            coef: f64::NAN,
            estimator: pb::KlEstimator::K3 as i32,
        })
        .unwrap_err();
        assert_eq!(e.field, "kl_loss.coef");
        let e = KlLossTerm::try_from(pb::KlLossSettings {
            coef: 0.1,
            estimator: 0,
        })
        .unwrap_err();
        assert_eq!(e.field, "kl_loss.estimator");

        let mut o = optimizer_settings(&OptimizerConfig::actor(), 10);
        o.beta2 = 1.0;
        let e = optimizer_from_settings(o).unwrap_err();
        assert_eq!(e.field, "optimizer.beta2");
        assert_eq!(e.to_string(), "`optimizer.beta2`: 1: must be in [0, 1)");
        o.beta2 = 0.999;
        o.schedule = pb::LrSchedule::Cosine as i32;
        o.warmup_steps = 10;
        assert_eq!(
            optimizer_from_settings(o).unwrap_err().field,
            "optimizer.warmup_steps"
        );
        o.schedule = 0;
        assert_eq!(
            optimizer_from_settings(o).unwrap_err().field,
            "optimizer.schedule"
        );
    }
}
