//! `rlhf-coord export RUN_DIR [--step N | --best | --latest] --out DIR [--adapter-only]`: the
//! trained actor of one checkpoint as a clean Hugging Face model directory (weights,
//! `config.json`, tokenizer files, chat template, `generation_config.json`; no optimizer or
//! trainer state), and the resolution of a run or checkpoint directory to its actor model that
//! `rlhf-coord generate` shares.
//!
//! The checkpoint is verified against its manifest (size and sha256 of every file) first, as
//! resume does. Without LoRA the weight files are copied byte for byte (the worker wrote them
//! with `rlhf-model`'s sharding); with LoRA the merged model (`W + scale · B A`) is written by
//! `Model::save_merged`, or with `--adapter-only` PEFT's adapter files. The output appears whole
//! or not at all (`rlhf_ckpt::StagedDir`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use rlhf_model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use rlhf_model::weights::{WeightFiles, INDEX_FILE};
use rlhf_model::{Config, LoadOptions, Model, SaveOptions, SIDE_FILES};
use tch::Kind;

use crate::checkpoint::Ranking;

/// The actor's subdirectory inside a checkpoint (`save_checkpoint` in `launch.rs`).
pub const ACTOR_DIR: &str = "actor";
const GENERATION_CONFIG: &str = "generation_config.json";

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The run directory (`run.dir/run.name`), holding `checkpoints/`.
    run_dir: PathBuf,
    /// Export the checkpoint of this step.
    #[arg(long, group = "which")]
    step: Option<u64>,
    /// Export the best checkpoint by the validation ranking (`checkpoints/ranking.json`).
    #[arg(long, group = "which")]
    best: bool,
    /// Export the newest valid checkpoint (the default).
    #[arg(long, group = "which")]
    latest: bool,
    /// Where to write the model; must not exist or be an empty directory.
    #[arg(long)]
    out: PathBuf,
    /// For a LoRA run: write only PEFT's adapter files (plus the tokenizer files) instead of
    /// the merged model.
    #[arg(long)]
    adapter_only: bool,
}

/// Which checkpoint of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Latest,
    Best,
    Step(u64),
}

/// A checkpoint that verified against its manifest.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub step: u64,
    pub dir: PathBuf,
}

impl Chosen {
    pub fn actor(&self) -> PathBuf {
        self.dir.join(ACTOR_DIR)
    }
}

pub fn run(a: ExportArgs) -> Result<()> {
    // clap's group makes the three flags exclusive; none given means --latest.
    let which = match (a.step, a.best, a.latest) {
        (Some(s), _, _) => Which::Step(s),
        (None, true, _) => Which::Best,
        (None, false, _) => Which::Latest,
    };
    let chosen = choose(&a.run_dir, which)?;
    let written = export(&chosen, &a.out, a.adapter_only)?;
    tracing::info!(
        step = chosen.step,
        checkpoint = %chosen.dir.display(),
        out = %a.out.display(),
        what = written.describe(),
        "model exported"
    );
    Ok(())
}

/// Refuses a directory that is not a run directory, saying what it is instead when it can.
fn check_run_dir(run_dir: &Path) -> Result<()> {
    if !run_dir.is_dir() {
        bail!(
            "{} is not a run directory: it does not exist (give the run.dir/run.name directory of a launched run)",
            run_dir.display()
        );
    }
    if run_dir.join(rlhf_ckpt::MANIFEST).is_file() {
        bail!(
            "{} is a checkpoint directory, not a run directory: give the run directory two levels up, with --step {}",
            run_dir.display(),
            run_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(rlhf_ckpt::parse_dir_name)
                .map_or_else(|| "N".to_string(), |s| s.to_string())
        );
    }
    if !rlhf_ckpt::checkpoints_dir(run_dir).is_dir() {
        bail!(
            "{} is not a run directory: it has no {}/ (give the run.dir/run.name directory of a launched run that saved a checkpoint)",
            run_dir.display(),
            rlhf_ckpt::CHECKPOINTS
        );
    }
    Ok(())
}

