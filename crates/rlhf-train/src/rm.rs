//! `train-rm`: reward-model training with the three HelpSteer2 objectives (SteerLM regression,
//! Bradley-Terry, scaled Bradley-Terry), ending with a reward model directory the reward worker
//! serves: HF files plus `rlhf_reward.json` carrying the head type, attribute names, goodness
//! weights and the reward mean/std measured over the training responses.

use std::path::Path;

use rlhf_model::{
    sequence_scores, sequence_scores_checkpointed, Checkpointed, Config, HeadKind, Model,
    RewardHead, RewardSpec, Tokenizer,
};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

use crate::best::Selection;
use crate::config::{check_exists, DataSource, RmJobConfig, RmObjective};
use crate::data::{
    conversation, parse_hs2_preference, parse_pairwise, parse_rating, read_rows_from, DataFormat,
    OnBadRow, RowOutcome, RowStats, JOB_SKIP_HINT,
};
use crate::encode::{encode_conversation, pad_batch};
use crate::error::{Result, TrainError};
use crate::losses::{bradley_terry_loss, pearson, regression_loss};
use crate::reward::{init_head_from_attribute, load_with_head, pad_id, score_sequences};
use crate::trainer::{fingerprint, BatchStats, JobControl, JobReport, Session, SessionSpec, Task};

/// Rated responses, tokenized.
#[derive(Debug, Default)]
pub struct RatedSet {
    pub seqs: Vec<Vec<u32>>,
    /// One row of ratings per sequence, in attribute order.
    pub targets: Vec<Vec<f32>>,
}

/// Preference pairs, tokenized.
#[derive(Debug, Default)]
pub struct PairSet {
    pub chosen: Vec<Vec<u32>>,
    pub rejected: Vec<Vec<u32>>,
    /// |preference_strength| when the format has it.
    pub strength: Vec<Option<f32>>,
}

/// The examples of one data file.
pub enum RmData {
    Rated(RatedSet),
    Pairs(PairSet),
}

impl RmData {
    pub fn len(&self) -> usize {
        match self {
            RmData::Rated(s) => s.seqs.len(),
            RmData::Pairs(s) => s.chosen.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How data are read and tokenized.
pub struct Reading<'a> {
    pub tokenizer: &'a Tokenizer,
    pub max_len: usize,
    pub on_bad: OnBadRow,
    /// Regression attributes (ignored for pairs).
    pub attributes: &'a [String],
}

/// Reads and tokenizes one data file in `format`. Sequences longer than `max_len` keep their
/// end and are counted under `filtered` as `truncated (kept)`.
pub fn read_rm_data(
    src: &DataSource,
    key: &str,
    format: DataFormat,
    r: &Reading<'_>,
) -> Result<(RmData, RowStats)> {
    let enc = |m: &[rlhf_model::ChatMessage], cut: &mut u64| {
        encode_conversation(r.tokenizer, m, r.max_len).map(|(ids, c)| {
            *cut += u64::from(c);
            ids
        })
    };
    let mut truncated = 0u64;
    let (data, mut stats) = match format {
        DataFormat::Helpsteer2 => {
            let mut required = vec![vec!["prompt"], vec!["response"]];
            required.extend(r.attributes.iter().map(|a| vec![a.as_str()]));
            let (rows, stats) = read_rows_from(&src.input(key, required), r.on_bad, |v| {
                let row = parse_rating(v, r.attributes)?;
                let ids = enc(&conversation(&row.prompt, &row.response), &mut truncated)?;
                let t = row.ratings.iter().map(|&x| x as f32).collect();
                Ok(RowOutcome::Use((ids, t)))
            })?;
            let mut set = RatedSet::default();
            for (_, (ids, t)) in rows {
                set.seqs.push(ids);
                set.targets.push(t);
            }
            (RmData::Rated(set), stats)
        }
        DataFormat::Helpsteer2Preference | DataFormat::Pairwise => {
            let split = src.row_split();
            let mut required = if format == DataFormat::Pairwise {
                vec![vec!["chosen"], vec!["rejected"]]
            } else {
                vec![
                    vec!["prompt"],
                    vec!["response_1"],
                    vec!["response_2"],
                    vec!["preference_strength"],
                ]
            };
            if split.is_some() {
                required.push(vec!["split"]);
            }
            let (rows, stats) = read_rows_from(&src.input(key, required), r.on_bad, |v| {
                let pair = if format == DataFormat::Pairwise {
                    parse_pairwise(v)?
                } else {
                    match parse_hs2_preference(v, split)? {
                        RowOutcome::Use(p) => p,
                        RowOutcome::Filter(why) => return Ok(RowOutcome::Filter(why)),
                    }
                };
                let c = enc(&conversation(&pair.prompt, &pair.chosen), &mut truncated)?;
                let rj = enc(&conversation(&pair.prompt, &pair.rejected), &mut truncated)?;
                Ok(RowOutcome::Use((c, rj, pair.strength.map(|s| s as f32))))
            })?;
            let mut set = PairSet::default();
            for (_, (c, rj, s)) in rows {
                set.chosen.push(c);
                set.rejected.push(rj);
                set.strength.push(s);
            }
            (RmData::Pairs(set), stats)
        }
        DataFormat::Chat => {
            return Err(TrainError::config(
                "data.train.format",
                "`chat` rows are for sft, not train-rm",
            ))
        }
    };
    if truncated > 0 {
        tracing::warn!(
            "{}: {truncated} sequences longer than {} tokens lost the start of their prompt",
            src.path.display(),
            r.max_len
        );
        stats
            .filtered
            .insert("truncated (kept, prompt start cut)".into(), truncated);
    }
    if data.is_empty() {
        return Err(TrainError::Data {
            path: src.path.clone(),
            msg: format!("no usable rows ({stats})"),
        });
    }
    Ok((data, stats))
}

/// How the pairwise loss treats margins and weights.
#[derive(Debug, Clone, Copy)]
struct PairLoss {
    constant_margin: f64,
    margin_from_strength: bool,
    scaled: bool,
}

/// The reward-model training task.
pub struct RmTask {
    train: RmData,
    eval: Option<RmData>,
    pad_id: i64,
    pair_loss: PairLoss,
    attributes: Vec<String>,
    eval_batch: usize,
    /// `train.gradient_checkpointing`: the training forward is checkpointed.
    gradient_checkpointing: bool,
}

fn seqs_of<'a>(all: &'a [Vec<u32>], idx: &[usize]) -> Vec<&'a [u32]> {
    idx.iter().map(|&i| all[i].as_slice()).collect()
}

