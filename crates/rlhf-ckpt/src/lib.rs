//! `rlhf-ckpt`: the on-disk checkpoint format of every training job (reward-model and SFT jobs
//! today, the RLHF loop later), at the level of files: what a complete checkpoint is, how one is
//! written atomically, and how resume finds the newest one that is intact.
//!
//! Layout under a run directory (see `shared/DESIGN.md`, "Run directory"):
//!
//! ```text
//! RUN/checkpoints/step-000120/          one complete checkpoint
//!     manifest.json                     written last: format, step, files (size + sha256), metadata
//!     ...                               whatever the job wrote (any subdirectories)
//! RUN/checkpoints/step-000130.tmp-XXXX  a checkpoint being written (or left by a crash)
//! RUN/checkpoints/LATEST                name of the newest committed checkpoint (atomic rename)
//! ```
//!
//! A job calls [`CheckpointWriter::begin`], writes its files into [`CheckpointWriter::dir`] (a
//! staging directory), and calls [`CheckpointWriter::commit`], which fsyncs every file, writes
//! `manifest.json` last, renames the staging directory into place and then points `LATEST` at it.
//! [`latest_valid`] takes the checkpoint `LATEST` names when it verifies and otherwise the newest
//! directory whose manifest verifies, and reports which one it took and why others were rejected.
//! [`prune`] keeps the last N and never deletes a protected checkpoint ([`protect`]).
//!
//! [`confine`] is the one check for paths read back from a run's own files or requests
//! (`join_within`, `check_within`); [`lock`] keeps a run directory to one process at a time
//! ([`RunLock`]).
//!
//! May use: serde, sha2, fs4 (flock), the standard library. Knows nothing about tensors, tch, models or the
//! controller: the payload is opaque files, so any job (and any future role) can use the format.
//! **Invariant:** one process writes checkpoints into a run directory at a time (it holds the
//! [`RunLock`]).
//! **Invariant:** every path read from a manifest, `LATEST` or a caller's file goes through
//! [`confine`] before it is opened: nothing outside the checkpoints directory is read, written or
//! deleted, also through symlinks.

pub mod confine;
pub mod lock;

pub use confine::{check_within, join_within, PathEscape};
pub use lock::{Holder, RunLock, LOCK_FILE};

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of `manifest.json` this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest file inside a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";
/// The pointer file inside the checkpoints directory.
pub const LATEST: &str = "LATEST";
/// The checkpoints directory inside a run directory.
pub const CHECKPOINTS: &str = "checkpoints";
/// Marker file that makes [`prune`] keep a checkpoint (not listed in the manifest).
pub const PROTECTED: &str = "PROTECTED";
/// Infix of staging directories and temporary files.
const TMP_INFIX: &str = ".tmp-";

/// Errors of this crate; each names the path at fault.
#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint directory failed verification.
    #[error("checkpoint {}: {reason}", dir.display())]
    Invalid { dir: PathBuf, reason: String },
    /// Another process holds the run directory ([`RunLock`]).
    #[error("run directory {} is in use by another launch ({holder}); stop that one or wait for it to end (the lock is released when its process exits), or use another run.dir", dir.display())]
    Locked { dir: PathBuf, holder: String },
    /// A caller asked for something the format does not allow.
    #[error("{0}")]
    Usage(String),
}

pub type Result<T, E = CkptError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CkptError + '_ {
    move |source| CkptError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file of a checkpoint, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the checkpoint directory, `/`-separated.
    pub path: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the contents.
    pub sha256: String,
}

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    pub step: u64,
    /// Seconds since the Unix epoch at commit.
    pub created_unix: u64,
    /// Every file of the checkpoint except the manifest itself, sorted by path.
    pub files: Vec<FileEntry>,
    /// Free-form job metadata (job kind, loss, epoch, ...).
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// A committed checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    pub step: u64,
    /// `RUN/checkpoints/step-NNNNNN`.
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// The directory name of the checkpoint at `step`: `step-NNNNNN` (zero-padded to six digits so
/// names sort by step up to a million; larger steps still parse).
pub fn dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// The step of a committed checkpoint's directory name; `None` for anything else (staging
/// directories, `LATEST`, stray files).
pub fn parse_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `RUN/checkpoints`.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINTS)
}

