//! `rlhf-coord launch FILE.yaml`: load and check everything that can be checked up front
//! (config, models, prompts, the worker binary), start the coordinator service and the worker
//! daemons, create the role instances per the placement, and run the training loop of
//! shared/DESIGN.md until `train.steps`, a worker failure, or a signal. Whatever happens, the
//! workers are told to stop and reaped before this returns.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rlhf_algo::shuffled_indices;
use rlhf_config::{EnvSource, LauncherKind, LoadedConfig, RewardKind, Role, RunConfig};
use rlhf_model::Tokenizer;
use rlhf_proto::auth::RunToken;
use rlhf_proto::pb;
use rlhf_proto::settings::optimizer_settings;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::checkpoint::{self, ControllerState};
use crate::cluster::{self, Registry, WorkerFailure};
use crate::launcher;
use crate::metrics::{MetricsWriter, Progress};
use crate::prompts::{self, PromptCursor, PromptOptions, PromptSet};
use crate::replicas;
use crate::rl::{self, AlgoSettings, Shaper};
use crate::slurm;
use crate::validation::Validator;
use crate::workers::{self, RoleClient};

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    /// The run file (YAML).
    pub file: PathBuf,
    /// Override a config value: `--set train.steps=10` (repeatable; highest precedence).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// With `launcher.kind: slurm` outside an allocation: print the sbatch script instead of
    /// submitting it.
    #[arg(long)]
    pub dry_run: bool,
}

/// Everything prepared before any process starts.
struct Prepared {
    loaded: LoadedConfig,
    run_dir: PathBuf,
    settings: AlgoSettings,
    prompts: PromptSet,
    tokenizer: Tokenizer,
    worker_bin: PathBuf,
    /// The checkpoint this launch continues from, if the run directory has a valid one.
    resume: Option<ResumePoint>,
    /// When the process started (for `checkpoint.must_save_by`).
    started: Instant,
    /// MT-Bench validation, when `validation.every` > 0.
    validator: Option<Validator>,
    /// This launch's hold on the run directory (released when the process ends, however).
    lock: Option<rlhf_ckpt::RunLock>,
}

/// A verified checkpoint and the controller state in it.
struct ResumePoint {
    dir: PathBuf,
    state: ControllerState,
}

/// Exit code of a run stopped by SIGTERM/SIGUSR1/SIGINT or `checkpoint.must_save_by` after
/// writing its checkpoint (EX_TEMPFAIL: relaunch to continue).
pub const EXIT_PREEMPTED: u8 = 75;
/// Exit code when a second signal forced the exit without a checkpoint.
pub const EXIT_FORCED: i32 = 76;

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

/// The newest valid checkpoint of `run_dir`, checked against `cfg`.
fn find_resume(run_dir: &Path, cfg: &RunConfig) -> Result<Option<ResumePoint>> {
    let Some(r) = rlhf_ckpt::latest_valid(run_dir)
        .with_context(|| format!("looking for checkpoints in {}", run_dir.display()))?
    else {
        return Ok(None);
    };
    for bad in &r.rejected {
        warn!(checkpoint = %bad.dir.display(), reason = %bad.reason, "checkpoint is not usable; falling back to an older one");
    }
    let dir = r.checkpoint.dir.clone();
    let state = ControllerState::read(&dir)?;
    let other = checkpoint::check_resume(&dir, &state.config, cfg)?;
    for (k, then, now) in other {
        info!(key = %k, checkpoint = %then, now = %now, "config differs from the checkpoint's (allowed)");
    }
    info!(
        step = state.step,
        checkpoint = %dir.display(),
        "resuming from {r}"
    );
    Ok(Some(ResumePoint { dir, state }))
}

fn prepare(args: &LaunchArgs, started: Instant) -> Result<Prepared> {
    let loaded = rlhf_config::load(&args.file, &args.set, EnvSource::Process)?;
    let cfg = &loaded.config;
    let settings = AlgoSettings::from_config(cfg)?;
    crate::limits::check_message_sizes(&loaded)?;
    let tokenizer = Tokenizer::from_dir(&cfg.models.policy).with_context(|| {
        format!(
            "models.policy: loading the tokenizer of {}",
            cfg.models.policy.display()
        )
    })?;
    let prompts = prompts::load(
        &cfg.rollout.prompts,
        &PromptOptions {
            tokenizer: &tokenizer,
            chat_template: cfg.rollout.chat_template,
            max_prompt_tokens: cfg.rollout.max_prompt_tokens,
            need_answer: cfg.models.reward.kind == RewardKind::ExactMatch,
        },
    )?;
    if prompts.rows.len() < cfg.rollout.batch_size {
        return Err(loaded
            .error_at(
                "rollout.batch_size",
                format!(
                    "{} prompts per step but {} has only {} prompts",
                    cfg.rollout.batch_size,
                    prompts.file.display(),
                    prompts.rows.len()
                ),
            )
            .into());
    }
    let worker_bin = launcher::worker_binary(cfg)?;
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
    // Before anything in the run directory is read or written: a second launch would delete
    // the first one's checkpoints and truncate its metrics.
    let lock = rlhf_ckpt::RunLock::acquire(&run_dir, &rlhf_comm::net::host_name())?;
    let resume = find_resume(&run_dir, cfg)?;
    let validator = Validator::new(cfg)?;
    let yaml = loaded.to_yaml()?;
    let resolved = run_dir.join("config.resolved.yaml");
    rlhf_ckpt::write_atomic(&resolved, yaml.as_bytes())?;
    Ok(Prepared {
        loaded,
        run_dir,
        settings,
        prompts,
        tokenizer,
        worker_bin,
        resume,
        started,
        validator,
        lock: Some(lock),
    })
}

/// Runs `launch`; returns when the run ends.
pub fn run(args: LaunchArgs) -> Result<()> {
    let started = Instant::now();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(launch(args, started))
}

