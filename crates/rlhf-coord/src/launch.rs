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
use crate::prompts::{self, PromptOptions};
use crate::replicas;
use crate::rewards::{self, RewardRole};
use crate::rl::{self, AlgoSettings};
use crate::run_state::{self, RunState, State};
use crate::slurm;
pub use crate::step_loop::Preempted;
use crate::step_loop::{Reference, ResumePoint, Roles, RunContext, StepLoop};
use crate::validation::Validator;
use crate::workers::{self, RoleClient};

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    /// The run file (YAML).
    pub file: PathBuf,
    /// Override a config value: `--set train.steps=10` (repeatable; highest precedence).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Check the run file, models and prompts and stop there, writing nothing; with
    /// `launcher.kind: slurm` outside an allocation also print the sbatch script.
    #[arg(long)]
    pub dry_run: bool,
    /// Start over in a run directory that holds an earlier run: its files (metrics,
    /// samples, checkpoints, logs, validation results) are moved to `RUN_DIR/previous/TIME/`
    /// first. Without it, a launch resumes from the newest checkpoint, and refuses a directory
    /// whose steps it could not resume (metrics but no checkpoint).
    #[arg(long)]
    pub fresh: bool,
}

/// Everything prepared before any process starts.
struct Prepared {
    /// What the step loop reads.
    run: RunContext,
    worker_bin: PathBuf,
    /// This launch's hold on the run directory (released when the process ends, however).
    lock: Option<rlhf_ckpt::RunLock>,
}

/// Exit code of a run stopped by SIGTERM/SIGUSR1/SIGINT or `checkpoint.must_save_by` after
/// writing its checkpoint (EX_TEMPFAIL: relaunch to continue).
pub const EXIT_PREEMPTED: u8 = 75;
/// Exit code when a second signal forced the exit without a checkpoint.
pub const EXIT_FORCED: i32 = 76;

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

/// The run file with its `--set` overrides and `RLHF_` variables.
pub fn load(args: &LaunchArgs) -> Result<LoadedConfig> {
    Ok(rlhf_config::load(
        &args.file,
        &args.set,
        EnvSource::Process,
    )?)
}

fn prepare(loaded: LoadedConfig, started: Instant) -> Result<Prepared> {
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
            need_answer: cfg.models.rewards_need_answer(),
            split: &cfg.rollout.split,
            columns: prompts::columns(&cfg.rollout),
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
    check_models(&loaded)?;
    check_context(&loaded, &prompts)?;
    crate::limits::check_score_request(&loaded, &prompts)?;
    let worker_bin = launcher::worker_binary(cfg)?;
    let validator = Validator::new(cfg)?;
    let run_dir = cfg.run_dir();
    Ok(Prepared {
        run: RunContext {
            loaded,
            run_dir,
            settings,
            prompts,
            tokenizer,
            resume: None,
            started,
            validator,
        },
        worker_bin,
        lock: None,
    })
}

/// Every model directory the run loads, checked before any worker starts: `config.json` names a
/// supported architecture and resolves, and every safetensors header parses and matches its
/// file's length. The error names the key that points at the directory.
fn check_models(loaded: &LoadedConfig) -> Result<()> {
    let m = &loaded.config.models;
    let mut dirs = vec![("models.policy".to_string(), m.policy.clone())];
    if let Some(r) = &m.reference {
        dirs.push(("models.reference".into(), r.clone()));
    }
    if let Some(c) = &m.critic {
        dirs.push(("models.critic".into(), c.clone()));
    }
    for src in m.reward_sources() {
        if let (RewardKind::Model, Some(r)) = (src.config.kind, &src.config.path) {
            dirs.push((format!("{}.path", src.key), r.clone()));
        }
    }
    for (key, dir) in dirs {
        let check = || -> Result<()> {
            rlhf_model::config::Config::from_dir(&dir)?;
            crate::plan::model_size(&dir)?;
            Ok(())
        };
        check().map_err(|e| {
            anyhow!(
                "{}: {e:#}",
                loaded.error_at(&key, format!("{} cannot be loaded", dir.display()))
            )
        })?;
    }
    Ok(())
}