/// A suffix unique within this machine for temporary names: pid, clock and a counter.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{:x}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn fsync_dir(dir: &Path) -> Result<()> {
    // Directory fsync makes renames and new entries durable; it is a no-op where unsupported.
    match fs::File::open(dir) {
        Ok(f) => f.sync_all().or_else(|e| {
            if e.kind() == std::io::ErrorKind::InvalidInput {
                Ok(())
            } else {
                Err(io(dir)(e))
            }
        }),
        Err(e) => Err(io(dir)(e)),
    }
}

/// Writes `bytes` to `path` atomically and durably: readers see the old contents or the new ones,
/// never a torn file, and the new ones survive a crash once this returns. The one implementation
/// every crate of the workspace uses is `atomic-write-file` (temporary file in the same directory,
/// fsync, rename, directory fsync); a bare file name means the current directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = atomic_write_file::AtomicWriteFile::open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.commit().map_err(io(path))
}

/// SHA-256 and size of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&h.finalize()), size))
}

/// Fsyncs and hashes the files `rels` under `dir`, several at a time: concurrent fsyncs share
/// the file system's journal commits (a checkpoint of many small files costs about one flush
/// instead of one per file) and large files hash on all cores. Entries come back in `rels`'
/// order.
fn sync_and_hash(dir: &Path, rels: Vec<String>) -> Result<Vec<FileEntry>> {
    par_map(&rels, |rel| {
        let path = dir.join(rel);
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
        let (sha256, size) = hash_file(&path)?;
        Ok(FileEntry {
            path: rel.clone(),
            size,
            sha256,
        })
    })
}

