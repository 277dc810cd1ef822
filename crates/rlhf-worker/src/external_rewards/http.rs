//! `models.reward.kind: http`: batches of rows POSTed to the user's reward server.
//! (Transport to be written on branch i20-http.)

use std::time::Duration;

use serde_json::Value;

use crate::error::{RoleError, RoleResult};

/// `RewardRoleSpec.http`, checked.
#[derive(Debug, Clone)]
pub struct HttpSpec {
    pub url: String,
    /// One request's limit.
    pub timeout: Duration,
    /// Further attempts after a failed request.
    pub retries: u32,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Rows per request.
    pub batch_size: usize,
}

pub struct HttpReward {
    spec: HttpSpec,
}

impl HttpReward {
    pub fn new(spec: HttpSpec) -> RoleResult<HttpReward> {
        Ok(HttpReward { spec })
    }

    /// One answer per row, in order.
    pub fn score_rows(&mut self, rows: &[Value]) -> RoleResult<Vec<Value>> {
        let _ = rows;
        Err(RoleError::Reward(format!(
            "models.reward.kind http ({}): not built yet",
            self.spec.url
        )))
    }
}