async fn launch(args: LaunchArgs, started: Instant) -> Result<()> {
    // Listening before anything slow: a signal while checkpoints are hashed, models load or
    // workers register is honoured at the first step boundary, never fatal.
    let pids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (stop_request, stop_sig) = watch::channel(None);
    listen_for_signals(pids.clone(), stop_request.clone())?;
    let mut p = tokio::task::block_in_place(|| prepare(&args, started))?;
    // Held to the end of this function, past the requeue decision (it writes into the run
    // directory); the kernel releases it when this process ends, so a requeued job retakes it.
    let lock = p.lock.take();
    info!(run_dir = %p.run_dir.display(), "run directory ready");
    let cfg = p.loaded.config.clone();
    if cfg.launcher.kind == LauncherKind::Slurm && !slurm::in_allocation() {
        // The job takes the lock itself when it starts, which may be before this exits.
        drop(lock);
        return submit_to_slurm(&args, &p);
    }
    if args.dry_run {
        bail!("--dry-run prints the sbatch script of launcher.kind: slurm outside a Slurm job; this launch would run locally");
    }
    let allocation = if cfg.launcher.kind == LauncherKind::Slurm {
        let a = slurm::allocation()?;
        a.check_devices(&cfg)?;
        info!(job = %a.job_id, nodes = ?a.nodes, restarts = a.restarts, gpus_per_node = ?a.gpus_per_node, "inside Slurm job");
        Some(a)
    } else {
        None
    };
    let resumed_from = p.resume.as_ref().map(|r| r.state.step);
    let run_dir = p.run_dir.clone();
    let early_signal = stop_sig.borrow().clone();
    let result = match early_signal {
        Some(sig) => Err(Preempted {
            step: resumed_from.unwrap_or(0),
            reason: format!("{sig} received before the workers started"),
        }
        .into()),
        None => run_async(p, allocation.as_ref(), pids, (stop_request, stop_sig)).await,
    };
    let Some(a) = allocation else {
        drop(lock);
        return result;
    };
    if let Some(why) = requeue_reason(&result) {
        let requeue = slurm::Requeue {
            run_dir: &run_dir,
            resumed_from,
            max_restarts: cfg.launcher.slurm.max_restarts,
        };
        if let Err(e) = tokio::task::block_in_place(|| requeue.run(&a, &why)) {
            warn!(error = %format!("{e:#}"), "the job could not requeue itself");
        }
    }
    drop(lock);
    result
}

/// Why a Slurm job should come back by requeue and resume from its newest checkpoint: it was
/// stopped early (a preemption, the time limit's warning, a signal, `must_save_by`) or lost a
/// worker's node. None for a finished run or any other failure.
fn requeue_reason(result: &Result<()>) -> Option<String> {
    let e = result.as_ref().err()?;
    if let Some(p) = e.downcast_ref::<Preempted>() {
        return Some(p.reason.clone());
    }
    lost_worker(result).map(|w| format!("worker `{w}` lost"))
}

/// The worker whose node the heartbeats declared lost, when that stopped the run.
fn lost_worker(result: &Result<()>) -> Option<&str> {
    let s = result
        .as_ref()
        .err()?
        .downcast_ref::<cluster::StoppedByWorker>()?;
    s.failure.lost.then_some(s.failure.worker.as_str())
}

/// Outside an allocation: write the sbatch script into the run directory and submit it (or
/// print it with `--dry-run`).
fn submit_to_slurm(args: &LaunchArgs, p: &Prepared) -> Result<()> {
    let cfg = &p.loaded.config;
    let file = std::path::absolute(&args.file)
        .with_context(|| format!("resolving {}", args.file.display()))?;
    let me = std::env::current_exe().context("locating the rlhf-coord executable")?;
    let script = slurm::sbatch_script(cfg, &me, &file, &args.set, &p.run_dir);
    if args.dry_run {
        print!("{script}");
        return Ok(());
    }
    let (id, path) = slurm::submit(&script, &p.run_dir)?;
    println!("submitted job {id}; run directory {}", p.run_dir.display());
    info!(job = %id, script = %path.display(), "submitted to Slurm");
    Ok(())
}

/// The role clients of a run.
struct Roles {
    /// Data-parallel replicas of the actor (at least one); replica 0 saves checkpoints, answers
    /// MT-Bench and is the root of the weight sync.
    actors: Vec<RoleClient>,
    /// Replicas of the critic; empty when the algorithm uses none.
    critics: Vec<RoleClient>,
    /// Generation-only copies of the policy; empty = the actors generate.
    generators: Vec<RoleClient>,
    reward: RoleClient,
    reference: Reference,
}

/// Where the reference log-probs come from.
enum Reference {
    /// The algorithm needs none (no KL against a reference).
    None,
    /// A reference role of its own (another model directory, or full fine-tuning). Boxed: a
    /// client is large next to the other variants (clippy::large_enum_variant).
    Role(Box<RoleClient>),
    /// The actor replicas with their LoRA adapters off: the reference is the policy's frozen
    /// base, which the actor already holds (`ModelsConfig::reference_is_actor_base`).
    ActorBase,
}

impl Reference {
    fn describe(&self) -> &'static str {
        match self {
            Reference::None => "none",
            Reference::Role(_) => "own role",
            Reference::ActorBase => "actor with adapters off",
        }
    }
}

impl Roles {
    fn actor(&self) -> &RoleClient {
        &self.actors[0]
    }

    fn critic(&self) -> Option<&RoleClient> {
        self.critics.first()
    }

    /// Who samples rollouts: the generators, or the actor replicas when there are none.
    fn generation(&self) -> &[RoleClient] {
        if self.generators.is_empty() {
            &self.actors
        } else {
            &self.generators
        }
    }
}

/// Listens for SIGTERM, SIGUSR1 (Slurm's warning) and SIGINT. The first sets the returned
/// watch to the signal's name: the loop finishes its step, writes a checkpoint and stops. A
/// second SIGINT (Ctrl-C again) kills the workers and exits at once with [`EXIT_FORCED`]. More
/// SIGTERMs and SIGUSR1s change nothing: Slurm delivers them more than once (to the batch
/// shell and to every process of the step; again at the time limit), and its SIGKILL after the
/// grace time is the hard stop.
fn listen_for_signals(
    pids: Arc<std::sync::Mutex<Vec<u32>>>,
    tx: watch::Sender<Option<String>>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        let mut interrupts = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = usr1.recv() => "SIGUSR1",
                _ = int.recv() => { interrupts += 1; "SIGINT" }
            };
            let first = tx.borrow().is_none();
            if first {
                warn!(signal = name, "finishing the current step, then writing a checkpoint and stopping (Ctrl-C again to exit at once)");
                let _ = tx.send(Some(name.to_string()));
            } else if name == "SIGINT" && interrupts >= 2 {
                warn!(
                    signal = name,
                    "second signal: killing the workers and exiting without a checkpoint"
                );
                for pid in pids.lock().map(|v| v.clone()).unwrap_or_default() {
                    launcher::kill_hard(pid);
                }
                std::process::exit(EXIT_FORCED);
            } else {
                info!(signal = name, "already stopping after the current step");
            }
        }
    });
    Ok(())
}

