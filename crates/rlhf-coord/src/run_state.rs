//! `RUN_DIR/run_state.json`: what the last launch of a run is doing or how it ended, for
//! `rlhf-coord status`. `launch` writes it when it has taken the run directory (`running`) and
//! again when it returns (`finished`, `preempted` with the reason, `failed` with the error). A
//! launch killed outright cannot write its end: `status` then sees `running` with a process
//! that is gone, and says so.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const RUN_STATE_FILE: &str = "run_state.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Submitted to Slurm, not started yet.
    Queued,
    Running,
    /// Reached `train.steps`.
    Finished,
    /// Stopped early with its state saved (a signal, `checkpoint.must_save_by`): launch again
    /// (or let Slurm requeue it) to continue.
    Preempted,
    /// Stopped by an error.
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Finished => "finished",
            State::Preempted => "preempted",
            State::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub state: State,
    /// Why it stopped (preempted, failed), or the Slurm job (queued).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When this launch started (seconds since the Unix epoch).
    pub started_unix: u64,
    /// When this file was last written.
    pub updated_unix: u64,
    pub host: String,
    pub pid: u32,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl RunState {
    /// A state of this process, started at `started_unix`.
    pub fn new(state: State, reason: Option<String>, started_unix: u64) -> RunState {
        RunState {
            state,
            reason,
            started_unix,
            updated_unix: now_unix(),
            host: rlhf_comm::net::host_name(),
            pid: std::process::id(),
        }
    }

    pub fn write(&self, run_dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        rlhf_ckpt::write_atomic(&run_dir.join(RUN_STATE_FILE), text.as_bytes())
            .with_context(|| format!("writing {}", run_dir.join(RUN_STATE_FILE).display()))
    }

    /// The run's state file; `None` when the run has none (launched before it existed).
    pub fn read(run_dir: &Path) -> Result<Option<RunState>> {
        let path = run_dir.join(RUN_STATE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Some(serde_json::from_str(&t).with_context(|| {
                format!("{} is not a run state file", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Whether the launch that wrote this is still alive: `None` when it ran on another host
    /// (this process cannot tell).
    pub fn process_alive(&self) -> Option<bool> {
        if self.host != rlhf_comm::net::host_name() {
            return None;
        }
        // SAFETY: kill with signal 0 sends nothing; it only checks the pid exists.
        let r = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
        Some(r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
    }
}
