//! Training state at the size users run: AdamW over the pieces of the flattened trainable
//! parameters that this data-parallel replica owns (ZeRO stage 1/2, Rajbhandari et al. 2020,
//! <https://arxiv.org/abs/1910.02054>), with f32 master weights and f32 moments for bf16/f16
//! parameters (mixed precision as torch AMP, FSDP and DeepSpeed keep it), and dynamic loss
//! scaling for f16 ([`LossScaler`], the rules of `torch.amp.GradScaler`).
//!
//! The trainable parameters, in the order given, form one flat vector of `total` elements. A
//! replica owns a list of ranges of it (all of it without sharding); the ranges cut parameters
//! into [`Piece`]s. For each piece the optimizer keeps the moments and, when the parameter is
//! in a low-precision dtype and the precision is [`Precision::Mixed`], an f32 master copy; it
//! updates the master (or the parameter itself) and writes the rounded result into the
//! parameter. The caller supplies each piece's gradient (reduced over the replicas) and, when
//! sharded, all-gathers the updated parameters; this crate knows no communication.
//!
//! The saved state is always the full, unsharded state under per-parameter names
//! (`{param}.exp_avg`, `{param}.exp_avg_sq`, `{param}.step`, and `{param}.master` for f32 master
//! weights), the names [`crate::AdamW`] uses: a run resumes on any number of replicas.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use tch::{Kind, Tensor};

use crate::error::{AlgoError, Result};
use crate::optim::{uses_weight_decay, zero_grads, AdamUpdate};
use rlhf_settings::OptimizerConfig;

/// How low-precision (bf16, f16) parameters are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Compute in the parameters' dtype, keep f32 master weights and f32 moments, and apply
    /// each update to the master (AMP / FSDP / DeepSpeed). The default.
    #[default]
    Mixed,
    /// Moments and updates in the parameters' own dtype: at RLHF learning rates most bf16
    /// updates round away. Only for memory experiments.
    Pure,
}

/// A contiguous run of one parameter's elements that this replica owns.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    /// Index of the parameter in the list the optimizer was built from.
    param: usize,
    /// Element range inside the flattened parameter.
    within: Range<i64>,
    /// Offset of the piece in the concatenation of the owned ranges (the flat gradient and
    /// state the caller exchanges).
    at: i64,
}

impl Piece {
    fn len(&self) -> i64 {
        self.within.end - self.within.start
    }
}

struct PieceState {
    piece: Piece,
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const STEP: &str = "step";
const MASTER: &str = "master";

/// AdamW over owned pieces of the flattened parameters, with optional f32 master weights.
pub struct ShardedAdamW {
    params: Vec<(String, Tensor)>,
    offsets: Vec<i64>,
    total: i64,
    owned: Vec<Range<i64>>,
    owned_len: i64,
    pieces: Vec<PieceState>,
    masters: bool,
    step: u64,
    update: AdamUpdate,
}

impl std::fmt::Debug for ShardedAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedAdamW")
            .field("params", &self.params.len())
            .field("total", &self.total)
            .field("owned_len", &self.owned_len)
            .field("masters", &self.masters)
            .field("step", &self.step)
            .finish()
    }
}

fn is_low_precision(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::BFloat16)
}

/// The flat length of `params` (the sum of their element counts).
pub fn flat_len(params: &[(String, Tensor)]) -> i64 {
    params.iter().map(|(_, t)| t.numel() as i64).sum()
}

