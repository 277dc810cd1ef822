//! `sft`: supervised fine-tuning of a causal LM on chat transcripts with the model's chat
//! template applied; the loss is the mean negative log-likelihood of the assistant's tokens
//! (content and end-of-turn markup), averaged over all such tokens of the global batch.

use std::path::Path;

use rlhf_model::{
    token_logprobs, token_logprobs_checkpointed, Checkpointed, Config, Entropy, HeadKind,
    LoadOptions, Model, Tokenizer,
};
use serde_json::{json, Value};
use tch::Kind;

use crate::best::Selection;
use crate::config::{check_exists, DataSource, SftJobConfig};
use crate::data::{parse_chat, read_rows_from, OnBadRow, RowOutcome, RowStats, JOB_SKIP_HINT};
use crate::encode::{encode_chat_masked, pad_batch, pad_marks, MaskedTokens};
use crate::error::{Result, TrainError};
use crate::losses::sft_loss_sum;
use crate::trainer::{fingerprint, BatchStats, JobControl, JobReport, Session, SessionSpec, Task};

/// Reads and tokenizes chat rows. Conversations longer than `max_len` are cut at the end (and
/// counted); a row with no assistant token left within `max_len` is left out and counted.
pub fn read_chat_data(
    src: &DataSource,
    key: &str,
    tok: &Tokenizer,
    max_len: usize,
    on_bad: OnBadRow,
) -> Result<(Vec<MaskedTokens>, RowStats)> {
    let mut truncated = 0u64;
    let input = src.input(key, vec![vec!["messages", "prompt"]]);
    let (rows, mut stats) = read_rows_from(&input, on_bad, |v| {
        let msgs = parse_chat(v)?;
        let (t, cut) = encode_chat_masked(tok, &msgs, max_len)?;
        truncated += u64::from(cut);
        if t.ids.len() < 2 || !t.assistant[1..].contains(&1) {
            return Ok(RowOutcome::Filter("no assistant token within max_length"));
        }
        Ok(RowOutcome::Use(t))
    })?;
    if truncated > 0 {
        stats
            .filtered
            .insert("truncated (kept, end cut)".into(), truncated);
    }
    let data: Vec<MaskedTokens> = rows.into_iter().map(|(_, t)| t).collect();
    if data.is_empty() {
        return Err(TrainError::Data {
            path: src.path.clone(),
            msg: format!("no usable rows ({stats})"),
        });
    }
    Ok((data, stats))
}

/// The SFT task.
pub struct SftTask {
    train: Vec<MaskedTokens>,
    eval: Option<Vec<MaskedTokens>>,
    pad_id: i64,
    eval_batch: usize,
    /// `train.gradient_checkpointing`: the training forward is checkpointed.
    gradient_checkpointing: bool,
}

/// Target tokens of an example: assistant marks from position 1 on (position 0 is never a
/// target).
fn targets(t: &MaskedTokens) -> u64 {
    t.assistant[1..].iter().map(|&m| u64::from(m)).sum()
}

impl SftTask {
    /// Summed NLL over the assistant tokens of `idx`, the number of such tokens, the number of
    /// tokens, and with `checkpointed` the [`Checkpointed`] to run after the loss's backward.
    fn nll<'m>(
        &self,
        model: &'m Model,
        set: &[MaskedTokens],
        idx: &[usize],
        checkpointed: bool,
    ) -> Result<(tch::Tensor, f64, u64, Option<Checkpointed<'m>>)> {
        let seqs: Vec<&[u32]> = idx.iter().map(|&i| set[i].ids.as_slice()).collect();
        let marks: Vec<&[u8]> = idx.iter().map(|&i| set[i].assistant.as_slice()).collect();
        let tokens = seqs.iter().map(|s| s.len() as u64).sum();
        let (ids, mask) = pad_batch(&seqs, self.pad_id, model.device())?;
        let m = pad_marks(&marks, model.device())?;
        let t = m.size()[1];
        let (lp, ckpt) = if checkpointed {
            let (lp, c) = token_logprobs_checkpointed(model, &ids, &mask, 0, 1.0, Entropy::Off)?;
            (lp.logprobs, Some(c))
        } else {
            (
                token_logprobs(model, &ids, &mask, 1.0, false)?.logprobs,
                None,
            )
        };
        // Log-probs are for targets at positions 1..t.
        let loss = sft_loss_sum(&lp, &m.f_narrow(1, 1, t - 1)?)?;
        let n = idx.iter().map(|&i| targets(&set[i]) as f64).sum();
        Ok((loss, n, tokens, ckpt))
    }
}

impl Task for SftTask {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn fingerprint(&self) -> String {
        let mut fp = fingerprint(self.train.iter().map(|t| t.ids.as_slice()));
        let marks: Vec<u32> = self
            .train
            .iter()
            .flat_map(|t| t.assistant.iter().map(|&m| u32::from(m)))
            .collect();
        fp.push_str(&fingerprint(std::iter::once(marks.as_slice()))[..16]);
        fp
    }

