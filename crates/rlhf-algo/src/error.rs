//! The one error type of this crate. Every variant names the tensor, row or config key at fault
//! so that a failed training step can be diagnosed from the message alone.

use std::fmt;

use tch::{Kind, TchError};

/// Where in a batch tensor a bad value sits: a row, and for per-token tensors the token column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Row (sequence) index in the batch.
    pub row: i64,
    /// Column: the token of a per-token tensor, the attribute of a score matrix; `None` for
    /// per-sequence tensors.
    pub column: Option<i64>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.column {
            Some(t) => write!(f, "row {}, column {t}", self.row),
            None => write!(f, "row {}", self.row),
        }
    }
}

/// Errors from the RLHF algorithms. Messages are lowercase and name what is at fault.
#[derive(Debug, thiserror::Error)]
pub enum AlgoError {
    /// A tensor has the wrong shape, usually because two inputs that must line up do not.
    #[error("`{tensor}` has shape {actual:?}, expected {expected}")]
    Shape {
        /// Name of the argument or field.
        tensor: &'static str,
        /// Its shape.
        actual: Vec<i64>,
        /// What was expected, in words (e.g. "(4, 16) like `response_mask`").
        expected: String,
    },
    /// A tensor has a dtype the operation cannot use.
    #[error("`{tensor}` has dtype {actual:?}, expected {expected}")]
    Kind {
        /// Name of the argument or field.
        tensor: &'static str,
        /// Its dtype.
        actual: Kind,
        /// What was expected, in words.
        expected: &'static str,
    },
    /// A sequence has no token selected by its mask, so per-sequence means are undefined.
    #[error("`{tensor}` row {row} has no unmasked token; drop empty responses before this step")]
    EmptyRow {
        /// Name of the mask.
        tensor: &'static str,
        /// The empty row.
        row: i64,
    },
    /// A NaN or infinity where a finite number is required (only unmasked positions count).
    #[error(
        "`{tensor}` holds non-finite value {value} at {at}; check the producer of this tensor"
    )]
    NonFinite {
        /// Name of the argument or field.
        tensor: &'static str,
        /// The first bad position.
        at: Location,
        /// The bad value.
        value: f64,
    },
    /// A grouped estimator (RLOO, GRPO) was given fewer than two samples per prompt.
    #[error("{estimator} needs at least 2 samples per prompt, got group size {group_size}")]
    GroupSize {
        /// The estimator that needs groups.
        estimator: &'static str,
        /// The group size given.
        group_size: i64,
    },
    /// A batch cannot be cut evenly into groups, minibatches or micro-batches.
    #[error("`{tensor}` has {rows} rows, not a multiple of the {what} {by}")]
    NotDivisible {
        /// Name of the tensor or buffer being split.
        tensor: &'static str,
        /// Its number of rows.
        rows: i64,
        /// What it is split into ("group size", "minibatch size", ...).
        what: &'static str,
        /// The size it must be a multiple of.
        by: i64,
    },
    /// A configuration value out of range.
    #[error("invalid `{key}` = {value}: {reason}")]
    Config {
        /// Dotted config key, e.g. `ppo.clip_eps`.
        key: &'static str,
        /// The value given.
        value: String,
        /// Why it is rejected and what is allowed.
        reason: &'static str,
    },
    /// A setting (KL, loss, optimizer, reward shaping) out of range; the key names the field.
    #[error(transparent)]
    Settings(#[from] rlhf_settings::SettingsError),
    /// Reward-model attributes and configured weights do not match.
    #[error("reward attribute `{name}` {reason}")]
    Attribute {
        /// The attribute name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An input or buffer field that this step needs has not been provided.
    #[error("`{field}` is required here but not set; {hint}")]
    MissingField {
        /// The missing field.
        field: &'static str,
        /// What to call first.
        hint: &'static str,
    },
    /// Saved state (optimizer, controller) does not fit what it is loaded into.
    #[error("state entry `{name}` {reason}")]
    State {
        /// The entry at fault.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The gradient norm is NaN or infinite; the step must be skipped (gradients are untouched).
    #[error("gradient norm is {value}; zero the gradients and skip this optimizer step")]
    NonFiniteGradNorm {
        /// The norm that was computed.
        value: f64,
    },
    /// An error raised by libtorch.
    #[error("torch: {0}")]
    Torch(#[from] TchError),
}

/// Result alias of this crate.
pub type Result<T, E = AlgoError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_tensor_and_position() {
        let e = AlgoError::NonFinite {
            tensor: "rewards",
            at: Location {
                row: 3,
                column: Some(7),
            },
            value: f64::NAN,
        };
        assert_eq!(
            e.to_string(),
            "`rewards` holds non-finite value NaN at row 3, column 7; check the producer of this tensor"
        );
        let e = AlgoError::EmptyRow {
            tensor: "response_mask",
            row: 2,
        };
        assert!(e
            .to_string()
            .starts_with("`response_mask` row 2 has no unmasked token"));
    }
}