impl RmTask {
    /// The training forward's scores (b, num_labels), with `train.gradient_checkpointing` the
    /// [`Checkpointed`] to run after the loss's backward.
    fn train_scores<'m>(
        &self,
        model: &'m Model,
        ids: &Tensor,
        mask: &Tensor,
    ) -> Result<(Tensor, Option<Checkpointed<'m>>)> {
        Ok(if self.gradient_checkpointing {
            let (s, c) = sequence_scores_checkpointed(model, ids, mask)?;
            (s, Some(c))
        } else {
            (sequence_scores(model, ids, mask)?, None)
        })
    }

    fn pair_tensors(
        &self,
        set: &PairSet,
        idx: &[usize],
        dev: tch::Device,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let strengths = || -> Result<Vec<f32>> {
            idx.iter()
                .map(|&i| {
                    set.strength[i].ok_or_else(|| {
                        TrainError::config(
                            "data.train.format",
                            "this objective needs preference strengths (helpsteer2_preference rows)",
                        )
                    })
                })
                .collect()
        };
        let pl = self.pair_loss;
        let margin = if pl.margin_from_strength {
            Some(Tensor::f_from_slice(&strengths()?)?.f_to_device(dev)?)
        } else if pl.constant_margin != 0.0 {
            Some(Tensor::f_full(
                [idx.len() as i64],
                pl.constant_margin,
                (Kind::Float, dev),
            )?)
        } else {
            None
        };
        let weight = if pl.scaled {
            Some(Tensor::f_from_slice(&strengths()?)?.f_to_device(dev)?)
        } else {
            None
        };
        Ok((margin, weight))
    }

    /// Per-pair losses and the chosen/rejected scores of pairs `idx` of `set`.
    #[allow(clippy::type_complexity)]
    fn pair_forward<'m>(
        &self,
        model: &'m Model,
        set: &PairSet,
        idx: &[usize],
    ) -> Result<(Tensor, Tensor, Tensor, u64, Option<Checkpointed<'m>>)> {
        let mut seqs = seqs_of(&set.chosen, idx);
        seqs.extend(seqs_of(&set.rejected, idx));
        let tokens = seqs.iter().map(|s| s.len() as u64).sum();
        let (ids, mask) = pad_batch(&seqs, self.pad_id, model.device())?;
        // (2b, 1): chosen rows first, then rejected.
        let (s, ckpt) = self.train_scores(model, &ids, &mask)?;
        let s = s.f_squeeze_dim(1)?;
        let b = idx.len() as i64;
        let rc = s.f_narrow(0, 0, b)?;
        let rr = s.f_narrow(0, b, b)?;
        let (margin, weight) = self.pair_tensors(set, idx, model.device())?;
        let per = bradley_terry_loss(&rc, &rr, margin.as_ref(), weight.as_ref())?;
        Ok((per, rc, rr, tokens, ckpt))
    }
}