fn step_list(steps: &[u64]) -> String {
    if steps.is_empty() {
        return "none".into();
    }
    steps
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The checkpoint of `run_dir` that `which` names, verified against its manifest.
pub fn choose(run_dir: &Path, which: Which) -> Result<Chosen> {
    check_run_dir(run_dir)?;
    let listed = rlhf_ckpt::list(run_dir)
        .with_context(|| format!("listing the checkpoints of {}", run_dir.display()))?;
    let steps: Vec<u64> = listed.iter().map(|(s, _)| *s).collect();
    if listed.is_empty() {
        bail!(
            "{} has no checkpoints yet (nothing under {}/); wait for the run's first checkpoint",
            run_dir.display(),
            rlhf_ckpt::checkpoints_dir(run_dir).display()
        );
    }
    let dir = match which {
        Which::Latest => {
            let found = rlhf_ckpt::latest_valid(run_dir).with_context(|| {
                format!("looking for the latest checkpoint of {}", run_dir.display())
            })?;
            let Some(resume) = found else {
                bail!(
                    "{}: none of its checkpoints (steps {}) verifies against its manifest; `rlhf-coord status {} --verify` says why",
                    run_dir.display(),
                    step_list(&steps),
                    run_dir.display()
                );
            };
            for r in &resume.rejected {
                tracing::warn!(dir = %r.dir.display(), reason = %r.reason, "checkpoint rejected");
            }
            return Ok(Chosen {
                step: resume.checkpoint.step,
                dir: resume.checkpoint.dir,
            });
        }
        Which::Step(n) => match listed.iter().find(|(s, _)| *s == n) {
            Some((_, d)) => d.clone(),
            None => bail!(
                "{} has no checkpoint of step {n}; available steps: {}",
                run_dir.display(),
                step_list(&steps)
            ),
        },
        Which::Best => {
            let ranking = Ranking::read(run_dir)?;
            let Some(best) = ranking.best else {
                bail!(
                    "{} has no validation scores ({} is missing or ranks no scored checkpoint), so there is no best checkpoint; set validation.every in the run file, or export --latest or --step N (available steps: {})",
                    run_dir.display(),
                    Ranking::path(run_dir).display(),
                    step_list(&steps)
                );
            };
            let dir = rlhf_ckpt::checkpoints_dir(run_dir).join(&best);
            if !dir.is_dir() {
                bail!(
                    "{} names {best} as the best checkpoint but it no longer exists; available steps: {}",
                    Ranking::path(run_dir).display(),
                    step_list(&steps)
                );
            }
            dir
        }
    };
    let manifest = rlhf_ckpt::verify(&dir).with_context(|| {
        format!(
            "the checkpoint does not verify against its manifest; export another (available steps: {})",
            step_list(&steps)
        )
    })?;
    Ok(Chosen {
        step: manifest.step,
        dir,
    })
}

/// What [`export`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The full fine-tuned weights, copied.
    Weights,
    /// Base weights with the LoRA adapters folded in.
    Merged,
    /// PEFT's adapter files only.
    Adapter,
}

impl Written {
    fn describe(self) -> &'static str {
        match self {
            Written::Weights => "model",
            Written::Merged => "model with LoRA adapters merged",
            Written::Adapter => "LoRA adapter (PEFT)",
        }
    }
}

/// Writes the actor of `chosen` to `out` (atomically; `out` must not exist or be empty).
pub fn export(chosen: &Chosen, out: &Path, adapter_only: bool) -> Result<Written> {
    let actor = chosen.actor();
    if !actor.join("config.json").is_file() {
        bail!(
            "{}: the checkpoint has no actor model ({}/config.json is missing)",
            chosen.dir.display(),
            ACTOR_DIR
        );
    }
    let lora = actor.join(ADAPTER_CONFIG).is_file();
    if adapter_only && !lora {
        bail!(
            "{}: the checkpoint has no LoRA adapters (models.lora was not set, all weights were trained); drop --adapter-only",
            chosen.dir.display()
        );
    }
    let stage = rlhf_ckpt::StagedDir::begin(out).context("preparing the output directory")?;
    let written = if adapter_only {
        for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
            copy(&actor, stage.dir(), f)?;
        }
        Written::Adapter
    } else if lora {
        write_merged(&actor, stage.dir())?;
        Written::Merged
    } else {
        copy_weights(&actor, stage.dir())?;
        copy(&actor, stage.dir(), "config.json")?;
        Written::Weights
    };
    for f in SIDE_FILES {
        if actor.join(f).is_file() {
            copy(&actor, stage.dir(), f)?;
        }
    }
    if !adapter_only && !actor.join(GENERATION_CONFIG).is_file() {
        write_generation_config(&actor, stage.dir())?;
    }
    stage
        .publish()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(written)
}

