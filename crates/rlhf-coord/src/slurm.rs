//! The Slurm launcher. Outside an allocation, `launch` with `launcher.kind: slurm` writes an
//! sbatch script into the run directory and submits it (`--dry-run` prints it). The script runs
//! `rlhf-coord launch` again inside the allocation, where this module reads the Slurm
//! environment, places each configured worker on a node, and the launcher starts one
//! `rlhf-worker` per worker as its own Slurm task (`srun --nodes=1 --ntasks=1 --nodelist=HOST
//! --overlap`), so Slurm accounts, signals and kills them like any job step.
//!
//! Stopping and coming back. The batch script `exec`s the coordinator, so every signal Slurm
//! sends the batch step reaches it directly: USR1 `signal_grace_s` before the walltime
//! (`--signal=B:USR1@N`), SIGTERM from a preemption (with or without
//! `preempt_send_user_signal`), a time limit or `scancel`. Workers hold their ground on those
//! signals (rlhf-worker's daemon); the coordinator finishes the step, writes a checkpoint, stops
//! the workers and then decides ([`Requeue`]): a job that still runs (preempted with a grace
//! time, warned before its time limit, signalled with `scancel --signal`, or that lost a node)
//! requeues itself with `scontrol requeue`, unless `launcher.slurm.max_restarts` restarts in a
//! row ended without a new checkpoint; a job Slurm is already ending (a plain `scancel`, the
//! time limit itself, a preemption with `GraceTime=0`) is left to Slurm, which requeues the
//! preempted one and leaves the cancelled one ended.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use rlhf_config::RunConfig;

/// The allocation, from the environment Slurm gives the batch script.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub job_id: String,
    /// Host names, in Slurm's order (the batch script runs on the first).
    pub nodes: Vec<String>,
    /// `SLURM_RESTART_COUNT`: how often the job was requeued.
    pub restarts: u32,
    /// `SLURM_GPUS_ON_NODE`, when set.
    pub gpus_per_node: Option<u32>,
}

impl Allocation {
    /// Refuses a placement that uses more GPUs per node than the job has.
    pub fn check_devices(&self, cfg: &RunConfig) -> Result<()> {
        let Some(have) = self.gpus_per_node else {
            return Ok(());
        };
        for w in &cfg.workers {
            if let rlhf_config::Device::Cuda(g) = w.device {
                let need = g.unwrap_or(0) + 1;
                if need > have {
                    bail!(
                        "worker `{}` uses {} but job {} has {have} GPU(s) per node (SLURM_GPUS_ON_NODE); fix workers[].device or launcher.slurm.gpus_per_node",
                        w.name, w.device, self.job_id
                    );
                }
            }
        }
        Ok(())
    }
}

/// True inside a Slurm job.
pub fn in_allocation() -> bool {
    std::env::var_os("SLURM_JOB_ID").is_some()
}

/// Inside a Slurm job that Slurm or the job itself requeued (`SLURM_RESTART_COUNT` > 0): the run
/// directory's steps are this job's own, to be redone when they have no checkpoint.
pub fn is_requeued_job() -> bool {
    in_allocation()
        && std::env::var("SLURM_RESTART_COUNT")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .is_some_and(|n| n > 0)
}