impl ShardedAdamW {
    /// An optimizer over `params` (unique names, one floating-point dtype, contiguous; shared,
    /// not copied) owning the flat element ranges `owned` (sorted, disjoint, inside the flat
    /// length; `[0..total]` without sharding). Moments start at zero.
    pub fn new(
        params: Vec<(String, Tensor)>,
        cfg: &OptimizerConfig,
        precision: Precision,
        owned: Vec<Range<i64>>,
    ) -> Result<Self> {
        cfg.validate().map_err(|e| e.under("optim"))?;
        let mut seen = HashSet::new();
        let mut kind = None;
        for (name, p) in &params {
            if !seen.insert(name.as_str()) {
                return Err(state_err(name, "appears twice in the parameter list"));
            }
            let k = p.f_kind()?;
            if !matches!(k, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double) {
                return Err(state_err(name, "is not a floating-point tensor"));
            }
            if *kind.get_or_insert(k) != k {
                return Err(state_err(
                    name,
                    &format!("is {k:?} while earlier parameters are {kind:?}"),
                ));
            }
            if !p.is_contiguous() {
                return Err(state_err(name, "is not contiguous"));
            }
        }
        let mut offsets = Vec::with_capacity(params.len());
        let mut total = 0i64;
        for (_, p) in &params {
            offsets.push(total);
            total += p.numel() as i64;
        }
        let mut end = 0;
        for r in &owned {
            if r.start < end || r.end < r.start || r.end > total {
                return Err(state_err(
                    "owned ranges",
                    &format!("{owned:?} are not sorted, disjoint ranges inside 0..{total}"),
                ));
            }
            end = r.end;
        }
        let masters = precision == Precision::Mixed && kind.is_some_and(is_low_precision);
        let _guard = tch::no_grad_guard();
        let mut pieces = vec![];
        let mut at = 0i64;
        for r in &owned {
            for (i, (name, p)) in params.iter().enumerate() {
                let (lo, hi) = (offsets[i], offsets[i] + p.numel() as i64);
                let (s, e) = (r.start.max(lo), r.end.min(hi));
                if s >= e {
                    continue;
                }
                let piece = Piece {
                    param: i,
                    within: s - lo..e - lo,
                    at: at + (s - r.start),
                };
                let view = p
                    .f_view([-1])?
                    .f_narrow(0, piece.within.start, piece.len())?;
                let master = if masters {
                    Some(view.f_to_kind(Kind::Float)?.f_contiguous()?)
                } else {
                    None
                };
                let moments = if masters { Kind::Float } else { p.f_kind()? };
                pieces.push(PieceState {
                    exp_avg: Tensor::f_zeros([piece.len()], (moments, p.device()))?,
                    exp_avg_sq: Tensor::f_zeros([piece.len()], (moments, p.device()))?,
                    decay: uses_weight_decay(name, p),
                    master,
                    piece,
                });
            }
            at += r.end - r.start;
        }
        Ok(ShardedAdamW {
            params,
            offsets,
            total,
            owned,
            owned_len: at,
            pieces,
            masters,
            step: 0,
            update: AdamUpdate::new(cfg),
        })
    }

    /// An optimizer owning every element (no sharding).
    pub fn unsharded(
        params: Vec<(String, Tensor)>,
        cfg: &OptimizerConfig,
        precision: Precision,
    ) -> Result<Self> {
        let everything = std::iter::once(0..flat_len(&params)).collect();
        Self::new(params, cfg, precision, everything)
    }

    /// The flat length of all parameters.
    pub fn total(&self) -> i64 {
        self.total
    }

    /// The flat ranges this replica owns.
    pub fn owned(&self) -> &[Range<i64>] {
        &self.owned
    }

    /// The number of owned elements (the length of the flat gradient [`ShardedAdamW::step`]
    /// reads and of each [`ShardedAdamW::flat_state`] tensor).
    pub fn owned_len(&self) -> i64 {
        self.owned_len
    }

    /// Whether f32 master weights are kept (mixed precision over bf16/f16 parameters).
    pub fn has_masters(&self) -> bool {
        self.masters
    }

    /// The parameters, in flat order.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Sum of squares (f64) of `grads` over the owned pieces: the caller adds the replicas'
    /// sums for the global gradient norm when sharded.
    pub fn grad_square_sum(&self, grads: &Tensor) -> Result<f64> {
        self.check_grads(grads)?;
        let _guard = tch::no_grad_guard();
        Ok(grads.f_norm()?.f_double_value(&[])?.powi(2))
    }

    fn check_grads(&self, grads: &Tensor) -> Result<()> {
        if grads.size() != [self.owned_len] {
            return Err(state_err(
                "gradient",
                &format!(
                    "has shape {:?}; the owned pieces need ({},)",
                    grads.size(),
                    self.owned_len
                ),
            ));
        }
        Ok(())
    }

