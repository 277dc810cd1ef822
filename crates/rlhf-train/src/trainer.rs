//! The optimisation loop the jobs share: seeded, resumable data order; micro-batched gradient
//! accumulation; AdamW with clipping and the LR schedule; logging to `metrics.jsonl`; full
//! checkpoints in the `rlhf-ckpt` format and resume from the newest valid one.
//!
//! A checkpoint holds everything the next step depends on, so a resumed job continues exactly
//! where the stopped one was (bit for bit on CPU):
//!
//! ```text
//! step-NNNNNN/model/               HF files of the model being trained (+ tokenizer files)
//! step-NNNNNN/optimizer.safetensors  AdamW moments and per-parameter step counts
//! step-NNNNNN/trainer_state.json   step, epoch, cursor in the epoch's permutation, data seed,
//!                                  data fingerprint, counters, the job config as run
//! ```
//!
//! The data order is a function of `(seed, epoch)` alone (a ChaCha permutation per epoch), so
//! `(seed, epoch, cursor)` is the complete state of the data stream. Training draws no other
//! random numbers (these models have no dropout), so there is no further RNG state to store.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rlhf_algo::{shuffled_indices, AdamW, LrScheduler, OptimizerConfig};
use rlhf_ckpt::CheckpointWriter;
use rlhf_model::{Model, SaveOptions};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::best::{Ranking, Selection, Tracker};
use crate::config::{CheckpointConfig, ExportChoice, TrainConfig};
use crate::error::{Result, TrainError};

/// Files of the `checkpoints/step-N` directories written by these jobs.
pub const CKPT_MODEL_DIR: &str = "model";
pub const CKPT_OPTIMIZER: &str = "optimizer.safetensors";
pub const CKPT_STATE: &str = "trainer_state.json";
/// One JSON object per logged step or evaluation, in the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// How a job treats the run directory and when it stops.
#[derive(Debug, Clone, Default)]
pub struct JobControl {
    /// Stop with a checkpoint once this many optimizer steps are done in all, as a preempted job
    /// would; rerunning the job resumes from there.
    pub stop_after: Option<u64>,
    /// Fail when the run directory has no valid checkpoint (`--resume`). Otherwise a job
    /// resumes when there is one and starts fresh when there is none.
    pub require_resume: bool,
    /// Checked after every optimizer step: once set (by a SIGTERM / SIGUSR1 handler, e.g.
    /// Slurm's `--signal=B:USR1@grace` before preemption), the job checkpoints and stops.
    pub stop_flag: Option<Arc<AtomicBool>>,
}

impl JobControl {
    fn signalled(&self) -> bool {
        self.stop_flag
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
    }
}

/// What a finished (or stopped) job reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobReport {
    /// Optimizer steps done in all.
    pub steps: u64,
    /// Whether training ran to its last step (false: stopped by `stop_after`).
    pub finished: bool,
    pub resumed_from: Option<u64>,
    /// The exported model (finished jobs).
    pub output: Option<PathBuf>,
    /// Held-out metrics of the exported model, when there is eval data.
    pub eval: Option<Value>,
    /// The best evaluated checkpoint (`checkpoints/ranking.json`'s `best`), when there is eval
    /// data.
    pub best: Option<BestReport>,
    /// The step whose weights are in `output` (`checkpoint.export`).
    pub output_step: Option<u64>,
    /// Why the job stopped before its last step under `train.early_stop`.
    pub early_stop: Option<String>,
    /// The reward spec written next to the model (reward-model jobs).
    pub reward_spec: Option<rlhf_model::RewardSpec>,
    /// What happened to the rows of each data file.
    pub data: Vec<crate::data::RowStats>,
}

/// Where the best evaluated checkpoint is and what it scored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BestReport {
    pub step: u64,
    /// `RUN/checkpoints/step-NNNNNN`; its `model/` is an HF directory of those weights.
    pub checkpoint: PathBuf,
    pub metric: String,
    pub value: f64,
}

