//! Per-step metrics: one JSON object per line in `RUN_DIR/metrics.jsonl`, its keys those of
//! [`StepMetrics`], defined and documented here and only here (written and flushed each step,
//! so a crash loses at most the step in progress); the lines of `samples.jsonl`
//! ([`SampleLine`]); and the progress bar on stderr
//! (steps, reward, KL, tokens/s) with a plain log line per step when stderr is not a terminal.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// A map whose keys are written with a prefix (`attribute/helpfulness`), flattened into
/// [`StepMetrics`].
#[derive(Debug, Default, Clone)]
pub struct Prefixed<V> {
    pub prefix: &'static str,
    pub values: BTreeMap<String, V>,
}

impl<V: Serialize> Serialize for Prefixed<V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.values.len()))?;
        for (k, v) in &self.values {
            m.serialize_entry(&format!("{}{k}", self.prefix), v)?;
        }
        m.end()
    }
}

/// One line of `metrics.jsonl`: every key a step writes, documented here and nowhere else.
/// Non-finite numbers are written as `null`. Optional keys appear only when they apply.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// Mean shaped reward (after clipping and the truncation penalty, before KL).
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Mean raw score from the reward role.
    pub score_mean: f64,
    /// Mean KL to the reference per sequence (sum over tokens); 0 without a reference.
    pub kl_mean: f64,
    /// The KL coefficient used this step.
    pub kl_coef: f64,
    pub response_len_mean: f64,
    /// Share of responses cut by `rollout.max_new_tokens`.
    pub truncated_frac: f64,
    pub advantage_mean: f64,
    /// `attribute/NAME`: mean of each reward-model attribute (multi-attribute heads) or named
    /// component of an `http` / `command` reward; with several reward sources
    /// (`models.rewards`) each source's unweighted reward as `attribute/<source>` and its
    /// attributes as `attribute/<source>/<attribute>`.
    #[serde(flatten)]
    pub attributes: Prefixed<f64>,
    /// `actor/...`, `critic/...`: the TrainStep metrics (losses, `grad_norm`, `lr`, clip
    /// fractions), averaged over the step's minibatches.
    #[serde(flatten)]
    pub train: BTreeMap<String, f64>,
    /// Generated response tokens per second of the rollout phase.
    pub tokens_per_s: f64,
    #[serde(rename = "time/step_s")]
    pub step_s: f64,
    #[serde(rename = "time/generate_s")]
    pub generate_s: f64,
    #[serde(rename = "time/score_s")]
    pub score_s: f64,
    #[serde(rename = "time/train_s")]
    pub train_s: f64,
    #[serde(rename = "time/sync_s")]
    pub sync_s: f64,
    /// With `rollout.async_generation`: 1 when the batch was sampled during the previous step.
    #[serde(rename = "rollout/off_policy", skip_serializing_if = "Option::is_none")]
    pub off_policy: Option<f64>,
    /// With `rollout.async_generation`: waiting for the next batch before the weight sync.
    #[serde(
        rename = "time/wait_prefetch_s",
        skip_serializing_if = "Option::is_none"
    )]
    pub wait_prefetch_s: Option<f64>,
    /// With generators: bytes each received in the weight sync.
    #[serde(rename = "sync/bytes", skip_serializing_if = "Option::is_none")]
    pub sync_bytes: Option<f64>,
    /// 1 when the replicas' weight digests were compared (and agreed) after this step.
    #[serde(rename = "replicas/checked", skip_serializing_if = "Option::is_none")]
    pub replicas_checked: Option<f64>,
    /// The step's time outside the phases above (waiting included).
    #[serde(rename = "time/controller_s")]
    pub controller_s: f64,
    /// The controller's own computation: decoding, shaping, building requests.
    #[serde(rename = "time/controller_compute_s")]
    pub controller_compute_s: f64,
    /// Present at validation steps.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationMetrics>,
}

/// Step 0 of `metrics.jsonl`: the initial policy's validation (`validation.at_start`).
#[derive(Debug, Serialize)]
pub struct InitialValidation {
    pub step: u64,
    #[serde(flatten)]
    pub validation: ValidationMetrics,
}

/// The MT-Bench keys of a validation step.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ValidationMetrics {
    /// The overall score (1-10); null when the judge failed or rated nothing.
    #[serde(rename = "validation/mt_bench")]
    pub mt_bench: f64,
    /// `validation/CATEGORY`: the per-category scores.
    #[serde(flatten)]
    pub per_category: Prefixed<f64>,
    /// Answers without a rating.
    #[serde(rename = "validation/missing", skip_serializing_if = "Option::is_none")]
    pub missing: Option<f64>,
    /// Prompts cut from the left to fit the context.
    #[serde(
        rename = "validation/truncated_prompts",
        skip_serializing_if = "Option::is_none"
    )]
    pub truncated_prompts: Option<f64>,
    #[serde(rename = "time/validation_s")]
    pub secs: f64,
}

/// One line of `samples.jsonl`: a prompt of step `step` and its completions.
#[derive(Debug, Serialize)]
pub struct SampleLine {
    pub step: u64,
    pub prompt: Vec<SampleMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    pub completions: Vec<Completion>,
}

#[derive(Debug, Serialize)]
pub struct SampleMessage {
    pub role: String,
    pub content: String,
}

/// One completion with what the reward role said of it.
#[derive(Debug, Serialize)]
pub struct Completion {
    pub text: String,
    /// The reward role's score (before KL and shaping).
    pub score: f64,
    /// Per-attribute scores of a multi-attribute reward model.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, f64>,
    /// False when `rollout.max_new_tokens` cut it.
    pub finished: bool,
}

/// An append-only JSONL file: `metrics.jsonl`, `samples.jsonl`.
pub struct JsonlWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl JsonlWriter {
    /// Opens `path` for appending (a resumed run continues the same file).
    pub fn create(path: &Path) -> Result<JsonlWriter> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(JsonlWriter {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
        })
    }

    /// Appends one line (non-finite numbers as `null`, so the line stays JSON) and flushes it.
    pub fn write(&mut self, m: &impl serde::Serialize) -> Result<()> {
        let line = serde_json::to_string(m)?;
        writeln!(self.file, "{line}")
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.flush()
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(steps: u64, enabled: bool) -> Progress {
        let bar = (enabled && console_is_tty()).then(|| {
            let b = ProgressBar::new(steps);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        });
        Progress { bar }
    }

    pub fn step(&self, m: &StepMetrics) {
        let step = m.step;
        let msg = format!(
            "reward {:.3} kl {:.4} tok/s {:.0} step {:.2}s",
            m.reward_mean, m.kl_mean, m.tokens_per_s, m.step_s
        );
        match &self.bar {
            Some(b) => {
                b.set_position(step);
                b.set_message(msg);
            }
            None => tracing::info!("step {step}: {msg}"),
        }
    }

    /// A resumed run starts the bar at the checkpoint's step.
    pub fn resume_at(&self, step: u64) {
        if let Some(b) = &self.bar {
            b.set_position(step);
            b.reset_eta();
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