    /// One AdamW update with learning rate `lr` from `grads` (the flat gradient of the owned
    /// pieces, any float dtype), first multiplied by `grad_scale` (clipping and loss-scale
    /// undoing folded into one factor). Updates the masters (or the parameters) and writes the
    /// owned elements of the parameters; the others are the caller's to gather.
    pub fn step(&mut self, lr: f64, grads: &Tensor, grad_scale: f64) -> Result<()> {
        self.check_grads(grads)?;
        let _guard = tch::no_grad_guard();
        self.step += 1;
        for s in &mut self.pieces {
            let piece = &s.piece;
            let view = self.params[piece.param].1.f_view([-1])?.f_narrow(
                0,
                piece.within.start,
                piece.len(),
            )?;
            let mut g = grads
                .f_narrow(0, piece.at, piece.len())?
                .f_to_kind(s.exp_avg.kind())?;
            if grad_scale != 1.0 {
                g = g.f_mul_scalar(grad_scale)?;
            }
            let mut target = match &s.master {
                Some(m) => m.shallow_clone(),
                None => view.shallow_clone(),
            };
            self.update.apply(
                &mut target,
                &mut s.exp_avg,
                &mut s.exp_avg_sq,
                &g,
                lr,
                self.step,
                s.decay,
            )?;
            if s.master.is_some() {
                view.shallow_clone().f_copy_(&target)?;
            }
        }
        Ok(())
    }

    /// Zeroes (and detaches) the parameters' gradients.
    pub fn zero_grad(&self) -> Result<()> {
        zero_grads(self.params.iter().map(|(_, p)| p))
    }

    /// This replica's state as three flat tensors over the owned pieces (f32 with masters, else
    /// the parameters' dtype): `exp_avg`, `exp_avg_sq`, and the master weights (the parameter
    /// values where there are no masters).
    pub fn flat_state(&self) -> Result<[Tensor; 3]> {
        let _guard = tch::no_grad_guard();
        let mut parts: [Vec<Tensor>; 3] = Default::default();
        for s in &self.pieces {
            let piece = &s.piece;
            parts[0].push(s.exp_avg.shallow_clone());
            parts[1].push(s.exp_avg_sq.shallow_clone());
            parts[2].push(match &s.master {
                Some(m) => m.shallow_clone(),
                None => self.params[piece.param]
                    .1
                    .f_view([-1])?
                    .f_narrow(0, piece.within.start, piece.len())?
                    .f_to_kind(s.exp_avg.kind())?,
            });
        }
        let kind = self
            .pieces
            .first()
            .map_or(Kind::Float, |s| s.exp_avg.kind());
        let device = self
            .params
            .first()
            .map_or(tch::Device::Cpu, |(_, t)| t.device());
        let cat = |v: &[Tensor]| -> Result<Tensor> {
            Ok(if v.is_empty() {
                Tensor::f_zeros([0], (kind, device))?
            } else {
                Tensor::f_cat(v, 0)?
            })
        };
        Ok([cat(&parts[0])?, cat(&parts[1])?, cat(&parts[2])?])
    }

    /// The full state under per-parameter names from full flat tensors (each `total` long, as
    /// [`assemble`] builds them from every replica's [`ShardedAdamW::flat_state`]), on the CPU.
    pub fn named_state(&self, full: &[Tensor; 3]) -> Result<Vec<(String, Tensor)>> {
        for t in full {
            if t.size() != [self.total] {
                return Err(state_err(
                    "full state",
                    &format!("has shape {:?}, expected ({},)", t.size(), self.total),
                ));
            }
        }
        let mut out = Vec::with_capacity(self.params.len() * 4);
        for (i, (name, p)) in self.params.iter().enumerate() {
            let part = |t: &Tensor| -> Result<Tensor> {
                Ok(t.f_narrow(0, self.offsets[i], p.numel() as i64)?
                    .f_view(p.size().as_slice())?
                    .f_to_device(tch::Device::Cpu)?
                    .f_contiguous()?)
            };
            out.push((format!("{name}.{EXP_AVG}"), part(&full[0])?));
            out.push((format!("{name}.{EXP_AVG_SQ}"), part(&full[1])?));
            out.push((
                format!("{name}.{STEP}"),
                Tensor::f_from_slice(&[self.step as i64])?,
            ));
            if self.masters {
                out.push((format!("{name}.{MASTER}"), part(&full[2])?));
            }
        }
        Ok(out)
    }

