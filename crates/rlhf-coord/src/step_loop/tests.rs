//! The step loop against in-process fake roles: every phase, a checkpoint while a batch is
//! sampled ahead, a stop request mid-step, a failure in each phase, replicas that drift apart.
//! The fakes answer with well-formed tensors of the right shapes; what they compute is not the
//! point (the multi-process tests in `tests/` run real workers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use rlhf_config::EnvSource;
use rlhf_model::Tokenizer;
use rlhf_proto::pb;
use rlhf_proto::wire::to_wire;
use tch::{Kind, Tensor};
use tokio::sync::watch;

use super::*;
use crate::prompts::PromptOptions;
use crate::workers::RoleHandle;

/// What the fakes share: the calls made, the failure to inject, the digests to report.
#[derive(Default)]
struct World {
    /// `worker:Op` for every call, in order.
    calls: Mutex<Vec<String>>,
    /// `(worker, op)`: that call fails.
    fail: Mutex<Option<(String, &'static str)>>,
    /// Set when the first Generate call arrives (a signal landing mid-step).
    stop_on_generate: Mutex<Option<watch::Sender<Option<String>>>>,
    /// This worker's digest changes once it has trained (a replica drifting apart).
    drifts: Mutex<Option<String>>,
    /// Generate calls wait this long (so a prefetch is still in flight).
    generate_delay: Mutex<Duration>,
}

#[derive(Clone)]
struct Fake {
    worker: String,
    role: String,
    world: Arc<World>,
}

impl Fake {
    fn new(world: &Arc<World>, worker: &str, role: &str) -> Fake {
        Fake {
            worker: worker.into(),
            role: role.into(),
            world: world.clone(),
        }
    }

    /// Records the call; fails it when the world says so, the way `RoleClient` words errors.
    fn call(&self, op: &'static str) -> Result<()> {
        self.world
            .calls
            .lock()
            .unwrap()
            .push(format!("{}:{op}", self.worker));
        match &*self.world.fail.lock().unwrap() {
            Some((w, o)) if *w == self.worker && *o == op => Err(anyhow!(
                "worker `{}` on host fake (role {}): {op}: injected failure",
                self.worker,
                self.role
            )),
            _ => Ok(()),
        }
    }

    fn trained(&self) -> bool {
        let calls = self.world.calls.lock().unwrap();
        calls.contains(&format!("{}:TrainStep", self.worker))
    }
}

fn rows_of(seqs: &pb::Sequences) -> i64 {
    seqs.input_ids.as_ref().map_or(0, |t| t.shape[0])
}

fn wire(field: &str, t: &Tensor) -> pb::Tensor {
    to_wire(field, t).unwrap()
}

impl RoleHandle for Fake {
    fn worker(&self) -> &str {
        &self.worker
    }

    fn role(&self) -> &str {
        &self.role
    }

    async fn generate(&self, req: pb::GenerateRequest) -> Result<pb::GenerateResponse> {
        self.call("Generate")?;
        if let Some(tx) = self.world.stop_on_generate.lock().unwrap().take() {
            let _ = tx.send(Some("SIGTERM".into()));
        }
        let delay = *self.world.generate_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let per = req.samples_per_prompt as usize;
        let width = req.prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let n = req.max_new_tokens as usize;
        let (mut ids, mut mask) = (vec![], vec![]);
        for (i, p) in req.prompts.iter().enumerate() {
            for s in 0..per {
                let pad = width - p.ids.len();
                ids.extend(std::iter::repeat_n(0, pad));
                ids.extend(&p.ids);
                ids.extend((0..n).map(|j| 5 + ((req.seed as usize + i + s + j) % 20) as i64));
                mask.extend((0..width + n).map(|c| i64::from(c >= pad)));
            }
        }
        let rows = (req.prompts.len() * per) as i64;
        let shape = [rows, (width + n) as i64];
        Ok(pb::GenerateResponse {
            input_ids: Some(wire("input_ids", &Tensor::from_slice(&ids).view(shape))),
            attention_mask: Some(wire(
                "attention_mask",
                &Tensor::from_slice(&mask).view(shape),
            )),
            prompt_width: width as i64,
            response_mask: Some(wire(
                "response_mask",
                &Tensor::ones([rows, n as i64], (Kind::Float, tch::Device::Cpu)),
            )),
            response_logprobs: Some(wire(
                "response_logprobs",
                &Tensor::full([rows, n as i64], -1.5, (Kind::Float, tch::Device::Cpu)),
            )),
            finished: vec![true; rows as usize],
        })
    }

