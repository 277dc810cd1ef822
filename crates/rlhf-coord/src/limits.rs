//! The largest gRPC messages a run's config can make, checked against the message limit
//! (`rlhf_proto::limits::MAX_MESSAGE_BYTES`) before anything starts: a batch too large for one
//! message is a config error naming the key to change, not a transport error at step 1 after
//! the workers have loaded their models.
//!
//! Sizes per row, with S = `rollout.max_prompt_tokens + rollout.max_new_tokens` (the widest
//! sequence: prompts are left-padded to the longest in the batch) and N =
//! `rollout.max_new_tokens`; token ids and masks travel as i64, per-token floats as f32:
//! - Generate answer (one shard: the prompts split over the generators, or the actor replicas
//!   when there are none): ids and attention mask `16 S`, response mask `8 N`, sampling
//!   log-probs `4 N`, the finished flag 1;
//! - LogProbs / Values request (the whole rollout batch, to one reference / critic): `16 S`;
//! - TrainStep request (one actor replica's share of a minibatch): `16 S`, response mask
//!   `8 N`, advantages, old and reference log-probs `3 * 4 N` (the critic's, with old values and
//!   returns, is smaller).
//!
//! Answers of LogProbs and Values (`4 N` per row) are smaller than their requests.

use rlhf_config::{LoadedConfig, Role};
use rlhf_proto::limits::MAX_MESSAGE_BYTES;

/// Room left in every message for protobuf framing and the fields that are not tensors (role
/// ids, shapes, metrics): far more than they take.
const FRAMING_BYTES: u64 = 1 << 20;

/// One message kind's worst case under a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSize {
    /// The RPC and direction, e.g. "LogProbs request".
    pub what: &'static str,
    /// Rows in the largest such message.
    pub rows: u64,
    /// Its tensor bytes.
    pub bytes: u64,
    /// The config key that sets `rows`.
    pub key: &'static str,
    /// Whether more replicas (generators, actor replicas) would split it.
    pub sharded: bool,
}

/// The largest LogProbs/Values request, TrainStep request and Generate answer of a config.
pub fn largest_messages(loaded: &LoadedConfig) -> Vec<MessageSize> {
    let cfg = &loaded.config;
    let r = &cfg.rollout;
    let s = (r.max_prompt_tokens as u64).saturating_add(r.max_new_tokens as u64);
    let n = r.max_new_tokens as u64;
    let ceil_div = |a: u64, b: u64| a.div_ceil(b.max(1));
    let shards = match cfg.replicas(Role::Generator) {
        0 => cfg.replicas(Role::Actor),
        g => g,
    } as u64;
    let per_shard =
        ceil_div(r.batch_size as u64, shards).saturating_mul(r.samples_per_prompt as u64);
    let rollout = cfg.rollout_sequences() as u64;
    let train_rows = ceil_div(
        cfg.minibatch_size() as u64,
        cfg.replicas(Role::Actor) as u64,
    );
    let size = |what, rows: u64, per_row: u64, key, sharded| MessageSize {
        what,
        rows,
        bytes: rows.saturating_mul(per_row),
        key,
        sharded,
    };
    vec![
        size(
            "LogProbs/Values request",
            rollout,
            16 * s,
            "rollout.batch_size",
            false,
        ),
        size(
            "TrainStep request",
            train_rows,
            16 * s + 20 * n,
            if cfg.train.minibatch_size.is_some() {
                "train.minibatch_size"
            } else {
                "rollout.batch_size"
            },
            true,
        ),
        size(
            "Generate answer",
            per_shard,
            16 * s + 12 * n + 1,
            "rollout.batch_size",
            true,
        ),
    ]
}

/// Refuses a config whose largest message would exceed the gRPC message limit, naming the
/// message, its size and the key to lower.
pub fn check_message_sizes(loaded: &LoadedConfig) -> Result<(), rlhf_config::ConfigError> {
    let limit = MAX_MESSAGE_BYTES as u64 - FRAMING_BYTES;
    let r = &loaded.config.rollout;
    for m in largest_messages(loaded) {
        if m.bytes > limit {
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            return Err(loaded.error_at(
                m.key,
                format!(
                    "the largest {} of this config is {:.0} MiB ({} rows of up to {} tokens), \
                     over the {:.0} MiB gRPC message limit less framing; lower {} (or \
                     rollout.samples_per_prompt, rollout.max_prompt_tokens, \
                     rollout.max_new_tokens){}",
                    m.what,
                    mib(m.bytes),
                    m.rows,
                    r.max_prompt_tokens + r.max_new_tokens,
                    mib(limit),
                    m.key,
                    if m.sharded {
                        ", or add replicas to split it"
                    } else {
                        ""
                    },
                ),
            ));
        }
    }
    Ok(())
}

/// The largest Score request the prompt set can make: every row of a step is its prompt's text,
/// answer and other columns plus a response (at most 64 bytes of text per new token, far more
/// than a token decodes to), repeated per sample. A prompt row too large for that (huge extra
/// columns) is an error naming it and `rollout.batch_size`, not a transport error at step 1.
pub fn check_score_request(
    loaded: &LoadedConfig,
    prompts: &crate::prompts::PromptSet,
) -> anyhow::Result<()> {
    let limit = MAX_MESSAGE_BYTES as u64 - FRAMING_BYTES;
    let r = &loaded.config.rollout;
    let row_bytes = |p: &crate::prompts::PromptRow| -> u64 {
        let text: usize = p
            .messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        let extra = if p.extra.is_empty() {
            0
        } else {
            serde_json::Value::Object(p.extra.clone()).to_string().len()
        };
        (text + extra + p.answer.as_ref().map_or(0, String::len)) as u64
            + 64 * r.max_new_tokens as u64
    };
    let Some((i, largest)) = prompts
        .rows
        .iter()
        .map(row_bytes)
        .enumerate()
        .max_by_key(|(_, b)| *b)
    else {
        return Ok(());
    };
    let rows = (r.batch_size * r.samples_per_prompt) as u64;
    // A step's batch could be the largest rows: bound it by the largest row times the rows.
    if largest.saturating_mul(rows) > limit {
        return Err(loaded.error_at(
            "rollout.batch_size",
            format!(
                "a Score request of this prompt set could reach {:.0} MiB ({rows} rows; the                  largest prompt row, number {} counting from 0 in {}, takes {} KiB with its                  answer, other columns and a response), over the {:.0} MiB gRPC message limit;                  lower rollout.batch_size or rollout.samples_per_prompt, or drop large columns                  the reward does not need",
                (largest * rows) as f64 / (1u64 << 20) as f64,
                i,
                prompts.file.display(),
                largest / 1024,
                limit as f64 / (1u64 << 20) as f64,
            ),
        )
        .into());
    }
    Ok(())
}
