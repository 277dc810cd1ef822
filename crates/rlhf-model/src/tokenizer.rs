//! Tokenizer (`tokenizer.json` through the `tokenizers` crate) and chat templates (the HF Jinja
//! templates from `chat_template.jinja` or `tokenizer_config.json`, rendered with `minijinja`
//! under the same settings `transformers` uses: `trim_blocks`, `lstrip_blocks`, Python string
//! methods, `raise_exception`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{read_file, read_json, ModelError, Result};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A tokenizer with its special tokens and (optional) chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Whether plain `encode` adds special tokens (BOS) as the tokenizer's post-processor says.
    pub add_special_tokens: bool,
}

/// `"<s>"` or `{"content": "<s>", ...}` (an AddedToken dict) → the token text.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json`, and from `DIR/tokenizer_config.json` (optional) the special
    /// tokens and chat template; `DIR/chat_template.jinja` (optional) takes precedence for the
    /// template, as in recent `transformers`.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let bytes = read_file(&path)?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| ModelError::Tokenizer {
                path: path.clone(),
                msg: format!("not a valid tokenizer.json: {e}"),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            read_json(&cfg_path)?
        } else {
            Value::Object(Default::default())
        };
        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = if jinja_path.exists() {
            Some(
                String::from_utf8(read_file(&jinja_path)?).map_err(|e| ModelError::Tokenizer {
                    path: jinja_path.clone(),
                    msg: format!("not UTF-8: {e}"),
                })?,
            )
        } else {
            match cfg.get("chat_template") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default", as transformers does.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                Some(other) => {
                    return Err(ModelError::config(
                        &cfg_path,
                        "chat_template",
                        format!("expected a string or a list of named templates, found {other}"),
                    ))
                }
            }
        };
        Ok(Tokenizer {
            inner,
            path,
            chat_template,
            bos_token: token_text(cfg.get("bos_token")),
            eos_token: token_text(cfg.get("eos_token")),
            pad_token: token_text(cfg.get("pad_token")),
            add_special_tokens: true,
        })
    }

    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        path: PathBuf,
        chat_template: Option<String>,
    ) -> Self {
        Tokenizer {
            inner,
            path,
            chat_template,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            add_special_tokens: true,
        }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Vocabulary size including added tokens: the embedding must have at least this many rows.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    fn tok_err(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }

    /// Encodes text; `add_special` adds what the post-processor adds (BOS, for Llama).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| self.tok_err(e))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Decodes ids; negative ids (padding markers) are an error naming the value.
    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids = ids
            .iter()
            .map(|&i| u32::try_from(i).map_err(|_| self.tok_err(format!("invalid token id {i}"))))
            .collect::<Result<Vec<u32>>>()?;
        self.inner
            .decode(&ids, skip_special)
            .map_err(|e| self.tok_err(e))
    }

    /// Renders the chat template over `messages` (what `apply_chat_template(tokenize=False)`
    /// returns).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            self.tok_err(
                "this tokenizer has no chat template (no chat_template.jinja and no \
                 `chat_template` in tokenizer_config.json); use plain prompts or add one",
            )
        })?;
        render_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }

    /// Renders and tokenizes a chat without adding special tokens again (the template already
    /// holds them), as `apply_chat_template(tokenize=True)` does.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<i64>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// A conversation as ids: through the chat template when `use_template`, else its message
    /// contents joined by newlines with the tokenizer's special tokens (models without a
    /// template).
    pub fn encode_messages(
        &self,
        messages: &[ChatMessage],
        use_template: bool,
        add_generation_prompt: bool,
    ) -> Result<Vec<i64>> {
        if use_template {
            return self.encode_chat(messages, add_generation_prompt);
        }
        let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        self.encode(&text.join("\n"), true)
    }
}

/// Renders an HF chat template.
pub fn render_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| ModelError::Template(format!("does not parse: {e:#}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| ModelError::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| ModelError::Template(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = crate::init::CHATML_TEMPLATE;
        let out = render_template(
            t,
            &[
                ChatMessage::new("user", "hi"),
                ChatMessage::new("assistant", "yo"),
            ],
            true,
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = "{% for m in messages %}{% if m.role not in ['user'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}{{ m.content.strip() | upper }}{% endfor %}";
        let ok = render_template(t, &[ChatMessage::new("user", " a ")], false, "", "").unwrap();
        assert_eq!(ok, "A");
        let err = render_template(t, &[ChatMessage::new("tool", "x")], false, "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad role tool"), "{err}");
    }
}