    async fn log_probs(
        &self,
        seqs: pb::Sequences,
        _temperature: f64,
        _adapters_off: bool,
    ) -> Result<pb::Tensor> {
        self.call("LogProbs")?;
        let shape = [rows_of(&seqs), seqs.response_len];
        Ok(wire(
            "logprobs",
            &Tensor::full(shape, -1.25, (Kind::Float, tch::Device::Cpu)),
        ))
    }

    async fn values(&self, seqs: pb::Sequences) -> Result<pb::Tensor> {
        self.call("Values")?;
        let shape = [rows_of(&seqs), seqs.response_len];
        Ok(wire(
            "values",
            &Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu)),
        ))
    }

    async fn score(&self, items: Vec<pb::ScoreItem>) -> Result<pb::ScoreResponse> {
        self.call("Score")?;
        let r: Vec<f32> = (0..items.len()).map(|i| (i % 3) as f32).collect();
        Ok(pb::ScoreResponse {
            rewards: Some(wire("rewards", &Tensor::from_slice(&r))),
            ..Default::default()
        })
    }

    async fn train_step(&self, req: pb::TrainStepRequest) -> Result<pb::TrainStepResponse> {
        self.call("TrainStep")?;
        let rows = req.sequences.as_ref().map_or(0, rows_of);
        Ok(pb::TrainStepResponse {
            metrics: [("loss".to_string(), 0.5), ("rows".to_string(), rows as f64)]
                .into_iter()
                .collect(),
            optimizer_step: 1,
        })
    }

    async fn sync_weights(&self, _root: usize) -> Result<pb::SyncWeightsResponse> {
        self.call("SyncWeights")?;
        Ok(pb::SyncWeightsResponse {
            bytes: 4096,
            seconds: 0.0,
            ..Default::default()
        })
    }

    async fn weights_digest(&self) -> Result<String> {
        self.call("WeightsDigest")?;
        let drifts = self.world.drifts.lock().unwrap().clone();
        let d = if drifts.as_deref() == Some(self.worker.as_str()) && self.trained() {
            'b'
        } else {
            'a'
        };
        Ok(std::iter::repeat_n(d, 64).collect())
    }

    async fn save_state(&self, dir: &Path) -> Result<Vec<String>> {
        self.call("SaveState")?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{}.bin", self.worker)), b"state")?;
        Ok(vec![format!("{}.bin", self.worker)])
    }

    async fn load_state(&self, _dir: &Path) -> Result<Vec<String>> {
        self.call("LoadState")?;
        Ok(vec![])
    }
}

/// A tiny model directory, made once for all tests (only its tokenizer and config are read).
fn policy() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("step-loop-policy-{}", std::process::id()));
        if !dir.join("config.json").exists() {
            let spec = rlhf_model::init::InitSpec::new(
                rlhf_model::Family::Llama,
                rlhf_model::init::Preset::Tiny,
            );
            rlhf_model::init::init_model(&spec, &dir).unwrap();
        }
        dir
    })
}

