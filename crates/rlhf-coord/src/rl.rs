//! The controller's share of a training step, as synchronous functions over wire tensors: turn a
//! generation, its rewards, reference log-probs and values into KL-shaped rewards, advantages and
//! returns (with `rlhf-algo`), and cut the rollout into minibatch `TrainStep` requests. tch
//! tensors exist only inside these functions, so the async step loop never holds one across an
//! `.await`. Also the mapping from the user-facing config to the algorithm crate's types.

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{Context, Result};
use rlhf_algo::{
    kl_penalty, shape_rewards, token_level_rewards, AdvantageCalculator, AdvantageConfig,
    AdvantageEstimator, AdvantageInputs, KlConfig, KlController, KlMode, OptimizerConfig,
    PolicyLossConfig, PolicyLossKind, RewardShapingConfig, ValueLossConfig,
};
use rlhf_config::{self as schema, RunConfig};
use rlhf_model::Tokenizer;
use rlhf_proto::pb;
use rlhf_proto::wire::{from_wire, to_wire};
use tch::{Kind, Tensor};

/// The algorithm settings of a run, as `rlhf-algo` takes them. The KL, reward-shaping and
/// optimizer sections are the run file's own values (`rlhf-settings` types, shared by both);
/// only the advantage estimator and the two losses are assembled from `algorithm:` here.
#[derive(Debug, Clone)]
pub struct AlgoSettings {
    pub advantage: AdvantageConfig,
    pub policy_loss: PolicyLossConfig,
    pub value_loss: ValueLossConfig,
    pub kl: KlConfig,
    /// Controller-side shaping: clip and truncation penalty (the reward role already normalised).
    pub reward: RewardShapingConfig,
    pub actor_optim: OptimizerConfig,
    pub critic_optim: OptimizerConfig,
    /// Optimizer steps of the whole run (steps x epochs x minibatches): where a cosine schedule
    /// reaches its floor.
    pub optimizer_steps: u64,
    pub uses_critic: bool,
}

impl AlgoSettings {
    pub fn from_config(c: &RunConfig) -> Result<AlgoSettings> {
        let a = &c.algorithm;
        let estimator = match a.name {
            schema::AlgorithmName::Ppo => AdvantageEstimator::Gae,
            schema::AlgorithmName::Reinforce => AdvantageEstimator::Reinforce,
            schema::AlgorithmName::Rloo => AdvantageEstimator::Rloo,
            schema::AlgorithmName::Grpo => AdvantageEstimator::Grpo,
            schema::AlgorithmName::ReinforcePp => AdvantageEstimator::ReinforcePlusPlus,
        };
        let defaults = AdvantageConfig::default();
        let advantage = AdvantageConfig {
            estimator,
            gamma: a.gamma,
            lam: a.lam,
            whiten: a.whiten_advantages,
            grpo_scale_by_std: a.grpo_scale_by_std,
            grpo_eps: defaults.grpo_eps,
            baseline_decay: a.baseline_decay,
        };
        let policy_loss = PolicyLossConfig {
            // Every estimator trains through the clipped surrogate; with one pass over fresh
            // samples the ratio is 1 and it reduces to the plain policy gradient.
            kind: PolicyLossKind::Ppo,
            clip_eps: a.clip_eps,
            dual_clip: a.dual_clip,
            entropy_coef: a.entropy_coef,
            agg: a.loss_agg,
        };
        let value_loss = ValueLossConfig {
            clip: a.value_clip,
            agg: a.loss_agg,
        };
        let reward = RewardShapingConfig {
            mean: 0.0,
            std: 1.0,
            ..a.reward.clone()
        };
        let minibatches = (c.rollout_sequences() / c.minibatch_size().max(1)).max(1) as u64;
        let optimizer_steps = c.train.steps * c.train.epochs as u64 * minibatches;
        let s = AlgoSettings {
            advantage,
            policy_loss,
            value_loss,
            kl: a.kl.clone(),
            reward,
            actor_optim: c.train.actor.clone(),
            critic_optim: c.train.critic.clone(),
            optimizer_steps,
            uses_critic: estimator == AdvantageEstimator::Gae,
        };
        s.advantage.validate().context("algorithm")?;
        s.policy_loss.validate().map_err(|e| e.under("algorithm"))?;
        // The run file calls the value loss's `clip` `algorithm.value_clip`.
        s.value_loss.validate().map_err(|mut e| {
            e.key = "algorithm.value_clip".into();
            e
        })?;
        s.kl.validate().map_err(|e| e.under("algorithm.kl"))?;
        s.actor_optim
            .check_horizon(optimizer_steps)
            .map_err(|e| e.under("train.actor"))?;
        s.critic_optim
            .check_horizon(optimizer_steps)
            .map_err(|e| e.under("train.critic"))?;
        Ok(s)
    }

