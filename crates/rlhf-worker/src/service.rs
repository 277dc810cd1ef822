//! The gRPC `Worker` service: decodes requests, runs them on the addressed role's thread, encodes
//! the answers. Tensors are decoded and encoded inside the role thread's closure, so the async
//! side only ever moves protobuf bytes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use rlhf_algo::{KlLossTerm, PolicyLossConfig, Precision, ValueLossConfig};
use rlhf_model::{ChatMessage, LoraConfig, Target};
use rlhf_proto::limits::WEIGHT_CHUNK_BYTES;
use rlhf_proto::pb::{self, worker_server::Worker};
use rlhf_proto::settings::{optimizer_from_settings, SettingsFieldError};
use rlhf_proto::wire::{self, optional, required, to_wire};
use tch::{Device, Kind};
use tokio::sync::{watch, Mutex, RwLock};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument};

use crate::comm::{weights_digest, Group, Purpose};
use crate::error::{RoleError, RoleResult};
use crate::external_rewards::command::CommandSpec;
use crate::external_rewards::http::HttpSpec;
use crate::external_rewards::{parse_extra, ExternalSpec};
use crate::host::{Hosted, RoleHandle};
use crate::reward_rules::{ExactMatch, Extract, MathAnswer, Rule};
use crate::roles::{
    GenerateArgs, RewardKindSpec, RoleDetail, RoleSpec, ScoreItem, Seqs, TrainBatch, TrainerSpec,
};

/// The service state: the roles this worker hosts, listeners of groups being formed, and the
/// shutdown signal.
pub struct WorkerService {
    roles: RwLock<HashMap<String, Arc<RoleHandle>>>,
    shutdown: watch::Sender<bool>,
    peers: PeerAddress,
    /// Listeners bound by OpenGroup, by (role, group id), until JoinGroup takes them.
    opening: Mutex<HashMap<(String, u64), tokio::net::TcpListener>>,
    /// The directories request paths must lie in (`--allow-root`).
    roots: Vec<PathBuf>,
}

/// Where this worker accepts connections from group peers, and the key they must prove.
#[derive(Debug, Clone)]
pub struct PeerAddress {
    /// Interface to listen on (the worker's gRPC bind address).
    pub bind: IpAddr,
    /// Host name or address peers connect to.
    pub host: String,
    /// The run's collective key (derived from the run token), proved both ways by every TCP
    /// group connection.
    pub key: rlhf_comm::CollectiveKey,
}

impl WorkerService {
    pub fn new(
        shutdown: watch::Sender<bool>,
        peers: PeerAddress,
        roots: Vec<PathBuf>,
    ) -> WorkerService {
        WorkerService {
            roles: RwLock::new(HashMap::new()),
            shutdown,
            peers,
            opening: Mutex::new(HashMap::new()),
            roots,
        }
    }

    /// The path of request field `field`, when it lies inside the directories this worker was
    /// started for (no `..` out, no symlink out); InvalidArgument naming the field otherwise.
    fn confined(&self, field: &str, path: &Path) -> RoleResult<PathBuf> {
        rlhf_ckpt::check_within(path, &self.roots).map_err(|e| {
            RoleError::bad(
                field,
                format!("{e}; this worker serves only paths under its --allow-root directories"),
            )
        })
    }

    async fn role(&self, id: &str) -> Result<Arc<RoleHandle>, Status> {
        self.roles
            .read()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| RoleError::NoRole(id.to_string()).into())
    }
}

/// Parses "cpu", "cuda" or "cuda:N".
pub fn parse_device(s: &str) -> RoleResult<Device> {
    match s {
        "" => Ok(Device::Cpu),
        _ => rlhf_model::config::device_from_str(s).ok_or_else(|| {
            RoleError::bad("device", format!("`{s}`: expected cpu, cuda or cuda:N"))
        }),
    }
}

fn parse_dtype(s: &str) -> RoleResult<Kind> {
    match s {
        "" | "f32" => Ok(Kind::Float),
        "bf16" => Ok(Kind::BFloat16),
        "f16" => Ok(Kind::Half),
        _ => Err(RoleError::bad(
            "dtype",
            format!("`{s}`: expected f32, bf16 or f16"),
        )),
    }
}

