//! Role instances: what an actor, critic, reward or reference worker holds and computes. Plain
//! tch code over domain types (no tonic): every method runs on the role's own OS thread (see
//! [`crate::host`]), which owns all of the role's tensors.
//!
//! Token-level conventions (shared with the coordinator, see proto/rlhf/v1/worker.proto): a batch
//! is left-padded prompts of width `P` followed by responses of width `N`; per-token results are
//! (b, N) where column k belongs to response token k. Next-token log-probs and values of response
//! token k are read at sequence column `P - 1 + k`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rlhf_algo::{
    policy_loss, value_loss, KlLossTerm, LossAgg, LossScaler, LrScheduler, OptimizerConfig,
    PolicyLossConfig, PolicyLossInputs, Precision, ShardedAdamW, ValueLossConfig, ValueLossInputs,
};
use rlhf_model::{
    generate, sequence_scores, token_logprobs_checkpointed, token_logprobs_from, token_values,
    token_values_checkpointed, ChatMessage, Entropy, GenerationConfig, HeadKind, LoadOptions,
    LoraConfig, ModelDir, RewardHead, RewardSpec, Sampling, SaveOptions,
};
use tch::{Device, Kind, Tensor};

use crate::comm::{owned_ranges, Groups};
use crate::error::{RoleError, RoleResult};
use crate::external_rewards::{External, ExternalSpec};
use crate::reward_rules::Rule;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleKind {
    Actor,
    Critic,
    Reward,
    Reference,
    Generator,
}

impl RoleKind {
    pub fn name(self) -> &'static str {
        match self {
            RoleKind::Actor => "actor",
            RoleKind::Critic => "critic",
            RoleKind::Reward => "reward",
            RoleKind::Reference => "reference",
            RoleKind::Generator => "generator",
        }
    }
}

/// Training settings of an actor or critic.
#[derive(Debug, Clone)]
pub struct TrainerSpec {
    /// Actor loss (ignored by critics).
    pub policy_loss: PolicyLossConfig,
    /// Critic loss (ignored by actors).
    pub value_loss: ValueLossConfig,
    pub optim: OptimizerConfig,
    /// Optimizer steps of the whole run: where a cosine schedule reaches its floor.
    pub total_steps: u64,
    pub micro_batch_size: i64,
    /// Activation checkpointing per decoder layer (`train.gradient_checkpointing`): the
    /// training forward keeps only each layer's input and the backward recomputes the layer.
    pub gradient_checkpointing: bool,
    /// Sampling temperature; training forwards divide logits by it.
    pub temperature: f64,
    /// KL term in the actor loss (KL mode "loss").
    pub kl_loss: Option<KlLossTerm>,
    /// f32 master weights and moments for bf16/f16 models (`Mixed`), or everything in the
    /// model's dtype (`Pure`, `train.pure_low_precision`).
    pub precision: Precision,
    /// ZeRO stage over the data-parallel replicas: 0 = every replica holds the whole optimizer
    /// state; 1 = each owns 1/N of master weights and moments (gradients reduce-scattered once
    /// per step, updated weights all-gathered); 2 = as 1, with gradients reduce-scattered after
    /// every micro-batch so the f32 gradient is 1/N too.
    pub zero_stage: u32,
    /// Train LoRA adapters on the frozen model (actor only); `None`: every weight.
    pub lora: Option<LoraConfig>,
}

/// How a reward role scores.
#[derive(Debug, Clone)]
pub enum RewardKindSpec {
    /// A reward model; `fallback` says how to combine its outputs when its directory has no
    /// `rlhf_reward.json`.
    Model {
        attribute_weights: BTreeMap<String, f64>,
        mean: f64,
        std: f64,
    },
    /// A rule over the response text and the row's answer (`exact_match`, `math`).
    Rule(Rule),
    /// The user's code: a reward server or a process pool (`http`, `command`).
    External(ExternalSpec),
}

#[derive(Debug, Clone)]
pub enum RoleDetail {
    Actor(TrainerSpec),
    Critic(TrainerSpec),
    Reward(RewardKindSpec),
    Reference,
    /// A policy copy that only generates; its weights come from the actor by weight sync.
    /// With the actor's LoRA spec it holds the base weights from its model directory plus
    /// adapters of that spec, and the sync moves only the adapters.
    Generator(Option<LoraConfig>),
}

/// Everything needed to create a role instance.
#[derive(Debug, Clone)]
pub struct RoleSpec {
    pub role_id: String,
    pub model_path: PathBuf,
    pub device: Device,
    pub dtype: Kind,
    pub seed: u64,
    pub detail: RoleDetail,
}

impl RoleSpec {
    pub fn kind(&self) -> RoleKind {
        match self.detail {
            RoleDetail::Actor(_) => RoleKind::Actor,
            RoleDetail::Critic(_) => RoleKind::Critic,
            RoleDetail::Reward(_) => RoleKind::Reward,
            RoleDetail::Reference => RoleKind::Reference,
            RoleDetail::Generator(_) => RoleKind::Generator,
        }
    }
}

/// What a created role reports back.
#[derive(Debug, Clone)]
pub struct RoleInfo {
    pub parameters: u64,
    pub attribute_names: Vec<String>,
}

pub struct GenerateArgs {
    pub prompts: Vec<Vec<i64>>,
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub seed: u64,
    /// Global index of the first row when a batch is sharded over generators.
    pub first_row: u64,
}

pub struct Generated {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub prompt_width: i64,
    pub response_mask: Tensor,
    pub response_logprobs: Tensor,
    pub finished: Vec<bool>,
}

/// A padded batch of prompt + response sequences.
pub struct Seqs {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub prompt_width: i64,
    pub response_len: i64,
}

impl Seqs {
    /// Checks the shapes and that every token id is in `0..vocab` (an id outside it would index
    /// past the embedding table: a device-side assert that poisons a CUDA context). Returns the
    /// row count.
    fn check(&self, vocab: i64) -> RoleResult<i64> {
        let size = self.input_ids.size();
        if size.len() != 2 {
            return Err(RoleError::bad(
                "sequences.input_ids",
                format!("must be (b, s), found {size:?}"),
            ));
        }
        if self.attention_mask.size() != size {
            return Err(RoleError::bad(
                "sequences.attention_mask",
                format!(
                    "shape {:?} differs from input_ids {size:?}",
                    self.attention_mask.size()
                ),
            ));
        }
        if self.prompt_width < 1
            || self.response_len < 1
            || self.prompt_width + self.response_len != size[1]
        {
            return Err(RoleError::bad(
                "sequences.prompt_width",
                format!(
                    "prompt_width {} + response_len {} must equal the sequence width {} (both >= 1)",
                    self.prompt_width, self.response_len, size[1]
                ),
            ));
        }
        check_token_ids("sequences.input_ids", &self.input_ids, vocab)?;
        Ok(size[0])
    }

    fn rows(&self, start: i64, n: i64) -> RoleResult<Seqs> {
        Ok(Seqs {
            input_ids: self.input_ids.f_narrow(0, start, n)?,
            attention_mask: self.attention_mask.f_narrow(0, start, n)?,
            prompt_width: self.prompt_width,
            response_len: self.response_len,
        })
    }

    fn to(&self, device: Device) -> RoleResult<Seqs> {
        Ok(Seqs {
            input_ids: self.input_ids.f_to_device(device)?,
            attention_mask: self.attention_mask.f_to_device(device)?,
            prompt_width: self.prompt_width,
            response_len: self.response_len,
        })
    }
}

