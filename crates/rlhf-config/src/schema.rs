//! The run file schema: one struct per YAML section, every field with its default.
//!
//! Every struct denies unknown keys and defaults each missing field (`#[serde(default)]` over the
//! `Default` impl), so a file names only what it changes. Fields marked "required" default to an
//! empty value that the loader's validation rejects with the key's name. Enum values are snake_case.
//!
//! The algorithm settings (`algorithm.kl`, `algorithm.reward`, `algorithm.loss_agg`,
//! `train.actor`, `train.critic`) are `rlhf-settings` types, the same ones `rlhf-algo` computes
//! with; they are re-exported here so the run file's types all live under `rlhf_config`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use rlhf_settings::{
    KlConfig, KlEstimator, KlMode, LossAgg, LrSchedule, OptimizerConfig, RewardShapingConfig,
};

/// A whole RLHF run: what to train, with what, where the workers run and how to log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Run identity and run directory. `run.name` is required.
    pub run: RunSection,
    /// How worker daemons are started (local processes or Slurm) and watched.
    pub launcher: LauncherConfig,
    /// Placement of role instances onto worker daemons. Default: one worker per role, named
    /// after it: `[{name: actor, roles: [actor]}, {name: critic, roles: [critic]},
    /// {name: reward, roles: [reward]}, {name: reference, roles: [reference]}]`.
    pub workers: Vec<WorkerConfig>,
    /// Model directories and the reward source. `models.policy` is required.
    pub models: ModelsConfig,
    /// The RL algorithm and its hyper-parameters.
    pub algorithm: AlgorithmConfig,
    /// Prompts and sampling. `rollout.prompts` is required.
    pub rollout: RolloutConfig,
    /// Optimisation: steps, epochs, minibatching, optimizers.
    pub train: TrainConfig,
    /// Logging and run-directory artefacts.
    pub logging: LoggingConfig,
    /// When to write checkpoints and how many to keep.
    pub checkpoint: CheckpointConfig,
    /// MT-Bench validation: how often, with what judge.
    pub validation: ValidationConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            run: RunSection::default(),
            launcher: LauncherConfig::default(),
            workers: WorkerConfig::one_per_role(),
            models: ModelsConfig::default(),
            algorithm: AlgorithmConfig::default(),
            rollout: RolloutConfig::default(),
            train: TrainConfig::default(),
            logging: LoggingConfig::default(),
            checkpoint: CheckpointConfig::default(),
            validation: ValidationConfig::default(),
        }
    }
}

impl RunConfig {
    /// The run directory, `run.dir/run.name`, where checkpoints, metrics and
    /// `config.resolved.yaml` live.
    pub fn run_dir(&self) -> PathBuf {
        self.run.dir.join(&self.run.name)
    }

    /// The rollout batch in sequences: `rollout.batch_size * rollout.samples_per_prompt`.
    pub fn rollout_sequences(&self) -> usize {
        self.rollout
            .batch_size
            .saturating_mul(self.rollout.samples_per_prompt)
    }

    /// The minibatch size in sequences: `train.minibatch_size`, or the whole rollout batch.
    pub fn minibatch_size(&self) -> usize {
        self.train
            .minibatch_size
            .unwrap_or_else(|| self.rollout_sequences())
    }

    /// Workers hosting `role` (for actor and critic: the data-parallel replicas; for
    /// generator: the generators), in the order `workers:` lists them.
    pub fn replicas(&self, role: Role) -> usize {
        self.workers
            .iter()
            .filter(|w| w.roles.contains(&role))
            .count()
    }
}

/// `run:` — identity of the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    /// Required. The run's name, `[A-Za-z0-9._-]+`; the run directory is `dir/name`.
    #[serde(deserialize_with = "lenient_string")]
    pub name: String,
    /// Parent directory of run directories. Default: `runs` (relative to the working directory
    /// when not set in the file).
    pub dir: PathBuf,
    /// Seed for prompt shuffling, sampling and initialisation. Default: 0.
    pub seed: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            name: String::new(),
            dir: PathBuf::from("runs"),
            seed: 0,
        }
    }
}

/// How worker daemons are started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LauncherKind {
    /// Spawn the workers as child processes on this machine.
    #[default]
    Local,
    /// Submit (or, inside an allocation, `srun`) one worker per node with Slurm.
    Slurm,
}

/// How collective groups between workers move tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveBackend {
    /// NCCL for a group whose members are all on CUDA devices of their own, TCP otherwise
    /// (NCCL cannot run two ranks on one GPU, so members sharing one use TCP).
    #[default]
    Auto,
    /// TCP between the worker processes through host memory (any device).
    Tcp,
    /// NCCL on device memory; every member of every group must be on a CUDA device, no two
    /// on the same GPU of one host.
    Nccl,
}

