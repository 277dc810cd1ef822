//! The reward-model and SFT subcommands: `train-rm`, `sft`, `score`, `eval-rm`,
//! `derive-pairs`. Thin: job files are loaded with `rlhf-config` (defaults < YAML < `RLHF_` env
//! < `--set`, errors naming key and `FILE:LINE`), the work is done by `rlhf-train`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use rlhf_config::{ConfigError, ConfigSchema, EnvSource, Provenance};
use rlhf_train::config::{DataConfig, DataSource, SftJobConfig};
use rlhf_train::data::{conversation, parse_prompt_response, read_rows, RowOutcome};
use rlhf_train::{
    CategoryMap, JobControl, JobReport, OnBadRow, RewardModel, RmJobConfig, RmObjective, TrainError,
};
use serde::{Deserialize, Serialize};

/// Options shared by `train-rm` and `sft`.
#[derive(Args)]
pub struct JobArgs {
    /// The job file (YAML).
    file: PathBuf,
    /// Override a key: `--set train.batch_size=16` (value read as YAML); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Require a checkpoint to resume from (without it, the job resumes when the run directory
    /// has a valid checkpoint and starts fresh otherwise).
    #[arg(long)]
    resume: bool,
    /// Stop with a checkpoint after this many optimizer steps in all (as a preempted job
    /// would); run again to continue.
    #[arg(long, value_name = "STEPS")]
    stop_after: Option<u64>,
    /// Print the job report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Reward model directory (HF files + rlhf_reward.json).
    model: PathBuf,
    /// Rows with `prompt` and `response` (.jsonl or .jsonl.gz; HelpSteer2 rows qualify).
    #[arg(long)]
    data: PathBuf,
    /// One JSON object per row: line, reward, attribute scores.
    #[arg(long)]
    json: bool,
    /// Responses scored per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fail (default) or skip bad rows (each named with file:line, then counted).
    #[arg(long, default_value = "fail")]
    on_bad_row: String,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Reward model directory.
    model: PathBuf,
    /// RewardBench-format rows: `prompt`, `chosen`, `rejected`, and `subset` (rows without it,
    /// such as the pairs derive-pairs writes, count under the subset `all`).
    data: PathBuf,
    /// Subset→category map (JSON: {"Category": ["subset", ...] or {"subset": weight}}).
    /// Default: RewardBench's published map and example-count weights.
    #[arg(long)]
    categories: Option<PathBuf>,
    /// Print the report (subsets, categories, overall, row counts) as JSON.
    #[arg(long)]
    json: bool,
    /// Responses scored per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fail (default) or skip bad rows (each named with file:line, then counted).
    #[arg(long, default_value = "fail")]
    on_bad_row: String,
}

#[derive(Args)]
pub struct DerivePairsArgs {
    /// HelpSteer2 ratings rows (`prompt`, `response`, `helpfulness`).
    input: PathBuf,
    /// Pairwise JSONL to write (`prompt`, `chosen`, `rejected`, ...); train-rm's
    /// `bradley_terry` objective and eval-rm read it.
    #[arg(long)]
    out: PathBuf,
    /// fail (default) or skip bad rows (each named with file:line, then counted).
    #[arg(long, default_value = "fail")]
    on_bad_row: String,
}

/// How `score`, `eval-rm` and `derive-pairs` say to skip bad rows: their flag, not the job
/// files' `data.on_bad_row` key.
pub const FLAG_SKIP_HINT: &str = "to skip and count bad rows, rerun with `--on-bad-row skip`";

fn on_bad_row(s: &str) -> Result<OnBadRow> {
    match s {
        "fail" => Ok(OnBadRow::Fail),
        "skip" => Ok(OnBadRow::Skip),
        _ => bail!("--on-bad-row {s:?}: expected fail or skip"),
    }
}

/// Keys a job file must set: the loader drops their placeholder defaults, so a missing one is
/// reported as a missing field under its own key.
const RM_REQUIRED: &[&str] = &["run_dir", "model", "objective", "data"];
const SFT_REQUIRED: &[&str] = &["run_dir", "model", "data"];

fn placeholder_data() -> DataConfig {
    DataConfig {
        train: DataSource::default(),
        eval: None,
        on_bad_row: OnBadRow::Fail,
        max_length: None,
    }
}

/// `train-rm` job file as the config loader sees it.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct RmFile(RmJobConfig);

impl Default for RmFile {
    fn default() -> Self {
        RmFile(RmJobConfig {
            run_dir: PathBuf::new(),
            model: PathBuf::new(),
            output: None,
            objective: RmObjective::Regression,
            regression: Default::default(),
            bradley_terry: Default::default(),
            data: placeholder_data(),
            train: Default::default(),
            optim: rlhf_train::config::job_optimizer(),
            checkpoint: Default::default(),
        })
    }
}

