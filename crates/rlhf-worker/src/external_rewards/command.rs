//! `models.reward.kind: command`: a pool of the user's long-lived processes speaking JSONL on
//! stdin/stdout. (Transport to be written on branch i20-command.)

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::error::{RoleError, RoleResult};

/// `RewardRoleSpec.command`, checked.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// Program and arguments.
    pub command: Vec<String>,
    /// The processes' working directory.
    pub workdir: PathBuf,
    /// How long one row's answer may take.
    pub timeout: Duration,
    /// Processes in the pool.
    pub concurrency: usize,
}

pub struct CommandPool {
    spec: CommandSpec,
}

impl CommandPool {
    pub fn start(spec: CommandSpec) -> RoleResult<CommandPool> {
        Ok(CommandPool { spec })
    }

    /// One answer per row, in order.
    pub fn score_rows(&mut self, rows: &[Value]) -> RoleResult<Vec<Value>> {
        let _ = rows;
        Err(RoleError::Reward(format!(
            "models.reward.kind command ({:?}): not built yet",
            self.spec.command
        )))
    }
}