impl From<SettingsFieldError> for RoleError {
    fn from(e: SettingsFieldError) -> Self {
        RoleError::bad(&e.field, e.reason)
    }
}

fn trainer_spec(t: pb::TrainerSpec, actor: bool) -> RoleResult<TrainerSpec> {
    let pb::TrainerSpec {
        micro_batch_size,
        temperature,
        pure_low_precision,
        zero_stage,
        lora,
        gradient_checkpointing,
        loss,
        optimizer,
        kl_loss,
    } = t;
    if zero_stage > 2 {
        return Err(RoleError::bad(
            "zero_stage",
            format!("{zero_stage}: expected 0, 1 or 2"),
        ));
    }
    use pb::trainer_spec::Loss;
    let (policy_loss, value_loss) = match (actor, loss) {
        (true, Some(Loss::PolicyLoss(p))) => (p.try_into()?, ValueLossConfig::default()),
        (false, Some(Loss::ValueLoss(v))) => (PolicyLossConfig::default(), v.try_into()?),
        (true, _) => {
            return Err(RoleError::bad(
                "policy_loss",
                "an actor needs policy_loss settings".into(),
            ))
        }
        (false, _) => {
            return Err(RoleError::bad(
                "value_loss",
                "a critic needs value_loss settings".into(),
            ))
        }
    };
    let (optim, total_steps) = optimizer_from_settings(
        optimizer
            .ok_or_else(|| RoleError::bad("optimizer", "required: the AdamW settings".into()))?,
    )?;
    if micro_batch_size < 1 {
        return Err(RoleError::bad(
            "micro_batch_size",
            format!("{micro_batch_size}: must be >= 1"),
        ));
    }
    let temperature = if temperature == 0.0 { 1.0 } else { temperature };
    let kl_loss = match kl_loss {
        Some(k) if actor => Some(KlLossTerm::try_from(k)?),
        Some(_) => {
            return Err(RoleError::bad(
                "kl_loss",
                "only an actor's loss has a KL term; leave it unset for a critic".into(),
            ))
        }
        None => None,
    };
    let lora = lora.filter(|_| actor).map(lora_config).transpose()?;
    Ok(TrainerSpec {
        policy_loss,
        value_loss,
        optim,
        total_steps,
        micro_batch_size,
        gradient_checkpointing,
        temperature,
        kl_loss,
        precision: if pure_low_precision {
            Precision::Pure
        } else {
            Precision::Mixed
        },
        zero_stage,
        lora,
    })
}

fn lora_config(l: pb::LoraSpec) -> RoleResult<LoraConfig> {
    let pb::LoraSpec {
        rank,
        alpha,
        dropout,
        targets,
    } = l;
    let targets = targets
        .iter()
        .map(|t| {
            Target::parse(t).ok_or_else(|| {
                RoleError::bad(
                    "lora.targets",
                    format!("`{t}` is not one of {}", Target::known()),
                )
            })
        })
        .collect::<RoleResult<Vec<_>>>()?;
    Ok(LoraConfig::new(rank as usize, alpha, dropout, targets))
}

impl TryFrom<pb::CreateRoleRequest> for RoleSpec {
    type Error = RoleError;