/// A run context in `dir`: 16 arithmetic prompts, 4 per step with 2 samples each, 3 steps, a
/// generator worker (the roles the loop gets are the test's own), changed by `sets` (`--set`
/// overrides).
fn context(dir: &Path, sets: &[&str]) -> RunContext {
    let prompts: String = (0..16)
        .map(|i| format!("{{\"prompt\": \"{i}+1=\", \"answer\": \"{}\"}}\n", i + 1))
        .collect();
    std::fs::write(dir.join("prompts.jsonl"), prompts).unwrap();
    let yaml = format!(
        "run: {{name: t, dir: runs, seed: 3}}\n\
         models:\n  policy: {}\n  reward: {{kind: exact_match}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 3}}\n\
         train: {{steps: 3, micro_batch_size: 4, minibatch_size: 4, actor: {{lr: 1.0e-3}}, critic: {{lr: 1.0e-3}}}}\n\
         logging: {{progress: false, plot: false}}\n\
         workers: [{{name: a, roles: [actor, critic, reward, reference]}}, {{name: g, roles: [generator]}}]\n",
        policy().display()
    );
    let file = dir.join("run.yaml");
    std::fs::write(&file, yaml).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let loaded = rlhf_config::load(&file, &sets, EnvSource::Vars(vec![])).unwrap();
    let cfg = &loaded.config;
    let tokenizer = Tokenizer::from_dir(&cfg.models.policy).unwrap();
    let prompts = crate::prompts::load(
        &cfg.rollout.prompts,
        &PromptOptions {
            tokenizer: &tokenizer,
            chat_template: false,
            max_prompt_tokens: cfg.rollout.max_prompt_tokens,
            need_answer: true,
            split: &cfg.rollout.split,
            columns: crate::prompts::columns(&cfg.rollout),
        },
    )
    .unwrap();
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir).unwrap();
    RunContext {
        settings: AlgoSettings::from_config(cfg).unwrap(),
        run_dir,
        prompts,
        tokenizer,
        resume: None,
        started: Instant::now(),
        validator: crate::validation::Validator::new(cfg).unwrap(),
        loaded,
    }
}

/// PPO's roles, each on a worker of its own name; `actors` replicas, `generators` generators.
fn roles(world: &Arc<World>, actors: usize, generators: usize) -> Roles<Fake> {
    Roles {
        actors: (0..actors)
            .map(|i| Fake::new(world, &format!("actor{i}"), "actor"))
            .collect(),
        critics: vec![Fake::new(world, "critic", "critic")],
        generators: (0..generators)
            .map(|i| Fake::new(world, &format!("gen{i}"), "generator"))
            .collect(),
        rewards: vec![RewardRole {
            name: "exact_match".into(),
            weight: 1.0,
            is_model: false,
            role: Fake::new(world, "reward", "reward"),
        }],
        reference: Reference::Role(Box::new(Fake::new(world, "reference", "reference"))),
    }
}

fn never_stop() -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    std::mem::forget(tx);
    rx
}

