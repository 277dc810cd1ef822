//! Batched KV-cache generation and the training-side forward passes (per-token log-probs and
//! entropy, values, reward scores).
//!
//! Sampling draws its uniforms from ChaCha streams seeded on the host, not from libtorch's global
//! generator: results are reproducible from `seed` alone, independent of other work in the
//! process. Each row has its own stream, seeded from (`seed`, `first_row` + row index), so a
//! batch split into shards across generators (each shard given its `first_row`) samples the same
//! tokens as the whole batch in one call.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::llama::{
    group_rows, positions_from_mask, Checkpointed, Model, PackedWeights, SMALL_M_ROWS,
};

/// Decode steps below which `generate` keeps libtorch's GEMMs rather than packing the weights
/// for [`crate::cpu_kernels`]' packed GEMM: packing costs about as much as the GEMMs of one or
/// two steps and saves about a quarter of every step's.
const PACK_MIN_STEPS: i64 = 4;
/// Tokens from which a forward without gradients packs the weights for itself
/// ([`token_logprobs_from`]): the packing copies the weights once, the packed kernel saves
/// ~15–35% of each GEMM at these sizes.
const PACK_MIN_TOKENS: i64 = 256;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Softmax of logits / `temperature`, optionally restricted to the `top_k` most likely
    /// tokens and then to the smallest set whose probability reaches `top_p`.
    Sample {
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
    },
}

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Upper bound on generated tokens per sequence. Generation also stops at the context end.
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// A sequence finishes when it samples one of these (the id is kept in the response).
    pub stop_ids: Vec<i64>,
    /// Fills prompt padding and positions after a sequence finished.
    pub pad_id: i64,
    pub seed: u64,
    /// Global index of this call's first row: row `i` samples from the stream of
    /// (`seed`, `first_row + i`). 0 unless the caller shards one batch over several calls.
    pub first_row: u64,
}

impl GenerationConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerationConfig {
            max_new_tokens,
            sampling: Sampling::Greedy,
            stop_ids: vec![],
            pad_id: 0,
            seed: 0,
            first_row: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        if let Sampling::Sample {
            temperature,
            top_k,
            top_p,
        } = &self.sampling
        {
            if !(temperature.is_finite() && *temperature > 0.0) {
                return Err(ModelError::invalid(
                    "temperature",
                    temperature,
                    "must be a finite number > 0 (use greedy decoding for temperature 0)",
                ));
            }
            if let Some(p) = top_p {
                if !(*p > 0.0 && *p <= 1.0) {
                    return Err(ModelError::invalid("top_p", p, "must be in (0, 1]"));
                }
            }
            if *top_k == Some(0) {
                return Err(ModelError::invalid("top_k", 0, "must be >= 1"));
            }
        }
        Ok(())
    }

    fn temperature(&self) -> f64 {
        match self.sampling {
            Sampling::Greedy => 1.0,
            Sampling::Sample { temperature, .. } => temperature,
        }
    }
}

/// The result of [`generate`]. Row `i` belongs to prompt `i`.
pub struct GenerationOutput {
    /// Left-padded prompts followed by responses: (b, P + N).
    pub sequences: Tensor,
    /// 1 on real tokens of `sequences` (prompt and response), 0 on padding: (b, P + N).
    pub attention_mask: Tensor,
    /// Padded prompt width `P`.
    pub prompt_width: i64,
    /// Generated tokens (b, N), `pad_id` after a sequence finished.
    pub response_ids: Tensor,
    /// Log-probability of each generated token under softmax(logits / temperature) before
    /// top-k/top-p filtering, the distribution a training forward at the same temperature
    /// recomputes: (b, N) f32, 0 where masked.
    pub response_logprobs: Tensor,
    /// 1 on generated tokens up to and including the stop token: (b, N).
    pub response_mask: Tensor,
    /// Whether each sequence ended with a stop id (false: cut by the length limit).
    pub finished: Vec<bool>,
}