impl Task for RmTask {
    fn len(&self) -> usize {
        self.train.len()
    }

    fn fingerprint(&self) -> String {
        match &self.train {
            RmData::Rated(s) => {
                let mut fp = fingerprint(s.seqs.iter().map(Vec::as_slice));
                // Ratings are data too: a relabelled set must not resume.
                let bits: Vec<u32> = s.targets.iter().flatten().map(|x| x.to_bits()).collect();
                fp.push_str(&fingerprint(std::iter::once(bits.as_slice()))[..16]);
                fp
            }
            RmData::Pairs(s) => {
                let mut fp = fingerprint(s.chosen.iter().chain(&s.rejected).map(Vec::as_slice));
                let bits: Vec<u32> = s
                    .strength
                    .iter()
                    .map(|x| x.map_or(u32::MAX, f32::to_bits))
                    .collect();
                fp.push_str(&fingerprint(std::iter::once(bits.as_slice()))[..16]);
                fp
            }
        }
    }

    fn denominator(&self, idx: &[usize]) -> f64 {
        idx.len() as f64
    }

    fn backward(&self, model: &Model, idx: &[usize], denom: f64) -> Result<BatchStats> {
        let dev = model.device();
        match &self.train {
            RmData::Rated(set) => {
                let seqs = seqs_of(&set.seqs, idx);
                let tokens = seqs.iter().map(|s| s.len() as u64).sum();
                let (ids, mask) = pad_batch(&seqs, self.pad_id, dev)?;
                let (pred, ckpt) = self.train_scores(model, &ids, &mask)?;
                let a = self.attributes.len();
                let flat: Vec<f32> = idx.iter().flat_map(|&i| set.targets[i].clone()).collect();
                let target = Tensor::f_from_slice(&flat)?
                    .f_view([idx.len() as i64, a as i64])?
                    .f_to_device(dev)?;
                let per = regression_loss(&pred, &target)?;
                let sum = per.f_sum(Kind::Float)?;
                (&sum / denom).f_backward()?;
                if let Some(c) = ckpt {
                    c.backward()?;
                }
                Ok(BatchStats {
                    loss_sum: sum.f_double_value(&[])?,
                    count: idx.len() as f64,
                    tokens,
                    ..Default::default()
                })
            }
            RmData::Pairs(set) => {
                let (per, rc, rr, tokens, ckpt) = self.pair_forward(model, set, idx)?;
                let sum = per.f_sum(Kind::Float)?;
                (&sum / denom).f_backward()?;
                if let Some(c) = ckpt {
                    c.backward()?;
                }
                let correct = rc
                    .f_gt_tensor(&rr)?
                    .f_sum(Kind::Float)?
                    .f_double_value(&[])?;
                Ok(BatchStats {
                    loss_sum: sum.f_double_value(&[])?,
                    count: idx.len() as f64,
                    correct,
                    pairs: idx.len() as f64,
                    tokens,
                })
            }
        }
    }

    fn evaluate(&self, model: &Model) -> Result<Option<Value>> {
        let Some(eval) = &self.eval else {
            return Ok(None);
        };
        Ok(Some(evaluate_rm(
            model,
            eval,
            &self.attributes,
            self.pad_id,
            self.eval_batch,
        )?))
    }

    /// Pairs: held-out accuracy (higher is better); ratings: held-out MSE (lower is better).
    fn selection(&self) -> Option<Selection> {
        self.eval.as_ref().map(|e| match e {
            RmData::Pairs(_) => Selection {
                metric: "accuracy",
                higher_is_better: true,
            },
            RmData::Rated(_) => Selection {
                metric: "mse",
                higher_is_better: false,
            },
        })
    }
}