async fn run_async(
    p: Prepared,
    allocation: Option<&slurm::Allocation>,
    pids: Arc<std::sync::Mutex<Vec<u32>>>,
    (stop_request, stop_sig): (
        watch::Sender<Option<String>>,
        watch::Receiver<Option<String>>,
    ),
) -> Result<()> {
    let cfg = p.loaded.config.clone();
    let token = RunToken::generate().context("reading random bytes for the run token")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let expected: BTreeMap<String, Vec<String>> = cfg
        .workers
        .iter()
        .map(|w| {
            (
                w.name.clone(),
                w.roles.iter().map(|r| r.as_str().to_string()).collect(),
            )
        })
        .collect();
    let registry = Registry::new(
        &cfg.run.name,
        expected,
        Duration::from_millis(cfg.launcher.heartbeat_interval_ms),
        stop_rx.clone(),
        stop_request,
    );
    // The same choice of address as every worker makes (rlhf_comm::net): the interface's
    // address, the bound one, or this host's name when bound to every interface. It is also
    // published in the run directory.
    let listen = rlhf_comm::net::choose(cfg.launcher.bind, cfg.launcher.interface.as_deref())?;
    let tls = crate::tls::for_run(&cfg, &p.run_dir, listen.bind)?;
    let addr = cluster::serve(
        SocketAddr::new(listen.bind, cfg.launcher.port),
        registry.clone(),
        token.clone(),
        tls.as_ref(),
        stop_rx.clone(),
    )
    .await?;
    let advertised = listen.advertise(addr.port());
    info!(%addr, %advertised, "coordinator listening");
    rlhf_ckpt::write_atomic(
        &p.run_dir.join("coordinator.addr"),
        format!("{advertised}\n").as_bytes(),
    )?;
    let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<WorkerFailure>();
    let creds = workers::Credentials {
        token: token.clone(),
        tls: tls.clone(),
    };
    let children = launcher::spawn_all(
        &cfg,
        &p.worker_bin,
        &advertised,
        &token,
        tls.as_ref(),
        &p.run_dir,
        allocation,
    )?;
    if let Ok(mut v) = pids.lock() {
        v.extend(children.iter().filter_map(|c| c.child.id()));
    }
    let child_pids: Vec<(String, u32)> = children
        .iter()
        .filter_map(|c| Some((c.name.clone(), c.child.id()?)))
        .collect();
    let reg = registry.clone();
    let reaper = launcher::watch_children(
        children,
        move |w| reg.roles_of(w),
        fail_tx.clone(),
        stop_rx.clone(),
    );

    let result = async {
        let startup = Duration::from_secs_f64(cfg.launcher.startup_timeout_s);
        tokio::select! {
            r = registry.wait_all(startup) => r?,
            Some(f) = fail_rx.recv() => bail!("start-up failed: {f}"),
        }
        let hb = cluster::watch_heartbeats(
            registry.clone(),
            Duration::from_millis(cfg.launcher.heartbeat_timeout_ms),
            fail_tx.clone(),
        );
        let r = tokio::select! {
            r = train(&p, &registry, &creds, stop_sig.clone()) => r,
            Some(f) = fail_rx.recv() => Err(cluster::StoppedByWorker { failure: f, call: None }.into()),
        };
        // A call that failed because its worker died usually returns before the process watch
        // reports the death; the death (with its node and log tail) is the better message.
        let r = match r {
            Err(e) if e.downcast_ref::<Preempted>().is_none() => {
                let wait = Duration::from_secs(2);
                match tokio::time::timeout(wait, fail_rx.recv()).await {
                    Ok(Some(f)) => Err(cluster::StoppedByWorker {
                        failure: f,
                        call: Some(format!("{e:#}")),
                    }
                    .into()),
                    _ => Err(e),
                }
            }
            other => other,
        };
        hb.abort();
        r
    }
    .await;

    // Tear down: heartbeats now answer "shutdown", the workers are asked to stop (all at once),
    // and the reaper waits for (or kills) every child. A lost worker's node is unreachable:
    // asking it would only wait out the connect timeout and its process here (srun) would not
    // exit, so it is killed at once. Under Slurm the requeue comes after this, and it has to
    // come before slurmctld declares the node down and cancels the job (SlurmdTimeout).
    let _ = stop_tx.send(true);
    let lost = lost_worker(&result);
    for (name, pid) in &child_pids {
        if lost == Some(name.as_str()) {
            launcher::kill_hard(*pid);
        }
    }
    let creds = &creds;
    let asks = cfg
        .workers
        .iter()
        .filter(|w| lost != Some(w.name.as_str()))
        .filter_map(|w| registry.get(&w.name))
        .map(|info| async move {
            if let Ok(c) = workers::connect(&info.address, creds).await {
                workers::shutdown(c).await;
            }
        });
    futures::future::join_all(asks).await;
    if tokio::time::timeout(Duration::from_secs(15), reaper)
        .await
        .is_err()
    {
        warn!("workers did not stop within 15 s");
    }
    result
}

fn dtype_name(d: rlhf_config::Dtype) -> &'static str {
    match d {
        rlhf_config::Dtype::F32 => "f32",
        rlhf_config::Dtype::Bf16 => "bf16",
        rlhf_config::Dtype::F16 => "f16",
    }
}