/// Whether the run's gRPC channels (coordinator <-> workers) use mutual TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// TLS when the coordinator's listening address (from `bind` / `interface`) is not a
    /// loopback one, i.e. whenever other hosts could reach the run's listeners.
    #[default]
    Auto,
    /// Always TLS, loopback included.
    On,
    /// Never: plaintext gRPC (the run token still guards every call).
    Off,
}

/// `launcher:` — starting and supervising worker daemons.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LauncherConfig {
    /// `local` or `slurm`. Default: `local`.
    pub kind: LauncherKind,
    /// Path to the `rlhf-worker` binary. Default: null, meaning the `rlhf-worker` next to the
    /// `rlhf-coord` executable.
    pub worker_bin: Option<PathBuf>,
    /// Interface (IP address) the coordinator and workers listen on. `0.0.0.0` (or `::`)
    /// listens everywhere and advertises each host's name, which other nodes resolve. A run
    /// whose workers sit on several Slurm nodes needs a non-loopback address here or
    /// `interface`. Default: `127.0.0.1` (loopback unless named).
    pub bind: IpAddr,
    /// Network interface whose address every listener of the run advertises (and listens on,
    /// unless `bind` is `0.0.0.0`/`::`), chosen on each host the way `NCCL_SOCKET_IFNAME` chooses
    /// one, and handed to NCCL as that variable: e.g. `eth0`, `ib0`. Its IPv4 address, else its
    /// global IPv6 one. Default: null (use `bind`).
    #[serde(deserialize_with = "lenient_opt_string")]
    pub interface: Option<String>,
    /// Port of the coordinator's service (workers pick free ports themselves). Default: 0, any
    /// free port; name one when a firewall needs it.
    pub port: u16,
    /// Seconds within which every worker must register; > 0. Default: 60.
    pub startup_timeout_s: f64,
    /// Milliseconds between worker heartbeats; >= 1. Default: 500.
    pub heartbeat_interval_ms: u64,
    /// Milliseconds without a heartbeat after which a worker is declared lost; must be greater
    /// than `heartbeat_interval_ms`. Default: 5000.
    pub heartbeat_timeout_ms: u64,
    /// Deadline in seconds on every worker call; > 0. Default: 600.
    pub rpc_timeout_s: f64,
    /// Bound in seconds on forming a collective group between workers and on any collective
    /// operation (gradient all-reduce, weight broadcast) making no progress: a dead or stalled
    /// peer fails the step with an error naming its rank and address after this long; > 0.
    /// It includes waiting for the slowest replica to reach the all-reduce, and with NCCL it
    /// bounds each whole operation, so keep it well above both. Default: 60.
    pub collective_timeout_s: f64,
    /// `auto`, `tcp` or `nccl`: how data-parallel replicas and the weight sync to generators
    /// move tensors. Default: `auto` (NCCL when every member of a group is on a CUDA device of
    /// its own).
    pub collective_backend: CollectiveBackend,
    /// `auto`, `on` or `off`: mutual TLS on every gRPC channel of the run, with a per-run CA and
    /// certificate the coordinator makes in `RUN_DIR/tls/` (mode 0700, files 0600; reused when a
    /// run resumes) and hands to the workers; clients and servers accept only certificates of
    /// that CA. `auto` turns it on whenever the run listens on a non-loopback address.
    /// docs/security.md says what it protects. Default: `auto`.
    pub tls: TlsMode,
    /// Slurm settings, used only with `kind: slurm`.
    pub slurm: SlurmConfig,
}

impl Default for LauncherConfig {
    fn default() -> Self {
        LauncherConfig {
            kind: LauncherKind::Local,
            worker_bin: None,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            interface: None,
            port: 0,
            startup_timeout_s: 60.0,
            heartbeat_interval_ms: 500,
            heartbeat_timeout_ms: 5000,
            rpc_timeout_s: 600.0,
            collective_timeout_s: 60.0,
            collective_backend: CollectiveBackend::Auto,
            tls: TlsMode::Auto,
            slurm: SlurmConfig::default(),
        }
    }
}

