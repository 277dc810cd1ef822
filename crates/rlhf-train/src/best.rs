//! Keeping the best checkpoint of a job by its held-out metric, and stopping early on it.
//!
//! Every evaluation on `data.eval` writes a checkpoint; [`Ranking`] (`checkpoints/ranking.json`,
//! the job counterpart of the RLHF run's file of the same name) lists the evaluated checkpoints
//! best first and names `best`, which carries `rlhf-ckpt`'s `PROTECTED` marker so retention
//! (`checkpoint.keep_last`) never deletes it. [`Tracker`] holds the best evaluation and the
//! evaluations since it in the trainer state, so a resumed job keeps counting where it was.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::EarlyStopConfig;
use crate::error::{Result, TrainError};

/// The file, in `RUN/checkpoints/`.
pub const RANKING_FILE: &str = "ranking.json";

/// The held-out metric a job is judged by: a key of its evaluation object and its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    pub metric: &'static str,
    pub higher_is_better: bool,
}

impl Selection {
    /// The metric's value in an evaluation; `None` when it is missing or not finite (a diverged
    /// model), which never counts as an improvement.
    pub fn value(&self, eval: &Value) -> Option<f64> {
        eval.get(self.metric)
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite())
    }

    /// Whether `x` beats `than` by more than `margin`.
    pub fn beats(&self, x: f64, than: f64, margin: f64) -> bool {
        if self.higher_is_better {
            x > than + margin
        } else {
            x < than - margin
        }
    }

    /// "higher" or "lower", for messages.
    pub fn better_word(&self) -> &'static str {
        if self.higher_is_better {
            "higher"
        } else {
            "lower"
        }
    }
}

/// The best evaluation so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BestEval {
    pub step: u64,
    pub metric: String,
    pub value: f64,
    /// The whole evaluation object of that step.
    pub eval: Value,
}

/// Best-evaluation bookkeeping, stored in the trainer state of every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tracker {
    pub best: Option<BestEval>,
    /// Evaluations since the last one that beat the best by more than
    /// `train.early_stop.min_delta`.
    pub evals_without_improvement: u64,
}

impl Tracker {
    /// Takes the evaluation of `step`: it becomes the best when it beats the best at all; the
    /// patience count restarts only when it beats it by more than `min_delta`. Returns the
    /// metric's value.
    pub fn observe(
        &mut self,
        step: u64,
        eval: &Value,
        sel: Selection,
        min_delta: f64,
    ) -> Option<f64> {
        let value = sel.value(eval);
        let (new_best, improved) = match (value, &self.best) {
            (None, _) => (false, false),
            (Some(_), None) => (true, true),
            (Some(x), Some(b)) => (sel.beats(x, b.value, 0.0), sel.beats(x, b.value, min_delta)),
        };
        if improved {
            self.evals_without_improvement = 0;
        } else {
            self.evals_without_improvement += 1;
        }
        if let (true, Some(x)) = (new_best, value) {
            self.best = Some(BestEval {
                step,
                metric: sel.metric.to_string(),
                value: x,
                eval: eval.clone(),
            });
        }
        value
    }

    /// Why the job stops now under `early_stop`, or `None` to go on.
    pub fn early_stop_reason(&self, sel: Selection, es: &EarlyStopConfig) -> Option<String> {
        if self.evals_without_improvement < es.patience {
            return None;
        }
        let best = match &self.best {
            Some(b) => format!("{:.6} at step {}", b.value, b.step),
            None => "no finite value yet".into(),
        };
        Some(format!(
            "early stop: held-out {} has not got {} by more than {} (train.early_stop.min_delta) \
             in {} evaluations in a row (train.early_stop.patience {}); best {best}",
            sel.metric,
            sel.better_word(),
            es.min_delta,
            self.evals_without_improvement,
            es.patience,
        ))
    }
}

/// One evaluated checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ranked {
    pub step: u64,
    /// The directory under `RUN/checkpoints/`, e.g. `step-000040`.
    pub checkpoint: String,
    /// The metric's value; null when it was not finite.
    pub score: Option<f64>,
}

/// `RUN/checkpoints/ranking.json`: the evaluated checkpoints that still exist, best first
/// (missing scores last, ties to the earlier step); `best` names the top one's directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ranking {
    /// The held-out metric (a key of the `eval` records in `metrics.jsonl`).
    pub metric: String,
    pub higher_is_better: bool,
    pub best: Option<String>,
    pub entries: Vec<Ranked>,
}

impl Ranking {
    pub fn path(run_dir: &Path) -> PathBuf {
        rlhf_ckpt::checkpoints_dir(run_dir).join(RANKING_FILE)
    }

    /// Reads the file, or `None` when there is none.
    pub fn read(run_dir: &Path) -> Result<Option<Ranking>> {
        let path = Ranking::path(run_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| TrainError::Data {
                    path: path.clone(),
                    msg: format!(
                        "does not parse ({e}); delete it, the next evaluation rewrites it"
                    ),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TrainError::io(&path, e)),
        }
    }