async fn create_roles(
    p: &Prepared,
    registry: &Registry,
    creds: &workers::Credentials,
) -> Result<Roles> {
    let cfg = &p.loaded.config;
    let s = &p.settings;
    let timeout = Duration::from_secs_f64(cfg.launcher.rpc_timeout_s);
    // Every instance of each role, in the order `workers:` lists them.
    let mut clients: BTreeMap<Role, Vec<(RoleClient, String)>> = BTreeMap::new();
    for w in &cfg.workers {
        let info = registry
            .get(&w.name)
            .ok_or_else(|| anyhow!("worker `{}` is not registered", w.name))?;
        info!(
            worker = %info.name,
            host = %info.host,
            pid = info.pid,
            devices = ?info.devices,
            roles = ?w.roles,
            "placing roles"
        );
        let conn = workers::connect(&info.address, creds)
            .await
            .with_context(|| format!("worker `{}`", w.name))?;
        for role in &w.roles {
            let c = RoleClient::new(
                &w.name,
                &info.host,
                role.as_str(),
                &w.device.to_string(),
                conn.clone(),
                timeout,
            );
            clients
                .entry(*role)
                .or_default()
                .push((c, w.device.to_string()));
        }
    }
    let dtype = dtype_name(cfg.models.dtype).to_string();
    let seed = cfg.run.seed;
    let use_reference = s.kl.coef > 0.0 || s.kl.target.is_some();
    // LoRA on the policy's own directory: the reference is the actor's base, no second copy.
    let reference_is_actor = use_reference && cfg.models.reference_is_actor_base();
    let lora_spec = || {
        cfg.models.lora.as_ref().map(|l| pb::LoraSpec {
            rank: l.rank as u32,
            alpha: l.alpha,
            dropout: l.dropout,
            targets: l.targets.clone(),
        })
    };
    let trainer = |loss: pb::trainer_spec::Loss,
                   optim: &rlhf_algo::OptimizerConfig,
                   actor: bool|
     -> Result<pb::TrainerSpec> {
        Ok(pb::TrainerSpec {
            loss: Some(loss),
            optimizer: Some(optimizer_settings(optim, s.optimizer_steps)),
            kl_loss: s.kl_loss_term().filter(|_| actor).map(Into::into),
            micro_batch_size: cfg.train.micro_batch_size as i64,
            gradient_checkpointing: cfg.train.gradient_checkpointing,
            temperature: cfg.rollout.temperature,
            pure_low_precision: cfg.train.pure_low_precision,
            zero_stage: cfg.train.zero_stage,
            // Adapters on the actor only; the critic trains its whole trunk.
            lora: lora_spec().filter(|_| actor),
        })
    };
    let all = |r: Role| -> Result<Vec<(RoleClient, String)>> {
        match clients.get(&r) {
            Some(v) if !v.is_empty() => Ok(v.clone()),
            _ => Err(anyhow!(
                "role {r} is not placed on any worker (workers[].roles)"
            )),
        }
    };
    let get = |r: Role| -> Result<(RoleClient, String)> { Ok(all(r)?.swap_remove(0)) };
    let path = |p: &Path| p.to_string_lossy().into_owned();

    let actors = all(Role::Actor)?;
    let actor_req = pb::CreateRoleRequest {
        role_id: String::new(),
        kind: pb::RoleKind::Actor as i32,
        model_path: path(&cfg.models.policy),
        device: String::new(),
        dtype: dtype.clone(),
        seed,
        spec: Some(pb::create_role_request::Spec::Actor(trainer(
            pb::trainer_spec::Loss::PolicyLoss((&s.policy_loss).into()),
            &s.actor_optim,
            true,
        )?)),
    };
    let (reward, reward_dev) = get(Role::Reward)?;
    let r = &cfg.models.reward;
    let reward_spec = match r.kind {
        RewardKind::Model => pb::reward_role_spec::Kind::Model(pb::ModelReward {
            attribute_weights: cfg
                .algorithm
                .reward
                .attribute_weights
                .clone()
                .into_iter()
                .collect(),
            mean: cfg.algorithm.reward.mean,
            std: cfg.algorithm.reward.std,
        }),
        RewardKind::ExactMatch => pb::reward_role_spec::Kind::ExactMatch(pb::ExactMatchReward {
            extract: match r.extract {
                rlhf_config::AnswerExtract::LastNumber => "last_number",
                rlhf_config::AnswerExtract::AfterMarker => "after_marker",
                rlhf_config::AnswerExtract::Full => "full",
            }
            .into(),
            marker: r.marker.clone(),
            correct: r.correct,
            incorrect: r.incorrect,
        }),
    };
    let reward_req = pb::CreateRoleRequest {
        role_id: String::new(),
        kind: pb::RoleKind::Reward as i32,
        model_path: r.path.as_deref().map(path).unwrap_or_default(),
        device: reward_dev,
        dtype: dtype.clone(),
        seed,
        spec: Some(pb::create_role_request::Spec::Reward(pb::RewardRoleSpec {
            kind: Some(reward_spec),
        })),
    };
    let generators = clients.get(&Role::Generator).cloned().unwrap_or_default();
    let generator_req = pb::CreateRoleRequest {
        role_id: String::new(),
        kind: pb::RoleKind::Generator as i32,
        model_path: path(&cfg.models.policy),
        device: String::new(),
        dtype: dtype.clone(),
        seed,
        // With LoRA the generators hold the base plus adapters like the actor's, so the weight
        // sync moves only the adapters.
        spec: Some(pb::create_role_request::Spec::Generator(
            pb::GeneratorSpec { lora: lora_spec() },
        )),
    };
    let critic = if s.uses_critic {
        let critics = all(Role::Critic)?;
        let req = pb::CreateRoleRequest {
            role_id: String::new(),
            kind: pb::RoleKind::Critic as i32,
            model_path: path(cfg.models.critic_dir()),
            device: String::new(),
            dtype: dtype.clone(),
            seed: seed.wrapping_add(1),
            spec: Some(pb::create_role_request::Spec::Critic(trainer(
                pb::trainer_spec::Loss::ValueLoss((&s.value_loss).into()),
                &s.critic_optim,
                false,
            )?)),
        };
        Some((critics, req))
    } else {
        if clients.contains_key(&Role::Critic) {
            info!(
                "algorithm {} needs no critic; the placed critic role stays idle",
                cfg.algorithm.name.as_str()
            );
        }
        None
    };
    if reference_is_actor && clients.contains_key(&Role::Reference) {
        info!(
            "the reference is the actor's base model with its LoRA adapters off; the placed \
             reference role stays idle"
        );
    }
    let reference = if use_reference && !reference_is_actor {
        let (c, dev) = get(Role::Reference)?;
        let req = pb::CreateRoleRequest {
            role_id: String::new(),
            kind: pb::RoleKind::Reference as i32,
            model_path: path(cfg.models.reference_dir()),
            device: dev,
            dtype,
            seed,
            spec: Some(pb::create_role_request::Spec::Reference(
                pb::ReferenceSpec {},
            )),
        };
        Some((c, req))
    } else {
        None
    };
    // Load all models in parallel; each instance gets its worker's device.
    let create_all = |members: &[(RoleClient, String)], req: &pb::CreateRoleRequest| {
        let calls: Vec<_> = members
            .iter()
            .map(|(c, dev)| {
                let req = pb::CreateRoleRequest {
                    device: dev.clone(),
                    ..req.clone()
                };
                let c = c.clone();
                async move { c.create(req).await }
            })
            .collect();
        futures::future::try_join_all(calls)
    };
    let no_critic: Vec<(RoleClient, String)> = vec![];
    let (critic_members, critic_req) = match &critic {
        Some((m, r)) => (m.as_slice(), Some(r.clone())),
        None => (no_critic.as_slice(), None),
    };
    let (a, g, rw, cr, rf) = tokio::join!(
        create_all(&actors, &actor_req),
        create_all(&generators, &generator_req),
        reward.create(reward_req),
        async {
            match &critic_req {
                Some(req) => create_all(critic_members, req).await.map(Some),
                None => Ok(None),
            }
        },
        async {
            match &reference {
                Some((c, req)) => c.create(req.clone()).await.map(Some),
                None => Ok(None),
            }
        },
    );
    let a = a?;
    g?;
    let rw = rw?;
    cr?;
    rf?;
    let reference_src = match reference {
        Some((c, _)) => Reference::Role(Box::new(c)),
        None if reference_is_actor => Reference::ActorBase,
        None => Reference::None,
    };
    info!(
        parameters = a[0].parameters,
        actor_replicas = actors.len(),
        critic_replicas = critic_members.len(),
        generators = generators.len(),
        reward_outputs = ?rw.attribute_names,
        reference = reference_src.describe(),
        "roles created"
    );
    let roles = Roles {
        actors: actors.into_iter().map(|c| c.0).collect(),
        critics: critic_members.iter().map(|c| c.0.clone()).collect(),
        generators: generators.into_iter().map(|c| c.0).collect(),
        reward,
        reference: reference_src,
    };
    form_groups(cfg, &roles).await?;
    Ok(roles)
}

