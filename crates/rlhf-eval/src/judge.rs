//! What a judge sees ([`JudgeItem`]), what it returns ([`Judgment`]), the [`Judge`] trait, and
//! [`validate`], which runs a judge over a model's answers and builds the report.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::chat::{ChatMessage, Turn};
use crate::data::{ModelAnswer, MtBench, Question};
use crate::error::{EvalError, Result};
use crate::report::{Report, Validation};

/// A boxed, sendable future: what [`Judge`] methods return so the trait stays object-safe
/// (`&dyn Judge`, chosen from config at run time).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One thing to grade: a question's turn and the model's answers up to that turn.
#[derive(Debug, Clone, Copy)]
pub struct JudgeItem<'a> {
    /// The question.
    pub question: &'a Question,
    /// The model's answers to both turns of it.
    pub answer: &'a ModelAnswer,
    /// Which turn is graded.
    pub turn: Turn,
}

impl JudgeItem<'_> {
    /// The answer being graded.
    pub fn answer_text(&self) -> &str {
        &self.answer.turns[self.turn.index()]
    }

    /// The conversation up to and including the graded answer, without a system prompt:
    /// `[user: t1, assistant: a1]` for turn 1, `[user: t1, assistant: a1, user: t2,
    /// assistant: a2]` for turn 2. This is what a reward model scores.
    pub fn conversation(&self) -> Vec<ChatMessage> {
        let [q1, q2] = &self.question.turns;
        let [a1, a2] = &self.answer.turns;
        let mut c = vec![
            ChatMessage::user(q1.clone()),
            ChatMessage::assistant(a1.clone()),
        ];
        if self.turn == Turn::Second {
            c.push(ChatMessage::user(q2.clone()));
            c.push(ChatMessage::assistant(a2.clone()));
        }
        c
    }
}

/// The items for `answers` (which must be `bench`'s questions in order, as
/// [`MtBench::model_answers`] builds them): question by question, turn 1 then turn 2.
pub fn judge_items<'a>(
    bench: &'a MtBench,
    answers: &'a [ModelAnswer],
) -> Result<Vec<JudgeItem<'a>>> {
    bench.check_answers(answers)?;
    Ok(bench
        .questions()
        .iter()
        .zip(answers)
        .flat_map(|(question, answer)| {
            Turn::ALL.map(|turn| JudgeItem {
                question,
                answer,
                turn,
            })
        })
        .collect())
}

/// How a judgment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A rating in 1..=10 was obtained.
    Rated,
    /// The judge answered, but no valid rating could be read from it (no `[[N]]`, a rating
    /// outside 1..=10, a non-finite reward-model score).
    Unparseable,
    /// No usable answer from the judge (timeout, connection error, HTTP error, malformed
    /// response body, scorer failure).
    Failed,
}

/// The grade of one (question, turn); one line of `judgments.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgment {
    /// The question.
    pub question_id: u64,
    /// Its category.
    pub category: String,
    /// The graded turn (1 or 2).
    pub turn: Turn,
    /// Who judged, for example `gpt-4/single-math-v1` or `reward-model`.
    pub judge: String,
    /// The rating in 1..=10; `None` when [`Self::outcome`] is not [`Outcome::Rated`].
    pub rating: Option<f64>,
    /// How it ended.
    pub outcome: Outcome,
    /// The judge's raw output (its text, or the reward model's raw score), when there was one.
    #[serde(default)]
    pub judge_output: Option<String>,
    /// Why there is no rating.
    #[serde(default)]
    pub error: Option<String>,
}

impl Judgment {
    /// A successful judgment.
    pub fn rated(item: &JudgeItem<'_>, judge: &str, rating: f64, output: String) -> Self {
        Self::new(
            item,
            judge,
            Some(rating),
            Outcome::Rated,
            Some(output),
            None,
        )
    }

    /// The judge answered, but without a usable rating.
    pub fn unparseable(item: &JudgeItem<'_>, judge: &str, output: String, why: String) -> Self {
        Self::new(
            item,
            judge,
            None,
            Outcome::Unparseable,
            Some(output),
            Some(why),
        )
    }

    /// The judge did not answer usefully.
    pub fn failed(item: &JudgeItem<'_>, judge: &str, why: String) -> Self {
        Self::new(item, judge, None, Outcome::Failed, None, Some(why))
    }

    fn new(
        item: &JudgeItem<'_>,
        judge: &str,
        rating: Option<f64>,
        outcome: Outcome,
        judge_output: Option<String>,
        error: Option<String>,
    ) -> Self {
        Self {
            question_id: item.question.question_id,
            category: item.question.category.clone(),
            turn: item.turn,
            judge: judge.to_owned(),
            rating,
            outcome,
            judge_output,
            error,
        }
    }
}

/// Something that grades MT-Bench answers on the 1..=10 scale: [`crate::HttpJudge`], or
/// [`crate::RewardModelJudge`] around the coordinator's reward-model client.
///
/// **Invariant:** `judge` returns exactly one [`Judgment`] per item, in item order, and never
/// fails or panics because of one item: a failure becomes a judgment with `rating: None` and
/// the reason in `error`.
pub trait Judge: Send + Sync {
    /// A short label for logs, for example `http:gpt-4` or `reward-model`.
    fn name(&self) -> &str;