/// Everything about the data stream and progress a resumed job needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// Job kind, e.g. `train-rm/regression` or `sft`.
    pub job: String,
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    /// Epoch of the next batch (0-based) and examples of its permutation already consumed.
    pub epoch: u64,
    pub cursor: u64,
    /// Seed of the per-epoch permutations.
    pub seed: u64,
    /// Training examples, and a hash of their tokens: a resumed job must see the same data.
    pub examples: u64,
    pub data_fingerprint: String,
    pub samples_seen: u64,
    pub tokens_seen: u64,
    /// The job config as run (for the record; a changed config is reported on resume).
    pub config: Value,
    /// The best held-out evaluation so far and the evaluations since (early stop resumes
    /// counting from here). Default: none (checkpoints from before it existed).
    #[serde(default)]
    pub held_out: Tracker,
}

/// Shuffled batches over `n` examples, epoch after epoch; a batch never spans two epochs (the
/// last one of an epoch may be smaller).
#[derive(Debug, Clone)]
pub struct Sampler {
    n: usize,
    batch: usize,
    seed: u64,
    pub epoch: u64,
    pub cursor: usize,
    perm: Vec<i64>,
}

impl Sampler {
    pub fn new(n: usize, batch: usize, seed: u64, epoch: u64, cursor: usize) -> Sampler {
        Sampler {
            n,
            batch,
            seed,
            epoch,
            cursor,
            perm: shuffled_indices(n, seed, epoch),
        }
    }

    /// Optimizer steps per epoch: `ceil(n / batch)`.
    pub fn steps_per_epoch(n: usize, batch: usize) -> u64 {
        n.div_ceil(batch) as u64
    }

    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.cursor >= self.n {
            self.epoch += 1;
            self.cursor = 0;
            self.perm = shuffled_indices(self.n, self.seed, self.epoch);
        }
        let end = (self.cursor + self.batch).min(self.n);
        let out = self.perm[self.cursor..end]
            .iter()
            .map(|&i| i as usize)
            .collect();
        self.cursor = end;
        out
    }
}

/// Sums over one optimizer step's micro-batches.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchStats {
    /// Sum of per-example (or per-token) losses, unscaled.
    pub loss_sum: f64,
    /// What `loss_sum` is a sum over (examples or target tokens).
    pub count: f64,
    /// Pairwise tasks: pairs ranked correctly, and pairs.
    pub correct: f64,
    pub pairs: f64,
    /// Tokens forwarded (real, not padding).
    pub tokens: u64,
}

impl BatchStats {
    pub fn add(&mut self, o: &BatchStats) {
        self.loss_sum += o.loss_sum;
        self.count += o.count;
        self.correct += o.correct;
        self.pairs += o.pairs;
        self.tokens += o.tokens;
    }
}

/// What a job trains: the examples, one micro-batch's forward + backward, and its evaluation.
pub trait Task {
    /// Number of training examples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Hash of the training tokens (see [`fingerprint`]).
    fn fingerprint(&self) -> String;
    /// What the loss of the global batch `idx` is averaged over (examples, or target tokens).
    fn denominator(&self, idx: &[usize]) -> f64;
    /// Forward and backward of the micro-batch `idx`, the loss divided by `denom` so gradients
    /// of all micro-batches add up to the gradient of the global batch's mean.
    fn backward(&self, model: &Model, idx: &[usize], denom: f64) -> Result<BatchStats>;
    /// Metrics on the held-out data, if there is any.
    fn evaluate(&self, model: &Model) -> Result<Option<Value>>;
    /// The held-out metric checkpoints are ranked and early stop judged by (`None` without
    /// held-out data).
    fn selection(&self) -> Option<Selection>;
}

