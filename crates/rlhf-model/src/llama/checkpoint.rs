//! Activation checkpointing per decoder layer (`train.gradient_checkpointing`), by hand: tch has
//! neither `torch.utils.checkpoint` nor custom autograd functions.
//!
//! The forward runs every decoder layer without an autograd graph and keeps only each layer's
//! input (b, t, hidden); the final norm, the head and the loss hang off a leaf copy of the last
//! layer's output. The caller runs `loss.backward()`, which stops at that leaf, and then
//! [`Checkpointed::backward`], which walks the layers from last to first: layer `i` is recomputed
//! with a graph from its saved input (made a leaf), `sum(y * g)` is backpropagated (its gradient
//! with respect to `y` is exactly the upstream gradient `g`, and the parameters' `.grad`
//! accumulate as in a plain backward), and the input's gradient becomes the next `g`. Last, `g`
//! goes into the embedding. Peak activation memory: the `L` saved inputs plus one layer's graph,
//! instead of `L` layers' graphs (docs/benchmarks.md measures both).
//!
//! Prefix sharing ([`Model::forward_predicting`]) is kept: the prefix pass and the pass over the
//! rest of the rows are checkpointed together, layer by layer. Recomputing layer `i` runs the
//! prefix's layer `i` first (recording its keys/values, which depend on the prefix's saved input
//! and the layer's weights) and then the rest's layer `i` attending to them, and backpropagates
//! both outputs' gradients at once, so the keys/values' gradient reaches the prefix's input and
//! the weights as it does in the plain backward. Falling back to the unshared forward would have
//! been simpler but gives up the saving that sharing exists for (the prompt's forward and
//! backward once per prompt instead of once per sample), precisely in the long-sequence training
//! that checkpointing is for.
//!
//! **Invariant:** the forward and the recomputation run the same code on the same inputs
//! ([`Model::layer_passes`] over [`DecoderLayer::forward`](super::DecoderLayer)), so gradients
//! equal the plain backward's (the unit tests hold them to 1e-5 relative in f32).

use tch::{Kind, Tensor};

use super::{positions_from_mask, AttnMask, LayerKv, Model};
use crate::error::{ModelError, Result};

/// What one pass of rows through the layers needs besides its hidden states.
struct PassInputs {
    ids: Tensor,
    /// Rotary tables at the pass's positions, (b, t, 1, head_dim).
    cos: Tensor,
    sin: Tensor,
    mask: AttnMask,
}

/// One checkpointed pass: its inputs, each layer's saved input and the head-side leaf.
struct Pass {
    at: PassInputs,
    /// `inputs[i]`: layer `i`'s input (b, t, hidden), no graph; `inputs[0]` is the embedding.
    inputs: Vec<Tensor>,
    /// The last layer's output as a leaf requiring grad: the final norm, the head and the loss
    /// are computed from it, so `loss.backward()` leaves the trunk's upstream gradient here.
    out: Tensor,
}

/// The saved state of a checkpointed forward ([`Model::forward_predicting_checkpointed`],
/// [`Model::forward_padded_checkpointed`]) until its [`Checkpointed::backward`].
///
/// Two phases, in this order: `loss.backward()` on a loss computed from the forward's hidden
/// states (it fills the gradients of the head and final norm and stops at the trunk's output),
/// then `backward()`, which fills the trunk's and the embedding's. Borrowing the model keeps it
/// alive and unchanged in between; dropping this without `backward()` leaves the trunk's
/// gradients out (the head's are there), which is why the value is `#[must_use]`.
#[must_use = "run .backward() after loss.backward(), or the decoder layers get no gradients"]
pub struct Checkpointed<'m> {
    model: &'m Model,
    /// The shared-prefix pass, one row per distinct prefix.
    prefix: Option<Pass>,
    /// For each row of `rest`, its prefix's row in `prefix` (with a prefix pass).
    rows: Option<Tensor>,
    /// The pass over each row's columns after the prefix (all of them without a prefix pass);
    /// `None` when the prefix covers every column.
    rest: Option<Pass>,
}

