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
    #[command(after_help = "Examples:
  rlhf-coord init-model --preset tiny --out models/tiny
  rlhf-coord init-model --arch qwen2 --preset small --dtype bfloat16 --out models/small")]
    InitModel {
        /// Model family: llama, mistral or qwen2.
        #[arg(long, default_value = "llama")]
        arch: String,
        /// tiny (tests), small (demos, benchmarks), or a released model's shape with random
        /// weights for GPU runs: qwen2.5-1.5b (with --arch qwen2), llama3-8b.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Directory to write the model to (created; existing files are replaced).
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
        /// Seed of the random weights (the same seed gives the same model).
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// Where the random weights are drawn (cpu, cuda, cuda:N); a GPU draws a 8B model's
        /// weights in seconds where the CPU takes minutes.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Generate completions for one prompt or a JSONL file of prompts, from a model directory,
    /// a checkpoint or a run directory (its newest valid checkpoint's actor).
    #[command(
        after_help = "--chat renders each prompt with the model's chat template \
(chat_template.jinja or tokenizer_config.json) as a user turn; without it prompt strings are \
tokenized as they are. `messages` rows are always rendered with the template.

Examples:
  rlhf-coord generate models/tiny --prompt 'What is 2+3?' --chat --greedy
  rlhf-coord generate runs/demo --prompts prompts.jsonl --chat --temperature 0.7 --top-p 0.9 --json
  rlhf-coord generate exported/ --prompt 'Hello' --max-new-tokens 32 --device cuda"
    )]
    Generate(generate_cmd::GenerateArgs),
    /// Run an RLHF job: start the worker daemons and train per the run file (resumes from the
    /// run directory's newest valid checkpoint).
    #[command(
        after_help = "The trained policy is the actor of the run's checkpoints \
(RUN_DIR/checkpoints/step-NNNNNN/actor/); `rlhf-coord export RUN_DIR --out DIR` writes it as a \
clean Hugging Face model directory.

Exit codes:
  0   the run reached train.steps
  1   an error (the message names the key, file or worker at fault)
  75  stopped by SIGTERM, SIGUSR1 (Slurm's warning), Ctrl-C, a worker's signal or \
checkpoint.must_save_by, after writing a checkpoint: launch again to resume
  76  a second Ctrl-C: workers killed, no checkpoint of the current step

Examples:
  rlhf-coord launch configs/local.yaml
  rlhf-coord launch configs/local.yaml --set train.steps=10 --set run.name=short
  rlhf-coord launch cluster/example.yaml --dry-run"
    )]
    Launch(launch::LaunchArgs),
    /// Write a checkpoint's trained actor as a Hugging Face model directory (LoRA merged, or the
    /// adapter alone with --adapter-only).
    #[command(after_help = "Examples:
  rlhf-coord export runs/demo --out exported/
  rlhf-coord export runs/demo --best --out exported-best/
  rlhf-coord export runs/demo --step 120 --out exported-120/
  rlhf-coord export runs/lora --adapter-only --out adapter/")]
    Export(export::ExportArgs),
    /// Show a run's progress, checkpoints and validation ranking.
    #[command(after_help = "Examples:
  rlhf-coord status runs/demo
  rlhf-coord status runs/demo --verify")]
    Status(status::StatusArgs),
    /// Print the placement, estimated memory per device and the sbatch script of a run file,
    /// without running anything.
    #[command(after_help = "Examples:
  rlhf-coord plan cluster/example.yaml
  rlhf-coord plan configs/local.yaml --set train.micro_batch_size=2 --json")]
    Plan(plan::PlanArgs),
    /// Train a reward model (regression, Bradley-Terry, scaled BT) from a job file.
    #[command(
        after_help = "The reward model is written to `output` (default RUN_DIR/model): HF \
files plus rlhf_reward.json, ready for models.reward. With data.eval, every evaluation is \
checkpointed and ranked in RUN_DIR/checkpoints/ranking.json; the best is kept and exported \
(checkpoint.export), and train.early_stop stops on it. Job file keys: docs/reward-models.md.

Examples:
  rlhf-coord train-rm rm.yaml
  rlhf-coord train-rm rm.yaml --set train.epochs=2 --set data.on_bad_row=skip
  rlhf-coord train-rm rm.yaml --resume --json"
    )]
    TrainRm(train_cmds::JobArgs),
    /// Supervised fine-tuning on chat data from a job file.
    #[command(
        after_help = "The fine-tuned model is written to `output` (default RUN_DIR/model), \
an HF directory `generate` and `launch` (models.policy) read. Job file keys: \
docs/reward-models.md (\"Job files\"; with data.eval the best evaluation is kept and exported, \
as for train-rm).

Examples:
  rlhf-coord sft configs/demo-warmup.yaml
  rlhf-coord sft sft.yaml --set optim.lr=1e-5 --stop-after 100"
    )]
    Sft(train_cmds::JobArgs),
    /// Score prompt + response rows with a reward model.
    #[command(
        after_help = "Prints one line per row: line number, reward, attribute scores.

Examples:
  rlhf-coord score runs/rm/model --data rows.jsonl
  rlhf-coord score runs/rm/model --data rows.jsonl.gz --json --on-bad-row skip"
    )]
    Score(train_cmds::ScoreArgs),
    /// Evaluate a reward model on RewardBench-format data (or on pairs as derive-pairs writes
    /// them: rows without `subset` count as the subset `all`).
    #[command(after_help = "Examples:
  rlhf-coord eval-rm runs/rm/model reward-bench.jsonl
  rlhf-coord eval-rm runs/rm/model pairs.jsonl --json
  rlhf-coord eval-rm runs/rm/model reward-bench.jsonl --categories categories.json --device cuda")]
    EvalRm(train_cmds::EvalArgs),
    /// Derive preference pairs from HelpSteer2 ratings (higher helpfulness is chosen).
    #[command(after_help = "Examples:
  rlhf-coord derive-pairs helpsteer2-train.jsonl.gz --out pairs.jsonl
  rlhf-coord derive-pairs ratings.jsonl --out pairs.jsonl --on-bad-row skip")]
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(p) = e.downcast_ref::<launch::Preempted>() {
                eprintln!("{p}");
                return ExitCode::from(launch::EXIT_PREEMPTED);
            }
            eprintln!("error: {}", rlhf_proto::errors::one_line(e.chain()));
            ExitCode::FAILURE
        }
    }
}
