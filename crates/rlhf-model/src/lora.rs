//! LoRA: trainable low-rank adapters on the attention and MLP projections of a [`Model`],
//! `y = W x (+ b) + (alpha / rank) · B A dropout(x)`, with the base weights frozen.
//!
//! Paper: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"
//! (arXiv:2106.09685). Reference implementation: PEFT's `peft/tuners/lora/layer.py` (`Linear`:
//! `lora_A` kaiming-uniform with a = √5, `lora_B` zeros, `scaling = lora_alpha / r`, dropout on
//! the adapter's input only) and `peft/utils/save_and_load.py` for the files; the integration
//! test `tests/peft.rs` loads our files with `peft` and theirs with us and compares logits.
//!
//! The adapters live in a `VarStore` of their own whose paths are the module paths of the base
//! model (`model.layers.0.self_attn.q_proj.lora_A.weight`), so [`Model::named_tensors`] stays the
//! base model's (what `Model::save` writes) and [`Model::trainable_tensors`] is what an optimizer
//! gets. PEFT's saved keys are these names behind `base_model.model.` (no adapter name).
//!
//! **Invariant:** with adapters on, every forward path (the layer loop, the feature-major decode
//! step and the packed CPU kernels, which get the merged weights `W + scale · B A`) computes the
//! same function as the merged model; with adapters off, the base model's.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::error::{read_json, write_atomic, ModelError, Result};
use crate::llama::{global_rng_lock, Model, SaveOptions};
use crate::weights;

/// PEFT's file names (`peft.utils.constants`).
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The prefix `PeftModelForCausalLM` puts in front of the base model's module paths.
const PEFT_PREFIX: &str = "base_model.model.";

/// A projection that can carry an adapter; named as in PEFT's `target_modules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module name, as in `target_modules` (`q_proj`, ..., `down_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The names [`Target::parse`] accepts, for error messages.
    pub fn known() -> String {
        Target::ALL.map(Target::name).join(", ")
    }

    pub fn parse(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Path below `model.layers.N`.
    pub(crate) fn module(self) -> String {
        let block = match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        };
        format!("{block}.{}", self.name())
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// What adapters to attach: PEFT's `LoraConfig` fields that this crate implements.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `r`: the inner dimension of `B A`. At least 1.
    pub rank: usize,
    /// `lora_alpha`: the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// `lora_dropout`: dropout probability on the adapter's input, in training only.
    pub dropout: f64,
    /// `target_modules`: the projections that get adapters, in every layer.
    pub targets: Vec<Target>,
    /// `use_rslora`: scale by `alpha / sqrt(rank)` instead (read from PEFT files; false when
    /// we create adapters).
    pub use_rslora: bool,
}

impl LoraConfig {
    pub fn new(rank: usize, alpha: f64, dropout: f64, targets: Vec<Target>) -> LoraConfig {
        LoraConfig {
            rank,
            alpha,
            dropout,
            targets,
            use_rslora: false,
        }
    }

    /// The factor on `B A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(ModelError::invalid("lora.rank", 0, "must be at least 1"));
        }
        if !self.alpha.is_finite() {
            return Err(ModelError::invalid(
                "lora.alpha",
                self.alpha,
                "must be finite",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::invalid(
                "lora.dropout",
                self.dropout,
                "must be in [0, 1)",
            ));
        }
        if self.targets.is_empty() {
            return Err(ModelError::invalid(
                "lora.targets",
                "[]",
                format!("name at least one of {}", Target::known()),
            ));
        }
        Ok(())
    }
}

/// One projection's adapter as a forward sees it: `scale · B A dropout(x)`.
#[derive(Clone, Copy)]
pub(crate) struct Adapter<'a> {
    /// (rank, in)
    a: &'a Tensor,
    /// (out, rank)
    b: &'a Tensor,
    scale: f64,
    /// 0 outside training.
    dropout: f64,
}

impl Adapter<'_> {
    fn input(&self, x: &Tensor) -> Tensor {
        if self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        }
    }

    /// The update for a row-major (.., in) `x`: (.., out). The same op order as PEFT's
    /// `lora_B(lora_A(dropout(x))) * scaling`.
    pub(crate) fn delta(&self, x: &Tensor) -> Tensor {
        self.input(x)
            .linear::<Tensor>(self.a, None)
            .linear::<Tensor>(self.b, None)
            * self.scale
    }

    /// The update for a feature-major (in, rows) `x_t`: (out, rows).
    pub(crate) fn delta_fm(&self, x_t: &Tensor) -> Tensor {
        self.b.mm(&self.a.mm(&self.input(x_t))) * self.scale
    }

    /// `w + scale · B A`, the merged (out, in) weight (PEFT's `merge`).
    pub(crate) fn merged(&self, w: &Tensor) -> Tensor {
        w + self.b.mm(self.a) * self.scale
    }
}