fn metrics_lines(ctx: &RunContext) -> Vec<serde_json::Value> {
    std::fs::read_to_string(ctx.run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The newest committed checkpoint's controller state.
fn latest_state(ctx: &RunContext) -> Option<ControllerState> {
    let r = rlhf_ckpt::latest_valid(&ctx.run_dir).unwrap()?;
    Some(ControllerState::read(&r.checkpoint.dir).unwrap())
}

fn count(world: &World, call: &str) -> usize {
    let calls = world.calls.lock().unwrap();
    calls.iter().filter(|c| *c == call).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_run_every_phase_and_end_in_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(
        tmp.path(),
        &[
            "algorithm.name=ppo",
            "algorithm.kl.coef=0.01",
            "logging.samples_every=2",
        ],
    );
    let world = Arc::new(World::default());
    let step_loop = StepLoop::start(&ctx, roles(&world, 1, 0)).await.unwrap();
    step_loop.run(never_stop()).await.unwrap();

    let lines = metrics_lines(&ctx);
    assert_eq!(lines.len(), 3);
    let first = &lines[0];
    assert_eq!(first["step"], 1);
    for key in [
        "reward_mean",
        "kl_mean",
        "kl_coef",
        "advantage_mean",
        "actor/loss",
        "critic/loss",
        "tokens_per_s",
        "time/step_s",
        "time/controller_compute_s",
    ] {
        assert!(first[key].is_number(), "{key} missing from {first}");
    }
    // 8 rows in minibatches of 4, one epoch: 2 TrainSteps per trainable role per step; the
    // rows metric adds up over the minibatches' mean.
    assert_eq!(count(&world, "actor0:TrainStep"), 6);
    assert_eq!(count(&world, "critic:TrainStep"), 6);
    assert_eq!(first["actor/rows"], 4.0);
    assert_eq!(count(&world, "reference:LogProbs"), 3);
    let state = latest_state(&ctx).expect("the last step is checkpointed");
    assert_eq!((state.step, state.samples, state.cursor.pos), (3, 24, 12));
    // Step 2 is the one sampled step: 2 prompts (logging.samples_prompts) with 2 completions.
    let samples: Vec<serde_json::Value> =
        std::fs::read_to_string(ctx.run_dir.join("samples.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(
        samples.len(),
        2,
        "samples_every={}",
        ctx.config().logging.samples_every
    );
    for s in &samples {
        assert_eq!(s["step"], 2);
        assert!(
            s["prompt"][0]["content"].as_str().unwrap().ends_with("+1="),
            "{s}"
        );
        assert!(s["answer"].is_string());
        let completions = s["completions"].as_array().unwrap();
        assert_eq!(completions.len(), 2);
        for c in completions {
            assert!(c["text"].is_string() && c["score"].is_number(), "{c}");
            assert_eq!(c["finished"], true);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_while_a_batch_is_sampled_ahead_records_the_cursor_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(
        tmp.path(),
        &[
            "algorithm.name=grpo",
            "rollout.async_generation=true",
            "rollout.shuffle=false",
            "train.steps=5",
            "checkpoint.every=0",
            "checkpoint.every_minutes=1.0e-9",
        ],
    );
    let world = Arc::new(World::default());
    let mut l = StepLoop::start(&ctx, roles(&world, 1, 1)).await.unwrap();
    l.step().await.unwrap();
    // Step 1 sampled step 2's batch ahead: the loop's cursor is past it, the checkpoint's not.
    assert!(l.prefetch.is_some());
    assert_eq!(l.state.cursor.pos, 8);
    let saved = latest_state(&ctx).unwrap();
    assert_eq!((saved.step, saved.cursor.pos), (1, 4));
    // Step 2 trains on the prefetched batch without sampling again.
    let generated = count(&world, "gen0:Generate");
    let g = l.rollout(2).await.unwrap();
    assert!(g.off_policy);
    assert_eq!(g.batch, (4..8).collect::<Vec<_>>());
    l.prefetch
        .as_mut()
        .expect("step 3's batch")
        .finish()
        .await
        .unwrap();
    assert_eq!(
        count(&world, "gen0:Generate"),
        generated + 1,
        "only step 3's batch is sampled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_request_mid_step_finishes_the_step_checkpoints_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(
        tmp.path(),
        &[
            "algorithm.name=grpo",
            "rollout.async_generation=true",
            "train.steps=5",
        ],
    );
    let world = Arc::new(World::default());
    let (tx, rx) = watch::channel(None);
    *world.stop_on_generate.lock().unwrap() = Some(tx);
    *world.generate_delay.lock().unwrap() = Duration::from_millis(20);
    let l = StepLoop::start(&ctx, roles(&world, 1, 1)).await.unwrap();
    let err = l.run(rx).await.unwrap_err();
    let p = err.downcast_ref::<Preempted>().expect("a Preempted stop");
    assert_eq!(p.step, 1);
    assert!(p.reason.contains("SIGTERM"), "{}", p.reason);
    assert_eq!(metrics_lines(&ctx).len(), 1);
    // The batch sampled ahead for step 2 is dropped: the checkpoint points before it.
    let saved = latest_state(&ctx).unwrap();
    assert_eq!((saved.step, saved.cursor.pos), (1, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_failing_in_any_phase_stops_the_run_naming_it() {
    let phases = [
        ("gen0", "Generate"),
        ("reward", "Score"),
        ("reference", "LogProbs"),
        ("critic", "Values"),
        ("actor1", "TrainStep"),
        ("critic", "TrainStep"),
        ("gen0", "SyncWeights"),
        ("actor1", "WeightsDigest"),
        ("actor0", "SaveState"),
    ];
    for (worker, op) in phases {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = context(tmp.path(), &["algorithm.name=ppo", "train.steps=1"]);
        let world = Arc::new(World::default());
        let result = match StepLoop::start(&ctx, roles(&world, 2, 1)).await {
            Ok(l) => {
                *world.fail.lock().unwrap() = Some((worker.to_string(), op));
                l.run(never_stop()).await
            }
            Err(e) => Err(e),
        };
        let e = format!("{:#}", result.expect_err(op));
        assert!(
            e.contains(&format!("worker `{worker}`")) && e.contains(op),
            "{op}: {e}"
        );
        // Nothing half-written: no checkpoint is committed when the step failed.
        assert!(
            latest_state(&ctx).is_none(),
            "{op}: a checkpoint was committed"
        );
        if op == "SaveState" {
            assert!(
                e.contains("the previous checkpoint, if any, is intact"),
                "{e}"
            );
            assert_eq!(metrics_lines(&ctx).len(), 1, "the step itself finished");
        } else {
            assert!(
                metrics_lines(&ctx).is_empty(),
                "{op}: the failed step was recorded"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reward_checkpoints_the_finished_steps_before_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(
        tmp.path(),
        &[
            "algorithm.name=grpo",
            "rollout.async_generation=true",
            "rollout.shuffle=false",
            "train.steps=5",
            "checkpoint.every=0",
        ],
    );
    let world = Arc::new(World::default());
    let mut l = StepLoop::start(&ctx, roles(&world, 1, 1)).await.unwrap();
    l.step().await.unwrap();
    l.step().await.unwrap();
    assert!(latest_state(&ctx).is_none(), "no checkpoint is scheduled");
    // Step 3's batch was sampled ahead during step 2, and step 3 samples step 4's.
    *world.fail.lock().unwrap() = Some(("reward".into(), "Score"));
    let e = format!("{:#}", l.step().await.unwrap_err());
    assert!(
        e.contains("step 3: scoring failed; step 2 is checkpointed")
            && e.contains("reward `exact_match`")
            && e.contains("worker `reward`"),
        "{e}"
    );
    // The checkpoint is the state after step 2: its cursor points at step 3's batch, which a
    // relaunch samples again; nothing of step 3 was recorded.
    let saved = latest_state(&ctx).unwrap();
    assert_eq!((saved.step, saved.cursor.pos), (2, 8));
    assert_eq!(metrics_lines(&ctx).len(), 2);
    assert!(l.prefetch.is_none(), "step 4's sampling is dropped");

    // Failing again right after resuming from that checkpoint writes nothing new.
    let e = format!("{:#}", l.step().await.unwrap_err());
    assert!(e.contains("the checkpoint of step 2 is the latest"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_0_baseline_of_a_launch_stopped_before_step_1_is_kept_not_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let mt = tmp.path().join("mt_bench");
    std::fs::create_dir_all(&mt).unwrap();
    rlhf_eval::fixture::write_mt_bench_fixture(&mt).unwrap();
    let bench = format!("validation.mt_bench={}", mt.display());
    let sets = [
        "validation.every=100",
        "validation.at_start=true",
        bench.as_str(),
        "validation.max_questions=1",
        "validation.max_new_tokens=2",
        // Nothing listens there: the judge fails, which validation logs and scores as missing.
        "validation.judge=http",
        "validation.http.url=http://127.0.0.1:9/v1",
        "validation.http.api_key_env=\"\"",
    ];
    let stopped = || {
        let (tx, rx) = watch::channel(Some("SIGTERM".to_string()));
        std::mem::forget(tx);
        rx
    };
    let ctx = context(tmp.path(), &sets);
    let world = Arc::new(World::default());
    let l = StepLoop::start(&ctx, roles(&world, 1, 0)).await.unwrap();
    let e = l.run(stopped()).await.unwrap_err();
    assert_eq!(e.downcast_ref::<Preempted>().expect("preempted").step, 0);
    let lines = metrics_lines(&ctx);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["step"], 0);
    let answered = count(&world, "actor0:Generate");
    assert!(answered > 0, "the baseline answers the questions");
    assert!(latest_state(&ctx).is_none());

    // The next launch keeps that baseline: no second step-0 line, no questions answered again.
    let l = StepLoop::start(&ctx, roles(&world, 1, 0)).await.unwrap();
    l.run(stopped()).await.unwrap_err();
    assert_eq!(metrics_lines(&ctx).len(), 1);
    assert_eq!(count(&world, "actor0:Generate"), answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_reward_sources_are_weighted_and_logged_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(tmp.path(), &["algorithm.name=grpo", "train.steps=1"]);
    let world = Arc::new(World::default());
    let mut r = roles(&world, 1, 0);
    r.rewards = vec![
        RewardRole {
            name: "correct".into(),
            weight: 2.0,
            is_model: false,
            role: Fake::new(&world, "reward", "reward/correct"),
        },
        RewardRole {
            name: "style".into(),
            weight: -1.0,
            is_model: false,
            role: Fake::new(&world, "reward", "reward/style"),
        },
    ];
    StepLoop::start(&ctx, r)
        .await
        .unwrap()
        .run(never_stop())
        .await
        .unwrap();
    assert_eq!(count(&world, "reward:Score"), 2);
    let m = &metrics_lines(&ctx)[0];
    // Each fake scores row i as i % 3; 4 prompts x 2 samples; the sum 2x - x is x.
    let mean = (0..8).map(|i| (i % 3) as f64).sum::<f64>() / 8.0;
    for k in ["attribute/correct", "attribute/style"] {
        assert!((m[k].as_f64().unwrap() - mean).abs() < 1e-6, "{k}: {m}");
    }
    assert!(
        (m["score_mean"].as_f64().unwrap() - mean).abs() < 1e-6,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_drift_apart_stop_the_run_naming_the_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = context(
        tmp.path(),
        &["algorithm.name=ppo", "train.replica_check_every=1"],
    );
    let world = Arc::new(World::default());
    *world.drifts.lock().unwrap() = Some("actor1".into());
    // Equal at the start (checked before the first step) ...
    let l = StepLoop::start(&ctx, roles(&world, 2, 0)).await.unwrap();
    assert_eq!(count(&world, "actor1:WeightsDigest"), 1);
    // ... different after step 1's update.
    let e = format!("{:#}", l.run(never_stop()).await.unwrap_err());
    assert!(
        e.contains("replica check after step 1") && e.contains("worker `actor1`"),
        "{e}"
    );
    assert!(latest_state(&ctx).is_none());
}

#[test]
fn metrics_keys_are_the_documented_ones() {
    let m = StepMetrics {
        step: 7,
        attributes: Prefixed {
            prefix: "attribute/",
            values: BTreeMap::from([("helpfulness".to_string(), 3.5)]),
        },
        train: BTreeMap::from([("actor/pg_loss".to_string(), 0.25)]),
        sync_bytes: Some(10.0),
        validation: Some(ValidationMetrics {
            mt_bench: f64::NAN,
            per_category: Prefixed {
                prefix: "validation/",
                values: BTreeMap::from([("writing".to_string(), 6.0)]),
            },
            missing: Some(2.0),
            truncated_prompts: None,
            secs: 1.0,
        }),
        ..Default::default()
    };
    let v = serde_json::to_value(&m).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    for k in [
        "step",
        "reward_mean",
        "attribute/helpfulness",
        "actor/pg_loss",
        "time/step_s",
        "sync/bytes",
        "validation/mt_bench",
        "validation/writing",
        "validation/missing",
        "time/validation_s",
    ] {
        assert!(keys.contains(&k), "{k} not in {keys:?}");
    }
    for absent in [
        "rollout/off_policy",
        "replicas/checked",
        "validation/truncated_prompts",
    ] {
        assert!(
            !keys.contains(&absent),
            "{absent} written though it does not apply"
        );
    }
    // JSON has no NaN: a missing score is null and the line still parses.
    assert!(v["validation/mt_bench"].is_null());
}
