//! Optimizer set-up: AdamW (Loshchilov & Hutter 2019, <https://arxiv.org/abs/1711.05101>, with
//! the update of `torch.optim.AdamW`) over named tensors, whose state (`exp_avg`, `exp_avg_sq`,
//! `step`) can be saved and loaded exactly for checkpoints; weight-decay groups; constant, warmup
//! and cosine learning-rate schedules; and global gradient-norm clipping.

use std::collections::{HashMap, HashSet};
use std::f64::consts::PI;
use std::path::Path;

use rlhf_settings::{LrSchedule, OptimizerConfig};
use tch::{Kind, Tensor};

use crate::error::{AlgoError, Result};

/// The learning rate as a function of the optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct LrScheduler {
    cfg: OptimizerConfig,
    /// Optimizer steps of the whole run: where the cosine schedule reaches its floor.
    total_steps: u64,
}

impl LrScheduler {
    /// The schedule of `cfg` over a run of `total_steps` optimizer steps; errors name the key
    /// under `optim`.
    pub fn new(cfg: &OptimizerConfig, total_steps: u64) -> Result<Self> {
        cfg.check_horizon(total_steps)
            .map_err(|e| e.under("optim"))?;
        Ok(LrScheduler {
            cfg: cfg.clone(),
            total_steps,
        })
    }

    /// Learning rate for the update that follows `step` completed updates (so `lr_at(0)` is the
    /// first update's). Warmup is `lr * (step + 1) / warmup_steps`, so no update is wasted at 0.
    pub fn lr_at(&self, step: u64) -> f64 {
        let c = &self.cfg;
        if c.schedule != LrSchedule::Constant && step < c.warmup_steps {
            return c.lr * (step + 1) as f64 / c.warmup_steps as f64;
        }
        match c.schedule {
            LrSchedule::Constant | LrSchedule::Warmup => c.lr,
            LrSchedule::Cosine => {
                let span = self.total_steps.saturating_sub(c.warmup_steps).max(1) as f64;
                let progress = ((step - c.warmup_steps) as f64 / span).min(1.0);
                c.lr * (c.min_lr_ratio
                    + (1.0 - c.min_lr_ratio) * 0.5 * (1.0 + (PI * progress).cos()))
            }
        }
    }
}

/// Whether a parameter gets weight decay: matrices (rank >= 2) do, except those whose name marks
/// a norm; biases and norm weights (rank 1) and scalars do not (the usual split of HF Trainer,
/// minGPT and Megatron).
pub fn uses_weight_decay(name: &str, param: &Tensor) -> bool {
    let lower = name.to_ascii_lowercase();
    let is_bias = lower.ends_with("bias");
    let is_norm = lower.contains("norm") || lower.contains("ln_") || lower.ends_with(".ln.weight");
    param.dim() >= 2 && !is_bias && !is_norm
}

struct ParamState {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
    decay: bool,
}

