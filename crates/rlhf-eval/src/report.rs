//! Aggregating judgments into MT-Bench scores, and writing a validation to disk atomically.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::chat::Turn;
use crate::data::ModelAnswer;
use crate::error::{EvalError, Result};
use crate::judge::{Judgment, Outcome};

/// The model's answers, one JSON object per line (FastChat `model_answer` shape).
pub const ANSWERS_FILE: &str = "answers.jsonl";
/// One [`Judgment`] per line.
pub const JUDGMENTS_FILE: &str = "judgments.jsonl";
/// The [`Report`]; written last, so its presence means the directory is complete.
pub const SCORES_FILE: &str = "scores.json";

/// MT-Bench scores: means of the parsed 1..=10 ratings, as FastChat's `show_result.py`
/// computes them (missing ratings are left out, not counted as zero).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Mean over all rated (question, turn) pairs; `None` when nothing was rated.
    pub overall: Option<f64>,
    /// Mean over rated first turns.
    pub turn1: Option<f64>,
    /// Mean over rated second turns.
    pub turn2: Option<f64>,
    /// Mean per category over both turns; `None` for a category with no rating.
    pub per_category: BTreeMap<String, Option<f64>>,
    /// Judgments with a rating.
    pub judged: usize,
    /// Judgments without a rating (failed and unparseable).
    pub missing: usize,
    /// Of the missing: the judge answered but no valid rating could be read.
    pub unparseable: usize,
    /// Prompts the answering model saw cut from the left to fit its context (set by the caller
    /// that answered; 0 in reports written before it was recorded).
    #[serde(default)]
    pub truncated_prompts: usize,
}

#[derive(Default)]
struct Mean {
    sum: f64,
    n: usize,
}

impl Mean {
    fn add(&mut self, x: f64) {
        self.sum += x;
        self.n += 1;
    }

    fn get(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

impl Report {
    /// Aggregates judgments. A rating that is not finite is counted as missing (a judge
    /// implementation bug must not poison the mean).
    pub fn from_judgments(judgments: &[Judgment]) -> Self {
        let (mut all, mut t1, mut t2) = (Mean::default(), Mean::default(), Mean::default());
        let mut per_cat: BTreeMap<String, Mean> = BTreeMap::new();
        let (mut missing, mut unparseable) = (0, 0);
        for j in judgments {
            let cat = per_cat.entry(j.category.clone()).or_default();
            match j.rating.filter(|r| r.is_finite()) {
                Some(r) => {
                    all.add(r);
                    cat.add(r);
                    match j.turn {
                        Turn::First => t1.add(r),
                        Turn::Second => t2.add(r),
                    }
                }
                None => {
                    missing += 1;
                    if j.outcome == Outcome::Unparseable {
                        unparseable += 1;
                    }
                }
            }
        }
        Self {
            overall: all.get(),
            turn1: t1.get(),
            turn2: t2.get(),
            per_category: per_cat.into_iter().map(|(k, m)| (k, m.get())).collect(),
            judged: all.n,
            missing,
            unparseable,
            truncated_prompts: 0,
        }
    }

    /// Reads `scores.json` from a directory written by [`Validation::save`].
    pub fn read(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join(SCORES_FILE);
        let bytes = fs::read(&path).map_err(|source| EvalError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| EvalError::BadData {
            path,
            message: format!("not an MT-Bench report: {e}"),
        })
    }
}

/// One validation's results: what [`crate::validate`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    /// The model's answers, in question order.
    pub answers: Vec<ModelAnswer>,
    /// One judgment per (question, turn), question by question.
    pub judgments: Vec<Judgment>,
    /// The scores.
    pub report: Report,
}

impl Validation {
    /// Writes `answers.jsonl`, `judgments.jsonl` and `scores.json` (in that order) under `dir`,
    /// creating it; the coordinator passes `RUN/validation/step-NNNNNN/`.
    ///
    /// **Invariant:** every file is written to a temporary sibling, fsynced and renamed into
    /// place, and `scores.json` comes last: a crash leaves old or whole files, never half ones,
    /// and a directory with `scores.json` is complete.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|source| EvalError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_atomic(&dir.join(ANSWERS_FILE), &jsonl(&self.answers)?)?;
        write_atomic(&dir.join(JUDGMENTS_FILE), &jsonl(&self.judgments)?)?;
        let mut scores = to_json(&self.report, true)?;
        scores.push(b'\n');
        write_atomic(&dir.join(SCORES_FILE), &scores)?;
        tracing::debug!(dir = %dir.display(), "saved MT-Bench validation");
        Ok(())
    }
}