/// `launcher.slurm:` — the sbatch directives of a Slurm launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlurmConfig {
    /// `--partition`: letters, digits, `.`, `_`, `-`, several joined by `,`. Default: null (the
    /// cluster's default partition).
    #[serde(deserialize_with = "lenient_opt_string")]
    pub partition: Option<String>,
    /// `--account`: letters, digits, `.`, `_`, `-`. Default: null.
    #[serde(deserialize_with = "lenient_opt_string")]
    pub account: Option<String>,
    /// `--time` limit, `HH:MM:SS` or `D-HH:MM:SS`. Default: null (the partition's limit).
    #[serde(deserialize_with = "lenient_opt_string")]
    pub time: Option<String>,
    /// `--nodes`; >= 1. Default: 1.
    pub nodes: u32,
    /// `--gpus-per-node`; when > 0, workers' `cuda:N` must be below it. 0 writes no directive
    /// (GPUs may come from `extra_directives`). Default: 0.
    pub gpus_per_node: u32,
    /// `--cpus-per-task`; >= 1 when set. Default: null.
    pub cpus_per_task: Option<u32>,
    /// Seconds between Slurm's `USR1` warning and the kill (`--signal=B:USR1@N`): the time to
    /// write a checkpoint; below `time`. Default: 120.
    pub signal_grace_s: u64,
    /// Requeues in a row that may end without a new checkpoint: after a preemption, a time
    /// limit, a `scancel --signal` or a lost node the job requeues itself to resume, but a
    /// restart that ended with no checkpoint newer than the one it started from counts
    /// against this, and once it is exceeded the job ends instead (a restart that saved a
    /// newer checkpoint resets the count). 0 never requeues. Default: 3.
    pub max_restarts: u32,
    /// Extra `#SBATCH` lines, one sbatch option each (`--gres=gpu:4`, `-C a100`; a leading
    /// `#SBATCH` is allowed), written as given; a line break or control character is refused.
    /// Default: `[]`.
    pub extra_directives: Vec<String>,
    /// Memory of one GPU in GiB, for `rlhf-coord plan`'s fit check. Default: 80.
    pub gpu_memory_gib: f64,
    /// Memory of one node in GiB for CPU-placed roles, for the same check; null skips it.
    /// Default: null.
    pub mem_per_node_gib: Option<f64>,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            partition: None,
            account: None,
            time: None,
            nodes: 1,
            gpus_per_node: 0,
            cpus_per_task: None,
            signal_grace_s: 120,
            max_restarts: 3,
            extra_directives: Vec::new(),
            gpu_memory_gib: 80.0,
            mem_per_node_gib: None,
        }
    }
}

/// A role a worker hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The policy: generates and trains.
    Actor,
    /// The value model (PPO).
    Critic,
    /// The reward model or rule.
    Reward,
    /// The frozen initial policy, for the KL term.
    Reference,
    /// A copy of the policy that only generates (disaggregated placement); the actor's weights
    /// are broadcast to it after each step's training.
    Generator,
}

impl Role {
    /// The roles the default placement lists, in its order (generators are optional).
    pub const ALL: [Role; 4] = [Role::Actor, Role::Critic, Role::Reward, Role::Reference];

    /// The snake_case name used in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Actor => "actor",
            Role::Critic => "critic",
            Role::Reward => "reward",
            Role::Reference => "reference",
            Role::Generator => "generator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A torch device: `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU.
    #[default]
    Cpu,
    /// A CUDA device; `None` is written `cuda` and means the first visible device.
    Cuda(Option<u32>),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<u32>().ok())
                .map(|n| Device::Cuda(Some(n)))
                .ok_or_else(|| format!("invalid device `{s}`: expected cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(None) => f.write_str("cuda"),
            Device::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One entry of `workers:` — a worker daemon and the role instances it hosts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Required. Unique worker name, `[A-Za-z0-9._-]+`.
    #[serde(deserialize_with = "lenient_string")]
    pub name: String,
    /// Required, non-empty, no duplicates: the roles this worker hosts (colocation when more
    /// than one). Each of reward and reference is placed on exactly one worker; actor and critic
    /// on one or more (more = data-parallel replicas, one per worker, gradients all-reduced);
    /// generator on none or more (then the actor only trains and the generators sample, with
    /// the actor's weights broadcast to them after every step).
    pub roles: Vec<Role>,
    /// Torch device of the worker's models: `cpu`, `cuda` or `cuda:N`. Default: `cpu`.
    pub device: Device,
    /// libtorch intra-op threads; >= 1. Default: 1.
    pub threads: usize,
    /// With `launcher.kind: slurm`: index of the allocation's node this worker runs on (0 is
    /// the first node, where the coordinator runs), < `launcher.slurm.nodes`. Default: null,
    /// meaning workers go round-robin over the nodes in the order listed.
    pub node: Option<usize>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            name: String::new(),
            roles: Vec::new(),
            device: Device::Cpu,
            threads: 1,
            node: None,
        }
    }
}

impl WorkerConfig {
    /// The default placement: one CPU worker per role, named after the role.
    pub fn one_per_role() -> Vec<WorkerConfig> {
        Role::ALL
            .iter()
            .map(|&role| WorkerConfig {
                name: role.as_str().to_owned(),
                roles: vec![role],
                ..WorkerConfig::default()
            })
            .collect()
    }
}

/// Floating-point type models are held and trained in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    /// 32-bit float.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