/// AdamW's hyper-parameters and its update, op for op as `torch.optim.AdamW` does it: the one
/// update both [`AdamW`] and [`crate::ShardedAdamW`] apply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamUpdate {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamUpdate {
    pub(crate) fn new(cfg: &OptimizerConfig) -> Self {
        AdamUpdate {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        }
    }

    /// Step `step` (1-based) with learning rate `lr`: decays `target` when `decay`, moves the
    /// moments towards `grad` and `grad^2`, and applies the bias-corrected update to `target`
    /// (all in place; nothing but the moments changes at `lr == 0`).
    #[allow(clippy::too_many_arguments)] // the three tensors updated, the gradient, the step
    pub(crate) fn apply(
        &self,
        target: &mut Tensor,
        exp_avg: &mut Tensor,
        exp_avg_sq: &mut Tensor,
        grad: &Tensor,
        lr: f64,
        step: u64,
        decay: bool,
    ) -> Result<()> {
        let (b1, b2) = (self.beta1, self.beta2);
        if decay && self.weight_decay != 0.0 {
            let _ = target.f_mul_scalar_(1.0 - lr * self.weight_decay)?;
        }
        // m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2 (as a lerp towards g^2).
        let _ = exp_avg.f_lerp_(grad, 1.0 - b1)?;
        let _ = exp_avg_sq.f_lerp_(&grad.f_square()?, 1.0 - b2)?;
        if lr == 0.0 {
            return Ok(());
        }
        let bias1 = 1.0 - b1.powi(step as i32);
        let bias2_sqrt = (1.0 - b2.powi(step as i32)).sqrt();
        // param -= lr / bias1 * m / (sqrt(v) / bias2_sqrt + eps), with the step size folded
        // into the one temporary: fewer passes over the weights than op-by-op.
        let mut denom = exp_avg_sq.f_sqrt()?;
        let _ = denom.f_div_scalar_(bias2_sqrt)?;
        let _ = denom.f_add_scalar_(self.eps)?;
        let _ = denom.f_mul_scalar_(-bias1 / lr)?;
        let _ = target.f_addcdiv_(exp_avg, &denom)?;
        Ok(())
    }
}

/// Zeroes (and detaches) the gradients of `params` that have one.
pub(crate) fn zero_grads<'a>(params: impl IntoIterator<Item = &'a Tensor>) -> Result<()> {
    for p in params {
        let mut g = p.f_grad()?;
        if g.defined() {
            let _ = g.f_detach_()?;
            let _ = g.f_zero_()?;
        }
    }
    Ok(())
}

/// AdamW over named parameter tensors (e.g. `VarStore::variables()`), updated in place.
pub struct AdamW {
    params: Vec<ParamState>,
    update: AdamUpdate,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("params", &self.params.len())
            .field("update", &self.update)
            .finish()
    }
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const STEP: &str = "step";

impl AdamW {
    /// An optimizer over `params` (names must be unique; tensors must be floating point and are
    /// shared, not copied). Moments start at zero, like PyTorch's lazily created state.
    pub fn new(params: Vec<(String, Tensor)>, cfg: &OptimizerConfig) -> Result<Self> {
        cfg.validate().map_err(|e| e.under("optim"))?;
        let mut seen = HashSet::new();
        let mut states = Vec::with_capacity(params.len());
        for (name, param) in params {
            if !seen.insert(name.clone()) {
                return Err(AlgoError::State {
                    name,
                    reason: "appears twice in the parameter list".into(),
                });
            }
            if !matches!(
                param.f_kind()?,
                Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
            ) {
                return Err(AlgoError::State {
                    name,
                    reason: "is not a floating-point tensor".into(),
                });
            }
            let decay = uses_weight_decay(&name, &param);
            states.push(ParamState {
                exp_avg: param.f_zeros_like()?,
                exp_avg_sq: param.f_zeros_like()?,
                name,
                param,
                step: 0,
                decay,
            });
        }
        Ok(AdamW {
            params: states,
            update: AdamUpdate::new(cfg),
        })
    }

    /// Names of the parameters, in order, with whether each gets weight decay.
    pub fn groups(&self) -> Vec<(&str, bool)> {
        self.params
            .iter()
            .map(|p| (p.name.as_str(), p.decay))
            .collect()
    }

