//! The step loop of `rlhf-coord launch`: one [`StepLoop`] owns the run's state between steps
//! (step, prompt cursor, KL controller, baselines), the batch sampled ahead, the metrics file and
//! the progress bar, and runs each step as a sequence of phases, each a method returning a typed
//! value:
//!
//! ```text
//! rollout ─► score ─► shape ─► train ─► sync ─► validate ─► record ─► checkpoint
//! Generate   Score,    rewards, TrainStep SyncWeights MT-Bench metrics.jsonl  SaveState,
//!            LogProbs, KL, adv. per mini- digests              + progress    manifest, ranking
//!            Values    (rl.rs)  batch
//! ```
//!
//! The loop reaches workers only through [`RoleHandle`], so the tests at the bottom run it
//! against in-process fakes: a checkpoint while a batch is prefetched, a stop request mid-step,
//! a worker failing in each phase, replicas whose digests differ. Start-up (roles, groups) is
//! `launch.rs`'s; what the loop computes on the controller is `rl.rs`'s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rlhf_algo::shuffled_indices;
use rlhf_config::{LoadedConfig, RunConfig};
use rlhf_model::Tokenizer;
use rlhf_proto::pb;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::checkpoint::{self, ControllerState};
use crate::metrics::{
    Completion, InitialValidation, JsonlWriter, Prefixed, Progress, SampleLine, SampleMessage,
    StepMetrics, ValidationMetrics,
};
use crate::prompts::{PromptCursor, PromptSet};
use crate::replicas;
use crate::rewards::{self, RewardRole};
use crate::rl::{self, AlgoSettings, RolloutStats, Shaper};
use crate::tensorboard::{samples_markdown, EventWriter, SAMPLES_TAG, TENSORBOARD_DIR};
use crate::validation::Validator;
use crate::workers::RoleHandle;

/// Everything the loop reads that was prepared before any worker started.
pub struct RunContext {
    pub loaded: LoadedConfig,
    pub run_dir: PathBuf,
    pub settings: AlgoSettings,
    pub prompts: PromptSet,
    pub tokenizer: Tokenizer,
    /// The checkpoint this launch continues from, if the run directory has a valid one.
    pub resume: Option<ResumePoint>,
    /// When the process started (for `checkpoint.must_save_by`).
    pub started: Instant,
    /// MT-Bench validation, when `validation.every` > 0.
    pub validator: Option<Validator>,
}

impl RunContext {
    pub fn config(&self) -> &RunConfig {
        &self.loaded.config
    }
}

/// A verified checkpoint and the controller state in it.
pub struct ResumePoint {
    pub dir: PathBuf,
    pub state: ControllerState,
}

/// The run stopped early on purpose, with its state saved at `step`.
#[derive(Debug)]
pub struct Preempted {
    pub step: u64,
    pub reason: String,
}

impl std::fmt::Display for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.step == 0 {
            write!(f, "stopped before the first step ({})", self.reason)
        } else {
            write!(
                f,
                "stopped after step {} ({}); its checkpoint is written, launch again to continue",
                self.step, self.reason
            )
        }
    }
}

impl std::error::Error for Preempted {}

/// The roles of a run, as the loop sees them.
pub struct Roles<R> {
    /// Data-parallel replicas of the actor (at least one); replica 0 saves checkpoints, answers
    /// MT-Bench and is the root of the weight sync.
    pub actors: Vec<R>,
    /// Replicas of the critic; empty when the algorithm uses none.
    pub critics: Vec<R>,
    /// Generation-only copies of the policy; empty = the actors generate.
    pub generators: Vec<R>,
    /// One role per reward source (`models.reward`, or each of `models.rewards`).
    pub rewards: Vec<RewardRole<R>>,
    pub reference: Reference<R>,
}

/// Where the reference log-probs come from.
pub enum Reference<R> {
    /// The algorithm needs none (no KL against a reference).
    None,
    /// A reference role of its own (another model directory, or full fine-tuning). Boxed: a
    /// client is large next to the other variants (clippy::large_enum_variant).
    Role(Box<R>),
    /// The actor replicas with their LoRA adapters off: the reference is the policy's frozen
    /// base, which the actor already holds (`ModelsConfig::reference_is_actor_base`).
    ActorBase,
}

impl<R> Reference<R> {
    pub fn describe(&self) -> &'static str {
        match self {
            Reference::None => "none",
            Reference::Role(_) => "own role",
            Reference::ActorBase => "actor with adapters off",
        }
    }
}

impl<R: RoleHandle> Roles<R> {
    pub fn actor(&self) -> &R {
        &self.actors[0]
    }

    /// Who samples rollouts: the generators, or the actor replicas when there are none.
    pub fn generation(&self) -> &[R] {
        if self.generators.is_empty() {
            &self.actors
        } else {
            &self.generators
        }
    }

    /// Compares the weight digests of the policy's copies (actor replicas and generators) and
    /// of the critic replicas; an error names the worker that differs. `false` when there is
    /// nothing to compare.
    pub async fn check_replicas(&self, step: u64) -> Result<bool> {
        if self.actors.len() < 2 && self.critics.len() < 2 && self.generators.is_empty() {
            return Ok(false);
        }
        let mut policy = self.actors.clone();
        policy.extend(self.generators.iter().cloned());
        let (a, c) = tokio::join!(
            replicas::check_digests(
                &policy,
                "the policy's copies (actor replicas and generators)",
                step
            ),
            replicas::check_digests(&self.critics, "the critic replicas", step),
        );
        a?;
        c?;
        Ok(true)
    }
}