/// One minibatch for a `TrainStep`.
pub struct TrainBatch {
    pub seqs: Seqs,
    pub response_mask: Tensor,
    pub advantages: Option<Tensor>,
    pub old_logprobs: Option<Tensor>,
    pub ref_logprobs: Option<Tensor>,
    pub old_values: Option<Tensor>,
    pub returns: Option<Tensor>,
    /// Response tokens and rows of the whole minibatch when this batch is one data-parallel
    /// shard of it (the loss normaliser); `None`: this batch is the whole minibatch.
    pub minibatch: Option<(f64, f64)>,
}

pub struct ScoreItem {
    pub prompt: Vec<ChatMessage>,
    pub response: String,
    pub answer: String,
    /// The prompt row's other columns (for `http` and `command` rewards).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug)]
pub struct Scores {
    /// (b,) f32.
    pub rewards: Tensor,
    /// (b, a) f32 raw head outputs, for reward models.
    pub attributes: Option<Tensor>,
    pub attribute_names: Vec<String>,
}

/// A model with an optimizer: the actor or the critic.
pub struct Trainer {
    pub dir: ModelDir,
    source: PathBuf,
    spec: TrainerSpec,
    opt: ShardedAdamW,
    /// The f32 gradient accumulated over micro-batches: the whole flat gradient (stages 0 and
    /// 1) or this replica's owned part (stage 2); allocated at the first step.
    acc: Option<Tensor>,
    /// Dynamic loss scaling, for f16 models.
    scaler: Option<LossScaler>,
    schedule: LrScheduler,
    step: u64,
}

pub struct RewardModel {
    dir: ModelDir,
    spec: RewardSpec,
}

pub enum Role {
    Actor(Trainer),
    Critic(Trainer),
    RewardModel(RewardModel),
    RewardRule(Rule),
    RewardExternal(External),
    Reference(ModelDir),
    Generator(ModelDir),
}

/// Rows scored per forward by the reward model, whose inputs vary in length.
const INFER_ROWS: i64 = 16;

/// f32 elements of the largest per-forward output a log-prob or value pass may make (256 MiB):
/// rows per forward are as many as fit, at least one ([`rows_per_forward`]).
const INFER_OUTPUT_ELEMS: i64 = 1 << 26;

/// Rows of `b` per no-grad forward when each row makes `per_row` output elements (log-probs:
/// response positions x vocabulary; values: positions x hidden). Whole batches where they fit:
/// at the 20.5M RLOO bench (32 rows x 32 positions x 4096) one forward of 32 rows took 0.37 s
/// against 0.42 s as two of 16 (`profile_rloo ... ref`, docs/benchmarks.md); long responses over
/// large vocabularies get fewer rows instead of a multi-GB logits tensor.
/// Refuses a (b, s) id tensor holding a value outside `0..vocab`, naming the first such row,
/// column and value. One pass on the tensor's device; the position is looked up only on failure.
fn check_token_ids(field: &str, ids: &Tensor, vocab: i64) -> RoleResult<()> {
    let kind = ids.f_kind()?;
    if kind != Kind::Int64 {
        return Err(RoleError::bad(
            field,
            format!("dtype {kind:?}; token ids must be i64"),
        ));
    }
    if ids.numel() == 0 {
        return Ok(());
    }
    let bad = ids.f_lt(0)?.f_logical_or(&ids.f_ge(vocab)?)?;
    if bad.f_any()?.f_int64_value(&[])? == 0 {
        return Ok(());
    }
    // (k, 2) positions of the bad ids, row-major, so the first is the first in the batch.
    let at = bad.f_nonzero()?.f_to_device(Device::Cpu)?;
    let (row, col) = (at.f_int64_value(&[0, 0])?, at.f_int64_value(&[0, 1])?);
    let id = ids.f_int64_value(&[row, col])?;
    Err(RoleError::bad(
        field,
        format!(
            "row {row} has token id {id} at column {col}, outside this model's vocabulary \
             0..{vocab}; tokenize with the model's own tokenizer"
        ),
    ))
}

fn rows_per_forward(b: i64, per_row: i64) -> i64 {
    (INFER_OUTPUT_ELEMS / per_row.max(1)).clamp(1, b.max(1))
}

fn load_dir(spec: &RoleSpec, head: Option<HeadKind>) -> RoleResult<ModelDir> {
    let opts = LoadOptions {
        device: spec.device,
        dtype: Some(spec.dtype),
        head,
        seed: spec.seed as i64,
    };
    Ok(ModelDir::load(&spec.model_path, &opts)?)
}

fn count_params(dir: &ModelDir) -> u64 {
    dir.model
        .named_tensors()
        .iter()
        .map(|(_, t)| t.numel() as u64)
        .sum()
}

impl Role {
    /// Loads the model and builds the role's state.
    pub fn create(spec: &RoleSpec) -> RoleResult<(Role, RoleInfo)> {
        let mut names = vec![];
        let role = match &spec.detail {
            RoleDetail::Actor(t) => {
                let dir = load_dir(spec, Some(HeadKind::CausalLm))?;
                Role::Actor(Trainer::new(dir, &spec.model_path, t.clone(), spec.seed)?)
            }
            RoleDetail::Critic(t) => {
                let dir = load_dir(spec, Some(HeadKind::Score { num_labels: 1 }))?;
                Role::Critic(Trainer::new(dir, &spec.model_path, t.clone(), spec.seed)?)
            }
            RoleDetail::Reference => {
                let dir = load_dir(spec, Some(HeadKind::CausalLm))?;
                freeze(&dir);
                Role::Reference(dir)
            }
            RoleDetail::Generator(lora) => {
                let mut dir = load_dir(spec, Some(HeadKind::CausalLm))?;
                if let Some(lora) = lora {
                    // The actor's seed: fresh adapters equal to the actor's fresh ones (the
                    // first sync overwrites them anyway).
                    dir.model.add_lora(lora.clone(), spec.seed as i64)?;
                }
                freeze(&dir);
                Role::Generator(dir)
            }
            RoleDetail::Reward(RewardKindSpec::Rule(rule)) => {
                names.push(rule.name().to_string());
                Role::RewardRule(rule.clone())
            }
            RoleDetail::Reward(RewardKindSpec::External(ext)) => {
                let ext = External::start(ext)?;
                names.push(ext.name().to_string());
                Role::RewardExternal(ext)
            }
            RoleDetail::Reward(RewardKindSpec::Model {
                attribute_weights,
                mean,
                std,
            }) => {
                let dir = load_dir(spec, None)?;
                freeze(&dir);
                let n = match dir.model.config.head {
                    HeadKind::Score { num_labels } => num_labels,
                    HeadKind::CausalLm => {
                        return Err(RoleError::bad(
                            "models.reward.path",
                            format!(
                                "{} is a causal LM; a reward model needs a score head \
                                 (*ForSequenceClassification in config.json)",
                                spec.model_path.display()
                            ),
                        ))
                    }
                };
                let rs = match RewardSpec::load(&spec.model_path)? {
                    Some(s) => s,
                    None => {
                        fallback_spec(n as i64, attribute_weights, *mean, *std, &spec.model_path)?
                    }
                };
                if rs.attributes.len() != n {
                    return Err(RoleError::bad(
                        "models.reward.path",
                        format!(
                            "{} names {} attributes but the score head has {n} outputs",
                            spec.model_path.join(RewardSpec::FILE).display(),
                            rs.attributes.len()
                        ),
                    ));
                }
                names = rs.attributes.clone();
                Role::RewardModel(RewardModel { dir, spec: rs })
            }
        };
        let parameters = match &role {
            Role::Actor(t) | Role::Critic(t) => count_params(&t.dir),
            Role::RewardModel(r) => count_params(&r.dir),
            Role::Reference(d) | Role::Generator(d) => count_params(d),
            Role::RewardRule(_) | Role::RewardExternal(_) => 0,
        };
        Ok((
            role,
            RoleInfo {
                parameters,
                attribute_names: names,
            },
        ))
    }

