//! Loading MT-Bench in FastChat's `llm_judge` layout and turning it into conversations.
//!
//! ```text
//! DIR/question.jsonl                 {"question_id", "category", "turns": [t1, t2], "reference"?}
//! DIR/judge_prompts.jsonl            {"name", "type", "system_prompt", "prompt_template", "output_format", ...}
//! DIR/reference_answer/gpt-4.jsonl   {"question_id", "choices": [{"turns": [r1, r2]}], ...}
//! ```
//!
//! **Boundary:** these files come from users (FastChat's `fastchat/llm_judge/data/mt_bench/`).
//! Every defect is reported with the file and the 1-based line; fields this crate does not use
//! are ignored so other FastChat question sets load as well.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::chat::{ChatMessage, Turn};
use crate::error::{EvalError, Result};
use crate::prompt::{self, PromptKind};

/// Categories whose questions are judged against a reference answer (FastChat's
/// `NEED_REF_CATS`, without its `arena-hard-200`, which is not an MT-Bench category).
pub const NEED_REF_CATEGORIES: [&str; 3] = ["math", "reasoning", "coding"];

/// One MT-Bench question: two user turns, plus the reference answers when its category needs
/// them.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// FastChat's id (81..=160 in MT-Bench).
    pub question_id: u64,
    /// One of writing, roleplay, reasoning, math, coding, extraction, stem, humanities.
    pub category: String,
    /// The first question and the follow-up.
    pub turns: [String; 2],
    /// The optional `reference` field of `question.jsonl` (short hints; FastChat's judges do
    /// not use it, and neither does this crate).
    pub reference: Option<Vec<String>>,
    /// GPT-4's answers to both turns from `reference_answer/gpt-4.jsonl`; always present for
    /// the categories in [`NEED_REF_CATEGORIES`] (checked at load time).
    pub reference_answer: Option<[String; 2]>,
}

impl Question {
    /// Whether the judge compares against a reference answer (the category is in
    /// [`NEED_REF_CATEGORIES`]).
    pub fn needs_reference(&self) -> bool {
        NEED_REF_CATEGORIES.contains(&self.category.as_str())
    }

    /// The question text of `turn`.
    pub fn turn(&self, turn: Turn) -> &str {
        &self.turns[turn.index()]
    }
}

/// One line of `judge_prompts.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgePrompt {
    /// For example `single-v1` or `single-math-v1-multi-turn`.
    pub name: String,
    /// `single` (one answer, a 1..10 rating) or `pairwise`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The judge's system message.
    pub system_prompt: String,
    /// The user message, with Python `str.format` placeholders such as `{question}`.
    pub prompt_template: String,
    /// `[[rating]]` for single-answer prompts.
    pub output_format: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// `general` or `math`.
    #[serde(default)]
    pub category: Option<String>,
}

/// The judge prompts of the data set, with the four single-answer prompts MT-Bench grading
/// uses picked out and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgePrompts {
    /// `single-v1`: first turn, general categories.
    pub single: JudgePrompt,
    /// `single-v1-multi-turn`: second turn, general categories.
    pub single_multi_turn: JudgePrompt,
    /// `single-math-v1`: first turn, with the reference answer.
    pub single_math: JudgePrompt,
    /// `single-math-v1-multi-turn`: second turn, with the reference answers.
    pub single_math_multi_turn: JudgePrompt,
    /// Every prompt in the file, in file order (pairwise ones included).
    pub all: Vec<JudgePrompt>,
}

impl JudgePrompts {
    /// The prompt FastChat uses for `kind`.
    pub fn get(&self, kind: PromptKind) -> &JudgePrompt {
        match kind {
            PromptKind::Single => &self.single,
            PromptKind::SingleMultiTurn => &self.single_multi_turn,
            PromptKind::SingleMath => &self.single_math,
            PromptKind::SingleMathMultiTurn => &self.single_math_multi_turn,
        }
    }
}