/// Turns a library validation error into the loader's form (key + where its value came from).
fn config_error(p: &Provenance, e: TrainError) -> ConfigError {
    match e {
        TrainError::Config { key, msg } => p.error_at(&key, msg),
        TrainError::Algo(rlhf_algo::AlgoError::Config { key, value, reason }) => {
            p.error_at(key, format!("{value}: {reason}"))
        }
        TrainError::Algo(rlhf_algo::AlgoError::Settings(e)) => {
            p.error_at(&e.key, format!("{}: {}", e.value, e.reason))
        }
        other => p.error_at("", other.to_string()),
    }
}

/// The paths every job file has (reward-model and SFT jobs alike).
fn visit_job(
    run_dir: &mut PathBuf,
    model: &mut PathBuf,
    output: &mut Option<PathBuf>,
    d: &mut DataConfig,
    visit: &mut dyn FnMut(&str, &mut PathBuf),
) {
    visit("run_dir", run_dir);
    visit("model", model);
    if let Some(o) = output {
        visit("output", o);
    }
    visit("data.train.path", &mut d.train.path);
    if let Some(e) = &mut d.eval {
        visit("data.eval.path", &mut e.path);
    }
}

impl ConfigSchema for RmFile {
    const REPLACED_MAPS: &'static [&'static str] = RM_REQUIRED;

    fn visit_paths(&mut self, visit: &mut dyn FnMut(&str, &mut PathBuf)) {
        let c = &mut self.0;
        visit_job(
            &mut c.run_dir,
            &mut c.model,
            &mut c.output,
            &mut c.data,
            visit,
        );
    }

    fn validate(&self, p: &Provenance) -> Result<(), ConfigError> {
        self.0.validate().map_err(|e| config_error(p, e))
    }
}

/// `sft` job file as the config loader sees it.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct SftFile(SftJobConfig);

impl Default for SftFile {
    fn default() -> Self {
        SftFile(SftJobConfig {
            run_dir: PathBuf::new(),
            model: PathBuf::new(),
            output: None,
            data: placeholder_data(),
            train: Default::default(),
            optim: rlhf_train::config::job_optimizer(),
            checkpoint: Default::default(),
        })
    }
}

impl ConfigSchema for SftFile {
    const REPLACED_MAPS: &'static [&'static str] = SFT_REQUIRED;

    fn visit_paths(&mut self, visit: &mut dyn FnMut(&str, &mut PathBuf)) {
        let c = &mut self.0;
        visit_job(
            &mut c.run_dir,
            &mut c.model,
            &mut c.output,
            &mut c.data,
            visit,
        );
    }

    fn validate(&self, p: &Provenance) -> Result<(), ConfigError> {
        self.0.validate().map_err(|e| config_error(p, e))
    }
}

/// Loads a job file and writes `RUN_DIR/config.resolved.yaml`.
fn load_job<T: ConfigSchema>(args: &JobArgs, run_dir: impl Fn(&T) -> &Path) -> Result<T> {
    let loaded = rlhf_config::load_as::<T>(&args.file, &args.set, EnvSource::Process)?;
    let dir = run_dir(&loaded.config);
    std::fs::create_dir_all(dir).with_context(|| format!("creating run_dir {}", dir.display()))?;
    let yaml = loaded.to_yaml()?;
    let path = dir.join("config.resolved.yaml");
    rlhf_ckpt::write_atomic(&path, yaml.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(loaded.config)
}

fn control(args: &JobArgs) -> Result<JobControl> {
    Ok(JobControl {
        stop_after: args.stop_after,
        require_resume: args.resume,
        stop_flag: Some(stop_on_signals()?),
    })
}

/// A flag raised by SIGTERM or SIGUSR1 (Slurm sends one before preemption, see
/// `--signal=B:USR1@grace`): the job then checkpoints after its current step and exits. The
/// handlers are installed before this returns, so no signal can arrive unhandled.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let flag = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the signal-handling runtime")?;
    let (mut term, mut usr1) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::user_defined1())?,
            ))
        })
        .context("installing SIGTERM/SIGUSR1 handlers")?;
    let f = flag.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = usr1.recv() => "SIGUSR1",
                };
                tracing::warn!(
                    "{name} received: checkpointing after the current step, then exiting"
                );
                f.store(true, Ordering::SeqCst);
            })
        })
        .context("starting the signal thread")?;
    Ok(flag)
}

fn print_report(r: &JobReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    for d in &r.data {
        println!("data: {d}");
    }
    if let Some(step) = r.resumed_from {
        println!("resumed from step {step}");
    }
    if !r.finished {
        println!(
            "stopped after step {}; run the same command again to resume",
            r.steps
        );
        return Ok(());
    }
    println!("trained {} steps", r.steps);
    if let Some(why) = &r.early_stop {
        println!("stopped before the last step: {why}");
    }
    if let Some(b) = &r.best {
        println!(
            "best checkpoint: step {} (held-out {} {:.6}), {} (ranked in {}; kept whatever \
             checkpoint.keep_last says)",
            b.step,
            b.metric,
            b.value,
            b.checkpoint.display(),
            b.checkpoint
                .with_file_name(rlhf_train::best::RANKING_FILE)
                .display()
        );
    }
    if let Some(ev) = &r.eval {
        println!("eval: {ev}");
    }
    if let Some(s) = &r.reward_spec {
        println!(
            "reward: {:?} head over {:?}, mean {:.6}, std {:.6}",
            s.head, s.attributes, s.mean, s.std
        );
    }
    if let Some(o) = &r.output {
        match r.output_step {
            Some(step) if step != r.steps => println!(
                "model written to {} (the best checkpoint's weights, step {step}; \
                 checkpoint.export: last writes the last step's)",
                o.display()
            ),
            _ => println!("model written to {}", o.display()),
        }
    }
    Ok(())
}

