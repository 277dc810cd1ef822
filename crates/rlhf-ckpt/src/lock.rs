//! One process per run directory: [`RunLock`] holds an exclusive `flock(2)` on `RUN/run.lock`
//! for as long as a launch writes checkpoints and metrics there. The kernel releases it when the
//! holder exits however it exits (SIGKILL, a Slurm requeue, a node reboot), so a lock from a
//! dead process never needs clearing by hand: the next launch takes it over. The file also
//! holds the holder's host, pid and start time, only to name it when another launch is refused.
//!
//! The file is never deleted: removing it while another process waits on the old inode would
//! let two processes each hold "the" lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use fs4::fs_std::FileExt;
use serde::{Deserialize, Serialize};

use crate::{io, CkptError, Result};

/// The lock file inside a run directory.
pub const LOCK_FILE: &str = "run.lock";

/// Who holds (or last held) a run directory's lock, as written in [`LOCK_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// Seconds since the Unix epoch when it took the lock.
    pub since_unix: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host {}, pid {}, since unix time {}",
            self.host, self.pid, self.since_unix
        )
    }
}

/// The exclusive lock on a run directory; released when dropped or when the process ends.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
    /// The previous holder named in the file when this one took the lock over (it had died).
    stale: Option<Holder>,
}

impl RunLock {
    /// Takes the lock of `run_dir` (which must exist) for this process on `host`. Refused with
    /// [`CkptError::Locked`] naming the holder when another process has it; a lock file left by
    /// a process that is gone is taken over.
    pub fn acquire(run_dir: &Path, host: &str) -> Result<RunLock> {
        let path = run_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        let got = file.try_lock_exclusive().map_err(|e| CkptError::Usage(format!(
            "{}: cannot lock the run directory ({e}); the file system may not support flock (Lustre: mount with -o flock; see docs/security.md)",
            path.display()
        )))?;
        let previous = read_holder(&mut file);
        if !got {
            let holder = match previous {
                Some(h) => h.to_string(),
                None => "a process that has not written its name yet".into(),
            };
            return Err(CkptError::Locked {
                dir: run_dir.to_path_buf(),
                holder,
            });
        }
        let me = Holder {
            host: host.to_string(),
            pid: std::process::id(),
            since_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let mut bytes = serde_json::to_vec(&me)
            .map_err(|e| CkptError::Usage(format!("{}: cannot serialise: {e}", path.display())))?;
        bytes.push(b'\n');
        file.set_len(0).map_err(io(&path))?;
        file.seek(SeekFrom::Start(0)).map_err(io(&path))?;
        file.write_all(&bytes).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))?;
        // A held lock whose file names another process means that process died holding it.
        let stale = previous.filter(|p| *p != me);
        if let Some(old) = &stale {
            tracing::info!(lock = %path.display(), previous = %old, "took over the run directory lock of a process that is gone");
        }
        Ok(RunLock { file, path, stale })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The holder the file named when this lock was taken, if that was another process (which
    /// had ended without clearing it).
    pub fn took_over(&self) -> Option<&Holder> {
        self.stale.as_ref()
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Cleared while still held, so a reader never sees a live holder that is gone; closing
        // the file then releases the lock. Both best effort: exit releases it anyway.
        let _ = self.file.set_len(0);
        let _ = FileExt::unlock(&self.file);
    }
}

/// The holder written in the lock file; None when it is empty or unreadable (a holder that has
/// just locked it and not yet written, or a cleanly released lock).
fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_the_lock_is_free_after_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(tmp.path(), "node-a").unwrap();
        assert!(first.took_over().is_none());
        // flock is per open file description: a second open in this process contends too.
        let e = RunLock::acquire(tmp.path(), "node-b").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("host node-a") && msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        let again = RunLock::acquire(tmp.path(), "node-b").unwrap();
        assert!(again.took_over().is_none(), "a released lock is not stale");
    }

    #[test]
    fn a_file_left_by_a_dead_holder_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = Holder {
            host: "gone".into(),
            pid: 999_999,
            since_unix: 1,
        };
        std::fs::write(
            tmp.path().join(LOCK_FILE),
            serde_json::to_vec(&dead).unwrap(),
        )
        .unwrap();
        let l = RunLock::acquire(tmp.path(), "here").unwrap();
        assert_eq!(l.took_over(), Some(&dead));
        let text = std::fs::read_to_string(l.path()).unwrap();
        assert!(text.contains("\"here\""), "{text}");
    }
}
