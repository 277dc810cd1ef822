//! `rlhf-coord status RUN_DIR`: where a run stands, from its run directory alone (no process
//! needs to be running): the last launch's state and how it ended (`run_state.json`), start,
//! elapsed time and ETA, progress and the recent mean reward from `metrics.jsonl` and
//! `config.resolved.yaml`, the checkpoints and `LATEST`, and the validation ranking as a table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::checkpoint::Ranking;
use crate::run_state::{now_unix, RunState, State};

/// Steps the recent means (reward, step time) are taken over.
const RECENT_STEPS: usize = 10;

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

/// The state line: what the last launch is doing or how it ended.
fn describe_state(st: &RunState) -> String {
    let mut s = st.state.as_str().to_string();
    if st.state == State::Running {
        match st.process_alive() {
            Some(true) => s.push_str(&format!(" (pid {} on {})", st.pid, st.host)),
            Some(false) => s.push_str(&format!(
                " according to run_state.json, but its process (pid {} on {}) is gone: it was \
                 killed or crashed without saying; launch again to resume from the last checkpoint",
                st.pid, st.host
            )),
            None => s.push_str(&format!(" (pid {} on {})", st.pid, st.host)),
        }
    }
    if let Some(r) = &st.reason {
        s.push_str(": ");
        s.push_str(r);
    }
    s
}

/// `2026-12-06 19:50:00 UTC`.
fn utc(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| format!("{unix} (Unix time)"))
}

/// `1 h 02 min`, `3 min 05 s`, `12 s`.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        s if s >= 3600 => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{} min {:02} s", s / 60, s % 60),
        s => format!("{s} s"),
    }
}

/// The status report as text.
pub fn report(run_dir: &Path, verify: bool) -> Result<String> {
    let state = RunState::read(run_dir)?;
    let is_run = state.is_some()
        || run_dir.join("config.resolved.yaml").is_file()
        || run_dir.join("metrics.jsonl").is_file();
    if !run_dir.is_dir() || !is_run {
        bail!(
            "{} is not a run directory: it has no run_state.json, config.resolved.yaml or \
             metrics.jsonl (give run.dir/run.name of a launched run)",
            run_dir.display()
        );
    }
    let mut out = String::new();
    writeln!(out, "run {}", run_dir.display())?;
    let rows = last_metrics(run_dir)?;
    let total = total_steps(run_dir);
    let recent: Vec<&serde_json::Value> = rows.iter().rev().take(RECENT_STEPS).collect();
    let mean = |key: &str| -> Option<f64> {
        let v: Vec<f64> = recent.iter().filter_map(|r| r[key].as_f64()).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let step = rows.last().and_then(|r| r["step"].as_u64());
    if let Some(st) = &state {
        writeln!(out, "state       {}", describe_state(st))?;
        let elapsed = st.updated_unix.max(if st.state == State::Running {
            now_unix()
        } else {
            0
        }) - st.started_unix.min(st.updated_unix);
        let eta = match (st.state, total, step, mean("time/step_s")) {
            (State::Running, Some(t), Some(s), Some(secs)) if t > s => {
                format!("  eta {}", duration((t - s) as f64 * secs))
            }
            _ => String::new(),
        };
        writeln!(
            out,
            "started     {} (this launch; elapsed {}{eta})",
            utc(st.started_unix),
            duration(elapsed as f64)
        )?;
    }
    match step {
        None => writeln!(out, "progress    no step finished yet")?,
        Some(step) => {
            let of = match total {
                Some(t) if t > 0 => format!("{step}/{t} ({:.1}%)", 100.0 * step as f64 / t as f64),
                _ => format!("{step}"),
            };
            let g =
                |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
            writeln!(
                out,
                "progress    step {of}  reward {}  kl {}  step time {} s (means of the last {} steps)",
                g(mean("reward_mean"), 4),
                g(mean("kl_mean"), 4),
                g(mean("time/step_s"), 3),
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
            "  {:>4}  {:<12}  {:>7}  {:>6}  {:>11}  judge",
            "rank", "checkpoint", "step", "score", "cut prompts"
        )?;
        for (i, e) in ranking.entries.iter().enumerate() {
            // Prompts cut to fit the context, from the validation's scores.json.
            let cut = rlhf_eval::Report::read(run_dir.join("validation").join(&e.checkpoint))
                .map_or("-".into(), |r| r.truncated_prompts.to_string());
            writeln!(
                out,
                "  {:>4}  {:<12}  {:>7}  {:>6}  {:>11}  {}",
                i + 1,
                e.checkpoint,
                e.step,
                e.score.map_or("-".into(), |s| format!("{s:.2}")),
                cut,
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
        // Means over the recent steps, not the last step's values.
        assert!(text.contains("reward 0.3750"), "{text}");
        assert!(
            text.contains("step time 1.000 s (means of the last 2 steps)"),
            "{text}"
        );
        assert!(text.contains("LATEST: step-000020"), "{text}");
        assert!(text.contains("step-000010  step      10"), "{text}");
        assert!(text.contains("verified  [protected]"), "{text}");
        assert!(text.contains("best: step-000010"), "{text}");
        assert!(
            text.contains("     1  step-000010        10    6.25            -  reward_model"),
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
        // A directory that is not a run is an error, not "no step finished yet".
        let empty = tempfile::tempdir().unwrap();
        let e = report(empty.path(), false).unwrap_err().to_string();
        assert!(e.contains("is not a run directory"), "{e}");
    }

    #[test]
    fn reports_the_run_state_elapsed_time_and_eta() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        std::fs::write(run.join("config.resolved.yaml"), "train:\n  steps: 12\n").unwrap();
        std::fs::write(
            run.join("metrics.jsonl"),
            "{\"step\":1,\"time/step_s\":30.0}\n{\"step\":2,\"time/step_s\":30.0}\n",
        )
        .unwrap();
        // Running, in this very process: 10 steps of 30 s to go.
        let started = now_unix() - 65;
        RunState::new(State::Running, None, started)
            .write(run)
            .unwrap();
        let text = report(run, false).unwrap();
        assert!(
            text.contains(&format!("state       running (pid {}", std::process::id())),
            "{text}"
        );
        assert!(
            text.contains("elapsed 1 min 0") && text.contains("eta 5 min 00 s"),
            "{text}"
        );
        // A launch whose process is gone without writing its end.
        let mut gone = RunState::new(State::Running, None, started);
        gone.pid = i32::MAX as u32;
        gone.write(run).unwrap();
        let text = report(run, false).unwrap();
        assert!(
            text.contains("its process (pid 2147483647") && text.contains("is gone"),
            "{text}"
        );
        // How it ended, with the reason.
        RunState::new(State::Failed, Some("worker `a` died".into()), started)
            .write(run)
            .unwrap();
        let text = report(run, false).unwrap();
        assert!(
            text.contains("state       failed: worker `a` died"),
            "{text}"
        );
        assert!(!text.contains("eta"), "{text}");
    }
}