pub fn train_rm(args: JobArgs) -> Result<()> {
    let cfg: RmFile = load_job(&args, |c: &RmFile| c.0.run_dir.as_path())?;
    let report = rlhf_train::train_reward_model(&cfg.0, &control(&args)?)
        .with_context(|| format!("train-rm {}", args.file.display()))?;
    print_report(&report, args.json)
}

pub fn sft(args: JobArgs) -> Result<()> {
    let cfg: SftFile = load_job(&args, |c: &SftFile| c.0.run_dir.as_path())?;
    let report = rlhf_train::train_sft(&cfg.0, &control(&args)?)
        .with_context(|| format!("sft {}", args.file.display()))?;
    print_report(&report, args.json)
}

pub fn score(args: ScoreArgs) -> Result<()> {
    let rm = RewardModel::load(&args.model, crate::parse_device(&args.device)?)?;
    let (rows, stats) = read_rows(&args.data, on_bad_row(&args.on_bad_row)?, |v| {
        let (p, r) = parse_prompt_response(v)?;
        Ok(RowOutcome::Use(rm.encode(&conversation(&p, &r))?))
    })
    .map_err(|e| e.with_skip_hint(FLAG_SKIP_HINT))?;
    if stats.skipped_bad > 0 {
        eprintln!("{stats}");
    }
    let seqs: Vec<&[u32]> = rows.iter().map(|(_, s)| s.as_slice()).collect();
    let scored = rm.score_tokens(&seqs, args.batch_size)?;
    let mut out = std::io::stdout().lock();
    for ((line, _), s) in rows.iter().zip(&scored) {
        if args.json {
            let attrs: serde_json::Map<String, serde_json::Value> = rm
                .spec
                .attributes
                .iter()
                .zip(&s.outputs)
                .map(|(a, x)| (a.clone(), serde_json::json!(x)))
                .collect();
            let row = serde_json::json!({"line": line, "reward": s.reward, "attributes": attrs});
            writeln!(out, "{row}")?;
        } else {
            let attrs: Vec<String> = rm
                .spec
                .attributes
                .iter()
                .zip(&s.outputs)
                .map(|(a, x)| format!("{a}={x:.4}"))
                .collect();
            writeln!(out, "{line}\t{:.6}\t{}", s.reward, attrs.join(" "))?;
        }
    }
    Ok(())
}

pub fn eval_rm(args: EvalArgs) -> Result<()> {
    let rm = RewardModel::load(&args.model, crate::parse_device(&args.device)?)?;
    let map = match &args.categories {
        Some(p) => CategoryMap::load(p)?,
        None => CategoryMap::default(),
    };
    let r = rlhf_train::eval_reward_bench(
        &rm,
        &args.data,
        on_bad_row(&args.on_bad_row)?,
        &map,
        args.batch_size,
    )
    .map_err(|e| e.with_skip_hint(FLAG_SKIP_HINT))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("| subset | rows | accuracy |");
    println!("| --- | ---: | ---: |");
    for (name, s) in &r.subsets {
        println!("| {name} | {} | {:.4} |", s.rows, s.accuracy);
    }
    println!("\n| category | score |");
    println!("| --- | ---: |");
    for (c, x) in &r.categories {
        println!("| {c} | {x:.4} |");
    }
    match r.overall {
        Some(o) => println!("| overall (mean of categories) | {o:.4} |"),
        None => println!("no subset belongs to a category; no overall score"),
    }
    if !r.unmapped.is_empty() {
        println!(
            "subsets in no category (not in the overall score): {:?}",
            r.unmapped
        );
    }
    Ok(())
}

pub fn derive_pairs(args: DerivePairsArgs) -> Result<()> {
    let mut buf = Vec::new();
    let r = rlhf_train::derive_pairs(&args.input, on_bad_row(&args.on_bad_row)?, &mut buf)
        .map_err(|e| e.with_skip_hint(FLAG_SKIP_HINT))?;
    rlhf_ckpt::write_atomic(&args.out, &buf)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "{} prompts: {} pairs written to {}, {} equal-helpfulness pairs discarded, {} prompts \
         with a single response",
        r.prompts,
        r.pairs,
        args.out.display(),
        r.discarded_equal,
        r.single_response
    );
    if r.data.skipped_bad > 0 {
        println!("{}", r.data);
    }
    Ok(())
}