/// Forms the collective groups the placement needs: gradients between actor replicas and
/// between critic replicas, weights between actor replica 0 and the generators.
async fn form_groups(cfg: &RunConfig, roles: &Roles) -> Result<()> {
    let timeout = cfg.launcher.collective_timeout_s;
    let wanted = cfg.launcher.collective_backend;
    // Group ids only have to differ between groups and from strangers' (a handshake refuses
    // another id): a fresh random base per launch.
    let base = step_seed(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()),
        1,
    );
    let mut weights = vec![roles.actor().clone()];
    weights.extend(roles.generators.iter().cloned());
    let groups = [
        (&roles.actors, pb::GroupPurpose::Gradients),
        (&roles.critics, pb::GroupPurpose::Gradients),
        (&weights, pb::GroupPurpose::Weights),
    ];
    let mut forming = vec![];
    for (i, (members, purpose)) in groups.iter().enumerate() {
        if members.len() > 1 {
            let backend = replicas::backend(members, wanted)?;
            info!(
                purpose = purpose.as_str_name(),
                backend = backend.as_str_name(),
                members = ?members.iter().map(|m| &m.worker).collect::<Vec<_>>(),
                "forming collective group"
            );
            forming.push(replicas::form_group(
                members,
                base.wrapping_add(i as u64),
                *purpose,
                backend,
                timeout,
            ));
        }
    }
    futures::future::try_join_all(forming).await?;
    Ok(())
}

/// Compares weight digests of the actor replicas, the critic replicas, and the generators
/// against actor replica 0; an error names the worker that differs.
async fn check_replicas(roles: &Roles, step: u64) -> Result<bool> {
    if roles.actors.len() < 2 && roles.critics.len() < 2 && roles.generators.is_empty() {
        return Ok(false);
    }
    let mut policy = roles.actors.clone();
    policy.extend(roles.generators.iter().cloned());
    let (a, c) = tokio::join!(
        replicas::check_digests(
            &policy,
            "the policy's copies (actor replicas and generators)",
            step
        ),
        replicas::check_digests(&roles.critics, "the critic replicas", step),
    );
    a?;
    c?;
    Ok(true)
}

/// Stops at a step boundary: writes a checkpoint unless the current step is already saved,
/// and returns [`Preempted`].
async fn stop_now(
    p: &Prepared,
    roles: &Roles,
    st: &LoopState,
    last_saved_step: Option<u64>,
    reason: String,
) -> Result<()> {
    if st.step > 0 && last_saved_step != Some(st.step) {
        warn!(step = st.step, %reason, "writing a checkpoint before stopping");
        save_checkpoint(p, roles, st, None).await?;
    }
    Err(Preempted {
        step: st.step,
        reason,
    }
    .into())
}