/// SHA-256 over the token sequences, in order, with their lengths.
pub fn fingerprint<'a>(seqs: impl Iterator<Item = &'a [u32]>) -> String {
    let mut h = Sha256::new();
    for s in seqs {
        h.update((s.len() as u64).to_le_bytes());
        for t in s {
            h.update(t.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Model files that travel with the weights (tokenizer, templates, generation config), read
/// once so checkpoints and exports do not depend on the source directory staying around.
fn read_side_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for f in rlhf_model::SIDE_FILES {
        let p = dir.join(f);
        if p.exists() {
            out.push((
                f.to_string(),
                std::fs::read(&p).map_err(|e| TrainError::io(&p, e))?,
            ));
        }
    }
    Ok(out)
}

/// A model being trained with its optimizer, schedule and progress.
pub struct Session {
    pub run_dir: PathBuf,
    pub model: Model,
    pub opt: AdamW,
    pub schedule: LrScheduler,
    pub max_grad_norm: Option<f64>,
    pub state: TrainerState,
    /// The checkpoint step this session resumed from.
    pub resumed_from: Option<u64>,
    side_files: Vec<(String, Vec<u8>)>,
    last_loss: Option<f64>,
    /// The last evaluation of this process (step, metrics), so the end need not repeat it.
    last_eval: Option<(u64, Value)>,
    /// Set when `train.early_stop` ended training: why.
    pub early_stopped: Option<String>,
}

/// What a session needs to know to start or resume.
pub struct SessionSpec<'a> {
    pub run_dir: &'a Path,
    pub job: String,
    pub config: Value,
    pub optim: &'a OptimizerConfig,
    pub train: &'a TrainConfig,
    pub examples: usize,
    pub fingerprint: String,
    /// Directory of the starting model (its tokenizer files are carried along).
    pub model_dir: &'a Path,
}

impl Session {
    /// Resumes from the newest valid checkpoint of `spec.run_dir` (loading the model with
    /// `load(dir)`), or starts from `fresh()` when there is none.
    pub fn open(
        spec: SessionSpec<'_>,
        control: &JobControl,
        fresh: impl FnOnce() -> Result<Model>,
        load: impl FnOnce(&Path) -> Result<Model>,
    ) -> Result<Session> {
        let t = spec.train;
        let total_steps = t
            .max_steps
            .unwrap_or_else(|| t.epochs * Sampler::steps_per_epoch(spec.examples, t.batch_size));
        let optim = spec.optim;
        // A cosine schedule decays over the whole job.
        let schedule = LrScheduler::new(optim, total_steps)?;
        let resume = rlhf_ckpt::latest_valid(spec.run_dir)?;
        let (model, state, resumed_from, side_dir) = match resume {
            None => {
                if control.require_resume {
                    return Err(TrainError::Resume {
                        dir: rlhf_ckpt::checkpoints_dir(spec.run_dir),
                        msg: "no valid checkpoint to resume from (--resume was given)".into(),
                    });
                }
                let state = TrainerState {
                    job: spec.job.clone(),
                    step: 0,
                    total_steps,
                    epoch: 0,
                    cursor: 0,
                    seed: t.seed,
                    examples: spec.examples as u64,
                    data_fingerprint: spec.fingerprint.clone(),
                    samples_seen: 0,
                    tokens_seen: 0,
                    config: spec.config.clone(),
                    held_out: Tracker::default(),
                };
                (fresh()?, state, None, spec.model_dir.to_path_buf())
            }
            Some(r) => {
                tracing::info!("resuming from {r}");
                let dir = r.checkpoint.dir.clone();
                let state_path = dir.join(CKPT_STATE);
                let bytes =
                    std::fs::read(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
                let mut state: TrainerState =
                    serde_json::from_slice(&bytes).map_err(|e| TrainError::Resume {
                        dir: dir.clone(),
                        msg: format!("{CKPT_STATE} does not parse: {e}"),
                    })?;
                check_resumable(&dir, &state, &spec)?;
                if state.config != spec.config {
                    tracing::warn!(
                        checkpoint = %dir.display(),
                        "the job config differs from the one the checkpoint was written with; \
                         continuing with the new one (data order keeps the checkpoint's seed {})",
                        state.seed
                    );
                }
                state.total_steps = total_steps;
                state.config = spec.config.clone();
                let model = load(&dir.join(CKPT_MODEL_DIR))?;
                (
                    model,
                    state,
                    Some(r.checkpoint.step),
                    dir.join(CKPT_MODEL_DIR),
                )
            }
        };
        let side_files = read_side_files(&side_dir)?;
        let mut opt = AdamW::new(model.named_tensors(), optim)?;
        if let Some(step) = resumed_from {
            let dir = rlhf_ckpt::checkpoints_dir(spec.run_dir).join(rlhf_ckpt::dir_name(step));
            opt.load(&dir.join(CKPT_OPTIMIZER))?;
        }
        truncate_metrics(spec.run_dir, state.step)?;
        Ok(Session {
            run_dir: spec.run_dir.to_path_buf(),
            model,
            opt,
            schedule,
            max_grad_norm: optim.max_grad_norm,
            state,
            resumed_from,
            side_files,
            last_loss: None,
            last_eval: None,
            early_stopped: None,
        })
    }

    /// Runs optimizer steps until the job's last step, `control.stop_after`, or an early stop
    /// (`train.early_stop`, reason in [`Session::early_stopped`]). Returns whether training is
    /// complete (an early stop is). Every evaluation is checkpointed and ranked.
    pub fn train(
        &mut self,
        task: &dyn Task,
        train: &TrainConfig,
        ckpt: &CheckpointConfig,
        control: &JobControl,
    ) -> Result<bool> {
        let mut sampler = Sampler::new(
            task.len(),
            train.batch_size,
            self.state.seed,
            self.state.epoch,
            self.state.cursor as usize,
        );
        let mut metrics = MetricsLog::open(&self.run_dir)?;
        let mut window = BatchStats::default();
        let mut window_start = Instant::now();
        let mut window_steps = 0u64;
        let mut window_samples = 0usize;
        let mut grad_norm_sum = 0.0;
        let selection = task.selection();
        let early = selection.zip(train.early_stop);
        // A job that stopped early and is run again is done (unless its patience was raised).
        if let Some((sel, es)) = early {
            if self.state.step < self.state.total_steps {
                if let Some(why) = self.state.held_out.early_stop_reason(sel, &es) {
                    tracing::info!("{why}; nothing left to train");
                    self.early_stopped = Some(why);
                    return Ok(true);
                }
            }
        }
        while self.state.step < self.state.total_steps {
            if control.stop_after.is_some_and(|k| self.state.step >= k) {
                return Ok(false);
            }
            let idx = sampler.next_batch();
            self.opt.zero_grad()?;
            let denom = task.denominator(&idx);
            let mut stats = BatchStats::default();
            for mb in idx.chunks(train.micro_batch_size) {
                stats.add(&task.backward(&self.model, mb, denom)?);
            }
            let grad_norm = self.opt.clip_grad_norm(self.max_grad_norm)?;
            let lr = self.schedule.lr_at(self.state.step);
            self.opt.step(lr)?;
            self.state.step += 1;
            self.state.epoch = sampler.epoch;
            self.state.cursor = sampler.cursor as u64;
            self.state.samples_seen += idx.len() as u64;
            self.state.tokens_seen += stats.tokens;
            window.add(&stats);
            window_steps += 1;
            window_samples += idx.len();
            grad_norm_sum += grad_norm;
            let step = self.state.step;
            let at_end = step == self.state.total_steps;
            if step % train.log_every == 0 || at_end {
                let secs = window_start.elapsed().as_secs_f64().max(1e-9);
                let loss = window.loss_sum / window.count.max(1e-12);
                self.last_loss = Some(loss);
                let mut rec = json!({
                    "step": step,
                    "epoch": self.state.epoch,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm_sum / window_steps as f64,
                    "samples_per_s": window_samples as f64 / secs,
                    "tokens_per_s": window.tokens as f64 / secs,
                });
                if window.pairs > 0.0 {
                    rec["accuracy"] = json!(window.correct / window.pairs);
                }
                tracing::info!("step {step}/{}: {rec}", self.state.total_steps);
                metrics.write(&rec)?;
                window = BatchStats::default();
                window_steps = 0;
                window_samples = 0;
                grad_norm_sum = 0.0;
                window_start = Instant::now();
            }
            let mut ranked = None;
            if train.eval_every.is_some_and(|e| step % e == 0) || at_end {
                if let Some(ev) = task.evaluate(&self.model)? {
                    tracing::info!("step {step} eval: {ev}");
                    metrics.write(&json!({"step": step, "eval": ev}))?;
                    if let Some(sel) = selection {
                        let min_delta = train.early_stop.map_or(0.0, |es| es.min_delta);
                        let score = self.state.held_out.observe(step, &ev, sel, min_delta);
                        ranked = Some((sel, score));
                    }
                    self.last_eval = Some((step, ev));
                }
            }
            let early_stop = early
                .and_then(|(sel, es)| ranked.and(self.state.held_out.early_stop_reason(sel, &es)))
                .filter(|_| !at_end);
            let stop =
                (control.stop_after.is_some_and(|k| step >= k) || control.signalled()) && !at_end;
            if at_end
                || stop
                || early_stop.is_some()
                || ranked.is_some()
                || ckpt.every.is_some_and(|e| step % e == 0)
            {
                self.checkpoint(ckpt.keep_last, ranked)?;
                window_start = Instant::now();
            }
            if let Some(why) = early_stop {
                tracing::warn!(
                    "stopping after step {step} of {}: {why}",
                    self.state.total_steps
                );
                self.early_stopped = Some(why);
                return Ok(true);
            }
            if stop {
                tracing::warn!("stopping after step {step} as asked; rerun the job to resume");
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes a full checkpoint of the current step, ranks it when it was evaluated (`ranked`:
    /// the metric and its value), and applies retention.
    pub fn checkpoint(
        &mut self,
        keep_last: usize,
        ranked: Option<(Selection, Option<f64>)>,
    ) -> Result<rlhf_ckpt::CheckpointInfo> {
        let w = CheckpointWriter::begin(&self.run_dir, self.state.step)?;
        self.write_model(&w.dir().join(CKPT_MODEL_DIR))?;
        self.opt.save(&w.dir().join(CKPT_OPTIMIZER))?;
        w.write_json(CKPT_STATE, &self.state)?;
        let info = w.commit(json!({
            "job": self.state.job,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": self.last_loss,
        }))?;
        if let Some((sel, score)) = ranked {
            let r = Ranking::record(&self.run_dir, sel, self.state.step, score)?;
            if let Some(best) = &r.best {
                tracing::info!(
                    "best checkpoint by held-out {}: {best} ({})",
                    sel.metric,
                    Ranking::path(&self.run_dir).display()
                );
            }
        }
        rlhf_ckpt::prune(&self.run_dir, keep_last)?;
        Ok(info)
    }

    /// The best evaluated checkpoint, if any.
    pub fn best(&self) -> Option<BestReport> {
        self.state.held_out.best.as_ref().map(|b| BestReport {
            step: b.step,
            checkpoint: rlhf_ckpt::checkpoints_dir(&self.run_dir).join(rlhf_ckpt::dir_name(b.step)),
            metric: b.metric.clone(),
            value: b.value,
        })
    }

    /// After training: puts the weights `checkpoint.export` asks for into `self.model` (the best
    /// evaluated checkpoint's, read back with `load`, or the last step's) and returns their
    /// step and their held-out metrics (evaluated again only when this process has not).
    pub fn select_export(
        &mut self,
        task: &dyn Task,
        choice: ExportChoice,
        load: impl FnOnce(&Path) -> Result<Model>,
    ) -> Result<(u64, Option<Value>)> {
        if let (ExportChoice::Best, Some(best)) = (choice, self.state.held_out.best.clone()) {
            if best.step != self.state.step {
                let dir =
                    rlhf_ckpt::checkpoints_dir(&self.run_dir).join(rlhf_ckpt::dir_name(best.step));
                if !dir.join(CKPT_MODEL_DIR).is_dir() {
                    return Err(TrainError::Resume {
                        dir,
                        msg: format!(
                            "the best checkpoint (held-out {} {:.6}) is gone; restore it, or set \
                             checkpoint.export: last",
                            best.metric, best.value
                        ),
                    });
                }
                tracing::info!(
                    "exporting the best checkpoint, step {} (held-out {} {:.6}), not the last \
                     step {} (checkpoint.export: last would)",
                    best.step,
                    best.metric,
                    best.value,
                    self.state.step
                );
                self.model = load(&dir.join(CKPT_MODEL_DIR))?;
                return Ok((best.step, Some(best.eval)));
            }
            return Ok((best.step, Some(best.eval)));
        }
        let eval = match self.last_eval.take() {
            Some((step, ev)) if step == self.state.step => Some(ev),
            _ => task.evaluate(&self.model)?,
        };
        Ok((self.state.step, eval))
    }

    /// HF files of the current weights plus the tokenizer files, into `dir`.
    pub fn write_model(&self, dir: &Path) -> Result<()> {
        self.model.save(dir, &SaveOptions::default())?;
        for (name, bytes) in &self.side_files {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| TrainError::io(&p, e))?;
        }
        Ok(())
    }

    /// Writes the final model to `out` (replacing what is there): the HF files, then `extra`
    /// (e.g. `rlhf_reward.json`), into a sibling directory renamed into place at the end.
    pub fn export(&self, out: &Path, extra: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let name = out.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            TrainError::config("output", format!("{}: not a directory name", out.display()))
        })?;
        let parent = out.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
        let tmp = parent.join(format!(".{name}.export-tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        self.write_model(&tmp)?;
        extra(&tmp)?;
        if out.exists() {
            let old = parent.join(format!(".{name}.export-old"));
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
            }
            std::fs::rename(out, &old).map_err(|e| TrainError::io(out, e))?;
            std::fs::rename(&tmp, out).map_err(|e| TrainError::io(out, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        } else {
            std::fs::rename(&tmp, out).map_err(|e| TrainError::io(out, e))?;
        }
        tracing::info!(dir = %out.display(), "model written");
        Ok(())
    }
}

fn check_resumable(dir: &Path, s: &TrainerState, spec: &SessionSpec<'_>) -> Result<()> {
    let bad = |msg: String| TrainError::Resume {
        dir: dir.to_path_buf(),
        msg,
    };
    if s.job != spec.job {
        return Err(bad(format!(
            "it was written by job `{}`, this is `{}`; use another run_dir",
            s.job, spec.job
        )));
    }
    if s.examples != spec.examples as u64 || s.data_fingerprint != spec.fingerprint {
        return Err(bad(format!(
            "the training data differs from the checkpoint's ({} examples, fingerprint {}…, now \
             {} examples, {}…); restore the data, or start a new run_dir",
            s.examples,
            &s.data_fingerprint[..s.data_fingerprint.len().min(12)],
            spec.examples,
            &spec.fingerprint[..spec.fingerprint.len().min(12)],
        )));
    }
    Ok(())
}

/// Appends JSON lines to `RUN/metrics.jsonl`.
struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    fn open(run_dir: &Path) -> Result<MetricsLog> {
        std::fs::create_dir_all(run_dir).map_err(|e| TrainError::io(run_dir, e))?;
        let path = run_dir.join(METRICS_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(MetricsLog { path, file })
    }

    fn write(&mut self, v: &Value) -> Result<()> {
        let mut line = v.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Drops records of steps after `step` (written by a run that crashed after its last
/// checkpoint), so a resumed run's log has each step once.
fn truncate_metrics(run_dir: &Path, step: u64) -> Result<()> {
    let path = run_dir.join(METRICS_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_none_or(|s| s <= step)
        })
        .collect();
    if kept.len() == text.lines().count() {
        return Ok(());
    }
    let mut out = kept.join("\n");
    out.push('\n');
    if kept.is_empty() {
        out.clear();
    }
    rlhf_ckpt::write_atomic(&path, out.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_covers_each_epoch_and_resumes_exactly() {
        let mut s = Sampler::new(10, 4, 7, 0, 0);
        let e0: Vec<Vec<usize>> = (0..3).map(|_| s.next_batch()).collect();
        assert_eq!(e0.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        let mut all: Vec<usize> = e0.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        let b = s.next_batch();
        assert_eq!(s.epoch, 1);
        // A sampler rebuilt from (seed, epoch, cursor) continues identically.
        let mut a = s.clone();
        let mut r = Sampler::new(10, 4, 7, s.epoch, s.cursor);
        for _ in 0..5 {
            assert_eq!(a.next_batch(), r.next_batch());
        }
        assert_ne!(b, e0[0], "epochs are shuffled differently");
        assert_eq!(Sampler::steps_per_epoch(10, 4), 3);
    }

    #[test]
    fn metrics_truncate_to_the_resumed_step() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(METRICS_FILE);
        std::fs::write(&p, "{\"step\":1}\n{\"step\":2}\n{\"step\":3,\"eval\":{}}\n").unwrap();
        truncate_metrics(d.path(), 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"step\":1}\n{\"step\":2}\n"
        );
    }
}