/// A model's answers to one question, in FastChat's `model_answer` shape when serialised
/// (`question_id`, `model_id`, `choices: [{index: 0, turns}]`, plus `category`), so FastChat's
/// own scripts can read the `answers.jsonl` this crate writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "ModelAnswerRecord", try_from = "ModelAnswerRecord")]
pub struct ModelAnswer {
    /// The question answered.
    pub question_id: u64,
    /// The question's category (repeated so the file reads on its own).
    pub category: String,
    /// Who answered, for example `policy-step-000120`.
    pub model_id: String,
    /// The answers to the first and the second turn.
    pub turns: [String; 2],
}

#[derive(Serialize, Deserialize)]
struct ModelAnswerRecord {
    question_id: u64,
    category: String,
    model_id: String,
    choices: Vec<ChoiceRecord>,
}

#[derive(Serialize, Deserialize)]
struct ChoiceRecord {
    index: u32,
    turns: Vec<String>,
}

impl From<ModelAnswer> for ModelAnswerRecord {
    fn from(a: ModelAnswer) -> Self {
        Self {
            question_id: a.question_id,
            category: a.category,
            model_id: a.model_id,
            choices: vec![ChoiceRecord {
                index: 0,
                turns: a.turns.to_vec(),
            }],
        }
    }
}

impl TryFrom<ModelAnswerRecord> for ModelAnswer {
    type Error = String;

    fn try_from(r: ModelAnswerRecord) -> std::result::Result<Self, String> {
        let choice = r
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| format!("question {}: `choices` is empty", r.question_id))?;
        let turns = two_turns(choice.turns)
            .map_err(|n| format!("question {}: {n} turns, expected 2", r.question_id))?;
        Ok(Self {
            question_id: r.question_id,
            category: r.category,
            model_id: r.model_id,
            turns,
        })
    }
}

/// The MT-Bench data set, loaded and checked.
#[derive(Debug, Clone)]
pub struct MtBench {
    dir: PathBuf,
    questions: Vec<Question>,
    prompts: JudgePrompts,
}

/// File names inside the data directory.
pub const QUESTION_FILE: &str = "question.jsonl";
/// See [`QUESTION_FILE`].
pub const JUDGE_PROMPT_FILE: &str = "judge_prompts.jsonl";
/// See [`QUESTION_FILE`].
pub const REFERENCE_FILE: &str = "reference_answer/gpt-4.jsonl";

#[derive(Deserialize)]
struct RawQuestion {
    question_id: u64,
    category: String,
    turns: Vec<String>,
    #[serde(default)]
    reference: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawReference {
    question_id: u64,
    choices: Vec<RawChoice>,
}

#[derive(Deserialize)]
struct RawChoice {
    turns: Vec<String>,
}

impl MtBench {
    /// Loads `question.jsonl`, `judge_prompts.jsonl` and `reference_answer/gpt-4.jsonl` from
    /// `dir` (FastChat's `fastchat/llm_judge/data/mt_bench/` layout).
    ///
    /// Fails on a missing file (naming it and where the data comes from), on any bad line
    /// (file, line and what is wrong: bad JSON, missing field, other than 2 turns, duplicate
    /// id), on a missing or unusable single-answer judge prompt, and on a question in
    /// [`NEED_REF_CATEGORIES`] without a reference answer.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();

        let qpath = dir.join(QUESTION_FILE);
        let mut questions = Vec::new();
        let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
        for (line, raw) in read_jsonl::<RawQuestion>(&qpath)? {
            let bad = |message: String| EvalError::BadLine {
                path: qpath.clone(),
                line,
                message,
            };
            if let Some(first) = seen.insert(raw.question_id, line) {
                return Err(bad(format!(
                    "duplicate question_id {} (first on line {first})",
                    raw.question_id
                )));
            }
            let turns = two_turns(raw.turns).map_err(|n| {
                bad(format!(
                    "question {} has {n} turns; MT-Bench questions have exactly 2",
                    raw.question_id
                ))
            })?;
            questions.push(Question {
                question_id: raw.question_id,
                category: raw.category,
                turns,
                reference: raw.reference,
                reference_answer: None,
            });
        }
        if questions.is_empty() {
            return Err(EvalError::BadData {
                path: qpath,
                message: "no questions in the file".into(),
            });
        }

