//! Grading with the run's reward model: its goodness scores mapped onto MT-Bench's 1..=10
//! scale.
//!
//! The mapping is `rating = 1 + 9 * sigmoid((g - mean) / std)`, with `mean` and `std` the reward
//! model's normalisation (over its training responses, as in HelpSteer2). The reward model's
//! average response lands on 5.5, one standard deviation above on about 7.6 and one below on
//! about 3.4; the scale saturates smoothly instead of clipping.

use serde::{Deserialize, Serialize};

use crate::chat::ChatMessage;
use crate::judge::{BoxFuture, Judge, JudgeItem, Judgment};

/// The reward model's normalisation: goodness `g` becomes `(g - mean) / std` before the
/// squashing. For a reward worker that already returns normalised rewards use `mean: 0, std: 1`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RmNormalization {
    /// Mean goodness over the reward data set's responses.
    pub mean: f64,
    /// Standard deviation of goodness over the same responses (> 0).
    pub std: f64,
}

/// Maps a reward-model goodness score to MT-Bench's 1..=10 scale:
/// `1 + 9 * sigmoid((goodness - mean) / std)`.
///
/// `None` for a non-finite score, or a normalisation whose mean is not finite or whose std is
/// not finite and positive.
pub fn rm_rating(goodness: f64, norm: RmNormalization) -> Option<f64> {
    let usable = goodness.is_finite() && norm.mean.is_finite() && norm.std.is_finite();
    if !(usable && norm.std > 0.0) {
        return None;
    }
    let z = (goodness - norm.mean) / norm.std;
    // For z below about -710, exp(-z) overflows to inf and the sigmoid becomes exactly 0, its
    // true limit; no special case needed.
    let sigmoid = 1.0 / (1.0 + (-z).exp());
    let rating = 1.0 + 9.0 * sigmoid;
    rating.is_finite().then_some(rating)
}

/// Turns per-item goodness scores (`None` where the scorer had none) into judgments labelled
/// `judge`. `scores` must be as long as `items`; extra items get a failed judgment.
pub fn rm_judgments(
    items: &[JudgeItem<'_>],
    scores: &[Option<f64>],
    norm: RmNormalization,
    judge: &str,
) -> Vec<Judgment> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match scores.get(i).copied().flatten() {
            None => Judgment::failed(item, judge, "the reward model returned no score".into()),
            Some(g) => match rm_rating(g, norm) {
                Some(r) => Judgment::rated(item, judge, r, format!("goodness={g}")),
                None => Judgment::unparseable(
                    item,
                    judge,
                    format!("goodness={g}"),
                    format!(
                        "cannot map goodness {g} with mean {} and std {} to a rating",
                        norm.mean, norm.std
                    ),
                ),
            },
        })
        .collect()
}

/// Scores conversations with the run's reward model; implemented by the coordinator over its
/// reward workers.
pub trait GoodnessScorer: Send + Sync {
    /// The raw (not normalised) goodness of each conversation's final assistant message, one
    /// per conversation, in order. `Err` with a reason when scoring failed as a whole.
    fn score<'a>(
        &'a self,
        conversations: Vec<Vec<ChatMessage>>,
    ) -> BoxFuture<'a, Result<Vec<f64>, String>>;
}

/// A [`Judge`] that grades with a reward model through [`rm_rating`].
///
/// Each item's [`JudgeItem::conversation`] (no system prompt, ending with the graded answer)
/// is scored in one call to the scorer.
#[derive(Debug, Clone)]
pub struct RewardModelJudge<S> {
    scorer: S,
    norm: RmNormalization,
    name: String,
}

impl<S: GoodnessScorer> RewardModelJudge<S> {
    /// A judge named `reward-model` using `scorer` and `norm`.
    pub fn new(scorer: S, norm: RmNormalization) -> Self {
        Self {
            scorer,
            norm,
            name: "reward-model".into(),
        }
    }
}

impl<S: GoodnessScorer> Judge for RewardModelJudge<S> {
    fn name(&self) -> &str {
        &self.name
    }

