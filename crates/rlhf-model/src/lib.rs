//! `rlhf-model`: the Llama-family causal LM on libtorch (`tch`).
//!
//! Owns: `config.json` parsing ([`config`]), safetensors I/O in HF layout ([`weights`]), the
//! decoder with causal-LM and score heads ([`llama`]), tokenizer and chat templates
//! ([`tokenizer`]), KV-cache generation and the training-side forwards ([`generate`]),
//! random model directories for tests and demos ([`init`]), and the CPU-only kernels for
//! forwards without gradients (`cpu_kernels`, private: `llama.rs` calls its entry surface).
//! `unsafe` is confined to `cpu_kernels`, `weights.rs` (memory maps) and `cuda.rs` (opening
//! libtorch's CUDA library); every block says why it holds (`clippy::undocumented_unsafe_blocks`
//! is denied).
//!
//! May use: tch, tokenizers, minijinja, safetensors. Knows nothing about gRPC, tokio, figment or
//! the controller; the worker and the binaries build on it, never the other way round.

pub mod config;
mod cpu_kernels;
pub mod cuda;
pub mod error;
pub mod generate;
pub mod init;
pub mod llama;
pub mod lora;
pub mod reward_spec;
pub mod tokenizer;
pub mod weights;

use std::path::Path;

pub use config::{Config, Family, HeadKind, HfConfig};
pub use error::{ModelError, Result};
pub use generate::{
    generate, last_token_index, sequence_scores, sequence_scores_checkpointed, splitmix64,
    token_logprobs, token_logprobs_checkpointed, token_logprobs_from, token_values,
    token_values_checkpointed, Entropy, GenerationConfig, GenerationOutput, Sampling,
    TokenLogProbs,
};
pub use llama::{Checkpointed, KvCache, LoadOptions, Model, SaveOptions};
pub use lora::{Lora, LoraConfig, Target};
pub use reward_spec::{RewardHead, RewardSpec};
pub use tokenizer::{ChatMessage, Tokenizer};

use error::read_json;

/// Files besides the weights that make up a model directory and travel with it on save.
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
];

/// A loaded model directory: weights, tokenizer, and the stop ids generation should use.
pub struct ModelDir {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// EOS ids from `config.json` and `generation_config.json`, plus the tokenizer's EOS token.
    pub stop_ids: Vec<i64>,
    /// Padding id: `generation_config.json`, `config.json`, the tokenizer's pad token, or the
    /// first stop id.
    pub pad_id: i64,
}

impl ModelDir {
    /// Loads model and tokenizer from `dir`, checking that the tokenizer fits the embedding.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<ModelDir> {
        let model = Model::load(dir, opts)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        model
            .config
            .check_vocab(tokenizer.vocab_size(), tokenizer.path())?;
        let mut stop_ids = model.config.eos_token_ids.clone();
        let mut pad = None;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let g: serde_json::Value = read_json(&gen_path)?;
            match g.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => stop_ids.extend(n.as_i64()),
                Some(serde_json::Value::Array(a)) => {
                    stop_ids.extend(a.iter().filter_map(serde_json::Value::as_i64))
                }
                _ => {}
            }
            pad = g.get("pad_token_id").and_then(serde_json::Value::as_i64);
        }
        if let Some(id) = tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
        {
            stop_ids.push(id);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let pad_id = pad
            .or(model.config.pad_token_id)
            .or_else(|| {
                tokenizer
                    .pad_token
                    .as_deref()
                    .and_then(|t| tokenizer.token_to_id(t))
            })
            .or_else(|| stop_ids.first().copied())
            .unwrap_or(0);
        Ok(ModelDir {
            model,
            tokenizer,
            stop_ids,
            pad_id,
        })
    }

    /// Saves weights and config to `out` and copies the side files from `src`.
    pub fn save(&self, src: &Path, out: &Path, opts: &SaveOptions) -> Result<()> {
        self.model.save(out, opts)?;
        copy_side_files(src, out)
    }
}

/// Copies tokenizer and generation files from one model directory to another.
pub fn copy_side_files(src: &Path, out: &Path) -> Result<()> {
    if src == out {
        return Ok(());
    }
    for f in SIDE_FILES {
        let from = src.join(f);
        if from.exists() {
            let bytes = error::read_file(&from)?;
            error::write_atomic(&out.join(f), &bytes)?;
        }
    }
    Ok(())
}
