//! The job files of `rlhf-coord train-rm` and `rlhf-coord sft` (serde; unknown keys are
//! errors). Loading (YAML, `RLHF_` env, `--set`) is the binary's business; [`RmJobConfig::validate`]
//! and [`SftJobConfig::validate`] check what serde cannot, naming the key.
//!
//! Every field's doc states its default. Relative paths are taken relative to the working
//! directory of the process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rlhf_algo::{AlgoError, OptimizerConfig, HELPSTEER2_ATTRIBUTES};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::columnar::Columns;
use crate::data::{DataFormat, DataInput, OnBadRow};
use crate::error::{Result, TrainError};

/// What a reward model is trained to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RmObjective {
    /// SteerLM regression: one head output per attribute, MSE against the ratings.
    Regression,
    /// Pairwise `-log σ(r_c - r_r - margin)`.
    BradleyTerry,
    /// HelpSteer2-Preference: the Bradley-Terry term weighted by |preference_strength|.
    ScaledBradleyTerry,
}

impl RmObjective {
    pub fn name(self) -> &'static str {
        match self {
            RmObjective::Regression => "regression",
            RmObjective::BradleyTerry => "bradley_terry",
            RmObjective::ScaledBradleyTerry => "scaled_bradley_terry",
        }
    }

    /// The data format used when `data.*.format` is not given.
    pub fn default_format(self) -> DataFormat {
        match self {
            RmObjective::Regression => DataFormat::Helpsteer2,
            RmObjective::BradleyTerry => DataFormat::Pairwise,
            RmObjective::ScaledBradleyTerry => DataFormat::Helpsteer2Preference,
        }
    }
}

/// One data file or dataset directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// A `.jsonl` or `.jsonl.gz` file, a Parquet file, or a Hugging Face dataset directory
    /// (`data/train-00000-of-00003.parquet`, ...; `split` picks the files). Required.
    pub path: PathBuf,
    /// Row format. Default: the objective's (regression: `helpsteer2`, bradley_terry:
    /// `pairwise`, scaled_bradley_terry: `helpsteer2_preference`; SFT: `chat`).
    #[serde(default)]
    pub format: Option<DataFormat>,
    /// For a dataset directory: the split whose Parquet files are read (default `train`). For a
    /// HelpSteer2-Preference file: use rows whose `split` field equals this (`train`,
    /// `validation`); the others are counted as left out (default: every row).
    #[serde(default)]
    pub split: Option<String>,
    /// The column (JSONL key) holding the `prompt` field. Default: `prompt`.
    #[serde(default)]
    pub prompt_key: Option<String>,
    /// The column holding the chat `messages` field (SFT). Default: `messages`.
    #[serde(default)]
    pub messages_key: Option<String>,
    /// The column holding the `response` field. Default: `response`.
    #[serde(default)]
    pub response_key: Option<String>,
    /// The column holding the `chosen` field (pairs). Default: `chosen`.
    #[serde(default)]
    pub chosen_key: Option<String>,
    /// The column holding the `rejected` field (pairs). Default: `rejected`.
    #[serde(default)]
    pub rejected_key: Option<String>,
}

impl DataSource {
    /// What to read: `key` is where this source sits in the job file (`data.train`), for the
    /// errors; `required` the fields whose columns a Parquet source must have.
    pub fn input<'a>(&'a self, key: &str, required: Vec<Vec<&'a str>>) -> DataInput<'a> {
        let k = |name: &str| format!("{key}.{name}");
        DataInput {
            path: &self.path,
            split: self.split.as_deref(),
            split_key: k("split"),
            columns: Columns::default()
                .map("prompt", self.prompt_key.as_deref(), k("prompt_key"))
                .map("messages", self.messages_key.as_deref(), k("messages_key"))
                .map("response", self.response_key.as_deref(), k("response_key"))
                .map("chosen", self.chosen_key.as_deref(), k("chosen_key"))
                .map("rejected", self.rejected_key.as_deref(), k("rejected_key")),
            required,
        }
    }

    /// The HelpSteer2-Preference row filter: `split` of a file (of a directory it picks files).
    pub fn row_split(&self) -> Option<&str> {
        self.split.as_deref().filter(|_| !self.path.is_dir())
    }
}

