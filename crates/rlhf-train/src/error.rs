//! The one error type of this crate. Bad data names the file and line (JSONL) or row (Parquet), bad configuration names
//! the key, and a checkpoint that does not fit the job names the checkpoint and what differs.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A data row that cannot be used (with `on_bad_row: fail`, or past the point of skipping).
    #[error("{}:{line}: {msg}", path.display())]
    BadRow {
        path: PathBuf,
        line: u64,
        msg: String,
    },

    /// A row of a Parquet file that cannot be used; rows count from 0 within the file.
    #[error("{}: row {row} (counting from 0): {msg}", path.display())]
    BadRecord {
        path: PathBuf,
        row: u64,
        msg: String,
    },

    /// A bad row met under `on_bad_row: fail` (a [`TrainError::BadRow`] or
    /// [`TrainError::BadRecord`], which names its place), which `skip` would have skipped and
    /// counted. `hint` says how to skip in the caller's terms (a job-file key or a command-line
    /// flag, see [`TrainError::with_skip_hint`]).
    #[error("{row} ({hint})")]
    RowRefused { row: Box<TrainError>, hint: String },

    /// A job setting is missing, out of range or inconsistent with another.
    #[error("config `{key}`: {msg}")]
    Config { key: String, msg: String },

    /// A data set as a whole cannot be used (e.g. nothing left after filtering).
    #[error("{}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },

    /// A checkpoint exists but does not belong to this job.
    #[error("cannot resume from {}: {msg}", dir.display())]
    Resume { dir: PathBuf, msg: String },

    #[error(transparent)]
    Model(#[from] rlhf_model::ModelError),

    #[error(transparent)]
    Algo(#[from] rlhf_algo::AlgoError),

    #[error(transparent)]
    Checkpoint(#[from] rlhf_ckpt::CkptError),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }

    /// Replaces the skip hint of a [`TrainError::RowRefused`] (other errors pass unchanged),
    /// so the message names the setting of the command the user ran.
    pub fn with_skip_hint(self, hint: impl Into<String>) -> Self {
        match self {
            TrainError::RowRefused { row, .. } => TrainError::RowRefused {
                row,
                hint: hint.into(),
            },
            other => other,
        }
    }

    pub(crate) fn config(key: impl Into<String>, msg: impl Into<String>) -> Self {
        TrainError::Config {
            key: key.into(),
            msg: msg.into(),
        }
    }
}
