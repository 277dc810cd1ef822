//! Reward models as the jobs load, score and save them: a trunk with a `score` head of one
//! output per attribute (regression) or one output (Bradley-Terry), read at the last real token
//! of `chat_template(prompt + response)`, turned into the served scalar by the model's
//! `rlhf_reward.json` ([`RewardSpec`]). [`RewardModel::score`] is what `rlhf-coord score` prints
//! and what the reward worker serves.

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlhf_model::weights::WeightFiles;
use rlhf_model::{
    sequence_scores, ChatMessage, Config, HeadKind, LoadOptions, Model, ModelDir, RewardHead,
    RewardSpec, Tokenizer,
};
use tch::{Device, Kind, Tensor};

use crate::encode::{encode_conversation, pad_batch};
use crate::error::{Result, TrainError};

/// Loads the model in `dir` with `head` on top. When the file's head is a different one (a
/// causal LM turned into a reward model, or a regression head replaced by a single output),
/// the trunk is loaded and the new head is initialised as HF does (normal(0,
/// initializer_range)), from a ChaCha stream seeded with `seed`, so the result depends on the
/// seed alone and not on libtorch's global generator. Returns the model and whether the head is
/// fresh.
pub fn load_with_head(
    dir: &Path,
    head: HeadKind,
    device: Device,
    kind: Kind,
    seed: u64,
) -> Result<(Model, bool)> {
    let mut config = Config::from_dir(dir)?;
    if config.head == head {
        let opts = LoadOptions {
            device,
            dtype: Some(kind),
            head: None,
            seed: seed as i64,
        };
        return Ok((Model::load(dir, &opts)?, false));
    }
    config.head = head;
    let files = WeightFiles::open(dir)?;
    let model = Model::new(config, device, kind, seed as i64)?;
    let head_names = ["score.weight", "lm_head.weight"];
    let vars = model.named_tensors();
    // Check presence and shapes first, then copy: a bad directory leaves no half-loaded model.
    let mut plan = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        if head_names.contains(&name.as_str()) {
            continue;
        }
        if !files.contains(name) {
            return Err(rlhf_model::ModelError::Tensor {
                path: files.path_of(name).to_path_buf(),
                name: name.clone(),
                msg: "missing from the checkpoint".into(),
            }
            .into());
        }
        let t = files.read(name)?;
        if t.size() != var.size() {
            return Err(rlhf_model::ModelError::Tensor {
                path: files.path_of(name).to_path_buf(),
                name: name.clone(),
                msg: format!("shape {:?}, the config implies {:?}", t.size(), var.size()),
            }
            .into());
        }
        plan.push((var.shallow_clone(), t));
    }
    tch::no_grad(|| -> Result<()> {
        for (mut var, t) in plan {
            var.f_copy_(&t.f_to_kind(var.kind())?)?;
        }
        Ok(())
    })?;
    init_score_head(&model, seed)?;
    Ok((model, true))
}

/// Fills `score.weight` with normal(0, initializer_range) draws from ChaCha8(seed).
fn init_score_head(model: &Model, seed: u64) -> Result<()> {
    use rand::Rng;
    let Some((_, w)) = model
        .named_tensors()
        .into_iter()
        .find(|(n, _)| n == "score.weight")
    else {
        return Ok(());
    };
    let std = model.config.initializer_range;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = w.numel();
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        // Box-Muller: two uniforms in (0, 1] give two independent standard normals.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        v.push((r * th.cos() * std) as f32);
        v.push((r * th.sin() * std) as f32);
    }
    v.truncate(n);
    let src = Tensor::f_from_slice(&v)?.f_view(w.size().as_slice())?;
    let mut w = w;
    tch::no_grad(|| w.f_copy_(&src))?;
    Ok(())
}

/// Sets the one-output head of `model` to row `attribute` of the regression head stored in
/// `dir` (a regression reward model with `rlhf_reward.json`).
pub fn init_head_from_attribute(model: &Model, dir: &Path, attribute: &str) -> Result<()> {
    let key = "bradley_terry.init_from_attribute";
    let spec = RewardSpec::load(dir)?.ok_or_else(|| {
        TrainError::config(
            key,
            format!(
                "{} has no {}; it must be a regression reward model trained by train-rm",
                dir.display(),
                RewardSpec::FILE
            ),
        )
    })?;
    if spec.head != RewardHead::Regression {
        return Err(TrainError::config(
            key,
            format!("{} is not a regression reward model", dir.display()),
        ));
    }
    let row = spec
        .attributes
        .iter()
        .position(|a| a == attribute)
        .ok_or_else(|| {
            TrainError::config(
                key,
                format!(
                    "`{attribute}` is not among the model's attributes {:?}",
                    spec.attributes
                ),
            )
        })?;
    let files = WeightFiles::open(dir)?;
    let src = files
        .read("score.weight")?
        .f_get(row as i64)?
        .f_unsqueeze(0)?;
    let (_, mut w) = model
        .named_tensors()
        .into_iter()
        .find(|(n, _)| n == "score.weight")
        .ok_or_else(|| TrainError::config(key, "the model being trained has no score head"))?;
    if w.size() != src.size() {
        return Err(TrainError::config(
            key,
            format!(
                "head row has shape {:?}, expected {:?}",
                src.size(),
                w.size()
            ),
        ));
    }
    tch::no_grad(|| w.f_copy_(&src.f_to_kind(w.kind())?))?;
    Ok(())
}