impl GenerationOutput {
    /// Per row: the generated ids (up to and including the stop token) and their log-probs.
    pub fn rows(&self) -> Result<Vec<(Vec<i64>, Vec<f32>)>> {
        let ids = self.response_ids.f_to_device(Device::Cpu)?;
        let lps = self.response_logprobs.f_to_device(Device::Cpu)?;
        let lens: Vec<i64> = Vec::<i64>::try_from(
            self.response_mask
                .f_to_device(Device::Cpu)?
                .f_sum_dim_intlist([1].as_slice(), false, Kind::Int64)?,
        )?;
        let mut out = Vec::with_capacity(lens.len());
        for (i, &n) in lens.iter().enumerate() {
            let i = i as i64;
            let row_ids = Vec::<i64>::try_from(ids.f_get(i)?.f_narrow(0, 0, n)?)?;
            let row_lp = Vec::<f32>::try_from(lps.f_get(i)?.f_narrow(0, 0, n)?)?;
            out.push((row_ids, row_lp));
        }
        Ok(out)
    }
}

/// Generates continuations of `prompts` (token ids, any lengths) in one batch with a KV cache.
pub fn generate(
    model: &Model,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
) -> Result<GenerationOutput> {
    cfg.validate()?;
    let _guard = tch::no_grad_guard();
    let ctx = model.config.max_position_embeddings;
    if prompts.is_empty() {
        return Err(ModelError::invalid(
            "prompts",
            "[]",
            "need at least one prompt",
        ));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ModelError::invalid(
                "prompts",
                format!("#{i}"),
                "is empty; a prompt needs at least one token",
            ));
        }
        if p.len() >= ctx {
            return Err(ModelError::PromptTooLong {
                index: i,
                len: p.len(),
                max: ctx,
            });
        }
        if let Some(&bad) = p
            .iter()
            .find(|&&t| t < 0 || t as usize >= model.config.vocab_size)
        {
            return Err(ModelError::invalid(
                "prompts",
                format!("#{i} token {bad}"),
                format!("outside the vocabulary [0, {})", model.config.vocab_size),
            ));
        }
    }
    let device = model.device();
    let b = prompts.len() as i64;
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let max_new = cfg.max_new_tokens.min(ctx - width as usize) as i64;
    // Left padding, so every row's next token lands in the same column.
    let mut ids = vec![cfg.pad_id; (b * width) as usize];
    let mut mask = vec![0i64; (b * width) as usize];
    for (i, p) in prompts.iter().enumerate() {
        let start = i * width as usize + (width as usize - p.len());
        ids[start..start + p.len()].copy_from_slice(p);
        mask[start..start + p.len()].iter_mut().for_each(|m| *m = 1);
    }
    let prompt_ids = Tensor::from_slice(&ids).view([b, width]).to_device(device);
    let prompt_mask = Tensor::from_slice(&mask).view([b, width]).to_device(device);
    let (positions, padded) = positions_from_mask(&prompt_mask)?;
    // Keys valid over the whole cache: prompt mask, then every generated slot.
    let mut key_valid = padded.as_ref().map(|_| prompt_mask.ne(0));
    let capacity = width + max_new.max(1);
    // Prefill: once per distinct prompt (the samples of one prompt share it), then each row
    // gets a copy of its prompt's cache. Only the last column is needed to pick the next token.
    let groups = group_rows(prompts.iter()).map(|(firsts, rows)| {
        let t = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        (t(&firsts), t(&rows))
    });
    // The prefill's rows: one per distinct prompt, or all.
    let distinct = |t: &Tensor| match &groups {
        Some((firsts, _)) => t.index_select(0, firsts),
        None => t.shallow_clone(),
    };
    // Decode steps of few rows (and the prefill before them) project through weights packed
    // once for this call, when the packing (about one step's worth of weight traffic) pays for
    // itself.
    let packed = if b <= SMALL_M_ROWS && max_new > PACK_MIN_STEPS {
        model.pack_weights()
    } else {
        None
    };
    let prefill_ids = distinct(&prompt_ids);
    let mut cache = model.new_cache(prefill_ids.size()[0], capacity)?;
    let hidden = model.forward_hidden_with(
        &prefill_ids,
        &distinct(&positions),
        key_valid.as_ref().map(distinct).as_ref(),
        Some(&mut cache),
        packed.as_ref(),
    )?;
    let mut last = hidden.narrow(1, width - 1, 1);
    drop(hidden);
    if let Some((_, rows)) = &groups {
        cache = cache.select_rows(rows)?;
        last = last.index_select(0, rows);
    }
    let mut logits = model.logits_with(&last, packed.as_ref())?.squeeze_dim(1);
    drop(last);
    let mut next_pos = positions.narrow(1, width - 1, 1) + 1; // (b, 1)

    let mut rngs: Vec<ChaCha8Rng> = (0..b as u64)
        .map(|i| ChaCha8Rng::seed_from_u64(row_seed(cfg.seed, cfg.first_row + i)))
        .collect();
    let temperature = cfg.temperature();
    let stop = if cfg.stop_ids.is_empty() {
        None
    } else {
        Some(Tensor::from_slice(&cfg.stop_ids).to_device(device))
    };
    let mut finished = Tensor::zeros([b], (Kind::Bool, device));
    let mut out_ids: Vec<Tensor> = Vec::with_capacity(max_new as usize);
    let mut out_lps: Vec<Tensor> = Vec::with_capacity(max_new as usize);
    let mut out_mask: Vec<Tensor> = Vec::with_capacity(max_new as usize);
    let pad = Tensor::full([b], cfg.pad_id, (Kind::Int64, device));
    // `next_pos` is a tensor advanced alongside `step`, not a plain counter.
    #[allow(clippy::explicit_counter_loop)]
    for step in 0..max_new {
        let scaled = if temperature == 1.0 {
            logits.shallow_clone()
        } else {
            &logits / temperature
        };
        let logp = scaled.log_softmax(-1, Kind::Float);
        let tok = match &cfg.sampling {
            Sampling::Greedy => logits.argmax(-1, false),
            Sampling::Sample { top_k, top_p, .. } => {
                let u: Vec<f32> = rngs.iter_mut().map(|r| r.random::<f32>()).collect();
                sample(
                    &logp,
                    *top_k,
                    *top_p,
                    &Tensor::from_slice(&u).to_device(device),
                )?
            }
        };
        let active = finished.logical_not();
        let tok = tok.where_self(&active, &pad);
        let lp = logp
            .gather(1, &tok.unsqueeze(1), false)
            .squeeze_dim(1)
            .where_self(&active, &tok.zeros_like().to_kind(Kind::Float));
        out_ids.push(tok.shallow_clone());
        out_lps.push(lp);
        out_mask.push(active.to_kind(Kind::Int64));
        if let Some(stop) = &stop {
            finished = finished.logical_or(
                &tok.unsqueeze(1)
                    .eq_tensor(&stop.unsqueeze(0))
                    .any_dim(1, false),
            );
        }
        // One host sync per step: stop as soon as every row is done.
        if step + 1 == max_new || bool::try_from(finished.all())? {
            break;
        }
        if let Some(kv) = key_valid.as_mut() {
            *kv = Tensor::cat(
                &[
                    kv.shallow_clone(),
                    Tensor::ones([b, 1], (Kind::Bool, device)),
                ],
                1,
            );
        }
        let hidden = model.forward_hidden_with(
            &tok.unsqueeze(1),
            &next_pos,
            key_valid.as_ref(),
            Some(&mut cache),
            packed.as_ref(),
        )?;
        logits = model.logits_with(&hidden, packed.as_ref())?.squeeze_dim(1);
        next_pos += 1;
    }
    let response_ids = Tensor::stack(&out_ids, 1);
    let response_logprobs = Tensor::stack(&out_lps, 1);
    let response_mask = Tensor::stack(&out_mask, 1);
    let finished_rows = match &stop {
        None => vec![false; b as usize],
        Some(stop) => {
            let hit = response_ids
                .unsqueeze(2)
                .eq_tensor(&stop.view([1, 1, -1]))
                .any_dim(2, false)
                .logical_and(&response_mask.ne(0))
                .any_dim(1, false);
            Vec::<bool>::try_from(hit.to_device(Device::Cpu))?
        }
    };
    Ok(GenerationOutput {
        sequences: Tensor::cat(&[&prompt_ids, &response_ids], 1),
        attention_mask: Tensor::cat(&[&prompt_mask, &response_mask], 1),
        prompt_width: width,
        response_ids,
        response_logprobs,
        response_mask,
        finished: finished_rows,
    })
}