/// The longest prompt plus `rollout.max_new_tokens` must fit the policy's context, or the
/// workers would cut the responses short without a word.
fn check_context(loaded: &LoadedConfig, prompts: &prompts::PromptSet) -> Result<()> {
    let cfg = &loaded.config;
    let context = rlhf_model::config::Config::from_dir(&cfg.models.policy)?.max_position_embeddings;
    let longest = prompts.rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    if longest + cfg.rollout.max_new_tokens > context {
        return Err(loaded
            .error_at(
                "rollout.max_new_tokens",
                format!(
                    "{} new tokens after the longest prompt ({longest} tokens, {}) need {} \
                     positions, more than the policy's context of {context} \
                     (max_position_embeddings in {}); lower rollout.max_new_tokens to at most \
                     {} or rollout.max_prompt_tokens",
                    cfg.rollout.max_new_tokens,
                    prompts.file.display(),
                    longest + cfg.rollout.max_new_tokens,
                    cfg.models.policy.join("config.json").display(),
                    context.saturating_sub(longest)
                ),
            )
            .into());
    }
    Ok(())
}

/// Takes the run directory: creates it, locks it, moves an earlier run aside (`--fresh`) or
/// finds the checkpoint to resume from (refusing to overwrite steps it cannot resume), and
/// writes `config.resolved.yaml`. The first step that writes anything.
fn open_run_dir(p: &mut Prepared, fresh: bool) -> Result<()> {
    let run_dir = p.run.run_dir.clone();
    let cfg = &p.run.loaded.config;
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
    // Before anything in the run directory is read or written: a second launch would delete
    // the first one's checkpoints and truncate its metrics.
    let lock = rlhf_ckpt::RunLock::acquire(&run_dir, &rlhf_comm::net::host_name())?;
    if fresh {
        if let Some(to) = set_aside(&run_dir)? {
            warn!(moved_to = %to.display(), "--fresh: the earlier run's files are moved aside; starting over");
        }
    } else {
        p.run.resume = find_resume(&run_dir, cfg)?;
        // A requeued job redoes its own steps that no checkpoint kept.
        if p.run.resume.is_none() && !slurm::is_requeued_job() {
            refuse_to_overwrite(&run_dir)?;
        }
    }
    let yaml = p.run.loaded.to_yaml()?;
    rlhf_ckpt::write_atomic(&run_dir.join("config.resolved.yaml"), yaml.as_bytes())?;
    p.lock = Some(lock);
    Ok(())
}

/// The folder under `RUN_DIR` that `--fresh` moves earlier runs into.
pub const PREVIOUS_DIR: &str = "previous";

/// Moves everything in `run_dir` but the lock and earlier set-asides into
/// `run_dir/previous/TIME/`; `None` when there was nothing to move.
fn set_aside(run_dir: &Path) -> Result<Option<PathBuf>> {
    let keep = [rlhf_ckpt::LOCK_FILE, PREVIOUS_DIR];
    let mut entries = vec![];
    for e in std::fs::read_dir(run_dir).with_context(|| format!("reading {}", run_dir.display()))? {
        let e = e.with_context(|| format!("reading {}", run_dir.display()))?;
        if !keep.iter().any(|k| e.file_name() == *k) {
            entries.push(e.file_name());
        }
    }
    if entries.is_empty() {
        return Ok(None);
    }
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]-[minute]-[second]Z"
        ))
        .context("formatting the time")?;
    let to = run_dir.join(PREVIOUS_DIR).join(stamp);
    std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
    for name in entries {
        let (from, dest) = (run_dir.join(&name), to.join(&name));
        std::fs::rename(&from, &dest)
            .with_context(|| format!("moving {} to {}", from.display(), dest.display()))?;
    }
    Ok(Some(to))
}

/// With no checkpoint to resume from, a launch starts at step 1 and would overwrite what an
/// earlier run left: refuse, saying what would be lost and how to go on.
fn refuse_to_overwrite(run_dir: &Path) -> Result<()> {
    let metrics = run_dir.join("metrics.jsonl");
    // Trained steps: a step-0 validation baseline alone (`validation.at_start`, stopped before
    // step 1) is redone or kept by the next launch, never lost.
    let steps = std::fs::read_to_string(&metrics)
        .map(|t| {
            t.lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .map_or(!l.trim().is_empty(), |v| v["step"].as_u64() != Some(0))
                })
                .count()
        })
        .unwrap_or(0);
    let checkpoints = std::fs::read_dir(rlhf_ckpt::checkpoints_dir(run_dir))
        .map(|d| d.count())
        .unwrap_or(0);
    if steps == 0 && checkpoints == 0 {
        return Ok(());
    }
    let mut what = vec![];
    if steps > 0 {
        what.push(format!("{steps} steps of metrics in {}", metrics.display()));
    }
    if checkpoints > 0 {
        what.push(format!(
            "{checkpoints} unusable checkpoint entries in {}",
            rlhf_ckpt::checkpoints_dir(run_dir).display()
        ));
    }
    bail!(
        "{} holds an earlier run ({}) but no checkpoint to resume from; launching would overwrite it. \
         Launch with --fresh to move its files to {}/{PREVIOUS_DIR}/TIME/ and start over, or set \
         run.name or run.dir to a new directory",
        run_dir.display(),
        what.join(", "),
        run_dir.display()
    )
}