    pub fn kind(&self) -> RoleKind {
        match self {
            Role::Actor(_) => RoleKind::Actor,
            Role::Critic(_) => RoleKind::Critic,
            Role::RewardModel(_) | Role::RewardRule(_) | Role::RewardExternal(_) => {
                RoleKind::Reward
            }
            Role::Reference(_) => RoleKind::Reference,
            Role::Generator(_) => RoleKind::Generator,
        }
    }

    fn wrong(&self, op: &str) -> RoleError {
        RoleError::WrongRole {
            op: op.to_string(),
            kind: self.kind().name(),
        }
    }

    pub fn generate(&mut self, a: GenerateArgs) -> RoleResult<Generated> {
        let dir = match self {
            Role::Actor(t) => &t.dir,
            Role::Generator(d) => d,
            _ => return Err(self.wrong("Generate")),
        };
        if a.prompts.is_empty() || a.samples_per_prompt == 0 {
            return Err(RoleError::bad(
                "prompts",
                "need at least one prompt and one sample".into(),
            ));
        }
        let vocab = dir.model.config.vocab_size as i64;
        for (i, p) in a.prompts.iter().enumerate() {
            if let Some((col, id)) = p
                .iter()
                .enumerate()
                .find(|(_, id)| !(0..vocab).contains(*id))
            {
                return Err(RoleError::bad(
                    "prompts",
                    format!(
                        "prompt {i} has token id {id} at position {col}, outside this model's \
                         vocabulary 0..{vocab}; tokenize with the model's own tokenizer"
                    ),
                ));
            }
        }
        let rows: Vec<Vec<i64>> = a
            .prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), a.samples_per_prompt))
            .collect();
        let cfg = GenerationConfig {
            max_new_tokens: a.max_new_tokens,
            // Temperature 0 asks for greedy decoding (validation answers by default).
            sampling: if a.temperature <= 0.0 {
                Sampling::Greedy
            } else {
                Sampling::Sample {
                    temperature: a.temperature,
                    top_k: (a.top_k > 0).then_some(a.top_k),
                    top_p: (a.top_p < 1.0).then_some(a.top_p),
                }
            },
            stop_ids: dir.stop_ids.clone(),
            pad_id: dir.pad_id,
            seed: a.seed,
            first_row: a.first_row,
        };
        let _g = tch::no_grad_guard();
        let out = generate(&dir.model, &rows, &cfg)?;
        Ok(Generated {
            input_ids: out.sequences,
            attention_mask: out.attention_mask,
            prompt_width: out.prompt_width,
            response_mask: out.response_mask,
            response_logprobs: out.response_logprobs,
            finished: out.finished,
        })
    }

    /// Log-probs of the response tokens (b, N) at `temperature` (actor or reference). With
    /// `adapters_off`, an actor with LoRA adapters computes them with its adapters switched off:
    /// the frozen base policy's log-probs, i.e. the reference's when the reference is the base.
    pub fn logprobs(
        &mut self,
        s: Seqs,
        temperature: f64,
        adapters_off: bool,
    ) -> RoleResult<Tensor> {
        let dir = match self {
            Role::Actor(t) => &t.dir,
            Role::Reference(d) => d,
            _ => return Err(self.wrong("LogProbs")),
        };
        if !adapters_off {
            return logprobs_of(dir, s, temperature);
        }
        if dir.model.lora().is_none() {
            return Err(RoleError::bad(
                "adapters_off",
                format!(
                    "this {} has no LoRA adapters to switch off; ask for log-probs without \
                     adapters_off, or create the actor with models.lora",
                    self.kind().name()
                ),
            ));
        }
        let was = dir.model.set_adapters_enabled(false);
        let out = logprobs_of(dir, s, temperature);
        // Back on whatever happened: the next generate or train step needs the adapters.
        dir.model.set_adapters_enabled(was);
        out
    }

    /// Critic values at the response tokens (b, N).
    pub fn values(&mut self, s: Seqs) -> RoleResult<Tensor> {
        let Role::Critic(t) = self else {
            return Err(self.wrong("Values"));
        };
        let b = s.check(t.dir.model.config.vocab_size as i64)?;
        let s = s.to(t.dir.model.device())?;
        let _g = tch::no_grad_guard();
        let mut parts = vec![];
        let width = s.input_ids.size()[1] * t.dir.model.config.hidden_size as i64;
        let chunk = rows_per_forward(b, width);
        for start in (0..b).step_by(chunk as usize) {
            let part = s.rows(start, chunk.min(b - start))?;
            let v = token_values(
                &t.dir.model,
                &part.input_ids,
                &part.attention_mask,
                s.prompt_width - 1,
            )?;
            parts.push(v.f_narrow(1, 0, s.response_len)?);
        }
        Ok(Tensor::f_cat(&parts, 0)?
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?)
    }

    pub fn score(&mut self, items: Vec<ScoreItem>) -> RoleResult<Scores> {
        match self {
            Role::RewardRule(rule) => Ok(rule.score_items(&items)?),
            Role::RewardModel(rm) => rm.score(&items),
            Role::RewardExternal(ext) => ext.score(&items),
            _ => Err(self.wrong("Score")),
        }
    }

    /// One optimizer step over `b`; with a gradient group in `groups`, gradients are summed over
    /// the data-parallel replicas before clipping and the optimizer step.
    pub fn train_step(
        &mut self,
        b: TrainBatch,
        groups: &mut Groups,
    ) -> RoleResult<(BTreeMap<String, f64>, u64)> {
        let watch = crate::memory::PeakWatch::start();
        let out = match self {
            Role::Actor(t) => t.step_actor(b, groups),
            Role::Critic(t) => t.step_critic(b, groups),
            _ => Err(self.wrong("TrainStep")),
        }?;
        // What `rlhf-coord plan` estimates for this role, measured (tests/plan_memory.rs and
        // scripts/bench/zero_bench.sh read this line from the worker's log).
        if let Some(m) = watch.finish() {
            tracing::info!(
                step = out.1,
                peak_rss_bytes = m.peak,
                rss_at_start_bytes = m.start,
                peak_since_step_start = m.since_step,
                "train step memory"
            );
        }
        Ok(out)
    }

    fn weights_dir(&self) -> Option<&ModelDir> {
        match self {
            Role::Actor(t) | Role::Critic(t) => Some(&t.dir),
            Role::RewardModel(r) => Some(&r.dir),
            Role::Reference(d) | Role::Generator(d) => Some(d),
            Role::RewardRule(_) | Role::RewardExternal(_) => None,
        }
    }

    /// The device the role's model is on (`None` for rule rewards).
    pub fn device(&self) -> Option<Device> {
        self.weights_dir().map(|d| d.model.device())
    }

    /// What `SyncWeights` moves, in name order: every weight, or with LoRA adapters only the
    /// adapter tensors (`lora_A`, `lora_B`), since the base weights are frozen and every copy
    /// of the policy loaded them from the same files. The receiving generator copies them into
    /// its adapters in place; nothing derived from them is cached (packed CPU weights are
    /// rebuilt, merged, by every `generate` call).
    pub fn sync_tensors(&self, op: &str) -> RoleResult<Vec<(String, Tensor)>> {
        let model = &self.weights_dir().ok_or_else(|| self.wrong(op))?.model;
        Ok(match model.lora() {
            Some(l) => l.named_tensors(),
            None => model.named_tensors(),
        })
    }

    /// What `WeightsDigest` hashes: the base weights in name order, then the adapters in name
    /// order when the model has them. Raw tensors on both sides of a comparison (actor replicas
    /// and LoRA generators hold the same structure): merged weights `W + scale · B A` computed
    /// on different devices could differ in rounding and fail a check of equal copies, and the
    /// adapters alone would not catch a generator whose base files differ.
    pub fn digest_tensors(&self, op: &str) -> RoleResult<Vec<(String, Tensor)>> {
        let model = &self.weights_dir().ok_or_else(|| self.wrong(op))?.model;
        let mut v = model.named_tensors();
        if let Some(l) = model.lora() {
            v.extend(l.named_tensors());
        }
        Ok(v)
    }

    /// Named weights in name order, for `ExportWeights`/`ImportWeights`. A model with LoRA
    /// adapters gives its merged weights (`W + scale · B A`): the equivalent plain model.
    pub fn weights(&self, op: &str) -> RoleResult<Vec<(String, Tensor)>> {
        let model = &self.weights_dir().ok_or_else(|| self.wrong(op))?.model;
        Ok(match model.lora() {
            Some(_) => model.merged_tensors()?,
            None => model.named_tensors(),
        })
    }

    /// Elements of the model's weights (the merged shapes for LoRA are the base shapes), without
    /// merging anything: the bound on what an ImportWeights stream may declare.
    pub fn weight_elems(&self, op: &str) -> RoleResult<u64> {
        let model = &self.weights_dir().ok_or_else(|| self.wrong(op))?.model;
        Ok(model
            .named_tensors()
            .iter()
            .map(|(_, t)| t.numel() as u64)
            .sum())
    }

    /// Replaces every weight; names and shapes must match the role's model exactly.
    pub fn import_weights(&mut self, new: Vec<(String, Tensor)>) -> RoleResult<()> {
        if self.weights_dir().is_some_and(|d| d.model.lora().is_some()) {
            // Its weights() are merged copies: writing into them would change nothing.
            return Err(RoleError::bad(
                "weights",
                "this role holds LoRA adapters on frozen weights; it cannot import full weights \
                 (SyncWeights moves its adapters)"
                    .into(),
            ));
        }
        let mut vars = self.weights("ImportWeights")?;
        if new.len() != vars.len() {
            return Err(RoleError::bad(
                "weights",
                format!(
                    "{} tensors received, the model has {}",
                    new.len(),
                    vars.len()
                ),
            ));
        }
        let by_name: BTreeMap<&str, &Tensor> = new.iter().map(|(n, t)| (n.as_str(), t)).collect();
        for (name, var) in &vars {
            let src = by_name
                .get(name.as_str())
                .ok_or_else(|| RoleError::bad("weights", format!("tensor `{name}` missing")))?;
            if src.size() != var.size() {
                return Err(RoleError::bad(
                    "weights",
                    format!(
                        "tensor `{name}`: shape {:?}, the model has {:?}",
                        src.size(),
                        var.size()
                    ),
                ));
            }
        }
        let _g = tch::no_grad_guard();
        for (name, var) in vars.iter_mut() {
            let src = by_name[name.as_str()];
            var.f_copy_(&src.f_to_device(var.device())?.f_to_kind(var.kind())?)?;
        }
        Ok(())
    }

    /// Writes the role's trainable state into `dir`; frozen roles write nothing, and so do
    /// replicas other than rank 0 (which take part in gathering sharded state).
    pub fn save_state(&mut self, dir: &Path, groups: &mut Groups) -> RoleResult<Vec<String>> {
        match self {
            Role::Actor(t) | Role::Critic(t) => t.save(dir, groups),
            _ => Ok(vec![]),
        }
    }

    /// Restores what [`Role::save_state`] wrote.
    pub fn load_state(&mut self, dir: &Path, groups: &mut Groups) -> RoleResult<Vec<String>> {
        match self {
            Role::Actor(t) | Role::Critic(t) => t.load(dir, groups),
            _ => Ok(vec![]),
        }
    }
}

