//! `rlhf-coord plan RUN.yaml`: the placement (which role on which node and device), the
//! estimated memory per device from the model files, and (for `launcher.kind: slurm`) the sbatch
//! script, without starting anything. A device whose estimate exceeds its capacity is an error
//! saying by how much and which keys would make it fit.
//!
//! The estimate reads the safetensors headers (exact parameter counts, no weights read) and
//! `config.json`. With W the role's parameters, d the bytes of `models.dtype` (f32 4, bf16/f16
//! 2), per role replica:
//! - frozen roles (reference, reward, generator): weights `W*d`; a generator also its share of
//!   the rollout's KV cache (the rollout sequences split over the generators, or over the actor
//!   replicas when there are none), `2 * layers * kv_heads * head_dim * (max_prompt_tokens +
//!   max_new_tokens) * d` per sequence.
//! - trainable roles (actor, critic), as `Trainer` and `ShardedAdamW` hold them, with P the
//!   trainable parameters (all of them, or the actor's LoRA adapters under `models.lora`:
//!   `rank * (in + out)` per adapted projection and layer), N the role's data-parallel replicas,
//!   Z `train.zero_stage` (taken as 0 when N = 1), masters = dtype bf16/f16 and not
//!   `train.pure_low_precision`, m the moment bytes (4 with masters, else d):
//!   - weights `W*d`;
//!   - grads: autograd's `P*d`, plus the f32 accumulator `P*4` (`P*4/N` at Z = 2);
//!   - optimizer: f32 master weights `P*4` with masters (`P*4/N` at Z >= 1), AdamW's two
//!     moments `2*m*P` (`2*m*P/N` at Z >= 1);
//!   - over TCP (replicas on CPU workers, N > 1): the host staging copy of one gradient
//!     bucket, `min(P, 16M) * 4`, counted with the grads, and one bucket copied back out of
//!     it per collective call, a transient;
//!   - activations: the peak of what lives only for part of a step, the largest of: one
//!     training micro-batch's saved activations (below); at Z = 2 the one f32 bucket
//!     (16M elements) `Trainer::accumulate` converts at a time for the reduce-scatter (at
//!     Z = 0/1 each gradient is added into the accumulator in place); at Z = 1 the owned f32
//!     gradient shard of the step, `P*4/N`; and, for an actor that samples its own rollouts,
//!     its KV cache.
//!
//! Saved activations of one micro-batch, T = `micro_batch_size * (max_prompt_tokens +
//! max_new_tokens)` tokens, from what each op of `rlhf_model::llama`'s decoder layer keeps for
//! backward (h hidden, i intermediate, q = heads * head_dim, kv = kv_heads * head_dim):
//! each RMSNorm keeps its f32 input (4h bytes), its normalised value and its output (2 * d*h);
//! attention keeps q and k after rotary, v, SDPA's output and its contiguous copy fed to o_proj
//! (d * (3q + 2kv); SDPA keeps no t x t matrix); the MLP keeps gate before and after SiLU, up,
//! and their product (4 * d*i). Per layer and token: `a = 8h + d*(4h + 3q + 2kv + 4i)` bytes,
//! i.e. `c1 = 8 + 7d` bytes per hidden unit (q = h) and `c2 = 4d` per intermediate unit, plus
//! `2d*kv`. A micro-batch keeps `layers * T * a`; with `train.gradient_checkpointing` it keeps
//! one hidden state per layer and token plus one layer recomputed, `layers * T * d*h + T * a`.
//! The actor adds its response logits, `micro_batch_size * max_new_tokens * vocab * (d + 4)`
//! (the lm_head output and log-softmax's f32 result); the critic's value head is negligible.
//! Not counted: the CUDA context and allocator slack, libtorch's own memory on CPU, LoRA's
//! rank-sized intermediates, and the forwards of frozen roles (no graph; chunked logits).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rlhf_config::{Device, EnvSource, LauncherKind, RewardKind, Role, RunConfig};

use crate::slurm;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// The run file (YAML).
    pub file: PathBuf,
    /// Override a config value (as for `launch`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the estimates as JSON, in bytes, per worker and role and per device (for scripts
    /// and tests comparing them with measured memory); no sbatch script.
    #[arg(long)]
    pub json: bool,
}

/// Parameter count and bytes of a model directory, from its safetensors headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelSize {
    pub params: u64,
    pub bytes: u64,
}

