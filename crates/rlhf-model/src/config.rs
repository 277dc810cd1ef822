//! Model configuration in two layers (as candle-transformers does): [`HfConfig`] mirrors
//! `config.json` with `Option`s and HF's defaults, and [`Config`] is the resolved, validated form
//! the model code uses, with no `Option`s left.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tch::{Device, Kind};

use crate::error::{read_json, ModelError, Result};

/// The decoder families this crate runs. They share one implementation; the differences are
/// flags resolved into [`Config`] (q/k/v bias for Qwen2, sliding window for Mistral).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
        }
    }

    fn class_prefix(self) -> &'static str {
        match self {
            Family::Llama => "Llama",
            Family::Mistral => "Mistral",
            Family::Qwen2 => "Qwen2",
        }
    }
}

/// What sits on top of the decoder trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// `lm_head` (or the tied embedding): next-token logits. `*ForCausalLM`.
    CausalLm,
    /// `score`: a bias-free linear layer with `num_labels` outputs per token, as in HF's
    /// `*ForSequenceClassification`. Used for value heads (1 output, read at every token) and
    /// reward heads (1 for Bradley-Terry, N for multi-attribute regression, read at the last
    /// non-pad token).
    Score { num_labels: usize },
}

impl HeadKind {
    /// The HF architecture class name for a family and head.
    pub fn architecture(self, family: Family) -> String {
        match self {
            HeadKind::CausalLm => format!("{}ForCausalLM", family.class_prefix()),
            HeadKind::Score { .. } => format!("{}ForSequenceClassification", family.class_prefix()),
        }
    }
}

/// Rotary-embedding frequency scaling, from `rope_scaling` in `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling (long wavelengths divided by `factor`, short ones kept,
    /// a smooth blend between `low_freq_factor` and `high_freq_factor`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// `config.json` as HF writes it. Unknown keys are kept in `extra` so that saving a loaded
/// model writes them back unchanged.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HfConfig {
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    /// Default: `num_attention_heads` (multi-head attention).
    pub num_key_value_heads: Option<usize>,
    /// Default: `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Default: 2048 (HF's `LlamaConfig`).
    pub max_position_embeddings: Option<usize>,
    /// Default: 1e-6.
    pub rms_norm_eps: Option<f64>,
    /// Default: 10000.
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    /// transformers ≥ 5: `rope_type`, its parameters and `rope_theta` in one object. Takes
    /// precedence over `rope_scaling` and `rope_theta`.
    pub rope_parameters: Option<Value>,
    /// transformers ≥ 5: per-layer attention kind; only `full_attention` is supported for
    /// Qwen2 (Mistral's window comes from `sliding_window`).
    pub layer_types: Option<Vec<String>>,
    /// Default: false.
    pub tie_word_embeddings: Option<bool>,
    /// Llama: bias on q/k/v/o projections. Default: false.
    pub attention_bias: Option<bool>,
    /// Llama: bias on the MLP projections. Default: false.
    pub mlp_bias: Option<bool>,
    /// Default: "silu"; nothing else is supported.
    pub hidden_act: Option<String>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<Value>,
    /// `torch_dtype` (transformers < 5) or `dtype` (transformers ≥ 5).
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    pub id2label: Option<Map<String, Value>>,
    pub num_labels: Option<usize>,
    pub initializer_range: Option<f64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The resolved configuration: validated, no `Option`s.
#[derive(Debug, Clone)]
pub struct Config {
    pub family: Family,
    pub head: HeadKind,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Keys at most this many positions back are visible (Mistral). `None`: full causal.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// The dtype the weights are stored in (`torch_dtype`); the model may run in another.
    pub dtype: Kind,
    pub initializer_range: f64,
    /// The file as read, so saving keeps keys this crate does not interpret.
    pub hf: HfConfig,
}