/// Training and evaluation data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training rows. Required.
    pub train: DataSource,
    /// Held-out rows evaluated every `train.eval_every` steps and at the end. Default: none.
    #[serde(default)]
    pub eval: Option<DataSource>,
    /// `fail` (default) stops at the first bad row naming file and line; `skip` logs each bad
    /// row with its file and line and counts them.
    #[serde(default)]
    pub on_bad_row: OnBadRow,
    /// Tokens per sequence; longer ones lose the start of the prompt (reward models) or the end
    /// of the conversation (SFT), and are counted. Default: the model's
    /// `max_position_embeddings`.
    #[serde(default)]
    pub max_length: Option<usize>,
}

/// The optimisation loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Examples (reward models: pairs or rated responses) per optimizer step. Default 128, the
    /// global batch of the HelpSteer2 papers.
    pub batch_size: usize,
    /// Examples per forward/backward; gradients accumulate over `batch_size / micro_batch_size`
    /// micro-batches. Default 8.
    pub micro_batch_size: usize,
    /// Passes over the training data. Default 1.
    pub epochs: u64,
    /// Stop after this many optimizer steps instead (may end mid-epoch or run extra epochs).
    /// Default: none (`epochs` decides).
    pub max_steps: Option<u64>,
    /// Seeds the data order (per-epoch permutations) and any freshly initialised head.
    /// Default 0.
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`. Default `cpu`.
    pub device: String,
    /// Compute dtype: `float32`, `bfloat16`, `float16`. Default `float32`.
    pub dtype: String,
    /// Activation checkpointing per decoder layer: each layer keeps only its input and is
    /// recomputed in the backward (less activation memory, one more forward per micro-batch;
    /// the same gradients). Default false.
    pub gradient_checkpointing: bool,
    /// Steps between log lines (and `metrics.jsonl` records). Default 10.
    pub log_every: u64,
    /// Steps between evaluations on `data.eval`. Default: only at the end. Every evaluation
    /// writes a checkpoint and ranks it in `checkpoints/ranking.json` by the held-out metric
    /// (reward models: `accuracy` for Bradley-Terry and scaled BT, `mse` for regression; SFT:
    /// `nll`); the best one is protected from `checkpoint.keep_last`.
    pub eval_every: Option<u64>,
    /// Stop when the held-out metric stops improving: `{patience: N, min_delta: x}`. Needs
    /// `data.eval` and `train.eval_every`. Default: none (train to the last step).
    pub early_stop: Option<EarlyStopConfig>,
}

/// `train.early_stop`: the job stops (finished, with its checkpoint) after `patience`
/// evaluations in a row that did not beat the best one by more than `min_delta`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopConfig {
    /// Evaluations in a row without an improvement before the job stops; >= 1. Required.
    pub patience: u64,
    /// How much an evaluation must beat the best so far by to count as an improvement, in the
    /// metric's units (accuracy, MSE or NLL); >= 0. Default 0 (any improvement counts).
    #[serde(default)]
    pub min_delta: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 128,
            micro_batch_size: 8,
            epochs: 1,
            max_steps: None,
            seed: 0,
            device: "cpu".into(),
            dtype: "float32".into(),
            gradient_checkpointing: false,
            log_every: 10,
            eval_every: None,
            early_stop: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(TrainError::config("train.batch_size", "must be >= 1"));
        }
        if self.micro_batch_size == 0 {
            return Err(TrainError::config("train.micro_batch_size", "must be >= 1"));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err(TrainError::config(
                "train.epochs",
                "must be >= 1 (or set train.max_steps)",
            ));
        }
        if self.max_steps == Some(0) {
            return Err(TrainError::config("train.max_steps", "must be >= 1"));
        }
        if self.log_every == 0 {
            return Err(TrainError::config("train.log_every", "must be >= 1"));
        }
        if self.eval_every == Some(0) {
            return Err(TrainError::config("train.eval_every", "must be >= 1"));
        }
        if let Some(es) = &self.early_stop {
            if es.patience == 0 {
                return Err(TrainError::config(
                    "train.early_stop.patience",
                    "must be >= 1 (evaluations without improvement before stopping)",
                ));
            }
            if !(es.min_delta.is_finite() && es.min_delta >= 0.0) {
                return Err(TrainError::config(
                    "train.early_stop.min_delta",
                    format!("must be finite and >= 0, found {}", es.min_delta),
                ));
            }
        }
        self.device()?;
        self.kind()?;
        Ok(())
    }

    pub fn device(&self) -> Result<Device> {
        rlhf_model::config::device_from_str(&self.device).ok_or_else(|| {
            TrainError::config(
                "train.device",
                format!("{:?}: expected cpu, cuda or cuda:N", self.device),
            )
        })
    }

    pub fn kind(&self) -> Result<Kind> {
        rlhf_model::config::kind_from_str(&self.dtype).ok_or_else(|| {
            TrainError::config(
                "train.dtype",
                format!("{:?}: expected float32, bfloat16 or float16", self.dtype),
            )
        })
    }
}

/// Which weights a finished job writes to its output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportChoice {
    /// The checkpoint with the best held-out metric (the top of `checkpoints/ranking.json`);
    /// the last step's weights when there is no `data.eval`. The default.
    #[default]
    Best,
    /// The last step's weights.
    Last,
}

/// When full checkpoints are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Steps between checkpoints. Default: none (only the final checkpoint, one at every
    /// evaluation, and one when the job is stopped early).
    pub every: Option<u64>,
    /// Checkpoints kept (older ones are deleted unless protected; the best evaluated one always
    /// is). Default 2.
    pub keep_last: usize,
    /// What a finished job writes to `output`: `best` (the best evaluated checkpoint's weights)
    /// or `last`. Default `best`, which is `last` for a job without `data.eval`.
    pub export: ExportChoice,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every: None,
            keep_last: 2,
            export: ExportChoice::Best,
        }
    }
}

impl CheckpointConfig {
    pub fn validate(&self) -> Result<()> {
        if self.every == Some(0) {
            return Err(TrainError::config("checkpoint.every", "must be >= 1"));
        }
        if self.keep_last == 0 {
            return Err(TrainError::config(
                "checkpoint.keep_last",
                "must be >= 1 (resume needs the newest checkpoint)",
            ));
        }
        Ok(())
    }
}

/// SteerLM regression settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegressionConfig {
    /// Rating fields the head predicts, one output each, in this order. Default: HelpSteer2's
    /// five (helpfulness, correctness, coherence, complexity, verbosity).
    pub attributes: Vec<String>,
    /// Weights combining the attribute outputs into the served reward. Default: HelpSteer2
    /// goodness (helpfulness 0.65, correctness 0.8, coherence 0.45), restricted to the trained
    /// attributes.
    pub goodness_weights: Option<BTreeMap<String, f64>>,
}

impl Default for RegressionConfig {
    fn default() -> Self {
        RegressionConfig {
            attributes: HELPSTEER2_ATTRIBUTES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            goodness_weights: None,
        }
    }
}

/// HelpSteer2's goodness weights.
pub fn helpsteer2_goodness() -> BTreeMap<String, f64> {
    [
        ("helpfulness", 0.65),
        ("correctness", 0.8),
        ("coherence", 0.45),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl RegressionConfig {
    /// The goodness weights to store, restricted to the trained attributes.
    pub fn weights(&self) -> Result<BTreeMap<String, f64>> {
        let w = match &self.goodness_weights {
            Some(w) => {
                for (k, v) in w {
                    if !self.attributes.contains(k) {
                        return Err(TrainError::config(
                            format!("regression.goodness_weights.{k}"),
                            format!("not among regression.attributes {:?}", self.attributes),
                        ));
                    }
                    if !v.is_finite() {
                        return Err(TrainError::config(
                            format!("regression.goodness_weights.{k}"),
                            "must be finite",
                        ));
                    }
                }
                w.clone()
            }
            None => helpsteer2_goodness()
                .into_iter()
                .filter(|(k, _)| self.attributes.contains(k))
                .collect(),
        };
        if w.is_empty() {
            return Err(TrainError::config(
                "regression.goodness_weights",
                "none of the trained attributes has a goodness weight; set the weights that \
                 combine the attributes into the reward",
            ));
        }
        Ok(w)
    }

    pub fn validate(&self) -> Result<()> {
        if self.attributes.is_empty() {
            return Err(TrainError::config(
                "regression.attributes",
                "must name at least one attribute",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for a in &self.attributes {
            if !seen.insert(a) {
                return Err(TrainError::config(
                    "regression.attributes",
                    format!("`{a}` appears twice"),
                ));
            }
        }
        self.weights().map(|_| ())
    }
}

/// Bradley-Terry settings (plain and scaled).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BradleyTerryConfig {
    /// Constant margin `m` in `-log σ(r_c - r_r - m)`. Default 0.
    pub margin: f64,
    /// Use |preference_strength| as the margin instead (HelpSteer2-Preference data). Default
    /// false.
    pub margin_from_strength: bool,
    /// Initialise the one-output head from this output of a regression reward model: `model`
    /// must then be a regression reward model (with `rlhf_reward.json`), whose trunk is loaded
    /// and whose head row for this attribute becomes the new head (HelpSteer2-Preference:
    /// `helpfulness`). Default: none (a freshly initialised head).
    pub init_from_attribute: Option<String>,
}

/// `rlhf-coord train-rm FILE.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmJobConfig {
    /// Run directory: `checkpoints/`, `metrics.jsonl`, `config.resolved.yaml`. Required.
    pub run_dir: PathBuf,
    /// The starting model, an HF directory (a causal LM, or a reward model). Required.
    pub model: PathBuf,
    /// Where the trained reward model (HF files + `rlhf_reward.json`) is written. Default:
    /// `RUN_DIR/model`.
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// `regression`, `bradley_terry` or `scaled_bradley_terry`. Required.
    pub objective: RmObjective,
    /// Regression settings. Default: HelpSteer2's five attributes and goodness weights.
    #[serde(default)]
    pub regression: RegressionConfig,
    /// Bradley-Terry settings. Default: no margin, fresh head.
    #[serde(default)]
    pub bradley_terry: BradleyTerryConfig,
    /// Data. Required (`data.train.path` at least).
    pub data: DataConfig,
    /// Loop settings. Defaults: see [`TrainConfig`].
    #[serde(default)]
    pub train: TrainConfig,
    /// AdamW and LR schedule, the run file's `train.actor` keys (`rlhf-settings`'
    /// `OptimizerConfig`); a cosine schedule decays over the whole job. Defaults: see
    /// [`job_optimizer`] (LR 1e-7; reward models usually want ~1e-6..1e-5).
    #[serde(default = "job_optimizer")]
    pub optim: OptimizerConfig,
    /// Checkpointing. Default: only at the end, keep 2.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
}