/// splitmix64's output function: a bijective mix of `z`, so nearby inputs give unrelated
/// outputs. Seeds derived from (seed, index) pairs go through it.
pub fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The golden-ratio increment of splitmix64.
pub const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Seed of row `row`'s sampling stream, so neighbouring rows and neighbouring seeds get
/// unrelated streams.
fn row_seed(seed: u64, row: u64) -> u64 {
    splitmix64(seed ^ row.wrapping_add(1).wrapping_mul(SPLITMIX_GAMMA))
}

/// Draws one token per row from `logp` (b, V) with top-k/top-p filtering, using the given
/// uniforms `u` (b,) in [0, 1): inverse-CDF sampling over the filtered distribution. Without
/// filtering the CDF runs over the vocabulary in id order; with top-k only over the `k` most
/// likely tokens (`topk`, no full sort); with top-p over the whole vocabulary sorted by
/// probability.
fn sample(logp: &Tensor, top_k: Option<usize>, top_p: Option<f64>, u: &Tensor) -> Result<Tensor> {
    let vocab = logp.size()[1];
    let top_p = top_p.filter(|p| *p < 1.0);
    let top_k = top_k.filter(|k| (*k as i64) < vocab);
    let (sorted, order) = match (top_k, top_p) {
        (None, None) => {
            let cdf = logp.exp().cumsum(-1, Kind::Float);
            return Ok(inverse_cdf(&cdf, u, vocab));
        }
        (Some(k), None) => {
            let (vals, idx) = logp.topk(k as i64, -1, true, true);
            let cdf = vals.exp().cumsum(-1, Kind::Float);
            let i = inverse_cdf(&cdf, u, k as i64);
            return Ok(idx.gather(1, &i.unsqueeze(1), false).squeeze_dim(1));
        }
        _ => logp.sort(-1, true),
    };
    let mut probs = sorted.exp();
    if let Some(k) = top_k {
        let keep = Tensor::arange(vocab, (Kind::Int64, logp.device())).lt(k as i64);
        probs = probs * keep.unsqueeze(0);
    }
    if let Some(p) = top_p {
        // Keep a token when the mass strictly before it is below p (the top one always).
        let before = probs.cumsum(-1, Kind::Float) - &probs;
        let total = probs.sum_dim_intlist([1].as_slice(), true, Kind::Float);
        let keep = before.lt_tensor(&(total * p));
        probs = probs * keep;
    }
    let cdf = probs.cumsum(-1, Kind::Float);
    let idx = inverse_cdf(&cdf, u, vocab);
    Ok(order.gather(1, &idx.unsqueeze(1), false).squeeze_dim(1))
}

