//! `rlhf-coord`: the command-line entry point of rlhf-coord.
//!
//! Parses the command line, installs the tracing subscriber (`RLHF_LOG` filter,
//! `RLHF_LOG_FORMAT=json`) and maps errors to exit codes; every command's work is in the
//! `rlhf_coord` library (`lib.rs`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rlhf_coord::logging::LogSettings;
use rlhf_coord::{
    export, generate_cmd, launch, parse_device, parse_kind, plan, status, train_cmds,
};
use rlhf_model::init::{init_model, InitSpec, Preset};
use rlhf_model::Family;

#[derive(Parser)]
#[command(name = "rlhf-coord", version, about = "Distributed RLHF orchestrator")]
struct Cli {
    /// libtorch intra-op threads (default: libtorch's choice, usually the core count).
    #[arg(long, global = true)]
    threads: Option<i32>,
    /// More log lines: -v debug, -vv trace. Overrides `logging.level` and RLHF_LOG.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "quiet")]
    verbose: u8,
    /// Fewer log lines: -q warnings and errors, -qq errors. Overrides `logging.level` and
    /// RLHF_LOG.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    quiet: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a randomly initialised model in HF layout (config, safetensors, tokenizer).
    InitModel {
        /// Model family: llama, mistral or qwen2.
        #[arg(long, default_value = "llama")]
        arch: String,
        /// tiny (tests), small (demos, benchmarks), or a released model's shape with random
        /// weights for GPU runs: qwen2.5-1.5b (with --arch qwen2), llama3-8b.
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long)]
        out: PathBuf,
        /// Tie lm_head to the embedding (default: true for qwen2, false otherwise).
        #[arg(long)]
        tie_word_embeddings: Option<bool>,
        /// Key/value heads (grouped-query attention); default: the preset's.
        #[arg(long)]
        num_kv_heads: Option<usize>,
        /// Stored dtype: float32, bfloat16, float16.
        #[arg(long, default_value = "float32")]
        dtype: String,
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// Where the random weights are drawn (cpu, cuda, cuda:N); a GPU draws a 8B model's
        /// weights in seconds where the CPU takes minutes.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Generate completions for one prompt or a JSONL file of prompts.
    Generate(generate_cmd::GenerateArgs),
    /// Run an RLHF job: start the worker daemons and train per the run file (resumes from the
    /// run directory's newest valid checkpoint).
    Launch(launch::LaunchArgs),
    /// Write a checkpoint's trained actor as a Hugging Face model directory (LoRA merged, or the
    /// adapter alone with --adapter-only).
    Export(export::ExportArgs),
    /// Show a run's progress, checkpoints and validation ranking.
    Status(status::StatusArgs),
    /// Print the placement, estimated memory per device and the sbatch script of a run file,
    /// without running anything.
    Plan(plan::PlanArgs),
    /// Train a reward model (regression, Bradley-Terry, scaled BT) from a job file.
    TrainRm(train_cmds::JobArgs),
    /// Supervised fine-tuning on chat data from a job file.
    Sft(train_cmds::JobArgs),
    /// Score prompt + response rows with a reward model.
    Score(train_cmds::ScoreArgs),
    /// Evaluate a reward model on RewardBench-format data.
    EvalRm(train_cmds::EvalArgs),
    /// Derive preference pairs from HelpSteer2 ratings (higher helpfulness is chosen).
    DerivePairs(train_cmds::DerivePairsArgs),
}

fn parse_family(s: &str) -> Result<Family> {
    Ok(match s {
        "llama" => Family::Llama,
        "mistral" => Family::Mistral,
        "qwen2" => Family::Qwen2,
        _ => bail!("--arch {s:?}: expected llama, mistral or qwen2"),
    })
}

/// Installs the one tracing subscriber (stderr; JSON lines or plain, ANSI colours on a
/// terminal).
fn init_tracing(settings: &LogSettings) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&settings.filter).unwrap_or_else(|e| {
        eprintln!(
            "warning: log filter {:?} is not valid ({e}); logging at info",
            settings.filter
        );
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if settings.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn log_settings(verbose: u8, quiet: u8, run: Option<&rlhf_config::LoadedConfig>) -> LogSettings {
    LogSettings::resolve(verbose, quiet, |k| std::env::var(k).ok(), run)
}

fn run(cli: Cli) -> Result<()> {
    let (verbose, quiet) = (cli.verbose, cli.quiet);
    if !matches!(cli.cmd, Cmd::Launch(_)) {
        init_tracing(&log_settings(verbose, quiet, None));
    }
    if let Some(n) = cli.threads {
        if n < 1 {
            bail!("--threads {n}: must be >= 1");
        }
        tch::set_num_threads(n);
    }
    match cli.cmd {
        Cmd::InitModel {
            arch,
            preset,
            out,
            tie_word_embeddings,
            num_kv_heads,
            dtype,
            seed,
            device,
        } => {
            let preset: Preset = preset
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--preset: {e}"))?;
            let mut spec = InitSpec::new(parse_family(&arch)?, preset);
            spec.tie_word_embeddings = tie_word_embeddings;
            spec.num_key_value_heads = num_kv_heads;
            spec.dtype = parse_kind("--dtype", &dtype)?;
            spec.seed = seed;
            spec.device = parse_device(&device)?;
            let cfg = init_model(&spec, &out)
                .with_context(|| format!("writing a new model to {}", out.display()))?;
            tracing::info!(
                dir = %out.display(),
                arch = cfg.head.architecture(cfg.family),
                layers = cfg.num_hidden_layers,
                hidden = cfg.hidden_size,
                "model written"
            );
            Ok(())
        }
        Cmd::Generate(args) => generate_cmd::run(args),
        Cmd::Launch(args) => {
            // The run file says how to log: read it before the first log line.
            let loaded = launch::load(&args)?;
            init_tracing(&log_settings(verbose, quiet, Some(&loaded)));
            launch::run(args, loaded)
        }
        Cmd::Export(args) => export::run(args),
        Cmd::Status(args) => status::run(args),
        Cmd::Plan(args) => plan::run(args),
        Cmd::TrainRm(args) => train_cmds::train_rm(args),
        Cmd::Sft(args) => train_cmds::sft(args),
        Cmd::Score(args) => train_cmds::score(args),
        Cmd::EvalRm(args) => train_cmds::eval_rm(args),
        Cmd::DerivePairs(args) => train_cmds::derive_pairs(args),
    }
}

/// The error and its causes on one line, each cause said once: the library error types put
/// their source into their own message (so a log line or a gRPC status is whole on its own), and
/// anyhow's `{:#}` would print that source again.
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(p) = e.downcast_ref::<launch::Preempted>() {
                eprintln!("{p}");
                return ExitCode::from(launch::EXIT_PREEMPTED);
            }
            eprintln!("error: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}
