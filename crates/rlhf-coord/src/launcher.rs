//! The local launcher: starts one `rlhf-worker` process per placed worker on this machine, hands
//! each the coordinator's address, its name, the run token and the run's TLS directory (when
//! the run uses TLS) through the environment, sends
//! its output to `RUN_DIR/logs/NAME.log`, and reports a worker that exits before it is told to
//! stop as a failure (with the tail of its log).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rlhf_config::RunConfig;
use rlhf_proto::auth::{RunToken, TOKEN_ENV};
use rlhf_proto::tls::{RunTls, TLS_DIR_ENV};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::cluster::WorkerFailure;

/// Where the worker binary is: `launcher.worker_bin`, else `rlhf-worker` next to this executable.
pub fn worker_binary(cfg: &RunConfig) -> Result<PathBuf> {
    let path = match &cfg.launcher.worker_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating the rlhf-coord executable")?
            .with_file_name("rlhf-worker"),
    };
    if !path.is_file() {
        bail!(
            "worker binary not found at {} (launcher.worker_bin); build it with \
             `cargo build --release -p rlhf-worker` or set launcher.worker_bin",
            path.display()
        );
    }
    Ok(path)
}

/// A started worker process (the worker itself, or the `srun` that runs it as a Slurm task).
pub struct LocalWorker {
    pub name: String,
    pub log: PathBuf,
    pub child: Child,
    /// The Slurm node it runs on (None for local workers).
    pub node: Option<String>,
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The directories a worker's requests may name (its `--allow-root`s): the run directory
/// (checkpoint staging and restore) and the run's model directories (CreateRole).
pub fn allowed_roots(cfg: &RunConfig, run_dir: &Path) -> Vec<PathBuf> {
    let m = &cfg.models;
    let mut roots = vec![
        run_dir.to_path_buf(),
        m.policy.clone(),
        m.reference_dir().to_path_buf(),
        m.critic_dir().to_path_buf(),
    ];
    roots.extend(
        m.reward_sources()
            .iter()
            .filter_map(|s| s.config.path.clone()),
    );
    roots.sort();
    roots.dedup();
    roots
}

/// Starts every placed worker.
pub fn spawn_all(
    cfg: &RunConfig,
    bin: &Path,
    coordinator: &str,
    token: &RunToken,
    tls: Option<&RunTls>,
    run_dir: &Path,
    slurm: Option<&crate::slurm::Allocation>,
) -> Result<Vec<LocalWorker>> {
    let nodes = crate::slurm::node_indices(cfg);
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    // A worker outlives a vanished coordinator by at most this long.
    let orphan_s = (cfg.launcher.heartbeat_timeout_ms as f64 / 1000.0 * 2.0).max(5.0);
    let mut out = vec![];
    for (i, w) in cfg.workers.iter().enumerate() {
        let log = logs.join(format!("{}.log", w.name));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = file.try_clone()?;
        let node = match slurm {
            Some(a) => Some(a.nodes.get(nodes[i]).cloned().with_context(|| {
                format!(
                    "worker `{}` is placed on node {} but job {} has {} node(s) ({})",
                    w.name,
                    nodes[i],
                    a.job_id,
                    a.nodes.len(),
                    a.nodes.join(", ")
                )
            })?),
            None => None,
        };
        let mut cmd = match &node {
            // One Slurm task per worker; `--overlap` lets the tasks share the allocation's CPUs
            // with the coordinator (the batch step) and each other.
            Some(host) => {
                let mut c = Command::new("srun");
                c.args([
                    "--nodes=1",
                    "--ntasks=1",
                    "--overlap",
                    "--kill-on-bad-exit=1",
                ])
                .arg(format!("--nodelist={host}"))
                .arg(format!("--job-name=rlhf-worker-{}", w.name));
                if let Some(cpus) = cfg.launcher.slurm.cpus_per_task {
                    c.arg(format!("--cpus-per-task={cpus}"));
                }
                c.arg(bin);
                c
            }
            None => Command::new(bin),
        };
        for root in allowed_roots(cfg, run_dir) {
            cmd.arg("--allow-root").arg(root);
        }
        if let Some(iface) = &cfg.launcher.interface {
            cmd.env("RLHF_WORKER_INTERFACE", iface);
            // NCCL's bootstrap and rings choose their interface the same way, unless the user
            // already chose one for NCCL.
            if std::env::var_os("NCCL_SOCKET_IFNAME").is_none() {
                cmd.env("NCCL_SOCKET_IFNAME", iface);
            }
        }
        // With TLS the worker serves and calls over it only; without, never (nor with a
        // directory this process inherited).
        match tls {
            Some(t) => cmd.env(TLS_DIR_ENV, t.dir()),
            None => cmd.env_remove(TLS_DIR_ENV),
        };
        cmd.env("RLHF_COORD_ADDR", coordinator)
            .env("RLHF_WORKER_NAME", &w.name)
            .env("RLHF_WORKER_BIND", cfg.launcher.bind.to_string())
            .env("RLHF_WORKER_THREADS", w.threads.to_string())
            .env(
                "RLHF_REGISTER_TIMEOUT_S",
                cfg.launcher.startup_timeout_s.to_string(),
            )
            .env("RLHF_ORPHAN_TIMEOUT_S", orphan_s.to_string())
            .env(TOKEN_ENV, token.expose())
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            // Its own process group: a terminal's Ctrl-C (SIGINT to the foreground group) or a
            // signal to the coordinator's group reaches only the coordinator, which then
            // checkpoints with the workers' help before telling them to stop.
            .process_group(0);
        let child = cmd.spawn().with_context(|| match &node {
            Some(_) => format!(
                "starting worker `{}` with srun (is Slurm's srun on PATH inside the job?)",
                w.name
            ),
            None => format!("starting worker `{}` from {}", w.name, bin.display()),
        })?;
        info!(worker = %w.name, pid = child.id().unwrap_or(0), node = node.as_deref().unwrap_or("local"), log = %log.display(), "worker started");
        out.push(LocalWorker {
            name: w.name.clone(),
            log,
            child,
            node,
        });
    }
    Ok(out)
}

/// SIGKILL to a worker process (the forced exit on a second signal).
pub fn kill_hard(pid: u32) {
    // SAFETY: kill(2) with a pid we spawned and a constant signal; no memory is shared.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Watches the children: an exit before `stopping` is set becomes a failure on `tx`. Returns the
/// handles to stop them later.
pub fn watch_children(
    workers: Vec<LocalWorker>,
    roles: impl Fn(&str) -> Vec<String> + Send + 'static,
    tx: mpsc::UnboundedSender<WorkerFailure>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for mut w in workers {
            let tx = tx.clone();
            let roles = roles(&w.name);
            let mut stopping = stopping.clone();
            tasks.spawn(async move {
                tokio::select! {
                    status = w.child.wait() => {
                        let asked_to_stop = *stopping.borrow();
                        if asked_to_stop {
                            return;
                        }
                        let status = match status {
                            Ok(s) => describe(s),
                            Err(e) => format!("could not be waited for: {e}"),
                        };
                        let tail = log_tail(&w.log, 15);
                        let on = w
                            .node
                            .as_deref()
                            .map(|n| format!(" on node {n} (its Slurm task ended)"))
                            .unwrap_or_default();
                        let _ = tx.send(WorkerFailure {
                            worker: w.name.clone(),
                            roles,
                            lost: false,
                            cause: format!(
                                "exited unexpectedly{on} ({status}); log {}:\n{tail}",
                                w.log.display()
                            ),
                        });
                    }
                    _ = async { let _ = stopping.wait_for(|s| *s).await; } => {
                        // Asked to stop: give it time to exit cleanly, then kill it.
                        match tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await {
                            Ok(_) => {}
                            Err(_) => {
                                warn!(worker = %w.name, "did not exit within 10 s of the stop; killing it");
                                let _ = w.child.kill().await;
                            }
                        }
                    }
                }
            });
        }
        let _ = stopping.changed().await;
        while tasks.join_next().await.is_some() {}
    })
}

fn describe(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!(
            "killed by signal {sig}{}",
            if sig == 9 { " (SIGKILL)" } else { "" }
        ),
        _ => s.to_string(),
    }
}
