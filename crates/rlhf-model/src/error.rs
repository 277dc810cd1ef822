//! The one error type of this crate. Every variant names the file, key or tensor at fault and,
//! where it helps, the expected and found values, so a user can fix the input without a debugger.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: invalid JSON at line {line}, column {column}: {msg}", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        msg: String,
    },

    /// A key of `config.json` (or another metadata file) is missing or has a bad value.
    #[error("{}: key `{key}`: {msg}", path.display())]
    Config {
        path: PathBuf,
        key: String,
        msg: String,
    },

    /// A weight is missing from, or malformed in, the safetensors files.
    #[error("{}: tensor `{name}`: {msg}", path.display())]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },

    #[error("{}: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },

    #[error("chat template: {0}")]
    Template(String),

    #[error(
        "prompt {index} has {len} tokens but the model's context is {max} tokens \
         (max_position_embeddings); shorten the prompt"
    )]
    PromptTooLong {
        index: usize,
        len: usize,
        max: usize,
    },

    #[error("invalid argument `{key}` = {value}: {msg}")]
    InvalidArgument {
        key: &'static str,
        value: String,
        msg: String,
    },

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn json(path: impl Into<PathBuf>, e: &serde_json::Error) -> Self {
        ModelError::Json {
            path: path.into(),
            line: e.line(),
            column: e.column(),
            msg: e.to_string(),
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, key: &str, msg: impl Into<String>) -> Self {
        ModelError::Config {
            path: path.into(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }

    pub(crate) fn tensor(path: impl Into<PathBuf>, name: &str, msg: impl Into<String>) -> Self {
        ModelError::Tensor {
            path: path.into(),
            name: name.to_string(),
            msg: msg.into(),
        }
    }

    pub(crate) fn invalid(key: &'static str, value: impl ToString, msg: impl Into<String>) -> Self {
        ModelError::InvalidArgument {
            key,
            value: value.to_string(),
            msg: msg.into(),
        }
    }
}

/// Reads a file, naming it in the error.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| ModelError::io(path, e))
}

/// Reads and parses a JSON file, naming it (and the line) in the error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::json(path, &e))
}

/// Writes a file atomically and durably through `atomic-write-file` (temporary file, fsync,
/// rename, directory fsync), so a crash never leaves a half-written file under the final name.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f =
        atomic_write_file::AtomicWriteFile::open(path).map_err(|e| ModelError::io(path, e))?;
    f.write_all(bytes).map_err(|e| ModelError::io(path, e))?;
    f.commit().map_err(|e| ModelError::io(path, e))
}