impl std::fmt::Debug for Checkpointed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shape = |p: &Option<Pass>| p.as_ref().map(|p| p.out.size());
        f.debug_struct("Checkpointed")
            .field("layers", &self.model.layers.len())
            .field("prefix", &shape(&self.prefix))
            .field("rest", &shape(&self.rest))
            .finish()
    }
}

/// `sum(y * g)` in f32: backpropagating it sends exactly `g` into `y`.
fn dot(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    Ok(y.f_mul(g)?.f_sum(Kind::Float)?)
}

/// The gradient that reached `t`, or an error saying what was skipped.
fn grad_of(t: &Tensor, what: &'static str) -> Result<Tensor> {
    let g = t.f_grad()?;
    if !g.defined() {
        return Err(ModelError::invalid(
            "checkpointed backward",
            what,
            "has no gradient: call loss.backward() on a loss computed from the checkpointed \
             forward's hidden states first, then Checkpointed::backward",
        ));
    }
    Ok(g)
}

/// A detached leaf copy of `t` that records its gradient.
fn leaf(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_detach()?.f_set_requires_grad(true)?)
}

impl Model {
    /// [`Model::forward_predicting`] with activation checkpointing: the same hidden states
    /// (b, t - 1 - from, hidden), the same prefix sharing, and a [`Checkpointed`] whose
    /// `backward()` must run right after `loss.backward()`. Needs gradients on (it is for
    /// training forwards).
    pub fn forward_predicting_checkpointed(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        from: i64,
    ) -> Result<(Tensor, Checkpointed<'_>)> {
        self.check_checkpointing()?;
        let (input_ids, attention_mask, shared) =
            self.predicting_inputs(input_ids, attention_mask, from)?;
        let t = input_ids.size()[1];
        let w = from + 1;
        let Some((firsts, rows)) = shared else {
            let (hidden, ckpt) = self.forward_padded_checkpointed(&input_ids, &attention_mask)?;
            return Ok((hidden.f_narrow(1, from, t - from)?, ckpt));
        };
        // As forward_predicting_with: one row per distinct prefix, then the rest of every row
        // attending to its prefix's keys/values.
        let split = self.split_at_prefix(&input_ids, &attention_mask, w, &firsts, &rows)?;
        let (p_ids, p_pos, p_mask) = split.prefix;
        let prefix = self.pass_inputs(p_ids, &p_pos, p_mask)?;
        let rest = split
            .rest
            .map(|(ids, positions, mask)| self.pass_inputs(ids, &positions, mask))
            .transpose()?;
        let rows = split.rows;
        let ckpt = self.run_checkpointed(Some(prefix), Some(rows), rest)?;
        let (Some(p), Some(rows)) = (&ckpt.prefix, &ckpt.rows) else {
            unreachable!("run_checkpointed keeps the prefix pass it was given")
        };
        let last = self
            .norm
            .forward(&p.out)
            .f_narrow(1, from, 1)?
            .f_index_select(0, rows)?;
        let hidden = match &ckpt.rest {
            Some(r) => Tensor::f_cat(&[last, self.norm.forward(&r.out)], 1)?,
            None => last,
        };
        Ok((hidden, ckpt))
    }