fn check_format(key: &str, src: &DataSource, allowed: &[DataFormat]) -> Result<()> {
    if let Some(f) = src.format {
        if !allowed.contains(&f) {
            let names: Vec<&str> = allowed.iter().map(|f| f.name()).collect();
            return Err(TrainError::config(
                format!("{key}.format"),
                format!(
                    "`{}` does not fit this objective; expected one of {names:?}",
                    f.name()
                ),
            ));
        }
    }
    if src.split.is_some() && src.format.unwrap_or(allowed[0]) != DataFormat::Helpsteer2Preference {
        return Err(TrainError::config(
            format!("{key}.split"),
            "only helpsteer2_preference rows carry a `split` field",
        ));
    }
    Ok(())
}

impl RmJobConfig {
    /// Cross-field checks; the error names the key.
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.checkpoint.validate()?;
        validate_optim(&self.optim)?;
        check_early_stop(&self.train, &self.data)?;
        let allowed: &[DataFormat] = match self.objective {
            RmObjective::Regression => &[DataFormat::Helpsteer2],
            RmObjective::BradleyTerry => {
                if self.bradley_terry.margin_from_strength {
                    &[DataFormat::Helpsteer2Preference]
                } else {
                    &[DataFormat::Pairwise, DataFormat::Helpsteer2Preference]
                }
            }
            RmObjective::ScaledBradleyTerry => &[DataFormat::Helpsteer2Preference],
        };
        let mut allowed = allowed.to_vec();
        // The objective's default format first, so an unset format resolves to it.
        allowed.sort_by_key(|f| *f != self.objective.default_format());
        check_format("data.train", &self.data.train, &allowed)?;
        if let Some(e) = &self.data.eval {
            check_format("data.eval", e, &allowed)?;
        }
        match self.objective {
            RmObjective::Regression => {
                self.regression.validate()?;
                if self.bradley_terry.init_from_attribute.is_some() {
                    return Err(TrainError::config(
                        "bradley_terry.init_from_attribute",
                        "only for the bradley_terry and scaled_bradley_terry objectives",
                    ));
                }
            }
            _ => {
                let bt = &self.bradley_terry;
                if !bt.margin.is_finite() || bt.margin < 0.0 {
                    return Err(TrainError::config(
                        "bradley_terry.margin",
                        format!("must be finite and >= 0, found {}", bt.margin),
                    ));
                }
                if bt.margin_from_strength && bt.margin != 0.0 {
                    return Err(TrainError::config(
                        "bradley_terry.margin",
                        "give either a constant margin or margin_from_strength, not both",
                    ));
                }
            }
        }
        if self.data.max_length == Some(0) {
            return Err(TrainError::config("data.max_length", "must be >= 1"));
        }
        Ok(())
    }

    /// The format of a source, resolved against the objective's default.
    pub fn format_of(&self, src: &DataSource) -> DataFormat {
        src.format.unwrap_or(self.objective.default_format())
    }

    pub fn output_dir(&self) -> PathBuf {
        self.output
            .clone()
            .unwrap_or_else(|| self.run_dir.join("model"))
    }
}