/// `one` over `rels` on up to 8 threads; results in `rels`' order.
fn par_map<T: Send>(rels: &[String], one: impl Fn(&String) -> Result<T> + Sync) -> Result<Vec<T>> {
    const THREADS: usize = 8;
    let n = rels.len().clamp(1, THREADS);
    let one = &one;
    let mut slots: Vec<Option<Result<T>>> = (0..rels.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|t| {
                s.spawn(move || {
                    (t..rels.len())
                        .step_by(n)
                        .map(|i| (i, one(&rels[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (i, r) in h.join().expect("checkpoint hashing thread panicked") {
                slots[i] = Some(r);
            }
        }
    });
    slots
        .into_iter()
        .map(|r| r.expect("every file is hashed"))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Every regular file under `root`, as sorted `/`-separated relative paths. Symlinks and other
/// special files are refused: a checkpoint must be self-contained.
fn list_files(root: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| {
                CkptError::Usage(format!(
                    "{}: file names in a checkpoint must be UTF-8",
                    entry.path().display()
                ))
            })?;
            let child = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let ft = entry.file_type().map_err(io(&entry.path()))?;
            if ft.is_dir() {
                walk(root, &child, out)?;
            } else if ft.is_file() {
                out.push(child);
            } else {
                return Err(CkptError::Usage(format!(
                    "{}: not a regular file (symlinks are not allowed in a checkpoint)",
                    entry.path().display()
                )));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// Writes one checkpoint: files go into a staging directory; [`CheckpointWriter::commit`] makes
/// it a checkpoint. Dropping the writer without committing removes the staging directory (a
/// crash leaves it behind, and the next [`CheckpointWriter::begin`] cleans it up).
#[derive(Debug)]
pub struct CheckpointWriter {
    root: PathBuf,
    step: u64,
    stage: PathBuf,
    done: bool,
}

impl CheckpointWriter {
    /// Starts the checkpoint of `step` under `run_dir/checkpoints`, creating it if needed and
    /// removing staging directories and temporary files that earlier crashes left there.
    pub fn begin(run_dir: &Path, step: u64) -> Result<CheckpointWriter> {
        let root = checkpoints_dir(run_dir);
        fs::create_dir_all(&root).map_err(io(&root))?;
        clean_stale(run_dir)?;
        let stage = root.join(format!("{}{TMP_INFIX}{}", dir_name(step), unique_suffix()));
        fs::create_dir(&stage).map_err(io(&stage))?;
        Ok(CheckpointWriter {
            root,
            step,
            stage,
            done: false,
        })
    }

    /// The staging directory to write files into.
    pub fn dir(&self) -> &Path {
        &self.stage
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Writes `rel` (a `/`-separated relative path) inside the staging directory.
    pub fn write_file(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        let path = self.stage_path(rel)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        fs::write(&path, bytes).map_err(io(&path))
    }

    /// Writes `value` as pretty JSON to `rel` inside the staging directory.
    pub fn write_json<T: Serialize>(&self, rel: &str, value: &T) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| CkptError::Usage(format!("{rel}: cannot serialise: {e}")))?;
        bytes.push(b'\n');
        self.write_file(rel, &bytes)
    }

    fn stage_path(&self, rel: &str) -> Result<PathBuf> {
        check_rel(rel).map_err(CkptError::Usage)?;
        if rel == MANIFEST || rel == PROTECTED {
            return Err(CkptError::Usage(format!(
                "{rel}: reserved name inside a checkpoint"
            )));
        }
        Ok(self.stage.join(rel))
    }

    /// Fsyncs every file, writes the manifest last, renames the staging directory to
    /// `step-NNNNNN` (replacing an existing checkpoint of the same step) and points `LATEST` at
    /// it.
    pub fn commit(mut self, metadata: serde_json::Value) -> Result<CheckpointInfo> {
        let rels = list_files(&self.stage)?;
        if let Some(rel) = rels.iter().find(|r| *r == MANIFEST || *r == PROTECTED) {
            return Err(CkptError::Usage(format!(
                "{}: reserved name inside a checkpoint",
                self.stage.join(rel).display()
            )));
        }
        let files = sync_and_hash(&self.stage, rels)?;
        // Subdirectory entries must be durable before the manifest claims their files.
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .filter_map(|f| Path::new(&f.path).parent().map(|p| self.stage.join(p)))
            .collect();
        dirs.sort();
        dirs.dedup();
        for d in &dirs {
            fsync_dir(d)?;
        }
        let manifest = Manifest {
            format: FORMAT_VERSION,
            step: self.step,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            files,
            metadata,
        };
        let mut bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| CkptError::Usage(format!("manifest metadata: cannot serialise: {e}")))?;
        bytes.push(b'\n');
        let mpath = self.stage.join(MANIFEST);
        let mut f = fs::File::create(&mpath).map_err(io(&mpath))?;
        f.write_all(&bytes).map_err(io(&mpath))?;
        f.sync_all().map_err(io(&mpath))?;
        drop(f);
        fsync_dir(&self.stage)?;

        let name = dir_name(self.step);
        let target = self.root.join(&name);
        let old = if target.exists() {
            // Same step committed before (a rerun): move it aside, then delete after the swap.
            let aside = self
                .root
                .join(format!("{name}{TMP_INFIX}old-{}", unique_suffix()));
            fs::rename(&target, &aside).map_err(io(&target))?;
            Some(aside)
        } else {
            None
        };
        fs::rename(&self.stage, &target).map_err(io(&target))?;
        self.done = true;
        fsync_dir(&self.root)?;
        write_atomic(&self.root.join(LATEST), format!("{name}\n").as_bytes())?;
        if let Some(aside) = old {
            fs::remove_dir_all(&aside).map_err(io(&aside))?;
        }
        tracing::info!(step = self.step, dir = %target.display(), "checkpoint committed");
        Ok(CheckpointInfo {
            step: self.step,
            dir: target,
            manifest,
        })
    }

    /// Removes the staging directory.
    pub fn abort(mut self) -> Result<()> {
        self.done = true;
        fs::remove_dir_all(&self.stage).map_err(io(&self.stage))
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.stage);
        }
    }
}

/// A directory that appears whole or not at all, for outputs other than checkpoints (an exported
/// model): files go into a hidden staging sibling of the target (`.NAME.tmp-XXXX`, same file
/// system, so the final rename is atomic); [`StagedDir::publish`] fsyncs them and renames the
/// staging directory onto the target. The target must not exist or be an empty directory: an
/// existing non-empty one is refused before anything is written and again at the rename.
/// Dropping an unpublished `StagedDir` removes the staging directory.
#[derive(Debug)]
pub struct StagedDir {
    target: PathBuf,
    stage: PathBuf,
    done: bool,
}

impl StagedDir {
    /// Creates the staging directory next to `target` (creating `target`'s parents).
    pub fn begin(target: &Path) -> Result<StagedDir> {
        check_empty_target(target)?;
        let name = target.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            CkptError::Usage(format!(
                "{}: not a directory path (it has no UTF-8 final component)",
                target.display()
            ))
        })?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(io(&parent))?;
        let stage = parent.join(format!(".{name}{TMP_INFIX}{}", unique_suffix()));
        fs::create_dir(&stage).map_err(io(&stage))?;
        Ok(StagedDir {
            target: target.to_path_buf(),
            stage,
            done: false,
        })
    }

    /// The staging directory to write files into.
    pub fn dir(&self) -> &Path {
        &self.stage
    }

    /// Fsyncs every file and directory of the staging directory, renames it onto the target
    /// and fsyncs the parent. Returns the target.
    pub fn publish(mut self) -> Result<PathBuf> {
        let rels = list_files(&self.stage)?;
        par_map(&rels, |rel| {
            let path = self.stage.join(rel);
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))
        })?;
        let mut dirs: Vec<PathBuf> = rels
            .iter()
            .filter_map(|r| Path::new(r).parent().map(|p| self.stage.join(p)))
            .collect();
        dirs.push(self.stage.clone());
        dirs.sort();
        dirs.dedup();
        for d in &dirs {
            fsync_dir(d)?;
        }
        check_empty_target(&self.target)?;
        // rename(2) replaces an empty directory and fails on a non-empty one, so a target
        // filled since the check above is still never overwritten.
        fs::rename(&self.stage, &self.target).map_err(|e| match e.kind() {
            std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::AlreadyExists => {
                non_empty(&self.target)
            }
            _ => io(&self.target)(e),
        })?;
        self.done = true;
        if let Some(parent) = self.stage.parent() {
            fsync_dir(parent)?;
        }
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.stage);
        }
    }
}