    fn denominator(&self, idx: &[usize]) -> f64 {
        idx.iter().map(|&i| targets(&self.train[i]) as f64).sum()
    }

    fn backward(&self, model: &Model, idx: &[usize], denom: f64) -> Result<BatchStats> {
        let (loss, n, tokens, ckpt) =
            self.nll(model, &self.train, idx, self.gradient_checkpointing)?;
        (&loss / denom).f_backward()?;
        // The decoder layers' share of the backward, recomputed layer by layer.
        if let Some(c) = ckpt {
            c.backward()?;
        }
        Ok(BatchStats {
            loss_sum: loss.f_double_value(&[])?,
            count: n,
            tokens,
            ..Default::default()
        })
    }

    fn evaluate(&self, model: &Model) -> Result<Option<Value>> {
        let Some(eval) = &self.eval else {
            return Ok(None);
        };
        let _g = tch::no_grad_guard();
        let (mut sum, mut n) = (0.0, 0.0);
        let all: Vec<usize> = (0..eval.len()).collect();
        for chunk in all.chunks(self.eval_batch.max(1)) {
            let (loss, k, _, _) = self.nll(model, eval, chunk, false)?;
            sum += loss.f_to_kind(Kind::Double)?.f_double_value(&[])?;
            n += k;
        }
        let nll = sum / n.max(1.0);
        Ok(Some(
            json!({"nll": nll, "perplexity": nll.exp(), "tokens": n, "rows": eval.len()}),
        ))
    }

    /// The held-out loss: mean NLL of the assistant tokens (lower is better).
    fn selection(&self) -> Option<Selection> {
        self.eval.as_ref().map(|_| Selection {
            metric: "nll",
            higher_is_better: false,
        })
    }
}

/// Runs `sft`: like [`crate::rm::train_reward_model`], for a causal LM on chat data.
pub fn train_sft(cfg: &SftJobConfig, control: &JobControl) -> Result<JobReport> {
    cfg.validate()?;
    check_exists("model", &cfg.model)?;
    check_exists("data.train.path", &cfg.data.train.path)?;
    if let Some(e) = &cfg.data.eval {
        check_exists("data.eval.path", &e.path)?;
    }
    let device = cfg.train.device()?;
    let kind = cfg.train.kind()?;
    let base_cfg = Config::from_dir(&cfg.model)?;
    if base_cfg.head != HeadKind::CausalLm {
        return Err(TrainError::config(
            "model",
            format!("{} is not a causal LM (*ForCausalLM)", cfg.model.display()),
        ));
    }
    let tok = Tokenizer::from_dir(&cfg.model)?;
    if tok.chat_template().is_none() {
        return Err(TrainError::config(
            "model",
            format!(
                "{}: the tokenizer has no chat template",
                cfg.model.display()
            ),
        ));
    }
    let max_len = cfg
        .data
        .max_length
        .unwrap_or(base_cfg.max_position_embeddings);
    let read = |src: &DataSource, key: &str| {
        read_chat_data(src, key, &tok, max_len, cfg.data.on_bad_row)
            .map_err(|e| e.with_skip_hint(JOB_SKIP_HINT))
    };
    let (train, s) = read(&cfg.data.train, "data.train")?;
    let mut data_stats = vec![s];
    let eval = match &cfg.data.eval {
        Some(src) => {
            let (d, s) = read(src, "data.eval")?;
            data_stats.push(s);
            Some(d)
        }
        None => None,
    };
    let task = SftTask {
        train,
        eval,
        pad_id: crate::reward::pad_id(&tok, &base_cfg),
        eval_batch: cfg.train.micro_batch_size,
        gradient_checkpointing: cfg.train.gradient_checkpointing,
    };
    let opts = LoadOptions {
        device,
        dtype: Some(kind),
        head: None,
        seed: cfg.train.seed as i64,
    };
    let spec = SessionSpec {
        run_dir: &cfg.run_dir,
        job: "sft".into(),
        config: serde_json::to_value(cfg).unwrap_or(Value::Null),
        optim: &cfg.optim,
        train: &cfg.train,
        examples: task.len(),
        fingerprint: task.fingerprint(),
        model_dir: &cfg.model,
    };
    let load = |dir: &Path| -> Result<Model> { Ok(Model::load(dir, &opts)?) };
    let mut session = Session::open(spec, control, || Ok(Model::load(&cfg.model, &opts)?), load)?;
    let finished = session.train(&task, &cfg.train, &cfg.checkpoint, control)?;
    let mut report = JobReport {
        steps: session.state.step,
        finished,
        resumed_from: session.resumed_from,
        output: None,
        eval: None,
        best: session.best(),
        output_step: None,
        early_stop: session.early_stopped.clone(),
        reward_spec: None,
        data: data_stats,
    };
    if finished {
        let (step, eval) = session.select_export(&task, cfg.checkpoint.export, load)?;
        report.eval = eval;
        report.output_step = Some(step);
        let out = cfg.output_dir();
        session.export(&out, |_| Ok(()))?;
        report.output = Some(out);
    }
    Ok(report)
}