/// Held-out metrics. Regression: MSE overall and per attribute, and Pearson correlation per
/// attribute. Pairs: accuracy (chosen scored strictly higher) and mean unweighted BT loss.
pub fn evaluate_rm(
    model: &Model,
    data: &RmData,
    attributes: &[String],
    pad: i64,
    batch: usize,
) -> Result<Value> {
    match data {
        RmData::Rated(set) => {
            let seqs: Vec<&[u32]> = set.seqs.iter().map(Vec::as_slice).collect();
            let preds = score_sequences(model, &seqs, pad, batch)?;
            let mut out = serde_json::Map::new();
            let mut total = 0.0;
            for (a, name) in attributes.iter().enumerate() {
                let p: Vec<f64> = preds.iter().map(|r| r[a]).collect();
                let t: Vec<f64> = set.targets.iter().map(|r| f64::from(r[a])).collect();
                let mse = p
                    .iter()
                    .zip(&t)
                    .map(|(x, y)| (x - y) * (x - y))
                    .sum::<f64>()
                    / p.len() as f64;
                total += mse;
                out.insert(format!("mse/{name}"), json!(mse));
                out.insert(format!("pearson/{name}"), json!(pearson(&p, &t)));
            }
            out.insert("mse".into(), json!(total / attributes.len() as f64));
            out.insert("rows".into(), json!(set.seqs.len()));
            Ok(Value::Object(out))
        }
        RmData::Pairs(set) => {
            let c: Vec<&[u32]> = set.chosen.iter().map(Vec::as_slice).collect();
            let r: Vec<&[u32]> = set.rejected.iter().map(Vec::as_slice).collect();
            let sc = score_sequences(model, &c, pad, batch)?;
            let sr = score_sequences(model, &r, pad, batch)?;
            let n = sc.len() as f64;
            let mut correct = 0.0;
            let mut loss = 0.0;
            for (a, b) in sc.iter().zip(&sr) {
                let d = a[0] - b[0];
                if d > 0.0 {
                    correct += 1.0;
                }
                // -log σ(d), stably.
                loss += if d > 0.0 {
                    (-d).exp().ln_1p()
                } else {
                    -d + d.exp().ln_1p()
                };
            }
            Ok(json!({"accuracy": correct / n, "bt_loss": loss / n, "pairs": sc.len()}))
        }
    }
}