fn non_empty(target: &Path) -> CkptError {
    CkptError::Usage(format!(
        "{} already exists and is not empty; give a new directory (or remove this one)",
        target.display()
    ))
}

/// `target` may be missing or an empty directory; anything else is an error saying so.
fn check_empty_target(target: &Path) -> Result<()> {
    match fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(target)(e)),
        Ok(m) if m.is_dir() => {
            let mut entries = fs::read_dir(target).map_err(io(target))?;
            if entries.next().is_some() {
                Err(non_empty(target))
            } else {
                Ok(())
            }
        }
        Ok(_) => Err(CkptError::Usage(format!(
            "{} already exists and is not a directory; give a new directory",
            target.display()
        ))),
    }
}

/// A relative path that stays inside the checkpoint: no `..`, no root, no empty parts.
fn check_rel(rel: &str) -> std::result::Result<(), String> {
    let p = Path::new(rel);
    let ok = !rel.is_empty()
        && !rel.contains('\\')
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{rel:?}: checkpoint file paths must be relative, `/`-separated, without `..`"
        ))
    }
}

/// Removes staging directories (`*.tmp-*`) and temporary files under `run_dir/checkpoints`
/// left by interrupted writers. Returns what it removed.
pub fn clean_stale(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = checkpoints_dir(run_dir);
    let mut removed = Vec::new();
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io(&root)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(&root))?;
        let name = entry.file_name();
        if !name.to_string_lossy().contains(TMP_INFIX) {
            continue;
        }
        let path = entry.path();
        let ft = entry.file_type().map_err(io(&path))?;
        if ft.is_dir() {
            fs::remove_dir_all(&path).map_err(io(&path))?;
        } else {
            fs::remove_file(&path).map_err(io(&path))?;
        }
        tracing::info!(path = %path.display(), "removed an incomplete checkpoint left by an earlier run");
        removed.push(path);
    }
    Ok(removed)
}

/// Reads and checks a checkpoint directory against its manifest: every listed file exists with
/// the recorded size and SHA-256, and the manifest's step matches the directory name (when the
/// name is `step-N`). The error says what is wrong.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let invalid = |reason: String| CkptError::Invalid {
        dir: dir.to_path_buf(),
        reason,
    };
    let mpath = dir.join(MANIFEST);
    let bytes = match fs::read(&mpath) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(format!(
                "no {MANIFEST} (an interrupted write; the manifest is written last)"
            )))
        }
        Err(e) => return Err(io(&mpath)(e)),
    };
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        invalid(format!(
            "{MANIFEST} is not a valid manifest (line {}, column {}): {e}",
            e.line(),
            e.column()
        ))
    })?;
    if manifest.format != FORMAT_VERSION {
        return Err(invalid(format!(
            "{MANIFEST} has format {}, this build reads {FORMAT_VERSION}",
            manifest.format
        )));
    }
    if let Some(step) = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_dir_name)
    {
        if step != manifest.step {
            return Err(invalid(format!(
                "directory says step {step}, {MANIFEST} says step {}",
                manifest.step
            )));
        }
    }
    for f in &manifest.files {
        check_rel(&f.path).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
        // A subdirectory symlinked out of the checkpoint would make it vouch for foreign files.
        let path =
            join_within(dir, &f.path).map_err(|e| invalid(format!("{MANIFEST}: file {e}")))?;
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(invalid(format!("file `{}` is missing", f.path)))
            }
            Err(e) => return Err(io(&path)(e)),
        };
        if !meta.is_file() {
            return Err(invalid(format!(
                "file `{}` is not a regular file (a checkpoint holds no symlinks)",
                f.path
            )));
        }
        if meta.len() != f.size {
            return Err(invalid(format!(
                "file `{}` has {} bytes, the manifest says {}",
                f.path,
                meta.len(),
                f.size
            )));
        }
        let (sha, _) = hash_file(&path)?;
        if sha != f.sha256 {
            return Err(invalid(format!(
                "file `{}` has sha256 {sha}, the manifest says {} (corrupted)",
                f.path, f.sha256
            )));
        }
    }
    Ok(manifest)
}