/// `models:` — model directories (HF layout: config.json, safetensors, tokenizer.json).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// Required. The initial policy's model directory; must contain `config.json`.
    pub policy: PathBuf,
    /// Reference model directory. Default: null, meaning the policy directory.
    pub reference: Option<PathBuf>,
    /// Critic trunk directory (the value head is initialised fresh). Default: null, meaning the
    /// policy directory.
    pub critic: Option<PathBuf>,
    /// `f32`, `bf16` or `f16`. Default: `f32`.
    pub dtype: Dtype,
    /// Where rewards come from (one source). Use `rewards` instead for several.
    pub reward: RewardConfig,
    /// Several reward sources, each with the keys of `reward` plus `name` and `weight`; the
    /// step's reward is the weighted sum, and each source is logged on its own
    /// (`attribute/<name>`). Default: empty, meaning `reward` alone.
    pub rewards: Vec<RewardConfig>,
    /// Train the actor as LoRA adapters on a frozen policy (docs/lora.md). Default: null, meaning
    /// full fine-tuning.
    pub lora: Option<LoraConfig>,
}

/// The projections LoRA can adapt, as PEFT's `target_modules` names them.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// `models.lora:` — low-rank adapters `W + (alpha / rank) B A` on the actor's projections.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Inner dimension of the adapters (PEFT's `r`); at least 1. Default: 8.
    pub rank: usize,
    /// Scale numerator (PEFT's `lora_alpha`): updates are scaled by `alpha / rank`. Default: 16.
    pub alpha: f64,
    /// Dropout probability on the adapters' input while training, in [0, 1). Default: 0.
    pub dropout: f64,
    /// Projections that get adapters in every layer, from `q_proj`, `k_proj`, `v_proj`,
    /// `o_proj`, `gate_proj`, `up_proj`, `down_proj`. Default: all seven.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: LORA_TARGETS.iter().map(|t| t.to_string()).collect(),
        }
    }
}

fn source(key: String, r: &RewardConfig) -> RewardSource<'_> {
    RewardSource {
        key,
        name: r.name.as_deref().unwrap_or_else(|| r.kind.name()),
        config: r,
    }
}

/// One reward source of a run: where its keys are, its name and its settings.
#[derive(Clone, Debug)]
pub struct RewardSource<'a> {
    /// `models.reward` or `models.rewards[i]`, for error messages.
    pub key: String,
    pub name: &'a str,
    pub config: &'a RewardConfig,
}

impl ModelsConfig {
    /// The run's reward sources: `models.rewards`, or `models.reward` alone.
    pub fn reward_sources(&self) -> Vec<RewardSource<'_>> {
        if self.rewards.is_empty() {
            return vec![source("models.reward".into(), &self.reward)];
        }
        self.rewards
            .iter()
            .enumerate()
            .map(|(i, r)| source(format!("models.rewards[{i}]"), r))
            .collect()
    }

    /// Whether any reward source is a rule that scores against the prompt row's `answer`.
    pub fn rewards_need_answer(&self) -> bool {
        self.reward_sources()
            .iter()
            .any(|s| s.config.kind.needs_answer())
    }

    /// The first reward source that is a reward model (`kind: model`): the `reward_model`
    /// judge of validation.
    pub fn reward_model_source(&self) -> Option<RewardSource<'_>> {
        self.reward_sources()
            .into_iter()
            .find(|s| s.config.kind == RewardKind::Model)
    }
    /// The reference model directory: `models.reference`, or the policy's.
    pub fn reference_dir(&self) -> &Path {
        self.reference.as_deref().unwrap_or(&self.policy)
    }

    /// Whether the reference policy is the actor's own frozen base: `models.lora` is set and the
    /// reference directory is the policy's (`models.reference` unset, or naming the same
    /// directory). Such a run has no reference role: the actor computes the reference
    /// log-probs with its adapters switched off, from the weights it already holds.
    pub fn reference_is_actor_base(&self) -> bool {
        let (r, p) = (self.reference_dir(), self.policy.as_path());
        // Spelled differently (`./policy`, a symlink) is still the same directory.
        self.lora.is_some()
            && (r == p
                || matches!(
                    (std::fs::canonicalize(r), std::fs::canonicalize(p)),
                    (Ok(a), Ok(b)) if a == b
                ))
    }

    /// The critic trunk directory: `models.critic`, or the policy's.
    pub fn critic_dir(&self) -> &Path {
        self.critic.as_deref().unwrap_or(&self.policy)
    }
}

/// The source of rewards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// A reward model directory (Bradley-Terry or SteerLM multi-attribute head).
    #[default]
    Model,
    /// A rule: the response's answer equals the prompt row's `answer` field.
    ExactMatch,
    /// A rule for math answers: the response's `\boxed{}` answer (else the text after `marker`,
    /// else its last number) equals the prompt row's `answer` by value (`0.5` = `1/2` =
    /// `\frac{1}{2}`; LaTeX, thousands separators, units and percent signs read through).
    Math,
    /// The user's reward server at `url`: rows are POSTed in batches as JSON (docs/rewards.md).
    Http,
    /// A pool of the user's long-lived processes (`command`) reading one JSON row per line on
    /// stdin and answering one JSON score per line on stdout (docs/rewards.md).
    Command,
}

