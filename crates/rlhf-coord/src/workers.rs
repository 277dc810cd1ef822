//! Clients of the worker daemons. Every call has a deadline (`launcher.rpc_timeout_s`) and every
//! error names the worker and role it went to, so a failure reads "worker `w1` (role reward):
//! Score: ..." instead of a bare transport error.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Result};
use rlhf_proto::auth::{AddToken, RunToken};
use rlhf_proto::limits::MAX_MESSAGE_BYTES;
use rlhf_proto::pb::{self, worker_client::WorkerClient};
use rlhf_proto::tls::RunTls;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Inner = WorkerClient<InterceptedService<Channel, AddToken>>;

/// One role instance on one worker.
#[derive(Clone)]
pub struct RoleClient {
    pub worker: String,
    pub host: String,
    pub role: String,
    /// Torch device of the role on its worker (`cpu`, `cuda:N`).
    pub device: String,
    client: Inner,
    timeout: Duration,
}

/// What the coordinator's calls to workers carry: the run token, and the run's certificate when
/// the run uses TLS (`crate::tls` decides).
#[derive(Clone, Debug)]
pub struct Credentials {
    pub token: RunToken,
    pub tls: Option<RunTls>,
}

/// Opens a connection to a worker's service.
pub async fn connect(address: &str, creds: &Credentials) -> Result<Inner> {
    let scheme = rlhf_proto::tls::scheme(creds.tls.is_some());
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10));
    if let Some(tls) = &creds.tls {
        endpoint = endpoint.tls_config(tls.client())?;
    }
    let ch = endpoint.connect().await.map_err(|e| {
        let host = rlhf_comm::net::host_name();
        if rlhf_proto::tls::is_tls_failure(&e) {
            // tonic's top-level message is only "transport error": the cause is in the chain.
            let mut cause = String::new();
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(c) = cur {
                cause.push_str(": ");
                cause.push_str(&c.to_string());
                cur = c.source();
            }
            anyhow!(
                "connecting to the worker at {address} from host {host} over TLS{cause}; the \
                 worker must be this run's, started with --tls-dir {}",
                creds
                    .tls
                    .as_ref()
                    .map(|t| t.dir().display().to_string())
                    .unwrap_or_default()
            )
        } else {
            anyhow!("connecting to the worker at {address} from host {host}: {e}")
        }
    })?;
    Ok(
        WorkerClient::with_interceptor(ch, AddToken(creds.token.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

impl RoleClient {
    pub fn new(
        worker: &str,
        host: &str,
        role: &str,
        device: &str,
        client: Inner,
        timeout: Duration,
    ) -> RoleClient {
        RoleClient {
            worker: worker.to_string(),
            host: host.to_string(),
            role: role.to_string(),
            device: device.to_string(),
            client,
            timeout,
        }
    }

    fn err(&self, op: &str, e: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "worker `{}` on host {} (role {}): {op}: {e}",
            self.worker,
            self.host,
            self.role
        )
    }

    async fn call<T, F>(&self, op: &str, f: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.err(op, format!("{} ({:?})", s.message(), s.code()))),
            Err(_) => Err(self.err(
                op,
                format!(
                    "no answer within {:.0} s (launcher.rpc_timeout_s, or longer for state \
                     saves and user rewards that may take longer)",
                    self.timeout.as_secs_f64()
                ),
            )),
        }
    }

    async fn log_probs_with(
        &self,
        seqs: pb::Sequences,
        temperature: f64,
        adapters_off: bool,
    ) -> Result<pb::Tensor> {
        let mut c = self.client.clone();
        let req = pb::SequencesRequest {
            role_id: self.role.clone(),
            sequences: Some(seqs),
            temperature,
            adapters_off,
        };
        let r = self.call("LogProbs", c.log_probs(req)).await?;
        r.tensor
            .ok_or_else(|| self.err("LogProbs", "answer has no tensor"))
    }

    async fn state_call(&self, op: &str, dir: &Path, save: bool) -> Result<Vec<String>> {
        let mut c = self.client.clone();
        let req = pb::StateRequest {
            role_id: self.role.clone(),
            dir: dir.to_string_lossy().into_owned(),
        };
        let slow = RoleClient {
            timeout: self.timeout.max(Duration::from_secs(600)),
            ..self.clone()
        };
        let r = if save {
            slow.call(op, c.save_state(req)).await?
        } else {
            slow.call(op, c.load_state(req)).await?
        };
        Ok(r.files)
    }

    /// The same worker connection, addressing the role `role` (one of several reward roles),
    /// whose calls may take up to `at_least` (a user reward's own worst case) when that is longer
    /// than `launcher.rpc_timeout_s`.
    pub fn for_role(&self, role: &str, at_least: Duration) -> RoleClient {
        RoleClient {
            role: role.to_string(),
            timeout: self.timeout.max(at_least),
            ..self.clone()
        }
    }

    pub async fn create(&self, mut req: pb::CreateRoleRequest) -> Result<pb::CreateRoleResponse> {
        req.role_id = self.role.clone();
        let mut c = self.client.clone();
        self.call("CreateRole", c.create_role(req)).await
    }
}