/// "cpu", "cuda" (device 0) or "cuda:N", as every command line and job file spells a device.
pub fn device_from_str(s: &str) -> Option<Device> {
    match s {
        "cpu" => Some(Device::Cpu),
        "cuda" => Some(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .map(Device::Cuda),
    }
}

pub fn kind_from_str(s: &str) -> Option<Kind> {
    match s {
        "float32" | "f32" | "float" => Some(Kind::Float),
        "bfloat16" | "bf16" => Some(Kind::BFloat16),
        "float16" | "f16" | "half" => Some(Kind::Half),
        _ => None,
    }
}

pub fn kind_to_str(k: Kind) -> &'static str {
    match k {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

fn token_ids(v: &Option<Value>, path: &Path, key: &str) -> Result<Vec<i64>> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Number(n)) => n.as_i64().map(|x| vec![x]).ok_or_else(|| {
            ModelError::config(path, key, format!("expected a token id, found {n}"))
        }),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_i64().ok_or_else(|| {
                    ModelError::config(path, key, format!("expected token ids, found {x}"))
                })
            })
            .collect(),
        Some(other) => Err(ModelError::config(
            path,
            key,
            format!("expected a token id or a list of them, found {other}"),
        )),
    }
}

impl HfConfig {
    pub fn load(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// Validates and resolves. `path` only serves error messages.
    pub fn resolve(&self, path: &Path) -> Result<Config> {
        let need = |v: Option<usize>, key: &str| -> Result<usize> {
            match v {
                Some(0) => Err(ModelError::config(path, key, "must be > 0, found 0")),
                Some(x) => Ok(x),
                None => Err(ModelError::config(path, key, "missing (required)")),
            }
        };
        let arch_name = match self.architectures.as_deref() {
            Some([a]) => a.clone(),
            Some(list) if list.len() > 1 => {
                return Err(ModelError::config(
                    path,
                    "architectures",
                    format!("expected one architecture, found {list:?}"),
                ))
            }
            _ => {
                // Older files carry only model_type; treat them as the causal LM of that family.
                match self.model_type.as_deref() {
                    Some("llama") => "LlamaForCausalLM".into(),
                    Some("mistral") => "MistralForCausalLM".into(),
                    Some("qwen2") => "Qwen2ForCausalLM".into(),
                    _ => {
                        return Err(ModelError::config(
                            path,
                            "architectures",
                            "missing, and `model_type` is not one of llama, mistral, qwen2",
                        ))
                    }
                }
            }
        };
        let (family, suffix) = [Family::Llama, Family::Mistral, Family::Qwen2]
            .into_iter()
            .find_map(|f| {
                arch_name
                    .strip_prefix(f.class_prefix())
                    .map(|rest| (f, rest.to_string()))
            })
            .ok_or_else(|| {
                ModelError::config(
                    path,
                    "architectures",
                    format!(
                        "unknown architecture {arch_name:?}; supported: LlamaForCausalLM, \
                         MistralForCausalLM, Qwen2ForCausalLM (and their \
                         ForSequenceClassification variants)"
                    ),
                )
            })?;
        let num_labels = match (&self.id2label, self.num_labels) {
            (Some(m), _) if !m.is_empty() => m.len(),
            (_, Some(n)) => n,
            _ => 1,
        };
        let head = match suffix.as_str() {
            "ForCausalLM" => HeadKind::CausalLm,
            "ForSequenceClassification" => HeadKind::Score { num_labels },
            _ => {
                return Err(ModelError::config(
                    path,
                    "architectures",
                    format!(
                        "unknown architecture {arch_name:?}; supported heads: ForCausalLM, \
                         ForSequenceClassification"
                    ),
                ))
            }
        };
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(ModelError::config(
                    path,
                    "hidden_act",
                    format!("only \"silu\" is supported, found {act:?}"),
                ));
            }
        }
        let hidden_size = need(self.hidden_size, "hidden_size")?;
        let num_attention_heads = need(self.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = need(
            Some(self.num_key_value_heads.unwrap_or(num_attention_heads)),
            "num_key_value_heads",
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::config(
                path,
                "num_key_value_heads",
                format!(
                    "must divide num_attention_heads = {num_attention_heads}, found \
                     {num_key_value_heads}"
                ),
            ));
        }
        let head_dim = match self.head_dim {
            Some(h) => need(Some(h), "head_dim")?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(ModelError::config(
                        path,
                        "hidden_size",
                        format!(
                            "must be divisible by num_attention_heads = {num_attention_heads} \
                             when head_dim is absent, found {hidden_size}"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(ModelError::config(
                path,
                "head_dim",
                format!("rotary embeddings need an even head_dim, found {head_dim}"),
            ));
        }
        let (rope_key, rope_value) = match &self.rope_parameters {
            Some(v) if !v.is_null() => ("rope_parameters", Some(v)),
            _ => ("rope_scaling", self.rope_scaling.as_ref()),
        };
        let rope_scaling = parse_rope_scaling(rope_value, path, rope_key)?;
        let rope_theta_in_params = self
            .rope_parameters
            .as_ref()
            .and_then(|v| v.get("rope_theta"))
            .and_then(Value::as_f64);
        let dtype_str = self.dtype.as_deref().or(self.torch_dtype.as_deref());
        let dtype = match dtype_str {
            None => Kind::Float,
            Some(s) => kind_from_str(s).ok_or_else(|| {
                ModelError::config(
                    path,
                    "torch_dtype",
                    format!("expected float32, bfloat16 or float16, found {s:?}"),
                )
            })?,
        };
        let sliding_window = match family {
            Family::Mistral => self.sliding_window,
            Family::Qwen2 if self.use_sliding_window == Some(true) => {
                return Err(ModelError::config(
                    path,
                    "use_sliding_window",
                    "Qwen2 per-layer sliding windows are not supported; set it to false",
                ))
            }
            Family::Qwen2
                if self
                    .layer_types
                    .as_ref()
                    .is_some_and(|l| l.iter().any(|t| t != "full_attention")) =>
            {
                return Err(ModelError::config(
                    path,
                    "layer_types",
                    "only full_attention layers are supported for Qwen2",
                ))
            }
            _ => None,
        };
        let rms_norm_eps = self.rms_norm_eps.unwrap_or(1e-6);
        let rope_theta = rope_theta_in_params.or(self.rope_theta).unwrap_or(10000.0);
        if rms_norm_eps.is_nan() || rms_norm_eps <= 0.0 {
            return Err(ModelError::config(
                path,
                "rms_norm_eps",
                format!("must be > 0, found {rms_norm_eps}"),
            ));
        }
        if rope_theta.is_nan() || rope_theta <= 0.0 {
            return Err(ModelError::config(
                path,
                "rope_theta",
                format!("must be > 0, found {rope_theta}"),
            ));
        }
        let attention_bias = self.attention_bias.unwrap_or(false);
        let pad = token_ids(&self.pad_token_id, path, "pad_token_id")?;
        Ok(Config {
            family,
            head,
            vocab_size: need(self.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(self.intermediate_size, "intermediate_size")?,
            num_hidden_layers: need(self.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: need(
                Some(self.max_position_embeddings.unwrap_or(2048)),
                "max_position_embeddings",
            )?,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family != Family::Qwen2 && attention_bias,
            mlp_bias: family != Family::Qwen2 && self.mlp_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: token_ids(&self.bos_token_id, path, "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(&self.eos_token_id, path, "eos_token_id")?,
            pad_token_id: pad.first().copied(),
            dtype,
            initializer_range: self.initializer_range.unwrap_or(0.02),
            hf: self.clone(),
        })
    }
}

fn parse_rope_scaling(v: Option<&Value>, path: &Path, key: &str) -> Result<RopeScaling> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    if v.is_null() {
        return Ok(RopeScaling::None);
    }
    let obj = v
        .as_object()
        .ok_or_else(|| ModelError::config(path, key, format!("expected an object, found {v}")))?;
    let ty = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        obj.get(k).and_then(Value::as_f64).ok_or_else(|| {
            ModelError::config(path, &format!("{key}.{k}"), "missing or not a number")
        })
    };
    match ty {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(ModelError::config(
            path,
            &format!("{key}.rope_type"),
            format!("unsupported {other:?}; supported: default, linear, llama3"),
        )),
    }
}

impl Config {
    /// Loads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Config> {
        let path = dir.join("config.json");
        HfConfig::load(&path)?.resolve(&path)
    }

    /// The `config.json` to write for this config: the file as read (unknown keys kept) with the
    /// fields this crate owns overwritten.
    pub fn to_hf_json(&self, stored_dtype: Kind) -> Value {
        let mut hf = self.hf.clone();
        hf.architectures = Some(vec![self.head.architecture(self.family)]);
        hf.model_type = Some(self.family.model_type().to_string());
        hf.vocab_size = Some(self.vocab_size);
        hf.hidden_size = Some(self.hidden_size);
        hf.intermediate_size = Some(self.intermediate_size);
        hf.num_hidden_layers = Some(self.num_hidden_layers);
        hf.num_attention_heads = Some(self.num_attention_heads);
        hf.num_key_value_heads = Some(self.num_key_value_heads);
        hf.head_dim = Some(self.head_dim);
        hf.max_position_embeddings = Some(self.max_position_embeddings);
        hf.rms_norm_eps = Some(self.rms_norm_eps);
        hf.rope_theta = Some(self.rope_theta);
        hf.tie_word_embeddings = Some(self.tie_word_embeddings);
        hf.hidden_act = Some("silu".into());
        if self.family != Family::Qwen2 {
            hf.attention_bias = Some(self.qkv_bias);
            hf.mlp_bias = Some(self.mlp_bias);
        }
        if let HeadKind::Score { num_labels } = self.head {
            if hf.id2label.as_ref().map(|m| m.len()) != Some(num_labels) {
                hf.id2label = Some(
                    (0..num_labels)
                        .map(|i| (i.to_string(), Value::String(format!("LABEL_{i}"))))
                        .collect(),
                );
            }
            hf.num_labels = None;
        }
        hf.dtype = Some(kind_to_str(stored_dtype).into());
        hf.torch_dtype = None;
        let mut v = serde_json::to_value(&hf).unwrap_or(Value::Null);
        // Drop nulls: HF readers fill their own defaults, and some (rope_scaling) reject null
        // less gracefully than absence.
        if let Value::Object(m) = &mut v {
            m.retain(|_, x| !x.is_null());
        }
        v
    }

    /// Head-count and other shape invariants are checked in `resolve`; this one checks what only
    /// a tokenizer can tell: that its ids fit the embedding.
    pub fn check_vocab(&self, tokenizer_vocab: usize, tokenizer_path: &Path) -> Result<()> {
        if tokenizer_vocab > self.vocab_size {
            return Err(ModelError::Tokenizer {
                path: PathBuf::from(tokenizer_path),
                msg: format!(
                    "the tokenizer has {tokenizer_vocab} tokens but the model's embedding \
                     (config.json vocab_size) has {} rows; use the tokenizer the model was \
                     trained with",
                    self.vocab_size
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings() {
        assert_eq!(device_from_str("cpu"), Some(Device::Cpu));
        assert_eq!(device_from_str("cuda"), Some(Device::Cuda(0)));
        assert_eq!(device_from_str("cuda:3"), Some(Device::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            assert_eq!(device_from_str(bad), None, "{bad:?}");
        }
    }

    fn base() -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "eos_token_id": [1, 2], "extra_key": 5
        })
    }

    fn resolve(v: Value) -> Result<Config> {
        let hf: HfConfig = serde_json::from_value(v).unwrap();
        hf.resolve(Path::new("config.json"))
    }

    #[test]
    fn resolves_defaults_and_keeps_unknown_keys() {
        let c = resolve(base()).unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.qkv_bias);
        let out = c.to_hf_json(Kind::Float);
        assert_eq!(out["extra_key"], 5);
        assert_eq!(out["dtype"], "float32");
    }

    #[test]
    fn errors_name_the_key() {
        let mut v = base();
        v["num_key_value_heads"] = 3.into();
        let e = resolve(v).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads") && e.contains('3'), "{e}");

        let mut v = base();
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        let e = resolve(v).unwrap_err().to_string();
        assert!(
            e.contains("unknown architecture") && e.contains("GPT2"),
            "{e}"
        );

        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = resolve(v).unwrap_err().to_string();
        assert!(e.contains("hidden_size") && e.contains("missing"), "{e}");

        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 2.0});
        let e = resolve(v).unwrap_err().to_string();
        assert!(
            e.contains("rope_scaling.rope_type") && e.contains("yarn"),
            "{e}"
        );
    }

    #[test]
    fn reads_transformers_v5_rope_parameters() {
        let mut v = base();
        v["rope_parameters"] = serde_json::json!({"rope_type": "linear", "factor": 2.0,
                                                  "rope_theta": 500000.0});
        let c = resolve(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let out = c.to_hf_json(Kind::Float);
        assert_eq!(out["rope_parameters"]["factor"], 2.0);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_score_head_counts_labels() {
        let mut v = base();
        v["architectures"] = serde_json::json!(["Qwen2ForSequenceClassification"]);
        v["id2label"] = serde_json::json!({"0": "a", "1": "b", "2": "c"});
        let c = resolve(v).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.head, HeadKind::Score { num_labels: 3 });
    }
}