    /// One update with learning rate `lr`; parameters without a gradient are skipped (and their
    /// step count does not advance), as in PyTorch.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            let grad = p.param.f_grad()?;
            if !grad.defined() {
                continue;
            }
            p.step += 1;
            self.update.apply(
                &mut p.param,
                &mut p.exp_avg,
                &mut p.exp_avg_sq,
                &grad,
                lr,
                p.step,
                p.decay,
            )?;
        }
        Ok(())
    }

    /// Zeroes every parameter's gradient.
    pub fn zero_grad(&mut self) -> Result<()> {
        zero_grads(self.params.iter().map(|p| &p.param))
    }

    /// Global L2 norm of the gradients, clipped to `max_norm` (see [`clip_grad_norm`]).
    pub fn clip_grad_norm(&self, max_norm: Option<f64>) -> Result<f64> {
        let params: Vec<&Tensor> = self.params.iter().map(|p| &p.param).collect();
        clip_grad_norm(&params, max_norm)
    }

    /// The optimizer state as named tensors: `{param}.exp_avg`, `{param}.exp_avg_sq` (like the
    /// parameter) and `{param}.step` (int64, shape (1,)).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.params.len() * 3);
        for p in &self.params {
            out.push((format!("{}.{EXP_AVG}", p.name), p.exp_avg.f_detach()?));
            out.push((format!("{}.{EXP_AVG_SQ}", p.name), p.exp_avg_sq.f_detach()?));
            out.push((
                format!("{}.{STEP}", p.name),
                Tensor::f_from_slice(&[p.step as i64])?,
            ));
        }
        Ok(out)
    }

    /// Restores state produced by [`AdamW::state_tensors`] for the same parameters. Every entry
    /// must be present with the parameter's shape; missing, extra or misshaped entries are
    /// errors naming them, and nothing is changed unless all entries fit.
    pub fn load_state_tensors(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let by_name: HashMap<&str, &Tensor> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let known: HashSet<String> = self
            .params
            .iter()
            .flat_map(|p| [EXP_AVG, EXP_AVG_SQ, STEP].map(|k| format!("{}.{k}", p.name)))
            .collect();
        if let Some((extra, _)) = state.iter().find(|(n, _)| !known.contains(n)) {
            return Err(AlgoError::State {
                name: extra.clone(),
                reason: "does not belong to any parameter".into(),
            });
        }
        let mut staged = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let get = |k: &str| {
                let name = format!("{}.{k}", p.name);
                by_name.get(name.as_str()).copied().ok_or(AlgoError::State {
                    name,
                    reason: "is missing".into(),
                })
            };
            let (m, v, s) = (get(EXP_AVG)?, get(EXP_AVG_SQ)?, get(STEP)?);
            for (k, t) in [(EXP_AVG, m), (EXP_AVG_SQ, v)] {
                if t.size() != p.param.size() {
                    return Err(AlgoError::State {
                        name: format!("{}.{k}", p.name),
                        reason: format!(
                            "has shape {:?}, the parameter has {:?}",
                            t.size(),
                            p.param.size()
                        ),
                    });
                }
            }
            let step = s.f_reshape([-1])?.f_int64_value(&[0])?;
            if step < 0 {
                return Err(AlgoError::State {
                    name: format!("{}.{STEP}", p.name),
                    reason: format!("is negative ({step})"),
                });
            }
            staged.push((m, v, step as u64));
        }
        let _guard = tch::no_grad_guard();
        for (p, (m, v, step)) in self.params.iter_mut().zip(staged) {
            p.exp_avg.f_copy_(m)?;
            p.exp_avg_sq.f_copy_(v)?;
            p.step = step;
        }
        Ok(())
    }

    /// Writes the state to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let cpu: Vec<(String, Tensor)> = self
            .state_tensors()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.f_to_device(tch::Device::Cpu)?.f_contiguous()?)))
            .collect::<Result<_>>()?;
        Tensor::write_safetensors(&cpu, path)?;
        Ok(())
    }

    /// Reads the state from a safetensors file written by [`AdamW::save`].
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let state = Tensor::read_safetensors(path)?;
        self.load_state_tensors(&state)
    }
}