/// `rlhf-coord sft FILE.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftJobConfig {
    /// Run directory: `checkpoints/`, `metrics.jsonl`, `config.resolved.yaml`. Required.
    pub run_dir: PathBuf,
    /// The starting causal LM, an HF directory with a chat template. Required.
    pub model: PathBuf,
    /// Where the fine-tuned model is written. Default: `RUN_DIR/model`.
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// Data (`chat` rows: `messages`, or `prompt` + `response`). Required.
    pub data: DataConfig,
    /// Loop settings. Defaults: see [`TrainConfig`].
    #[serde(default)]
    pub train: TrainConfig,
    /// AdamW and LR schedule, as for reward models. Defaults: see [`job_optimizer`] (LR 1e-7:
    /// set your own).
    #[serde(default = "job_optimizer")]
    pub optim: OptimizerConfig,
    /// Checkpointing. Default: only at the end, keep 2.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
}

impl SftJobConfig {
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.checkpoint.validate()?;
        validate_optim(&self.optim)?;
        check_early_stop(&self.train, &self.data)?;
        check_format("data.train", &self.data.train, &[DataFormat::Chat])?;
        if let Some(e) = &self.data.eval {
            check_format("data.eval", e, &[DataFormat::Chat])?;
        }
        if self.data.max_length == Some(0) {
            return Err(TrainError::config("data.max_length", "must be >= 1"));
        }
        Ok(())
    }

    pub fn output_dir(&self) -> PathBuf {
        self.output
            .clone()
            .unwrap_or_else(|| self.run_dir.join("model"))
    }
}