/// How [`latest_valid`] found its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The directory `LATEST` names, which verified.
    Latest,
    /// `LATEST` was missing or named a bad checkpoint; this is the newest one that verified.
    Scan,
}

/// A checkpoint that [`latest_valid`] looked at and did not take.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub dir: PathBuf,
    pub reason: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.dir.display(), self.reason)
    }
}

/// The result of [`latest_valid`].
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    pub checkpoint: CheckpointInfo,
    pub source: Source,
    /// Checkpoints looked at first and rejected, newest first, with the reason.
    pub rejected: Vec<Rejected>,
}

impl fmt::Display for Resume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.source {
            Source::Latest => format!("named by {LATEST}"),
            Source::Scan => format!("the newest that verifies ({LATEST} was not usable)"),
        };
        write!(
            f,
            "checkpoint {} (step {}), {how}",
            self.checkpoint.dir.display(),
            self.checkpoint.step
        )?;
        for r in &self.rejected {
            write!(f, "; rejected {r}")?;
        }
        Ok(())
    }
}

/// Committed-looking checkpoint directories (`step-N`) under `run_dir/checkpoints`, by step,
/// oldest first. Nothing is verified.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = checkpoints_dir(run_dir);
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(&root)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(&root))?;
        let Some(step) = entry.file_name().to_str().and_then(parse_dir_name) else {
            continue;
        };
        if entry.file_type().map_err(io(&entry.path()))?.is_dir() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The directory `LATEST` names, if the file exists (not checked further).
pub fn read_latest(run_dir: &Path) -> Result<Option<String>> {
    let path = checkpoints_dir(run_dir).join(LATEST);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

/// The checkpoint to resume from: the one `LATEST` names if it verifies, else the newest
/// `step-N` directory that verifies. `Ok(None)` when there is no valid checkpoint (a fresh run);
/// the rejected ones are logged as warnings.
pub fn latest_valid(run_dir: &Path) -> Result<Option<Resume>> {
    let root = checkpoints_dir(run_dir);
    let mut rejected = Vec::new();
    let latest = read_latest(run_dir)?;
    if let Some(name) = &latest {
        let dir = root.join(name);
        if parse_dir_name(name).is_none() {
            rejected.push(Rejected {
                dir,
                reason: format!("{LATEST} holds {name:?}, not a checkpoint name"),
            });
        } else if let Err(e) = join_within(&root, name) {
            // A `step-N` symlinked out of the run directory is not followed.
            rejected.push(Rejected {
                dir,
                reason: format!("{LATEST} names {e}"),
            });
        } else if !dir.is_dir() {
            rejected.push(Rejected {
                dir,
                reason: format!("{LATEST} names it but it does not exist"),
            });
        } else {
            match verify(&dir) {
                Ok(manifest) => {
                    return Ok(Some(Resume {
                        checkpoint: CheckpointInfo {
                            step: manifest.step,
                            dir,
                            manifest,
                        },
                        source: Source::Latest,
                        rejected,
                    }))
                }
                Err(CkptError::Invalid { reason, .. }) => rejected.push(Rejected { dir, reason }),
                Err(e) => return Err(e),
            }
        }
    }
    for (_, dir) in list(run_dir)?.into_iter().rev() {
        if rejected.iter().any(|r| r.dir == dir) {
            continue;
        }
        match verify(&dir) {
            Ok(manifest) => {
                for r in &rejected {
                    tracing::warn!(dir = %r.dir.display(), reason = %r.reason, "checkpoint rejected");
                }
                return Ok(Some(Resume {
                    checkpoint: CheckpointInfo {
                        step: manifest.step,
                        dir,
                        manifest,
                    },
                    source: Source::Scan,
                    rejected,
                }));
            }
            Err(CkptError::Invalid { reason, .. }) => rejected.push(Rejected { dir, reason }),
            Err(e) => return Err(e),
        }
    }
    for r in &rejected {
        tracing::warn!(dir = %r.dir.display(), reason = %r.reason, "checkpoint rejected");
    }
    Ok(None)
}

/// A checkpoint directory given to [`protect`] / [`unprotect`] must be a real directory: a
/// symlink would let the marker be created or deleted wherever it points.
fn not_a_symlink(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(CkptError::Invalid {
            dir: dir.to_path_buf(),
            reason: "is a symbolic link; protection markers are only written into real checkpoint directories".into(),
        }),
        _ => Ok(()),
    }
}