impl RoleClient {
    /// Prepares this member for group `group_id`: TCP binds a listener (the answer's
    /// address), NCCL makes a unique id (the answer's `nccl_id`).
    pub async fn open_group(
        &self,
        group_id: u64,
        backend: pb::CollectiveBackend,
    ) -> Result<pb::OpenGroupResponse> {
        let mut c = self.client.clone();
        let req = pb::OpenGroupRequest {
            role_id: self.role.clone(),
            group_id,
            backend: backend as i32,
        };
        self.call("OpenGroup", c.open_group(req)).await
    }

    /// Connects this member to the group's other ranks (all members must be called at once).
    #[allow(clippy::too_many_arguments)]
    pub async fn join_group(
        &self,
        group_id: u64,
        purpose: pb::GroupPurpose,
        rank: usize,
        peers: Vec<String>,
        timeout_s: f64,
        backend: pb::CollectiveBackend,
        nccl_id: Vec<u8>,
    ) -> Result<()> {
        let mut c = self.client.clone();
        let req = pb::JoinGroupRequest {
            role_id: self.role.clone(),
            group_id,
            purpose: purpose as i32,
            rank: rank as u32,
            peers,
            timeout_s,
            backend: backend as i32,
            nccl_id,
        };
        self.call("JoinGroup", c.join_group(req)).await?;
        Ok(())
    }
}

/// Asks a worker to stop; best effort, short deadline.
pub async fn shutdown(mut client: Inner) {
    let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown(pb::Empty {})).await;
}

/// What the step loop asks of a role: the calls of one training step, the weight sync, the
/// replica check and the checkpoint's state. [`RoleClient`] implements it over gRPC; the step
/// loop's unit tests implement it in-process. Start-up calls (CreateRole, the collective
/// groups) are [`RoleClient`]'s own: the loop never makes them.
pub trait RoleHandle: Clone + Send + Sync + 'static {
    /// The worker the role runs on, for messages.
    fn worker(&self) -> &str;
    /// The role's id on its worker (`actor`, `actor-1`, `reward`, ...).
    fn role(&self) -> &str;
    /// Samples responses (Generate).
    fn generate(
        &self,
        req: pb::GenerateRequest,
    ) -> impl Future<Output = Result<pb::GenerateResponse>> + Send;
    /// Per-token log-probs of the response tokens (LogProbs). `adapters_off`: an actor with
    /// LoRA adapters answers with them switched off (the frozen base policy's log-probs).
    fn log_probs(
        &self,
        seqs: pb::Sequences,
        temperature: f64,
        adapters_off: bool,
    ) -> impl Future<Output = Result<pb::Tensor>> + Send;
    /// The critic's per-token values (Values).
    fn values(&self, seqs: pb::Sequences) -> impl Future<Output = Result<pb::Tensor>> + Send;
    /// Rewards of decoded responses (Score).
    fn score(
        &self,
        items: Vec<pb::ScoreItem>,
    ) -> impl Future<Output = Result<pb::ScoreResponse>> + Send;
    /// One optimizer step on a minibatch shard (TrainStep).
    fn train_step(
        &self,
        req: pb::TrainStepRequest,
    ) -> impl Future<Output = Result<pb::TrainStepResponse>> + Send;
    /// Takes part in a weight broadcast from rank `root` of the role's weights group.
    fn sync_weights(
        &self,
        root: usize,
    ) -> impl Future<Output = Result<pb::SyncWeightsResponse>> + Send;
    /// SHA-256 of the role's weights.
    fn weights_digest(&self) -> impl Future<Output = Result<String>> + Send;
    /// Writes the role's trainable state into `dir`; returns the files written.
    fn save_state(&self, dir: &Path) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// Restores what `save_state` wrote.
    fn load_state(&self, dir: &Path) -> impl Future<Output = Result<Vec<String>>> + Send;
}