/// Per row, the index of the first entry of the (unnormalised) CDF `cdf` (b, n) above `u` times
/// its total; the clamp guards the float edge at u → 1.
fn inverse_cdf(cdf: &Tensor, u: &Tensor, n: i64) -> Tensor {
    let total = cdf.narrow(1, n - 1, 1);
    let target = u.unsqueeze(1) * total;
    cdf.le_tensor(&target)
        .sum_dim_intlist([1].as_slice(), false, Kind::Int64)
        .clamp_max(n - 1)
}

/// Per-token log-probabilities (and optionally entropy) of `input_ids` under the model.
pub struct TokenLogProbs {
    /// log p(x_{t+1} | x_{<=t}) at column t: (b, t_len - 1) f32.
    pub logprobs: Tensor,
    /// Entropy of the next-token distribution at column t: (b, t_len - 1) f32.
    pub entropy: Option<Tensor>,
}

/// Whether and how [`token_logprobs_from`] computes the entropy of each next-token distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entropy {
    /// Not computed.
    Off,
    /// Computed from detached logits: a metric, no gradient and no backward cost.
    Metric,
    /// Computed with gradients (an entropy bonus in the loss).
    WithGrad,
}

/// Log-probs of each next token of a padded batch, under softmax(logits / temperature). Column
/// `t` scores token `t + 1`, so a response mask for the sequence, shifted left by one, selects
/// the response tokens. Runs with gradients unless the caller holds a no-grad guard.
pub fn token_logprobs(
    model: &Model,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    temperature: f64,
    with_entropy: bool,
) -> Result<TokenLogProbs> {
    let e = if with_entropy {
        Entropy::WithGrad
    } else {
        Entropy::Off
    };
    token_logprobs_from(model, input_ids, attention_mask, 0, temperature, e)
}

