//! MT-Bench validation inside a run (`validation.every`): the actor answers both turns of every
//! question through its Generate RPC (chat template applied here, prompts cut from the left to
//! fit the context), a judge from `rlhf-eval` grades the answers (the run's reward model through
//! the reward role's Score RPC, or an OpenAI-compatible endpoint), and the answers, judgments and
//! scores go to `RUN/validation/step-NNNNNN/`. A failed judge never stops the run: the score is
//! then missing, and the checkpoint is ranked last.

use std::path::Path;

use anyhow::{Context, Result};
use rlhf_config::{JudgeKind, RunConfig, ValidationConfig};
use rlhf_eval::{
    BoxFuture, ChatMessage, GoodnessScorer, HttpJudge, HttpJudgeConfig, Judge, MtBench,
    RewardModelJudge, RmNormalization,
};
use rlhf_model::Tokenizer;
use rlhf_proto::pb;
use tracing::{info, warn};

use crate::rl;
use crate::workers::RoleHandle;

/// What a validation produced.
pub struct Outcome {
    /// Overall MT-Bench score (1-10); `None` when no answer could be rated.
    pub score: Option<f64>,
    pub judge: String,
    pub per_category: std::collections::BTreeMap<String, Option<f64>>,
    pub missing: usize,
    pub truncated_prompts: usize,
}

/// Loaded once at launch, so bad data or a bad judge config stops the run before training.
pub struct Validator {
    bench: MtBench,
    cfg: ValidationConfig,
    http: Option<HttpJudge>,
    /// The policy's context length: prompt + answer must fit.
    context: usize,
}

/// The reward role as a [`GoodnessScorer`]: its Score RPC returns rewards already normalised by
/// the reward model's mean and std, hence `RmNormalization { mean: 0, std: 1 }`.
struct RewardScorer<'a, R>(&'a R);

impl<R: RoleHandle> GoodnessScorer for RewardScorer<'_, R> {
    fn score<'a>(
        &'a self,
        conversations: Vec<Vec<ChatMessage>>,
    ) -> BoxFuture<'a, Result<Vec<f64>, String>> {
        Box::pin(async move {
            let items = conversations
                .into_iter()
                .map(|mut c| {
                    let response = c.pop().map(|m| m.content).unwrap_or_default();
                    pb::ScoreItem {
                        prompt: c
                            .into_iter()
                            .map(|m| pb::ChatMessage {
                                role: m.role.as_str().to_string(),
                                content: m.content,
                            })
                            .collect(),
                        response,
                        answer: String::new(),
                        extra_json: String::new(),
                    }
                })
                .collect();
            let r = self.0.score(items).await.map_err(|e| format!("{e:#}"))?;
            let t = r.rewards.ok_or("the Score answer has no rewards")?;
            let t = rlhf_proto::wire::from_wire("rewards", &t).map_err(|e| e.to_string())?;
            Vec::<f64>::try_from(t.to_kind(tch::Kind::Double)).map_err(|e| e.to_string())
        })
    }
}

/// The judge as the run file spells it.
fn judge_name(j: JudgeKind) -> &'static str {
    match j {
        JudgeKind::RewardModel => "reward_model",
        JudgeKind::Http => "http",
    }
}

fn model_context(policy: &Path) -> Result<usize> {
    Ok(rlhf_model::config::Config::from_dir(policy)?.max_position_embeddings)
}

impl Validator {
    /// `None` when validation is off (`validation.every: 0`).
    pub fn new(cfg: &RunConfig) -> Result<Option<Validator>> {
        let v = &cfg.validation;
        if v.every == 0 {
            return Ok(None);
        }
        let mut bench = MtBench::load(&v.mt_bench).context("validation.mt_bench")?;
        if let Some(n) = v.max_questions {
            bench.truncate(n);
        }
        let http = match v.judge {
            JudgeKind::RewardModel => None,
            JudgeKind::Http => {
                let mut h = HttpJudgeConfig::new(v.http.url.clone(), v.http.model.clone());
                h.api_key_env =
                    (!v.http.api_key_env.is_empty()).then(|| v.http.api_key_env.clone());
                h.timeout = std::time::Duration::from_secs_f64(v.http.timeout_s);
                h.max_concurrency = v.http.concurrency;
                Some(HttpJudge::new(h, bench.judge_prompts()).context("validation.http")?)
            }
        };
        let context = model_context(&cfg.models.policy)?;
        if context <= v.max_new_tokens {
            anyhow::bail!(
                "validation.max_new_tokens = {} leaves no room for a question in the policy's context of {context} tokens",
                v.max_new_tokens
            );
        }
        info!(
            questions = bench.questions().len(),
            judge = judge_name(v.judge),
            every = v.every,
            "MT-Bench validation ready"
        );
        Ok(Some(Validator {
            bench,
            cfg: v.clone(),
            http,
            context,
        }))
    }