impl RewardKind {
    /// The rules that score against the prompt row's `answer`, which every row must then have.
    pub fn needs_answer(self) -> bool {
        match self {
            RewardKind::Model | RewardKind::Http | RewardKind::Command => false,
            RewardKind::ExactMatch | RewardKind::Math => true,
        }
    }

    /// The name in the run file.
    pub fn name(self) -> &'static str {
        match self {
            RewardKind::Model => "model",
            RewardKind::ExactMatch => "exact_match",
            RewardKind::Math => "math",
            RewardKind::Http => "http",
            RewardKind::Command => "command",
        }
    }
}

/// How `exact_match` takes the answer out of a response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerExtract {
    /// The last number in the response.
    #[default]
    LastNumber,
    /// The text after the last `marker`, trimmed.
    AfterMarker,
    /// The whole response, trimmed.
    Full,
}

/// `models.reward:` (or one entry of `models.rewards:`) — a reward model, rule or user code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// The source's name in metrics (`attribute/<name>`) and logs: letters, digits, `_`, `-`;
    /// unique among `models.rewards`. Default: null, meaning the kind's name (`math`, `model`).
    pub name: Option<String>,
    /// Its factor in the step's reward: `sum(weight * reward)` over the sources. Default: 1.0.
    pub weight: f64,
    /// `model`, `exact_match`, `math`, `http` or `command`. Default: `model`.
    pub kind: RewardKind,
    /// Reward model directory; required (with `config.json`) when `kind: model`. Default: null.
    pub path: Option<PathBuf>,
    /// `exact_match` only: `last_number`, `after_marker` or `full`. Default: `last_number`.
    pub extract: AnswerExtract,
    /// `after_marker` and `math`: the marker that precedes the answer. Default: `"####"` (GSM8K).
    pub marker: String,
    /// `exact_match` and `math`: reward for a match. Default: 1.0.
    pub correct: f64,
    /// `exact_match` and `math`: reward otherwise. Default: 0.0.
    pub incorrect: f64,
    /// `http` only (and required there): the `http://` or `https://` URL batches are POSTed to.
    /// Default: null.
    pub url: Option<String>,
    /// `command` only (and required there): the program and its arguments, e.g.
    /// `[python3, my_reward.py]`; run in the run file's directory. Default: empty.
    pub command: Vec<String>,
    /// `http` and `command`: seconds one request (http) or one row's answer (command) may take
    /// before it counts as failed. Default: 30.
    pub timeout_s: f64,
    /// `http` only: further attempts after a failed request (timeout, connection refused, 5xx,
    /// 429), with exponential backoff from 0.5 s. Default: 2.
    pub retries: u32,
    /// `http`: requests in flight at once; `command`: processes in the pool. Default: 4.
    pub concurrency: u32,
    /// `http` only: rows per request. Default: 64.
    pub batch_size: u32,
    /// `command` only: the processes' working directory. Default: the run file's directory.
    pub workdir: Option<PathBuf>,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            name: None,
            weight: 1.0,
            kind: RewardKind::Model,
            path: None,
            extract: AnswerExtract::LastNumber,
            marker: "####".to_owned(),
            correct: 1.0,
            incorrect: 0.0,
            url: None,
            command: Vec::new(),
            timeout_s: 30.0,
            retries: 2,
            concurrency: 4,
            batch_size: 64,
            workdir: None,
        }
    }
}

/// The policy-optimisation algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmName {
    /// PPO with a critic and GAE.
    #[default]
    Ppo,
    /// REINFORCE with a running-mean baseline.
    Reinforce,
    /// REINFORCE leave-one-out (needs >= 2 samples per prompt).
    Rloo,
    /// Group-relative policy optimisation (needs >= 2 samples per prompt).
    Grpo,
    /// REINFORCE++ (batch-whitened returns).
    ReinforcePp,
}

impl AlgorithmName {
    /// The snake_case name used in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            AlgorithmName::Ppo => "ppo",
            AlgorithmName::Reinforce => "reinforce",
            AlgorithmName::Rloo => "rloo",
            AlgorithmName::Grpo => "grpo",
            AlgorithmName::ReinforcePp => "reinforce_pp",
        }
    }

    /// Whether the algorithm trains a critic (PPO's GAE needs values; the REINFORCE family's
    /// baselines come from the rewards).
    pub fn uses_critic(self) -> bool {
        self == AlgorithmName::Ppo
    }

    /// Whether the advantage estimator compares samples of the same prompt.
    pub fn needs_groups(self) -> bool {
        matches!(self, AlgorithmName::Rloo | AlgorithmName::Grpo)
    }
}