impl RoleHandle for RoleClient {
    fn worker(&self) -> &str {
        &self.worker
    }

    fn role(&self) -> &str {
        &self.role
    }

    async fn generate(&self, mut req: pb::GenerateRequest) -> Result<pb::GenerateResponse> {
        req.role_id = self.role.clone();
        let mut c = self.client.clone();
        self.call("Generate", c.generate(req)).await
    }

    async fn log_probs(
        &self,
        seqs: pb::Sequences,
        temperature: f64,
        adapters_off: bool,
    ) -> Result<pb::Tensor> {
        self.log_probs_with(seqs, temperature, adapters_off).await
    }

    async fn values(&self, seqs: pb::Sequences) -> Result<pb::Tensor> {
        let mut c = self.client.clone();
        let req = pb::SequencesRequest {
            role_id: self.role.clone(),
            sequences: Some(seqs),
            temperature: 1.0,
            adapters_off: false,
        };
        let r = self.call("Values", c.values(req)).await?;
        r.tensor
            .ok_or_else(|| self.err("Values", "answer has no tensor"))
    }

    async fn score(&self, items: Vec<pb::ScoreItem>) -> Result<pb::ScoreResponse> {
        let mut c = self.client.clone();
        let req = pb::ScoreRequest {
            role_id: self.role.clone(),
            items,
        };
        self.call("Score", c.score(req)).await
    }

    /// Writes the role's trainable state into `dir` (SaveState). Saving a large model takes
    /// longer than a step's RPC, so the deadline is at least 10 minutes.
    async fn save_state(&self, dir: &Path) -> Result<Vec<String>> {
        self.state_call("SaveState", dir, true).await
    }

    /// Restores what [`RoleClient::save_state`] wrote (LoadState).
    async fn load_state(&self, dir: &Path) -> Result<Vec<String>> {
        self.state_call("LoadState", dir, false).await
    }

    async fn train_step(&self, mut req: pb::TrainStepRequest) -> Result<pb::TrainStepResponse> {
        req.role_id = self.role.clone();
        let mut c = self.client.clone();
        self.call("TrainStep", c.train_step(req)).await
    }

    /// Takes part in a weight broadcast from rank `root` of this role's weights group.
    async fn sync_weights(&self, root: usize) -> Result<pb::SyncWeightsResponse> {
        let mut c = self.client.clone();
        let req = pb::SyncWeightsRequest {
            role_id: self.role.clone(),
            root: root as u32,
        };
        self.call("SyncWeights", c.sync_weights(req)).await
    }

    /// SHA-256 of the role's weights.
    async fn weights_digest(&self) -> Result<String> {
        let mut c = self.client.clone();
        let req = pb::RoleRef {
            role_id: self.role.clone(),
        };
        Ok(self
            .call("WeightsDigest", c.weights_digest(req))
            .await?
            .sha256)
    }
}