    /// [`Model::forward_padded`] with activation checkpointing: the final-norm hidden states
    /// (b, t, hidden) of a padded batch and the [`Checkpointed`] to run after `loss.backward()`.
    pub fn forward_padded_checkpointed(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<(Tensor, Checkpointed<'_>)> {
        self.check_checkpointing()?;
        let (b, t) = input_ids.size2()?;
        if attention_mask.size() != [b, t] {
            return Err(ModelError::invalid(
                "attention_mask",
                format!("{:?}", attention_mask.size()),
                format!("must match input_ids [{b}, {t}]"),
            ));
        }
        let (positions, key_valid) = positions_from_mask(attention_mask)?;
        let mask = self.attention_mask(key_valid.as_ref(), b, t, 0)?;
        let pass = self.pass_inputs(input_ids.shallow_clone(), &positions, mask)?;
        let ckpt = self.run_checkpointed(None, None, Some(pass))?;
        let Some(r) = &ckpt.rest else {
            unreachable!("run_checkpointed keeps the pass it was given")
        };
        Ok((self.norm.forward(&r.out), ckpt))
    }

    /// Checkpointing serves forwards that build a graph; anything else is a caller's mistake
    /// (under a no-grad guard there would be no `loss.backward()` to pair with).
    fn check_checkpointing(&self) -> Result<()> {
        if !self.builds_graph() {
            return Err(ModelError::invalid(
                "gradient checkpointing",
                "no gradients",
                "a checkpointed forward is for training: gradients are off (a no-grad guard is \
                 held) or the weights do not require them; use the plain forward",
            ));
        }
        Ok(())
    }

    fn pass_inputs(&self, ids: Tensor, positions: &Tensor, mask: AttnMask) -> Result<PassInputs> {
        let (_, t) = ids.size2()?;
        let last = i64::try_from(positions.f_max()?)?;
        if t > self.config.max_position_embeddings as i64
            || last >= self.config.max_position_embeddings as i64
        {
            return Err(ModelError::invalid(
                "sequence length",
                last + 1,
                format!(
                    "exceeds max_position_embeddings = {}",
                    self.config.max_position_embeddings
                ),
            ));
        }
        let (cos, sin) = self.rope.at(positions, self.kind);
        Ok(PassInputs {
            ids,
            cos,
            sin,
            mask,
        })
    }

    /// Layer `i` over the prefix pass (recording its keys/values) and the rest pass (attending
    /// to them, each row to its prefix's `rows` entry), either of which may be absent. The one
    /// body of both the checkpointed forward and the backward's recomputation.
    fn layer_passes(
        &self,
        i: usize,
        prefix: Option<(&PassInputs, &Tensor)>,
        rows: Option<&Tensor>,
        rest: Option<(&PassInputs, &Tensor)>,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let layer = &self.layers[i];
        let mut recorded = Vec::with_capacity(1);
        let yp = prefix
            .map(|(p, x)| {
                let kv = LayerKv::Record(&mut recorded);
                layer.forward(x, &p.cos, &p.sin, &p.mask, kv, None, &self.adapters(i))
            })
            .transpose()?;
        let kv = match (recorded.pop(), rows) {
            (Some((k, v)), Some(rows)) => {
                Some((k.f_index_select(0, rows)?, v.f_index_select(0, rows)?))
            }
            _ => None,
        };
        let yr = rest
            .map(|(r, x)| {
                let kv = kv.as_ref().map_or(LayerKv::Own, LayerKv::After);
                layer.forward(x, &r.cos, &r.sin, &r.mask, kv, None, &self.adapters(i))
            })
            .transpose()?;
        Ok((yp, yr))
    }

    /// The checkpointed forward of the passes: embedding and every layer without a graph,
    /// keeping each layer's input, and the last output as a leaf.
    fn run_checkpointed(
        &self,
        prefix: Option<PassInputs>,
        rows: Option<Tensor>,
        rest: Option<PassInputs>,
    ) -> Result<Checkpointed<'_>> {
        let n = self.layers.len();
        let (mut in_p, mut in_r) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (out_p, out_r) = {
            let _no_graph = tch::no_grad_guard();
            let embed = |p: &PassInputs| -> Result<Tensor> {
                Ok(Tensor::f_embedding(
                    &self.embed_tokens,
                    &p.ids,
                    -1,
                    false,
                    false,
                )?)
            };
            let mut xp = prefix.as_ref().map(embed).transpose()?;
            let mut xr = rest.as_ref().map(embed).transpose()?;
            for i in 0..n {
                let (yp, yr) = self.layer_passes(
                    i,
                    prefix.as_ref().zip(xp.as_ref()),
                    rows.as_ref(),
                    rest.as_ref().zip(xr.as_ref()),
                )?;
                // This layer's input is kept; its output is the next one's input.
                in_p.extend(std::mem::replace(&mut xp, yp));
                in_r.extend(std::mem::replace(&mut xr, yr));
            }
            (xp, xr)
        };
        let pass = |at: Option<PassInputs>, inputs, out: Option<Tensor>| -> Result<Option<Pass>> {
            Ok(match (at, out) {
                (Some(at), Some(out)) => Some(Pass {
                    at,
                    inputs,
                    out: leaf(&out)?,
                }),
                _ => None,
            })
        };
        Ok(Checkpointed {
            model: self,
            prefix: pass(prefix, in_p, out_p)?,
            rows,
            rest: pass(rest, in_r, out_r)?,
        })
    }
}