/// Runs `launch` with its run file as [`load`] read it; returns when the run ends.
pub fn run(args: LaunchArgs, loaded: LoadedConfig) -> Result<()> {
    let started = Instant::now();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(launch(args, loaded, started))
}

async fn launch(args: LaunchArgs, loaded: LoadedConfig, started: Instant) -> Result<()> {
    // Listening before anything slow: a signal while checkpoints are hashed, models load or
    // workers register is honoured at the first step boundary, never fatal.
    let pids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (stop_request, stop_sig) = watch::channel(None);
    listen_for_signals(pids.clone(), stop_request.clone())?;
    let mut p = tokio::task::block_in_place(|| prepare(loaded, started))?;
    let cfg = p.run.loaded.config.clone();
    let submit = cfg.launcher.kind == LauncherKind::Slurm && !slurm::in_allocation();
    if args.dry_run {
        if submit {
            print!("{}", sbatch_script(&args, &p)?);
            return Ok(());
        }
        info!("--dry-run: the run file, models and prompts check out; nothing was written");
        return Ok(());
    }
    tokio::task::block_in_place(|| open_run_dir(&mut p, args.fresh))?;
    // Held to the end of this function, past the requeue decision (it writes into the run
    // directory); the kernel releases it when this process ends, so a requeued job retakes it.
    let lock = p.lock.take();
    info!(run_dir = %p.run.run_dir.display(), "run directory ready");
    let started_unix = run_state::now_unix();
    if submit {
        // The job takes the lock itself when it starts, which may be before this exits.
        drop(lock);
        let job = submit_to_slurm(&args, &p)?;
        RunState::new(
            State::Queued,
            Some(format!("Slurm job {job}")),
            started_unix,
        )
        .write(&p.run.run_dir)?;
        return Ok(());
    }
    RunState::new(State::Running, None, started_unix).write(&p.run.run_dir)?;
    let allocation = if cfg.launcher.kind == LauncherKind::Slurm {
        let a = slurm::allocation()?;
        a.check_devices(&cfg)?;
        info!(job = %a.job_id, nodes = ?a.nodes, restarts = a.restarts, gpus_per_node = ?a.gpus_per_node, "inside Slurm job");
        Some(a)
    } else {
        None
    };
    let resumed_from = p.run.resume.as_ref().map(|r| r.state.step);
    let run_dir = p.run.run_dir.clone();
    let early_signal = stop_sig.borrow().clone();
    let result = match early_signal {
        Some(sig) => Err(Preempted {
            step: resumed_from.unwrap_or(0),
            reason: format!("{sig} received before the workers started"),
        }
        .into()),
        None => run_async(p, allocation.as_ref(), pids, (stop_request, stop_sig)).await,
    };
    if let Err(e) = end_state(&result, started_unix).write(&run_dir) {
        warn!(error = %format!("{e:#}"), "could not record how the run ended");
    }
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

/// How a launch ended, for `status`.
fn end_state(result: &Result<()>, started_unix: u64) -> RunState {
    match result {
        Ok(()) => RunState::new(State::Finished, None, started_unix),
        Err(e) => match e.downcast_ref::<Preempted>() {
            Some(p) => RunState::new(State::Preempted, Some(p.to_string()), started_unix),
            None => RunState::new(State::Failed, Some(format!("{e:#}")), started_unix),
        },
    }
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

/// The sbatch script that runs this launch inside a Slurm job (never with `--fresh`: a requeued
/// job must resume).
fn sbatch_script(args: &LaunchArgs, p: &Prepared) -> Result<String> {
    let file = std::path::absolute(&args.file)
        .with_context(|| format!("resolving {}", args.file.display()))?;
    let me = std::env::current_exe().context("locating the rlhf-coord executable")?;
    Ok(slurm::sbatch_script(
        &p.run.loaded.config,
        &me,
        &file,
        &args.set,
        &p.run.run_dir,
    ))
}

/// Outside an allocation: write the sbatch script into the run directory and submit it;
/// returns the job id.
fn submit_to_slurm(args: &LaunchArgs, p: &Prepared) -> Result<String> {
    let script = sbatch_script(args, p)?;
    let (id, path) = slurm::submit(&script, &p.run.run_dir)?;
    println!(
        "submitted job {id}; run directory {}",
        p.run.run_dir.display()
    );
    info!(job = %id, script = %path.display(), "submitted to Slurm");
    Ok(id)
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
    let cfg = p.run.loaded.config.clone();
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
    let tls = crate::tls::for_run(&cfg, &p.run.run_dir, listen.bind)?;
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
        &p.run.run_dir.join("coordinator.addr"),
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
        &p.run.run_dir,
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
) -> Result<Roles<RoleClient>> {
    let cfg = &p.run.loaded.config;
    let s = &p.run.settings;
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
    // Every reward source is a role of its own on the worker placed with `reward`.
    let (reward_client, reward_dev) = get(Role::Reward)?;
    let file_dir = p.run.loaded.provenance.file_dir();
    let reward_sources: Vec<(RewardRole<RoleClient>, pb::CreateRoleRequest)> = cfg
        .models
        .reward_sources()
        .iter()
        .map(|src| {
            let role = RewardRole {
                name: src.name.to_string(),
                weight: src.config.weight,
                is_model: src.config.kind == RewardKind::Model,
                role: reward_client.for_role(
                    &rewards::role_id(cfg, src),
                    rewards::score_worst_case(src.config, cfg.rollout_sequences()),
                ),
            };
            let req = pb::CreateRoleRequest {
                role_id: String::new(),
                kind: pb::RoleKind::Reward as i32,
                model_path: src.config.path.as_deref().map(path).unwrap_or_default(),
                device: reward_dev.clone(),
                dtype: dtype.clone(),
                seed,
                spec: Some(pb::create_role_request::Spec::Reward(rewards::role_spec(
                    cfg, src, &file_dir,
                ))),
            };
            (role, req)
        })
        .collect();
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
        futures::future::try_join_all(
            reward_sources
                .iter()
                .map(|(r, req)| r.role.create(req.clone()))
        ),
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
        reward_outputs = ?reward_outputs(&reward_sources, &rw),
        reference = reference_src.describe(),
        "roles created"
    );
    let roles = Roles {
        actors: actors.into_iter().map(|c| c.0).collect(),
        critics: critic_members.iter().map(|c| c.0.clone()).collect(),
        generators: generators.into_iter().map(|c| c.0).collect(),
        rewards: reward_sources.into_iter().map(|(r, _)| r).collect(),
        reference: reference_src,
    };
    form_groups(cfg, &roles).await?;
    Ok(roles)
}

/// What the reward roles answer, for the log: the lone source's outputs, or `name: outputs` for
/// each of several.
fn reward_outputs<R>(
    sources: &[(RewardRole<R>, pb::CreateRoleRequest)],
    created: &[pb::CreateRoleResponse],
) -> Vec<String> {
    match created {
        [one] => one.attribute_names.clone(),
        _ => sources
            .iter()
            .zip(created)
            .map(|((s, _), c)| format!("{}: {}", s.name, c.attribute_names.join(", ")))
            .collect(),
    }
}

/// Forms the collective groups the placement needs: gradients between actor replicas and
/// between critic replicas, weights between actor replica 0 and the generators.
async fn form_groups(cfg: &RunConfig, roles: &Roles<RoleClient>) -> Result<()> {
    let timeout = cfg.launcher.collective_timeout_s;
    let wanted = cfg.launcher.collective_backend;
    // Group ids only have to differ between groups and from strangers' (a handshake refuses
    // another id): a fresh random base per launch.
    let base = rl::step_seed(
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

async fn train(
    p: &Prepared,
    registry: &Arc<Registry>,
    creds: &workers::Credentials,
    stop: watch::Receiver<Option<String>>,
) -> Result<()> {
    let roles = create_roles(p, registry, creds).await?;
    StepLoop::start(&p.run, roles).await?.run(stop).await
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
    fn a_step_0_baseline_alone_is_no_earlier_run_to_protect() {
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path().join("metrics.jsonl");
        refuse_to_overwrite(tmp.path()).unwrap();
        std::fs::write(&m, "{\"step\": 0, \"validation/mt_bench\": 3.0}\n").unwrap();
        refuse_to_overwrite(tmp.path()).unwrap();
        std::fs::write(&m, "{\"step\": 0}\n{\"step\": 1}\n{\"step\": 2}\n").unwrap();
        let e = refuse_to_overwrite(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains("2 steps of metrics") && e.contains("--fresh"),
            "{e}"
        );
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