    fn judge<'a>(&'a self, items: &'a [JudgeItem<'a>]) -> BoxFuture<'a, Vec<Judgment>> {
        Box::pin(async move {
            let conversations = items.iter().map(JudgeItem::conversation).collect();
            let failure = match self.scorer.score(conversations).await {
                Ok(scores) if scores.len() == items.len() => {
                    let scores: Vec<Option<f64>> = scores.into_iter().map(Some).collect();
                    return rm_judgments(items, &scores, self.norm, &self.name);
                }
                Ok(scores) => format!(
                    "the reward model returned {} scores for {} conversations",
                    scores.len(),
                    items.len()
                ),
                Err(e) => format!("reward-model scoring failed: {e}"),
            };
            tracing::warn!(judge = %self.name, "{failure}");
            items
                .iter()
                .map(|it| Judgment::failed(it, &self.name, failure.clone()))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::mt_bench_dir;
    use crate::judge::{judge_items, Outcome};
    use crate::MtBench;

    const NORM: RmNormalization = RmNormalization {
        mean: 2.0,
        std: 0.5,
    };

    #[test]
    fn mean_maps_to_five_and_a_half_and_std_to_the_documented_points() {
        assert_eq!(rm_rating(2.0, NORM), Some(5.5));
        let up = rm_rating(2.5, NORM).unwrap();
        let down = rm_rating(1.5, NORM).unwrap();
        assert!((up - 7.580).abs() < 1e-3, "{up}");
        assert!((down - 3.420).abs() < 1e-3, "{down}");
        assert!((up + down - 11.0).abs() < 1e-12);
    }

    #[test]
    fn mapping_is_monotone_and_bounded() {
        let mut last = 1.0;
        for i in -400..=400 {
            let g = f64::from(i) * 0.05;
            let r = rm_rating(g, NORM).unwrap();
            assert!(r >= last, "not monotone at {g}: {r} < {last}");
            assert!((1.0..=10.0).contains(&r), "{g} -> {r}");
            last = r;
        }
        assert_eq!(rm_rating(1e300, NORM), Some(10.0));
        assert_eq!(rm_rating(-1e300, NORM), Some(1.0));
    }

    #[test]
    fn non_finite_inputs_give_no_rating() {
        assert_eq!(rm_rating(f64::NAN, NORM), None);
        assert_eq!(rm_rating(f64::INFINITY, NORM), None);
        let bad_std = RmNormalization {
            mean: 0.0,
            std: 0.0,
        };
        assert_eq!(rm_rating(1.0, bad_std), None);
        let nan_mean = RmNormalization {
            mean: f64::NAN,
            std: 1.0,
        };
        assert_eq!(rm_rating(1.0, nan_mean), None);
    }

    struct FixedScorer(Result<Vec<f64>, String>);

    impl GoodnessScorer for FixedScorer {
        fn score<'a>(
            &'a self,
            conversations: Vec<Vec<ChatMessage>>,
        ) -> BoxFuture<'a, Result<Vec<f64>, String>> {
            Box::pin(async move {
                assert!(conversations.iter().all(|c| c.len() == 2 || c.len() == 4));
                self.0.clone()
            })
        }
    }

    #[tokio::test]
    async fn reward_model_judge_maps_scores_and_survives_failures() {
        let dir = mt_bench_dir();
        let bench = MtBench::load(&dir).unwrap();
        let answers = bench
            .model_answers("m", vec!["a".into(); 80], vec!["b".into(); 80])
            .unwrap();
        let items = judge_items(&bench, &answers).unwrap();

        let mut scores = vec![NORM.mean; 160];
        scores[5] = f64::NAN;
        let judge = RewardModelJudge::new(FixedScorer(Ok(scores)), NORM);
        let js = judge.judge(&items).await;
        assert_eq!(js.len(), 160);
        assert_eq!(js[0].rating, Some(5.5));
        assert_eq!(js[5].outcome, Outcome::Unparseable);
        assert_eq!(js[5].rating, None);

        let judge = RewardModelJudge::new(FixedScorer(Ok(vec![1.0; 3])), NORM);
        let js = judge.judge(&items).await;
        assert!(js.iter().all(|j| j.outcome == Outcome::Failed));
        assert!(js[0].error.as_deref().unwrap().contains("3 scores for 160"));

        let judge = RewardModelJudge::new(FixedScorer(Err("worker down".into())), NORM);
        let js = judge.judge(&items).await;
        assert!(js[7].error.as_deref().unwrap().contains("worker down"));
    }
}
