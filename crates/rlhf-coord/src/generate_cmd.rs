//! `rlhf-coord generate`: completions for people (plain text) and scripts (`--json`, one object
//! per prompt with the text, token ids and per-token log-probs).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use rlhf_model::{generate, ChatMessage, GenerationConfig, LoadOptions, ModelDir, Sampling};
use serde::Deserialize;

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory in HF layout, or a checkpoint directory or run directory (the actor of
    /// the checkpoint, of the run's newest valid one; LoRA adapters applied).
    model: PathBuf,
    /// One prompt.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    prompt: Option<String>,
    /// JSONL file with a `prompt` string or a chat `messages` list per line.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Wrap `prompt` strings as a user turn and apply the chat template.
    #[arg(long)]
    chat: bool,
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sampling temperature (> 0); sampling instead of greedy decoding.
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long)]
    top_p: Option<f64>,
    /// Sample among the K most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Tokens to generate per prompt at most.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Keep generating through EOS until max_new_tokens (benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Sampling seed (the same seed gives the same samples).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompts per generation batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Run in this dtype (default: the stored one).
    #[arg(long)]
    dtype: Option<String>,
    /// One JSON object per prompt on stdout.
    #[arg(long)]
    json: bool,
}

/// A prompts-file row; other keys (ids, metadata) are allowed and ignored.
#[derive(Deserialize)]
struct PromptRow {
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
}

enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

fn read_prompts(path: &Path) -> Result<Vec<Prompt>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: PromptRow = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        out.push(match (row.prompt, row.messages) {
            (Some(p), None) => Prompt::Text(p),
            (None, Some(m)) if !m.is_empty() => Prompt::Chat(m),
            (Some(_), Some(_)) => bail!(
                "{}:{}: has both `prompt` and `messages`; keep one",
                path.display(),
                i + 1
            ),
            _ => bail!(
                "{}:{}: needs a `prompt` string or a non-empty `messages` list",
                path.display(),
                i + 1
            ),
        });
    }
    if out.is_empty() {
        bail!("{}: no prompts in the file", path.display());
    }
    Ok(out)
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let device = crate::parse_device(&a.device)?;
    let dtype = a
        .dtype
        .as_deref()
        .map(|d| crate::parse_kind("--dtype", d))
        .transpose()?;
    let dir = crate::export::resolve_model_dir(&a.model)?;
    let mut md = ModelDir::load(
        &dir,
        &LoadOptions {
            device,
            dtype,
            ..Default::default()
        },
    )
    .with_context(|| format!("loading model {}", dir.display()))?;
    // A LoRA actor's checkpoint holds the frozen base beside its adapters.
    if dir.join(rlhf_model::lora::ADAPTER_CONFIG).is_file() {
        md.model
            .load_lora(&dir)
            .with_context(|| format!("loading the LoRA adapters in {}", dir.display()))?;
    }
    let prompts = match (&a.prompt, &a.prompts) {
        (Some(p), _) => vec![Prompt::Text(p.clone())],
        (None, Some(f)) => read_prompts(f)?,
        (None, None) => bail!("give --prompt TEXT or --prompts FILE.jsonl"),
    };
    let texts: Vec<String> = prompts
        .iter()
        .map(|p| match p {
            Prompt::Text(t) if a.chat => md
                .tokenizer
                .render_chat(&[ChatMessage::new("user", t)], true),
            Prompt::Text(t) => Ok(t.clone()),
            Prompt::Chat(m) => md.tokenizer.render_chat(m, true),
        })
        .collect::<rlhf_model::Result<_>>()?;
    let ids: Vec<Vec<i64>> = texts
        .iter()
        .zip(&prompts)
        .map(|(t, p)| {
            // Rendered chats carry their special tokens already.
            let templated = a.chat || matches!(p, Prompt::Chat(_));
            md.tokenizer.encode(t, !templated)
        })
        .collect::<rlhf_model::Result<_>>()?;
    let sampling = match a.temperature {
        None if a.top_p.is_some() || a.top_k.is_some() => {
            bail!("--top-p/--top-k need --temperature (without it decoding is greedy)")
        }
        None => Sampling::Greedy,
        Some(t) => Sampling::Sample {
            temperature: t,
            top_k: a.top_k,
            top_p: a.top_p,
        },
    };
    if a.batch_size == 0 {
        bail!("--batch-size must be >= 1");
    }
    let mut stdout = std::io::stdout().lock();
    for (chunk_no, chunk) in ids.chunks(a.batch_size).enumerate() {
        let cfg = GenerationConfig {
            max_new_tokens: a.max_new_tokens,
            sampling: sampling.clone(),
            stop_ids: if a.ignore_eos {
                vec![]
            } else {
                md.stop_ids.clone()
            },
            pad_id: md.pad_id,
            // Each row samples from the stream of (seed, its index), so results do not depend
            // on --batch-size.
            seed: a.seed,
            first_row: (chunk_no * a.batch_size) as u64,
        };
        let out = generate(&md.model, chunk, &cfg)?;
        for (j, ((resp, lps), finished)) in out.rows()?.into_iter().zip(&out.finished).enumerate() {
            let index = chunk_no * a.batch_size + j;
            let text = md.tokenizer.decode(&resp, true)?;
            if a.json {
                let obj = serde_json::json!({
                    "index": index,
                    "prompt": texts[index],
                    "text": text,
                    "token_ids": resp,
                    "logprobs": lps,
                    "finished": finished,
                });
                writeln!(stdout, "{obj}")?;
            } else {
                writeln!(stdout, "{}{}", texts[index], text)?;
                if index + 1 < ids.len() {
                    writeln!(stdout, "---")?;
                }
            }
        }
    }
    Ok(())
}