    pub fn due(&self, step: u64) -> bool {
        step % self.cfg.every == 0
    }

    /// Chat-templated prompts cut from the left to leave room for the answer; returns the ids
    /// and how many were cut.
    fn encode(
        &self,
        tok: &Tokenizer,
        convs: &[Vec<ChatMessage>],
    ) -> Result<(Vec<Vec<i64>>, usize)> {
        let room = self.context - self.cfg.max_new_tokens;
        let mut cut = 0;
        let mut out = Vec::with_capacity(convs.len());
        for c in convs {
            let msgs: Vec<rlhf_model::ChatMessage> = c
                .iter()
                .map(|m| rlhf_model::ChatMessage::new(m.role.as_str(), &m.content))
                .collect();
            let mut ids = tok.encode_messages(&msgs, tok.chat_template().is_some(), true)?;
            if ids.len() > room {
                ids.drain(..ids.len() - room);
                cut += 1;
            }
            out.push(ids);
        }
        Ok((out, cut))
    }

    async fn answer<R: RoleHandle>(
        &self,
        actor: &R,
        tok: &Tokenizer,
        convs: &[Vec<ChatMessage>],
        seed: u64,
    ) -> Result<(Vec<String>, usize)> {
        let (ids, cut) = self.encode(tok, convs)?;
        let mut answers = Vec::with_capacity(ids.len());
        for (i, chunk) in ids.chunks(self.cfg.batch_size).enumerate() {
            let g = actor
                .generate(pb::GenerateRequest {
                    role_id: String::new(),
                    prompts: chunk
                        .iter()
                        .map(|p| pb::PromptIds { ids: p.clone() })
                        .collect(),
                    samples_per_prompt: 1,
                    max_new_tokens: self.cfg.max_new_tokens as u32,
                    temperature: self.cfg.temperature,
                    top_k: 0,
                    top_p: 1.0,
                    seed,
                    first_row: (i * self.cfg.batch_size) as u64,
                })
                .await
                .context("MT-Bench answers")?;
            answers.extend(rl::decode_responses(&g, tok)?);
        }
        Ok((answers, cut))
    }

    /// Answers, judges and saves; `Ok` with a missing score when the judge failed.
    pub async fn run<R: RoleHandle>(
        &self,
        actor: &R,
        reward: Option<&R>,
        tok: &Tokenizer,
        run_dir: &Path,
        step: u64,
    ) -> Result<Outcome> {
        let t0 = std::time::Instant::now();
        let seed = rl::step_seed(step, u64::MAX);
        let (a1, cut1) = self
            .answer(actor, tok, &self.bench.turn1_conversations(None), seed)
            .await?;
        let turn2 = self.bench.turn2_conversations(None, &a1)?;
        let (a2, cut2) = self.answer(actor, tok, &turn2, seed).await?;
        let answers = self.bench.model_answers(&format!("step-{step}"), a1, a2)?;
        let t_answer = t0.elapsed();
        let scorer;
        let rm_judge;
        let judge: &dyn Judge = match &self.http {
            Some(h) => h,
            None => {
                scorer = RewardScorer(reward.ok_or_else(|| {
                    anyhow::anyhow!(
                        "validation.judge reward_model: the run has no reward model (kind: model)"
                    )
                })?);
                rm_judge = RewardModelJudge::new(
                    scorer,
                    RmNormalization {
                        mean: 0.0,
                        std: 1.0,
                    },
                );
                &rm_judge
            }
        };
        let mut v = rlhf_eval::validate(&self.bench, judge, answers).await?;
        v.report.truncated_prompts = cut1 + cut2;
        let dir = run_dir.join("validation").join(rlhf_ckpt::dir_name(step));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        tokio::task::block_in_place(|| v.save(&dir))
            .with_context(|| format!("writing the validation results into {}", dir.display()))?;
        let r = &v.report;
        if r.missing > 0 {
            warn!(
                step,
                missing = r.missing,
                unparseable = r.unparseable,
                "some MT-Bench answers have no rating (see judgments.jsonl)"
            );
        }
        if r.truncated_prompts > 0 {
            warn!(
                step,
                truncated_prompts = r.truncated_prompts,
                context = self.context,
                "MT-Bench prompts were cut from the left to fit the policy's context with validation.max_new_tokens; their scores read less of the conversation"
            );
        }
        info!(
            step,
            score = %r.overall.map_or("none".to_string(), |s| format!("{s:.3}")),
            judged = r.judged,
            truncated_prompts = r.truncated_prompts,
            answer_s = t_answer.as_secs_f64(),
            total_s = t0.elapsed().as_secs_f64(),
            dir = %dir.display(),
            "MT-Bench validation"
        );
        Ok(Outcome {
            score: r.overall,
            judge: judge.name().to_string(),
            per_category: r.per_category.clone(),
            missing: r.missing,
            truncated_prompts: r.truncated_prompts,
        })
    }
}
