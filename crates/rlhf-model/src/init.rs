//! Randomly initialised models in HF layout, with a byte-level BPE tokenizer trained on the text
//! this crate ships (`assets/corpus.txt`), so every test and demo runs with no download.

use std::path::Path;

use serde_json::json;
use tch::{Device, Kind};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, NormalizerWrapper, TokenizerImpl};

use crate::config::{kind_to_str, Config, Family, HfConfig};
use crate::error::{write_atomic, ModelError, Result};
use crate::llama::{Model, SaveOptions};

/// The text the shipped tokenizers are trained on.
pub const CORPUS: &str = include_str!("../assets/corpus.txt");

/// ChatML, the template Qwen2 ships; used for both families of generated models.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// Model sizes for tests (`tiny`), demos and benchmarks (`small`), and the shapes of two
/// released models for GPU runs at the size users train (`qwen2.5-1.5b`, `llama3-8b`): their
/// `config.json` shapes with random weights and this crate's small tokenizer (the embedding keeps
/// the released vocabulary size; ids past the tokenizer's are never produced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// ~0.1M parameters: 2 layers, hidden 64, 4 heads over 2 KV heads.
    Tiny,
    /// ~30M parameters: 8 layers, hidden 512, 8 heads over 4 KV heads, vocab 4096.
    Small,
    /// Qwen2.5-1.5B's shape (1.54B parameters, tied embeddings): 28 layers, hidden 1536,
    /// 12 heads over 2 KV heads, MLP 8960, vocab 151936, rope theta 1e6.
    Qwen25_1_5B,
    /// Llama-3-8B's shape (8.03B parameters): 32 layers, hidden 4096, 32 heads over 8 KV heads,
    /// MLP 14336, vocab 128256, rope theta 5e5.
    Llama3_8B,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            "qwen2.5-1.5b" => Ok(Preset::Qwen25_1_5B),
            "llama3-8b" => Ok(Preset::Llama3_8B),
            _ => Err(format!(
                "unknown preset {s:?}; expected tiny, small, qwen2.5-1.5b or llama3-8b"
            )),
        }
    }
}

/// What `init-model` writes. `None` fields take the preset's / family's value.
#[derive(Debug, Clone)]
pub struct InitSpec {
    pub family: Family,
    pub preset: Preset,
    pub tie_word_embeddings: Option<bool>,
    pub num_key_value_heads: Option<usize>,
    pub dtype: Kind,
    pub seed: i64,
    /// Where the weights are drawn before they are saved.
    pub device: Device,
}

impl InitSpec {
    pub fn new(family: Family, preset: Preset) -> Self {
        InitSpec {
            family,
            preset,
            tie_word_embeddings: None,
            num_key_value_heads: None,
            dtype: Kind::Float,
            seed: 0,
            device: Device::Cpu,
        }
    }

    fn tokenizer_vocab(&self) -> usize {
        match self.preset {
            Preset::Tiny => 384,
            Preset::Small | Preset::Qwen25_1_5B | Preset::Llama3_8B => 1024,
        }
    }

    /// The `config.json` contents.
    pub fn hf_config(&self) -> HfConfig {
        let (vocab, hidden, inter, layers, heads, kv, ctx, rope_theta) = match self.preset {
            Preset::Tiny => (512, 64, 176, 2, 4, 2, 512, 10000.0),
            Preset::Small => (4096, 512, 1408, 8, 8, 4, 2048, 10000.0),
            Preset::Qwen25_1_5B => (151936, 1536, 8960, 28, 12, 2, 32768, 1e6),
            Preset::Llama3_8B => (128256, 4096, 14336, 32, 32, 8, 8192, 5e5),
        };
        let arch = match self.family {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
        };
        // Qwen2's small models tie embeddings; Llama's do not.
        let tied = self
            .tie_word_embeddings
            .unwrap_or(self.family == Family::Qwen2);
        let v = json!({
            "architectures": [arch],
            "model_type": self.family.model_type(),
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": self.num_key_value_heads.unwrap_or(kv),
            "max_position_embeddings": ctx,
            "rms_norm_eps": 1e-6,
            "rope_theta": rope_theta,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": tied,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "dtype": kind_to_str(self.dtype),
        });
        serde_json::from_value(v).unwrap_or_default()
    }
}