/// Log-probs of the response tokens (b, N) of `s` under `dir`'s model as it is now (adapters
/// on or off), without a graph.
fn logprobs_of(dir: &ModelDir, s: Seqs, temperature: f64) -> RoleResult<Tensor> {
    let b = s.check(dir.model.config.vocab_size as i64)?;
    let s = s.to(dir.model.device())?;
    let _g = tch::no_grad_guard();
    let mut parts = vec![];
    let vocab = dir.model.config.vocab_size as i64;
    let chunk = rows_per_forward(b, s.response_len * vocab);
    for start in (0..b).step_by(chunk as usize) {
        let part = s.rows(start, chunk.min(b - start))?;
        let lp = token_logprobs_from(
            &dir.model,
            &part.input_ids,
            &part.attention_mask,
            s.prompt_width - 1,
            temperature,
            Entropy::Off,
        )?;
        parts.push(lp.logprobs);
    }
    Ok(Tensor::f_cat(&parts, 0)?.f_to_device(Device::Cpu)?)
}

/// No gradients for any weight of `dir`'s model, its adapters (a generator's) included.
fn freeze(dir: &ModelDir) {
    let adapters = dir
        .model
        .lora()
        .map(|l| l.named_tensors())
        .unwrap_or_default();
    for (_, t) in dir.model.named_tensors().into_iter().chain(adapters) {
        let _ = t.set_requires_grad(false);
    }
}

fn fallback_spec(
    n: i64,
    weights: &BTreeMap<String, f64>,
    mean: f64,
    std: f64,
    path: &Path,
) -> RoleResult<RewardSpec> {
    let spec = if n == 1 {
        RewardSpec {
            format: 1,
            head: RewardHead::BradleyTerry,
            attributes: vec!["reward".into()],
            goodness_weights: BTreeMap::new(),
            mean,
            std,
        }
    } else if n as usize == rlhf_algo::HELPSTEER2_ATTRIBUTES.len() {
        RewardSpec {
            format: 1,
            head: RewardHead::Regression,
            attributes: rlhf_algo::HELPSTEER2_ATTRIBUTES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            goodness_weights: weights.clone(),
            mean,
            std,
        }
    } else {
        return Err(RoleError::bad(
            "models.reward.path",
            format!(
                "{}: the score head has {n} outputs and there is no {}; write one naming the \
                 attributes (rlhf-coord train-rm does)",
                path.display(),
                RewardSpec::FILE
            ),
        ));
    };
    spec.validate(&path.join(RewardSpec::FILE))?;
    Ok(spec)
}

impl RewardModel {
    fn score(&self, items: &[ScoreItem]) -> RoleResult<Scores> {
        let tok = &self.dir.tokenizer;
        let mut seqs = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            let mut msgs = it.prompt.clone();
            msgs.push(ChatMessage::new("assistant", &it.response));
            let ids = tok.encode_messages(&msgs, tok.chat_template().is_some(), false)?;
            if ids.is_empty() {
                return Err(RoleError::bad(
                    "items",
                    format!("item {i} tokenizes to nothing"),
                ));
            }
            seqs.push(ids);
        }
        // A conversation longer than the reward model's context keeps its end (the response
        // being judged); say how many were cut rather than fail a whole validation on one.
        let ctx = self.dir.model.config.max_position_embeddings;
        let mut cut = 0;
        for ids in &mut seqs {
            if ids.len() > ctx {
                ids.drain(..ids.len() - ctx);
                cut += 1;
            }
        }
        if cut > 0 {
            tracing::warn!(
                items = cut,
                context = ctx,
                "conversations longer than the reward model's context were cut from the left"
            );
        }
        let device = self.dir.model.device();
        let _g = tch::no_grad_guard();
        let mut outs = vec![];
        for chunk in seqs.chunks(INFER_ROWS as usize) {
            let (ids, mask) = right_pad(chunk, self.dir.pad_id, device)?;
            outs.push(sequence_scores(&self.dir.model, &ids, &mask)?.f_to_kind(Kind::Float)?);
        }
        let attrs = Tensor::f_cat(&outs, 0)?.f_to_device(Device::Cpu)?;
        let rows = Vec::<Vec<f32>>::try_from(&attrs)?;
        let rewards: Vec<f32> = rows
            .iter()
            .map(|r| {
                let r64: Vec<f64> = r.iter().map(|&x| x as f64).collect();
                self.spec.reward(&r64) as f32
            })
            .collect();
        Ok(Scores {
            rewards: Tensor::f_from_slice(&rewards)?,
            attributes: Some(attrs),
            attribute_names: self.spec.attributes.clone(),
        })
    }
}