    /// The actor's KL loss term when `algorithm.kl.mode` is `loss` with a nonzero coefficient.
    pub fn kl_loss_term(&self) -> Option<rlhf_algo::KlLossTerm> {
        (self.kl.mode == KlMode::Loss && self.kl.coef > 0.0).then_some(rlhf_algo::KlLossTerm {
            estimator: self.kl.estimator,
            coef: self.kl.coef,
        })
    }
}

/// Per-step seed for sampling, derived from the run seed (splitmix64 of seed + step).
pub fn step_seed(seed: u64, step: u64) -> u64 {
    use rlhf_model::generate::{splitmix64, SPLITMIX_GAMMA};
    splitmix64(seed.wrapping_add(step.wrapping_mul(SPLITMIX_GAMMA)))
}

/// `n` items cut into at most `k` contiguous, non-empty ranges differing in length by at most 1.
pub fn shards(n: usize, k: usize) -> Vec<Range<usize>> {
    let k = k.clamp(1, n.max(1));
    (0..k)
        .map(|i| (i * n / k)..((i + 1) * n / k))
        .filter(|r| !r.is_empty())
        .collect()
}

/// The rollout of one step, decoded once from the wire when it is shaped and kept as tensors
/// until the step's last minibatch: each minibatch only selects its rows and encodes them.
pub struct Rollout {
    /// Prompt + response token ids, `[rows, prompt_width + response_len]`.
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub prompt_width: i64,
    pub response_len: i64,
    /// 1.0 on response tokens, `[rows, response_len]`.
    pub response_mask: Tensor,
    pub old_logprobs: Tensor,
    pub ref_logprobs: Option<Tensor>,
    pub values: Option<Tensor>,
    pub advantages: Tensor,
    pub returns: Tensor,
    pub rows: i64,
}

/// Step statistics computed by the controller.
#[derive(Debug, Default, Clone)]
pub struct RolloutStats {
    pub reward_mean: f64,
    pub reward_std: f64,
    pub score_mean: f64,
    pub kl_mean: f64,
    pub kl_coef: f64,
    pub response_len_mean: f64,
    pub truncated_frac: f64,
    pub response_tokens: f64,
    pub advantage_mean: f64,
    pub attribute_means: BTreeMap<String, f64>,
}

/// The sequences of a generation, for LogProbs/Values requests.
pub fn sequences(g: &pb::GenerateResponse) -> Result<pb::Sequences> {
    let ids = g
        .input_ids
        .clone()
        .context("Generate answer has no input_ids")?;
    let width = ids.shape.get(1).copied().unwrap_or(0);
    Ok(pb::Sequences {
        input_ids: Some(ids),
        attention_mask: g.attention_mask.clone(),
        prompt_width: g.prompt_width,
        response_len: width - g.prompt_width,
    })
}

