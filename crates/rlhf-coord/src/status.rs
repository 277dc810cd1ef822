//! `rlhf-coord status RUN_DIR`: where a run stands, from its run directory alone (no process
//! needs to be running): progress from `metrics.jsonl` and `config.resolved.yaml`, the
//! checkpoints and `LATEST`, and the validation ranking as a table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::checkpoint::Ranking;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The run directory (`run.dir/run.name`).
    pub run_dir: PathBuf,
    /// Also verify every checkpoint's files against its manifest (reads them all).
    #[arg(long)]
    pub verify: bool,
}

pub fn run(args: StatusArgs) -> Result<()> {
    print!("{}", report(&args.run_dir, args.verify)?);
    Ok(())
}

fn last_metrics(run_dir: &Path) -> Result<Vec<serde_json::Value>> {
    let path = run_dir.join("metrics.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // A torn last line (a crash mid-write) is skipped, not an error.
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn total_steps(run_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run_dir.join("config.resolved.yaml")).ok()?;
    let v: serde_norway::Value = serde_norway::from_str(&text).ok()?;
    v.get("train")?.get("steps")?.as_u64()
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// The status report as text.
pub fn report(run_dir: &Path, verify: bool) -> Result<String> {
    if !run_dir.is_dir() {
        bail!(
            "{} is not a run directory (expected run.dir/run.name of a launched run)",
            run_dir.display()
        );
    }
    let mut out = String::new();
    writeln!(out, "run {}", run_dir.display())?;
    let rows = last_metrics(run_dir)?;
    let total = total_steps(run_dir);
    match rows.last() {
        None => writeln!(out, "progress    no step finished yet")?,
        Some(last) => {
            let step = last["step"].as_u64().unwrap_or(0);
            let of = match total {
                Some(t) if t > 0 => format!("{step}/{t} ({:.1}%)", 100.0 * step as f64 / t as f64),
                _ => format!("{step}"),
            };
            let g = |k: &str| last[k].as_f64().map_or("-".into(), |v| format!("{v:.4}"));
            let recent: Vec<f64> = rows
                .iter()
                .rev()
                .take(10)
                .filter_map(|r| r["time/step_s"].as_f64())
                .collect();
            let step_s = if recent.is_empty() {
                "-".into()
            } else {
                format!("{:.3} s", recent.iter().sum::<f64>() / recent.len() as f64)
            };
            writeln!(
                out,
                "progress    step {of}  reward {}  kl {}  step time {step_s} (mean of last {})",
                g("reward_mean"),
                g("kl_mean"),
                recent.len()
            )?;
        }
    }
    let latest = rlhf_ckpt::read_latest(run_dir)?;
    let ckpts = rlhf_ckpt::list(run_dir)?;
    writeln!(
        out,
        "checkpoints {} (LATEST: {})",
        ckpts.len(),
        latest.as_deref().unwrap_or("none")
    )?;
    for (step, dir) in &ckpts {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let state = if verify {
            match rlhf_ckpt::verify(dir) {
                Ok(_) => "verified".to_string(),
                Err(e) => format!("INVALID: {e}"),
            }
        } else if dir.join(rlhf_ckpt::MANIFEST).is_file() {
            "complete".to_string()
        } else {
            "incomplete (no manifest)".to_string()
        };
        let mut flags = vec![];
        if rlhf_ckpt::is_protected(dir) {
            flags.push("protected");
        }
        if latest.as_deref() == Some(name.as_ref()) {
            flags.push("latest");
        }
        writeln!(
            out,
            "  {name}  step {step:>7}  {:>9.1} MiB  {state}{}",
            dir_bytes(dir) as f64 / (1u64 << 20) as f64,
            if flags.is_empty() {
                String::new()
            } else {
                format!("  [{}]", flags.join(", "))
            }
        )?;
    }
    let ranking = Ranking::read(run_dir)?;
    if ranking.entries.is_empty() {
        writeln!(out, "ranking     no validated checkpoint yet")?;
    } else {
        writeln!(
            out,
            "ranking     by MT-Bench score (best: {})",
            ranking.best.as_deref().unwrap_or("none")
        )?;
        writeln!(
            out,
            "  {:>4}  {:<12}  {:>7}  {:>6}  judge",
            "rank", "checkpoint", "step", "score"
        )?;
        for (i, e) in ranking.entries.iter().enumerate() {
            writeln!(
                out,
                "  {:>4}  {:<12}  {:>7}  {:>6}  {}",
                i + 1,
                e.checkpoint,
                e.step,
                e.score.map_or("-".into(), |s| format!("{s:.2}")),
                e.judge
            )?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Ranked;

    #[test]
    fn reports_progress_checkpoints_and_ranking() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        std::fs::write(run.join("config.resolved.yaml"), "train:\n  steps: 40\n").unwrap();
        std::fs::write(
            run.join("metrics.jsonl"),
            "{\"step\":1,\"reward_mean\":0.25,\"kl_mean\":0.01,\"time/step_s\":0.5}\n{\"step\":2,\"reward_mean\":0.5,\"kl_mean\":0.02,\"time/step_s\":1.5}\n{\"st",
        )
        .unwrap();
        for step in [10, 20] {
            let w = rlhf_ckpt::CheckpointWriter::begin(run, step).unwrap();
            w.write_file("actor/model.safetensors", &[0u8; 100])
                .unwrap();
            w.commit(serde_json::json!({})).unwrap();
        }
        let mut r = Ranking::default();
        for (step, score) in [(10, Some(6.25)), (20, None)] {
            r.record(Ranked {
                step,
                checkpoint: rlhf_ckpt::dir_name(step),
                score,
                judge: "reward_model".into(),
            });
        }
        r.write(run).unwrap();
        r.apply_protection(run, 1).unwrap();
        let text = report(run, true).unwrap();
        assert!(text.contains("step 2/40 (5.0%)"), "{text}");
        assert!(text.contains("reward 0.5000"), "{text}");
        assert!(text.contains("step time 1.000 s"), "{text}");
        assert!(text.contains("LATEST: step-000020"), "{text}");
        assert!(text.contains("step-000010  step      10"), "{text}");
        assert!(text.contains("verified  [protected]"), "{text}");
        assert!(text.contains("best: step-000010"), "{text}");
        assert!(
            text.contains("     1  step-000010        10    6.25  reward_model"),
            "{text}"
        );
        assert!(
            text.contains("     2  step-000020        20       -"),
            "{text}"
        );
        // A damaged checkpoint shows as invalid with --verify.
        std::fs::write(
            run.join("checkpoints/step-000020/actor/model.safetensors"),
            [1u8; 100],
        )
        .unwrap();
        let text = report(run, true).unwrap();
        assert!(
            text.contains("INVALID") && text.contains("sha256"),
            "{text}"
        );
        assert!(report(&run.join("nope"), false).is_err());
    }
}
