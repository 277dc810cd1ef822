//! `ConfigError` and `Origin`: every error names the file, key or argument at fault, where the
//! value came from, and what to do.

use std::fmt;
use std::path::PathBuf;

/// Where a config value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The YAML file; `line` is the key's line when the file spells the key out.
    File {
        /// The YAML file.
        file: PathBuf,
        /// 1-based line of the key (None when the value is implied, e.g. a missing field of a
        /// section that the file has).
        line: Option<usize>,
    },
    /// An `RLHF_` environment variable.
    Env {
        /// The variable's name, e.g. `RLHF_TRAIN__STEPS`.
        var: String,
    },
    /// A `--set` argument.
    Set {
        /// The whole argument, e.g. `train.steps=abc`.
        arg: String,
    },
    /// The built-in default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File {
                file,
                line: Some(line),
            } => write!(f, "at {}:{line}", file.display()),
            Origin::File { file, line: None } => write!(f, "in {}", file.display()),
            Origin::Env { var } => write!(f, "from environment variable {var}"),
            Origin::Set { arg } => write!(f, "from --set {arg}"),
            Origin::Default => f.write_str("the default, as nothing sets it"),
        }
    }
}

/// Errors of loading and validating a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}; check the path", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML.
    #[error("{}:{line}:{column}: malformed YAML: {message}; fix the syntax at that line", file.display())]
    Malformed {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The document is valid YAML but not a mapping of sections.
    #[error("{}: the top level must be a mapping of sections (e.g. `run:`), found {found}", file.display())]
    NotAMapping {
        /// The file.
        file: PathBuf,
        /// What the top level is instead.
        found: String,
    },
    /// A `--set` argument that is not `key.path=value`.
    #[error("invalid --set argument `{arg}`: {reason}; write it as --set key.path=value (e.g. --set rollout.temperature=0.7)")]
    BadOverride {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An `RLHF_` variable whose name cannot be a key path.
    #[error("invalid environment variable {var}: {reason}; nested keys are separated by `__` (e.g. RLHF_TRAIN__STEPS=5)")]
    BadEnv {
        /// The variable's name.
        var: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key with a value that is unknown, of the wrong type, or fails validation.
    #[error("{key}: {message} ({origin})")]
    Invalid {
        /// The full key path, e.g. `workers[1].roles`.
        key: String,
        /// Where the offending value came from.
        origin: Origin,
        /// What is wrong and what to do.
        message: String,
    },
    /// The resolved config could not be written as YAML.
    #[error("cannot write the resolved config as YAML: {0}")]
    Serialize(String),
}

impl ConfigError {
    /// The key path of an `Invalid` error.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Spells a dotted key with list indices in brackets: `workers.1.roles` → `workers[1].roles`.
pub fn display_key<S: AsRef<str>>(segments: &[S]) -> String {
    let mut out = String::new();
    for s in segments {
        let s = s.as_ref();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(s);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(s);
        }
    }
    out
}

/// Splits a key written either way (`workers[1].roles` or `workers.1.roles`) into segments.
pub fn key_segments(key: &str) -> Vec<String> {
    key.replace('[', ".")
        .replace(']', "")
        .split('.')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_between_spellings() {
        assert_eq!(display_key(&["workers", "1", "roles"]), "workers[1].roles");
        assert_eq!(display_key(&["a", "0", "1"]), "a[0][1]");
        assert_eq!(key_segments("workers[1].roles"), ["workers", "1", "roles"]);
        assert_eq!(key_segments("workers.1.roles"), ["workers", "1", "roles"]);
    }

    #[test]
    fn origin_names_file_line_variable_and_argument() {
        let file = Origin::File {
            file: "c.yaml".into(),
            line: Some(3),
        };
        assert_eq!(file.to_string(), "at c.yaml:3");
        let env = Origin::Env {
            var: "RLHF_TRAIN__STEPS".into(),
        };
        assert_eq!(
            env.to_string(),
            "from environment variable RLHF_TRAIN__STEPS"
        );
        let set = Origin::Set {
            arg: "train.steps=x".into(),
        };
        assert_eq!(set.to_string(), "from --set train.steps=x");
    }
}