/// Trains the byte-level BPE tokenizer on [`CORPUS`]. Special tokens take ids 0..3:
/// `<|endoftext|>` (BOS/pad), `<|im_start|>`, `<|im_end|>` (EOS of a chat turn).
pub fn train_tokenizer(vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    let err = |e: tokenizers::Error| ModelError::Tokenizer {
        path: "assets/corpus.txt".into(),
        msg: format!("training the BPE tokenizer failed: {e}"),
    };
    let specials: Vec<AddedToken> = [ENDOFTEXT, IM_START, IM_END]
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tk: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> =
        TokenizerImpl::new(BPE::default());
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()));
    tk.train(&mut trainer, CORPUS.lines()).map_err(err)?;
    let mut tokenizer = tokenizers::Tokenizer::from(tk);
    // Re-add the specials as added tokens so the pre-tokenizer never splits them.
    tokenizer.add_special_tokens(
        &[ENDOFTEXT, IM_START, IM_END]
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect::<Vec<_>>(),
    );
    Ok(tokenizer)
}

/// Writes a complete random model directory: config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json, generation_config.json.
pub fn init_model(spec: &InitSpec, out: &Path) -> Result<Config> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let cfg_path = out.join("config.json");
    let config = spec.hf_config().resolve(&cfg_path)?;
    let model = Model::new(config.clone(), spec.device, spec.dtype, spec.seed)?;
    model.save(out, &SaveOptions::default())?;
    let tokenizer = train_tokenizer(spec.tokenizer_vocab())?;
    config.check_vocab(tokenizer.get_vocab_size(true), &out.join("tokenizer.json"))?;
    let tok_path = out.join("tokenizer.json");
    let tok_json = tokenizer
        .to_string(true)
        .map_err(|e| ModelError::Tokenizer {
            path: tok_path.clone(),
            msg: e.to_string(),
        })?;
    write_atomic(&tok_path, tok_json.as_bytes())?;
    let tok_cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": null,
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
        "chat_template": CHATML_TEMPLATE,
    });
    write_json(&out.join("tokenizer_config.json"), &tok_cfg)?;
    let gen = json!({
        "bos_token_id": 0,
        "eos_token_id": [2, 0],
        "pad_token_id": 0,
    });
    write_json(&out.join("generation_config.json"), &gen)?;
    Ok(config)
}

pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v)
        .map_err(|e| ModelError::config(path, "(all)", e.to_string()))?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_round_trips_and_keeps_specials_whole() {
        let tk = train_tokenizer(384).unwrap();
        let text = "<|im_start|>user\nWhat is two plus two?<|im_end|>";
        let enc = tk.encode(text, false).unwrap();
        assert_eq!(
            enc.get_ids()[0],
            1,
            "<|im_start|> must be one token with id 1"
        );
        assert_eq!(*enc.get_ids().last().unwrap(), 2);
        assert_eq!(tk.decode(enc.get_ids(), false).unwrap(), text);
        assert!(tk.get_vocab_size(true) <= 384);
    }

    /// The released models' parameter counts (Qwen2.5-1.5B's model card: 1.54B; Llama-3-8B's
    /// safetensors index: 8,030,261,248), from the presets' resolved shapes.
    #[test]
    fn released_shapes_have_the_released_parameter_counts() {
        for (family, preset, want) in [
            (Family::Qwen2, Preset::Qwen25_1_5B, 1_543_714_304usize),
            (Family::Llama, Preset::Llama3_8B, 8_030_261_248),
        ] {
            let c = InitSpec::new(family, preset)
                .hf_config()
                .resolve(Path::new("config.json"))
                .unwrap();
            let (h, hd) = (c.hidden_size, c.head_dim);
            let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
            let bias = if c.qkv_bias { q + 2 * kv } else { 0 };
            let layer = h * q + 2 * h * kv + q * h + bias + 3 * h * c.intermediate_size + 2 * h;
            let heads = if c.tie_word_embeddings { 1 } else { 2 };
            let total = heads * c.vocab_size * h + c.num_hidden_layers * layer + h;
            assert_eq!(total, want, "{preset:?}");
        }
    }
}