/// The run's state between steps: what a checkpoint holds besides the workers' role state.
struct LoopState {
    step: u64,
    samples: u64,
    cursor: PromptCursor,
    shaper: Shaper,
    train_seconds: f64,
}

impl LoopState {
    fn controller(&self, cfg: &RunConfig) -> Result<ControllerState> {
        Ok(ControllerState {
            format: checkpoint::CONTROLLER_FORMAT,
            step: self.step,
            samples: self.samples,
            cursor: self.cursor,
            kl: self.shaper.kl.state().clone(),
            baseline: self.shaper.adv.state().clone(),
            train_seconds: self.train_seconds,
            config: serde_json::to_value(cfg)?,
        })
    }
}

/// The next step's batch, being sampled while the current step trains
/// (`rollout.async_generation`).
struct Prefetch {
    step: u64,
    batch: Vec<usize>,
    /// The prompt cursor before this batch was taken: what a checkpoint written while the
    /// batch is in flight records.
    cursor_before: PromptCursor,
    task: Option<tokio::task::JoinHandle<Result<pb::GenerateResponse>>>,
    done: Option<pb::GenerateResponse>,
}

impl Prefetch {
    /// Waits for the sampling to finish and keeps its answer.
    async fn finish(&mut self) -> Result<()> {
        if let Some(task) = self.task.take() {
            let gen = task
                .await
                .context("the prefetching task failed")?
                .with_context(|| format!("sampling step {}'s batch ahead", self.step))?;
            self.done = Some(gen);
        }
        Ok(())
    }

    async fn wait(mut self) -> Result<pb::GenerateResponse> {
        self.finish().await?;
        self.done.context("prefetched batch missing")
    }
}

/// A reward source failed (its error inside): the step loop checkpoints the finished steps
/// before stopping ([`StepLoop::stop_after_reward_failure`]).
#[derive(Debug)]
pub struct RewardFailed(pub anyhow::Error);

impl std::fmt::Display for RewardFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for RewardFailed {}

/// What the rollout phase produced: the step's prompt rows and their samples.
pub struct Generated {
    pub batch: Vec<usize>,
    /// The prompt cursor before this batch: where a checkpoint of the previous step points.
    pub cursor_before: PromptCursor,
    pub generation: pb::GenerateResponse,
    /// Sampled during the previous step, by the policy before that step's update.
    pub off_policy: bool,
    pub secs: f64,
}

/// What the scoring phase produced: rewards, reference log-probs and values, as the workers
/// answered them.
pub struct Scored {
    /// The decoded responses, one per row.
    pub responses: Vec<String>,
    pub scores: pb::ScoreResponse,
    pub ref_logprobs: Option<pb::Tensor>,
    pub values: Option<pb::Tensor>,
    pub secs: f64,
    /// Controller time spent decoding the responses and building the requests.
    pub controller_secs: f64,
}

/// What the shaping phase produced: the rollout with advantages, and its statistics.
pub struct Shaped {
    pub rollout: rl::Rollout,
    pub stats: RolloutStats,
    pub controller_secs: f64,
}

/// What the training phase produced: the actor's (`actor/...`) and critic's (`critic/...`)
/// metrics averaged over the minibatches.
pub struct Trained {
    pub metrics: BTreeMap<String, f64>,
    pub secs: f64,
    pub controller_secs: f64,
}

/// What the weight sync produced.
pub struct Synced {
    /// Bytes each generator received; `None` without generators.
    pub bytes: Option<u64>,
    pub secs: f64,
    /// Time spent waiting for the next step's batch before the generators could take weights.
    pub wait_prefetch_secs: f64,
    /// The replicas' digests were compared after this step.
    pub replicas_checked: bool,
}

/// A validation's result, for the ranking and the metrics.
pub struct Validated {
    pub score: Option<f64>,
    pub judge: String,
    pub per_category: BTreeMap<String, Option<f64>>,
    pub missing: Option<usize>,
    pub truncated_prompts: Option<usize>,
    pub secs: f64,
}

impl Validated {
    fn metrics(&self) -> ValidationMetrics {
        let v = self;
        ValidationMetrics {
            mt_bench: v.score.unwrap_or(f64::NAN),
            per_category: Prefixed {
                prefix: "validation/",
                values: v
                    .per_category
                    .iter()
                    .map(|(k, s)| (k.clone(), s.unwrap_or(f64::NAN)))
                    .collect(),
            },
            missing: v.missing.map(|n| n as f64),
            truncated_prompts: v.truncated_prompts.map(|n| n as f64),
            secs: v.secs,
        }
    }
}

/// The phases of one step, for [`StepOutcome::metrics`].
struct StepOutcome<'a> {
    step: u64,
    async_generation: bool,
    total: Duration,
    generated: &'a Generated,
    scored: &'a Scored,
    shaped: &'a Shaped,
    trained: Trained,
    synced: &'a Synced,
    validated: Option<&'a Validated>,
}