fn right_pad(rows: &[Vec<i64>], pad: i64, device: Device) -> RoleResult<(Tensor, Tensor)> {
    let w = rows.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(rows.len() * w);
    let mut mask = Vec::with_capacity(rows.len() * w);
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(pad, w - r.len()));
        mask.extend(std::iter::repeat_n(1i64, r.len()));
        mask.extend(std::iter::repeat_n(0i64, w - r.len()));
    }
    let shape = [rows.len() as i64, w as i64];
    Ok((
        Tensor::f_from_slice(&ids)?
            .f_view(shape)?
            .f_to_device(device)?,
        Tensor::f_from_slice(&mask)?
            .f_view(shape)?
            .f_to_device(device)?,
    ))
}

/// Per micro-batch `[start, start + n)`: its loss scale (share of the minibatch's tokens or rows,
/// per `agg`), so accumulated gradients equal the whole minibatch's.
/// With `minibatch` = (tokens, rows) of a whole minibatch this batch is a data-parallel shard of,
/// the shares are of the whole minibatch, so the replicas' summed gradients equal its gradient.
fn micro_batches(
    mask: &Tensor,
    micro: i64,
    agg: LossAgg,
    minibatch: Option<(f64, f64)>,
) -> RoleResult<Vec<(i64, i64, f64)>> {
    let counts = Vec::<f64>::try_from(mask.f_to_kind(Kind::Double)?.f_sum_dim_intlist(
        [1].as_slice(),
        false,
        Kind::Double,
    )?)?;
    let rows = counts.len() as i64;
    let (total, all_rows) = match minibatch {
        Some((tokens, rows)) => (tokens, rows),
        None => (counts.iter().sum(), rows as f64),
    };
    if total <= 0.0 || all_rows <= 0.0 {
        return Err(RoleError::bad(
            "response_mask",
            "the minibatch has no response tokens".into(),
        ));
    }
    let micro = micro.clamp(1, rows.max(1));
    let mut out = vec![];
    let mut start = 0;
    while start < rows {
        let n = micro.min(rows - start);
        let tokens: f64 = counts[start as usize..(start + n) as usize].iter().sum();
        let scale = match agg {
            LossAgg::TokenMean => tokens / total,
            LossAgg::SeqMeanTokenSum | LossAgg::SeqMeanTokenMean => n as f64 / all_rows,
        };
        out.push((start, n, scale));
        start += n;
    }
    Ok(out)
}

fn need<'a>(t: &'a Option<Tensor>, field: &'static str, op: &str) -> RoleResult<&'a Tensor> {
    t.as_ref()
        .ok_or_else(|| RoleError::bad(field, format!("required by {op}")))
}

impl Trainer {
    fn new(mut dir: ModelDir, source: &Path, spec: TrainerSpec, seed: u64) -> RoleResult<Trainer> {
        if let Some(lora) = &spec.lora {
            // Same seed on every replica: their adapters start (and stay) bitwise equal.
            dir.model.add_lora(lora.clone(), seed as i64)?;
        }
        // Only the adapters with LoRA (the base is frozen), else every weight. The optimizer
        // owns nothing yet: the gradient group, joined after the role is created, decides what
        // it owns at the first step or LoadState (`ensure_layout`). Allocating the unsharded
        // masters and moments here would need the full state on every ZeRO replica, and on
        // CPU glibc keeps the freed heap pages resident (docs/scale.md).
        let opt = ShardedAdamW::new(
            dir.model.trainable_tensors(),
            &spec.optim,
            spec.precision,
            Vec::new(),
        )?;
        let schedule = LrScheduler::new(&spec.optim, spec.total_steps)?;
        let scaler = (dir.model.kind() == Kind::Half).then(LossScaler::default);
        Ok(Trainer {
            dir,
            source: source.to_path_buf(),
            spec,
            opt,
            acc: None,
            scaler,
            schedule,
            step: 0,
        })
    }

    /// Whether the optimizer state is sharded over the replicas of `groups`.
    fn sharded(&self, groups: &Groups) -> bool {
        self.spec.zero_stage > 0 && groups.grad_rank().1 > 1
    }

    /// Makes the optimizer own what `groups` and the ZeRO stage say this replica owns: the
    /// gradient group is joined after the role is created, so the first step (or a LoadState)
    /// re-shards the still untouched optimizer. A group that changes after training started
    /// is an error (the state would be lost).
    fn ensure_layout(&mut self, groups: &Groups) -> RoleResult<()> {
        let total = self.opt.total();
        let want = if self.sharded(groups) {
            let (rank, world) = groups.grad_rank();
            owned_ranges(total, rank, world)
        } else {
            std::iter::once(0..total).collect()
        };
        if self.opt.owned() == want.as_slice() {
            return Ok(());
        }
        if self.opt.steps() > 0 {
            return Err(RoleError::bad(
                "groups",
                "the gradient group changed after training started; relaunch from a checkpoint"
                    .into(),
            ));
        }
        self.opt = ShardedAdamW::new(
            self.dir.model.trainable_tensors(),
            &self.spec.optim,
            self.spec.precision,
            want,
        )?;
        self.acc = None;
        Ok(())
    }

    /// Whether the f32 gradient itself is sharded: ZeRO-2 over two or more replicas, where
    /// each micro-batch's gradient is reduce-scattered into this replica's part.
    fn grads_sharded(&self, groups: &Groups) -> bool {
        self.spec.zero_stage >= 2 && self.sharded(groups)
    }

    /// Starts a step: layout checked, gradients zeroed.
    fn begin_step(&mut self, groups: &Groups) -> RoleResult<()> {
        self.ensure_layout(groups)?;
        let len = if self.grads_sharded(groups) {
            self.opt.owned_len()
        } else {
            self.opt.total()
        };
        match &mut self.acc {
            Some(a) if a.numel() as i64 == len => {
                let _ = a.f_zero_()?;
            }
            _ => {
                let dev = self.dir.model.device();
                self.acc = Some(Tensor::f_zeros([len], (Kind::Float, dev))?);
            }
        }
        Ok(self.opt.zero_grad()?)
    }

    /// The factor a micro-batch's loss is multiplied by before backward (f16 loss scaling).
    fn loss_scale(&self) -> f64 {
        self.scaler.as_ref().map_or(1.0, LossScaler::scale)
    }