impl Checkpointed<'_> {
    /// Backpropagates the gradient that `loss.backward()` left at the trunk's output through
    /// the decoder layers (recomputing each from its saved input) and the embedding,
    /// accumulating into the weights' `.grad` as a plain backward does. Errors when no gradient
    /// reached the output (`loss.backward()` was not run first). Runs with gradients on even
    /// under a caller's no-grad guard.
    pub fn backward(self) -> Result<()> {
        tch::with_grad(|| self.backward_inner())
    }

    fn backward_inner(self) -> Result<()> {
        let Checkpointed {
            model,
            prefix,
            rows,
            rest,
        } = self;
        let (mut prefix, mut rest) = (prefix, rest);
        // Upstream gradients of the current layer's outputs.
        let mut gp = prefix
            .as_ref()
            .map(|p| grad_of(&p.out, "the prefix pass's output"))
            .transpose()?;
        let mut gr = rest
            .as_ref()
            .map(|r| grad_of(&r.out, "the trunk's output"))
            .transpose()?;
        for i in (0..model.layers.len()).rev() {
            let pop = |p: &mut Option<Pass>| -> Result<Option<Tensor>> {
                p.as_mut()
                    .and_then(|p| p.inputs.pop())
                    .map(|x| leaf(&x))
                    .transpose()
            };
            let (xp, xr) = (pop(&mut prefix)?, pop(&mut rest)?);
            let (yp, yr) = model.layer_passes(
                i,
                prefix.as_ref().map(|p| &p.at).zip(xp.as_ref()),
                rows.as_ref(),
                rest.as_ref().map(|r| &r.at).zip(xr.as_ref()),
            )?;
            backprop(&[(yp, gp.take()), (yr, gr.take())])?;
            gp = xp
                .as_ref()
                .map(|x| grad_of(x, "a layer input"))
                .transpose()?;
            gr = xr
                .as_ref()
                .map(|x| grad_of(x, "a layer input"))
                .transpose()?;
        }
        if model.embed_tokens.requires_grad() {
            let embed = |p: &Option<Pass>| -> Result<Option<Tensor>> {
                p.as_ref()
                    .map(|p| {
                        Ok(Tensor::f_embedding(
                            &model.embed_tokens,
                            &p.at.ids,
                            -1,
                            false,
                            false,
                        )?)
                    })
                    .transpose()
            };
            backprop(&[(embed(&prefix)?, gp), (embed(&rest)?, gr)])?;
        }
        Ok(())
    }
}