    /// Records the evaluation of the checkpoint of `step` (just committed), drops entries of
    /// later steps (a run that was resumed from before them) and of deleted checkpoints, writes
    /// the file, and moves the protection marker onto the best checkpoint. Run before
    /// retention.
    pub fn record(
        run_dir: &Path,
        sel: Selection,
        step: u64,
        score: Option<f64>,
    ) -> Result<Ranking> {
        let mut r = match Ranking::read(run_dir)? {
            Some(r) if r.metric == sel.metric && r.higher_is_better == sel.higher_is_better => r,
            _ => Ranking {
                metric: sel.metric.to_string(),
                higher_is_better: sel.higher_is_better,
                best: None,
                entries: Vec::new(),
            },
        };
        let ckpts = rlhf_ckpt::checkpoints_dir(run_dir);
        r.entries
            .retain(|e| e.step < step && ckpts.join(rlhf_ckpt::dir_name(e.step)).is_dir());
        r.entries.push(Ranked {
            step,
            checkpoint: rlhf_ckpt::dir_name(step),
            score,
        });
        r.entries.sort_by(|a, b| match (a.score, b.score) {
            (Some(x), Some(y)) => {
                let order = if sel.higher_is_better {
                    y.total_cmp(&x)
                } else {
                    x.total_cmp(&y)
                };
                order.then(a.step.cmp(&b.step))
            }
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.step.cmp(&b.step),
        });
        r.best = r
            .entries
            .first()
            .filter(|e| e.score.is_some())
            .map(|e| e.checkpoint.clone());
        let mut bytes = serde_json::to_vec_pretty(&r).map_err(|e| TrainError::Data {
            path: Ranking::path(run_dir),
            msg: format!("cannot serialise: {e}"),
        })?;
        bytes.push(b'\n');
        rlhf_ckpt::write_atomic(&Ranking::path(run_dir), &bytes)?;
        // Directories come from step numbers, never from the file's text, so a edited file
        // cannot point protection outside the checkpoints directory.
        for (i, e) in r.entries.iter().enumerate() {
            let dir = ckpts.join(rlhf_ckpt::dir_name(e.step));
            if i == 0 && e.score.is_some() {
                rlhf_ckpt::protect(&dir)?;
            } else {
                rlhf_ckpt::unprotect(&dir)?;
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ACC: Selection = Selection {
        metric: "accuracy",
        higher_is_better: true,
    };
    const LOSS: Selection = Selection {
        metric: "nll",
        higher_is_better: false,
    };

    #[test]
    fn tracker_counts_evaluations_without_improvement() {
        let es = EarlyStopConfig {
            patience: 2,
            min_delta: 0.05,
        };
        let mut t = Tracker::default();
        t.observe(1, &json!({"accuracy": 0.6}), ACC, es.min_delta);
        assert_eq!(t.best.as_ref().unwrap().step, 1);
        // Better, but by less than min_delta: the new best, yet no improvement for patience.
        t.observe(2, &json!({"accuracy": 0.62}), ACC, es.min_delta);
        assert_eq!(
            (t.best.as_ref().unwrap().step, t.evals_without_improvement),
            (2, 1)
        );
        assert!(t.early_stop_reason(ACC, &es).is_none());
        t.observe(3, &json!({"accuracy": f64::NAN}), ACC, es.min_delta);
        let why = t.early_stop_reason(ACC, &es).unwrap();
        assert!(
            why.contains("accuracy") && why.contains("patience 2") && why.contains("at step 2"),
            "{why}"
        );
        t.observe(4, &json!({"accuracy": 0.9}), ACC, es.min_delta);
        assert_eq!(
            (t.best.as_ref().unwrap().step, t.evals_without_improvement),
            (4, 0)
        );
        // Lower is better for losses.
        let mut l = Tracker::default();
        l.observe(1, &json!({"nll": 2.0}), LOSS, 0.0);
        l.observe(2, &json!({"nll": 2.5}), LOSS, 0.0);
        assert_eq!(
            (l.best.as_ref().unwrap().value, l.evals_without_improvement),
            (2.0, 1)
        );
    }

    #[test]
    fn ranking_protects_the_best_and_forgets_gone_or_later_steps() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let commit = |step: u64| {
            let w = rlhf_ckpt::CheckpointWriter::begin(run, step).unwrap();
            w.write_file("x", b"x").unwrap();
            w.commit(json!({})).unwrap();
        };
        let dir = |step| rlhf_ckpt::checkpoints_dir(run).join(rlhf_ckpt::dir_name(step));
        for (step, loss) in [(1, Some(3.0)), (2, Some(2.0)), (3, None), (4, Some(2.0))] {
            commit(step);
            Ranking::record(run, LOSS, step, loss).unwrap();
        }
        let r = Ranking::read(run).unwrap().unwrap();
        let steps: Vec<u64> = r.entries.iter().map(|e| e.step).collect();
        assert_eq!(
            steps,
            [2, 4, 1, 3],
            "lowest loss first, ties to the earlier step"
        );
        assert_eq!(r.best.as_deref(), Some("step-000002"));
        assert!(rlhf_ckpt::is_protected(&dir(2)));
        assert!(!rlhf_ckpt::is_protected(&dir(1)) && !rlhf_ckpt::is_protected(&dir(4)));
        // Resumed from step 2 (later entries are another history); step 1 was deleted.
        std::fs::remove_dir_all(dir(1)).unwrap();
        commit(3);
        let r = Ranking::record(run, LOSS, 3, Some(1.0)).unwrap();
        let steps: Vec<u64> = r.entries.iter().map(|e| e.step).collect();
        assert_eq!(steps, [3, 2]);
        assert!(rlhf_ckpt::is_protected(&dir(3)) && !rlhf_ckpt::is_protected(&dir(2)));
        std::fs::write(Ranking::path(run), "{").unwrap();
        let e = Ranking::read(run).unwrap_err().to_string();
        assert!(e.contains("ranking.json") && e.contains("delete it"), "{e}");
    }
}