/// Runs `train-rm`: reads and tokenizes the data, resumes from the run directory's newest
/// valid checkpoint (or starts from `cfg.model`), trains, and writes the reward model.
pub fn train_reward_model(cfg: &RmJobConfig, control: &JobControl) -> Result<JobReport> {
    cfg.validate()?;
    check_exists("model", &cfg.model)?;
    check_exists("data.train.path", &cfg.data.train.path)?;
    if let Some(e) = &cfg.data.eval {
        check_exists("data.eval.path", &e.path)?;
    }
    let device = cfg.train.device()?;
    let kind = cfg.train.kind()?;
    let base_cfg = Config::from_dir(&cfg.model)?;
    let tok = Tokenizer::from_dir(&cfg.model)?;
    if tok.chat_template().is_none() {
        return Err(TrainError::config(
            "model",
            format!(
                "{}: the tokenizer has no chat template; reward models read chat-formatted \
                 prompt + response",
                cfg.model.display()
            ),
        ));
    }
    let max_len = cfg
        .data
        .max_length
        .unwrap_or(base_cfg.max_position_embeddings);
    let attributes: Vec<String> = match cfg.objective {
        RmObjective::Regression => cfg.regression.attributes.clone(),
        _ => vec!["reward".into()],
    };
    let reading = Reading {
        tokenizer: &tok,
        max_len,
        on_bad: cfg.data.on_bad_row,
        attributes: &attributes,
    };
    let read = |src: &DataSource, key: &str| {
        read_rm_data(src, key, cfg.format_of(src), &reading)
            .map_err(|e| e.with_skip_hint(JOB_SKIP_HINT))
    };
    let (train, train_stats) = read(&cfg.data.train, "data.train")?;
    let mut data_stats = vec![train_stats];
    let eval = match &cfg.data.eval {
        Some(src) => {
            let (d, s) = read(src, "data.eval")?;
            data_stats.push(s);
            Some(d)
        }
        None => None,
    };
    let pad = pad_id(&tok, &base_cfg);
    let task = RmTask {
        train,
        eval,
        pad_id: pad,
        pair_loss: PairLoss {
            constant_margin: cfg.bradley_terry.margin,
            margin_from_strength: cfg.bradley_terry.margin_from_strength,
            scaled: cfg.objective == RmObjective::ScaledBradleyTerry,
        },
        attributes: attributes.clone(),
        eval_batch: cfg.train.micro_batch_size,
        gradient_checkpointing: cfg.train.gradient_checkpointing,
    };
    let head = HeadKind::Score {
        num_labels: attributes.len(),
    };
    let seed = cfg.train.seed;
    let label_names = attributes.clone();
    let fresh = || -> Result<Model> {
        let (mut m, fresh_head) = load_with_head(&cfg.model, head, device, kind, seed)?;
        if let Some(attr) = &cfg.bradley_terry.init_from_attribute {
            init_head_from_attribute(&m, &cfg.model, attr)?;
            tracing::info!(attribute = %attr, from = %cfg.model.display(), "head initialised from a regression head");
        } else if fresh_head {
            tracing::info!(labels = attributes.len(), "fresh score head");
        }
        m.config.hf.id2label = Some(
            label_names
                .iter()
                .enumerate()
                .map(|(i, a)| (i.to_string(), Value::String(a.clone())))
                .collect(),
        );
        Ok(m)
    };
    let load =
        |dir: &Path| -> Result<Model> { Ok(load_with_head(dir, head, device, kind, seed)?.0) };
    let config_json = serde_json::to_value(cfg).unwrap_or(Value::Null);
    let spec = SessionSpec {
        run_dir: &cfg.run_dir,
        job: format!("train-rm/{}", cfg.objective.name()),
        config: config_json,
        optim: &cfg.optim,
        train: &cfg.train,
        examples: task.len(),
        fingerprint: task.fingerprint(),
        model_dir: &cfg.model,
    };
    let mut session = Session::open(spec, control, fresh, load)?;
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
    if !finished {
        return Ok(report);
    }
    let (step, eval) = session.select_export(&task, cfg.checkpoint.export, load)?;
    report.eval = eval;
    report.output_step = Some(step);
    if let Some(ev) = &report.eval {
        tracing::info!("held-out eval of the exported model (step {step}): {ev}");
    }
    let reward_spec = reward_spec_for(cfg, &session.model, &task)?;
    let out = cfg.output_dir();
    session.export(&out, |dir| Ok(reward_spec.save(dir)?))?;
    report.output = Some(out);
    report.reward_spec = Some(reward_spec);
    Ok(report)
}

/// Measures the served reward's mean and std over the training responses and builds the spec.
fn reward_spec_for(cfg: &RmJobConfig, model: &Model, task: &RmTask) -> Result<RewardSpec> {
    let (head, attributes, weights) = match cfg.objective {
        RmObjective::Regression => (
            RewardHead::Regression,
            cfg.regression.attributes.clone(),
            cfg.regression.weights()?,
        ),
        _ => (
            RewardHead::BradleyTerry,
            vec!["reward".to_string()],
            Default::default(),
        ),
    };
    let mut spec = RewardSpec {
        format: 1,
        head,
        attributes,
        goodness_weights: weights,
        mean: 0.0,
        std: 1.0,
    };
    let seqs: Vec<&[u32]> = match &task.train {
        RmData::Rated(s) => s.seqs.iter().map(Vec::as_slice).collect(),
        RmData::Pairs(s) => s
            .chosen
            .iter()
            .chain(&s.rejected)
            .map(Vec::as_slice)
            .collect(),
    };
    let outs = score_sequences(model, &seqs, task.pad_id, task.eval_batch.max(1))?;
    let raw: Vec<f64> = outs.iter().map(|o| spec.reward(o)).collect();
    let n = raw.len() as f64;
    let mean = raw.iter().sum::<f64>() / n;
    let var = raw.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0).max(1.0);
    spec.mean = mean;
    spec.std = var.sqrt();
    if !(spec.std.is_finite() && spec.std > 0.0) {
        tracing::warn!(
            std = spec.std,
            "the reward is constant over the training responses; storing std 1"
        );
        spec.std = 1.0;
    }
    tracing::info!(
        mean = spec.mean,
        std = spec.std,
        responses = raw.len(),
        "reward normalisation measured"
    );
    Ok(spec)
}