/// `algorithm:` — the RL objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlgorithmConfig {
    /// `ppo`, `reinforce`, `rloo`, `grpo` or `reinforce_pp`. Default: `ppo`.
    pub name: AlgorithmName,
    /// Discount factor, in [0, 1]. Default: 1.0.
    pub gamma: f64,
    /// GAE lambda, in [0, 1]. Default: 0.95.
    pub lam: f64,
    /// PPO ratio clip epsilon; > 0. Default: 0.2.
    pub clip_eps: f64,
    /// Dual-clip bound for negative advantages; > 1 when set. Default: null (off).
    pub dual_clip: Option<f64>,
    /// Value-function clip; > 0 when set. Default: 0.2.
    pub value_clip: Option<f64>,
    /// Entropy bonus coefficient; >= 0. Default: 0.0.
    pub entropy_coef: f64,
    /// `token_mean`, `seq_mean_token_sum` or `seq_mean_token_mean`. Default: `token_mean`.
    pub loss_agg: LossAgg,
    /// Whiten advantages over the batch. Default: null (the estimator's own default).
    pub whiten_advantages: Option<bool>,
    /// GRPO: divide group-centred rewards by the group's std. Default: true.
    pub grpo_scale_by_std: bool,
    /// REINFORCE running-mean baseline decay, in [0, 1). Default: 0.9.
    pub baseline_decay: f64,
    /// The KL penalty against the reference model.
    pub kl: KlConfig,
    /// Reward shaping: attribute weighting and normalisation.
    pub reward: RewardShapingConfig,
}

impl Default for AlgorithmConfig {
    fn default() -> Self {
        AlgorithmConfig {
            name: AlgorithmName::Ppo,
            gamma: 1.0,
            lam: 0.95,
            clip_eps: 0.2,
            dual_clip: None,
            value_clip: Some(0.2),
            entropy_coef: 0.0,
            loss_agg: LossAgg::TokenMean,
            whiten_advantages: None,
            grpo_scale_by_std: true,
            baseline_decay: 0.9,
            kl: KlConfig::default(),
            reward: RewardShapingConfig::default(),
        }
    }
}

/// `rollout:` — prompts and sampling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Required. The prompts: a JSONL file (one object per line), a Parquet file, or a Hugging
    /// Face dataset directory as it lies on disk (`data/train-00000-of-00003.parquet`, ...;
    /// `split` picks the files). Each row holds a `prompt` string or a chat `messages` list
    /// (`[{role, content}, ...]`), and optionally an `answer` (for `exact_match` and `math`).
    pub prompts: PathBuf,
    /// The split read when `prompts` is a dataset directory. Default: `train`.
    pub split: String,
    /// The column (JSONL key) holding the prompt string. Default: `prompt`.
    pub prompt_key: String,
    /// The column holding the chat message list. Default: `messages`.
    pub messages_key: String,
    /// The column holding the reference answer. Default: `answer`.
    pub answer_key: String,
    /// Prompts per step; >= 1. Default: 8.
    pub batch_size: usize,
    /// Responses sampled per prompt; >= 1, and >= 2 for `rloo` and `grpo`. Default: 1.
    pub samples_per_prompt: usize,
    /// Maximum generated tokens per response; >= 1. Default: 64.
    pub max_new_tokens: usize,
    /// Maximum prompt length in tokens; >= 1. Longer prompts are an error when the prompts are
    /// loaded, never truncated silently. Default: 512.
    pub max_prompt_tokens: usize,
    /// Sampling temperature; > 0. Default: 1.0.
    pub temperature: f64,
    /// Top-k sampling; 0 = off. Default: 0.
    pub top_k: usize,
    /// Nucleus sampling, in (0, 1]; 1 = off. Default: 1.0.
    pub top_p: f64,
    /// Shuffle the prompts (seeded by `run.seed`) each pass. Default: true.
    pub shuffle: bool,
    /// Apply the policy tokenizer's chat template to prompts. Default: true.
    pub chat_template: bool,
    /// One-step off-policy rollouts (needs `generator` workers): the generators sample the
    /// next step's batch while the current one is scored and trained, so step t trains on
    /// responses sampled with the weights after step t-2 (PPO's ratio against the sampling
    /// log-probs corrects for it). Steps that end in a scheduled checkpoint (`checkpoint.every`,
    /// the last step) do not prefetch, so resuming from them is exact; a stop by signal drops
    /// the prefetched batch. Default: false.
    pub async_generation: bool,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            prompts: PathBuf::new(),
            split: "train".to_owned(),
            prompt_key: "prompt".to_owned(),
            messages_key: "messages".to_owned(),
            answer_key: "answer".to_owned(),
            batch_size: 8,
            samples_per_prompt: 1,
            max_new_tokens: 64,
            max_prompt_tokens: 512,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            shuffle: true,
            chat_template: true,
            async_generation: false,
        }
    }
}