/// Scales the gradients of `params` in place so their global L2 norm is at most `max_norm`
/// (factor `max_norm / (norm + 1e-6)` when below 1, as PyTorch's `clip_grad_norm_`) and returns
/// the norm before clipping; `None` only measures. Parameters without gradients are ignored. A
/// NaN or infinite norm is an error and leaves the gradients untouched.
pub fn clip_grad_norm(params: &[&Tensor], max_norm: Option<f64>) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let mut grads = Vec::with_capacity(params.len());
    for p in params {
        let g = p.f_grad()?;
        if g.defined() {
            grads.push(g);
        }
    }
    if grads.is_empty() {
        return Ok(0.0);
    }
    let norms = grads
        .iter()
        .map(|g| Ok(g.f_norm()?.f_to_kind(Kind::Double)?))
        .collect::<Result<Vec<_>>>()?;
    let total = Tensor::f_stack(&norms, 0)?.f_norm()?.f_double_value(&[])?;
    if !total.is_finite() {
        return Err(AlgoError::NonFiniteGradNorm { value: total });
    }
    tracing::trace!(norm = total, ?max_norm, "gradient norm");
    if let Some(max) = max_norm {
        let coef = max / (total + 1e-6);
        if coef < 1.0 {
            for g in &mut grads {
                let _ = g.f_mul_scalar_(coef)?;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn param(v: &[f64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).reshape(shape).set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, g: &[f64]) {
        let loss = (p * Tensor::from_slice(g).reshape(p.size())).sum(Kind::Double);
        loss.backward();
    }

    #[test]
    fn decay_groups_follow_name_and_rank() {
        let m = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        let v = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        assert!(uses_weight_decay(
            "model.layers.0.self_attn.q_proj.weight",
            &m
        ));
        assert!(!uses_weight_decay(
            "model.layers.0.self_attn.q_proj.bias",
            &v
        ));
        assert!(!uses_weight_decay(
            "model.layers.0.input_layernorm.weight",
            &v
        ));
        assert!(!uses_weight_decay("model.norm.weight", &m));
        assert!(uses_weight_decay("model.embed_tokens.weight", &m));
    }

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // With zero moments, Adam's first update is lr * g / (|g| + eps) for every entry.
        let w = param(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let b = param(&[0.5, -0.5], &[2]);
        let cfg = OptimizerConfig {
            weight_decay: 0.0,
            eps: 1e-12,
            ..Default::default()
        };
        let mut opt = AdamW::new(
            vec![
                ("w".into(), w.shallow_clone()),
                ("b".into(), b.shallow_clone()),
            ],
            &cfg,
        )
        .unwrap();
        set_grad(&w, &[1.0, -2.0, 0.5, -0.1]);
        set_grad(&b, &[3.0, -3.0]);
        opt.step(0.1).unwrap();
        let got = Vec::<f64>::try_from(w.detach().reshape([-1])).unwrap();
        for (a, e) in got.iter().zip([0.9, 2.1, 2.9, 4.1]) {
            assert!((a - e).abs() < 1e-9, "{got:?}");
        }
        assert_eq!(opt.groups(), vec![("w", true), ("b", false)]);
    }

    #[test]
    fn weight_decay_skips_biases() {
        let w = param(&[1.0, 1.0, 1.0, 1.0], &[2, 2]);
        let b = param(&[1.0, 1.0], &[2]);
        let cfg = OptimizerConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(
            vec![
                ("w".into(), w.shallow_clone()),
                ("b".into(), b.shallow_clone()),
            ],
            &cfg,
        )
        .unwrap();
        set_grad(&w, &[0.0; 4]);
        set_grad(&b, &[0.0; 2]);
        opt.step(0.1).unwrap();
        assert!((w.double_value(&[0, 0]) - 0.95).abs() < 1e-12);
        assert_eq!(b.double_value(&[0]), 1.0);
    }

    #[test]
    fn state_round_trips_through_safetensors_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OptimizerConfig::default();
        let make = || param(&[0.3, -0.2, 0.1, 0.7, 0.0, 1.5], &[2, 3]);
        let (a, b) = (make(), make());
        let mut opt_a = AdamW::new(vec![("w".into(), a.shallow_clone())], &cfg).unwrap();
        for i in 0..3 {
            opt_a.zero_grad().unwrap();
            set_grad(&a, &[1.0, -1.0, 0.5, 0.25 * i as f64, 2.0, -0.75]);
            opt_a.step(1e-3).unwrap();
        }
        let path = dir.path().join("adamw.safetensors");
        opt_a.save(&path).unwrap();
        let mut opt_b = AdamW::new(vec![("w".into(), b.shallow_clone())], &cfg).unwrap();
        opt_b.load(&path).unwrap();
        tch::no_grad(|| b.detach().copy_(&a));
        for opt_and_p in [(&mut opt_a, &a), (&mut opt_b, &b)] {
            let (opt, p) = opt_and_p;
            opt.zero_grad().unwrap();
            set_grad(p, &[0.1, 0.2, -0.3, 0.4, -0.5, 0.6]);
            opt.step(1e-3).unwrap();
        }
        assert!(a.equal(&b), "resumed optimizer diverged");
        // Wrong shape or missing entries are named.
        let mut opt_c = AdamW::new(vec![("w".into(), param(&[0.0; 3], &[3]))], &cfg).unwrap();
        match opt_c.load(&path) {
            Err(AlgoError::State { name, .. }) => assert_eq!(name, "w.exp_avg"),
            other => panic!("expected a state error, got {other:?}"),
        }
        let mut opt_d = AdamW::new(vec![("v".into(), make())], &cfg).unwrap();
        assert!(matches!(opt_d.load(&path), Err(AlgoError::State { .. })));
    }

    #[test]
    fn grad_clipping_returns_the_pre_clip_norm() {
        let a = param(&[0.0, 0.0], &[2]);
        let b = param(&[0.0], &[1]);
        set_grad(&a, &[3.0, 0.0]);
        set_grad(&b, &[4.0]);
        let norm = clip_grad_norm(&[&a, &b], Some(1.0)).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        let after = clip_grad_norm(&[&a, &b], None).unwrap();
        assert!((after - 1.0).abs() < 1e-6);
        let c = param(&[0.0], &[1]);
        set_grad(&c, &[f64::NAN]);
        assert!(matches!(
            clip_grad_norm(&[&a, &c], Some(1.0)),
            Err(AlgoError::NonFiniteGradNorm { .. })
        ));
        assert!(
            (a.grad().double_value(&[0]) - 0.6).abs() < 1e-6,
            "gradients must be untouched on error"
        );
    }

    #[test]
    fn schedules() {
        let s = |cfg: OptimizerConfig, total| LrScheduler::new(&cfg, total).unwrap();
        let constant = s(
            OptimizerConfig {
                lr: 1.0,
                ..Default::default()
            },
            0,
        );
        assert_eq!((constant.lr_at(0), constant.lr_at(1000)), (1.0, 1.0));
        let warm = s(
            OptimizerConfig {
                lr: 1.0,
                schedule: LrSchedule::Warmup,
                warmup_steps: 4,
                ..Default::default()
            },
            0,
        );
        assert_eq!(
            [0, 1, 3, 4, 99].map(|i| warm.lr_at(i)),
            [0.25, 0.5, 1.0, 1.0, 1.0]
        );
        let cosine = OptimizerConfig {
            lr: 1.0,
            schedule: LrSchedule::Cosine,
            warmup_steps: 2,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        let cos = s(cosine.clone(), 12);
        assert_eq!(cos.lr_at(0), 0.5);
        assert_eq!(cos.lr_at(2), 1.0);
        assert!((cos.lr_at(7) - 0.55).abs() < 1e-12);
        assert!((cos.lr_at(12) - 0.1).abs() < 1e-12);
        assert!((cos.lr_at(500) - 0.1).abs() < 1e-12);
        match LrScheduler::new(&cosine, 2) {
            Err(AlgoError::Settings(e)) => assert_eq!(e.key, "optim.warmup_steps"),
            other => panic!("expected a settings error, got {other:?}"),
        }
        let bad = OptimizerConfig {
            warmup_steps: 3,
            ..Default::default()
        };
        match LrScheduler::new(&bad, 10) {
            Err(AlgoError::Settings(e)) => assert_eq!(e.key, "optim.warmup_steps"),
            other => panic!("expected a settings error, got {other:?}"),
        }
    }
}