/// Backpropagates each `g` into its `y` in one backward pass (the two passes share the layer's
/// weights and, through the prefix's keys/values, part of their graph).
fn backprop(pairs: &[(Option<Tensor>, Option<Tensor>)]) -> Result<()> {
    let mut total: Option<Tensor> = None;
    for (y, g) in pairs {
        if let (Some(y), Some(g)) = (y, g) {
            let d = dot(y, g)?;
            total = Some(match total {
                Some(t) => t.f_add(&d)?,
                None => d,
            });
        }
    }
    if let Some(t) = total {
        t.f_backward()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::config::{Config, HeadKind};
    use crate::generate::{
        sequence_scores, sequence_scores_checkpointed, token_logprobs_checkpointed,
        token_logprobs_from, token_values, token_values_checkpointed, Entropy,
    };
    use crate::llama::seeded_randn;
    use crate::llama::tests::{grouped_batch, max_diff, tiny};

    /// Every weight's gradient (name order), then zeroed for the next run.
    fn take_grads(m: &Model) -> Vec<(String, Tensor)> {
        m.named_tensors()
            .into_iter()
            .map(|(name, mut t)| {
                let g = t.grad();
                assert!(g.defined(), "{name}: no gradient");
                let g = g.copy();
                t.zero_grad();
                (name, g)
            })
            .collect()
    }

    /// Checkpointed gradients equal the plain ones within 1e-5 of each weight's largest plain
    /// gradient, and every weight got a nonzero one (so a skipped layer cannot pass).
    fn assert_same_grads(plain: &[(String, Tensor)], ckpt: &[(String, Tensor)], what: &str) {
        assert_eq!(plain.len(), ckpt.len());
        for ((name, p), (_, c)) in plain.iter().zip(ckpt) {
            let scale = p.abs().max().double_value(&[]);
            assert!(scale > 0.0, "{what}: {name} got a zero gradient");
            let d = max_diff(p, c) / scale;
            assert!(d < 1e-5, "{what}: {name} differs by {d} (relative)");
        }
    }

    fn assert_same_loss(plain: f64, ckpt: f64, what: &str) {
        assert!(
            (plain - ckpt).abs() <= 1e-5 * plain.abs().max(1.0),
            "{what}: loss {plain} vs {ckpt}"
        );
    }

    /// Llama untied, Qwen2 tied with q/k/v bias (the embedding also gets the head's gradient),
    /// Mistral with a 3-token sliding window.
    fn configs() -> Vec<(&'static str, Config)> {
        let mut window = tiny("MistralForCausalLM", false);
        window.sliding_window = Some(3);
        vec![
            ("llama", tiny("LlamaForCausalLM", false)),
            ("qwen2-tied", tiny("Qwen2ForCausalLM", true)),
            ("mistral-window", window),
        ]
    }

    /// (columns, `from`, prefix pass, rest pass) of the cases run on [`grouped_batch`]: shared
    /// 4-token prefixes and the rest after them; the 5 columns where the prefix covers every
    /// predicting column (no rest pass); no sharing at `from` 0 (a one-token prefix) and at
    /// `from` 5 (the rows differ there): the plain padded pass.
    const CASES: [(i64, i64, bool, bool); 4] = [
        (7, 3, true, true),
        (5, 3, true, false),
        (7, 0, false, true),
        (7, 5, false, true),
    ];

    fn batch(columns: i64) -> (Tensor, Tensor) {
        let (ids, mask) = grouped_batch();
        (ids.narrow(1, 0, columns), mask.narrow(1, 0, columns))
    }

    #[test]
    fn checkpointed_log_prob_gradients_equal_the_plain_backward() {
        // Left-padded prompts, right-padded responses, samples sharing their prompt.
        for (name, config) in configs() {
            let m = Model::new(config, Device::Cpu, Kind::Float, 7).unwrap();
            for (columns, from, has_prefix, has_rest) in CASES {
                let (ids, mask) = batch(columns);
                let n = columns - 1 - from;
                let weights = seeded_randn(&[5, n], 11);
                let real = mask.narrow(1, from + 1, n).to_kind(Kind::Float);
                // A policy-gradient-like loss plus an entropy bonus, both with gradients.
                let loss_of = |lp: &crate::generate::TokenLogProbs| {
                    let e = lp.entropy.as_ref().unwrap();
                    ((&lp.logprobs * &weights - e * 0.1) * &real).sum(Kind::Float)
                };
                let plain = {
                    let lp =
                        token_logprobs_from(&m, &ids, &mask, from, 0.7, Entropy::WithGrad).unwrap();
                    let loss = loss_of(&lp);
                    loss.backward();
                    (loss.double_value(&[]), take_grads(&m))
                };
                let ckpt = {
                    let (lp, ckpt) =
                        token_logprobs_checkpointed(&m, &ids, &mask, from, 0.7, Entropy::WithGrad)
                            .unwrap();
                    assert_eq!(ckpt.prefix.is_some(), has_prefix, "{name} from {from}");
                    assert_eq!(ckpt.rest.is_some(), has_rest, "{name} from {from}");
                    let loss = loss_of(&lp);
                    loss.backward();
                    ckpt.backward().unwrap();
                    (loss.double_value(&[]), take_grads(&m))
                };
                let what = format!("{name}, {columns} columns, from {from}");
                assert_same_loss(plain.0, ckpt.0, &what);
                assert_same_grads(&plain.1, &ckpt.1, &what);
            }
        }
    }

    #[test]
    fn checkpointed_value_gradients_equal_the_plain_backward() {
        for (name, mut config) in configs() {
            config.head = HeadKind::Score { num_labels: 1 };
            let m = Model::new(config, Device::Cpu, Kind::Float, 8).unwrap();
            for (columns, from, _, _) in CASES {
                let (ids, mask) = batch(columns);
                let n = columns - 1 - from;
                let returns = seeded_randn(&[5, n], 12);
                let real = mask.narrow(1, from + 1, n).to_kind(Kind::Float);
                let loss_of = |v: &Tensor| ((v - &returns).square() * &real).sum(Kind::Float);
                let plain = {
                    let loss = loss_of(&token_values(&m, &ids, &mask, from).unwrap());
                    loss.backward();
                    (loss.double_value(&[]), take_grads(&m))
                };
                let ckpt = {
                    let (v, ckpt) = token_values_checkpointed(&m, &ids, &mask, from).unwrap();
                    let loss = loss_of(&v);
                    loss.backward();
                    ckpt.backward().unwrap();
                    (loss.double_value(&[]), take_grads(&m))
                };
                let what = format!("{name} critic, {columns} columns, from {from}");
                assert_same_loss(plain.0, ckpt.0, &what);
                assert_same_grads(&plain.1, &ckpt.1, &what);
            }
            // The reward-model forward (score at each row's last real token).
            let (ids, mask) = grouped_batch();
            let target = seeded_randn(&[5, 1], 13);
            let plain = {
                let loss = (sequence_scores(&m, &ids, &mask).unwrap() - &target)
                    .square()
                    .sum(Kind::Float);
                loss.backward();
                (loss.double_value(&[]), take_grads(&m))
            };
            let ckpt = {
                let (s, ckpt) = sequence_scores_checkpointed(&m, &ids, &mask).unwrap();
                let loss = (s - &target).square().sum(Kind::Float);
                loss.backward();
                ckpt.backward().unwrap();
                (loss.double_value(&[]), take_grads(&m))
            };
            let what = format!("{name} reward model");
            assert_same_loss(plain.0, ckpt.0, &what);
            assert_same_grads(&plain.1, &ckpt.1, &what);
        }
    }

    #[test]
    fn checkpointed_forward_keeps_only_layer_inputs() {
        let (ids, mask) = grouped_batch();
        let m = Model::new(tiny("LlamaForCausalLM", false), Device::Cpu, Kind::Float, 9).unwrap();
        let (hidden, ckpt) = m.forward_predicting_checkpointed(&ids, &mask, 3).unwrap();
        // Two passes of two layers: each keeps its two layer inputs, without a graph.
        for pass in [&ckpt.prefix, &ckpt.rest] {
            let pass = pass.as_ref().unwrap();
            assert_eq!(pass.inputs.len(), 2);
            assert!(pass.inputs.iter().all(|x| !x.requires_grad()));
            assert!(pass.out.requires_grad());
        }
        assert_eq!(ckpt.prefix.as_ref().unwrap().out.size(), [2, 4, 32]);
        assert_eq!(ckpt.rest.as_ref().unwrap().out.size(), [5, 2, 32]);
        assert_eq!(hidden.size(), [5, 3, 32]);
        // The hidden states equal the plain forward's.
        let plain = m.forward_predicting(&ids, &mask, 3).unwrap();
        let real = mask.narrow(1, 3, 3).unsqueeze(2).to_kind(Kind::Float);
        let d = max_diff(&(hidden.detach() * &real), &(plain.detach() * &real));
        assert!(d < 1e-5, "checkpointed hidden states differ by {d}");
    }

    #[test]
    fn checkpointed_misuse_is_an_error() {
        let (ids, mask) = grouped_batch();
        let m = Model::new(
            tiny("LlamaForCausalLM", false),
            Device::Cpu,
            Kind::Float,
            10,
        )
        .unwrap();
        // backward() before loss.backward(): nothing reached the trunk's output.
        let (_lp, ckpt) =
            token_logprobs_checkpointed(&m, &ids, &mask, 3, 1.0, Entropy::Off).unwrap();
        let e = ckpt.backward().unwrap_err().to_string();
        assert!(e.contains("loss.backward()"), "{e}");
        assert!(m.named_tensors().iter().all(|(_, t)| !t.grad().defined()));
        // A checkpointed forward without gradients has no backward to pair with.
        let _g = tch::no_grad_guard();
        let e = m
            .forward_predicting_checkpointed(&ids, &mask, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-grad"), "{e}");
    }
}