/// Per-step seed for sampling, derived from the run seed (splitmix64 of seed + step).
pub fn step_seed(seed: u64, step: u64) -> u64 {
    use rlhf_model::generate::{splitmix64, SPLITMIX_GAMMA};
    splitmix64(seed.wrapping_add(step.wrapping_mul(SPLITMIX_GAMMA)))
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

/// A validation's result, for the ranking.
struct Validated {
    score: Option<f64>,
    judge: String,
}

/// Writes a full checkpoint of the state after `st.step`: the trainable roles' state (written
/// by the workers into the staging directory), the controller state and the resolved config;
/// then commits it (manifest last, LATEST by rename) and applies retention.
async fn save_checkpoint(
    p: &Prepared,
    roles: &Roles,
    st: &LoopState,
    validated: Option<&Validated>,
) -> Result<PathBuf> {
    save_checkpoint_inner(p, roles, st, validated)
        .await
        .with_context(|| {
            format!(
                "writing the checkpoint of step {} failed (the previous checkpoint, if any, is intact; fix the cause and launch again to resume from it)",
                st.step
            )
        })
}

async fn save_checkpoint_inner(
    p: &Prepared,
    roles: &Roles,
    st: &LoopState,
    validated: Option<&Validated>,
) -> Result<PathBuf> {
    let cfg = &p.loaded.config;
    let t0 = Instant::now();
    let w =
        rlhf_ckpt::CheckpointWriter::begin(&p.run_dir, st.step).context("starting a checkpoint")?;
    let stage = w.dir().to_path_buf();
    let actor_dir = stage.join("actor");
    // Replicas are bitwise equal (checked every train.replica_check_every steps): replica 0
    // speaks for all of them. With sharded optimizer state (train.zero_stage >= 1) every
    // replica takes part in gathering it and replica 0 writes it.
    let speakers = |all: &[RoleClient]| -> Vec<RoleClient> {
        let n = if cfg.train.zero_stage > 0 {
            all.len()
        } else {
            1
        };
        all.iter().take(n).cloned().collect()
    };
    let (actors, critics) = (speakers(&roles.actors), speakers(&roles.critics));
    let critic_dir = stage.join("critic");
    let (a, c) = tokio::join!(
        futures::future::try_join_all(actors.iter().map(|a| a.save_state(&actor_dir))),
        futures::future::try_join_all(critics.iter().map(|c| c.save_state(&critic_dir))),
    );
    a?;
    c?;
    let worker_secs = t0.elapsed().as_secs_f64();
    w.write_json(checkpoint::CONTROLLER_FILE, &st.controller(cfg)?)?;
    w.write_file("config.resolved.yaml", p.loaded.to_yaml()?.as_bytes())?;
    let meta = serde_json::json!({
        "job": "rlhf",
        "run": cfg.run.name,
        "samples": st.samples,
        "validation_score": validated.and_then(|v| v.score),
    });
    let info = tokio::task::block_in_place(|| w.commit(meta))?;
    let bytes: u64 = info.manifest.files.iter().map(|f| f.size).sum();
    // Rank first (so the best are protected), then apply retention.
    let mut ranking = checkpoint::Ranking::read(&p.run_dir)?;
    if let Some(v) = validated {
        ranking.record(checkpoint::Ranked {
            step: st.step,
            checkpoint: rlhf_ckpt::dir_name(st.step),
            score: v.score,
            judge: v.judge.clone(),
        });
        ranking.apply_protection(&p.run_dir, cfg.checkpoint.keep_best)?;
    }
    let pruned = rlhf_ckpt::prune(&p.run_dir, cfg.checkpoint.keep_last)?;
    if validated.is_some() || !pruned.is_empty() {
        ranking.retain_existing(&p.run_dir);
        ranking.write(&p.run_dir)?;
        if let Some(best) = &ranking.best {
            info!(best = %best, "best checkpoint by MT-Bench score");
        }
    }
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

/// The Generate request for prompt rows `batch` of step `step`.
fn gen_request(p: &Prepared, batch: &[usize], step: u64) -> pb::GenerateRequest {
    let cfg = &p.loaded.config;
    pb::GenerateRequest {
        role_id: String::new(),
        prompts: batch
            .iter()
            .map(|&i| pb::PromptIds {
                ids: p.prompts.rows[i].ids.clone(),
            })
            .collect(),
        samples_per_prompt: cfg.rollout.samples_per_prompt as u32,
        max_new_tokens: cfg.rollout.max_new_tokens as u32,
        temperature: cfg.rollout.temperature,
        top_k: cfg.rollout.top_k as u32,
        top_p: cfg.rollout.top_p,
        seed: step_seed(cfg.run.seed, step),
        first_row: 0,
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

async fn train(
    p: &Prepared,
    registry: &Arc<Registry>,
    creds: &workers::Credentials,
    stop: watch::Receiver<Option<String>>,
) -> Result<()> {
    let cfg: &RunConfig = &p.loaded.config;
    let roles = create_roles(p, registry, creds).await?;
    let group = cfg.rollout.samples_per_prompt as i64;
    let mut st = LoopState {
        step: 0,
        samples: 0,
        cursor: PromptCursor::new(cfg.run.seed, cfg.rollout.shuffle),
        shaper: Shaper::new(p.settings.clone(), group)?,
        train_seconds: 0.0,
    };
    if let Some(r) = &p.resume {
        let t_load = Instant::now();
        let actor_dir = r.dir.join("actor");
        let critic_dir = r.dir.join("critic");
        let (a, c) = tokio::join!(
            futures::future::try_join_all(roles.actors.iter().map(|a| a.load_state(&actor_dir))),
            futures::future::try_join_all(roles.critics.iter().map(|c| c.load_state(&critic_dir))),
        );
        a.with_context(|| format!("restoring the actor from {}", r.dir.display()))?;
        c.with_context(|| format!("restoring the critic from {}", r.dir.display()))?;
        st.step = r.state.step;
        st.samples = r.state.samples;
        st.cursor = r.state.cursor;
        st.train_seconds = r.state.train_seconds;
        st.shaper.kl = rlhf_algo::KlController::from_state(r.state.kl.clone())?;
        st.shaper.adv = rlhf_algo::AdvantageCalculator::from_state(
            p.settings.advantage.clone(),
            r.state.baseline.clone(),
        )?;
        info!(
            step = st.step,
            secs = t_load.elapsed().as_secs_f64(),
            "state restored; continuing"
        );
    }
    if st.step >= cfg.train.steps {
        info!(
            step = st.step,
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
    // Replicas and generators must start equal (same files, or the same checkpoint loaded):
    // check before spending a step on them.
    if cfg.train.replica_check_every > 0 {
        check_replicas(&roles, st.step).await?;
    }
    let first_step = st.step + 1;
    let metrics_path = p.run_dir.join("metrics.jsonl");
    checkpoint::truncate_metrics(&metrics_path, st.step)?;
    let mut metrics = MetricsWriter::create(&metrics_path)?;
    let progress = Progress::new(cfg.train.steps, cfg.logging.progress);
    progress.resume_at(st.step);
    let kl_in_loss = p.settings.kl.mode == rlhf_algo::KlMode::Loss;
    let minibatch = cfg.minibatch_size() as i64;
    let ck = &cfg.checkpoint;
    let mut last_save = Instant::now();
    let mut last_saved_step = p.resume.as_ref().map(|r| r.state.step);
    let mut last_step_time = Duration::ZERO;
    let mut prefetch: Option<Prefetch> = None;
    while st.step < cfg.train.steps {
        // Copied out: a `borrow()` in the `if let` would hold the watch's read lock through the
        // whole checkpoint below, and a worker reporting a signal meanwhile (a writer) would
        // block on it while the heartbeat service holds the registry: a deadlock.
        let requested = stop.borrow().clone();
        if let Some(sig) = requested {
            // A prefetched batch is dropped: the checkpoint's cursor points before it.
            if let Some(pf) = prefetch.take() {
                st.cursor = pf.cursor_before;
            }
            return stop_now(p, &roles, &st, last_saved_step, format!("{sig} received")).await;
        }
        if let Some(budget) = ck.must_save_by {
            let next_end = p.started.elapsed() + last_step_time.mul_f64(1.5);
            if next_end.as_secs_f64() > budget {
                if let Some(pf) = prefetch.take() {
                    st.cursor = pf.cursor_before;
                }
                return stop_now(
                    p,
                    &roles,
                    &st,
                    last_saved_step,
                    format!("checkpoint.must_save_by = {budget} s would pass during the next step"),
                )
                .await;
            }
        }
        let step = st.step + 1;
        let t0 = Instant::now();
        let (batch, gen, off_policy) = match prefetch.take() {
            Some(pf) => {
                debug_assert_eq!(pf.step, step);
                let batch = pf.batch.clone();
                (batch, pf.wait().await?, true)
            }
            None => {
                let batch = st
                    .cursor
                    .next_batch(p.prompts.rows.len(), cfg.rollout.batch_size);
                let req = gen_request(p, &batch, step);
                let gen = replicas::generate(roles.generation(), req).await?;
                (batch, gen, false)
            }
        };
        let t_gen = t0.elapsed();
        // One-step off-policy: the generators sample the next batch while this one is scored
        // and trained, unless this step ends in a scheduled checkpoint (so that resuming from
        // it is exact) or is the last.
        let scheduled_ckpt = step == cfg.train.steps || (ck.every > 0 && step % ck.every == 0);
        if cfg.rollout.async_generation && !scheduled_ckpt {
            let cursor_before = st.cursor;
            let next = st
                .cursor
                .next_batch(p.prompts.rows.len(), cfg.rollout.batch_size);
            let req = gen_request(p, &next, step + 1);
            let gens = roles.generation().to_vec();
            prefetch = Some(Prefetch {
                step: step + 1,
                batch: next,
                cursor_before,
                task: Some(tokio::spawn(
                    async move { replicas::generate(&gens, req).await },
                )),
                done: None,
            });
        }
        let rows: Vec<&prompts::PromptRow> = batch.iter().map(|&i| &p.prompts.rows[i]).collect();

        let t1 = Instant::now();
        let texts = rl::decode_responses(&gen, &p.tokenizer)?;
        let items: Vec<pb::ScoreItem> = texts
            .into_iter()
            .enumerate()
            .map(|(i, response)| {
                let row = rows[i / group as usize];
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
                }
            })
            .collect();
        let seqs = rl::sequences(&gen)?;
        let ctl_1 = t1.elapsed();
        let t2 = Instant::now();
        let (scores, ref_lp, values) = tokio::join!(
            roles.reward.score(items),
            async {
                match &roles.reference {
                    Reference::Role(r) => r
                        .log_probs(seqs.clone(), cfg.rollout.temperature)
                        .await
                        .map(Some),
                    Reference::ActorBase => replicas::base_log_probs(
                        &roles.actors,
                        seqs.clone(),
                        cfg.rollout.temperature,
                        group as usize,
                    )
                    .await
                    .map(Some),
                    Reference::None => Ok(None),
                }
            },
            async {
                match roles.critic() {
                    Some(c) => c.values(seqs.clone()).await.map(Some),
                    None => Ok(None),
                }
            },
        );
        let (scores, ref_lp, values) = (scores?, ref_lp?, values?);
        let t_score = t2.elapsed();

        let t3 = Instant::now();
        let (rollout, stats) = st
            .shaper
            .shape(&gen, &scores, ref_lp.as_ref(), values.as_ref())?;
        let mut ctl = ctl_1 + t3.elapsed();

        let mut t_train = Duration::ZERO;
        let mut train_metrics: BTreeMap<String, f64> = BTreeMap::new();
        let mut n_mb = 0.0;
        for epoch in 0..cfg.train.epochs as u64 {
            let order = shuffled_indices(rollout.rows as usize, cfg.run.seed, step * 1000 + epoch);
            for chunk in order.chunks(minibatch as usize) {
                let tc = Instant::now();
                let a_reqs: Vec<pb::TrainStepRequest> =
                    rl::minibatch_shards(&rollout, chunk, roles.actors.len(), kl_in_loss, false)?
                        .into_iter()
                        .map(|(a, _)| a)
                        .collect();
                let c_reqs: Vec<pb::TrainStepRequest> = if roles.critics.is_empty() {
                    vec![]
                } else {
                    rl::minibatch_shards(&rollout, chunk, roles.critics.len(), false, true)?
                        .into_iter()
                        .filter_map(|(_, c)| c)
                        .collect()
                };
                ctl += tc.elapsed();
                let tt = Instant::now();
                let (a, c) = tokio::join!(
                    futures::future::try_join_all(
                        roles
                            .actors
                            .iter()
                            .zip(a_reqs)
                            .map(|(r, q)| r.train_step(q))
                    ),
                    futures::future::try_join_all(
                        roles
                            .critics
                            .iter()
                            .zip(c_reqs)
                            .map(|(r, q)| r.train_step(q))
                    ),
                );
                t_train += tt.elapsed();
                let a = replicas::combine_metrics(&a?);
                let c = c?;
                let c = (!c.is_empty()).then(|| replicas::combine_metrics(&c));
                for (k, v) in a.metrics {
                    *train_metrics.entry(format!("actor/{k}")).or_default() += v;
                }
                if let Some(c) = c {
                    for (k, v) in c.metrics {
                        *train_metrics.entry(format!("critic/{k}")).or_default() += v;
                    }
                }
                n_mb += 1.0;
            }
        }
        for v in train_metrics.values_mut() {
            *v /= n_mb;
        }
        // The generators must be idle before they take new weights.
        let tw = Instant::now();
        if let Some(pf) = prefetch.as_mut() {
            pf.finish().await?;
        }
        let t_wait_prefetch = tw.elapsed();
        let ts = Instant::now();
        let mut sync_bytes = 0;
        if !roles.generators.is_empty() {
            sync_bytes = replicas::sync_generators(roles.actor(), &roles.generators)
                .await?
                .0;
        }
        let t_sync = ts.elapsed();
        let mut checked = false;
        let k = cfg.train.replica_check_every;
        if k > 0 && (step % k == 0 || step == first_step) {
            checked = check_replicas(&roles, step).await?;
        }
        let total = t0.elapsed();
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        m.insert("reward_mean".into(), stats.reward_mean);
        m.insert("reward_std".into(), stats.reward_std);
        m.insert("score_mean".into(), stats.score_mean);
        m.insert("kl_mean".into(), stats.kl_mean);
        m.insert("kl_coef".into(), stats.kl_coef);
        m.insert("response_len_mean".into(), stats.response_len_mean);
        m.insert("truncated_frac".into(), stats.truncated_frac);
        m.insert("advantage_mean".into(), stats.advantage_mean);
        for (k, v) in &stats.attribute_means {
            m.insert(format!("attribute/{k}"), *v);
        }
        m.extend(train_metrics);
        let secs = total.as_secs_f64();
        m.insert(
            "tokens_per_s".into(),
            stats.response_tokens / t_gen.as_secs_f64().max(1e-9),
        );
        m.insert("time/step_s".into(), secs);
        m.insert("time/generate_s".into(), t_gen.as_secs_f64());
        m.insert("time/score_s".into(), t_score.as_secs_f64());
        m.insert("time/train_s".into(), t_train.as_secs_f64());
        m.insert("time/sync_s".into(), t_sync.as_secs_f64());
        if cfg.rollout.async_generation {
            m.insert(
                "rollout/off_policy".into(),
                if off_policy { 1.0 } else { 0.0 },
            );
            m.insert("time/wait_prefetch_s".into(), t_wait_prefetch.as_secs_f64());
        }
        if !roles.generators.is_empty() {
            m.insert("sync/bytes".into(), sync_bytes as f64);
        }
        if checked {
            m.insert("replicas/checked".into(), 1.0);
        }
        let overhead = (total.saturating_sub(t_gen + t_score + t_train + t_sync + t_wait_prefetch))
            .as_secs_f64();
        m.insert("time/controller_s".into(), overhead);
        m.insert("time/controller_compute_s".into(), ctl.as_secs_f64());
        let validated = match &p.validator {
            Some(v) if v.due(step) => {
                let tv = Instant::now();
                let r = match v
                    .run(roles.actor(), &roles.reward, &p.tokenizer, &p.run_dir, step)
                    .await
                {
                    Ok(o) => {
                        for (cat, s) in &o.per_category {
                            m.insert(format!("validation/{cat}"), s.unwrap_or(f64::NAN));
                        }
                        m.insert("validation/missing".into(), o.missing as f64);
                        m.insert(
                            "validation/truncated_prompts".into(),
                            o.truncated_prompts as f64,
                        );
                        Validated {
                            score: o.score,
                            judge: o.judge,
                        }
                    }
                    Err(e) => {
                        warn!(step, error = %format!("{e:#}"), "MT-Bench validation failed; its score is missing and the run goes on");
                        Validated {
                            score: None,
                            judge: "failed".into(),
                        }
                    }
                };
                m.insert("validation/mt_bench".into(), r.score.unwrap_or(f64::NAN));
                m.insert("time/validation_s".into(), tv.elapsed().as_secs_f64());
                Some(r)
            }
            _ => None,
        };
        metrics.write(step, &m)?;
        progress.step(step, &m);
        st.step = step;
        st.samples += rollout.rows as u64;
        st.train_seconds += secs;
        last_step_time = total;
        let due = step == cfg.train.steps
            || (ck.every > 0 && step % ck.every == 0)
            || ck
                .every_minutes
                .is_some_and(|m| last_save.elapsed().as_secs_f64() >= m * 60.0);
        if due || validated.is_some() {
            // With a batch prefetched, the checkpoint's cursor points before it (a resume
            // samples it again).
            let cursor_now = st.cursor;
            if let Some(pf) = &prefetch {
                st.cursor = pf.cursor_before;
            }
            let saved = save_checkpoint(p, &roles, &st, validated.as_ref()).await;
            st.cursor = cursor_now;
            saved?;
            last_save = Instant::now();
            last_saved_step = Some(step);
        }
    }
    progress.finish();
    metrics.flush()?;
    if cfg.logging.plot {
        let png = p.run_dir.join("metrics.png");
        if let Err(e) = crate::plot::write_plot(&p.run_dir.join("metrics.jsonl"), &png) {
            warn!(error = %e, "could not write the metrics plot");
        } else {
            info!(plot = %png.display(), "plot written");
        }
    }
    info!(steps = cfg.train.steps, run_dir = %p.run_dir.display(), "run finished");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost(lost: bool) -> Result<()> {
        Err(cluster::StoppedByWorker {
            failure: WorkerFailure {
                worker: "g".into(),
                roles: vec!["generator".into()],
                cause: "went quiet".into(),
                lost,
            },
            call: None,
        }
        .into())
    }

    #[test]
    fn only_early_stops_and_lost_nodes_requeue() {
        assert_eq!(requeue_reason(&Ok(())), None);
        let preempted: Result<()> = Err(Preempted {
            step: 3,
            reason: "SIGTERM received".into(),
        }
        .into());
        assert_eq!(
            requeue_reason(&preempted).as_deref(),
            Some("SIGTERM received")
        );
        assert_eq!(
            requeue_reason(&lost(true)).as_deref(),
            Some("worker `g` lost")
        );
        // A worker that exited (a crash, a bad input) would only fail again.
        assert_eq!(requeue_reason(&lost(false)), None);
        assert_eq!(requeue_reason(&Err(anyhow!("bad prompts file"))), None);
        // Context added on the way up does not hide the cause.
        let wrapped = preempted.context("while stopping");
        assert!(requeue_reason(&wrapped).is_some());
    }
}
