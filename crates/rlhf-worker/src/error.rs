//! The worker's error type and its one mapping to gRPC status codes.

use std::path::Path;

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// A request field is missing or malformed.
    #[error("bad request: `{field}`: {msg}")]
    BadRequest { field: String, msg: String },
    /// The call does not apply to this role (e.g. Generate on a critic).
    #[error("{op} is not served by a {kind} role")]
    WrongRole { op: String, kind: &'static str },
    #[error("no role `{0}` on this worker; create it first")]
    NoRole(String),
    #[error("role `{0}` already exists on this worker")]
    RoleExists(String),
    /// The role's thread is gone (it panicked or the worker is stopping).
    #[error("role `{0}` is not running (its thread stopped); see the worker log")]
    RoleStopped(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] rlhf_model::ModelError),
    #[error(transparent)]
    Algo(#[from] rlhf_algo::AlgoError),
    #[error(transparent)]
    Wire(#[from] rlhf_proto::WireError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The user's reward server or reward processes failed or answered wrongly (the message
    /// names the rows and quotes the answer).
    #[error("{0}")]
    Reward(String),
    /// A collective with the role's peers failed (names the operation, rank and address).
    #[error("collective with peer workers failed: {0}")]
    Comm(#[from] rlhf_comm::CommError),
}

pub type RoleResult<T> = Result<T, RoleError>;

impl RoleError {
    pub fn bad(field: &str, msg: String) -> RoleError {
        RoleError::BadRequest {
            field: field.to_string(),
            msg,
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> RoleError {
        RoleError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<RoleError> for Status {
    fn from(e: RoleError) -> Status {
        let msg = e.to_string();
        let code = match &e {
            RoleError::BadRequest { .. } | RoleError::Wire(_) => Code::InvalidArgument,
            RoleError::WrongRole { .. } => Code::FailedPrecondition,
            RoleError::NoRole(_) => Code::NotFound,
            RoleError::RoleExists(_) => Code::AlreadyExists,
            RoleError::RoleStopped(_) | RoleError::Reward(_) => Code::Unavailable,
            // Model and algorithm errors name the file, key or tensor at fault: the caller needs
            // them verbatim to fix the input.
            RoleError::Model(_) | RoleError::Algo(_) => Code::InvalidArgument,
            RoleError::Io { .. } | RoleError::Torch(_) => Code::Internal,
            // A peer died or stalled: the group is gone and the run must stop.
            RoleError::Comm(_) => Code::Aborted,
        };
        if code == Code::Internal {
            tracing::error!(error = %msg, "internal error");
        }
        Status::new(code, msg)
    }
}
