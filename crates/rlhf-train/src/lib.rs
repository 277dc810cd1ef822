//! `rlhf-train`: the single-process training jobs that produce what the RLHF loop consumes:
//! reward models (SteerLM regression, Bradley-Terry, scaled Bradley-Terry, per the HelpSteer2
//! and HelpSteer2-Preference papers) and SFT policies, plus their data loaders, reward-model
//! scoring and RewardBench-format evaluation.
//!
//! Owns: streaming readers for the published formats with the bad-row policy ([`data`]), from
//! JSONL or from Parquet files and Hugging Face dataset directories ([`columnar`]);
//! chat-template tokenization and assistant masks ([`encode`]); the losses ([`losses`]); the
//! job files ([`config`]); the shared optimisation loop with checkpoints and exact resume
//! ([`trainer`]); the best checkpoint by the held-out metric and early stop ([`best`]); the
//! jobs ([`rm`], [`sft`]); reward models for scoring ([`reward`]); RewardBench evaluation
//! ([`eval`]); rating-to-pair derivation ([`pairs`]).
//!
//! May use: rlhf-model (the model), rlhf-algo (AdamW, schedules, clipping, permutations),
//! rlhf-ckpt (the checkpoint format), tch, parquet + arrow (Parquet data). Knows nothing about
//! gRPC, tokio, figment or clap: the binary loads the job files and calls
//! [`rm::train_reward_model`] and [`sft::train_sft`].

pub mod best;
pub mod columnar;
pub mod config;
pub mod data;
pub mod encode;
pub mod error;
pub mod eval;
pub mod losses;
pub mod pairs;
pub mod reward;
pub mod rm;
pub mod sft;
pub mod trainer;

pub use config::{RmJobConfig, RmObjective, SftJobConfig};
pub use data::{DataFormat, OnBadRow, RowStats};
pub use error::{Result, TrainError};
pub use eval::{eval_reward_bench, BenchReport, CategoryMap};
pub use pairs::{derive_pairs, DerivedPairs};
pub use reward::{RewardModel, Scored};
pub use rm::train_reward_model;
pub use sft::train_sft;
pub use trainer::{BestReport, JobControl, JobReport};
