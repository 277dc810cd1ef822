//! `rlhf-eval`: MT-Bench validation of a policy (`shared/DESIGN.md`, "One training step", item
//! 9): the FastChat `llm_judge` data, the conversations the policy answers, the judges, the
//! scores, and the files under `RUN/validation/step-NNNNNN/`.
//!
//! A validation goes:
//!
//! 1. [`MtBench::load`] reads FastChat's `mt_bench` folder (80 two-turn questions, judge
//!    prompts, GPT-4 reference answers) and rejects any bad line with file and line number.
//! 2. The caller generates first-turn answers for [`MtBench::turn1_conversations`], then
//!    second-turn answers for [`MtBench::turn2_conversations`], and pairs them with
//!    [`MtBench::model_answers`]. Tokenising and chat templates are the caller's business.
//! 3. [`validate`] runs a [`Judge`] over every (question, turn) and aggregates a [`Report`]:
//!    - [`HttpJudge`]: any OpenAI-compatible chat-completions endpoint, sent FastChat's
//!      single-answer prompts (`single-v1`, `single-v1-multi-turn`, and the `single-math-v1`
//!      pair with the reference answer for math, reasoning and coding);
//!    - [`RewardModelJudge`]: the run's reward model through a [`GoodnessScorer`] the caller
//!      implements, mapped onto 1..=10 by [`rm_rating`]:
//!      `rating = 1 + 9 * sigmoid((g - mean) / std)`, where `mean`/`std` are the reward
//!      model's goodness normalisation. The reward model's mean response scores 5.5, one
//!      standard deviation above about 7.6, one below about 3.4.
//! 4. [`Validation::save`] writes `answers.jsonl`, `judgments.jsonl` and `scores.json`
//!    atomically into the directory the caller names.
//!
//! **Invariant:** one bad judgment never aborts a validation: timeouts, HTTP errors, garbage
//! bodies and unparseable ratings become judgments with `rating: None` and a reason, counted in
//! [`Report::missing`] / [`Report::unparseable`]. [`Report::overall`] is `None` when nothing
//! was rated.
//!
//! May use: serde, tokio (blocking pool, semaphore), tracing, and `ureq` for HTTP; the default
//! `https` feature adds rustls on the `ring` provider (never aws-lc-rs, which needs cmake). Knows nothing about tch, tensors, gRPC or the coordinator: scoring with the reward
//! model comes in through [`GoodnessScorer`], and nothing here depends on another workspace
//! crate.

mod chat;
mod data;
mod error;
pub mod fixture;
mod http;
mod judge;
mod prompt;
mod report;
mod rm;

pub use chat::{ChatMessage, Role, Turn};
pub use data::{
    JudgePrompt, JudgePrompts, ModelAnswer, MtBench, Question, JUDGE_PROMPT_FILE,
    NEED_REF_CATEGORIES, QUESTION_FILE, REFERENCE_FILE,
};
pub use error::{EvalError, Result};
pub use http::{HttpJudge, HttpJudgeConfig, JUDGE_MAX_TOKENS, JUDGE_TEMPERATURE};
pub use judge::{judge_items, validate, BoxFuture, Judge, JudgeItem, Judgment, Outcome};
pub use prompt::{fill_judge_prompt, parse_rating, parse_rating_reason, FilledPrompt, PromptKind};
pub use report::{Report, Validation, ANSWERS_FILE, JUDGMENTS_FILE, SCORES_FILE};
pub use rm::{rm_judgments, rm_rating, GoodnessScorer, RewardModelJudge, RmNormalization};