        let rpath = dir.join(REFERENCE_FILE);
        let mut refs: BTreeMap<u64, ([String; 2], usize)> = BTreeMap::new();
        for (line, raw) in read_jsonl::<RawReference>(&rpath)? {
            let bad = |message: String| EvalError::BadLine {
                path: rpath.clone(),
                line,
                message,
            };
            if let Some((_, first)) = refs.get(&raw.question_id) {
                return Err(bad(format!(
                    "duplicate question_id {} (first on line {first})",
                    raw.question_id
                )));
            }
            let choice = raw.choices.into_iter().next().ok_or_else(|| {
                bad(format!(
                    "reference answer for question {} has an empty `choices`",
                    raw.question_id
                ))
            })?;
            let turns = two_turns(choice.turns).map_err(|n| {
                bad(format!(
                    "reference answer for question {} has {n} turns, expected 2",
                    raw.question_id
                ))
            })?;
            refs.insert(raw.question_id, (turns, line));
        }
        for q in &mut questions {
            q.reference_answer = refs.remove(&q.question_id).map(|(t, _)| t);
            if q.needs_reference() && q.reference_answer.is_none() {
                return Err(EvalError::BadData {
                    path: rpath,
                    message: format!(
                        "question {} (category {}) needs a reference answer and has none; \
                         use the reference_answer/gpt-4.jsonl that comes with the questions",
                        q.question_id, q.category
                    ),
                });
            }
        }
        for (id, (_, line)) in refs {
            tracing::warn!(
                file = %rpath.display(),
                line,
                question_id = id,
                "reference answer for a question not in question.jsonl; ignored"
            );
        }

        let prompts = load_prompts(&dir.join(JUDGE_PROMPT_FILE))?;
        tracing::debug!(dir = %dir.display(), questions = questions.len(), "loaded MT-Bench");
        Ok(Self {
            dir,
            questions,
            prompts,
        })
    }

    /// The directory the data came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The questions in file order; answers and conversations follow this order.
    pub fn questions(&self) -> &[Question] {
        &self.questions
    }

    /// Keeps only the first `n` questions (quick validations); everything after follows the
    /// shorter list.
    pub fn truncate(&mut self, n: usize) {
        self.questions.truncate(n);
    }

    /// The judge prompts.
    pub fn judge_prompts(&self) -> &JudgePrompts {
        &self.prompts
    }

    /// First-turn prompts, one per question in [`Self::questions`] order:
    /// `[system?, user: turn 1]`. The caller applies its chat template and generates.
    pub fn turn1_conversations(&self, system: Option<&str>) -> Vec<Vec<ChatMessage>> {
        self.questions
            .iter()
            .map(|q| {
                let mut c = system_message(system);
                c.push(ChatMessage::user(q.turns[0].clone()));
                c
            })
            .collect()
    }

    /// Second-turn prompts: `[system?, user: turn 1, assistant: answers1[i], user: turn 2]`.
    /// `answers1` are the model's first-turn answers in [`Self::questions`] order.
    pub fn turn2_conversations(
        &self,
        system: Option<&str>,
        answers1: &[String],
    ) -> Result<Vec<Vec<ChatMessage>>> {
        self.check_len("first-turn answers", answers1.len())?;
        Ok(self
            .questions
            .iter()
            .zip(answers1)
            .map(|(q, a1)| {
                let mut c = system_message(system);
                c.push(ChatMessage::user(q.turns[0].clone()));
                c.push(ChatMessage::assistant(a1.clone()));
                c.push(ChatMessage::user(q.turns[1].clone()));
                c
            })
            .collect())
    }

    /// Pairs the two batches of generated answers with their questions.
    pub fn model_answers(
        &self,
        model_id: &str,
        answers1: Vec<String>,
        answers2: Vec<String>,
    ) -> Result<Vec<ModelAnswer>> {
        self.check_len("first-turn answers", answers1.len())?;
        self.check_len("second-turn answers", answers2.len())?;
        Ok(self
            .questions
            .iter()
            .zip(answers1.into_iter().zip(answers2))
            .map(|(q, (a1, a2))| ModelAnswer {
                question_id: q.question_id,
                category: q.category.clone(),
                model_id: model_id.to_owned(),
                turns: [a1, a2],
            })
            .collect())
    }