/// As [`token_logprobs`], but only for the tokens after position `from`: column `j` of the
/// result scores token `from + j + 1`, shape (b, t_len - 1 - from). With `from = prompt_width - 1`
/// the result is exactly the response's log-probs, and the vocabulary projection, softmax and
/// their backward run on response positions only. Rows that share their first `from + 1`
/// tokens (the samples of one prompt) run that prefix once ([`Model::forward_predicting`]).
pub fn token_logprobs_from(
    model: &Model,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    from: i64,
    temperature: f64,
    entropy: Entropy,
) -> Result<TokenLogProbs> {
    // Without gradients (reference log-probs, old log-probs) a large enough forward runs its
    // projections through weights packed for this call: the packed kernel beats libtorch's GEMM
    // at these shapes by more than the packing costs (docs/benchmarks.md).
    let packed = if input_ids.numel() as i64 >= PACK_MIN_TOKENS && !model.builds_graph() {
        model.pack_weights()
    } else {
        None
    };
    // Checks the shapes and `from` for both.
    let hidden = model.forward_predicting_with(input_ids, attention_mask, from, packed.as_ref())?;
    logprobs_of(model, hidden, packed, input_ids, from, temperature, entropy)
}

/// [`token_logprobs_from`] with activation checkpointing per decoder layer
/// ([`Model::forward_predicting_checkpointed`]): the same log-probs and entropy, and a
/// [`Checkpointed`] whose `backward()` the caller runs right after `loss.backward()`.
pub fn token_logprobs_checkpointed<'m>(
    model: &'m Model,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    from: i64,
    temperature: f64,
    entropy: Entropy,
) -> Result<(TokenLogProbs, Checkpointed<'m>)> {
    let (hidden, ckpt) = model.forward_predicting_checkpointed(input_ids, attention_mask, from)?;
    let lp = logprobs_of(model, hidden, None, input_ids, from, temperature, entropy)?;
    Ok((lp, ckpt))
}

/// The head side of [`token_logprobs_from`]: log-probs (and entropy) of the tokens after
/// `from` from the hidden states of the columns that predict them.
fn logprobs_of(
    model: &Model,
    hidden: Tensor,
    packed: Option<PackedWeights>,
    input_ids: &Tensor,
    from: i64,
    temperature: f64,
    entropy: Entropy,
) -> Result<TokenLogProbs> {
    let n = hidden.size()[1];
    let mut logits = model.logits_with(&hidden, packed.as_ref())?;
    drop(packed);
    drop(hidden);
    // Log-probs are f32 whatever the model's dtype (mixed precision): a bf16 logsumexp over a
    // large vocabulary is off by ~1e-2, more than the PPO ratio's clip range cares to absorb.
    if logits.kind() != Kind::Float && logits.kind() != Kind::Double {
        logits = logits.to_kind(Kind::Float);
    }
    if temperature != 1.0 {
        logits = logits / temperature;
    }
    let targets = input_ids.narrow(1, from + 1, n);
    // log p = logit[target] - logsumexp(logits): avoids a second (b, t, V) tensor.
    let lse = logits.logsumexp([-1].as_slice(), false);
    let picked = logits
        .gather(2, &targets.unsqueeze(2), false)
        .squeeze_dim(2);
    let logprobs = picked - &lse;
    let ent = |l: &Tensor| {
        let logp = l.log_softmax(-1, Kind::Float);
        -(logp.exp() * &logp).sum_dim_intlist([-1].as_slice(), false, Kind::Float)
    };
    let entropy = match entropy {
        Entropy::Off => None,
        Entropy::WithGrad => Some(ent(&logits)),
        Entropy::Metric => {
            let _g = tch::no_grad_guard();
            Some(ent(&logits.detach()))
        }
    };
    Ok(TokenLogProbs { logprobs, entropy })
}