    /// After a micro-batch's backward: its gradient moves into the f32 accumulator (stage 2:
    /// reduce-scattered over the replicas first, one bucket at a time) and the model's
    /// gradients are zeroed. No full-size copy: each gradient is added in place (stages 0 and
    /// 1), or one bucket at a time is converted (stage 2).
    fn accumulate(&mut self, groups: &mut Groups) -> RoleResult<()> {
        let _g = tch::no_grad_guard();
        let grads: Vec<(String, Tensor)> = self
            .opt
            .params()
            .iter()
            .map(|(n, p)| -> RoleResult<(String, Tensor)> {
                let g = p.f_grad()?;
                Ok((n.clone(), if g.defined() { g } else { p.f_zeros_like()? }))
            })
            .collect::<RoleResult<_>>()?;
        let acc = self
            .acc
            .as_ref()
            .ok_or_else(|| RoleError::bad("state", "no step begun".into()))?;
        if !self.grads_sharded(groups) {
            let mut off = 0i64;
            for (_, g) in &grads {
                let n = g.numel() as i64;
                let _ = acc.f_narrow(0, off, n)?.f_add_(&g.f_view([-1])?)?;
                off += n;
            }
        } else {
            groups.reduce_scatter_grads(&grads, acc)?;
        }
        drop(grads);
        Ok(self.opt.zero_grad()?)
    }

    fn finish_step(
        &mut self,
        metrics: &mut BTreeMap<String, f64>,
        groups: &mut Groups,
    ) -> RoleResult<u64> {
        let sharded = self.sharded(groups);
        let acc = self
            .acc
            .take()
            .ok_or_else(|| RoleError::bad("state", "no step begun".into()))?;
        // This replica's owned gradient, summed over the replicas.
        let grad = if !sharded {
            groups.all_reduce_flat(&acc)?;
            acc.shallow_clone()
        } else if self.grads_sharded(groups) {
            acc.shallow_clone()
        } else {
            let owned = Tensor::f_zeros([self.opt.owned_len()], (Kind::Float, acc.device()))?;
            groups.reduce_scatter_flat(&acc, &owned)?;
            owned
        };
        // The global norm: each replica's owned square sum, added over the replicas.
        let mut sq = self.opt.grad_square_sum(&grad)?;
        if sharded {
            let t = Tensor::f_from_slice(&[sq as f32])?.f_to_device(acc.device())?;
            groups.all_reduce_flat(&t)?;
            sq = t.f_double_value(&[0])?;
        }
        let unscale = 1.0 / self.loss_scale();
        let norm = sq.sqrt() * unscale;
        let finite = norm.is_finite();
        if !finite && self.scaler.is_none() {
            return Err(rlhf_algo::AlgoError::NonFiniteGradNorm { value: norm }.into());
        }
        let clip = match self.spec.optim.max_grad_norm {
            Some(max) if finite => (max / (norm + 1e-6)).min(1.0),
            _ => 1.0,
        };
        let lr = self.schedule.lr_at(self.step);
        let run = self.scaler.as_mut().is_none_or(|s| s.update(finite));
        if run {
            self.opt.step(lr, &grad, unscale * clip)?;
            if sharded {
                groups.all_gather_params(self.opt.params())?;
            }
        }
        drop(grad);
        self.acc = Some(acc);
        self.step += 1;
        metrics.insert("grad_norm".into(), norm);
        metrics.insert("lr".into(), lr);
        if let Some(s) = &self.scaler {
            metrics.insert("loss_scale".into(), s.scale());
            metrics.insert("skipped_step".into(), if run { 0.0 } else { 1.0 });
        }
        Ok(self.step)
    }

    fn step_actor(
        &mut self,
        b: TrainBatch,
        groups: &mut Groups,
    ) -> RoleResult<(BTreeMap<String, f64>, u64)> {
        // LoRA dropout applies to these forwards only (not to log-probs or generation).
        self.dir.model.set_lora_training(true);
        let out = self.step_actor_inner(b, groups);
        self.dir.model.set_lora_training(false);
        out
    }

    fn step_actor_inner(
        &mut self,
        b: TrainBatch,
        groups: &mut Groups,
    ) -> RoleResult<(BTreeMap<String, f64>, u64)> {
        b.seqs.check(self.dir.model.config.vocab_size as i64)?;
        let dev = self.dir.model.device();
        let adv = need(&b.advantages, "advantages", "the actor's TrainStep")?;
        let old = need(&b.old_logprobs, "old_logprobs", "the actor's TrainStep")?;
        if self.spec.kl_loss.is_some() {
            need(&b.ref_logprobs, "ref_logprobs", "a KL loss term")?;
        }
        let cfg = self.spec.policy_loss.clone();
        // The entropy is always reported; it carries gradients only when it is in the loss.
        let entropy = if cfg.entropy_coef != 0.0 {
            Entropy::WithGrad
        } else {
            Entropy::Metric
        };
        let parts = micro_batches(
            &b.response_mask,
            self.spec.micro_batch_size,
            cfg.agg,
            b.minibatch,
        )?;
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        self.begin_step(groups)?;
        for (start, n, scale) in parts {
            let s = b.seqs.rows(start, n)?.to(dev)?;
            let rows = |t: &Tensor| -> RoleResult<Tensor> {
                Ok(t.f_narrow(0, start, n)?.f_to_device(dev)?)
            };
            let (mask, adv, old) = (rows(&b.response_mask)?, rows(adv)?, rows(old)?);
            let reference = b.ref_logprobs.as_ref().map(rows).transpose()?;
            let (model, from) = (&self.dir.model, s.prompt_width - 1);
            let (ids, attention) = (&s.input_ids, &s.attention_mask);
            let temperature = self.spec.temperature;
            let (lp, ckpt) = if self.spec.gradient_checkpointing {
                let (lp, c) =
                    token_logprobs_checkpointed(model, ids, attention, from, temperature, entropy)?;
                (lp, Some(c))
            } else {
                let lp = token_logprobs_from(model, ids, attention, from, temperature, entropy)?;
                (lp, None)
            };
            let new_lp = lp.logprobs;
            let ent = lp.entropy;
            let out = policy_loss(
                &cfg,
                &PolicyLossInputs {
                    logprobs: &new_lp,
                    old_logprobs: &old,
                    advantages: &adv,
                    response_mask: &mask.f_to_kind(new_lp.kind())?,
                    entropy: ent.as_ref(),
                    ref_logprobs: reference.as_ref(),
                },
                self.spec.kl_loss,
            )?;
            (out.loss * (scale * self.loss_scale())).f_backward()?;
            // With checkpointing that backward stopped at the trunk's output; the decoder
            // layers' gradients come from recomputing them now.
            if let Some(c) = ckpt {
                c.backward()?;
            }
            self.accumulate(groups)?;
            let pm = out.metrics;
            *m.entry("pg_loss".into()).or_default() += scale * pm.pg_loss;
            *m.entry("clip_frac".into()).or_default() += scale * pm.clip_frac;
            *m.entry("approx_kl".into()).or_default() += scale * pm.approx_kl;
            if let Some(e) = pm.entropy {
                *m.entry("entropy".into()).or_default() += scale * e;
            }
            if let Some(k) = pm.ref_kl {
                *m.entry("ref_kl".into()).or_default() += scale * k;
            }
        }
        let step = self.finish_step(&mut m, groups)?;
        Ok((m, step))
    }