/// `train:` — optimisation schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Training steps (rollout + update); >= 1. Default: 100.
    pub steps: u64,
    /// Passes over each rollout batch; >= 1. Default: 1.
    pub epochs: usize,
    /// Sequences per optimizer step; must divide `batch_size * samples_per_prompt`. Default:
    /// null (the whole rollout batch, one optimizer step per epoch).
    pub minibatch_size: Option<usize>,
    /// Sequences per forward/backward (gradient accumulation); >= 1, must divide the
    /// minibatch size. Default: 8.
    pub micro_batch_size: usize,
    /// Activation checkpointing per decoder layer in the actor's and critic's training
    /// forwards: each layer keeps only its input hidden states and is recomputed in the
    /// backward, so activations take about `layers * tokens * hidden` values plus one layer's
    /// worth instead of every layer's, for one more forward per micro-batch. Gradients equal
    /// the plain backward's (f32, 1e-5). Default: false.
    pub gradient_checkpointing: bool,
    /// The actor's optimizer.
    pub actor: OptimizerConfig,
    /// The critic's optimizer.
    pub critic: OptimizerConfig,
    /// Every this many steps (and at the first), the coordinator compares weight digests of
    /// the actor's and critic's data-parallel replicas and of the generators after weight sync,
    /// and stops the run if any differs from its source; 0 = never. Default: 10.
    pub replica_check_every: u64,
    /// How the actor's and critic's optimizer state is split over their data-parallel
    /// replicas (ZeRO): `0` = every replica holds all of it (gradients all-reduced); `1` = each
    /// replica owns 1/N of the f32 master weights and AdamW moments (gradients reduce-scattered
    /// once per optimizer step, updated weights all-gathered); `2` = as 1, and gradients are
    /// reduce-scattered after every micro-batch, so the f32 gradient is 1/N too. Checkpoints
    /// hold the full state either way: a run resumes on any number of replicas. Default: 0.
    pub zero_stage: u32,
    /// With `models.dtype: bf16` or `f16`, train the actor and critic in pure low precision:
    /// AdamW moments and updates in that dtype, no f32 master weights. Most updates at RLHF
    /// learning rates round away in bf16 (an lr 1e-6 run changes ~1% of the weights); only for
    /// memory experiments. Default: false (mixed precision: bf16/f16 compute, f32 master weights
    /// and moments, and dynamic loss scaling for f16).
    pub pure_low_precision: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            epochs: 1,
            minibatch_size: None,
            micro_batch_size: 8,
            gradient_checkpointing: false,
            actor: OptimizerConfig::actor(),
            critic: OptimizerConfig::critic(),
            replica_check_every: 10,
            zero_stage: 0,
            pure_low_precision: false,
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// `logging:` — what the run reports and where.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// The tracing filter of `launch` (`info`, `warn`, `rlhf_coord=debug,info`). `RLHF_LOG`
    /// counts as this key's environment variable (above the file, below `--set`); `-v` / `-q`
    /// on the command line beat all. Default: `info`.
    #[serde(deserialize_with = "lenient_string")]
    pub level: String,
    /// `plain` or `json` (`RLHF_LOG_FORMAT=json` counts as this key's environment variable).
    /// Default: `plain`.
    pub format: LogFormat,
    /// Show a progress bar on stderr. Default: true.
    pub progress: bool,
    /// Write a reward/KL plot (PNG) to the run directory. Default: true.
    pub plot: bool,
    /// Every this many steps, append `samples_prompts` of the step's prompts with their
    /// completions, scores and per-attribute scores to `RUN_DIR/samples.jsonl`; 0 turns it off.
    /// Default: 10.
    pub samples_every: u64,
    /// How many prompts (each with all its `rollout.samples_per_prompt` completions) a sampled
    /// step writes; at most `rollout.batch_size` are. Default: 2.
    pub samples_prompts: usize,
    /// Write TensorBoard event files to `RUN_DIR/tensorboard/` (`tensorboard --logdir
    /// RUN_DIR/tensorboard`): every scalar of `metrics.jsonl` per step, and the sampled
    /// completions of `samples_every` as text. Default: true.
    pub tensorboard: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".to_owned(),
            format: LogFormat::Plain,
            progress: true,
            plot: true,
            samples_every: 10,
            samples_prompts: 2,
            tensorboard: true,
        }
    }
}

/// `checkpoint:` — full checkpoints of the run (weights, optimizer, controller state).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Write a checkpoint every N steps; 0 turns step-based saving off. The last step is always
    /// saved. Default: 50.
    pub every: u64,
    /// Also write one when this many minutes have passed since the last; null for never.
    /// Default: null.
    pub every_minutes: Option<f64>,
    /// Retention: keep the newest N checkpoints (what resume needs); >= 1. Default: 2.
    pub keep_last: usize,
    /// Also keep the best K checkpoints by validation score (`checkpoints/ranking.json`); 0 keeps
    /// none beyond `keep_last`. Default: 1.
    pub keep_best: usize,
    /// Seconds after the coordinator started by which a checkpoint must exist (a known
    /// walltime minus a margin): when the next step would end past it, the run saves and stops
    /// as on SIGTERM. Null for no budget. Default: null.
    pub must_save_by: Option<f64>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every: 50,
            every_minutes: None,
            keep_last: 2,
            keep_best: 1,
            must_save_by: None,
        }
    }
}

