//! A real Slurm cluster for the tests (`scripts/slurm-local.sh`): single-node on loopback, or
//! several nodes in their own network namespaces; submitting runs and watching their jobs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{coord, repo, text};

/// A Slurm cluster from `scripts/slurm-local.sh up`, torn down on drop.
pub struct Cluster {
    pub dir: String,
    pub conf: String,
    /// Node names, in order (multi-node mode); empty for the single-node cluster.
    pub nodes: Vec<String>,
}

/// True when Slurm is installed; otherwise SKIPPED, or a failure under `RLHF_REQUIRE_SLURM=1`
/// (what `scripts/test.sh` sets as root, so CI cannot pass by skipping).
pub fn have_slurm() -> bool {
    let have = Command::new("sh")
        .args([
            "-c",
            "command -v sbatch && command -v slurmctld && command -v munged",
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        assert!(
            std::env::var("RLHF_REQUIRE_SLURM").as_deref() != Ok("1"),
            "RLHF_REQUIRE_SLURM=1 but Slurm is not installed (scripts/slurm-local.sh install)"
        );
        eprintln!("SKIPPED: Slurm is not installed (scripts/slurm-local.sh install)");
    }
    have
}

impl Cluster {
    /// The single-node cluster on loopback.
    pub fn up() -> Option<Cluster> {
        Cluster::start(&[], &[])
    }

    /// `nodes` nodes, each in its own network namespace, with the extra environment `env`
    /// (the script's knobs: grace time, slurmd timeout).
    pub fn up_nodes(nodes: usize, env: &[(&str, &str)]) -> Option<Cluster> {
        Cluster::start(&["--nodes", &nodes.to_string()], env)
    }

    fn start(args: &[&str], env: &[(&str, &str)]) -> Option<Cluster> {
        if !have_slurm() {
            return None;
        }
        let out = Command::new(repo().join("scripts/slurm-local.sh"))
            .arg("up")
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "slurm-local.sh up:\n{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {k}=")))
                .map(|v| v.trim_matches(|c| c == '"' || c == '\'').to_string())
        };
        let nodes = get("RLHF_SLURM_NODES")
            .map(|v| {
                v.split([' ', ','])
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Some(Cluster {
            dir: get("RLHF_SLURM_DIR").unwrap_or_else(|| panic!("no RLHF_SLURM_DIR in:\n{stdout}")),
            conf: get("SLURM_CONF").unwrap_or_else(|| panic!("no SLURM_CONF in:\n{stdout}")),
            nodes,
        })
    }

    /// A Slurm client command for this cluster.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// Runs a Slurm client command that must succeed; returns its stdout.
    pub fn run(&self, prog: &str, args: &[&str]) -> String {
        let out = self.cmd(prog).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{prog} {}: {}",
            args.join(" "),
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `scripts/slurm-local.sh link NODE up|down`: the node's network link.
    pub fn link(&self, node: &str, up: bool) {
        let out = Command::new(repo().join("scripts/slurm-local.sh"))
            .args(["link", node, if up { "up" } else { "down" }, &self.dir])
            .output()
            .unwrap();
        assert!(out.status.success(), "link {node}: {}", text(&out));
    }

    /// `rlhf-coord launch FILE` outside an allocation: submits; returns the job id.
    pub fn launch(&self, f: &Path, set: &[&str]) -> String {
        let mut c = coord();
        c.env("SLURM_CONF", &self.conf).arg("launch").arg(f);
        for s in set {
            c.args(["--set", s]);
        }
        let out = c.output().unwrap();
        let t = text(&out);
        assert!(out.status.success(), "launch (submit):\n{t}");
        t.split("submitted job ")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .unwrap_or_else(|| panic!("no job id in:\n{t}"))
            .trim()
            .to_string()
    }

    /// The job's state as squeue shows it (empty once it has left the queue).
    pub fn job_state(&self, id: &str) -> String {
        let out = self
            .cmd("squeue")
            .args(["-h", "-j", id, "-o", "%T"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn job_active(&self, id: &str) -> bool {
        !self.job_state(id).is_empty()
    }

    /// `JobState` and `NodeList` of `scontrol show job` (kept for MinJobAge after the end).
    pub fn job_field(&self, id: &str, field: &str) -> String {
        let out = self
            .cmd("scontrol")
            .args(["show", "job", "--oneliner", id])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{field}=")))
            .unwrap_or("")
            .to_string()
    }

    /// Waits until the job has left the queue; on timeout cancels it and fails with its output.
    pub fn wait_gone(&self, id: &str, limit: Duration, what: &str, out_file: &Path) {
        self.wait_until(limit, what, out_file, || !self.job_active(id));
    }

    /// Waits for `done`; on timeout fails with the job output `out_file`.
    pub fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        out_file: &Path,
        mut done: impl FnMut() -> bool,
    ) {
        let t0 = Instant::now();
        while !done() {
            if t0.elapsed() > limit {
                let _ = self.cmd("scancel").arg("--user=root").status();
                panic!(
                    "{what}: not done after {limit:?}; job output:\n{}{}",
                    std::fs::read_to_string(out_file).unwrap_or_default(),
                    worker_logs(out_file)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/slurm-local.sh"))
            .args(["down", &self.dir])
            .status();
    }
}

/// The last lines of every worker log of the run whose job output is `RUN/slurm/OUT`.
fn worker_logs(out_file: &Path) -> String {
    let Some(run) = out_file.parent().and_then(Path::parent) else {
        return String::new();
    };
    let mut logs: Vec<_> = std::fs::read_dir(run.join("logs"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    logs.sort();
    logs.iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "\n==> {} (last 40 lines) <==\n{}",
                p.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            )
        })
        .collect()
}

/// The `step` of every line of `RUN/metrics.jsonl`, in order.
pub fn steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .collect()
}

/// Waits until `metrics.jsonl` has `step` lines.
pub fn wait_for_step(run: &Path, step: u64, limit: Duration, out_file: &Path) {
    let t0 = Instant::now();
    while (steps(run).len() as u64) < step {
        assert!(
            t0.elapsed() < limit,
            "no step {step} after {limit:?}; job output:\n{}{}",
            std::fs::read_to_string(out_file).unwrap_or_default(),
            worker_logs(out_file)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