    fn step_critic(
        &mut self,
        b: TrainBatch,
        groups: &mut Groups,
    ) -> RoleResult<(BTreeMap<String, f64>, u64)> {
        b.seqs.check(self.dir.model.config.vocab_size as i64)?;
        let dev = self.dir.model.device();
        let old_v = need(&b.old_values, "old_values", "the critic's TrainStep")?;
        let ret = need(&b.returns, "returns", "the critic's TrainStep")?;
        let cfg = self.spec.value_loss.clone();
        let parts = micro_batches(
            &b.response_mask,
            self.spec.micro_batch_size,
            cfg.agg,
            b.minibatch,
        )?;
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        self.begin_step(groups)?;
        for (start, n, scale) in parts {
            let s = b.seqs.rows(start, n)?.to(dev)?;
            let rows = |t: &Tensor| -> RoleResult<Tensor> {
                Ok(t.f_narrow(0, start, n)?.f_to_device(dev)?)
            };
            let (mask, old_v, ret) = (rows(&b.response_mask)?, rows(old_v)?, rows(ret)?);
            let (model, from) = (&self.dir.model, s.prompt_width - 1);
            let (ids, attention) = (&s.input_ids, &s.attention_mask);
            let (v, ckpt) = if self.spec.gradient_checkpointing {
                let (v, c) = token_values_checkpointed(model, ids, attention, from)?;
                (v, Some(c))
            } else {
                (token_values(model, ids, attention, from)?, None)
            };
            let v = v.f_narrow(1, 0, s.response_len)?.f_to_kind(Kind::Float)?;
            let out = value_loss(
                &cfg,
                &ValueLossInputs {
                    values: &v,
                    old_values: &old_v,
                    returns: &ret,
                    response_mask: &mask.f_to_kind(Kind::Float)?,
                },
            )?;
            (out.loss * (scale * self.loss_scale())).f_backward()?;
            // See step_actor: the decoder layers' share of the backward.
            if let Some(c) = ckpt {
                c.backward()?;
            }
            self.accumulate(groups)?;
            let vm = out.metrics;
            *m.entry("value_loss".into()).or_default() += scale * vm.value_loss;
            *m.entry("value_clip_frac".into()).or_default() += scale * vm.clip_frac;
            *m.entry("explained_variance".into()).or_default() += scale * vm.explained_variance;
            *m.entry("value_mean".into()).or_default() += scale * vm.value_mean;
        }
        let step = self.finish_step(&mut m, groups)?;
        Ok((m, step))
    }

    const OPTIMIZER_FILE: &'static str = "optimizer.safetensors";
    const STATE_FILE: &'static str = "trainer_state.json";

    /// Writes the checkpoint: the model in HF layout, the full optimizer state and the step.
    /// With sharded state every replica takes part in gathering it (the coordinator sends
    /// SaveState to all of them); only rank 0 writes, the others return no files.
    fn save(&mut self, dir: &Path, groups: &mut Groups) -> RoleResult<Vec<String>> {
        self.ensure_layout(groups)?;
        let state = if self.sharded(groups) {
            let total = self.opt.total();
            let flat = self.opt.flat_state()?;
            let mut full: Vec<Tensor> = Vec::with_capacity(3);
            for t in &flat {
                full.push(groups.all_gather_flat(&t.f_to_kind(Kind::Float)?, total)?);
            }
            let full: [Tensor; 3] = full
                .try_into()
                .map_err(|_| RoleError::bad("state", "three state tensors".into()))?;
            self.opt.named_state(&full)?
        } else {
            self.opt.state_tensors()?
        };
        if groups.grad_rank().0 != 0 {
            return Ok(vec![]);
        }
        std::fs::create_dir_all(dir).map_err(|e| RoleError::io(dir, e))?;
        self.dir.save(&self.source, dir, &SaveOptions::default())?;
        if self.dir.model.lora().is_some() {
            // PEFT's adapter_config.json + adapter_model.safetensors beside the (frozen) base.
            let base = self.source.to_string_lossy();
            self.dir.model.save_lora(dir, Some(&base))?;
        }
        let path = dir.join(Self::OPTIMIZER_FILE);
        Tensor::write_safetensors(&state, &path)
            .map_err(|e| RoleError::bad("state", format!("{}: {e}", path.display())))?;
        let mut json = serde_json::json!({ "optimizer_step": self.step });
        if let Some(s) = &self.scaler {
            json["loss_scale"] = s.scale().into();
            json["loss_scale_good_steps"] = s.good_steps().into();
        }
        std::fs::write(dir.join(Self::STATE_FILE), json.to_string())
            .map_err(|e| RoleError::io(&dir.join(Self::STATE_FILE), e))?;
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| RoleError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        files.sort();
        Ok(files)
    }