/// A job file's `optim:` defaults: the run file's actor optimizer with LR 1e-7 (the HelpSteer2
/// PPO actor's) and PyTorch AdamW's weight decay 0.01, what the jobs have always used.
pub fn job_optimizer() -> OptimizerConfig {
    OptimizerConfig {
        lr: 1e-7,
        weight_decay: 0.01,
        ..OptimizerConfig::actor()
    }
}

/// `train.early_stop` judges held-out evaluations, so it needs eval data and a cadence.
fn check_early_stop(train: &TrainConfig, data: &DataConfig) -> Result<()> {
    if train.early_stop.is_none() {
        return Ok(());
    }
    if data.eval.is_none() {
        return Err(TrainError::config(
            "train.early_stop",
            "needs held-out data to judge: set data.eval.path (or remove train.early_stop)",
        ));
    }
    if train.eval_every.is_none() {
        return Err(TrainError::config(
            "train.early_stop",
            "needs evaluations during training: set train.eval_every (steps between \
             evaluations, e.g. the steps of one epoch)",
        ));
    }
    Ok(())
}

/// Validates the optimizer settings; the cosine horizon (the job's length) is checked when the
/// job starts.
fn validate_optim(o: &OptimizerConfig) -> Result<()> {
    Ok(o.validate()
        .map_err(|e| AlgoError::from(e.under("optim")))?)
}