/// Marks a checkpoint so [`prune`] never deletes it (e.g. the best by validation score).
pub fn protect(dir: &Path) -> Result<()> {
    not_a_symlink(dir)?;
    if !dir.join(MANIFEST).exists() {
        return Err(CkptError::Invalid {
            dir: dir.to_path_buf(),
            reason: "only committed checkpoints can be protected".into(),
        });
    }
    write_atomic(&dir.join(PROTECTED), b"")
}

/// Removes the protection of [`protect`].
pub fn unprotect(dir: &Path) -> Result<()> {
    not_a_symlink(dir)?;
    let p = dir.join(PROTECTED);
    match fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(&p)(e)),
    }
}

pub fn is_protected(dir: &Path) -> bool {
    dir.join(PROTECTED).exists()
}

/// Retention: deletes committed checkpoints (those with a manifest) older than the newest
/// `keep_last`, except protected ones and the one `LATEST` names. Directories without a manifest
/// are left alone (they are not ours to judge). `keep_last` must be at least 1. Returns the
/// deleted directories.
pub fn prune(run_dir: &Path, keep_last: usize) -> Result<Vec<PathBuf>> {
    if keep_last == 0 {
        return Err(CkptError::Usage(
            "keep_last must be >= 1 (the newest checkpoint is what resume needs)".into(),
        ));
    }
    let latest = read_latest(run_dir)?;
    let committed: Vec<(u64, PathBuf)> = list(run_dir)?
        .into_iter()
        .filter(|(_, d)| d.join(MANIFEST).exists())
        .collect();
    let cut = committed.len().saturating_sub(keep_last);
    let mut deleted = Vec::new();
    for (_, dir) in &committed[..cut] {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if is_protected(dir) || latest.as_deref() == Some(name) {
            continue;
        }
        fs::remove_dir_all(dir).map_err(io(dir))?;
        tracing::info!(dir = %dir.display(), "pruned checkpoint");
        deleted.push(dir.clone());
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn commit(run: &Path, step: u64, payload: &[u8]) -> CheckpointInfo {
        let w = CheckpointWriter::begin(run, step).unwrap();
        w.write_file("policy/model.safetensors", payload).unwrap();
        w.write_json("trainer_state.json", &json!({"step": step}))
            .unwrap();
        w.commit(json!({"job": "test"})).unwrap()
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(dir_name(42), "step-000042");
        assert_eq!(parse_dir_name("step-000042"), Some(42));
        assert_eq!(parse_dir_name("step-1234567"), Some(1234567));
        assert_eq!(parse_dir_name("step-000042.tmp-1-2-3"), None);
        assert_eq!(parse_dir_name("LATEST"), None);
        assert_eq!(parse_dir_name("step-"), None);
    }

    #[test]
    fn commit_writes_manifest_and_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let info = commit(tmp.path(), 7, b"weights");
        assert_eq!(info.dir, tmp.path().join("checkpoints/step-000007"));
        assert_eq!(
            read_latest(tmp.path()).unwrap().as_deref(),
            Some("step-000007")
        );
        let m = verify(&info.dir).unwrap();
        assert_eq!(m.step, 7);
        let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["policy/model.safetensors", "trainer_state.json"]);
        assert_eq!(m.files[0].sha256, hex(&Sha256::digest(b"weights")));
        assert_eq!(m.files[0].size, 7);
        assert_eq!(m.metadata["job"], "test");
        let r = latest_valid(tmp.path()).unwrap().unwrap();
        assert_eq!((r.checkpoint.step, r.source), (7, Source::Latest));
        assert!(r.rejected.is_empty());
    }

    #[test]
    fn known_sha256() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn crash_between_files_is_ignored_and_cleaned() {
        let tmp = tempfile::tempdir().unwrap();
        commit(tmp.path(), 1, b"a");
        // A writer that crashed after its first file: the staging dir has no manifest.
        let w = CheckpointWriter::begin(tmp.path(), 2).unwrap();
        w.write_file("policy/model.safetensors", b"half").unwrap();
        let stage = w.dir().to_path_buf();
        std::mem::forget(w);
        // And a step dir without a manifest (e.g. copied by hand, interrupted).
        let bare = checkpoints_dir(tmp.path()).join("step-000003");
        fs::create_dir_all(&bare).unwrap();
        fs::write(bare.join("x"), b"x").unwrap();
        let r = latest_valid(tmp.path()).unwrap().unwrap();
        assert_eq!(r.checkpoint.step, 1);
        assert_eq!(r.source, Source::Latest);
        // LATEST gone: the scan must skip the manifest-less dir and say why.
        fs::remove_file(checkpoints_dir(tmp.path()).join(LATEST)).unwrap();
        let r = latest_valid(tmp.path()).unwrap().unwrap();
        assert_eq!((r.checkpoint.step, r.source), (1, Source::Scan));
        assert_eq!(r.rejected.len(), 1);
        assert!(r.rejected[0].reason.contains("no manifest.json"), "{r}");
        // The next writer cleans the crashed stage.
        let w = CheckpointWriter::begin(tmp.path(), 4).unwrap();
        assert!(!stage.exists());
        w.abort().unwrap();
        // Dropping an uncommitted writer removes its stage too.
        let w = CheckpointWriter::begin(tmp.path(), 5).unwrap();
        let s = w.dir().to_path_buf();
        drop(w);
        assert!(!s.exists());
    }

    #[test]
    fn corrupted_file_falls_back_to_previous() {
        let tmp = tempfile::tempdir().unwrap();
        commit(tmp.path(), 10, b"good weights");
        let bad = commit(tmp.path(), 20, b"more weights");
        // Same size, different bytes: only the hash can tell.
        fs::write(bad.dir.join("policy/model.safetensors"), b"more weightz").unwrap();
        let e = verify(&bad.dir).unwrap_err().to_string();
        assert!(
            e.contains("policy/model.safetensors") && e.contains("corrupted"),
            "{e}"
        );
        let r = latest_valid(tmp.path()).unwrap().unwrap();
        assert_eq!((r.checkpoint.step, r.source), (10, Source::Scan));
        assert_eq!(r.rejected[0].dir, bad.dir);
        let msg = r.to_string();
        assert!(
            msg.contains("step-000010") && msg.contains("rejected"),
            "{msg}"
        );
        // A truncated file is caught by size.
        fs::write(bad.dir.join("policy/model.safetensors"), b"more weights").unwrap();
        verify(&bad.dir).unwrap();
        fs::write(bad.dir.join("trainer_state.json"), b"{").unwrap();
        assert!(verify(&bad.dir).unwrap_err().to_string().contains("bytes"));
        // A missing file too.
        fs::remove_file(bad.dir.join("trainer_state.json")).unwrap();
        assert!(verify(&bad.dir)
            .unwrap_err()
            .to_string()
            .contains("missing"));
    }

    #[test]
    fn latest_naming_a_missing_dir_falls_back() {
        let tmp = tempfile::tempdir().unwrap();
        commit(tmp.path(), 3, b"a");
        commit(tmp.path(), 4, b"b");
        write_atomic(&checkpoints_dir(tmp.path()).join(LATEST), b"step-000009\n").unwrap();
        let r = latest_valid(tmp.path()).unwrap().unwrap();
        assert_eq!((r.checkpoint.step, r.source), (4, Source::Scan));
        assert!(r.rejected[0].reason.contains("does not exist"));
        // Garbage in LATEST is rejected with its content named.
        write_atomic(&checkpoints_dir(tmp.path()).join(LATEST), b"../etc\n").unwrap();
        let r = latest_valid(tmp.path()).unwrap().unwrap();
        assert_eq!(r.checkpoint.step, 4);
        assert!(r.rejected[0].reason.contains("not a checkpoint name"));
        // No checkpoints at all: a fresh run.
        let empty = tempfile::tempdir().unwrap();
        assert!(latest_valid(empty.path()).unwrap().is_none());
    }

    #[test]
    fn recommitting_a_step_replaces_it() {
        let tmp = tempfile::tempdir().unwrap();
        commit(tmp.path(), 5, b"first");
        let again = commit(tmp.path(), 5, b"second!");
        assert_eq!(verify(&again.dir).unwrap().files[0].size, 7);
        assert_eq!(list(tmp.path()).unwrap().len(), 1);
        let leftovers: Vec<_> = fs::read_dir(checkpoints_dir(tmp.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}"); // step-000005 and LATEST
    }

    #[test]
    fn prune_keeps_last_latest_and_protected() {
        let tmp = tempfile::tempdir().unwrap();
        for s in 1..=5 {
            commit(tmp.path(), s, b"w");
        }
        protect(&checkpoints_dir(tmp.path()).join("step-000002")).unwrap();
        let deleted = prune(tmp.path(), 2).unwrap();
        let names: Vec<String> = deleted
            .iter()
            .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["step-000001", "step-000003"]);
        let left: Vec<u64> = list(tmp.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, [2, 4, 5]);
        // LATEST pointing at an old checkpoint keeps it.
        write_atomic(&checkpoints_dir(tmp.path()).join(LATEST), b"step-000002").unwrap();
        unprotect(&checkpoints_dir(tmp.path()).join("step-000002")).unwrap();
        assert!(prune(tmp.path(), 1)
            .unwrap()
            .iter()
            .all(|d| !d.ends_with("step-000002")));
        assert!(prune(tmp.path(), 0).is_err());
        // Protection survives verification: the marker is not part of the manifest.
        let d = checkpoints_dir(tmp.path()).join("step-000005");
        protect(&d).unwrap();
        verify(&d).unwrap();
    }

    #[test]
    fn bad_paths_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let w = CheckpointWriter::begin(tmp.path(), 1).unwrap();
        for bad in ["../x", "/abs", "", "a/../b", MANIFEST] {
            assert!(w.write_file(bad, b"").is_err(), "{bad:?} accepted");
        }
        w.abort().unwrap();
    }

    #[test]
    fn staged_dir_appears_whole_and_refuses_non_empty_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("a/out");
        let st = StagedDir::begin(&target).unwrap();
        fs::create_dir(st.dir().join("sub")).unwrap();
        fs::write(st.dir().join("sub/x"), b"1").unwrap();
        fs::write(st.dir().join("y"), b"2").unwrap();
        // Nothing is visible under the target's name until publish.
        assert!(!target.exists());
        assert_eq!(st.publish().unwrap(), target);
        assert_eq!(fs::read(target.join("sub/x")).unwrap(), b"1");
        assert_eq!(fs::read(target.join("y")).unwrap(), b"2");
        let left: Vec<_> = fs::read_dir(tmp.path().join("a")).unwrap().collect();
        assert_eq!(left.len(), 1, "a staging directory was left behind");

        // A non-empty target is refused up front, naming it.
        let e = StagedDir::begin(&target).unwrap_err().to_string();
        assert!(e.contains("already exists and is not empty"), "{e}");
        assert!(e.contains("a/out"), "{e}");
        // An empty one is replaced.
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let st = StagedDir::begin(&empty).unwrap();
        fs::write(st.dir().join("z"), b"3").unwrap();
        st.publish().unwrap();
        assert_eq!(fs::read(empty.join("z")).unwrap(), b"3");
        // Filled between begin and publish: refused, and the other writer's file survives.
        let raced = tmp.path().join("raced");
        let st = StagedDir::begin(&raced).unwrap();
        fs::create_dir(&raced).unwrap();
        fs::write(raced.join("theirs"), b"4").unwrap();
        let e = st.publish().unwrap_err().to_string();
        assert!(e.contains("already exists and is not empty"), "{e}");
        assert_eq!(fs::read(raced.join("theirs")).unwrap(), b"4");
        // A file as target, and an abandoned staging directory is cleaned up on drop.
        let e = StagedDir::begin(&raced.join("theirs"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a directory"), "{e}");
        let st = StagedDir::begin(&tmp.path().join("never")).unwrap();
        let stage = st.dir().to_path_buf();
        drop(st);
        assert!(!stage.exists());
    }
}