/// The adapters of one decoder layer, indexed by [`Target::index`]; all `None` when the model
/// has none or they are switched off.
pub(crate) struct LayerAdapters<'a>([Option<Adapter<'a>>; 7]);

impl<'a> LayerAdapters<'a> {
    pub(crate) const NONE: LayerAdapters<'static> = LayerAdapters([None; 7]);

    pub(crate) fn get(&self, t: Target) -> Option<&Adapter<'a>> {
        self.0[t.index()].as_ref()
    }
}

/// The adapters attached to a model ([`Model::add_lora`], [`Model::load_lora`]).
pub struct Lora {
    config: LoraConfig,
    vs: nn::VarStore,
    /// Per layer, per [`Target::index`]: (A (rank, in), B (out, rank)).
    layers: Vec<[Option<(Tensor, Tensor)>; 7]>,
    /// Off: every forward is the base model's (the reference policy without a second copy).
    enabled: AtomicBool,
    /// On: dropout applies (set by the trainer around its training forwards).
    training: AtomicBool,
}

impl Lora {
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Every adapter tensor with its module path (`model.layers.0.self_attn.q_proj.lora_A.weight`),
    /// sorted by name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn dropout_now(&self) -> f64 {
        if self.training.load(Ordering::Relaxed) {
            self.config.dropout
        } else {
            0.0
        }
    }

    pub(crate) fn layer(&self, i: usize) -> LayerAdapters<'_> {
        if !self.enabled() {
            return LayerAdapters::NONE;
        }
        let (scale, dropout) = (self.config.scale(), self.dropout_now());
        let Some(layer) = self.layers.get(i) else {
            return LayerAdapters::NONE;
        };
        LayerAdapters(std::array::from_fn(|k| {
            layer[k].as_ref().map(|(a, b)| Adapter {
                a,
                b,
                scale,
                dropout,
            })
        }))
    }

    /// Whether the adapters would record an autograd graph now (on, gradients enabled, the
    /// adapters requiring them).
    pub(crate) fn builds_graph(&self) -> bool {
        self.enabled()
            && self
                .layers
                .iter()
                .flatten()
                .flatten()
                .next()
                .is_some_and(|(a, _)| (a * 1.0).requires_grad())
    }

    /// Whether the packed no-grad kernels can stand in for the adapters (merged weights): not
    /// while dropout is active, which is random per call.
    pub(crate) fn packable(&self) -> bool {
        !self.enabled() || self.dropout_now() == 0.0
    }
}