/// Largest safetensors header read, as the `safetensors` crate's own limit (100 MB): a damaged
/// length field must not make `plan` allocate gigabytes.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Adds the parameters and data bytes of one safetensors file to `size`, reading its header
/// only. The file's length is checked against the header's length field before the header is
/// read, and against the data the header describes after.
fn header_sizes(file: &Path, size: &mut ModelSize) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let len = f
        .metadata()
        .with_context(|| format!("reading the size of {}", file.display()))?
        .len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .with_context(|| format!("{}: not a safetensors file", file.display()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || n > len.saturating_sub(8) {
        bail!(
            "{}: safetensors header of {n} bytes in a file of {len} bytes (at most \
             {MAX_HEADER_BYTES}); the file is damaged or not safetensors: re-download or re-save it",
            file.display()
        );
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h)
        .with_context(|| format!("{}: truncated safetensors header", file.display()))?;
    let (params, bytes) = parse_header(&h).with_context(|| {
        format!(
            "{}: bad safetensors header; the file is damaged: re-download or re-save it",
            file.display()
        )
    })?;
    if 8 + n + bytes != len {
        bail!(
            "{}: the header describes {bytes} bytes of tensor data, the file holds {}; it is \
             truncated or damaged: re-download or re-save it",
            file.display(),
            len - 8 - n
        );
    }
    size.params = size.params.saturating_add(params);
    size.bytes = size.bytes.saturating_add(bytes);
    Ok(())
}

/// Parameter count and data bytes of a safetensors header (the JSON after the length field).
/// Parsed and validated by the `safetensors` crate rather than by hand: offsets must be
/// contiguous from 0 and each tensor's span must equal its shape times its dtype's size, all
/// in checked arithmetic, so hostile offsets or shapes are an error, never an overflow.
fn parse_header(h: &[u8]) -> Result<(u64, u64)> {
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(h)?;
    // Validated by the parse: every shape's product fits a usize; the sum saturates anyway.
    let params = meta
        .tensors()
        .values()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .fold(0u64, u64::saturating_add);
    Ok((params, meta.data_len() as u64))
}

/// Parameters and data bytes of a model directory's safetensors files (one file or an index of
/// shards), from their headers alone, each header validated against its file's length.
pub fn model_size(dir: &Path) -> Result<ModelSize> {
    let mut size = ModelSize::default();
    let single = dir.join("model.safetensors");
    if single.is_file() {
        header_sizes(&single, &mut size)?;
        return Ok(size);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).with_context(|| {
        format!(
            "{}: neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let mut shards: Vec<&str> = v["weight_map"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, f)| f.as_str())
        .collect();
    shards.sort();
    shards.dedup();
    for s in shards {
        header_sizes(&dir.join(s), &mut size)?;
    }
    Ok(size)
}

/// The shape numbers of a decoder the estimate needs, from `config.json`.
#[derive(Debug, Clone, Copy)]
struct Shape {
    hidden: u64,
    intermediate: u64,
    layers: u64,
    vocab: u64,
    q_dim: u64,
    kv_dim: u64,
}

impl Shape {
    fn from_dir(dir: &Path) -> Result<Shape> {
        // The model loader's reading of config.json (defaults and all), not a second one.
        let c = rlhf_model::config::Config::from_dir(dir)?;
        Ok(Shape {
            hidden: c.hidden_size as u64,
            intermediate: c.intermediate_size as u64,
            layers: c.num_hidden_layers as u64,
            vocab: c.vocab_size as u64,
            q_dim: (c.num_attention_heads * c.head_dim) as u64,
            kv_dim: (c.num_key_value_heads * c.head_dim) as u64,
        })
    }

    /// Bytes one sequence of `len` tokens takes in the KV cache.
    fn kv_cache_per_seq(&self, len: u64, d: u64) -> u64 {
        2 * self.layers * self.kv_dim * len * d
    }

    /// Bytes a decoder layer keeps for backward per token (see the module doc).
    fn layer_activation_per_token(&self, d: u64) -> u64 {
        let (h, i, q, kv) = (self.hidden, self.intermediate, self.q_dim, self.kv_dim);
        8 * h + d * (4 * h + 3 * q + 2 * kv + 4 * i)
    }

    /// LoRA adapter parameters: `rank * (in + out)` per adapted projection and layer.
    fn lora_params(&self, lora: &rlhf_config::LoraConfig) -> u64 {
        let (h, i, q, kv) = (self.hidden, self.intermediate, self.q_dim, self.kv_dim);
        let per_layer: u64 = lora
            .targets
            .iter()
            .map(|t| match t.as_str() {
                "q_proj" => h + q,
                "k_proj" | "v_proj" => h + kv,
                "o_proj" => q + h,
                "gate_proj" | "up_proj" | "down_proj" => h + i,
                _ => 0,
            })
            .sum();
        lora.rank as u64 * per_layer * self.layers
    }
}

/// Saved activations of one training micro-batch (see the module doc).
fn train_activations(
    shape: &Shape,
    d: u64,
    micro_batch: u64,
    seq_len: u64,
    response_len: u64,
    checkpointing: bool,
    logits: bool,
) -> u64 {
    let tokens = micro_batch * seq_len;
    let a = shape.layer_activation_per_token(d);
    let layers = if checkpointing {
        shape.layers * tokens * d * shape.hidden + tokens * a
    } else {
        shape.layers * tokens * a
    };
    // The final RMSNorm keeps its f32 input, normalised value and output.
    let final_norm = tokens * (4 + 2 * d) * shape.hidden;
    let logits = if logits {
        micro_batch * response_len * shape.vocab * (d + 4)
    } else {
        0
    };
    layers + final_norm + logits
}

/// Memory of one role replica by kind, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Breakdown {
    weights: u64,
    grads: u64,
    optimizer: u64,
    /// The peak of what lives for part of a step only (activations, transient copies, KV cache).
    activations: u64,
}

impl Breakdown {
    fn total(&self) -> u64 {
        self.weights + self.grads + self.optimizer + self.activations
    }

    fn add(&mut self, o: &Breakdown) {
        self.weights += o.weights;
        self.grads += o.grads;
        self.optimizer += o.optimizer;
        self.activations += o.activations;
    }
}

/// What a trainable replica's state depends on.
#[derive(Debug, Clone, Copy)]
struct TrainState {
    /// All parameters.
    params: u64,
    /// Trainable parameters (the LoRA adapters only under LoRA).
    trainable: u64,
    /// Bytes per value of `models.dtype`.
    d: u64,
    /// Data-parallel replicas of the role.
    replicas: u64,
    zero_stage: u32,
    /// f32 master weights and moments (bf16/f16 without `pure_low_precision`).
    masters: bool,
    /// Saved activations of one micro-batch.
    activations: u64,
    /// Any other phase's transient peak (the actor's own generation KV cache).
    other_transient: u64,
    /// The replicas reduce over TCP (CPU workers): each keeps a host copy of one gradient
    /// bucket for the collectives and copies one bucket back out of it per call.
    tcp: bool,
}

/// The arithmetic of the module doc for one trainable replica.
fn trainable(s: &TrainState) -> Breakdown {
    let n = s.replicas.max(1);
    let stage = if n == 1 { 0 } else { s.zero_stage };
    let p = s.trainable;
    let shard = |bytes: u64, sharded: bool| if sharded { bytes.div_ceil(n) } else { bytes };
    let accumulator = shard(p * 4, stage >= 2);
    let masters = if s.masters {
        shard(p * 4, stage >= 1)
    } else {
        0
    };
    let m = if s.masters { 4 } else { s.d };
    let moments = shard(2 * m * p, stage >= 1);
    // The worker's accumulate(): at stage 2 one f32 bucket of the gradients at a time; at
    // stages 0 and 1 each gradient is added in place.
    let bucket = rlhf_comm::GRAD_BUCKET_ELEMS as u64;
    let tcp = s.tcp && n > 1;
    // Over TCP (`rlhf-worker` comm.rs `host_copy`): the host staging bucket lives as long as
    // the role, and each collective call copies one bucket (or its chunk) back out of it.
    let staging = if tcp { p.min(bucket) * 4 } else { 0 };
    let flat_copy = if stage >= 2 || tcp {
        p.min(bucket) * 4
    } else {
        0
    };
    let step_shard = if stage == 1 { (p * 4).div_ceil(n) } else { 0 };
    Breakdown {
        weights: s.params * s.d,
        grads: p * s.d + accumulator + staging,
        optimizer: masters + moments,
        activations: s
            .activations
            .max(flat_copy)
            .max(step_shard)
            .max(s.other_transient),
    }
}

/// Per-worker estimates, read once per model directory.
struct Estimator<'a> {
    cfg: &'a RunConfig,
    sizes: BTreeMap<PathBuf, (ModelSize, Shape)>,
}

impl<'a> Estimator<'a> {
    fn new(cfg: &'a RunConfig) -> Self {
        Estimator {
            cfg,
            sizes: BTreeMap::new(),
        }
    }

    fn model(&mut self, dir: &Path) -> Result<(ModelSize, Shape)> {
        if let Some(v) = self.sizes.get(dir) {
            return Ok(*v);
        }
        let v = (model_size(dir)?, Shape::from_dir(dir)?);
        self.sizes.insert(dir.to_path_buf(), v);
        Ok(v)
    }

    fn role(&mut self, role: Role) -> Result<Breakdown> {
        let cfg = self.cfg;
        let d: u64 = match cfg.models.dtype {
            rlhf_config::Dtype::F32 => 4,
            _ => 2,
        };
        let seq_len = (cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens) as u64;
        let samplers = match cfg.replicas(Role::Generator) {
            0 => cfg.replicas(Role::Actor),
            n => n,
        }
        .max(1) as u64;
        let sampled_per_replica = (cfg.rollout_sequences() as u64).div_ceil(samplers);
        let frozen = |size: ModelSize| Breakdown {
            weights: size.params * d,
            ..Breakdown::default()
        };
        Ok(match role {
            // Only PPO creates its critic; a critic placed for another algorithm holds nothing.
            Role::Critic if !cfg.algorithm.name.uses_critic() => Breakdown::default(),
            Role::Actor | Role::Critic => {
                let dir = if role == Role::Actor {
                    cfg.models.policy.clone()
                } else {
                    cfg.models.critic_dir().to_path_buf()
                };
                let (size, shape) = self.model(&dir)?;
                let lora = cfg.models.lora.as_ref().filter(|_| role == Role::Actor);
                let own_kv = if role == Role::Actor && cfg.replicas(Role::Generator) == 0 {
                    sampled_per_replica * shape.kv_cache_per_seq(seq_len, d)
                } else {
                    0
                };
                trainable(&TrainState {
                    params: size.params,
                    trainable: lora.map_or(size.params, |l| shape.lora_params(l)),
                    d,
                    replicas: cfg.replicas(role) as u64,
                    zero_stage: cfg.train.zero_stage,
                    masters: d == 2 && !cfg.train.pure_low_precision,
                    activations: train_activations(
                        &shape,
                        d,
                        cfg.train.micro_batch_size as u64,
                        seq_len,
                        cfg.rollout.max_new_tokens as u64,
                        cfg.train.gradient_checkpointing,
                        role == Role::Actor,
                    ),
                    other_transient: own_kv,
                    tcp: cfg
                        .workers
                        .iter()
                        .any(|w| w.roles.contains(&role) && w.device == Device::Cpu),
                })
            }
            // LoRA on the policy's own directory: the actor's base with adapters off is the
            // reference, and the reference role holds nothing.
            Role::Reference if cfg.models.reference_is_actor_base() => Breakdown::default(),
            Role::Reference => frozen(self.model(cfg.models.reference_dir())?.0),
            Role::Generator => {
                let (size, shape) = self.model(&cfg.models.policy)?;
                // With LoRA a generator holds the base plus adapters like the actor's.
                let adapters = cfg.models.lora.as_ref().map_or(0, |l| shape.lora_params(l));
                Breakdown {
                    weights: (size.params + adapters) * d,
                    activations: sampled_per_replica * shape.kv_cache_per_seq(seq_len, d),
                    ..Breakdown::default()
                }
            }
            Role::Reward => {
                let mut sum = Breakdown::default();
                for src in cfg.models.reward_sources() {
                    if let (RewardKind::Model, Some(p)) = (src.config.kind, &src.config.path) {
                        sum.add(&frozen(self.model(p)?.0));
                    }
                }
                sum
            }
        })
    }

    /// Each worker's breakdown, in `cfg.workers` order.
    fn workers(&mut self) -> Result<Vec<Breakdown>> {
        let cfg = self.cfg;
        cfg.workers
            .iter()
            .map(|w| {
                let mut b = Breakdown::default();
                for role in &w.roles {
                    b.add(&self.role(*role)?);
                }
                Ok(b)
            })
            .collect()
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// (node, device) of every worker, in `cfg.workers` order.
fn devices(cfg: &RunConfig) -> Vec<(usize, String)> {
    let nodes = slurm::node_indices(cfg);
    let slurm_kind = cfg.launcher.kind == LauncherKind::Slurm;
    cfg.workers
        .iter()
        .enumerate()
        .map(|(i, w)| (if slurm_kind { nodes[i] } else { 0 }, w.device.to_string()))
        .collect()
}

fn per_device(cfg: &RunConfig) -> Result<BTreeMap<(usize, String), Breakdown>> {
    let est = Estimator::new(cfg).workers()?;
    let mut out: BTreeMap<(usize, String), Breakdown> = BTreeMap::new();
    for (key, b) in devices(cfg).into_iter().zip(est) {
        out.entry(key).or_default().add(&b);
    }
    Ok(out)
}

/// The changes that would shrink what `roles` on a device need, each with that device's
/// estimate under it, for the error of a device that does not fit.
fn remedies(cfg: &RunConfig, key: &(usize, String), roles: &[Role]) -> Vec<String> {
    let trains = |r: Role| roles.contains(&r);
    let mut tries: Vec<(String, RunConfig)> = vec![];
    let sharded = [Role::Actor, Role::Critic]
        .iter()
        .any(|r| trains(*r) && cfg.replicas(*r) > 1);
    if sharded && cfg.train.zero_stage < 2 {
        let mut c = cfg.clone();
        c.train.zero_stage = 2;
        tries.push(("train.zero_stage: 2".into(), c));
    }
    if (trains(Role::Actor) || trains(Role::Critic)) && !cfg.train.gradient_checkpointing {
        let mut c = cfg.clone();
        c.train.gradient_checkpointing = true;
        tries.push(("train.gradient_checkpointing: true".into(), c));
    }
    if trains(Role::Actor) && cfg.models.lora.is_none() {
        let mut c = cfg.clone();
        c.models.lora = Some(rlhf_config::LoraConfig::default());
        tries.push(("models.lora: {} (rank 8 adapters on the actor)".into(), c));
    }
    if (trains(Role::Actor) || trains(Role::Critic)) && cfg.train.micro_batch_size > 1 {
        let mut c = cfg.clone();
        c.train.micro_batch_size = 1;
        tries.push(("train.micro_batch_size: 1".into(), c));
    }
    tries
        .into_iter()
        .filter_map(|(what, c)| {
            let b = per_device(&c).ok()?.get(key).copied()?;
            Some(format!("{what} -> {:.3} GiB", gib(b.total())))
        })
        .collect()
}

/// The memory `dev` has for its roles in GiB (`launcher.slurm.gpu_memory_gib` for a GPU,
/// `mem_per_node_gib` for a CPU when set), or `None` when unchecked.
fn capacity(cfg: &RunConfig, dev: &str) -> Option<f64> {
    match dev.parse::<Device>() {
        Ok(Device::Cuda(_)) => Some(cfg.launcher.slurm.gpu_memory_gib),
        _ => cfg.launcher.slurm.mem_per_node_gib,
    }
}

/// The error for a device whose roles need more than its capacity, with the changes that
/// would shrink them.
fn misfit(cfg: &RunConfig, key: &(usize, String), b: &Breakdown, roles: &[Role]) -> Option<String> {
    let (node, dev) = key;
    let c = capacity(cfg, dev)?;
    let used = gib(b.total());
    if used <= c {
        return None;
    }
    let fixes = remedies(cfg, key, roles);
    let fixes = if fixes.is_empty() {
        String::new()
    } else {
        format!("; estimates with one change: {}", fixes.join(", "))
    };
    Some(format!(
        "node {node} {dev}: the roles placed there need an estimated {used:.3} GiB, {:.3} GiB more than its {c} GiB; move a role to another worker or node, use a smaller dtype, shard or shrink the training state, or raise launcher.slurm.{}{fixes}",
        used - c,
        if dev.starts_with("cuda") { "gpu_memory_gib" } else { "mem_per_node_gib" }
    ))
}

fn breakdown_json(b: &Breakdown) -> serde_json::Value {
    serde_json::json!({
        "weights": b.weights,
        "grads": b.grads,
        "optimizer": b.optimizer,
        "activations": b.activations,
        "total": b.total(),
    })
}

/// The estimates in bytes: each worker with each of its roles, each device with its capacity,
/// and the misfits (empty when everything fits).
pub fn plan_json(cfg: &RunConfig) -> Result<serde_json::Value> {
    let mut est = Estimator::new(cfg);
    let keys = devices(cfg);
    let mut per_device: BTreeMap<(usize, String), (Breakdown, Vec<Role>)> = BTreeMap::new();
    let mut workers = vec![];
    for (w, key) in cfg.workers.iter().zip(&keys) {
        let mut total = Breakdown::default();
        let mut roles = serde_json::Map::new();
        for role in &w.roles {
            let b = est.role(*role)?;
            total.add(&b);
            roles.insert(role.as_str().to_string(), breakdown_json(&b));
        }
        let e = per_device.entry(key.clone()).or_default();
        e.0.add(&total);
        e.1.extend(w.roles.iter().copied());
        workers.push(serde_json::json!({
            "name": w.name,
            "node": key.0,
            "device": key.1,
            "roles": roles,
            "bytes": breakdown_json(&total),
        }));
    }
    let mut devices = vec![];
    let mut errors = vec![];
    for (key, (b, roles)) in &per_device {
        devices.push(serde_json::json!({
            "node": key.0,
            "device": key.1,
            "capacity_gib": capacity(cfg, &key.1),
            "bytes": breakdown_json(b),
        }));
        errors.extend(misfit(cfg, key, b, roles));
    }
    Ok(serde_json::json!({"workers": workers, "devices": devices, "misfits": errors}))
}

/// The plan as text; an error when a device cannot hold its roles.
pub fn plan_text(cfg: &RunConfig, script: Option<String>) -> Result<String> {
    let slurm_kind = cfg.launcher.kind == LauncherKind::Slurm;
    let mut out = String::new();
    writeln!(
        out,
        "placement ({}):",
        if slurm_kind {
            format!("slurm, {} node(s)", cfg.launcher.slurm.nodes)
        } else {
            "local".into()
        }
    )?;
    let header = |out: &mut String, first: &str| {
        writeln!(
            out,
            "  {first:<26} {:>9} {:>9} {:>9} {:>9} {:>10}",
            "weights", "grads", "optim.", "activ.", "est. GiB"
        )
    };
    writeln!(
        out,
        "  {:<14} {:<5} {:<8} {:<26}",
        "worker", "node", "device", "roles"
    )?;
    header(&mut out, "")?;
    let est = Estimator::new(cfg).workers()?;
    let keys = devices(cfg);
    let mut per_device: BTreeMap<(usize, String), (Breakdown, Vec<Role>)> = BTreeMap::new();
    let row = |out: &mut String, first: &str, b: &Breakdown| {
        writeln!(
            out,
            "  {first:<26} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10.3}",
            gib(b.weights),
            gib(b.grads),
            gib(b.optimizer),
            gib(b.activations),
            gib(b.total())
        )
    };
    for ((w, b), key) in cfg.workers.iter().zip(&est).zip(&keys) {
        let roles: Vec<&str> = w.roles.iter().map(|r| r.as_str()).collect();
        writeln!(
            out,
            "  {:<14} {:<5} {:<8} {:<26}",
            w.name,
            key.0,
            key.1,
            roles.join(",")
        )?;
        row(&mut out, "", b)?;
        let e = per_device.entry(key.clone()).or_default();
        e.0.add(b);
        e.1.extend(w.roles.iter().copied());
    }
    writeln!(out, "per device (GiB):")?;
    header(&mut out, "")?;
    let mut errors = vec![];
    for (key @ (node, dev), (b, roles)) in &per_device {
        let cap = capacity(cfg, dev);
        let cap_s = cap.map_or("unchecked".to_string(), |c| format!("of {c:.1} GiB"));
        row(&mut out, &format!("node {node} {dev:<8} {cap_s}"), b)?;
        errors.extend(misfit(cfg, key, b, roles));
    }
    writeln!(
        out,
        "(estimates: weights, gradients (autograd's and the f32 accumulator), optimizer state \
         (f32 masters and AdamW moments, 1/N per replica with train.zero_stage), and the peak of \
         one micro-batch's activations, transient copies and the KV cache; train.zero_stage {}, \
         gradient_checkpointing {}, micro_batch_size {}, lora {}; CUDA context and allocator \
         slack not counted)",
        cfg.train.zero_stage,
        cfg.train.gradient_checkpointing,
        cfg.train.micro_batch_size,
        if cfg.models.lora.is_some() {
            "on"
        } else {
            "off"
        },
    )?;
    if let Some(s) = script {
        writeln!(out, "sbatch script:")?;
        out.push_str(&s);
    }
    if !errors.is_empty() {
        bail!(
            "{out}\nthe placement does not fit:\n  {}",
            errors.join("\n  ")
        );
    }
    Ok(out)
}

pub fn run(args: PlanArgs) -> Result<()> {
    let loaded = rlhf_config::load(&args.file, &args.set, EnvSource::Process)?;
    let cfg = &loaded.config;
    if args.json {
        let v = plan_json(cfg)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        if let Some(errors) = v["misfits"].as_array().filter(|e| !e.is_empty()) {
            let lines: Vec<&str> = errors.iter().filter_map(|e| e.as_str()).collect();
            bail!("the placement does not fit:\n  {}", lines.join("\n  "));
        }
        return Ok(());
    }
    let script = if cfg.launcher.kind == LauncherKind::Slurm {
        let file = std::path::absolute(&args.file)?;
        let me = std::env::current_exe()?;
        Some(slurm::sbatch_script(
            cfg,
            &me,
            &file,
            &args.set,
            &cfg.run_dir(),
        ))
    } else {
        None
    };
    print!("{}", plan_text(cfg, script)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of `header` (JSON) followed by `data` zero bytes.
    fn safetensors_file(dir: &Path, header: &[u8], data: usize) -> PathBuf {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        b.resize(b.len() + data, 0);
        let p = dir.join("model.safetensors");
        std::fs::write(&p, b).unwrap();
        p
    }

    #[test]
    fn hostile_safetensors_headers_are_errors_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        for (header, data, says) in [
            // End before start: today's `end - start` underflowed and panicked.
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
                8,
                "bad safetensors header",
            ),
            // An end past any file, and a shape whose element count overflows.
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551615]}}"#,
                8,
                "bad safetensors header",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
                8,
                "bad safetensors header",
            ),
            // Valid, but the file is shorter than the data it describes.
            (
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                8,
                "the header describes 16 bytes of tensor data, the file holds 8",
            ),
        ] {
            let f = safetensors_file(tmp.path(), header.as_bytes(), data);
            let e = format!(
                "{:#}",
                header_sizes(&f, &mut ModelSize::default()).unwrap_err()
            );
            assert!(
                e.contains(says) && e.contains("model.safetensors"),
                "{header}: {e}"
            );
        }
        // A length field larger than the file: refused before allocating for it.
        let p = tmp.path().join("model.safetensors");
        let mut b = (1u64 << 40).to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        std::fs::write(&p, b).unwrap();
        let e = format!(
            "{:#}",
            header_sizes(&p, &mut ModelSize::default()).unwrap_err()
        );
        assert!(
            e.contains("header of 1099511627776 bytes in a file of 10 bytes"),
            "{e}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Fuzzing the header parser (cargo-fuzz needs nightly; this runs in `cargo test`):
        /// arbitrary bytes, and well-formed JSON with arbitrary numbers, never panic.
        #[test]
        fn header_parsing_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            start in proptest::prelude::any::<u64>(),
            end in proptest::prelude::any::<u64>(),
            dims in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..4),
            dtype in proptest::sample::select(vec!["F32", "BF16", "I64", "BOOL", "F4", "??"]),
        ) {
            let _ = parse_header(&bytes);
            let json = format!(
                r#"{{"__metadata__":{{"format":"pt"}},"t":{{"dtype":"{dtype}","shape":{dims:?},"data_offsets":[{start},{end}]}}}}"#
            );
            let _ = parse_header(json.as_bytes());
        }

        /// Headers the `safetensors` crate writes give back their parameters and bytes.
        #[test]
        fn valid_headers_give_their_sizes(
            shapes in proptest::collection::vec(proptest::collection::vec(0usize..5, 0..3), 1..4),
        ) {
            use safetensors::tensor::TensorView;
            let datas: Vec<Vec<u8>> = shapes
                .iter()
                .map(|s| vec![0u8; 4 * s.iter().product::<usize>()])
                .collect();
            let views: Vec<(String, TensorView<'_>)> = shapes
                .iter()
                .zip(&datas)
                .enumerate()
                .map(|(i, (s, d))| {
                    (format!("t{i}"), TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
                })
                .collect();
            let bytes = safetensors::serialize(views, None).unwrap();
            let tmp = tempfile::tempdir().unwrap();
            let p = tmp.path().join("model.safetensors");
            std::fs::write(&p, &bytes).unwrap();
            let mut size = ModelSize::default();
            header_sizes(&p, &mut size).unwrap();
            let params: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
            proptest::prop_assert_eq!(size.params, params as u64);
            proptest::prop_assert_eq!(size.bytes, 4 * params as u64);
        }
    }

    const GB: u64 = 1_000_000_000;

    fn state(stage: u32, replicas: u64, masters: bool) -> TrainState {
        TrainState {
            params: GB,
            trainable: GB,
            d: 2,
            replicas,
            zero_stage: stage,
            masters,
            activations: 0,
            other_transient: 0,
            tcp: false,
        }
    }

    #[test]
    fn zero_stages_divide_what_they_shard() {
        // 1e9 bf16 parameters with f32 masters over 4 replicas.
        let s0 = trainable(&state(0, 4, true));
        assert_eq!(s0.weights, 2 * GB);
        assert_eq!(s0.grads, 2 * GB + 4 * GB);
        assert_eq!(s0.optimizer, 4 * GB + 8 * GB);
        // Nothing transient but the (here zero) micro-batch activations at stage 0.
        assert_eq!(s0.activations, 0);
        let s1 = trainable(&state(1, 4, true));
        assert_eq!(s1.grads, s0.grads);
        assert_eq!(s1.optimizer, GB + 2 * GB);
        let s2 = trainable(&state(2, 4, true));
        assert_eq!(s2.grads, 2 * GB + GB);
        assert_eq!(s2.optimizer, s1.optimizer);
        // One replica shards nothing, whatever the stage.
        assert_eq!(trainable(&state(2, 1, true)), s0);
    }

    #[test]
    fn pure_low_precision_keeps_moments_in_the_dtype_and_no_masters() {
        let b = trainable(&state(0, 1, false));
        assert_eq!(b.optimizer, 2 * 2 * GB);
        let f32 = trainable(&TrainState {
            d: 4,
            ..state(0, 1, false)
        });
        assert_eq!(f32.weights, 4 * GB);
        assert_eq!(f32.optimizer, 8 * GB);
        // Gradients are added into the accumulator in place: nothing transient.
        assert_eq!(f32.activations, 0);
        // At stage 2 one f32 bucket (16M elements) is converted at a time.
        assert_eq!(
            trainable(&state(2, 4, true)).activations,
            rlhf_comm::GRAD_BUCKET_ELEMS as u64 * 4
        );
    }

    #[test]
    fn tcp_replicas_hold_one_host_bucket_and_copy_one_per_collective() {
        let bucket = rlhf_comm::GRAD_BUCKET_ELEMS as u64 * 4;
        let tcp = |stage, n| {
            trainable(&TrainState {
                tcp: true,
                ..state(stage, n, true)
            })
        };
        assert_eq!(
            tcp(0, 4).grads,
            trainable(&state(0, 4, true)).grads + bucket
        );
        assert_eq!(tcp(0, 4).activations, bucket);
        assert_eq!(
            tcp(2, 4).grads,
            trainable(&state(2, 4, true)).grads + bucket
        );
        // One replica has no group, hence no staging.
        assert_eq!(tcp(0, 1), trainable(&state(0, 1, true)));
    }

    fn llama3_8b() -> Shape {
        Shape {
            hidden: 4096,
            intermediate: 14336,
            layers: 32,
            vocab: 128256,
            q_dim: 4096,
            kv_dim: 1024,
        }
    }

    #[test]
    fn lora_counts_rank_times_in_plus_out_per_adapted_projection() {
        let s = llama3_8b();
        let lora = rlhf_config::LoraConfig::default();
        // PEFT reports 20,971,520 trainable parameters for r=8 on all seven Llama-3-8B
        // projections.
        assert_eq!(s.lora_params(&lora), 20_971_520);
        let b = trainable(&TrainState {
            trainable: s.lora_params(&lora),
            ..state(0, 1, true)
        });
        assert_eq!(b.weights, 2 * GB);
        assert!(b.grads + b.optimizer < GB / 2, "{b:?}");
    }

    #[test]
    fn checkpointing_keeps_one_hidden_state_per_layer() {
        let s = llama3_8b();
        // 8h + d(4h + 3q + 2kv + 4i) bytes per layer and token in bf16.
        assert_eq!(s.layer_activation_per_token(2), 208_896);
        let full = train_activations(&s, 2, 1, 3072, 1024, false, false);
        let ckpt = train_activations(&s, 2, 1, 3072, 1024, true, false);
        let final_norm = 3072 * 8 * 4096;
        assert_eq!(full, 32 * 3072 * 208_896 + final_norm);
        assert_eq!(ckpt, 32 * 3072 * 2 * 4096 + 3072 * 208_896 + final_norm);
        // The actor's response logits: lm_head output plus the f32 log-softmax.
        let logits = train_activations(&s, 2, 1, 3072, 1024, true, true) - ckpt;
        assert_eq!(logits, 1024 * 128256 * 6);
    }
}
