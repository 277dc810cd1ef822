//! Per-step metrics: one JSON object per line in `RUN_DIR/metrics.jsonl`, its keys those of
//! [`StepMetrics`] (written and flushed each step, so a crash loses at most the step in
//! progress), and the progress bar on stderr
//! (steps, reward, KL, tokens/s) with a plain log line per step when stderr is not a terminal.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::step_loop::StepMetrics;

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