/// Head outputs (one row per sequence, f64) read at the last token, in batches, without grad.
pub fn score_sequences(
    model: &Model,
    seqs: &[&[u32]],
    pad_id: i64,
    batch: usize,
) -> Result<Vec<Vec<f64>>> {
    let _g = tch::no_grad_guard();
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch.max(1)) {
        let (ids, mask) = pad_batch(chunk, pad_id, model.device())?;
        let s = sequence_scores(model, &ids, &mask)?
            .f_to_kind(Kind::Double)?
            .f_to_device(Device::Cpu)?;
        let (b, n) = s.size2()?;
        let flat = Vec::<f64>::try_from(s.f_reshape([-1])?)?;
        for i in 0..b as usize {
            out.push(flat[i * n as usize..(i + 1) * n as usize].to_vec());
        }
    }
    Ok(out)
}

/// The padding id for batches: the tokenizer's pad token, the config's, or 0. Right padding
/// plus reading the last real token makes the value irrelevant to the results.
pub fn pad_id(tok: &Tokenizer, config: &Config) -> i64 {
    tok.pad_token
        .as_deref()
        .and_then(|t| tok.token_to_id(t))
        .or(config.pad_token_id)
        .unwrap_or(0)
}

/// One scored response.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scored {
    /// Head outputs, one per attribute (regression) or one (Bradley-Terry).
    pub outputs: Vec<f64>,
    /// The served scalar: [`RewardSpec::reward`] of the outputs.
    pub reward: f64,
}

/// A reward model directory loaded for scoring.
pub struct RewardModel {
    pub model: ModelDir,
    pub spec: RewardSpec,
    /// Longest sequence scored; longer ones keep their end.
    pub max_len: usize,
}

impl RewardModel {
    /// Loads a reward model: a `score` head and `rlhf_reward.json`. A one-output model without
    /// the file is scored raw (mean 0, std 1) with a warning.
    pub fn load(dir: &Path, device: Device) -> Result<RewardModel> {
        let opts = LoadOptions {
            device,
            dtype: Some(Kind::Float),
            ..Default::default()
        };
        let model = ModelDir::load(dir, &opts)?;
        let HeadKind::Score { num_labels } = model.model.config.head else {
            return Err(TrainError::config(
                "model",
                format!(
                    "{} is a causal LM, not a reward model (expected a *ForSequenceClassification \
                     config)",
                    dir.display()
                ),
            ));
        };
        let spec = match RewardSpec::load(dir)? {
            Some(s) => {
                if s.attributes.len() != num_labels {
                    return Err(TrainError::config(
                        "model",
                        format!(
                            "{}: {} names {} outputs, the score head has {num_labels}",
                            dir.display(),
                            RewardSpec::FILE,
                            s.attributes.len()
                        ),
                    ));
                }
                s
            }
            None if num_labels == 1 => {
                tracing::warn!(
                    "{} has no {}; serving the raw score (mean 0, std 1)",
                    dir.display(),
                    RewardSpec::FILE
                );
                RewardSpec {
                    format: 1,
                    head: RewardHead::BradleyTerry,
                    attributes: vec!["reward".into()],
                    goodness_weights: Default::default(),
                    mean: 0.0,
                    std: 1.0,
                }
            }
            None => {
                return Err(TrainError::config(
                    "model",
                    format!(
                        "{} has {num_labels} outputs and no {}: nothing says how to combine them",
                        dir.display(),
                        RewardSpec::FILE
                    ),
                ))
            }
        };
        if model.tokenizer.chat_template().is_none() {
            return Err(TrainError::config(
                "model",
                format!("{}: the tokenizer has no chat template", dir.display()),
            ));
        }
        let max_len = model.model.config.max_position_embeddings;
        Ok(RewardModel {
            model,
            spec,
            max_len,
        })
    }

    /// Tokenizes one conversation (prompt turns + response) as the jobs do.
    pub fn encode(&self, conv: &[ChatMessage]) -> std::result::Result<Vec<u32>, String> {
        encode_conversation(&self.model.tokenizer, conv, self.max_len).map(|(ids, _)| ids)
    }

    /// Scores tokenized conversations.
    pub fn score_tokens(&self, seqs: &[&[u32]], batch: usize) -> Result<Vec<Scored>> {
        let pad = self.model.pad_id;
        Ok(score_sequences(&self.model.model, seqs, pad, batch)?
            .into_iter()
            .map(|outputs| Scored {
                reward: self.spec.reward(&outputs),
                outputs,
            })
            .collect())
    }
}
