//! The crate's error type. Only set-up and I/O fail with it: a single judgment that goes wrong
//! becomes a missing rating inside [`crate::Judgment`], never an [`EvalError`].

use std::io;
use std::path::PathBuf;

/// Where users get the MT-Bench files; repeated in every "file missing" message.
pub(crate) const DATA_HINT: &str = "MT-Bench data (question.jsonl, judge_prompts.jsonl, \
     reference_answer/gpt-4.jsonl) comes from FastChat's fastchat/llm_judge/data/mt_bench/; \
     point the validation data directory at a copy of that folder";

/// Everything that can go wrong in this crate outside of a single judgment.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A data file does not exist.
    #[error("{path}: file not found. {DATA_HINT}", path = .path.display())]
    MissingFile {
        /// The path that was tried.
        path: PathBuf,
    },
    /// A file could not be read, written or renamed.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        /// The file or directory at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A line of a JSONL data file is malformed (bad JSON, missing field, wrong number of turns,
    /// duplicate id, unusable template).
    #[error("{path}:{line}: {message}", path = .path.display())]
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The data set as a whole is inconsistent (a needed judge prompt or reference answer is
    /// absent).
    #[error("{path}: {message}", path = .path.display())]
    BadData {
        /// The file that should have held the missing piece.
        path: PathBuf,
        /// What is missing and what to do.
        message: String,
    },
    /// The caller's answers do not fit the questions (count or order).
    #[error("answers: {0}")]
    Answers(String),
    /// A judge is misconfigured (for example its API-key variable is not set).
    #[error("judge config: {0}")]
    Config(String),
}

/// Short form for results of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