/// Who judges the MT-Bench answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JudgeKind {
    /// The run's reward model (`models.reward.kind: model`), offline; its goodness score is
    /// mapped to MT-Bench's 1-10 scale.
    #[default]
    RewardModel,
    /// An OpenAI-compatible chat-completions endpoint with the MT-Bench judge prompts.
    Http,
}

/// `validation.http:` — an OpenAI-compatible judge endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpJudgeConfig {
    /// Base URL up to `/v1`, e.g. `http://127.0.0.1:8000/v1`. Required with `judge: http`.
    #[serde(deserialize_with = "lenient_string")]
    pub url: String,
    /// The judge model's name. Default: `gpt-4`.
    #[serde(deserialize_with = "lenient_string")]
    pub model: String,
    /// Environment variable holding the API key (never logged); empty for none. Default:
    /// `OPENAI_API_KEY`.
    #[serde(deserialize_with = "lenient_empty_string")]
    pub api_key_env: String,
    /// Seconds per judge request before it counts as missing. Default: 60.
    pub timeout_s: f64,
    /// Judge requests in flight at once; >= 1. Default: 8.
    pub concurrency: usize,
}

impl Default for HttpJudgeConfig {
    fn default() -> Self {
        HttpJudgeConfig {
            url: String::new(),
            model: "gpt-4".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            timeout_s: 60.0,
            concurrency: 8,
        }
    }
}

/// `validation:` — MT-Bench every N steps; checkpoints are ranked by its score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Validate every N steps (a checkpoint is written at each validated step); 0 turns
    /// validation off. Default: 0.
    pub every: u64,
    /// Directory with FastChat's MT-Bench files (`question.jsonl`, `judge_prompts.jsonl`,
    /// `reference_answer/gpt-4.jsonl`). Required when `every` > 0.
    pub mt_bench: PathBuf,
    /// `reward_model` or `http`. Default: `reward_model`.
    pub judge: JudgeKind,
    /// The endpoint for `judge: http`.
    pub http: HttpJudgeConfig,
    /// New tokens per answer turn; >= 1. Default: 256.
    pub max_new_tokens: usize,
    /// Sampling temperature for answers; 0 is greedy. Default: 0.
    pub temperature: f64,
    /// Answer only the first N questions (quick checks); null for all 80. Default: null.
    pub max_questions: Option<usize>,
    /// Prompts answered per Generate call; >= 1. Default: 16.
    pub batch_size: usize,
    /// Also validate the initial policy before the first step (a fresh run only): the
    /// baseline the checkpoints' scores compare with, written as step 0 of `metrics.jsonl` and
    /// `validation/step-000000/`. Default: false.
    pub at_start: bool,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            every: 0,
            mt_bench: PathBuf::new(),
            judge: JudgeKind::RewardModel,
            http: HttpJudgeConfig::default(),
            max_new_tokens: 256,
            temperature: 0.0,
            max_questions: None,
            batch_size: 16,
            at_start: false,
        }
    }
}

/// A string that may have been written as a bare number or boolean (`name: 2024`, or
/// `--set run.name=2024`, which YAML reads as an integer): names are text, so take its text.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_any(LenientString)
}

fn lenient_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Opt;
    impl<'de> serde::de::Visitor<'de> for Opt {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or null")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            lenient_string(d).map(Some)
        }
    }
    d.deserialize_option(Opt)
}

/// Like `lenient_string`, but null or empty means the empty string.
fn lenient_empty_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(lenient_opt_string(d)?.unwrap_or_default())
}

struct LenientString;

impl serde::de::Visitor<'_> for LenientString {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<String, E> {
        Err(E::custom(
            "expected a string, found nothing (null or empty)",
        ))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<String, E> {
        self.visit_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parses_and_prints() {
        for s in ["cpu", "cuda", "cuda:3"] {
            assert_eq!(s.parse::<Device>().unwrap().to_string(), s);
        }
        let err = "gpu".parse::<Device>().unwrap_err();
        assert!(err.contains("`gpu`") && err.contains("cuda:N"), "{err}");
        assert!("cuda:x".parse::<Device>().is_err());
    }

    #[test]
    fn default_placement_has_one_worker_per_role() {
        let workers = RunConfig::default().workers;
        let names: Vec<_> = workers.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["actor", "critic", "reward", "reference"]);
        for w in &workers {
            assert_eq!(w.roles.len(), 1);
            assert_eq!(w.roles[0].as_str(), w.name);
        }
    }

    #[test]
    fn run_dir_joins_dir_and_name() {
        let mut cfg = RunConfig::default();
        cfg.run.name = "exp1".into();
        cfg.run.dir = "/data/runs".into();
        assert_eq!(cfg.run_dir(), Path::new("/data/runs/exp1"));
        assert_eq!(cfg.minibatch_size(), 8);
    }
}
