//! From chat messages to token ids and padded tensors: conversations are rendered with the
//! model's chat template and tokenized as a whole; for SFT each token is also marked as
//! assistant-written or not, so the loss sees only the assistant's tokens.

use rlhf_model::{ChatMessage, Tokenizer};
use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Renders and tokenizes a full conversation (no generation prompt), keeping the last
/// `max_len` tokens when it is longer: a reward model reads the end of the response, so the
/// start of the prompt is what goes. Returns the ids and whether anything was cut.
pub fn encode_conversation(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    max_len: usize,
) -> std::result::Result<(Vec<u32>, bool), String> {
    let text = tok
        .render_chat(messages, false)
        .map_err(|e| e.to_string())?;
    let enc = tok
        .inner()
        .encode(text.as_str(), false)
        .map_err(|e| format!("tokenizer: {e}"))?;
    let ids = enc.get_ids();
    if ids.is_empty() {
        return Err("the conversation tokenizes to nothing".into());
    }
    let cut = ids.len() > max_len;
    Ok((ids[ids.len().saturating_sub(max_len)..].to_vec(), cut))
}

/// A tokenized SFT example: ids and a 0/1 mark per token, 1 where the assistant wrote it
/// (its content and end-of-turn markup, up to the next turn).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedTokens {
    pub ids: Vec<u32>,
    pub assistant: Vec<u8>,
}

/// Tokenizes a chat for SFT. Assistant spans are found by rendering growing prefixes of the
/// conversation: turn `i`'s span starts where `render(messages[..i], add_generation_prompt)`
/// ends and stops where `render(messages[..=i])` ends. That needs a template that renders
/// prefix-wise (ChatML, Llama 3, Mistral and Qwen templates do); one that does not is reported.
/// Sequences longer than `max_len` are cut at the end. Returns the tokens and whether anything
/// was cut.
pub fn encode_chat_masked(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    max_len: usize,
) -> std::result::Result<(MaskedTokens, bool), String> {
    let render = |m: &[ChatMessage], gen: bool| tok.render_chat(m, gen).map_err(|e| e.to_string());
    let full = render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..i], true)?;
        let through = render(&messages[..=i], false)?;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            return Err(format!(
                "the chat template does not render this conversation prefix-wise (turn {i}), \
                 so the assistant's tokens cannot be located; use a template whose output for \
                 a conversation starts with its output for every shorter prefix"
            ));
        }
        spans.push((before.len(), through.len()));
    }
    let enc = tok
        .inner()
        .encode(full.as_str(), false)
        .map_err(|e| format!("tokenizer: {e}"))?;
    let ids = enc.get_ids();
    let assistant: Vec<u8> = enc
        .get_offsets()
        .iter()
        .map(|&(start, end)| {
            // A token belongs to a span when it starts inside it; zero-width tokens take the
            // position of their end.
            let at = if end > start { start } else { end };
            u8::from(spans.iter().any(|&(s, e)| at >= s && at < e))
        })
        .collect();
    let cut = ids.len() > max_len;
    let n = ids.len().min(max_len);
    Ok((
        MaskedTokens {
            ids: ids[..n].to_vec(),
            assistant: assistant[..n].to_vec(),
        },
        cut,
    ))
}

/// Right-pads sequences into `(ids, attention_mask)`, both (b, t) int64 on `device`.
pub fn pad_batch(seqs: &[&[u32]], pad_id: i64, device: Device) -> Result<(Tensor, Tensor)> {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let b = seqs.len();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0i64; b * t];
    for (i, s) in seqs.iter().enumerate() {
        for (j, &x) in s.iter().enumerate() {
            ids[i * t + j] = i64::from(x);
            mask[i * t + j] = 1;
        }
    }
    let shape = [b as i64, t as i64];
    Ok((
        Tensor::f_from_slice(&ids)?
            .f_view(shape)?
            .f_to_device(device)?,
        Tensor::f_from_slice(&mask)?
            .f_view(shape)?
            .f_to_device(device)?,
    ))
}

/// Right-pads 0/1 marks like [`pad_batch`] pads ids: (b, t) float on `device`.
pub fn pad_marks(marks: &[&[u8]], device: Device) -> Result<Tensor> {
    let t = marks.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![0f32; marks.len() * t];
    for (i, s) in marks.iter().enumerate() {
        for (j, &x) in s.iter().enumerate() {
            out[i * t + j] = f32::from(x);
        }
    }
    Ok(Tensor::f_from_slice(&out)?
        .f_view([marks.len() as i64, t as i64])?
        .f_to_kind(Kind::Float)?
        .f_to_device(device)?)
}