impl StepOutcome<'_> {
    fn metrics(self) -> StepMetrics {
        let o = self;
        let s = &o.shaped.stats;
        let step_s = o.total.as_secs_f64();
        let phases = o.generated.secs
            + o.scored.secs
            + o.trained.secs
            + o.synced.secs
            + o.synced.wait_prefetch_secs;
        StepMetrics {
            step: o.step,
            reward_mean: s.reward_mean,
            reward_std: s.reward_std,
            score_mean: s.score_mean,
            kl_mean: s.kl_mean,
            kl_coef: s.kl_coef,
            response_len_mean: s.response_len_mean,
            truncated_frac: s.truncated_frac,
            advantage_mean: s.advantage_mean,
            attributes: Prefixed {
                prefix: "attribute/",
                values: s.attribute_means.clone(),
            },
            train: o.trained.metrics,
            tokens_per_s: s.response_tokens / o.generated.secs.max(1e-9),
            step_s,
            generate_s: o.generated.secs,
            score_s: o.scored.secs,
            train_s: o.trained.secs,
            sync_s: o.synced.secs,
            off_policy: o.async_generation.then_some(if o.generated.off_policy {
                1.0
            } else {
                0.0
            }),
            wait_prefetch_s: o.async_generation.then_some(o.synced.wait_prefetch_secs),
            sync_bytes: o.synced.bytes.map(|b| b as f64),
            replicas_checked: o.synced.replicas_checked.then_some(1.0),
            controller_s: (step_s - phases).max(0.0),
            controller_compute_s: o.scored.controller_secs
                + o.shaped.controller_secs
                + o.trained.controller_secs,
            validation: o.validated.map(Validated::metrics),
        }
    }
}

/// The training loop of one launch. [`StepLoop::start`] restores a checkpoint and brings every
/// copy of the policy level; [`StepLoop::run`] steps until `train.steps` or a stop request.
pub struct StepLoop<'a, R: RoleHandle> {
    ctx: &'a RunContext,
    roles: Roles<R>,
    state: LoopState,
    prefetch: Option<Prefetch>,
    metrics: JsonlWriter,
    /// `samples.jsonl` (`logging.samples_every`).
    samples: JsonlWriter,
    /// This launch's TensorBoard event file (`logging.tensorboard`).
    tensorboard: Option<EventWriter>,
    progress: Progress,
    /// The first step this launch runs (replicas are checked after it whatever the interval).
    first_step: u64,
    last_save: Instant,
    last_saved_step: Option<u64>,
    /// metrics.jsonl already holds a step-0 baseline (a launch stopped before step 1).
    baseline_kept: bool,
    last_step_time: Duration,
}

impl<'a, R: RoleHandle> StepLoop<'a, R> {
    /// Restores the checkpoint to resume from (the workers' state and the controller's), gives
    /// the generators the actor's weights, checks the replicas agree, and opens the metrics
    /// file (cut back to the restored step) and a new TensorBoard event file.
    pub async fn start(ctx: &'a RunContext, roles: Roles<R>) -> Result<StepLoop<'a, R>> {
        let cfg = ctx.config();
        let group = cfg.rollout.samples_per_prompt as i64;
        let mut state = LoopState {
            step: 0,
            samples: 0,
            cursor: PromptCursor::new(cfg.run.seed, cfg.rollout.shuffle),
            shaper: Shaper::new(ctx.settings.clone(), group)?,
            train_seconds: 0.0,
        };
        if let Some(r) = &ctx.resume {
            restore(ctx, &roles, r, &mut state).await?;
        }
        if state.step >= cfg.train.steps {
            info!(
                step = state.step,
                "the run is already complete (train.steps = {}); raise train.steps to continue it",
                cfg.train.steps
            );
        }
        // Generators start from the policy files; after a resume the actor holds newer weights.
        // Either way they take the actor's before the first rollout.
        if !roles.generators.is_empty() {
            let (bytes, secs) = replicas::sync_generators(roles.actor(), &roles.generators).await?;
            info!(
                bytes,
                secs,
                generators = roles.generators.len(),
                "generators hold the actor's weights"
            );
        }
        // Replicas and generators must start equal (same files, or the same checkpoint
        // loaded): check before spending a step on them.
        if cfg.train.replica_check_every > 0 {
            roles.check_replicas(state.step).await?;
        }
        let metrics_path = ctx.run_dir.join("metrics.jsonl");
        let kept = checkpoint::truncate_metrics(&metrics_path, state.step)?;
        // Before step 1 only a `validation.at_start` baseline survives: an earlier launch's.
        let baseline_kept = state.step == 0 && kept > 0;
        let metrics = JsonlWriter::create(&metrics_path)?;
        let samples_path = ctx.run_dir.join("samples.jsonl");
        checkpoint::truncate_metrics(&samples_path, state.step)?;
        let samples = JsonlWriter::create(&samples_path)?;
        let tensorboard = cfg
            .logging
            .tensorboard
            .then(|| EventWriter::create(&ctx.run_dir.join(TENSORBOARD_DIR)))
            .transpose()?;
        let progress = Progress::new(cfg.train.steps, cfg.logging.progress);
        progress.resume_at(state.step);
        Ok(StepLoop {
            ctx,
            first_step: state.step + 1,
            last_saved_step: ctx.resume.as_ref().map(|r| r.state.step),
            baseline_kept,
            state,
            roles,
            prefetch: None,
            metrics,
            samples,
            tensorboard,
            progress,
            last_save: Instant::now(),
            last_step_time: Duration::ZERO,
        })
    }

    /// Steps until `train.steps`, or until `stop` asks (a signal's name), or until
    /// `checkpoint.must_save_by` would pass during the next step: then it writes a checkpoint
    /// (unless the last step has one) and returns [`Preempted`].
    pub async fn run(mut self, stop: watch::Receiver<Option<String>>) -> Result<()> {
        let cfg = self.ctx.config();
        if self.state.step == 0 && cfg.validation.at_start {
            if self.baseline_kept {
                info!("the step-0 MT-Bench baseline of an earlier launch is kept (validation.at_start)");
            } else {
                self.validate_initial_policy().await?;
            }
        }
        while self.state.step < cfg.train.steps {
            if let Some(reason) = self.stop_reason(&stop) {
                return self.stop(reason).await;
            }
            self.step().await?;
        }
        self.finish()
    }

    /// `validation.at_start`: MT-Bench of the policy before any update, written as step 0 of
    /// `metrics.jsonl` (not ranked: there is no checkpoint of it).
    async fn validate_initial_policy(&mut self) -> Result<()> {
        let Some(v) = self.validate(0).await else {
            return Ok(());
        };
        info!(
            score = %v.score.map_or("none".to_string(), |s| format!("{s:.3}")),
            "MT-Bench of the initial policy (validation.at_start): the baseline for the checkpoints' scores"
        );
        let line = InitialValidation {
            step: 0,
            validation: v.metrics(),
        };
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(0, &line)?;
        }
        self.metrics.write(&line)
    }