fn copy(from_dir: &Path, to_dir: &Path, name: &str) -> Result<()> {
    let (from, to) = (from_dir.join(name), to_dir.join(name));
    std::fs::copy(&from, &to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Copies `model.safetensors`, or the index and every shard it names, after reading their
/// headers (a header that does not parse is an error here, not in the user's loader).
fn copy_weights(actor: &Path, out: &Path) -> Result<()> {
    let files = WeightFiles::open(actor)
        .with_context(|| format!("reading the actor's weights in {}", actor.display()))?;
    let mut paths: Vec<&Path> = files.names().map(|n| files.path_of(n)).collect();
    paths.sort();
    paths.dedup();
    for p in paths {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: not a weight file name", p.display()))?;
        copy(actor, out, name)?;
    }
    if actor.join(INDEX_FILE).is_file() {
        copy(actor, out, INDEX_FILE)?;
    }
    Ok(())
}

/// Loads base + adapters and writes the merged model in the stored dtype. The merge runs in
/// f32 whatever the stored dtype, so a bf16 model is rounded once (at the save), not twice.
fn write_merged(actor: &Path, out: &Path) -> Result<()> {
    let stored = Config::from_dir(actor)
        .with_context(|| format!("reading {}/config.json", actor.display()))?
        .dtype;
    let mut model = Model::load(
        actor,
        &LoadOptions {
            dtype: Some(Kind::Float),
            ..Default::default()
        },
    )
    .with_context(|| format!("loading the actor's base weights from {}", actor.display()))?;
    model
        .load_lora(actor)
        .with_context(|| format!("loading the actor's LoRA adapters from {}", actor.display()))?;
    model
        .save_merged(
            out,
            &SaveOptions {
                dtype: Some(stored),
                ..Default::default()
            },
        )
        .context("writing the merged model")?;
    Ok(())
}

/// transformers' `GenerationConfig.from_model_config` for a model directory that came without
/// `generation_config.json`: the special token ids of `config.json`.
fn write_generation_config(actor: &Path, out: &Path) -> Result<()> {
    let cfg = Config::from_dir(actor)
        .with_context(|| format!("reading {}/config.json", actor.display()))?;
    let mut g = serde_json::json!({ "_from_model_config": true });
    if let Some(b) = cfg.bos_token_id {
        g["bos_token_id"] = b.into();
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => g["eos_token_id"] = (*one).into(),
        many => g["eos_token_id"] = many.into(),
    }
    if let Some(p) = cfg.pad_token_id {
        g["pad_token_id"] = p.into();
    }
    let path = out.join(GENERATION_CONFIG);
    let mut bytes = serde_json::to_vec_pretty(&g)?;
    bytes.push(b'\n');
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// The model directory `rlhf-coord generate` should load for `path`: `path` itself when it
/// holds `config.json` (a model directory, or a checkpoint's `actor/`), a checkpoint
/// directory's `actor/` (verified), or a run directory's newest valid checkpoint's `actor/`.
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf> {
    if path.join("config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    if path.join(rlhf_ckpt::MANIFEST).is_file() {
        rlhf_ckpt::verify(path).context("the checkpoint does not verify against its manifest")?;
        let actor = path.join(ACTOR_DIR);
        if !actor.join("config.json").is_file() {
            bail!(
                "{}: the checkpoint has no actor model ({ACTOR_DIR}/config.json is missing)",
                path.display()
            );
        }
        return Ok(actor);
    }
    if rlhf_ckpt::checkpoints_dir(path).is_dir() {
        let chosen = choose(path, Which::Latest)?;
        tracing::info!(step = chosen.step, checkpoint = %chosen.dir.display(), "generating with the run's latest checkpoint");
        return Ok(chosen.actor());
    }
    bail!(
        "{} is neither a model directory (no {}), a checkpoint directory (no {}) nor a run directory (no {}/)",
        path.display(),
        path.join("config.json").display(),
        rlhf_ckpt::MANIFEST,
        rlhf_ckpt::CHECKPOINTS
    )
}