    fn load(&mut self, dir: &Path, groups: &mut Groups) -> RoleResult<Vec<String>> {
        self.ensure_layout(groups)?;
        let opts = LoadOptions {
            device: self.dir.model.device(),
            dtype: Some(self.dir.model.kind()),
            head: Some(self.dir.model.config.head),
            seed: 0,
        };
        let loaded = rlhf_model::Model::load(dir, &opts)?;
        let new: Vec<(String, Tensor)> = loaded.named_tensors();
        let mut vars = self.dir.model.named_tensors();
        let _g = tch::no_grad_guard();
        for ((name, var), (n2, src)) in vars.iter_mut().zip(&new) {
            if name != n2 {
                return Err(RoleError::bad(
                    "state",
                    format!(
                        "{}: tensor `{n2}` where `{name}` was expected",
                        dir.display()
                    ),
                ));
            }
            var.f_copy_(src)?;
        }
        drop(_g);
        let mut files = vec!["config.json".to_string()];
        if self.dir.model.lora().is_some() {
            // In place: the optimizer holds these tensors.
            self.dir.model.load_lora(dir)?;
            files.extend([
                rlhf_model::lora::ADAPTER_CONFIG.to_string(),
                rlhf_model::lora::ADAPTER_WEIGHTS.to_string(),
            ]);
        }
        let opt_path = dir.join(Self::OPTIMIZER_FILE);
        let state = Tensor::read_safetensors(&opt_path)
            .map_err(|e| RoleError::bad("state", format!("{}: {e}", opt_path.display())))?;
        self.opt
            .load_state_tensors(&state)
            .map_err(|e| RoleError::bad("state", format!("{}: {e}", opt_path.display())))?;
        let path = dir.join(Self::STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| RoleError::io(&path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| RoleError::bad("state", format!("{}: {e}", path.display())))?;
        self.step = v["optimizer_step"].as_u64().ok_or_else(|| {
            RoleError::bad(
                "state",
                format!("{}: `optimizer_step` missing", path.display()),
            )
        })?;
        if let (Some(s), Some(scale)) = (&mut self.scaler, v["loss_scale"].as_f64()) {
            *s = LossScaler::resume(scale, v["loss_scale_good_steps"].as_u64().unwrap_or(0))?;
        }
        files.extend([Self::OPTIMIZER_FILE.into(), Self::STATE_FILE.into()]);
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use rlhf_model::init::{init_model, InitSpec, Preset};
    use rlhf_model::Family;

    use super::*;

    /// One actor and one critic `TrainStep` with `train.gradient_checkpointing` off and on,
    /// from the same weights: the same losses and gradient norms and the same updated weights.
    /// Four rows, two per prompt (one prompt left-padded), two micro-batches, so the shared
    /// prefix path and gradient accumulation both run.
    #[test]
    fn checkpointed_train_steps_equal_the_plain_ones() {
        let tmp = tempfile::tempdir().unwrap();
        init_model(&InitSpec::new(Family::Llama, Preset::Tiny), tmp.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let t = |v: &[i64], shape: [i64; 2]| Tensor::from_slice(v).view(shape);
        let f = |v: &[f32]| Tensor::from_slice(v).view([4, 3]);
        let input_ids = t(
            &[
                0, 7, 8, 9, 20, 21, 22, //
                10, 11, 12, 13, 23, 24, 0, //
                0, 7, 8, 9, 25, 26, 0, //
                10, 11, 12, 13, 27, 28, 29,
            ],
            [4, 7],
        );
        let attention_mask = t(
            &[
                0, 1, 1, 1, 1, 1, 1, //
                1, 1, 1, 1, 1, 1, 0, //
                0, 1, 1, 1, 1, 1, 0, //
                1, 1, 1, 1, 1, 1, 1,
            ],
            [4, 7],
        );
        let response_mask = attention_mask.narrow(1, 4, 3).copy();
        let batch = || TrainBatch {
            seqs: Seqs {
                input_ids: input_ids.copy(),
                attention_mask: attention_mask.copy(),
                prompt_width: 4,
                response_len: 3,
            },
            response_mask: response_mask.copy(),
            advantages: Some(f(&[
                1.0, -0.5, 0.3, -1.0, 0.2, 0.0, 0.7, 0.1, 0.0, -0.3, 0.4, 0.9,
            ])),
            old_logprobs: Some(Tensor::full([4, 3], -6.0, (Kind::Float, Device::Cpu))),
            ref_logprobs: None,
            old_values: Some(Tensor::zeros([4, 3], (Kind::Float, Device::Cpu))),
            returns: Some(f(&[
                0.5, 0.1, -0.2, 0.3, 0.9, 0.0, -0.4, 0.2, 0.0, 0.6, -0.1, 0.8,
            ])),
            minibatch: None,
        };
        let step = |critic: bool, gradient_checkpointing: bool| {
            let spec = TrainerSpec {
                policy_loss: PolicyLossConfig::default(),
                value_loss: ValueLossConfig::default(),
                optim: OptimizerConfig {
                    lr: 1e-3,
                    ..OptimizerConfig::default()
                },
                total_steps: 0,
                micro_batch_size: 2,
                gradient_checkpointing,
                temperature: 1.0,
                kl_loss: None,
                precision: Precision::Mixed,
                zero_stage: 0,
                lora: None,
            };
            let detail = if critic {
                RoleDetail::Critic(spec)
            } else {
                RoleDetail::Actor(spec)
            };
            let (mut role, _) = Role::create(&RoleSpec {
                role_id: "r".into(),
                model_path: tmp.path().to_path_buf(),
                device: Device::Cpu,
                dtype: Kind::Float,
                seed: 1,
                detail,
            })
            .unwrap();
            let mut groups = Groups::new(rt.handle().clone());
            let (metrics, _) = role.train_step(batch(), &mut groups).unwrap();
            let weights = role.weights_dir().unwrap().model.named_tensors();
            (metrics, weights)
        };
        for critic in [false, true] {
            let (plain, ckpt) = (step(critic, false), step(critic, true));
            assert_eq!(
                plain.0.keys().collect::<Vec<_>>(),
                ckpt.0.keys().collect::<Vec<_>>()
            );
            for (k, a) in &plain.0 {
                let b = ckpt.0[k];
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                    "critic {critic}: {k} {a} vs {b}"
                );
            }
            assert!(plain.0["grad_norm"] > 0.0);
            for ((name, a), (_, b)) in plain.1.iter().zip(&ckpt.1) {
                // An AdamW step moves each weight by about lr = 1e-3; the runs agree far
                // closer than that.
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d < 1e-6, "critic {critic}: {name} differs by {d}");
            }
        }
    }

    #[test]
    fn forwards_take_as_many_rows_as_the_output_budget_allows() {
        // The RLOO bench: 32 rows x 32 response positions x 4096 vocabulary, all at once.
        assert_eq!(rows_per_forward(32, 32 * 4096), 32);
        // 1024 positions over a 152k vocabulary: one row per forward, never zero.
        assert_eq!(rows_per_forward(64, 1024 * 152_064), 1);
        // In between: as many rows as fit in 2^26 elements.
        assert_eq!(rows_per_forward(100, 512 * 32_000), 4);
        assert_eq!(rows_per_forward(0, 10), 1);
    }

    /// An actor with `models.lora`: one train step moves the adapters only, sync/digest
    /// weights are the merged ones, save writes PEFT's files and load restores the adapters.
    #[test]
    fn a_lora_actor_trains_saves_and_restores_its_adapters_only() {
        let tmp = tempfile::tempdir().unwrap();
        let model_dir = tmp.path().join("policy");
        let init = rlhf_model::init::InitSpec::new(
            rlhf_model::Family::Llama,
            rlhf_model::init::Preset::Tiny,
        );
        rlhf_model::init::init_model(&init, &model_dir).unwrap();
        let spec = RoleSpec {
            role_id: "actor-0".into(),
            model_path: model_dir.clone(),
            device: Device::Cpu,
            dtype: Kind::Float,
            seed: 7,
            detail: RoleDetail::Actor(TrainerSpec {
                policy_loss: PolicyLossConfig::default(),
                value_loss: ValueLossConfig::default(),
                optim: OptimizerConfig::default(),
                total_steps: 0,
                micro_batch_size: 2,
                temperature: 1.0,
                kl_loss: None,
                gradient_checkpointing: false,
                precision: Precision::Mixed,
                zero_stage: 0,
                lora: Some(LoraConfig::new(
                    4,
                    8.0,
                    0.1,
                    vec![rlhf_model::Target::Q, rlhf_model::Target::Up],
                )),
            }),
        };
        let (mut role, _) = Role::create(&spec).unwrap();
        let Role::Actor(t) = &role else {
            panic!("not an actor")
        };
        let copy = |v: Vec<(String, Tensor)>| -> Vec<(String, Tensor)> {
            v.into_iter().map(|(n, t)| (n, t.detach().copy())).collect()
        };
        let base = copy(t.dir.model.named_tensors());
        let adapters = copy(t.dir.model.trainable_tensors());
        assert!(adapters.iter().all(|(n, _)| n.contains(".lora_")));

        let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).view([2, 6]);
        let batch = TrainBatch {
            seqs: Seqs {
                input_ids: ids.shallow_clone(),
                attention_mask: ids.ones_like(),
                prompt_width: 3,
                response_len: 3,
            },
            response_mask: Tensor::ones([2, 3], (Kind::Bool, Device::Cpu)),
            advantages: Some(Tensor::ones([2, 3], (Kind::Float, Device::Cpu))),
            old_logprobs: Some(Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))),
            ref_logprobs: None,
            old_values: None,
            returns: None,
            minibatch: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut groups = Groups::new(rt.handle().clone());
        role.train_step(batch, &mut groups).unwrap();
        let Role::Actor(t) = &role else {
            panic!("not an actor")
        };
        let same = |a: &[(String, Tensor)], b: &[(String, Tensor)]| {
            a.len() == b.len() && a.iter().zip(b).all(|((_, x), (_, y))| x.equal(y))
        };
        assert!(same(&base, &t.dir.model.named_tensors()), "base moved");
        let trained = copy(t.dir.model.trainable_tensors());
        assert!(!same(&adapters, &trained), "adapters did not move");
        // Generators and digests get the merged weights, which now differ from the base.
        let merged = role.weights("SyncWeights").unwrap();
        assert_eq!(merged.len(), base.len());
        assert!(!same(&base, &merged));
        assert!(role.import_weights(merged).is_err());

        let ckpt = tmp.path().join("ckpt");
        let files = role.save_state(&ckpt, &mut groups).unwrap();
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "model.safetensors",
        ] {
            assert!(files.contains(&f.to_string()), "{f} not in {files:?}");
        }
        let Role::Actor(t) = &role else {
            panic!("not an actor")
        };
        tch::no_grad(|| {
            for (_, mut v) in t.dir.model.trainable_tensors() {
                let _ = v.fill_(0.5);
            }
        });
        let loaded = role.load_state(&ckpt, &mut groups).unwrap();
        assert!(loaded.contains(&"adapter_model.safetensors".to_string()));
        let Role::Actor(t) = &role else {
            panic!("not an actor")
        };
        assert!(
            same(&trained, &t.dir.model.trainable_tensors()),
            "not restored"
        );
    }
}