    fn stop_reason(&self, stop: &watch::Receiver<Option<String>>) -> Option<String> {
        // Copied out: a `borrow()` held through the checkpoint would hold the watch's read lock,
        // and a worker reporting a signal meanwhile (a writer) would block on it while the
        // heartbeat service holds the registry: a deadlock.
        let requested = stop.borrow().clone();
        if let Some(sig) = requested {
            return Some(format!("{sig} received"));
        }
        let budget = self.ctx.config().checkpoint.must_save_by?;
        let next_end = self.ctx.started.elapsed() + self.last_step_time.mul_f64(1.5);
        (next_end.as_secs_f64() > budget).then(|| {
            format!("checkpoint.must_save_by = {budget} s would pass during the next step")
        })
    }

    /// Runs one whole step: the phases in order, one metrics line, and a checkpoint when one is
    /// due.
    pub async fn step(&mut self) -> Result<()> {
        let step = self.state.step + 1;
        let t0 = Instant::now();
        let generated = self.rollout(step).await?;
        let scored = match self.score(&generated).await {
            Ok(s) => s,
            Err(e) if e.is::<RewardFailed>() => {
                return Err(self.stop_after_reward_failure(e, &generated).await)
            }
            Err(e) => return Err(e),
        };
        let shaped = self.shape(&generated, &scored)?;
        let trained = self.train(step, &shaped.rollout).await?;
        let synced = self.sync(step).await?;
        let total = t0.elapsed();
        let validated = self.validate(step).await;
        let metrics = StepOutcome {
            step,
            async_generation: self.ctx.config().rollout.async_generation,
            total,
            generated: &generated,
            scored: &scored,
            shaped: &shaped,
            trained,
            synced: &synced,
            validated: validated.as_ref(),
        }
        .metrics();
        self.record(&metrics, shaped.rollout.rows as u64)?;
        self.write_samples(step, &generated, &scored)?;
        if self.checkpoint_due(step) || validated.is_some() {
            self.checkpoint(validated.as_ref()).await?;
        }
        Ok(())
    }