/// Reads the allocation; the node list is expanded with `scontrol show hostnames`.
pub fn allocation() -> Result<Allocation> {
    let job_id = std::env::var("SLURM_JOB_ID").context("SLURM_JOB_ID is not set")?;
    let list = std::env::var("SLURM_JOB_NODELIST")
        .or_else(|_| std::env::var("SLURM_NODELIST"))
        .context("SLURM_JOB_NODELIST is not set inside the Slurm job")?;
    let nodes: Vec<String> = scontrol(&["show", "hostnames", &list])?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if nodes.is_empty() {
        bail!("the node list `{list}` of job {job_id} expands to no host");
    }
    for n in &nodes {
        use std::net::ToSocketAddrs;
        if (n.as_str(), 0u16).to_socket_addrs().is_err() {
            bail!(
                "node `{n}` of job {job_id} (node list `{list}`) does not resolve to an address;                  workers there could not reach the coordinator — check the cluster's DNS or /etc/hosts"
            );
        }
    }
    let restarts = std::env::var("SLURM_RESTART_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // GPUs Slurm gave each node (`--gpus-per-node`), when it says.
    let gpus_per_node = std::env::var("SLURM_GPUS_ON_NODE")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    Ok(Allocation {
        job_id,
        nodes,
        restarts,
        gpus_per_node,
    })
}

/// The node index of each worker, in `cfg.workers` order: `workers[].node`, else round-robin.
pub fn node_indices(cfg: &RunConfig) -> Vec<usize> {
    let n = cfg.launcher.slurm.nodes.max(1) as usize;
    cfg.workers
        .iter()
        .enumerate()
        .map(|(i, w)| w.node.unwrap_or(i % n))
        .collect()
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The sbatch script for a run file `file` (absolute) with `--set` overrides `sets`.
pub fn sbatch_script(
    cfg: &RunConfig,
    coord_bin: &Path,
    file: &Path,
    sets: &[String],
    run_dir: &Path,
) -> String {
    let s = &cfg.launcher.slurm;
    let workers = cfg.workers.len();
    let nodes = s.nodes.max(1) as usize;
    let idx = node_indices(cfg);
    let per_node = (0..nodes)
        .map(|n| idx.iter().filter(|&&i| i == n).count())
        .max()
        .unwrap_or(workers)
        .max(1);
    let mut d = vec![
        format!("--job-name=rlhf-{}", cfg.run.name),
        format!("--nodes={nodes}"),
        format!("--ntasks-per-node={per_node}"),
    ];
    if s.gpus_per_node > 0 {
        d.push(format!("--gpus-per-node={}", s.gpus_per_node));
    }
    if let Some(c) = s.cpus_per_task {
        d.push(format!("--cpus-per-task={c}"));
    }
    if let Some(p) = &s.partition {
        d.push(format!("--partition={p}"));
    }
    if let Some(a) = &s.account {
        d.push(format!("--account={a}"));
    }
    if let Some(t) = &s.time {
        d.push(format!("--time={t}"));
    }
    d.push("--requeue".into());
    d.push(format!("--signal=B:USR1@{}", s.signal_grace_s));
    d.push(format!(
        "--output={}",
        run_dir.join("slurm").join("slurm-%j.out").display()
    ));
    d.push("--open-mode=append".into());
    let mut text = String::from("#!/bin/bash\n");
    text.push_str(&format!(
        "# Written by `rlhf-coord launch` for run `{}`; submitted with sbatch.\n",
        cfg.run.name
    ));
    for x in d {
        text.push_str(&format!("#SBATCH {x}\n"));
    }
    for x in &s.extra_directives {
        let x = x.trim();
        let x = x.strip_prefix("#SBATCH").unwrap_or(x).trim();
        text.push_str(&format!("#SBATCH {x}\n"));
    }
    let mut cmd = vec![
        sh_quote(&coord_bin.to_string_lossy()),
        "launch".into(),
        sh_quote(&file.to_string_lossy()),
    ];
    for x in sets {
        cmd.push("--set".into());
        cmd.push(sh_quote(x));
    }
    text.push_str(&format!(
        r#"
# The coordinator runs here, on the first node, in place of this shell (exec), so Slurm's
# signals reach it once and directly: USR1 before the walltime (--signal above), TERM from a
# preemption, a time limit or scancel. It finishes the step, writes a checkpoint, stops its
# workers (one Slurm task each, started with srun), and requeues the job itself unless the
# user cancelled it. Slurm may send USR1 up to a minute early, so with a short walltime it can
# come while the coordinator is still loading (libtorch takes a moment), before it handles
# signals: ignored until then (the ignore survives exec; its handler replaces it), it cannot kill
# the job outright, and the walltime's TERM still stops the run with a checkpoint.
echo "rlhf-coord: job $SLURM_JOB_ID start ${{SLURM_RESTART_COUNT:-0}} on $(hostname) at $(date -u +%FT%TZ)"
trap '' USR1
exec {cmd}
"#,
        cmd = cmd.join(" ")
    ));
    text
}

/// Runs `scontrol ARGS`; its stdout, or an error with the command and its stderr.
fn scontrol(args: &[&str]) -> Result<String> {
    let shown = args.join(" ");
    let out = Command::new("scontrol")
        .args(args)
        .output()
        .with_context(|| format!("running `scontrol {shown}` (is Slurm's scontrol on PATH?)"))?;
    if !out.status.success() {
        bail!(
            "`scontrol {shown}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Slurm state of job `id` (`JobState` of `scontrol show job`: RUNNING, PENDING, ...; a job
/// being ended shows COMPLETING, whatever ended it).
pub fn job_state(id: &str) -> Result<String> {
    let text = scontrol(&["show", "job", "--oneliner", id])?;
    text.split_whitespace()
        .find_map(|f| f.strip_prefix("JobState="))
        .map(str::to_string)
        .with_context(|| format!("no JobState in `scontrol show job {id}`: {}", text.trim()))
}

/// A job state after a requeue: waiting to start again.
fn requeued(state: &str) -> bool {
    matches!(
        state,
        "PENDING" | "REQUEUED" | "REQUEUE_FED" | "REQUEUE_HOLD"
    )
}

/// The restarts in a row that ended without a new checkpoint, kept in the run directory
/// (`slurm/restarts.json`) across requeues.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct RestartCount {
    without_progress: u32,
}

/// A job that stopped early (preempted, timed out, signalled, a node lost) requeueing itself.
pub struct Requeue<'a> {
    pub run_dir: &'a Path,
    /// The checkpoint step this launch resumed from (None: it started fresh).
    pub resumed_from: Option<u64>,
    /// `launcher.slurm.max_restarts`.
    pub max_restarts: u32,
}

impl Requeue<'_> {
    /// Requeues job `a` (`scontrol requeue`) unless Slurm is already ending it (cancelled, timed
    /// out, requeued by Slurm) or too many restarts in a row made no progress; says which on
    /// stderr. Returns whether the job is coming back.
    pub fn run(&self, a: &Allocation, why: &str) -> Result<bool> {
        let id = &a.job_id;
        // Only a job that still runs asks to come back. A cancelled or timed-out job, or one
        // Slurm is already requeueing (a preemption with GraceTime=0, a node failure), is
        // COMPLETING (`scontrol` shows that flag instead of the base state), and `scontrol
        // requeue` would bring even a cancelled job back: leave those to Slurm.
        let state = job_state(id)?;
        match state.as_str() {
            "RUNNING" => {}
            s if requeued(s) => {
                eprintln!("rlhf-coord: Slurm already requeued job {id} ({why})");
                return Ok(true);
            }
            other => {
                eprintln!(
                    "rlhf-coord: job {id} is ending (JobState={other}: cancelled, timed out, or being \
                     requeued by Slurm itself); not requeueing it ({why})"
                );
                return Ok(false);
            }
        }
        if self.max_restarts == 0 {
            eprintln!(
                "rlhf-coord: launcher.slurm.max_restarts is 0; not requeueing job {id} ({why})"
            );
            return Ok(false);
        }
        let path = self.run_dir.join("slurm").join("restarts.json");
        let mut count: RestartCount = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let latest = rlhf_ckpt::read_latest(self.run_dir)?
            .as_deref()
            .and_then(rlhf_ckpt::parse_dir_name);
        let progressed = latest > self.resumed_from;
        count.without_progress = if progressed {
            0
        } else {
            count.without_progress + 1
        };
        if count.without_progress > self.max_restarts {
            eprintln!(
                "rlhf-coord: not requeueing job {id} ({why}): {} restarts in a row ended without a \
                 new checkpoint (launcher.slurm.max_restarts = {}); look at the logs under {}, then \
                 launch again to resume",
                count.without_progress,
                self.max_restarts,
                self.run_dir.join("logs").display()
            );
            return Ok(false);
        }
        std::fs::create_dir_all(path.parent().unwrap_or(self.run_dir))
            .with_context(|| format!("creating {}", self.run_dir.join("slurm").display()))?;
        rlhf_ckpt::write_atomic(&path, &serde_json::to_vec(&count)?)?;
        if let Err(e) = scontrol(&["requeue", id]) {
            let now = job_state(id).unwrap_or_default();
            if requeued(&now) {
                eprintln!("rlhf-coord: Slurm already requeued job {id} ({why})");
                return Ok(true);
            }
            return Err(e.context(format!("job {id} is in state {now}")));
        }
        eprintln!(
            "rlhf-coord: requeueing job {id} ({why}; newest checkpoint {}); it resumes from there",
            latest.map_or("none".into(), rlhf_ckpt::dir_name)
        );
        Ok(true)
    }
}

/// Writes the script to `RUN_DIR/slurm/job.sbatch` and submits it; returns the job id.
pub fn submit(script: &str, run_dir: &Path) -> Result<(String, PathBuf)> {
    let dir = run_dir.join("slurm");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("job.sbatch");
    rlhf_ckpt::write_atomic(&path, script.as_bytes())?;
    let out = match Command::new("sbatch").arg("--parsable").arg(&path).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "`sbatch` is not on PATH: launcher.kind: slurm submits with Slurm's sbatch (run on a \
             Slurm login node, or use launcher.kind: local); the script is at {}",
            path.display()
        ),
        Err(e) => return Err(e).context("running sbatch"),
    };
    if !out.status.success() {
        bail!(
            "sbatch refused the job ({}): {}\nthe script is at {}; check launcher.slurm (partition, account, time, nodes, gpus_per_node)",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            path.display()
        );
    }
    let id = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or("")
        .to_string();
    if id.is_empty() {
        bail!("sbatch printed no job id");
    }
    Ok((id, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_spaces_and_quotes() {
        assert_eq!(sh_quote("a.yaml"), "a.yaml");
        assert_eq!(sh_quote("train.steps=3"), "train.steps=3");
        assert_eq!(sh_quote("it's here"), r"'it'\''s here'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn script_has_the_directives_and_the_forwarding() {
        let mut cfg = RunConfig::default();
        cfg.run.name = "r".into();
        cfg.launcher.slurm.nodes = 2;
        cfg.launcher.slurm.gpus_per_node = 4;
        cfg.launcher.slurm.partition = Some("gpu".into());
        cfg.launcher.slurm.time = Some("12:00:00".into());
        cfg.launcher.slurm.signal_grace_s = 300;
        cfg.launcher.slurm.extra_directives =
            vec!["#SBATCH --exclusive".into(), "--qos=high".into()];
        let s = sbatch_script(
            &cfg,
            Path::new("/opt/bin/rlhf-coord"),
            Path::new("/home/u/run file.yaml"),
            &["train.steps=5".into()],
            Path::new("/runs/r"),
        );
        for want in [
            "#SBATCH --nodes=2\n",
            "#SBATCH --ntasks-per-node=2\n",
            "#SBATCH --gpus-per-node=4\n",
            "#SBATCH --partition=gpu\n",
            "#SBATCH --time=12:00:00\n",
            "#SBATCH --requeue\n",
            "#SBATCH --signal=B:USR1@300\n",
            "#SBATCH --output=/runs/r/slurm/slurm-%j.out\n",
            "#SBATCH --exclusive\n",
            "#SBATCH --qos=high\n",
            "exec /opt/bin/rlhf-coord launch '/home/u/run file.yaml' --set train.steps=5\n",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        assert_eq!(node_indices(&cfg), [0, 1, 0, 1]);
    }

    #[test]
    fn a_usr1_before_the_coordinator_handles_signals_does_not_kill_the_job() {
        // The script run by bash as the batch step, with a stand-in coordinator that gets
        // USR1 at once, before it could install a handler (as while libtorch loads).
        let tmp = tempfile::tempdir().unwrap();
        let coord = tmp.path().join("coord");
        std::fs::write(
            &coord,
            "#!/bin/sh\nkill -USR1 $$\nsleep 0.2\necho survived \"$1\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&coord, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let script = tmp.path().join("job.sh");
        let mut cfg = RunConfig::default();
        cfg.run.name = "r".into();
        std::fs::write(
            &script,
            sbatch_script(&cfg, &coord, Path::new("run.yaml"), &[], tmp.path()),
        )
        .unwrap();
        let out = Command::new("bash").arg(&script).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("survived launch"),
            "{:?}: {stdout}",
            out.status
        );
    }
}