fn to_json<T: Serialize>(value: &T, pretty: bool) -> Result<Vec<u8>> {
    let r = if pretty {
        serde_json::to_vec_pretty(value)
    } else {
        serde_json::to_vec(value)
    };
    // Our types always serialise (string keys, finite-or-null floats); keep the error anyway.
    r.map_err(|e| EvalError::Answers(format!("cannot serialise results: {e}")))
}

fn jsonl<T: Serialize>(rows: &[T]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for row in rows {
        out.extend(to_json(row, false)?);
        out.push(b'\n');
    }
    Ok(out)
}

/// Writes `bytes` to `path` atomically and durably through `atomic-write-file` (temporary file,
/// fsync, rename, directory fsync): readers see the old report or the new one, never a torn one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = atomic_write_file::AtomicWriteFile::open(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.commit().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(id: u64, cat: &str, turn: Turn, rating: Option<f64>, outcome: Outcome) -> Judgment {
        Judgment {
            question_id: id,
            category: cat.into(),
            turn,
            judge: "t".into(),
            rating,
            outcome,
            judge_output: None,
            error: None,
        }
    }

    #[test]
    fn aggregates_means_and_counts() {
        use Outcome::*;
        use Turn::*;
        let js = vec![
            j(1, "math", First, Some(2.0), Rated),
            j(1, "math", Second, Some(4.0), Rated),
            j(2, "writing", First, Some(9.0), Rated),
            j(2, "writing", Second, None, Unparseable),
            j(3, "stem", First, None, Failed),
            j(3, "stem", Second, None, Failed),
            // A buggy judge's NaN counts as missing, not as a rating.
            j(4, "math", First, Some(f64::NAN), Rated),
        ];
        let r = Report::from_judgments(&js);
        assert_eq!(r.overall, Some(5.0));
        assert_eq!(r.turn1, Some(5.5));
        assert_eq!(r.turn2, Some(4.0));
        assert_eq!(r.per_category["math"], Some(3.0));
        assert_eq!(r.per_category["writing"], Some(9.0));
        assert_eq!(r.per_category["stem"], None);
        assert_eq!((r.judged, r.missing, r.unparseable), (3, 4, 1));
    }

    #[test]
    fn nothing_judged_means_no_score() {
        let r = Report::from_judgments(&[j(1, "math", Turn::First, None, Outcome::Failed)]);
        assert_eq!((r.overall, r.turn1, r.turn2), (None, None, None));
        assert_eq!((r.judged, r.missing), (0, 1));
        let empty = Report::from_judgments(&[]);
        assert_eq!(empty.overall, None);
        assert!(empty.per_category.is_empty());
    }

    #[test]
    fn save_writes_three_files_and_no_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("validation/step-000004");
        let judgments = vec![
            j(81, "writing", Turn::First, Some(7.0), Outcome::Rated),
            j(81, "writing", Turn::Second, None, Outcome::Failed),
        ];
        let v = Validation {
            answers: vec![ModelAnswer {
                question_id: 81,
                category: "writing".into(),
                model_id: "policy".into(),
                turns: ["a".into(), "b\nc".into()],
            }],
            report: Report::from_judgments(&judgments),
            judgments,
        };
        v.save(&dir).unwrap();
        // Saving again replaces the files in place.
        v.save(&dir).unwrap();
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [ANSWERS_FILE, JUDGMENTS_FILE, SCORES_FILE]);

        let answers = fs::read_to_string(dir.join(ANSWERS_FILE)).unwrap();
        assert_eq!(answers.lines().count(), 1);
        let back: ModelAnswer = serde_json::from_str(answers.trim_end()).unwrap();
        assert_eq!(back, v.answers[0]);

        let lines: Vec<Judgment> = fs::read_to_string(dir.join(JUDGMENTS_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, v.judgments);
        let text = fs::read_to_string(dir.join(JUDGMENTS_FILE)).unwrap();
        assert!(text.contains(r#""turn":2"#), "{text}");
        assert!(text.contains(r#""outcome":"failed""#), "{text}");

        assert_eq!(Report::read(&dir).unwrap(), v.report);
    }

    #[test]
    fn save_into_an_unwritable_place_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let v = Validation {
            answers: vec![],
            judgments: vec![],
            report: Report::from_judgments(&[]),
        };
        let err = v.save(file.join("sub")).unwrap_err().to_string();
        assert!(err.contains("not-a-dir"), "{err}");
    }
}