    /// Samples the step's batch (or takes the one sampled ahead), and starts sampling the next
    /// one when `rollout.async_generation` asks and this step ends in no scheduled checkpoint
    /// (so that resuming from it is exact) and is not the last.
    pub async fn rollout(&mut self, step: u64) -> Result<Generated> {
        let t0 = Instant::now();
        let cfg = self.ctx.config();
        let rows = self.ctx.prompts.rows.len();
        let (batch, cursor_before, generation, off_policy) = match self.prefetch.take() {
            Some(pf) => {
                debug_assert_eq!(pf.step, step);
                let (batch, cursor_before) = (pf.batch.clone(), pf.cursor_before);
                (batch, cursor_before, pf.wait().await?, true)
            }
            None => {
                let cursor_before = self.state.cursor;
                let batch = self.state.cursor.next_batch(rows, cfg.rollout.batch_size);
                let req = generate_request(self.ctx, &batch, step);
                let generation = replicas::generate(self.roles.generation(), req).await?;
                (batch, cursor_before, generation, false)
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        if cfg.rollout.async_generation && !self.checkpoint_scheduled(step) {
            let cursor_before = self.state.cursor;
            let next = self.state.cursor.next_batch(rows, cfg.rollout.batch_size);
            let req = generate_request(self.ctx, &next, step + 1);
            let gens = self.roles.generation().to_vec();
            self.prefetch = Some(Prefetch {
                step: step + 1,
                batch: next,
                cursor_before,
                task: Some(tokio::spawn(
                    async move { replicas::generate(&gens, req).await },
                )),
                done: None,
            });
        }
        Ok(Generated {
            batch,
            cursor_before,
            generation,
            off_policy,
            secs,
        })
    }

    /// Rewards (on the decoded responses), reference log-probs and critic values, asked of
    /// their roles at once.
    pub async fn score(&self, generated: &Generated) -> Result<Scored> {
        let cfg = self.ctx.config();
        let t_compute = Instant::now();
        let items = score_items(self.ctx, generated)?;
        let responses = items.iter().map(|i| i.response.clone()).collect();
        let seqs = rl::sequences(&generated.generation)?;
        let controller_secs = t_compute.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let temperature = cfg.rollout.temperature;
        let group = cfg.rollout.samples_per_prompt;
        let roles = &self.roles;
        let (scores, ref_logprobs, values) = tokio::join!(
            async {
                rewards::score(&roles.rewards, items)
                    .await
                    .map_err(|e| anyhow::Error::new(RewardFailed(e)))
            },
            async {
                match &roles.reference {
                    Reference::Role(r) => r
                        .log_probs(seqs.clone(), temperature, false)
                        .await
                        .map(Some),
                    Reference::ActorBase => {
                        replicas::base_log_probs(&roles.actors, seqs.clone(), temperature, group)
                            .await
                            .map(Some)
                    }
                    Reference::None => Ok(None),
                }
            },
            async {
                match roles.critics.first() {
                    Some(c) => c.values(seqs.clone()).await.map(Some),
                    None => Ok(None),
                }
            },
        );
        Ok(Scored {
            responses,
            scores: scores?,
            ref_logprobs: ref_logprobs?,
            values: values?,
            secs: t0.elapsed().as_secs_f64(),
            controller_secs,
        })
    }

    /// KL-shaped rewards, advantages and returns (`rl::Shaper`); updates the KL controller and
    /// the baselines.
    pub fn shape(&mut self, generated: &Generated, scored: &Scored) -> Result<Shaped> {
        let t0 = Instant::now();
        let (rollout, stats) = self.state.shaper.shape(
            &generated.generation,
            &scored.scores,
            scored.ref_logprobs.as_ref(),
            scored.values.as_ref(),
        )?;
        Ok(Shaped {
            rollout,
            stats,
            controller_secs: t0.elapsed().as_secs_f64(),
        })
    }

    /// `train.epochs` passes over the rollout in shuffled minibatches, each sharded by rows
    /// over the actor replicas and the critic replicas, which train on their shards at once.
    pub async fn train(&self, step: u64, rollout: &rl::Rollout) -> Result<Trained> {
        let cfg = self.ctx.config();
        let kl_in_loss = self.ctx.settings.kl.mode == rlhf_algo::KlMode::Loss;
        let minibatch = cfg.minibatch_size();
        let (actors, critics) = (&self.roles.actors, &self.roles.critics);
        let mut secs = 0.0;
        let mut controller_secs = 0.0;
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut minibatches = 0.0;
        for epoch in 0..cfg.train.epochs as u64 {
            let order = shuffled_indices(rollout.rows as usize, cfg.run.seed, step * 1000 + epoch);
            for rows in order.chunks(minibatch) {
                let t_compute = Instant::now();
                let actor_reqs: Vec<pb::TrainStepRequest> =
                    rl::minibatch_shards(rollout, rows, actors.len(), kl_in_loss, false)?
                        .into_iter()
                        .map(|(a, _)| a)
                        .collect();
                let critic_reqs: Vec<pb::TrainStepRequest> = if critics.is_empty() {
                    vec![]
                } else {
                    rl::minibatch_shards(rollout, rows, critics.len(), false, true)?
                        .into_iter()
                        .filter_map(|(_, c)| c)
                        .collect()
                };
                controller_secs += t_compute.elapsed().as_secs_f64();
                let t0 = Instant::now();
                let (a, c) = tokio::join!(
                    futures::future::try_join_all(
                        actors.iter().zip(actor_reqs).map(|(r, q)| r.train_step(q))
                    ),
                    futures::future::try_join_all(
                        critics
                            .iter()
                            .zip(critic_reqs)
                            .map(|(r, q)| r.train_step(q))
                    ),
                );
                secs += t0.elapsed().as_secs_f64();
                let (a, c) = (a?, c?);
                for (k, v) in replicas::combine_metrics(&a).metrics {
                    *sums.entry(format!("actor/{k}")).or_default() += v;
                }
                if !c.is_empty() {
                    for (k, v) in replicas::combine_metrics(&c).metrics {
                        *sums.entry(format!("critic/{k}")).or_default() += v;
                    }
                }
                minibatches += 1.0;
            }
        }
        for v in sums.values_mut() {
            *v /= minibatches;
        }
        Ok(Trained {
            metrics: sums,
            secs,
            controller_secs,
        })
    }

    /// Waits for the batch sampled ahead (the generators must be idle before they take new
    /// weights), broadcasts the actor's weights to the generators, and compares the replicas'
    /// digests every `train.replica_check_every` steps and after the launch's first step.
    pub async fn sync(&mut self, step: u64) -> Result<Synced> {
        let t_wait = Instant::now();
        if let Some(pf) = self.prefetch.as_mut() {
            pf.finish().await?;
        }
        let wait_prefetch_secs = t_wait.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut bytes = None;
        if !self.roles.generators.is_empty() {
            let (b, _) =
                replicas::sync_generators(self.roles.actor(), &self.roles.generators).await?;
            bytes = Some(b);
        }
        let secs = t0.elapsed().as_secs_f64();
        let k = self.ctx.config().train.replica_check_every;
        let mut replicas_checked = false;
        if k > 0 && (step % k == 0 || step == self.first_step) {
            replicas_checked = self.roles.check_replicas(step).await?;
        }
        Ok(Synced {
            bytes,
            secs,
            wait_prefetch_secs,
            replicas_checked,
        })
    }

    /// MT-Bench at `validation.every` steps. A failure is logged and ranks the checkpoint
    /// last; it never stops the run.
    pub async fn validate(&self, step: u64) -> Option<Validated> {
        let v = self.ctx.validator.as_ref().filter(|v| v.due(step))?;
        let t0 = Instant::now();
        let outcome = v
            .run(
                self.roles.actor(),
                self.roles
                    .rewards
                    .iter()
                    .find(|r| r.is_model)
                    .map(|r| &r.role),
                &self.ctx.tokenizer,
                &self.ctx.run_dir,
                step,
            )
            .await;
        let secs = t0.elapsed().as_secs_f64();
        Some(match outcome {
            Ok(o) => Validated {
                score: o.score,
                judge: o.judge,
                per_category: o.per_category,
                missing: Some(o.missing),
                truncated_prompts: Some(o.truncated_prompts),
                secs,
            },
            Err(e) => {
                warn!(step, error = %format!("{e:#}"), "MT-Bench validation failed; its score is missing and the run goes on");
                Validated {
                    score: None,
                    judge: "failed".into(),
                    per_category: BTreeMap::new(),
                    missing: None,
                    truncated_prompts: None,
                    secs,
                }
            }
        })
    }

    /// Writes the metrics line (and its scalars to the TensorBoard file), moves the progress bar and advances the loop state to the
    /// metrics' step (`rows` sequences more trained on).
    pub fn record(&mut self, metrics: &StepMetrics, rows: u64) -> Result<()> {
        self.metrics.write(metrics)?;
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(metrics.step, metrics)?;
        }
        self.progress.step(metrics);
        self.state.step = metrics.step;
        self.state.samples += rows;
        self.state.train_seconds += metrics.step_s;
        self.last_step_time = Duration::from_secs_f64(metrics.step_s);
        Ok(())
    }

    /// Every `logging.samples_every` steps: the first `logging.samples_prompts` prompts of the
    /// batch with their completions and scores, one line per prompt, in `samples.jsonl`, and
    /// all of them as one Markdown text (tag `samples`) in the TensorBoard file.
    pub fn write_samples(
        &mut self,
        step: u64,
        generated: &Generated,
        scored: &Scored,
    ) -> Result<()> {
        let logging = &self.ctx.config().logging;
        if logging.samples_every == 0 || step % logging.samples_every != 0 {
            return Ok(());
        }
        let group = self.ctx.config().rollout.samples_per_prompt;
        let lines = samples(
            self.ctx,
            step,
            generated,
            scored,
            logging.samples_prompts,
            group,
        )?;
        for line in &lines {
            self.samples.write(line)?;
        }
        if let Some(tb) = self.tensorboard.as_mut().filter(|_| !lines.is_empty()) {
            tb.text(SAMPLES_TAG, step, &samples_markdown(&lines))?;
        }
        Ok(())
    }

    /// A step ending in a checkpoint by schedule: the last step, or every `checkpoint.every`.
    fn checkpoint_scheduled(&self, step: u64) -> bool {
        let cfg = self.ctx.config();
        let every = cfg.checkpoint.every;
        step == cfg.train.steps || (every > 0 && step % every == 0)
    }

    /// A checkpoint is due after `step`: scheduled, or `checkpoint.every_minutes` have passed.
    fn checkpoint_due(&self, step: u64) -> bool {
        self.checkpoint_scheduled(step)
            || self
                .ctx
                .config()
                .checkpoint
                .every_minutes
                .is_some_and(|m| self.last_save.elapsed().as_secs_f64() >= m * 60.0)
    }

    /// Writes a checkpoint of the last finished step. With a batch prefetched, its cursor
    /// points before that batch (a resume samples it again).
    pub async fn checkpoint(&mut self, validated: Option<&Validated>) -> Result<PathBuf> {
        let mut state_cursor = self.state.cursor;
        if let Some(pf) = &self.prefetch {
            state_cursor = pf.cursor_before;
        }
        let cursor_now = std::mem::replace(&mut self.state.cursor, state_cursor);
        let saved = save_checkpoint(self.ctx, &self.roles, &self.state, validated).await;
        self.state.cursor = cursor_now;
        let dir = saved?;
        self.last_save = Instant::now();
        self.last_saved_step = Some(self.state.step);
        Ok(dir)
    }

    /// The reward sources failed on step `generated`'s batch (the user's server or script, most
    /// likely): nothing of that step has changed a role, so the state after the previous step is
    /// checkpointed (unless it already is) before the run stops, and a relaunch resumes there.
    async fn stop_after_reward_failure(
        &mut self,
        e: anyhow::Error,
        generated: &Generated,
    ) -> anyhow::Error {
        if let Some(pf) = self.prefetch.take() {
            if let Some(task) = pf.task {
                task.abort();
            }
        }
        self.state.cursor = generated.cursor_before;
        let done = self.state.step;
        let failed = done + 1;
        if done == 0 {
            return e.context(format!(
                "step {failed}: scoring failed before any step finished; nothing to checkpoint, a relaunch starts over"
            ));
        }
        if self.last_saved_step == Some(done) {
            return e.context(format!(
                "step {failed}: scoring failed; the checkpoint of step {done} is the latest, a relaunch resumes from it"
            ));
        }
        warn!(
            step = done,
            "the reward failed; checkpointing the last finished step before stopping"
        );
        match save_checkpoint(self.ctx, &self.roles, &self.state, None).await {
            Ok(dir) => {
                self.last_saved_step = Some(done);
                self.last_save = Instant::now();
                e.context(format!(
                "step {failed}: scoring failed; step {done} is checkpointed in {}, fix the reward and relaunch to resume from it",
                dir.display()
            ))
            }
            Err(save) => e.context(format!(
                "step {failed}: scoring failed, and checkpointing step {done} failed too ({save:#})"
            )),
        }
    }

    /// Stops at a step boundary: drops a prefetched batch (the checkpoint's cursor points
    /// before it), writes a checkpoint unless the last step has one, and returns [`Preempted`].
    async fn stop(mut self, reason: String) -> Result<()> {
        if let Some(pf) = self.prefetch.take() {
            self.state.cursor = pf.cursor_before;
            if let Some(task) = pf.task {
                task.abort();
            }
        }
        let step = self.state.step;
        if step > 0 && self.last_saved_step != Some(step) {
            warn!(step, %reason, "writing a checkpoint before stopping");
            save_checkpoint(self.ctx, &self.roles, &self.state, None).await?;
        }
        Err(Preempted { step, reason }.into())
    }

    /// After the last step: the progress bar closed, the metrics flushed, the plot drawn.
    fn finish(mut self) -> Result<()> {
        let cfg = self.ctx.config();
        self.progress.finish();
        self.metrics.flush()?;
        self.samples.flush()?;
        if cfg.logging.plot {
            let png = self.ctx.run_dir.join("metrics.png");
            match crate::plot::write_plot(&self.ctx.run_dir.join("metrics.jsonl"), &png) {
                Err(e) => warn!(error = %e, "could not write the metrics plot"),
                Ok(()) => info!(plot = %png.display(), "plot written"),
            }
        }
        info!(steps = cfg.train.steps, run_dir = %self.ctx.run_dir.display(), "run finished");
        Ok(())
    }
}

/// Loads the trainable roles' state from the checkpoint `r` and the controller's into `state`.
async fn restore<R: RoleHandle>(
    ctx: &RunContext,
    roles: &Roles<R>,
    r: &ResumePoint,
    state: &mut LoopState,
) -> Result<()> {
    let t0 = Instant::now();
    let actor_dir = r.dir.join("actor");
    let critic_dir = r.dir.join("critic");
    let (a, c) = tokio::join!(
        futures::future::try_join_all(roles.actors.iter().map(|a| a.load_state(&actor_dir))),
        futures::future::try_join_all(roles.critics.iter().map(|c| c.load_state(&critic_dir))),
    );
    a.with_context(|| format!("restoring the actor from {}", r.dir.display()))?;
    c.with_context(|| format!("restoring the critic from {}", r.dir.display()))?;
    state.step = r.state.step;
    state.samples = r.state.samples;
    state.cursor = r.state.cursor;
    state.train_seconds = r.state.train_seconds;
    state.shaper.kl = rlhf_algo::KlController::from_state(r.state.kl.clone())?;
    state.shaper.adv = rlhf_algo::AdvantageCalculator::from_state(
        ctx.settings.advantage.clone(),
        r.state.baseline.clone(),
    )?;
    info!(
        step = state.step,
        secs = t0.elapsed().as_secs_f64(),
        "state restored; continuing"
    );
    Ok(())
}

/// The `samples.jsonl` lines of a step: its first `prompts` prompts, `group` completions each.
fn samples(
    ctx: &RunContext,
    step: u64,
    generated: &Generated,
    scored: &Scored,
    prompts: usize,
    group: usize,
) -> Result<Vec<SampleLine>> {
    let wire_rows = |field: &str, t: Option<&pb::Tensor>| -> Result<Vec<Vec<f64>>> {
        let Some(t) = t else { return Ok(vec![]) };
        let t = rlhf_proto::wire::from_wire(field, t)?.to_kind(tch::Kind::Double);
        Ok(if t.dim() == 1 {
            Vec::<f64>::try_from(t)?
                .into_iter()
                .map(|v| vec![v])
                .collect()
        } else {
            Vec::<Vec<f64>>::try_from(t)?
        })
    };
    let scores = wire_rows("rewards", scored.scores.rewards.as_ref())?;
    let attributes = wire_rows("attributes", scored.scores.attributes.as_ref())?;
    let names = &scored.scores.attribute_names;
    Ok(generated
        .batch
        .iter()
        .take(prompts)
        .enumerate()
        .map(|(p, &i)| {
            let row = &ctx.prompts.rows[i];
            SampleLine {
                step,
                prompt: row
                    .messages
                    .iter()
                    .map(|m| SampleMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
                answer: row.answer.clone(),
                completions: (p * group..(p + 1) * group)
                    .filter(|&r| r < scored.responses.len())
                    .map(|r| Completion {
                        text: scored.responses[r].clone(),
                        score: scores
                            .get(r)
                            .and_then(|v| v.first())
                            .copied()
                            .unwrap_or(f64::NAN),
                        attributes: attributes
                            .get(r)
                            .map(|v| names.iter().cloned().zip(v.iter().copied()).collect())
                            .unwrap_or_default(),
                        finished: generated
                            .generation
                            .finished
                            .get(r)
                            .copied()
                            .unwrap_or(true),
                    })
                    .collect(),
            }
        })
        .collect())
}

/// The Generate request for prompt rows `batch` of step `step`.
fn generate_request(ctx: &RunContext, batch: &[usize], step: u64) -> pb::GenerateRequest {
    let cfg = ctx.config();
    pb::GenerateRequest {
        role_id: String::new(),
        prompts: batch
            .iter()
            .map(|&i| pb::PromptIds {
                ids: ctx.prompts.rows[i].ids.clone(),
            })
            .collect(),
        samples_per_prompt: cfg.rollout.samples_per_prompt as u32,
        max_new_tokens: cfg.rollout.max_new_tokens as u32,
        temperature: cfg.rollout.temperature,
        top_k: cfg.rollout.top_k as u32,
        top_p: cfg.rollout.top_p,
        seed: rl::step_seed(cfg.run.seed, step),
        first_row: 0,
    }
}

/// The Score request's items: each decoded response with its prompt row's messages and answer.
fn score_items(ctx: &RunContext, generated: &Generated) -> Result<Vec<pb::ScoreItem>> {
    let group = ctx.config().rollout.samples_per_prompt;
    let texts = rl::decode_responses(&generated.generation, &ctx.tokenizer)?;
    Ok(texts
        .into_iter()
        .enumerate()
        .map(|(i, response)| {
            let row = &ctx.prompts.rows[generated.batch[i / group]];
            pb::ScoreItem {
                prompt: row
                    .messages
                    .iter()
                    .map(|m| pb::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
                response,
                answer: row.answer.clone().unwrap_or_default(),
                extra_json: if row.extra.is_empty() {
                    String::new()
                } else {
                    serde_json::Value::Object(row.extra.clone()).to_string()
                },
            }
        })
        .collect())
}

/// Writes a full checkpoint of the state after `st.step`, with the message that a failure
/// leaves the previous checkpoint intact.
async fn save_checkpoint<R: RoleHandle>(
    ctx: &RunContext,
    roles: &Roles<R>,
    st: &LoopState,
    validated: Option<&Validated>,
) -> Result<PathBuf> {
    write_checkpoint(ctx, roles, st, validated)
        .await
        .with_context(|| {
            format!(
                "writing the checkpoint of step {} failed (the previous checkpoint, if any, is intact; fix the cause and launch again to resume from it)",
                st.step
            )
        })
}

/// The trainable roles' state (written by the workers into the staging directory), the
/// controller state and the resolved config; then the commit (manifest last, LATEST by
/// rename), the ranking and retention.
async fn write_checkpoint<R: RoleHandle>(
    ctx: &RunContext,
    roles: &Roles<R>,
    st: &LoopState,
    validated: Option<&Validated>,
) -> Result<PathBuf> {
    let cfg = ctx.config();
    let t0 = Instant::now();
    let w = rlhf_ckpt::CheckpointWriter::begin(&ctx.run_dir, st.step)
        .context("starting a checkpoint")?;
    let stage = w.dir().to_path_buf();
    let actor_dir = stage.join("actor");
    let critic_dir = stage.join("critic");
    // Replicas are bitwise equal (checked every train.replica_check_every steps): replica 0
    // speaks for all of them. With sharded optimizer state (train.zero_stage >= 1) every
    // replica takes part in gathering it and replica 0 writes it.
    let speakers = |all: &[R]| -> usize {
        if cfg.train.zero_stage > 0 {
            all.len()
        } else {
            1
        }
    };
    let actors = &roles.actors[..speakers(&roles.actors).min(roles.actors.len())];
    let critics = &roles.critics[..speakers(&roles.critics).min(roles.critics.len())];
    let (a, c) = tokio::join!(
        futures::future::try_join_all(actors.iter().map(|a| a.save_state(&actor_dir))),
        futures::future::try_join_all(critics.iter().map(|c| c.save_state(&critic_dir))),
    );
    a?;
    c?;
    let worker_secs = t0.elapsed().as_secs_f64();
    w.write_json(checkpoint::CONTROLLER_FILE, &st.controller(cfg)?)?;
    w.write_file("config.resolved.yaml", ctx.loaded.to_yaml()?.as_bytes())?;
    let meta = serde_json::json!({
        "job": "rlhf",
        "run": cfg.run.name,
        "samples": st.samples,
        "validation_score": validated.and_then(|v| v.score),
    });
    let info = tokio::task::block_in_place(|| w.commit(meta))?;
    let bytes: u64 = info.manifest.files.iter().map(|f| f.size).sum();
    rank_and_prune(ctx, st.step, validated)?;
    info!(
        step = st.step,
        dir = %info.dir.display(),
        bytes,
        secs = t0.elapsed().as_secs_f64(),
        worker_secs,
        "checkpoint saved"
    );
    Ok(info.dir)
}

/// Records a validated checkpoint in the ranking (so the best are protected), then applies
/// retention (`checkpoint.keep_last`, `checkpoint.keep_best`).
fn rank_and_prune(ctx: &RunContext, step: u64, validated: Option<&Validated>) -> Result<()> {
    let ck = &ctx.config().checkpoint;
    let run_dir: &Path = &ctx.run_dir;
    let mut ranking = checkpoint::Ranking::read(run_dir)?;
    if let Some(v) = validated {
        ranking.record(checkpoint::Ranked {
            step,
            checkpoint: rlhf_ckpt::dir_name(step),
            score: v.score,
            judge: v.judge.clone(),
        });
        ranking.apply_protection(run_dir, ck.keep_best)?;
    }
    let pruned = rlhf_ckpt::prune(run_dir, ck.keep_last)?;
    if validated.is_some() || !pruned.is_empty() {
        ranking.retain_existing(run_dir);
        ranking.write(run_dir)?;
        if let Some(best) = &ranking.best {
            info!(best = %best, "best checkpoint by MT-Bench score");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