    /// The full state under per-parameter names when this replica owns everything.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        if self.owned_len != self.total {
            return Err(state_err(
                "state",
                "this replica owns a shard: gather every replica's flat_state and assemble it",
            ));
        }
        self.named_state(&self.flat_state()?)
    }

    /// Restores the owned pieces from a full state under per-parameter names (as
    /// [`ShardedAdamW::named_state`] or [`crate::AdamW::state_tensors`] wrote it, from a run
    /// with any number of replicas). A missing `.master` (a checkpoint of an f32 or pure run)
    /// starts the master from the parameter. Every other entry must be present with the
    /// parameter's shape; errors name the entry, and nothing changes unless all fit.
    pub fn load_state_tensors(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let by_name: HashMap<&str, &Tensor> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let known: HashSet<String> = self
            .params
            .iter()
            .flat_map(|(n, _)| [EXP_AVG, EXP_AVG_SQ, STEP, MASTER].map(|k| format!("{n}.{k}")))
            .collect();
        if let Some((extra, _)) = state.iter().find(|(n, _)| !known.contains(n)) {
            return Err(state_err(extra, "does not belong to any parameter"));
        }
        let mut step = None;
        for (name, p) in &self.params {
            let get = |k: &str| {
                let key = format!("{name}.{k}");
                by_name
                    .get(key.as_str())
                    .copied()
                    .ok_or_else(|| state_err(&key, "is missing"))
            };
            for k in [EXP_AVG, EXP_AVG_SQ] {
                let t = get(k)?;
                if t.size() != p.size() {
                    return Err(state_err(
                        &format!("{name}.{k}"),
                        &format!("has shape {:?}, the parameter has {:?}", t.size(), p.size()),
                    ));
                }
            }
            if let Some(m) = by_name.get(format!("{name}.{MASTER}").as_str()) {
                if m.size() != p.size() {
                    return Err(state_err(
                        &format!("{name}.{MASTER}"),
                        &format!("has shape {:?}, the parameter has {:?}", m.size(), p.size()),
                    ));
                }
            }
            let s = get(STEP)?.f_reshape([-1])?.f_int64_value(&[0])?;
            if s < 0 || step.is_some_and(|prev| prev != s) {
                return Err(state_err(
                    &format!("{name}.{STEP}"),
                    &format!("is {s}; every parameter must be at the same step ({step:?})"),
                ));
            }
            step = Some(s);
        }
        let _guard = tch::no_grad_guard();
        for s in &mut self.pieces {
            let piece = &s.piece;
            let (name, p) = &self.params[piece.param];
            let part = |t: &Tensor| -> Result<Tensor> {
                Ok(t.f_reshape([-1])?
                    .f_narrow(0, piece.within.start, piece.len())?
                    .f_to_device(p.device())?)
            };
            s.exp_avg
                .f_copy_(&part(by_name[format!("{name}.{EXP_AVG}").as_str()])?)?;
            s.exp_avg_sq
                .f_copy_(&part(by_name[format!("{name}.{EXP_AVG_SQ}").as_str()])?)?;
            if let Some(m) = &mut s.master {
                match by_name.get(format!("{name}.{MASTER}").as_str()) {
                    Some(t) => m.f_copy_(&part(t)?)?,
                    None => m.f_copy_(&p.f_view([-1])?.f_narrow(
                        0,
                        piece.within.start,
                        piece.len(),
                    )?)?,
                };
            }
        }
        self.step = step.unwrap_or(0) as u64;
        Ok(())
    }
}