/// Paths that must exist before a job starts, with the key that names them.
pub(crate) fn check_exists(key: &str, p: &Path) -> Result<()> {
    if p.exists() {
        Ok(())
    } else {
        Err(TrainError::config(
            key,
            format!("{} does not exist", p.display()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rm(extra: serde_json::Value) -> serde_json::Result<RmJobConfig> {
        let mut v = serde_json::json!({
            "run_dir": "r", "model": "m", "objective": "regression",
            "data": {"train": {"path": "t.jsonl"}}
        });
        if let (Some(a), Some(b)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in b {
                a.insert(k.clone(), x.clone());
            }
        }
        serde_json::from_value(v)
    }

    #[test]
    fn defaults_are_documented_ones() {
        let c = rm(serde_json::json!({})).unwrap();
        c.validate().unwrap();
        assert_eq!(c.train.batch_size, 128);
        assert_eq!(c.regression.attributes.len(), 5);
        assert_eq!(c.regression.weights().unwrap(), helpsteer2_goodness());
        assert_eq!(c.data.on_bad_row, OnBadRow::Fail);
        assert_eq!(c.output_dir(), PathBuf::from("r/model"));
        assert_eq!(c.format_of(&c.data.train), DataFormat::Helpsteer2);
    }

    #[test]
    fn bad_settings_name_their_key() {
        assert!(rm(serde_json::json!({"trian": {}})).is_err());
        let c = rm(serde_json::json!({"regression": {"attributes": ["verbosity"]}})).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("regression.goodness_weights"), "{e}");
        let c = rm(serde_json::json!({"objective": "scaled_bradley_terry",
            "data": {"train": {"path": "t", "format": "pairwise"}}}))
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("data.train.format"), "{e}");
        let c = rm(serde_json::json!({"train": {"device": "tpu"}})).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("train.device"));
        let c = rm(serde_json::json!({"objective": "bradley_terry",
            "data": {"train": {"path": "t", "split": "train"}}}))
        .unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("data.train.split"));
    }

    #[test]
    fn early_stop_is_checked() {
        let c = rm(serde_json::json!({})).unwrap();
        assert_eq!(c.train.early_stop, None, "off by default");
        assert_eq!(c.checkpoint.export, ExportChoice::Best);
        let eval = serde_json::json!({"train": {"path": "t.jsonl"}, "eval": {"path": "e.jsonl"}});
        let err = |extra: serde_json::Value| c_err(rm(extra).unwrap());
        fn c_err(c: RmJobConfig) -> String {
            c.validate().unwrap_err().to_string()
        }
        let e = err(serde_json::json!({"train": {"early_stop": {"patience": 2}}}));
        assert!(
            e.contains("train.early_stop") && e.contains("data.eval"),
            "{e}"
        );
        let e = err(serde_json::json!({"data": eval, "train": {"early_stop": {"patience": 2}}}));
        assert!(
            e.contains("train.early_stop") && e.contains("eval_every"),
            "{e}"
        );
        let e = err(serde_json::json!({"data": eval,
            "train": {"eval_every": 5, "early_stop": {"patience": 0}}}));
        assert!(e.contains("train.early_stop.patience"), "{e}");
        let e = err(serde_json::json!({"data": eval,
            "train": {"eval_every": 5, "early_stop": {"patience": 1, "min_delta": -0.1}}}));
        assert!(e.contains("train.early_stop.min_delta"), "{e}");
        assert!(
            rm(serde_json::json!({"train": {"early_stop": {"patience": 1, "delta": 0}}}))
                .unwrap_err()
                .to_string()
                .contains("delta")
        );
        let ok = rm(serde_json::json!({"data": eval,
            "train": {"eval_every": 5, "early_stop": {"patience": 3}}}))
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.train.early_stop.unwrap().min_delta, 0.0);
    }
}