/// Per-token values (b, t - 1 - from) of the columns `from..t-1` (the states before each of
/// the tokens `from + 1..t`) from a score head with one label (a critic). Rows sharing their
/// first `from + 1` tokens run that prefix once.
pub fn token_values(
    model: &Model,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    from: i64,
) -> Result<Tensor> {
    let hidden = model.forward_predicting(input_ids, attention_mask, from)?;
    values_of(model, &hidden)
}

/// [`token_values`] with activation checkpointing per decoder layer
/// ([`Model::forward_predicting_checkpointed`]): the same values, and a [`Checkpointed`] whose
/// `backward()` the caller runs right after `loss.backward()`.
pub fn token_values_checkpointed<'m>(
    model: &'m Model,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    from: i64,
) -> Result<(Tensor, Checkpointed<'m>)> {
    let (hidden, ckpt) = model.forward_predicting_checkpointed(input_ids, attention_mask, from)?;
    Ok((values_of(model, &hidden)?, ckpt))
}

fn values_of(model: &Model, hidden: &Tensor) -> Result<Tensor> {
    let s = model.score(hidden)?;
    if s.size()[2] != 1 {
        return Err(ModelError::invalid(
            "head",
            s.size()[2],
            "a value head has one output; this score head has more",
        ));
    }
    Ok(s.squeeze_dim(2))
}

/// Score-head outputs read at each row's last real token (b, num_labels): the reward-model
/// forward (1 label: Bradley-Terry; N: multi-attribute regression).
pub fn sequence_scores(
    model: &Model,
    input_ids: &Tensor,
    attention_mask: &Tensor,
) -> Result<Tensor> {
    let hidden = model.forward_padded(input_ids, attention_mask)?;
    scores_of(model, &hidden, attention_mask)
}

/// [`sequence_scores`] with activation checkpointing per decoder layer
/// ([`Model::forward_padded_checkpointed`]): the same scores, and a [`Checkpointed`] whose
/// `backward()` the caller runs right after `loss.backward()`.
pub fn sequence_scores_checkpointed<'m>(
    model: &'m Model,
    input_ids: &Tensor,
    attention_mask: &Tensor,
) -> Result<(Tensor, Checkpointed<'m>)> {
    let (hidden, ckpt) = model.forward_padded_checkpointed(input_ids, attention_mask)?;
    Ok((scores_of(model, &hidden, attention_mask)?, ckpt))
}

fn scores_of(model: &Model, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let t = hidden.size()[1];
    let s = model.score(hidden)?;
    let last = last_token_index(attention_mask, t)?;
    let n = s.size()[2];
    Ok(
        s.gather(1, &last.view([-1, 1, 1]).expand([-1, 1, n], false), false)
            .squeeze_dim(1),
    )
}

/// Index of the last 1 in each row of a 0/1 mask (works for left and right padding). A row with
/// no real token is an error naming the row.
pub fn last_token_index(attention_mask: &Tensor, t: i64) -> Result<Tensor> {
    let valid = attention_mask.ne(0);
    let empty = valid.any_dim(1, false).logical_not();
    if bool::try_from(empty.any())? {
        let row = i64::try_from(empty.to_kind(Kind::Int64).argmax(0, false))?;
        return Err(ModelError::invalid(
            "attention_mask",
            format!("row {row}"),
            "has no real token",
        ));
    }
    let ar = Tensor::arange(t, (Kind::Int64, attention_mask.device())).unsqueeze(0);
    Ok((ar * valid.to_kind(Kind::Int64)).argmax(1, false))
}