/// `adapter_config.json` as PEFT writes it, the fields we write and the ones we must check on
/// read; PEFT's other fields (dozens, varying by version) are ignored on read.
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfigJson {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: serde_json::Value,
    #[serde(default = "none_str")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    init_lora_weights: serde_json::Value,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    layers_to_transform: serde_json::Value,
    #[serde(default)]
    layers_pattern: serde_json::Value,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

fn none_str() -> String {
    "none".into()
}

impl PeftConfigJson {
    fn from_config(c: &LoraConfig, base: Option<&str>) -> PeftConfigJson {
        PeftConfigJson {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: base.map(str::to_string),
            r: c.rank,
            lora_alpha: c.alpha,
            lora_dropout: c.dropout,
            target_modules: c.targets.iter().map(|t| t.name()).collect(),
            bias: none_str(),
            fan_in_fan_out: false,
            use_rslora: c.use_rslora,
            use_dora: false,
            lora_bias: false,
            init_lora_weights: true.into(),
            inference_mode: true,
            modules_to_save: None,
            layers_to_transform: serde_json::Value::Null,
            layers_pattern: serde_json::Value::Null,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
        }
    }

    /// Our config, or an error naming the key of a feature this crate does not implement.
    fn to_config(&self, path: &Path) -> Result<LoraConfig> {
        let bad = |key: &str, msg: String| Err(ModelError::config(path, key, msg));
        if self.peft_type != "LORA" {
            return bad("peft_type", format!("{:?} is not LORA", self.peft_type));
        }
        if self.bias != "none" {
            return bad(
                "bias",
                format!("{:?}: only \"none\" is supported", self.bias),
            );
        }
        let unsupported = [
            ("fan_in_fan_out", self.fan_in_fan_out),
            ("use_dora", self.use_dora),
            ("lora_bias", self.lora_bias),
            ("rank_pattern", !self.rank_pattern.is_empty()),
            ("alpha_pattern", !self.alpha_pattern.is_empty()),
            ("layers_to_transform", !self.layers_to_transform.is_null()),
            ("layers_pattern", !self.layers_pattern.is_null()),
            (
                "modules_to_save",
                self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()),
            ),
        ];
        if let Some((key, _)) = unsupported.iter().find(|(_, on)| *on) {
            return bad(
                key,
                "not supported by rlhf-model's LoRA (docs/lora.md)".into(),
            );
        }
        let names: Vec<String> = match &self.target_modules {
            serde_json::Value::Array(v) => v
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .unwrap_or_default(),
            // A string is a regex in PEFT; only a plain module name is accepted here.
            serde_json::Value::String(s) => vec![s.clone()],
            _ => vec![],
        };
        let mut targets = names
            .iter()
            .map(|n| {
                Target::parse(n).ok_or_else(|| {
                    ModelError::config(
                        path,
                        "target_modules",
                        format!(
                            "{n:?} is not one of {} (regexes are not supported)",
                            Target::known()
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        targets.sort();
        targets.dedup();
        let c = LoraConfig {
            rank: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            use_rslora: self.use_rslora,
        };
        c.validate()
            .map_err(|e| ModelError::config(path, "(lora)", e.to_string()))?;
        Ok(c)
    }
}

impl Model {
    /// Attaches fresh adapters (A kaiming-uniform as PEFT initialises it, B zeros, so the model
    /// computes what it did) drawn with `seed`, and freezes the base weights: from now on
    /// [`Model::trainable_tensors`] are the adapters only.
    pub fn add_lora(&mut self, config: LoraConfig, seed: i64) -> Result<()> {
        config.validate()?;
        if self.lora.is_some() {
            return Err(ModelError::invalid(
                "lora",
                "add_lora",
                "this model already has adapters",
            ));
        }
        let mut targets = config.targets.clone();
        targets.sort();
        targets.dedup();
        let config = LoraConfig { targets, ..config };
        let r = config.rank as i64;
        let mut vs = nn::VarStore::new(self.device());
        let root = vs.root();
        let layers = {
            let _rng = global_rng_lock();
            tch::manual_seed(seed);
            (0..self.config.num_hidden_layers)
                .map(|i| {
                    let mut slots: [Option<(Tensor, Tensor)>; 7] = Default::default();
                    for &t in &config.targets {
                        let (out, inp) = self.projection(i, t).ws.size2()?;
                        let p = &root / "model" / "layers" / i;
                        let p = t.module().split('.').fold(p, |p, s| &p / s);
                        // kaiming_uniform_(a = sqrt(5)): gain sqrt(2 / (1 + 5)), bound
                        // gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
                        let bound = 1.0 / (inp as f64).sqrt();
                        let a = (&p / "lora_A").var(
                            "weight",
                            &[r, inp],
                            nn::Init::Uniform {
                                lo: -bound,
                                up: bound,
                            },
                        );
                        let b = (&p / "lora_B").var("weight", &[out, r], nn::Init::Const(0.0));
                        slots[t.index()] = Some((a, b));
                    }
                    Ok(slots)
                })
                .collect::<Result<Vec<_>>>()?
        };
        if self.kind() != Kind::Float {
            vs.set_kind(self.kind());
        }
        self.var_store_mut().freeze();
        self.lora = Some(Lora {
            config,
            vs,
            layers,
            enabled: AtomicBool::new(true),
            training: AtomicBool::new(false),
        });
        Ok(())
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// What an optimizer should update: the adapters when the model has them, else every weight.
    pub fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        match &self.lora {
            Some(l) => l.named_tensors(),
            None => self.named_tensors(),
        }
    }

    /// Switches the adapters on or off (off: the base model, e.g. the reference policy's
    /// log-probs from the actor). Returns the previous state; no-op without adapters.
    pub fn set_adapters_enabled(&self, on: bool) -> bool {
        self.lora
            .as_ref()
            .is_some_and(|l| l.enabled.swap(on, Ordering::Relaxed))
    }

    /// Training mode for the adapters: dropout applies while on. Returns the previous state.
    pub fn set_lora_training(&self, on: bool) -> bool {
        self.lora
            .as_ref()
            .is_some_and(|l| l.training.swap(on, Ordering::Relaxed))
    }

    /// Layer `i`'s adapters as the forwards use them (none when off or absent).
    pub(crate) fn adapters(&self, i: usize) -> LayerAdapters<'_> {
        match &self.lora {
            Some(l) => l.layer(i),
            None => LayerAdapters::NONE,
        }
    }

    /// [`Model::named_tensors`] with every adapted projection's weight merged (`W + scale · B
    /// A`), detached: the weights of the equivalent plain model. The base weights when the
    /// adapters are off or absent.
    pub fn merged_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let _guard = tch::no_grad_guard();
        let mut named = self.named_tensors();
        let Some(lora) = self.lora.as_ref().filter(|l| l.enabled()) else {
            return Ok(named);
        };
        let scale = lora.config.scale();
        for (i, layer) in lora.layers.iter().enumerate() {
            for t in Target::ALL {
                let Some((a, b)) = &layer[t.index()] else {
                    continue;
                };
                let name = format!("model.layers.{i}.{}.weight", t.module());
                let slot = named.iter_mut().find(|(n, _)| *n == name).ok_or_else(|| {
                    ModelError::invalid("lora", name.clone(), "no such base weight (a bug)")
                })?;
                let ad = Adapter {
                    a,
                    b,
                    scale,
                    dropout: 0.0,
                };
                slot.1 = ad.merged(&slot.1);
            }
        }
        Ok(named)
    }

    /// [`Model::save`] of the merged model ([`Model::merged_tensors`]): a plain HF checkpoint
    /// that any loader reads without PEFT.
    pub fn save_merged(&self, dir: &Path, opts: &SaveOptions) -> Result<()> {
        let kind = opts.dtype.unwrap_or(self.kind());
        weights::save(dir, &self.merged_tensors()?, kind, opts.max_shard_bytes)?;
        self.save_config(dir, kind)
    }

    /// Writes the adapters in PEFT's layout: `DIR/adapter_config.json` and
    /// `DIR/adapter_model.safetensors` (keys `base_model.model.<module>.lora_{A,B}.weight`, in
    /// the model's dtype), both atomically. `base` goes to `base_model_name_or_path`.
    pub fn save_lora(&self, dir: &Path, base: Option<&str>) -> Result<()> {
        let lora = self.lora.as_ref().ok_or_else(|| {
            ModelError::invalid("lora", "save_lora", "this model has no adapters")
        })?;
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let named: Vec<(String, Tensor)> = lora
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t))
            .collect();
        weights::save_file(&dir.join(ADAPTER_WEIGHTS), &named, self.kind())?;
        let path = dir.join(ADAPTER_CONFIG);
        let json = serde_json::to_vec_pretty(&PeftConfigJson::from_config(&lora.config, base))
            .map_err(|e| ModelError::config(&path, "(all)", e.to_string()))?;
        write_atomic(&path, &json)
    }

    /// Reads adapters saved by [`Model::save_lora`] or PEFT's `save_pretrained` from `dir`.
    /// Without adapters the model gets them (base frozen); with adapters of the same rank and
    /// targets their values are replaced in place (an optimizer holding them keeps working).
    /// Every tensor's presence and shape is checked before any is copied.
    pub fn load_lora(&mut self, dir: &Path) -> Result<()> {
        let cpath = dir.join(ADAPTER_CONFIG);
        let file: PeftConfigJson = read_json(&cpath)?;
        let config = file.to_config(&cpath)?;
        let wpath = dir.join(ADAPTER_WEIGHTS);
        let files = weights::WeightFiles::open_file(&wpath)?;
        match &self.lora {
            None => self.add_lora(config.clone(), 0)?,
            Some(l) if l.config.rank == config.rank && l.config.targets == config.targets => {}
            Some(l) => {
                return Err(ModelError::config(
                    &cpath,
                    "r",
                    format!(
                        "adapters of rank {} on {:?} do not fit this model's rank {} on {:?}",
                        config.rank, config.targets, l.config.rank, l.config.targets
                    ),
                ))
            }
        }
        let lora = self.lora.as_mut().ok_or_else(|| {
            ModelError::invalid("lora", "load_lora", "adapters missing after add (a bug)")
        })?;
        lora.config = config;
        let vars = lora.named_tensors();
        let mut loaded = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            let key = format!("{PEFT_PREFIX}{name}");
            let t = files.read(&key)?;
            if t.size() != var.size() {
                return Err(ModelError::tensor(
                    &wpath,
                    &key,
                    format!("shape {:?}, expected {:?}", t.size(), var.size()),
                ));
            }
            loaded.push(t);
        }
        let expected: std::collections::HashSet<String> = vars
            .iter()
            .map(|(n, _)| format!("{PEFT_PREFIX}{n}"))
            .collect();
        if let Some(extra) = files.names().find(|n| !expected.contains(*n)) {
            return Err(ModelError::tensor(
                &wpath,
                extra,
                "not an adapter of this model's layers and targets",
            ));
        }
        tch::no_grad(|| {
            for ((_, var), t) in vars.iter().zip(&loaded) {
                let mut var = var.shallow_clone();
                var.f_copy_(t)?;
            }
            Ok::<(), ModelError>(())
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HfConfig;
    use crate::generate::{generate, GenerationConfig};
    use tch::Device;

    fn tiny(vocab: usize) -> crate::Config {
        let hf: HfConfig = serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64,
            "tie_word_embeddings": false
        }))
        .unwrap();
        hf.resolve(Path::new("config.json")).unwrap()
    }

    fn all_targets(rank: usize) -> LoraConfig {
        LoraConfig::new(rank, 16.0, 0.0, Target::ALL.to_vec())
    }

    /// Makes every B non-zero (fresh adapters compute nothing).
    fn randomize_b(model: &Model, seed: i64) {
        let lora = model.lora().expect("adapters");
        tch::no_grad(|| {
            for (k, (name, mut t)) in lora.named_tensors().into_iter().enumerate() {
                if name.contains("lora_B") {
                    t.copy_(&(crate::llama::seeded_randn(&t.size(), seed + k as i64) * 0.05));
                }
            }
        });
    }

    /// A plain model holding `m`'s merged weights.
    fn merged_copy(m: &Model) -> Model {
        let plain = Model::new(m.config.clone(), Device::Cpu, Kind::Float, 99).unwrap();
        tch::no_grad(|| {
            let merged = m.merged_tensors().unwrap();
            for ((n1, mut dst), (n2, src)) in plain.named_tensors().into_iter().zip(merged) {
                assert_eq!(n1, n2);
                dst.copy_(&src);
            }
        });
        plain
    }

    /// Two left-padded rows.
    fn batch() -> (Tensor, Tensor) {
        let ids = Tensor::from_slice(&[0i64, 0, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6]).view([2, 6]);
        let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 6]);
        (ids, mask)
    }

    fn logits(m: &Model) -> Tensor {
        let (ids, mask) = batch();
        let real = mask.unsqueeze(2).to_kind(Kind::Float);
        m.logits(&m.forward_padded(&ids, &mask).unwrap()).unwrap() * real
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn fresh_adapters_leave_the_logits_unchanged() {
        let mut m = Model::new(tiny(50), Device::Cpu, Kind::Float, 1).unwrap();
        let base = logits(&m);
        m.add_lora(all_targets(4), 7).unwrap();
        assert_eq!(max_diff(&base, &logits(&m)), 0.0);
        // A is drawn (kaiming-uniform, |a| <= 1/sqrt(fan_in)), B is zero.
        for (name, t) in m.lora().unwrap().named_tensors() {
            let amax = t.abs().max().double_value(&[]);
            if name.contains("lora_A") {
                let fan_in = t.size()[1] as f64;
                assert!(amax > 0.0 && amax <= 1.0 / fan_in.sqrt(), "{name}: {amax}");
            } else {
                assert_eq!(amax, 0.0, "{name}");
            }
        }
    }

    #[test]
    fn adapters_equal_the_merged_model_and_off_equals_the_base() {
        let mut m = Model::new(tiny(50), Device::Cpu, Kind::Float, 2).unwrap();
        let base = logits(&m);
        m.add_lora(all_targets(4), 3).unwrap();
        randomize_b(&m, 10);
        let adapted = logits(&m);
        assert!(max_diff(&adapted, &base) > 1e-3, "adapters changed nothing");
        let d = max_diff(&adapted, &logits(&merged_copy(&m)));
        assert!(d < 1e-5, "adapters vs merged model: {d}");
        assert!(m.set_adapters_enabled(false));
        assert_eq!(max_diff(&logits(&m), &base), 0.0);
        // Off, the merged weights are the base ones.
        assert_eq!(max_diff(&logits(&merged_copy(&m)), &base), 0.0);
        assert!(!m.set_adapters_enabled(true));
        assert_eq!(max_diff(&logits(&m), &adapted), 0.0);
    }

    #[test]
    fn only_the_adapters_get_gradients() {
        let mut m = Model::new(tiny(50), Device::Cpu, Kind::Float, 4).unwrap();
        m.add_lora(
            LoraConfig::new(2, 4.0, 0.0, vec![Target::Q, Target::Down]),
            5,
        )
        .unwrap();
        randomize_b(&m, 20);
        let names: Vec<String> = m.trainable_tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 2 * 2 * 2, "{names:?}");
        assert_eq!(names[0], "model.layers.0.mlp.down_proj.lora_A.weight");
        assert!(names.contains(&"model.layers.1.self_attn.q_proj.lora_B.weight".into()));
        assert!(m.builds_graph(), "frozen base, trainable adapters: a graph");
        tch::no_grad(|| assert!(!m.builds_graph()));
        // 8 rows x 40 tokens: past the size where no-grad log-probs take the packed kernels.
        let ids = Tensor::arange(320, (Kind::Int64, Device::Cpu))
            .remainder(50)
            .view([8, 40]);
        let lp = || {
            crate::generate::token_logprobs_from(
                &m,
                &ids,
                &ids.ones_like(),
                0,
                1.0,
                crate::generate::Entropy::Off,
            )
            .unwrap()
            .logprobs
        };
        let with_graph = lp();
        // Without a graph (the packed kernels with merged weights, where the CPU has them).
        let without = tch::no_grad(lp);
        let d = max_diff(&with_graph.detach(), &without);
        assert!(d < 1e-5, "no-grad log-probs differ by {d}");
        with_graph.sum(Kind::Float).backward();
        for (name, t) in m.named_tensors() {
            assert!(!t.requires_grad(), "{name} is not frozen");
            assert!(!t.grad().defined(), "{name} got a gradient");
        }
        for (name, t) in m.trainable_tensors() {
            let g = t.grad();
            assert!(
                g.defined() && g.abs().max().double_value(&[]) > 0.0,
                "{name}: no gradient"
            );
        }
    }

    #[test]
    fn generation_with_adapters_equals_the_merged_model() {
        // vocab 64: the packed head too where the packed kernels apply.
        let mut m = Model::new(tiny(64), Device::Cpu, Kind::Float, 6).unwrap();
        m.add_lora(all_targets(8), 7).unwrap();
        randomize_b(&m, 30);
        let plain = merged_copy(&m);
        if crate::cpu_kernels::available(tch::get_num_threads().max(1) as usize) {
            assert!(
                m.pack_weights().is_some(),
                "adapters on: packed with merged weights"
            );
        }
        let prompts = vec![vec![1i64, 2, 3], vec![4, 5, 6, 7, 8], vec![9]];
        let cfg = GenerationConfig::greedy(12);
        let a = generate(&m, &prompts, &cfg).unwrap();
        let b = generate(&plain, &prompts, &cfg).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(a.sequences.view(-1)).unwrap(),
            Vec::<i64>::try_from(b.sequences.view(-1)).unwrap()
        );
        let d = max_diff(&a.response_logprobs, &b.response_logprobs);
        assert!(d < 1e-4, "generation log-probs differ by {d}");
        // Decode steps without packed weights (the feature-major path) match as well.
        let _g = tch::no_grad_guard();
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([2, 3]);
        let pos = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]).view([2, 3]);
        let (mut ca, mut cb) = (m.new_cache(2, 8).unwrap(), plain.new_cache(2, 8).unwrap());
        let _ = m.forward_hidden(&ids, &pos, None, Some(&mut ca)).unwrap();
        let _ = plain
            .forward_hidden(&ids, &pos, None, Some(&mut cb))
            .unwrap();
        let tok = Tensor::from_slice(&[7i64, 8]).view([2, 1]);
        let next = Tensor::from_slice(&[3i64, 3]).view([2, 1]);
        let ha = m.forward_hidden(&tok, &next, None, Some(&mut ca)).unwrap();
        let hb = plain
            .forward_hidden(&tok, &next, None, Some(&mut cb))
            .unwrap();
        let d = max_diff(&ha, &hb);
        assert!(d < 1e-5, "feature-major decode step differs by {d}");
    }

    #[test]
    fn dropout_applies_in_training_only() {
        let mut m = Model::new(tiny(64), Device::Cpu, Kind::Float, 8).unwrap();
        m.add_lora(LoraConfig::new(4, 8.0, 0.5, Target::ALL.to_vec()), 9)
            .unwrap();
        randomize_b(&m, 40);
        let eval = logits(&m);
        assert_eq!(
            max_diff(&eval, &logits(&m)),
            0.0,
            "no dropout outside training"
        );
        assert!(!m.set_lora_training(true));
        assert!(max_diff(&eval, &logits(&m)) > 1e-4, "dropout did nothing");
        assert!(m.pack_weights().is_none(), "packed kernels cannot drop out");
        m.set_lora_training(false);
        assert_eq!(max_diff(&eval, &logits(&m)), 0.0);
    }

    #[test]
    fn peft_files_round_trip_and_merged_save_loads_as_a_plain_model() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::new(tiny(50), Device::Cpu, Kind::Float, 11).unwrap();
        m.add_lora(
            LoraConfig::new(3, 6.0, 0.1, vec![Target::V, Target::Up]),
            12,
        )
        .unwrap();
        randomize_b(&m, 50);
        let want = logits(&m);
        m.save_lora(dir.path(), Some("base")).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(ADAPTER_CONFIG)).unwrap())
                .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 3);
        assert_eq!(
            cfg["target_modules"],
            serde_json::json!(["v_proj", "up_proj"])
        );
        assert_eq!(cfg["base_model_name_or_path"], "base");
        let files = weights::WeightFiles::open_file(&dir.path().join(ADAPTER_WEIGHTS)).unwrap();
        let mut names: Vec<&str> = files.names().collect();
        names.sort();
        assert_eq!(names.len(), 8);
        assert_eq!(
            names[0],
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
        );

        // Into a fresh copy of the base: same logits.
        let mut fresh = Model::new(tiny(50), Device::Cpu, Kind::Float, 11).unwrap();
        fresh.load_lora(dir.path()).unwrap();
        assert_eq!(fresh.lora().unwrap().config(), m.lora().unwrap().config());
        assert_eq!(max_diff(&logits(&fresh), &want), 0.0);
        // Into the model that has them (values replaced in place).
        randomize_b(&m, 60);
        m.load_lora(dir.path()).unwrap();
        assert_eq!(max_diff(&logits(&m), &want), 0.0);
        // Adapters of another rank are refused, naming the key.
        let mut other = Model::new(tiny(50), Device::Cpu, Kind::Float, 11).unwrap();
        other.add_lora(all_targets(2), 0).unwrap();
        let e = other.load_lora(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains("rank 3"),
            "{e}"
        );

        let merged = dir.path().join("merged");
        m.save_merged(&merged, &SaveOptions::default()).unwrap();
        let plain = Model::load(&merged, &crate::LoadOptions::default()).unwrap();
        assert!(plain.lora().is_none());
        let d = max_diff(&logits(&plain), &want);
        assert!(d < 1e-5, "merged checkpoint differs by {d}");
    }

    #[test]
    fn bad_configs_name_the_key() {
        let mut m = Model::new(tiny(50), Device::Cpu, Kind::Float, 0).unwrap();
        let e = m.add_lora(all_targets(0), 0).unwrap_err().to_string();
        assert!(e.contains("lora.rank"), "{e}");
        let e = m
            .add_lora(LoraConfig::new(2, 1.0, 0.0, vec![]), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora.targets") && e.contains("q_proj"), "{e}");
        assert!(m.lora().is_none());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(ADAPTER_CONFIG),
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["qkv"]}"#,
        )
        .unwrap();
        let e = m.load_lora(dir.path()).unwrap_err().to_string();
        assert!(e.contains("target_modules") && e.contains("qkv"), "{e}");
        std::fs::write(
            dir.path().join(ADAPTER_CONFIG),
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                "use_dora": true}"#,
        )
        .unwrap();
        let e = m.load_lora(dir.path()).unwrap_err().to_string();
        assert!(e.contains("use_dora"), "{e}");
    }
}