    fn try_from(r: pb::CreateRoleRequest) -> RoleResult<RoleSpec> {
        let pb::CreateRoleRequest {
            role_id,
            kind,
            model_path,
            device,
            dtype,
            seed,
            spec,
        } = r;
        if role_id.is_empty() {
            return Err(RoleError::bad("role_id", "must not be empty".into()));
        }
        let kind = pb::RoleKind::try_from(kind).unwrap_or(pb::RoleKind::Unspecified);
        let detail = match (kind, spec) {
            (pb::RoleKind::Actor, Some(pb::create_role_request::Spec::Actor(t))) => {
                RoleDetail::Actor(trainer_spec(t, true)?)
            }
            (pb::RoleKind::Critic, Some(pb::create_role_request::Spec::Critic(t))) => {
                RoleDetail::Critic(trainer_spec(t, false)?)
            }
            (pb::RoleKind::Reference, Some(pb::create_role_request::Spec::Reference(_)) | None) => {
                RoleDetail::Reference
            }
            (pb::RoleKind::Generator, Some(pb::create_role_request::Spec::Generator(g))) => {
                let pb::GeneratorSpec { lora } = g;
                RoleDetail::Generator(lora.map(lora_config).transpose()?)
            }
            (pb::RoleKind::Generator, None) => RoleDetail::Generator(None),
            (pb::RoleKind::Reward, Some(pb::create_role_request::Spec::Reward(r))) => {
                RoleDetail::Reward(match r.kind {
                    Some(pb::reward_role_spec::Kind::Model(m)) => {
                        let pb::ModelReward {
                            attribute_weights,
                            mean,
                            std,
                        } = m;
                        RewardKindSpec::Model {
                            attribute_weights: attribute_weights
                                .into_iter()
                                .collect::<BTreeMap<_, _>>(),
                            mean,
                            std,
                        }
                    }
                    Some(pb::reward_role_spec::Kind::ExactMatch(e)) => {
                        let pb::ExactMatchReward {
                            extract,
                            marker,
                            correct,
                            incorrect,
                        } = e;
                        RewardKindSpec::Rule(Rule::ExactMatch(ExactMatch {
                            extract: Extract::parse(&extract)
                                .map_err(|m| RoleError::bad("extract", m))?,
                            marker,
                            correct,
                            incorrect,
                        }))
                    }
                    Some(pb::reward_role_spec::Kind::Math(e)) => {
                        let pb::MathReward {
                            marker,
                            correct,
                            incorrect,
                        } = e;
                        RewardKindSpec::Rule(Rule::Math(MathAnswer {
                            marker,
                            correct,
                            incorrect,
                        }))
                    }
                    Some(pb::reward_role_spec::Kind::Http(h)) => {
                        let pb::HttpReward {
                            url,
                            timeout_s,
                            retries,
                            concurrency,
                            batch_size,
                        } = h;
                        RewardKindSpec::External(ExternalSpec::Http(HttpSpec {
                            url,
                            timeout: seconds("spec.reward.http.timeout_s", timeout_s)?,
                            retries,
                            concurrency: at_least_one("spec.reward.http.concurrency", concurrency)?,
                            batch_size: at_least_one("spec.reward.http.batch_size", batch_size)?,
                        }))
                    }
                    Some(pb::reward_role_spec::Kind::Command(c)) => {
                        let pb::CommandReward {
                            command,
                            workdir,
                            timeout_s,
                            concurrency,
                        } = c;
                        if command.first().is_none_or(|p| p.is_empty()) {
                            return Err(RoleError::bad(
                                "spec.reward.command.command",
                                "must name a program".into(),
                            ));
                        }
                        RewardKindSpec::External(ExternalSpec::Command(CommandSpec {
                            command,
                            workdir: PathBuf::from(workdir),
                            timeout: seconds("spec.reward.command.timeout_s", timeout_s)?,
                            concurrency: at_least_one(
                                "spec.reward.command.concurrency",
                                concurrency,
                            )?,
                        }))
                    }
                    None => return Err(RoleError::bad("spec.reward.kind", "missing".into())),
                })
            }
            (k, _) => {
                return Err(RoleError::bad(
                    "spec",
                    format!("role kind {} needs its matching spec", k.as_str_name()),
                ))
            }
        };
        let needs_model = !matches!(
            detail,
            RoleDetail::Reward(RewardKindSpec::Rule(_) | RewardKindSpec::External(_))
        );
        if needs_model && model_path.is_empty() {
            return Err(RoleError::bad(
                "model_path",
                "must name a model directory".into(),
            ));
        }
        Ok(RoleSpec {
            role_id,
            model_path: PathBuf::from(model_path),
            device: parse_device(&device)?,
            dtype: parse_dtype(&dtype)?,
            seed,
            detail,
        })
    }
}

/// A positive, finite number of seconds.
fn seconds(field: &str, s: f64) -> RoleResult<std::time::Duration> {
    if s > 0.0 && s.is_finite() {
        Ok(std::time::Duration::from_secs_f64(s))
    } else {
        Err(RoleError::bad(
            field,
            format!("must be > 0 seconds, got {s}"),
        ))
    }
}