/// `seqs` cut into the row ranges `parts` (same prompt width and response length each), for
/// requests sharded over replicas.
pub fn split_sequences(
    seqs: &pb::Sequences,
    parts: &[std::ops::Range<usize>],
) -> Result<Vec<pb::Sequences>> {
    let ids = from_wire(
        "input_ids",
        seqs.input_ids
            .as_ref()
            .context("sequences have no input_ids")?,
    )?;
    let mask = from_wire(
        "attention_mask",
        seqs.attention_mask
            .as_ref()
            .context("sequences have no attention_mask")?,
    )?;
    parts
        .iter()
        .map(|r| {
            let (start, n) = (r.start as i64, r.len() as i64);
            Ok(pb::Sequences {
                input_ids: Some(to_wire("input_ids", &ids.f_narrow(0, start, n)?)?),
                attention_mask: Some(to_wire("attention_mask", &mask.f_narrow(0, start, n)?)?),
                prompt_width: seqs.prompt_width,
                response_len: seqs.response_len,
            })
        })
        .collect()
}

/// Per-row answers of consecutive row shards, concatenated in order.
pub fn concat_rows(field: &str, parts: &[pb::Tensor]) -> Result<pb::Tensor> {
    let ts = parts
        .iter()
        .map(|p| from_wire(field, p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(to_wire(field, &Tensor::f_cat(&ts, 0)?)?)
}

/// The generated responses as text (special tokens skipped), one per row.
pub fn decode_responses(g: &pb::GenerateResponse, tok: &Tokenizer) -> Result<Vec<String>> {
    let ids = from_wire("input_ids", g.input_ids.as_ref().context("no input_ids")?)?;
    let mask = from_wire(
        "response_mask",
        g.response_mask.as_ref().context("no response_mask")?,
    )?;
    let (_, w) = ids.size2()?;
    let resp = ids.f_narrow(1, g.prompt_width, w - g.prompt_width)?;
    let lens = Vec::<i64>::try_from(mask.f_sum_dim_intlist([1].as_slice(), false, Kind::Int64)?)?;
    let rows = Vec::<Vec<i64>>::try_from(&resp)?;
    rows.iter()
        .zip(lens)
        .map(|(r, n)| Ok(tok.decode(&r[..n as usize], true)?))
        .collect()
}

/// Rewards, KL, advantages and returns for one generation.
pub struct Shaper {
    pub settings: AlgoSettings,
    pub kl: KlController,
    pub adv: AdvantageCalculator,
    pub group_size: i64,
}

impl Shaper {
    pub fn new(settings: AlgoSettings, group_size: i64) -> Result<Shaper> {
        Ok(Shaper {
            kl: KlController::new(&settings.kl)?,
            adv: AdvantageCalculator::new(settings.advantage.clone())?,
            settings,
            group_size,
        })
    }

    pub fn shape(
        &mut self,
        g: &pb::GenerateResponse,
        scores: &pb::ScoreResponse,
        ref_lp: Option<&pb::Tensor>,
        values: Option<&pb::Tensor>,
    ) -> Result<(Rollout, RolloutStats)> {
        let mask = from_wire(
            "response_mask",
            g.response_mask.as_ref().context("no response_mask")?,
        )?
        .f_to_kind(Kind::Float)?;
        let old = from_wire(
            "response_logprobs",
            g.response_logprobs
                .as_ref()
                .context("no response_logprobs")?,
        )?;
        let raw = from_wire(
            "rewards",
            scores
                .rewards
                .as_ref()
                .context("Score answer has no rewards")?,
        )?
        .f_to_kind(Kind::Float)?;
        let (b, _) = mask.size2()?;
        if raw.size() != [b] {
            anyhow::bail!(
                "the reward role returned {:?} rewards for {b} responses",
                raw.size()
            );
        }
        let truncated: Vec<f32> = g
            .finished
            .iter()
            .map(|&f| if f { 0.0 } else { 1.0 })
            .collect();
        let truncated = Tensor::f_from_slice(&truncated)?;
        let r = shape_rewards(&self.settings.reward, &raw, Some(&truncated))?;
        let reference = ref_lp.map(|t| from_wire("ref_logprobs", t)).transpose()?;
        let kl = reference
            .as_ref()
            .map(|r| kl_penalty(&old, r, &mask, self.settings.kl.estimator))
            .transpose()?;
        // Observed KL per sequence (sum over tokens), the quantity the adaptive controller tracks.
        let kl_seq = match &kl {
            Some(k) => rlhf_algo::mean_sequence_kl(k, &mask)?,
            None => 0.0,
        };
        let coef = self.kl.coef();
        let in_reward = self.settings.kl.mode == KlMode::Reward;
        let token_rewards =
            token_level_rewards(&r, &mask, kl.as_ref().filter(|_| in_reward), coef)?;
        let v = values.map(|t| from_wire("values", t)).transpose()?;
        let a = self.adv.compute(&AdvantageInputs {
            token_rewards: &token_rewards,
            values: v.as_ref(),
            response_mask: &mask,
            group_size: self.group_size,
        })?;
        self.kl.update(kl_seq, b as u64)?;
        let lens = mask.f_sum_dim_intlist([1].as_slice(), false, Kind::Float)?;
        let mut attribute_means = BTreeMap::new();
        if let Some(at) = &scores.attributes {
            let at = from_wire("attributes", at)?;
            if at.dim() == 2 && at.size()[0] == b {
                let means = Vec::<f64>::try_from(at.f_to_kind(Kind::Double)?.f_mean_dim(
                    [0].as_slice(),
                    false,
                    Kind::Double,
                )?)?;
                for (n, m) in scores.attribute_names.iter().zip(means) {
                    attribute_means.insert(n.clone(), m);
                }
            }
        }
        let stats = RolloutStats {
            reward_mean: r.f_mean(Kind::Double)?.double_value(&[]),
            reward_std: if b > 1 {
                r.f_std(true)?.double_value(&[])
            } else {
                0.0
            },
            score_mean: raw.f_mean(Kind::Double)?.double_value(&[]),
            kl_mean: kl_seq,
            kl_coef: coef,
            response_len_mean: lens.f_mean(Kind::Double)?.double_value(&[]),
            truncated_frac: truncated.f_mean(Kind::Double)?.double_value(&[]),
            response_tokens: lens.f_sum(Kind::Double)?.double_value(&[]),
            advantage_mean: rlhf_algo::masked_mean(&a.advantages, &mask, None)?.double_value(&[]),
            attribute_means,
        };
        let ids = g
            .input_ids
            .as_ref()
            .context("Generate answer has no input_ids")?;
        let input_ids = from_wire("input_ids", ids)?;
        let attention_mask = from_wire(
            "attention_mask",
            g.attention_mask
                .as_ref()
                .context("Generate answer has no attention_mask")?,
        )?;
        let width = ids.shape.get(1).copied().unwrap_or(0);
        let rollout = Rollout {
            input_ids,
            attention_mask,
            prompt_width: g.prompt_width,
            response_len: width - g.prompt_width,
            response_mask: mask,
            old_logprobs: old,
            ref_logprobs: reference,
            values: v,
            advantages: a.advantages,
            returns: a.returns,
            rows: b,
        };
        Ok((rollout, stats))
    }
}

/// Rows `idx` of `t`, encoded for the wire as `field`.
fn take(field: &str, t: &Tensor, idx: &Tensor) -> Result<pb::Tensor> {
    Ok(to_wire(field, &t.f_index_select(0, idx)?)?)
}

/// One minibatch's TrainStep requests for `replicas` data-parallel replicas: `rows` cut into
/// contiguous shards, each request carrying the whole minibatch's response tokens and rows as
/// its loss normaliser. With one replica the request is the plain minibatch.
pub fn minibatch_shards(
    r: &Rollout,
    rows: &[i64],
    replicas: usize,
    ref_for_actor: bool,
    critic: bool,
) -> Result<Vec<(pb::TrainStepRequest, Option<pb::TrainStepRequest>)>> {
    if replicas <= 1 {
        return Ok(vec![minibatch(r, rows, ref_for_actor, critic)?]);
    }
    let tokens = r
        .response_mask
        .f_index_select(0, &Tensor::f_from_slice(rows)?)?
        .f_sum(Kind::Double)?
        .f_double_value(&[])?;
    shards(rows.len(), replicas)
        .into_iter()
        .map(|range| {
            let (mut a, mut c) = minibatch(r, &rows[range], ref_for_actor, critic)?;
            for req in std::iter::once(&mut a).chain(c.as_mut()) {
                req.minibatch_tokens = tokens;
                req.minibatch_rows = rows.len() as f64;
            }
            Ok((a, c))
        })
        .collect()
}

/// Merges generation answers for consecutive row ranges into one batch: prompts left-padded
/// to the widest prompt, responses right-padded to the longest response (padding is token 0
/// under a 0 mask and a 0 log-prob, which no later computation reads).
pub fn merge_generations(parts: Vec<pb::GenerateResponse>) -> Result<pb::GenerateResponse> {
    let width = parts.iter().map(|p| p.prompt_width).max().unwrap_or(0);
    let resp_len = |p: &pb::GenerateResponse| -> Result<i64> {
        Ok(p.response_mask
            .as_ref()
            .context("Generate answer has no response_mask")?
            .shape
            .get(1)
            .copied()
            .unwrap_or(0))
    };
    let mut n = 0;
    for p in &parts {
        n = n.max(resp_len(p)?);
    }
    let (mut ids, mut am, mut rm, mut lp, mut finished) = (vec![], vec![], vec![], vec![], vec![]);
    for p in parts {
        let pw = p.prompt_width;
        let pn = resp_len(&p)?;
        let get = |f: &str, t: &Option<pb::Tensor>| -> Result<Tensor> {
            Ok(from_wire(
                f,
                t.as_ref()
                    .with_context(|| format!("Generate answer has no {f}"))?,
            )?)
        };
        // Pads columns [left | t | right] with zeros of t's kind.
        let pad = |t: &Tensor, left: i64, right: i64| -> Result<Tensor> {
            let b = t.size()[0];
            let opts = (t.kind(), t.device());
            Ok(Tensor::f_cat(
                &[
                    Tensor::f_zeros([b, left], opts)?,
                    t.shallow_clone(),
                    Tensor::f_zeros([b, right], opts)?,
                ],
                1,
            )?)
        };
        for (out, f, t) in [
            (&mut ids, "input_ids", &p.input_ids),
            (&mut am, "attention_mask", &p.attention_mask),
        ] {
            let t = get(f, t)?;
            let prompt = t.f_narrow(1, 0, pw)?;
            let resp = t.f_narrow(1, pw, pn)?;
            out.push(Tensor::f_cat(
                &[pad(&prompt, width - pw, 0)?, pad(&resp, 0, n - pn)?],
                1,
            )?);
        }
        rm.push(pad(&get("response_mask", &p.response_mask)?, 0, n - pn)?);
        lp.push(pad(
            &get("response_logprobs", &p.response_logprobs)?,
            0,
            n - pn,
        )?);
        finished.extend(p.finished);
    }
    let cat = |f: &str, v: Vec<Tensor>| -> Result<Option<pb::Tensor>> {
        Ok(Some(to_wire(f, &Tensor::f_cat(&v, 0)?)?))
    };
    Ok(pb::GenerateResponse {
        input_ids: cat("input_ids", ids)?,
        attention_mask: cat("attention_mask", am)?,
        prompt_width: width,
        response_mask: cat("response_mask", rm)?,
        response_logprobs: cat("response_logprobs", lp)?,
        finished,
    })
}

/// The actor's and (when `critic`) the critic's TrainStep requests for rows `rows`.
pub fn minibatch(
    r: &Rollout,
    rows: &[i64],
    ref_for_actor: bool,
    critic: bool,
) -> Result<(pb::TrainStepRequest, Option<pb::TrainStepRequest>)> {
    let idx = Tensor::f_from_slice(rows)?;
    let seqs = pb::Sequences {
        input_ids: Some(take("input_ids", &r.input_ids, &idx)?),
        attention_mask: Some(take("attention_mask", &r.attention_mask, &idx)?),
        prompt_width: r.prompt_width,
        response_len: r.response_len,
    };
    let mask = take("response_mask", &r.response_mask, &idx)?;
    let actor = pb::TrainStepRequest {
        role_id: String::new(),
        sequences: Some(seqs.clone()),
        response_mask: Some(mask.clone()),
        advantages: Some(take("advantages", &r.advantages, &idx)?),
        old_logprobs: Some(take("old_logprobs", &r.old_logprobs, &idx)?),
        ref_logprobs: match (&r.ref_logprobs, ref_for_actor) {
            (Some(t), true) => Some(take("ref_logprobs", t, &idx)?),
            _ => None,
        },
        old_values: None,
        returns: None,
        minibatch_tokens: 0.0,
        minibatch_rows: 0.0,
    };
    let critic = match (critic, &r.values) {
        (true, Some(v)) => Some(pb::TrainStepRequest {
            role_id: String::new(),
            sequences: Some(seqs),
            response_mask: Some(mask),
            advantages: None,
            old_logprobs: None,
            ref_logprobs: None,
            old_values: Some(take("old_values", v, &idx)?),
            returns: Some(take("returns", &r.returns, &idx)?),
            minibatch_tokens: 0.0,
            minibatch_rows: 0.0,
        }),
        _ => None,
    };
    Ok((actor, critic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(field: &str, v: &[f32], shape: [i64; 2]) -> pb::Tensor {
        to_wire(field, &Tensor::from_slice(v).view(shape)).unwrap()
    }

    fn ids(field: &str, v: &[i64], shape: [i64; 2]) -> pb::Tensor {
        to_wire(field, &Tensor::from_slice(v).view(shape)).unwrap()
    }

    fn values(t: &pb::Tensor) -> Vec<f64> {
        let t = from_wire("t", t)
            .unwrap()
            .to_kind(Kind::Double)
            .flatten(0, -1);
        Vec::<f64>::try_from(t).unwrap()
    }

    #[test]
    fn shards_tile_and_balance() {
        assert_eq!(shards(5, 2), vec![0..2, 2..5]);
        assert_eq!(shards(4, 4), vec![0..1, 1..2, 2..3, 3..4]);
        assert_eq!(shards(2, 3), vec![0..1, 1..2]);
        assert_eq!(shards(7, 1), vec![0..7]);
    }

    /// A 4-row rollout whose row `i` carries the value `i` in every per-token field.
    fn rollout() -> Rollout {
        let per_row = |k: f32| -> Vec<f32> { (0..4).flat_map(|i| [i as f32 + k; 2]).collect() };
        Rollout {
            input_ids: Tensor::from_slice(&(0..12).collect::<Vec<i64>>()).view([4, 3]),
            attention_mask: Tensor::ones([4, 3], (Kind::Int64, tch::Device::Cpu)),
            prompt_width: 1,
            response_len: 2,
            // Row 3 has one response token, the others two: 7 tokens in all.
            response_mask: Tensor::from_slice(&[1f32, 1., 1., 1., 1., 1., 1., 0.]).view([4, 2]),
            old_logprobs: Tensor::from_slice(&per_row(0.0)).view([4, 2]),
            ref_logprobs: Some(Tensor::from_slice(&per_row(0.5)).view([4, 2])),
            values: Some(Tensor::from_slice(&per_row(0.25)).view([4, 2])),
            advantages: Tensor::from_slice(&per_row(0.0)).view([4, 2]),
            returns: Tensor::from_slice(&per_row(0.75)).view([4, 2]),
            rows: 4,
        }
    }

    #[test]
    fn minibatch_shards_cut_the_rows_and_carry_the_whole_minibatch_normaliser() {
        let r = rollout();
        let shards = minibatch_shards(&r, &[3, 0, 2], 2, true, true).unwrap();
        assert_eq!(shards.len(), 2);
        let (a0, c0) = &shards[0];
        let (a1, _) = &shards[1];
        // Row 3 goes to replica 0, rows 0 and 2 to replica 1, in that order.
        assert_eq!(values(a0.advantages.as_ref().unwrap()), [3., 3.]);
        assert_eq!(values(a1.advantages.as_ref().unwrap()), [0., 0., 2., 2.]);
        assert_eq!(
            values(a0.sequences.as_ref().unwrap().input_ids.as_ref().unwrap()),
            [9., 10., 11.]
        );
        assert_eq!(values(a0.ref_logprobs.as_ref().unwrap()), [3.5, 3.5]);
        let c0 = c0.as_ref().expect("critic request");
        assert_eq!(values(c0.returns.as_ref().unwrap()), [3.75, 3.75]);
        assert_eq!(values(c0.old_values.as_ref().unwrap()), [3.25, 3.25]);
        assert!(c0.advantages.is_none() && c0.old_logprobs.is_none());
        // Every shard's loss is normalised by the whole minibatch: 1 + 2 + 2 tokens, 3 rows.
        for (a, _) in &shards {
            assert_eq!((a.minibatch_tokens, a.minibatch_rows), (5.0, 3.0));
        }
        // Without KL in the loss the actor gets no reference log-probs; one replica gets the
        // plain minibatch.
        let one = minibatch_shards(&r, &[1], 1, false, false).unwrap();
        assert!(one[0].0.ref_logprobs.is_none() && one[0].1.is_none());
        assert_eq!(one[0].0.minibatch_rows, 0.0);
    }

    #[test]
    fn merged_generations_pad_prompts_left_and_responses_right() {
        // Part 1: prompt width 1, responses of 2; part 2: prompt width 2, a response of 1.
        let a = pb::GenerateResponse {
            input_ids: Some(ids("input_ids", &[7, 1, 2], [1, 3])),
            attention_mask: Some(ids("attention_mask", &[1, 1, 1], [1, 3])),
            prompt_width: 1,
            response_mask: Some(t("response_mask", &[1., 1.], [1, 2])),
            response_logprobs: Some(t("response_logprobs", &[-1., -2.], [1, 2])),
            finished: vec![true],
        };
        let b = pb::GenerateResponse {
            input_ids: Some(ids("input_ids", &[8, 9, 3], [1, 3])),
            attention_mask: Some(ids("attention_mask", &[1, 1, 1], [1, 3])),
            prompt_width: 2,
            response_mask: Some(t("response_mask", &[1.], [1, 1])),
            response_logprobs: Some(t("response_logprobs", &[-3.], [1, 1])),
            finished: vec![false],
        };
        let m = merge_generations(vec![a, b]).unwrap();
        assert_eq!(m.prompt_width, 2);
        assert_eq!(
            values(m.input_ids.as_ref().unwrap()),
            [0., 7., 1., 2., 8., 9., 3., 0.]
        );
        assert_eq!(
            values(m.attention_mask.as_ref().unwrap()),
            [0., 1., 1., 1., 1., 1., 1., 0.]
        );
        assert_eq!(values(m.response_mask.as_ref().unwrap()), [1., 1., 1., 0.]);
        assert_eq!(
            values(m.response_logprobs.as_ref().unwrap()),
            [-1., -2., -3., 0.]
        );
        assert_eq!(m.finished, [true, false]);
    }
}