/// The full flat tensor (`total` long) from every replica's owned ranges and the flat tensor
/// over them (a [`ShardedAdamW::flat_state`] part), on the device of the first part.
pub fn assemble(total: i64, parts: &[(Vec<Range<i64>>, Tensor)]) -> Result<Tensor> {
    let (kind, device) = parts
        .first()
        .map_or((Kind::Float, tch::Device::Cpu), |(_, t)| {
            (t.kind(), t.device())
        });
    let out = Tensor::f_zeros([total], (kind, device))?;
    let mut covered = 0i64;
    for (ranges, flat) in parts {
        let mut at = 0;
        for r in ranges {
            let n = r.end - r.start;
            out.f_narrow(0, r.start, n)?
                .f_copy_(&flat.f_narrow(0, at, n)?)?;
            at += n;
            covered += n;
        }
        if at != flat.numel() as i64 {
            return Err(state_err(
                "flat state",
                &format!("{} elements for owned ranges of {at}", flat.numel()),
            ));
        }
    }
    if covered != total {
        return Err(state_err(
            "flat state",
            &format!("the replicas own {covered} of {total} elements"),
        ));
    }
    Ok(out)
}

/// Dynamic loss scaling for f16 training, with `torch.amp.GradScaler`'s defaults: the loss is
/// multiplied by the scale before backward; a step whose gradients hold inf/NaN is skipped and
/// halves the scale; 2000 good steps in a row double it.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    scale: f64,
    good_steps: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: Self::INIT,
            good_steps: 0,
        }
    }
}

impl LossScaler {
    /// `GradScaler(init_scale=2.**16)`.
    pub const INIT: f64 = 65536.0;
    /// `growth_interval`.
    pub const GROWTH_INTERVAL: u64 = 2000;

    /// The factor the loss is multiplied by.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Good steps since the last change of the scale.
    pub fn good_steps(&self) -> u64 {
        self.good_steps
    }