fn at_least_one(field: &str, n: u32) -> RoleResult<usize> {
    if n == 0 {
        return Err(RoleError::bad(field, "must be at least 1".into()));
    }
    Ok(n as usize)
}

fn seqs(s: Option<pb::Sequences>) -> RoleResult<Seqs> {
    let pb::Sequences {
        input_ids,
        attention_mask,
        prompt_width,
        response_len,
    } = s.ok_or_else(|| RoleError::bad("sequences", "missing".into()))?;
    Ok(Seqs {
        input_ids: required("sequences.input_ids", input_ids.as_ref())?,
        attention_mask: required("sequences.attention_mask", attention_mask.as_ref())?,
        prompt_width,
        response_len,
    })
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    #[instrument(skip_all, fields(role = %req.get_ref().role_id))]
    async fn create_role(
        &self,
        req: Request<pb::CreateRoleRequest>,
    ) -> Result<Response<pb::CreateRoleResponse>, Status> {
        let spec = RoleSpec::try_from(req.into_inner())?;
        if !spec.model_path.as_os_str().is_empty() {
            self.confined("model_path", &spec.model_path)?;
        }
        let id = spec.role_id.clone();
        if self.roles.read().await.contains_key(&id) {
            return Err(RoleError::RoleExists(id).into());
        }
        let (handle, info) = RoleHandle::spawn(spec).await?;
        info!(role = %id, kind = handle.kind.name(), parameters = info.parameters, "role created");
        let mut roles = self.roles.write().await;
        if roles.contains_key(&id) {
            return Err(RoleError::RoleExists(id).into());
        }
        roles.insert(id, Arc::new(handle));
        Ok(Response::new(pb::CreateRoleResponse {
            parameters: info.parameters,
            attribute_names: info.attribute_names,
        }))
    }

    async fn destroy_role(&self, req: Request<pb::RoleRef>) -> Result<Response<pb::Empty>, Status> {
        let id = req.into_inner().role_id;
        self.roles
            .write()
            .await
            .remove(&id)
            .ok_or(RoleError::NoRole(id))?;
        Ok(Response::new(pb::Empty {}))
    }

    #[instrument(skip_all, fields(role = %req.get_ref().role_id))]
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let pb::GenerateRequest {
            role_id,
            prompts,
            samples_per_prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            first_row,
        } = req.into_inner();
        let args = GenerateArgs {
            prompts: prompts.into_iter().map(|p| p.ids).collect(),
            samples_per_prompt: samples_per_prompt as usize,
            max_new_tokens: max_new_tokens as usize,
            temperature,
            top_k: top_k as usize,
            top_p: if top_p == 0.0 { 1.0 } else { top_p },
            seed,
            first_row,
        };
        let role = self.role(&role_id).await?;
        let out = role
            .run(move |r| {
                let g = r.generate(args)?;
                Ok(pb::GenerateResponse {
                    input_ids: Some(to_wire("input_ids", &g.input_ids)?),
                    attention_mask: Some(to_wire("attention_mask", &g.attention_mask)?),
                    prompt_width: g.prompt_width,
                    response_mask: Some(to_wire("response_mask", &g.response_mask)?),
                    response_logprobs: Some(to_wire("response_logprobs", &g.response_logprobs)?),
                    finished: g.finished,
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    #[instrument(skip_all, fields(role = %req.get_ref().role_id))]
    async fn log_probs(
        &self,
        req: Request<pb::SequencesRequest>,
    ) -> Result<Response<pb::TensorResponse>, Status> {
        let pb::SequencesRequest {
            role_id,
            sequences,
            temperature,
            adapters_off,
        } = req.into_inner();
        let temperature = if temperature == 0.0 { 1.0 } else { temperature };
        let role = self.role(&role_id).await?;
        let t = role
            .run(move |r| {
                let lp = r.logprobs(seqs(sequences)?, temperature, adapters_off)?;
                Ok(to_wire("logprobs", &lp)?)
            })
            .await?;
        Ok(Response::new(pb::TensorResponse { tensor: Some(t) }))
    }

    #[instrument(skip_all, fields(role = %req.get_ref().role_id))]
    async fn values(
        &self,
        req: Request<pb::SequencesRequest>,
    ) -> Result<Response<pb::TensorResponse>, Status> {
        let pb::SequencesRequest {
            role_id,
            sequences,
            temperature: _,
            adapters_off,
        } = req.into_inner();
        if adapters_off {
            return Err(RoleError::bad(
                "adapters_off",
                "applies to LogProbs only; the critic's values have no adapters to switch off"
                    .into(),
            )
            .into());
        }
        let role = self.role(&role_id).await?;
        let t = role
            .run(move |r| Ok(to_wire("values", &r.values(seqs(sequences)?)?)?))
            .await?;
        Ok(Response::new(pb::TensorResponse { tensor: Some(t) }))
    }

    #[instrument(skip_all, fields(role = %req.get_ref().role_id))]
    async fn score(
        &self,
        req: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let pb::ScoreRequest { role_id, items } = req.into_inner();
        let items: Vec<ScoreItem> = items
            .into_iter()
            .enumerate()
            .map(|(i, it)| {
                let pb::ScoreItem {
                    prompt,
                    response,
                    answer,
                    extra_json,
                } = it;
                Ok(ScoreItem {
                    prompt: prompt
                        .into_iter()
                        .map(|m| ChatMessage {
                            role: m.role,
                            content: m.content,
                        })
                        .collect(),
                    response,
                    answer,
                    extra: parse_extra(i, &extra_json)?,
                })
            })
            .collect::<RoleResult<_>>()?;
        let role = self.role(&role_id).await?;
        let out = role
            .run(move |r| {
                let s = r.score(items)?;
                Ok(pb::ScoreResponse {
                    rewards: Some(to_wire("rewards", &s.rewards)?),
                    attributes: s
                        .attributes
                        .map(|a| to_wire("attributes", &a))
                        .transpose()?,
                    attribute_names: s.attribute_names,
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    #[instrument(skip_all, fields(role = %req.get_ref().role_id))]
    async fn train_step(
        &self,
        req: Request<pb::TrainStepRequest>,
    ) -> Result<Response<pb::TrainStepResponse>, Status> {
        let pb::TrainStepRequest {
            role_id,
            sequences,
            response_mask,
            advantages,
            old_logprobs,
            ref_logprobs,
            old_values,
            returns,
            minibatch_tokens,
            minibatch_rows,
        } = req.into_inner();
        let minibatch = (minibatch_tokens > 0.0 || minibatch_rows > 0.0)
            .then_some((minibatch_tokens, minibatch_rows));
        let role = self.role(&role_id).await?;
        let (metrics, step) = role
            .run(move |r| {
                let batch = TrainBatch {
                    seqs: seqs(sequences)?,
                    response_mask: required("response_mask", response_mask.as_ref())?,
                    advantages: optional("advantages", advantages.as_ref())?,
                    old_logprobs: optional("old_logprobs", old_logprobs.as_ref())?,
                    ref_logprobs: optional("ref_logprobs", ref_logprobs.as_ref())?,
                    old_values: optional("old_values", old_values.as_ref())?,
                    returns: optional("returns", returns.as_ref())?,
                    minibatch,
                };
                let Hosted { role, groups } = r;
                role.train_step(batch, groups)
            })
            .await?;
        Ok(Response::new(pb::TrainStepResponse {
            metrics: metrics.into_iter().collect(),
            optimizer_step: step,
        }))
    }

    type ExportWeightsStream = ChunkStream;

    async fn export_weights(
        &self,
        req: Request<pb::RoleRef>,
    ) -> Result<Response<Self::ExportWeightsStream>, Status> {
        let role = self.role(&req.into_inner().role_id).await?;
        // Serialise on the role thread (a consistent snapshot), stream from here.
        let chunks = role
            .run(|r| {
                let mut out = vec![];
                for (name, t) in r.weights("ExportWeights")? {
                    out.extend(wire::chunks(&name, &t, WEIGHT_CHUNK_BYTES)?);
                }
                Ok(out)
            })
            .await?;
        let s = tokio_stream::iter(chunks.into_iter().map(Ok));
        Ok(Response::new(Box::pin(s)))
    }

    async fn import_weights(
        &self,
        req: Request<Streaming<pb::WeightChunk>>,
    ) -> Result<Response<pb::ImportWeightsResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| RoleError::bad("chunks", "the stream was empty".into()))?;
        if first.role_id.is_empty() {
            return Err(
                RoleError::bad("role_id", "the first chunk must name the role".into()).into(),
            );
        }
        let role = self.role(&first.role_id).await?;
        // The stream may declare no more than the role's model holds, checked before anything
        // is allocated for a tensor (a sender's dtype may be wider than the model's: 8 bytes per
        // element, the widest wire dtype, bounds them all).
        let limit = role
            .run(|r| Ok(r.role.weight_elems("ImportWeights")?.saturating_mul(8)))
            .await?;
        let mut asm = wire::WeightAssembler::with_limit(limit);
        asm.push(first).map_err(RoleError::from)?;
        while let Some(c) = stream.message().await? {
            asm.push(c).map_err(RoleError::from)?;
        }
        let (tensors, bytes) = role
            .run(move |r| {
                let (ts, bytes) = asm.finish()?;
                let n = ts.len() as u64;
                r.import_weights(ts)?;
                Ok((n, bytes))
            })
            .await?;
        Ok(Response::new(pb::ImportWeightsResponse { tensors, bytes }))
    }

    async fn save_state(
        &self,
        req: Request<pb::StateRequest>,
    ) -> Result<Response<pb::StateResponse>, Status> {
        let pb::StateRequest { role_id, dir } = req.into_inner();
        let dir = self.confined("dir", Path::new(&dir))?;
        let role = self.role(&role_id).await?;
        let files = role
            .run(move |r| {
                let Hosted { role, groups } = r;
                role.save_state(&dir, groups)
            })
            .await?;
        Ok(Response::new(pb::StateResponse { files }))
    }

    async fn load_state(
        &self,
        req: Request<pb::StateRequest>,
    ) -> Result<Response<pb::StateResponse>, Status> {
        let pb::StateRequest { role_id, dir } = req.into_inner();
        let dir = self.confined("dir", Path::new(&dir))?;
        let role = self.role(&role_id).await?;
        let files = role
            .run(move |r| {
                let Hosted { role, groups } = r;
                role.load_state(&dir, groups)
            })
            .await?;
        Ok(Response::new(pb::StateResponse { files }))
    }

    async fn open_group(
        &self,
        req: Request<pb::OpenGroupRequest>,
    ) -> Result<Response<pb::OpenGroupResponse>, Status> {
        let pb::OpenGroupRequest {
            role_id,
            group_id,
            backend,
        } = req.into_inner();
        self.role(&role_id).await?;
        if backend == pb::CollectiveBackend::Nccl as i32 {
            // Every member makes an id; the coordinator hands rank 0's to all, and rank 0's
            // process hosts NCCL's bootstrap root for it.
            rlhf_comm::nccl_available().map_err(|m| {
                RoleError::bad(
                    "backend",
                    format!("{m}; or set launcher.collective_backend: tcp"),
                )
            })?;
            let id = tokio::task::spawn_blocking(rlhf_comm::NcclGroup::unique_id)
                .await
                .map_err(|e| RoleError::bad("backend", format!("NCCL unique id: {e}")))?
                .map_err(RoleError::from)?;
            return Ok(Response::new(pb::OpenGroupResponse {
                address: String::new(),
                nccl_id: id.to_bytes().to_vec(),
            }));
        }
        let listener = rlhf_comm::bind(SocketAddr::new(self.peers.bind, 0))
            .await
            .map_err(RoleError::from)?;
        let port = listener
            .local_addr()
            .map_err(|e| RoleError::io(std::path::Path::new("(group listener)"), e))?
            .port();
        self.opening
            .lock()
            .await
            .insert((role_id.clone(), group_id), listener);
        let address = rlhf_comm::net::host_port(&self.peers.host, port);
        info!(role = %role_id, group = group_id, %address, "group listener open");
        Ok(Response::new(pb::OpenGroupResponse {
            address,
            nccl_id: vec![],
        }))
    }

    async fn join_group(
        &self,
        req: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let pb::JoinGroupRequest {
            role_id,
            group_id,
            purpose,
            rank,
            peers,
            timeout_s,
            backend,
            nccl_id,
        } = req.into_inner();
        let purpose = match pb::GroupPurpose::try_from(purpose) {
            Ok(pb::GroupPurpose::Gradients) => Purpose::Gradients,
            Ok(pb::GroupPurpose::Weights) => Purpose::Weights,
            _ => {
                return Err(RoleError::bad(
                    "purpose",
                    format!("{purpose}: expected GRADIENTS or WEIGHTS"),
                )
                .into())
            }
        };
        if !(timeout_s > 0.0 && timeout_s.is_finite()) {
            return Err(RoleError::bad("timeout_s", format!("{timeout_s}: must be > 0")).into());
        }
        let timeout = std::time::Duration::from_secs_f64(timeout_s);
        let role = self.role(&role_id).await?;
        let world = peers.len();
        if backend == pb::CollectiveBackend::Nccl as i32 {
            let id = rlhf_comm::NcclUniqueId::from_bytes(&nccl_id).map_err(RoleError::from)?;
            role.run(move |h| {
                let device = match h.role.device() {
                    Some(Device::Cuda(n)) => n,
                    other => {
                        return Err(RoleError::bad(
                            "backend",
                            format!(
                                "NCCL needs the role on a CUDA device, it is on {other:?}; \
                                 set launcher.collective_backend: tcp"
                            ),
                        ))
                    }
                };
                let mut cfg =
                    rlhf_comm::NcclGroupConfig::new(group_id, rank as usize, world, device);
                cfg.timeout = timeout;
                let g = rlhf_comm::NcclGroup::connect(cfg, id)?;
                h.groups.set(purpose, Group::Nccl(g));
                Ok(())
            })
            .await?;
        } else {
            let listener = self
                .opening
                .lock()
                .await
                .remove(&(role_id.clone(), group_id))
                .ok_or_else(|| {
                    RoleError::bad(
                        "group_id",
                        format!(
                            "group {group_id} was not opened for role `{role_id}` (OpenGroup first)"
                        ),
                    )
                })?;
            let mut addrs = Vec::with_capacity(world);
            for (i, p) in peers.iter().enumerate() {
                let a = tokio::net::lookup_host(p.as_str())
                    .await
                    .ok()
                    .and_then(|mut it| it.next())
                    .ok_or_else(|| {
                        RoleError::bad(
                            "peers",
                            format!(
                                "rank {i}'s address `{p}` does not resolve to a socket address"
                            ),
                        )
                    })?;
                addrs.push(a);
            }
            let mut cfg =
                rlhf_comm::GroupConfig::new(self.peers.key.clone(), group_id, rank as usize, world);
            cfg.timeout = timeout;
            let group = rlhf_comm::TcpGroup::connect(cfg, listener, addrs)
                .await
                .map_err(RoleError::from)?;
            role.run(move |h| {
                h.groups.set(purpose, Group::Tcp(group));
                Ok(())
            })
            .await?;
        }
        info!(role = %role_id, group = group_id, purpose = purpose.name(), rank, world, nccl = backend == pb::CollectiveBackend::Nccl as i32, "joined group");
        Ok(Response::new(pb::Empty {}))
    }

    #[instrument(skip_all, fields(role = %req.get_ref().role_id))]
    async fn sync_weights(
        &self,
        req: Request<pb::SyncWeightsRequest>,
    ) -> Result<Response<pb::SyncWeightsResponse>, Status> {
        let pb::SyncWeightsRequest { role_id, root } = req.into_inner();
        let role = self.role(&role_id).await?;
        let out = role
            .run(move |h| {
                let t0 = std::time::Instant::now();
                let vars = h.role.sync_tensors("SyncWeights")?;
                let (bytes, tensors) = h.groups.sync_weights(root as usize, &vars)?;
                Ok(pb::SyncWeightsResponse {
                    bytes,
                    tensors,
                    seconds: t0.elapsed().as_secs_f64(),
                })
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn weights_digest(
        &self,
        req: Request<pb::RoleRef>,
    ) -> Result<Response<pb::WeightsDigestResponse>, Status> {
        let role = self.role(&req.into_inner().role_id).await?;
        let (sha256, bytes) = role
            .run(|h| weights_digest(&h.role.digest_tensors("WeightsDigest")?))
            .await?;
        Ok(Response::new(pb::WeightsDigestResponse { sha256, bytes }))
    }

    async fn shutdown(&self, _req: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        info!("shutdown requested by the coordinator");
        let _ = self.shutdown.send(true);
        Ok(Response::new(pb::Empty {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rlhf_algo::{KlEstimator, LossAgg, OptimizerConfig};
    use rlhf_proto::settings::optimizer_settings;

    fn actor_spec() -> pb::TrainerSpec {
        pb::TrainerSpec {
            micro_batch_size: 2,
            temperature: 1.0,
            gradient_checkpointing: false,
            pure_low_precision: false,
            zero_stage: 0,
            lora: None,
            loss: Some(pb::trainer_spec::Loss::PolicyLoss(
                (&PolicyLossConfig::default()).into(),
            )),
            optimizer: Some(optimizer_settings(&OptimizerConfig::actor(), 10)),
            kl_loss: None,
        }
    }

    #[test]
    fn trainer_spec_carries_gradient_checkpointing() {
        for on in [false, true] {
            let t = pb::TrainerSpec {
                gradient_checkpointing: on,
                ..actor_spec()
            };
            assert_eq!(trainer_spec(t, true).unwrap().gradient_checkpointing, on);
        }
    }

    #[test]
    fn trainer_spec_carries_the_typed_settings() {
        let t = pb::TrainerSpec {
            kl_loss: Some(
                KlLossTerm {
                    estimator: KlEstimator::K3,
                    coef: 0.04,
                }
                .into(),
            ),
            ..actor_spec()
        };
        let s = trainer_spec(t, true).unwrap();
        assert_eq!(s.policy_loss, PolicyLossConfig::default());
        assert_eq!((s.optim, s.total_steps), (OptimizerConfig::actor(), 10));
        assert_eq!(
            s.kl_loss,
            Some(KlLossTerm {
                estimator: KlEstimator::K3,
                coef: 0.04
            })
        );
        let critic = pb::TrainerSpec {
            loss: Some(pb::trainer_spec::Loss::ValueLoss(
                (&ValueLossConfig {
                    clip: None,
                    agg: LossAgg::SeqMeanTokenSum,
                })
                    .into(),
            )),
            ..actor_spec()
        };
        let s = trainer_spec(critic, false).unwrap();
        assert_eq!(s.value_loss.agg, LossAgg::SeqMeanTokenSum);
    }

    #[test]
    fn bad_trainer_settings_are_refused_naming_the_field() {
        let field = |t: pb::TrainerSpec, actor: bool| match trainer_spec(t, actor) {
            Err(RoleError::BadRequest { field, .. }) => field,
            other => panic!("expected a bad request, got {other:?}"),
        };
        // An actor sent a critic's loss, and the other way round.
        assert_eq!(field(actor_spec(), false), "value_loss");
        let no_loss = pb::TrainerSpec {
            loss: None,
            ..actor_spec()
        };
        assert_eq!(field(no_loss, true), "policy_loss");
        let no_optimizer = pb::TrainerSpec {
            optimizer: None,
            ..actor_spec()
        };
        assert_eq!(field(no_optimizer, true), "optimizer");
        let mut o = optimizer_settings(&OptimizerConfig::actor(), 10);
        o.lr = f64::INFINITY;
        let bad_lr = pb::TrainerSpec {
            optimizer: Some(o),
            ..actor_spec()
        };
        assert_eq!(field(bad_lr, true), "optimizer.lr");
        let kl = pb::KlLossSettings {
            coef: -1.0,
            estimator: pb::KlEstimator::K1 as i32,
        };
        let bad_kl = pb::TrainerSpec {
            kl_loss: Some(kl),
            ..actor_spec()
        };
        assert_eq!(field(bad_kl, true), "kl_loss.coef");
        let mut p = pb::PolicyLossSettings::from(&PolicyLossConfig::default());
        p.dual_clip = Some(0.5);
        let bad_dual = pb::TrainerSpec {
            loss: Some(pb::trainer_spec::Loss::PolicyLoss(p)),
            ..actor_spec()
        };
        assert_eq!(field(bad_dual, true), "policy_loss.dual_clip");
    }
}