    /// Checks that `answers` are this data set's questions in order, so judges can zip them.
    pub(crate) fn check_answers(&self, answers: &[ModelAnswer]) -> Result<()> {
        self.check_len("model answers", answers.len())?;
        for (i, (q, a)) in self.questions.iter().zip(answers).enumerate() {
            if q.question_id != a.question_id {
                return Err(EvalError::Answers(format!(
                    "answer {i} is for question {} but question {i} is {}; \
                     build answers with MtBench::model_answers",
                    a.question_id, q.question_id
                )));
            }
        }
        Ok(())
    }

    fn check_len(&self, what: &str, n: usize) -> Result<()> {
        if n == self.questions.len() {
            Ok(())
        } else {
            Err(EvalError::Answers(format!(
                "{n} {what} for {} questions; give one per question, in question order",
                self.questions.len()
            )))
        }
    }
}

fn system_message(system: Option<&str>) -> Vec<ChatMessage> {
    system.map(ChatMessage::system).into_iter().collect()
}

/// `Ok([a, b])` for exactly two turns, else `Err(count)`.
fn two_turns(turns: Vec<String>) -> std::result::Result<[String; 2], usize> {
    let n = turns.len();
    <[String; 2]>::try_from(turns).map_err(|_| n)
}

fn load_prompts(path: &Path) -> Result<JudgePrompts> {
    let mut all: Vec<(usize, JudgePrompt)> = Vec::new();
    for (line, p) in read_jsonl::<JudgePrompt>(path)? {
        if let Some((first, _)) = all.iter().find(|(_, q)| q.name == p.name) {
            return Err(EvalError::BadLine {
                path: path.to_path_buf(),
                line,
                message: format!(
                    "duplicate judge prompt name {:?} (first on line {first})",
                    p.name
                ),
            });
        }
        all.push((line, p));
    }
    let pick = |kind: PromptKind| -> Result<JudgePrompt> {
        let name = kind.prompt_name();
        let (line, p) =
            all.iter()
                .find(|(_, p)| p.name == name)
                .ok_or_else(|| EvalError::BadData {
                    path: path.to_path_buf(),
                    message: format!(
                        "judge prompt {name:?} is missing; MT-Bench single-answer grading needs \
                     single-v1, single-v1-multi-turn, single-math-v1 and \
                     single-math-v1-multi-turn"
                    ),
                })?;
        prompt::check_prompt(kind, p).map_err(|message| EvalError::BadLine {
            path: path.to_path_buf(),
            line: *line,
            message,
        })?;
        Ok(p.clone())
    };
    Ok(JudgePrompts {
        single: pick(PromptKind::Single)?,
        single_multi_turn: pick(PromptKind::SingleMultiTurn)?,
        single_math: pick(PromptKind::SingleMath)?,
        single_math_multi_turn: pick(PromptKind::SingleMathMultiTurn)?,
        all: all.into_iter().map(|(_, p)| p).collect(),
    })
}

/// Reads a JSON-lines file into `(1-based line, value)` pairs, skipping blank lines.
fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let text = fs::read_to_string(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => EvalError::MissingFile {
            path: path.to_path_buf(),
        },
        _ => EvalError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(line).map_err(|e| EvalError::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            message: describe_json_error(&e),
        })?;
        out.push((i + 1, value));
    }
    Ok(out)
}