    /// Grades every item.
    fn judge<'a>(&'a self, items: &'a [JudgeItem<'a>]) -> BoxFuture<'a, Vec<Judgment>>;
}

/// Runs `judge` over `answers` (built by [`MtBench::model_answers`]) and aggregates the
/// [`Report`]. The caller saves the result with [`Validation::save`].
///
/// Fails only when the answers do not match the questions or the judge breaks the
/// one-judgment-per-item invariant; individual failed judgments are counted in the report.
#[tracing::instrument(skip_all, fields(judge = judge.name(), questions = answers.len()))]
pub async fn validate(
    bench: &MtBench,
    judge: &dyn Judge,
    answers: Vec<ModelAnswer>,
) -> Result<Validation> {
    let judgments = {
        let items = judge_items(bench, &answers)?;
        let judgments = judge.judge(&items).await;
        check_judgments(judge.name(), &items, &judgments)?;
        judgments
    };
    let report = Report::from_judgments(&judgments);
    tracing::info!(
        overall = %report.overall.map_or("none".to_string(), |s| format!("{s:.3}")),
        judged = report.judged,
        missing = report.missing,
        unparseable = report.unparseable,
        "MT-Bench judged"
    );
    Ok(Validation {
        answers,
        judgments,
        report,
    })
}

fn check_judgments(name: &str, items: &[JudgeItem<'_>], judgments: &[Judgment]) -> Result<()> {
    if items.len() != judgments.len() {
        return Err(EvalError::Config(format!(
            "judge {name} returned {} judgments for {} items",
            judgments.len(),
            items.len()
        )));
    }
    for (i, (item, j)) in items.iter().zip(judgments).enumerate() {
        if (item.question.question_id, item.turn) != (j.question_id, j.turn) {
            return Err(EvalError::Config(format!(
                "judge {name}: judgment {i} is for question {} turn {} but item {i} is \
                 question {} turn {}",
                j.question_id, j.turn, item.question.question_id, item.turn
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::mt_bench_dir;

    /// Rates every answer by its length; drops or reorders judgments when asked to.
    struct LenJudge {
        drop_last: bool,
    }

    impl Judge for LenJudge {
        fn name(&self) -> &str {
            "len"
        }

        fn judge<'a>(&'a self, items: &'a [JudgeItem<'a>]) -> BoxFuture<'a, Vec<Judgment>> {
            Box::pin(async move {
                let mut out: Vec<Judgment> = items
                    .iter()
                    .map(|it| {
                        let n = it.answer_text().len() as f64;
                        Judgment::rated(it, "len", n, format!("[[{n}]]"))
                    })
                    .collect();
                if self.drop_last {
                    out.pop();
                }
                out
            })
        }
    }

    #[tokio::test]
    async fn validate_runs_a_judge_and_checks_its_output() {
        let dir = mt_bench_dir();
        let bench = MtBench::load(&dir).unwrap();
        let a1 = vec!["abc".to_owned(); 80];
        let a2 = vec!["abcdefg".to_owned(); 80];
        let answers = bench.model_answers("m", a1, a2).unwrap();
        let v = validate(&bench, &LenJudge { drop_last: false }, answers.clone())
            .await
            .unwrap();
        assert_eq!(v.judgments.len(), 160);
        assert_eq!(v.report.turn1, Some(3.0));
        assert_eq!(v.report.turn2, Some(7.0));
        assert_eq!(v.report.overall, Some(5.0));

        let err = validate(&bench, &LenJudge { drop_last: true }, answers.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("returned 159 judgments for 160 items"),
            "{err}"
        );

        let mut swapped = answers;
        swapped.swap(0, 1);
        let err = validate(&bench, &LenJudge { drop_last: false }, swapped)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("answer 0 is for question 82"), "{err}");
    }

    #[test]
    fn items_are_question_major_and_conversations_end_with_the_answer() {
        let dir = mt_bench_dir();
        let bench = MtBench::load(&dir).unwrap();
        let a1: Vec<String> = (0..80).map(|i| format!("one-{i}")).collect();
        let a2: Vec<String> = (0..80).map(|i| format!("two-{i}")).collect();
        let answers = bench.model_answers("m", a1, a2).unwrap();
        let items = judge_items(&bench, &answers).unwrap();
        assert_eq!(items.len(), 160);
        assert_eq!(
            (items[2].question.question_id, items[2].turn),
            (82, Turn::First)
        );
        assert_eq!(
            (items[3].question.question_id, items[3].turn),
            (82, Turn::Second)
        );
        assert_eq!(items[3].answer_text(), "two-1");
        let c = items[3].conversation();
        assert_eq!(c.len(), 4);
        assert_eq!(c[3], ChatMessage::assistant("two-1"));
        assert_eq!(items[2].conversation()[1], ChatMessage::assistant("one-1"));
    }
}