    /// A scaler resumed from a checkpoint's `scale` and `good_steps`.
    pub fn resume(scale: f64, good_steps: u64) -> Result<LossScaler> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(state_err(
                "loss_scale",
                &format!("is {scale}; must be positive"),
            ));
        }
        Ok(LossScaler { scale, good_steps })
    }

    /// Records one step's outcome; returns whether the optimizer step should run (the
    /// gradients were finite).
    pub fn update(&mut self, grads_finite: bool) -> bool {
        if !grads_finite {
            self.scale *= 0.5;
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

fn state_err(name: &str, reason: &str) -> AlgoError {
    AlgoError::State {
        name: name.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AdamW;
    use tch::Device;

    /// Deterministic parameters of magnitude ~0.02 (typical initialisations; independent of the
    /// global RNG, which tests running in parallel share).
    fn params(kind: Kind) -> Vec<(String, Tensor)> {
        let mut seed = 0.0;
        [
            ("a.weight", vec![3, 4]),
            ("a.bias", vec![4]),
            ("b.weight", vec![5, 3]),
        ]
        .into_iter()
        .map(|(n, s)| {
            let numel: i64 = s.iter().product();
            seed += 1.0;
            let t = (Tensor::arange(numel, (Kind::Float, Device::Cpu)) * 1.7 + seed)
                .sin()
                .view(s.as_slice())
                * 0.02;
            (n.to_string(), t.to_kind(kind).set_requires_grad(true))
        })
        .collect()
    }

    fn grads(total: i64, step: i64) -> Tensor {
        (Tensor::arange(total, (Kind::Float, Device::Cpu)) * (0.37 + step as f64) + 0.5).cos()
    }

    fn cfg(lr: f64) -> OptimizerConfig {
        OptimizerConfig {
            lr,
            weight_decay: 0.1,
            ..OptimizerConfig::default()
        }
    }

    fn share(ps: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        ps.iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    fn flat(ps: &[(String, Tensor)]) -> Tensor {
        Tensor::cat(
            &ps.iter()
                .map(|(_, t)| t.detach().to_kind(Kind::Float).view([-1]))
                .collect::<Vec<_>>(),
            0,
        )
    }

    #[test]
    fn unsharded_f32_equals_adamw_bitwise() {
        let (a, b) = (params(Kind::Float), params(Kind::Float));
        let total = flat_len(&a);
        let mut reference = AdamW::new(share(&a), &cfg(1e-2)).unwrap();
        let mut ours = ShardedAdamW::unsharded(share(&b), &cfg(1e-2), Precision::Mixed).unwrap();
        assert!(!ours.has_masters());
        for step in 0..3 {
            let g = grads(total, step);
            let mut off = 0;
            for (_, p) in &a {
                let n = p.numel() as i64;
                if !p.grad().defined() {
                    p.sum(Kind::Float).backward();
                }
                p.grad()
                    .copy_(&g.narrow(0, off, n).view(p.size().as_slice()));
                off += n;
            }
            reference.step(1e-2).unwrap();
            ours.step(1e-2, &g, 1.0).unwrap();
        }
        assert!(flat(&a).equal(&flat(&b)));
        let state = ours.state_tensors().unwrap();
        let theirs = reference.state_tensors().unwrap();
        for ((n1, t1), (n2, t2)) in state.iter().zip(&theirs) {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2), "{n1}");
        }
    }

    #[test]
    fn shards_together_equal_the_unsharded_optimizer() {
        let whole_params = params(Kind::Float);
        let total = flat_len(&whole_params);
        let mut whole =
            ShardedAdamW::unsharded(share(&whole_params), &cfg(1e-2), Precision::Mixed).unwrap();
        // Two replicas owning interleaved ranges that cut parameters in the middle.
        let owned = [vec![0..5, 14..20], vec![5..14, 20..total]];
        let replicas: Vec<_> = owned
            .iter()
            .map(|o| {
                let ps = params(Kind::Float);
                (
                    ShardedAdamW::new(share(&ps), &cfg(1e-2), Precision::Mixed, o.clone()).unwrap(),
                    ps,
                )
            })
            .collect();
        let mut replicas = replicas;
        for step in 0..3 {
            let g = grads(total, step);
            whole.step(1e-2, &g, 0.5).unwrap();
            for (opt, _) in &mut replicas {
                let mine = Tensor::cat(
                    &opt.owned()
                        .iter()
                        .map(|r| g.narrow(0, r.start, r.end - r.start))
                        .collect::<Vec<_>>(),
                    0,
                );
                opt.step(1e-2, &mine, 0.5).unwrap();
            }
        }
        // Each replica's owned elements equal the unsharded result; the gathered state too.
        let reference = flat(&whole_params);
        for (opt, ps) in &replicas {
            let mine = flat(ps);
            for r in opt.owned() {
                let n = r.end - r.start;
                assert!(mine
                    .narrow(0, r.start, n)
                    .equal(&reference.narrow(0, r.start, n)));
            }
        }
        let parts: Vec<[Tensor; 3]> = replicas
            .iter()
            .map(|(o, _)| o.flat_state().unwrap())
            .collect();
        let full: [Tensor; 3] = std::array::from_fn(|k| {
            assemble(
                total,
                &replicas
                    .iter()
                    .zip(&parts)
                    .map(|((o, _), p)| (o.owned().to_vec(), p[k].shallow_clone()))
                    .collect::<Vec<_>>(),
            )
            .unwrap()
        });
        let gathered = replicas[0].0.named_state(&full).unwrap();
        let unsharded = whole.state_tensors().unwrap();
        for ((n1, t1), (n2, t2)) in gathered.iter().zip(&unsharded) {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2), "{n1}");
        }
        // And a run resumed on one replica from that state continues like the unsharded one.
        let ps = params(Kind::Float);
        let _g = tch::no_grad_guard();
        for ((_, p), (_, q)) in ps.iter().zip(&whole_params) {
            p.shallow_clone().copy_(q);
        }
        drop(_g);
        let mut resumed =
            ShardedAdamW::unsharded(share(&ps), &cfg(1e-2), Precision::Mixed).unwrap();
        resumed.load_state_tensors(&gathered).unwrap();
        let g = grads(total, 9);
        resumed.step(1e-2, &g, 1.0).unwrap();
        whole.step(1e-2, &g, 1.0).unwrap();
        assert!(flat(&ps).equal(&flat(&whole_params)));
    }

    #[test]
    fn bf16_master_weights_keep_updates_that_bf16_rounds_away() {
        // lr 1e-6 on weights of magnitude ~1: each update is far below bf16's resolution
        // (2^-8 relative), so pure bf16 AdamW leaves the weights unchanged while the f32
        // masters accumulate the updates and the bf16 weights follow them.
        // The f32 run starts from the same (bf16-rounded) weights.
        let f32_params: Vec<(String, Tensor)> = params(Kind::BFloat16)
            .into_iter()
            .map(|(n, t)| (n, t.detach().to_kind(Kind::Float).set_requires_grad(true)))
            .collect();
        let total = flat_len(&f32_params);
        let mut exact =
            ShardedAdamW::unsharded(share(&f32_params), &cfg(1e-6), Precision::Mixed).unwrap();
        let run = |precision| {
            let ps = params(Kind::BFloat16);
            let before = flat(&ps);
            let mut opt = ShardedAdamW::unsharded(share(&ps), &cfg(1e-6), precision).unwrap();
            for step in 0..2000 {
                opt.step(1e-6, &grads(total, step % 7), 1.0).unwrap();
            }
            (opt, flat(&ps), before)
        };
        for step in 0..2000 {
            exact.step(1e-6, &grads(total, step % 7), 1.0).unwrap();
        }
        let (pure, pure_after, before) = run(Precision::Pure);
        assert!(!pure.has_masters());
        let changed = |after: &Tensor| after.ne_tensor(&before).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(
            changed(&pure_after),
            0,
            "pure bf16 rounds every update away"
        );
        let (mixed, mixed_after, _) = run(Precision::Mixed);
        assert!(mixed.has_masters());
        assert!(changed(&mixed_after) > total * 9 / 10);
        // The masters track the f32 run closely; the bf16 weights are them rounded.
        let masters = mixed.flat_state().unwrap()[2].shallow_clone();
        let err = (&masters - flat(&f32_params)).abs().max().double_value(&[]);
        let moved = (flat(&f32_params) - before.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        assert!(err < 0.02 * moved, "master error {err} vs movement {moved}");
        assert!(mixed_after.equal(&masters.to_kind(Kind::BFloat16).to_kind(Kind::Float)));
        // The saved state carries the masters and reloads them.
        let state = mixed.state_tensors().unwrap();
        assert!(state
            .iter()
            .any(|(n, t)| n == "a.weight.master" && t.kind() == Kind::Float));
    }

    #[test]
    fn loading_checks_entries_and_steps() {
        let ps = params(Kind::Float);
        let total = flat_len(&ps);
        let mut opt = ShardedAdamW::unsharded(ps, &cfg(1e-2), Precision::Mixed).unwrap();
        opt.step(1e-2, &grads(total, 0), 1.0).unwrap();
        let mut state = opt.state_tensors().unwrap();
        state.retain(|(n, _)| n != "a.bias.exp_avg");
        let e = opt.load_state_tensors(&state).unwrap_err().to_string();
        assert!(e.contains("a.bias.exp_avg") && e.contains("missing"), "{e}");
        let mut state = opt.state_tensors().unwrap();
        for (n, t) in &mut state {
            if n == "b.weight.step" {
                *t = Tensor::from_slice(&[7i64]);
            }
        }
        let e = opt.load_state_tensors(&state).unwrap_err().to_string();
        assert!(e.contains("b.weight.step"), "{e}");
        let e = ShardedAdamW::new(
            params(Kind::Float),
            &cfg(1e-2),
            Precision::Mixed,
            vec![4..9, 2..3],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("owned ranges"), "{e}");
    }

    #[test]
    fn loss_scaler_follows_grad_scaler() {
        let mut s = LossScaler::default();
        assert_eq!(s.scale(), 65536.0);
        assert!(!s.update(false));
        assert_eq!(s.scale(), 32768.0);
        for _ in 0..1999 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale(), 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale(), s.good_steps()), (65536.0, 0));
        assert!(LossScaler::resume(0.0, 0).is_err());
    }
}