/// serde_json's message without its "at line 1 column N" (every line is parsed alone, so its
/// line number would mislead), with the column kept.
fn describe_json_error(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let msg = full.strip_suffix(&suffix).unwrap_or(&full);
    match e.classify() {
        serde_json::error::Category::Data => format!("{msg} (column {})", e.column()),
        _ => format!("invalid JSON: {msg} (column {})", e.column()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The MT-Bench data the tests read: `RLHF_MT_BENCH_DIR`, else `shared/data/mt_bench` beside
    /// the repository, else (a fresh clone) the fixture of the same shape, written once per test
    /// process. Every test runs either way; none skips.
    pub(crate) fn mt_bench_dir() -> PathBuf {
        static FIXTURE: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> =
            std::sync::OnceLock::new();
        let (_, dir) = FIXTURE.get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let dir = crate::fixture::shared_or_fixture(tmp.path()).unwrap();
            (tmp, dir)
        });
        dir.clone()
    }

    /// A copy of the shared data in a temp dir, with `edit(file name, text) -> text` applied.
    fn edited_copy(edit: impl Fn(&str, String) -> String) -> tempfile::TempDir {
        let src = mt_bench_dir();
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("reference_answer")).unwrap();
        for name in [QUESTION_FILE, JUDGE_PROMPT_FILE, REFERENCE_FILE] {
            let text = fs::read_to_string(src.join(name)).unwrap();
            fs::write(tmp.path().join(name), edit(name, text)).unwrap();
        }
        tmp
    }

    fn replace_line(text: &str, line: usize, new: &str) -> String {
        text.lines()
            .enumerate()
            .map(|(i, l)| if i + 1 == line { new } else { l })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn loads_the_shared_data() {
        let dir = mt_bench_dir();
        let bench = MtBench::load(&dir).unwrap();
        let qs = bench.questions();
        assert_eq!(qs.len(), 80);
        let mut per_cat: BTreeMap<&str, usize> = BTreeMap::new();
        for q in qs {
            *per_cat.entry(q.category.as_str()).or_default() += 1;
            assert!(q.turns.iter().all(|t| !t.is_empty()), "{}", q.question_id);
            if q.needs_reference() {
                let r = q.reference_answer.as_ref().unwrap();
                assert!(r.iter().all(|t| !t.is_empty()), "{}", q.question_id);
            }
        }
        assert_eq!(per_cat.len(), 8, "{per_cat:?}");
        assert!(per_cat.values().all(|&n| n == 10), "{per_cat:?}");
        let with_ref = qs.iter().filter(|q| q.needs_reference()).count();
        assert_eq!(with_ref, 30);
        assert_eq!(bench.judge_prompts().all.len(), 8);
        assert_eq!(bench.judge_prompts().single_math.name, "single-math-v1");
    }

    #[test]
    fn conversations_follow_question_order() {
        let dir = mt_bench_dir();
        let bench = MtBench::load(&dir).unwrap();
        let c1 = bench.turn1_conversations(Some("be brief"));
        assert_eq!(c1.len(), 80);
        assert_eq!(c1[3][0], ChatMessage::system("be brief"));
        assert_eq!(
            c1[3][1],
            ChatMessage::user(bench.questions()[3].turns[0].clone())
        );
        let a1: Vec<String> = (0..80).map(|i| format!("a{i}")).collect();
        let c2 = bench.turn2_conversations(None, &a1).unwrap();
        let q = &bench.questions()[7];
        assert_eq!(
            c2[7],
            vec![
                ChatMessage::user(q.turns[0].clone()),
                ChatMessage::assistant("a7"),
                ChatMessage::user(q.turns[1].clone()),
            ]
        );
        let err = bench.turn2_conversations(None, &a1[1..]).unwrap_err();
        assert!(
            err.to_string().contains("79 first-turn answers for 80"),
            "{err}"
        );
    }

    #[test]
    fn model_answers_round_trip_in_fastchat_shape() {
        let a = ModelAnswer {
            question_id: 81,
            category: "writing".into(),
            model_id: "m".into(),
            turns: ["x".into(), "y".into()],
        };
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["choices"][0]["turns"][1], "y");
        assert_eq!(v["choices"][0]["index"], 0);
        assert_eq!(serde_json::from_value::<ModelAnswer>(v).unwrap(), a);
    }

    #[test]
    fn missing_file_names_path_and_source() {
        let tmp = tempfile::tempdir().unwrap();
        let err = MtBench::load(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("question.jsonl: file not found"), "{err}");
        assert!(err.contains("fastchat/llm_judge/data/mt_bench/"), "{err}");
    }

    fn load_err(file: &'static str, edit: impl Fn(String) -> String) -> String {
        let tmp = edited_copy(|name, text| if name == file { edit(text) } else { text });
        MtBench::load(tmp.path()).unwrap_err().to_string()
    }

    #[test]
    fn bad_json_names_file_and_line() {
        let err = load_err(QUESTION_FILE, |t| {
            replace_line(&t, 5, "{\"question_id\": 85,")
        });
        assert!(err.contains("question.jsonl:5: invalid JSON"), "{err}");
    }

    #[test]
    fn missing_field_names_file_line_and_field() {
        let err = load_err(QUESTION_FILE, |t| {
            replace_line(&t, 12, r#"{"question_id": 92, "turns": ["a", "b"]}"#)
        });
        assert!(
            err.contains("question.jsonl:12: missing field `category`"),
            "{err}"
        );
    }

    #[test]
    fn three_turns_is_an_error() {
        let err = load_err(QUESTION_FILE, |t| {
            replace_line(
                &t,
                3,
                r#"{"question_id": 83, "category": "writing", "turns": ["a", "b", "c"]}"#,
            )
        });
        assert!(
            err.contains("question.jsonl:3: question 83 has 3 turns"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_question_id_is_an_error() {
        let err = load_err(QUESTION_FILE, |t| {
            replace_line(
                &t,
                4,
                r#"{"question_id": 81, "category": "writing", "turns": ["a", "b"]}"#,
            )
        });
        assert!(
            err.contains("question.jsonl:4: duplicate question_id 81 (first on line 1)"),
            "{err}"
        );
    }

    #[test]
    fn bad_reference_line_names_file_and_line() {
        let err = load_err(REFERENCE_FILE, |t| {
            replace_line(
                &t,
                2,
                r#"{"question_id": 102, "choices": [{"turns": ["only one"]}]}"#,
            )
        });
        assert!(
            err.contains("gpt-4.jsonl:2: reference answer for question 102 has 1 turns"),
            "{err}"
        );
    }

    #[test]
    fn missing_reference_names_the_question() {
        // Drop the line of question 123 (coding).
        let err = load_err(REFERENCE_FILE, |t| {
            t.lines()
                .filter(|l| !l.starts_with(r#"{"question_id": 123,"#))
                .collect::<Vec<_>>()
                .join("\n")
        });
        assert!(
            err.contains("question 123 (category coding) needs a reference answer"),
            "{err}"
        );
    }

    #[test]
    fn bad_judge_prompt_names_file_and_line() {
        let err = load_err(JUDGE_PROMPT_FILE, |t| replace_line(&t, 7, "not json"));
        assert!(err.contains("judge_prompts.jsonl:7: invalid JSON"), "{err}");
    }

    #[test]
    fn judge_prompt_with_unknown_placeholder_is_an_error() {
        let err = load_err(JUDGE_PROMPT_FILE, |t| {
            let line = t
                .lines()
                .nth(4)
                .unwrap()
                .replace("{question}", "{questoin}");
            replace_line(&t, 5, &line)
        });
        assert!(err.contains("judge_prompts.jsonl:5:"), "{err}");
        assert!(err.contains("{questoin}"), "{err}");
    }

    #[test]
    fn missing_judge_prompt_is_an_error() {
        let err = load_err(JUDGE_PROMPT_FILE, |t| {
            t.lines()
                .filter(|l| !l.contains(r#""name": "single-v1-multi-turn""#))
                .collect::<Vec<_>>()
                .join("\n")
        });
        assert!(
            err.contains("judge prompt \"single-v1-multi-turn\" is missing"),
            "{err}"
        );
    }

    #[test]
    fn blank_lines_are_skipped_and_line_numbers_stay_true() {
        let err = load_err(QUESTION_FILE, |t| {
            let t = format!("\n{t}");
            replace_line(&t, 3, "42")
        });
        assert!(err.contains("question.jsonl:3: invalid type"), "{err}");
    }
}
