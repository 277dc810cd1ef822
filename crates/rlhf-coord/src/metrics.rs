//! Per-step metrics: one JSON object per line in `RUN_DIR/metrics.jsonl` (written and flushed
//! each step, so a crash loses at most the step in progress), and the progress bar on stderr
//! (steps, reward, KL, tokens/s) with a plain log line per step when stderr is not a terminal.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

pub struct MetricsWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl MetricsWriter {
    /// Opens `path` for appending (a resumed run continues the same file).
    pub fn create(path: &Path) -> Result<MetricsWriter> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
        })
    }

    pub fn write(&mut self, step: u64, m: &BTreeMap<String, f64>) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in m {
            // JSON has no NaN/inf: write null so the line stays parseable.
            let val = serde_json::Number::from_f64(*v)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null);
            obj.insert(k.clone(), val);
        }
        let line = serde_json::to_string(&obj)?;
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

    pub fn step(&self, step: u64, m: &BTreeMap<String, f64>) {
        let g = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        let msg = format!(
            "reward {:.3} kl {:.4} tok/s {:.0} step {:.2}s",
            g("reward_mean"),
            g("kl_mean"),
            g("tokens_per_s"),
            g("time/step_s")
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
