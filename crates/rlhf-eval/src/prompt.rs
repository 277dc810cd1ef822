//! FastChat's single-answer grading, reproduced: which judge prompt a (question, turn) gets,
//! how its template is filled, and how the rating is read back out of the judge's text.
//!
//! Reference: FastChat `fastchat/llm_judge/common.py` (`run_judge_single`,
//! `one_score_pattern`, `one_score_pattern_backup`) and `gen_judgment.py` (`make_judge_single`).

use crate::chat::Turn;
use crate::data::{JudgePrompt, JudgePrompts, ModelAnswer, Question};

/// Which of the four MT-Bench single-answer judge prompts applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromptKind {
    /// `single-v1`: first turn of a general question.
    Single,
    /// `single-v1-multi-turn`: second turn of a general question.
    SingleMultiTurn,
    /// `single-math-v1`: first turn, graded against the reference answer.
    SingleMath,
    /// `single-math-v1-multi-turn`: second turn, graded against the reference answers.
    SingleMathMultiTurn,
}

impl PromptKind {
    /// All four kinds.
    pub const ALL: [PromptKind; 4] = [
        PromptKind::Single,
        PromptKind::SingleMultiTurn,
        PromptKind::SingleMath,
        PromptKind::SingleMathMultiTurn,
    ];

    /// The kind FastChat's `gen_judgment.py` picks: the math prompts for categories that need
    /// a reference answer, the multi-turn prompts for the second turn.
    pub fn for_question(question: &Question, turn: Turn) -> Self {
        match (question.needs_reference(), turn) {
            (false, Turn::First) => PromptKind::Single,
            (false, Turn::Second) => PromptKind::SingleMultiTurn,
            (true, Turn::First) => PromptKind::SingleMath,
            (true, Turn::Second) => PromptKind::SingleMathMultiTurn,
        }
    }

    /// The `name` of the prompt in `judge_prompts.jsonl`.
    pub fn prompt_name(self) -> &'static str {
        match self {
            PromptKind::Single => "single-v1",
            PromptKind::SingleMultiTurn => "single-v1-multi-turn",
            PromptKind::SingleMath => "single-math-v1",
            PromptKind::SingleMathMultiTurn => "single-math-v1-multi-turn",
        }
    }

    /// The keyword arguments FastChat passes to `str.format` for this kind.
    fn provided(self) -> &'static [&'static str] {
        match self {
            PromptKind::Single => &["question", "answer"],
            PromptKind::SingleMath => &["question", "answer", "ref_answer_1"],
            PromptKind::SingleMultiTurn => &["question_1", "question_2", "answer_1", "answer_2"],
            PromptKind::SingleMathMultiTurn => &[
                "question_1",
                "question_2",
                "answer_1",
                "answer_2",
                "ref_answer_1",
                "ref_answer_2",
            ],
        }
    }

    /// Placeholders a usable template must contain: without them the judge never sees the
    /// answer (or the reference) it grades.
    fn required(self) -> &'static [&'static str] {
        match self {
            PromptKind::Single => &["answer"],
            PromptKind::SingleMath => &["answer", "ref_answer_1"],
            PromptKind::SingleMultiTurn => &["answer_2"],
            PromptKind::SingleMathMultiTurn => &["answer_2", "ref_answer_2"],
        }
    }
}

/// A judge prompt ready to send: the system message and the filled user message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilledPrompt {
    /// Which prompt was used.
    pub kind: PromptKind,
    /// The prompt's `system_prompt`.
    pub system: String,
    /// The prompt's `prompt_template` with the placeholders filled.
    pub user: String,
}

/// Fills the judge prompt for `turn` of `question` answered by `answer`, exactly as FastChat's
/// `run_judge_single` does (Python `str.format`, one pass: text inside the values is never
/// scanned for placeholders).
///
/// Fails only when the question needs a reference answer and has none, or the template is
/// unusable; [`crate::MtBench::load`] rules both out for loaded data.
pub fn fill_judge_prompt(
    prompts: &JudgePrompts,
    question: &Question,
    answer: &ModelAnswer,
    turn: Turn,
) -> Result<FilledPrompt, String> {
    let kind = PromptKind::for_question(question, turn);
    let prompt = prompts.get(kind);
    let [q1, q2] = &question.turns;
    let [a1, a2] = &answer.turns;
    let mut values: Vec<(&str, &str)> = match turn {
        Turn::First => vec![("question", q1), ("answer", a1)],
        Turn::Second => vec![
            ("question_1", q1),
            ("question_2", q2),
            ("answer_1", a1),
            ("answer_2", a2),
        ],
    };
    if question.needs_reference() {
        let [r1, r2] = question.reference_answer.as_ref().ok_or_else(|| {
            format!(
                "question {} (category {}) has no reference answer",
                question.question_id, question.category
            )
        })?;
        values.push(("ref_answer_1", r1));
        if turn == Turn::Second {
            values.push(("ref_answer_2", r2));
        }
    }
    let user = format_template(&prompt.prompt_template, &values)?;
    Ok(FilledPrompt {
        kind,
        system: prompt.system_prompt.clone(),
        user,
    })
}

/// Checks at load time that `prompt` can serve as `kind`: a single-answer prompt with the
/// `[[rating]]` output format whose template uses only the placeholders FastChat provides for
/// that kind and contains the answer (and reference) it grades.
pub(crate) fn check_prompt(kind: PromptKind, prompt: &JudgePrompt) -> Result<(), String> {
    let name = &prompt.name;
    if prompt.kind != "single" {
        return Err(format!(
            "judge prompt {name:?} has type {:?}; expected \"single\"",
            prompt.kind
        ));
    }
    if prompt.output_format != "[[rating]]" {
        return Err(format!(
            "judge prompt {name:?} has output_format {:?}; expected \"[[rating]]\"",
            prompt.output_format
        ));
    }
    let used = placeholders(&prompt.prompt_template)
        .map_err(|e| format!("judge prompt {name:?}: prompt_template: {e}"))?;
    for p in &used {
        if !kind.provided().contains(&p.as_str()) {
            return Err(format!(
                "judge prompt {name:?}: prompt_template uses {{{p}}}, which FastChat does not \
                 provide for this prompt (it provides {})",
                braced(kind.provided())
            ));
        }
    }
    for r in kind.required() {
        if !used.iter().any(|p| p == r) {
            return Err(format!(
                "judge prompt {name:?}: prompt_template lacks {{{r}}}, so the judge would not \
                 see what it grades"
            ));
        }
    }
    Ok(())
}

fn braced(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{{{n}}}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The placeholder names in `template`, in order of appearance.
fn placeholders(template: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    scan_template(template, |piece| {
        if let Piece::Field(name) = piece {
            names.push(name.to_owned());
        }
        Ok(())
    })?;
    Ok(names)
}

/// Python `str.format` with keyword arguments, restricted to plain `{name}` fields: `{{` and
/// `}}` are literal braces; a field naming no value, a format spec, conversion, index or
/// attribute, or an unmatched brace is an error (Python raises too).
pub(crate) fn format_template(template: &str, values: &[(&str, &str)]) -> Result<String, String> {
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|v| v.1.len()).sum::<usize>());
    scan_template(template, |piece| {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Field(name) => {
                let (_, v) = values
                    .iter()
                    .find(|(k, _)| *k == name)
                    .ok_or_else(|| format!("no value for placeholder {{{name}}}"))?;
                out.push_str(v);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

enum Piece<'a> {
    Text(&'a str),
    Field(&'a str),
}

fn scan_template<'a>(
    template: &'a str,
    mut emit: impl FnMut(Piece<'a>) -> Result<(), String>,
) -> Result<(), String> {
    let mut rest = template;
    while let Some(pos) = rest.find(['{', '}']) {
        emit(Piece::Text(&rest[..pos]))?;
        let brace = &rest[pos..pos + 1];
        let after = &rest[pos + 1..];
        if after.starts_with(brace) {
            // `{{` or `}}`: one literal brace.
            emit(Piece::Text(brace))?;
            rest = &after[1..];
        } else if brace == "}" {
            return Err(format!(
                "single '}}' at byte {pos} of the remaining template; write '}}}}' for a \
                 literal brace"
            ));
        } else {
            let end = after
                .find('}')
                .ok_or_else(|| "unclosed '{' in template".to_owned())?;
            let name = &after[..end];
            let plain = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !plain {
                return Err(format!(
                    "unsupported placeholder {{{name}}}: only plain {{name}} fields are supported"
                ));
            }
            emit(Piece::Field(name))?;
            rest = &after[end + 1..];
        }
    }
    emit(Piece::Text(rest))
}

/// Reads the 1..=10 rating out of a judge's text, or says why it cannot.
///
/// Like FastChat: the first `[[N]]` (`\[\[(\d+\.?\d*)\]\]`), else the first `[N]`
/// (`\[(\d+\.?\d*)\]`). Unlike FastChat, a rating outside 1..=10 is rejected instead of
/// being averaged in.
pub fn parse_rating_reason(judgment: &str) -> Result<f64, String> {
    let found = find_number_in(judgment, "[[", "]]").or_else(|| find_number_in(judgment, "[", "]"));
    let Some(text) = found else {
        return Err("no [[rating]] or [rating] in the judge's output".into());
    };
    let rating: f64 = text
        .parse()
        .map_err(|e| format!("rating {text:?} is not a number: {e}"))?;
    if (1.0..=10.0).contains(&rating) {
        Ok(rating)
    } else {
        Err(format!("rating {text} is outside 1..10"))
    }
}

/// [`parse_rating_reason`] without the reason: `None` when no valid rating is found.
pub fn parse_rating(judgment: &str) -> Option<f64> {
    parse_rating_reason(judgment).ok()
}

/// The first `open` + `\d+\.?\d*` + `close` in `text`, returning the number's text. Equivalent to
/// the regex: after the number the next byte must be `]`, which no backtracking can produce.
fn find_number_in<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let bytes = text.as_bytes();
    let digits_from = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    let mut from = 0;
    while let Some(pos) = text[from..].find(open) {
        let start = from + pos + open.len();
        let int_end = digits_from(start);
        if int_end > start {
            let end = if bytes.get(int_end) == Some(&b'.') {
                digits_from(int_end + 1)
            } else {
                int_end
            };
            if text[end..].starts_with(close) {
                return Some(&text[start..end]);
            }
        }
        // `open` starts with an ASCII '[', so +1 stays on a char boundary.
        from += pos + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::mt_bench_dir;
    use crate::MtBench;

    #[test]
    fn rating_patterns_match_fastchat() {
        assert_eq!(parse_rating("Good answer. Rating: [[7]]"), Some(7.0));
        assert_eq!(parse_rating("Rating: [[8.5]]"), Some(8.5));
        assert_eq!(parse_rating("Rating: [[10]]"), Some(10.0));
        assert_eq!(parse_rating("Rating: [[9.]]"), Some(9.0));
        // The backup pattern, used only when there is no [[N]].
        assert_eq!(parse_rating("Rating: [6]"), Some(6.0));
        assert_eq!(parse_rating("see [3] but finally [[4]]"), Some(4.0));
        // The first match wins, as with re.search.
        assert_eq!(parse_rating("[[2]] then [[9]]"), Some(2.0));
        assert_eq!(parse_rating("[[[5]]]"), Some(5.0));
        assert_eq!(parse_rating("[[x]] [[ 5]] [5.5.5] [[3]]"), Some(3.0));
        assert_eq!(parse_rating("no rating"), None);
        assert_eq!(parse_rating("Rating: [[rating]]"), None);
        assert_eq!(parse_rating("[[-3]]"), None);
        assert_eq!(parse_rating(""), None);
        assert_eq!(parse_rating("ünïcödé [[6]]"), Some(6.0));
    }

    #[test]
    fn out_of_range_ratings_are_unparseable() {
        assert_eq!(parse_rating("Rating: [[0]]"), None);
        assert_eq!(parse_rating("Rating: [[11]]"), None);
        assert_eq!(parse_rating("Rating: [[10.5]]"), None);
        assert_eq!(parse_rating("[[0.99]]"), None);
        let why = parse_rating_reason("Rating: [[42]]").unwrap_err();
        assert!(why.contains("42 is outside 1..10"), "{why}");
        let why = parse_rating_reason("nothing").unwrap_err();
        assert!(why.contains("no [[rating]]"), "{why}");
    }

    #[test]
    fn format_is_single_pass_like_python() {
        let out = format_template("{{a}} {x}-{y}}}", &[("x", "{y}"), ("y", "2")]).unwrap();
        assert_eq!(out, "{a} {y}-2}");
        assert!(format_template("{z}", &[]).unwrap_err().contains("{z}"));
        assert!(format_template("{x:>3}", &[("x", "1")])
            .unwrap_err()
            .contains("unsupported"));
        assert!(format_template("{x", &[("x", "1")])
            .unwrap_err()
            .contains("unclosed"));
        assert!(format_template("a}b", &[])
            .unwrap_err()
            .contains("single '}'"));
        assert!(format_template("{}", &[])
            .unwrap_err()
            .contains("unsupported"));
    }

    fn leftover_placeholder(text: &str) -> Option<&'static str> {
        ["{question", "{answer", "{ref_answer"]
            .into_iter()
            .find(|p| text.contains(p))
    }

    #[test]
    fn fills_all_four_prompt_kinds() {
        let dir = mt_bench_dir();
        let bench = MtBench::load(&dir).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for q in bench.questions() {
            let answer = ModelAnswer {
                question_id: q.question_id,
                category: q.category.clone(),
                model_id: "m".into(),
                turns: [
                    format!("FIRST-ANSWER-{}", q.question_id),
                    format!("SECOND-ANSWER-{} {{question_2}}", q.question_id),
                ],
            };
            for turn in Turn::ALL {
                let f = fill_judge_prompt(bench.judge_prompts(), q, &answer, turn).unwrap();
                seen.insert(f.kind.prompt_name());
                assert_eq!(f.kind, PromptKind::for_question(q, turn));
                assert_eq!(f.system, bench.judge_prompts().get(f.kind).system_prompt);
                assert!(f.user.contains(&q.turns[0]), "{}", f.user);
                assert!(f.user.contains(&answer.turns[0]), "{}", f.user);
                if turn == Turn::Second {
                    assert!(f.user.contains(&q.turns[1]), "{}", f.user);
                    // The answer's own "{question_2}" survives: values are not re-scanned.
                    assert!(f.user.contains(&answer.turns[1]), "{}", f.user);
                    assert_eq!(f.user.matches("{question_2}").count(), 1, "{}", f.user);
                } else {
                    assert!(!f.user.contains("SECOND-ANSWER"), "{}", f.user);
                    assert_eq!(leftover_placeholder(&f.user), None, "{}", f.user);
                }
                if let Some(r) = &q.reference_answer {
                    if q.needs_reference() {
                        assert!(f.user.contains(&r[0]), "{}", f.user);
                        assert!(f.user.contains("Reference Answer"), "{}", f.user);
                        if turn == Turn::Second {
                            assert!(f.user.contains(&r[1]), "{}", f.user);
                        }
                    }
                }
                if !q.needs_reference() {
                    assert!(!f.user.contains("Reference Answer"), "{}", f.user);
                }
            }
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
    }

    #[test]
    fn second_turn_without_odd_answers_leaves_no_placeholder() {
        let dir = mt_bench_dir();
        let bench = MtBench::load(&dir).unwrap();
        for q in bench.questions() {
            let answer = ModelAnswer {
                question_id: q.question_id,
                category: q.category.clone(),
                model_id: "m".into(),
                turns: ["one".into(), "two".into()],
            };
            let f = fill_judge_prompt(bench.judge_prompts(), q, &answer, Turn::Second).unwrap();
            assert_eq!(leftover_placeholder(&f.user), None, "{}", f.user);
            assert!(f.user.contains("### Assistant A:\ntwo\n"), "{}", f.user);
        }
    }

    #[test]
    fn missing_reference_is_reported_not_panicked() {
        let dir = mt_bench_dir();
        let bench = MtBench::load(&dir).unwrap();
        let mut q = bench
            .questions()
            .iter()
            .find(|q| q.category == "math")
            .unwrap()
            .clone();
        q.reference_answer = None;
        let a = ModelAnswer {
            question_id: q.question_id,
            category: q.category.clone(),
            model_id: "m".into(),
            turns: ["1".into(), "2".into()],
        };
        let err = fill_judge_prompt(bench.judge_prompts(), &q, &a, Turn::First).unwrap_err();
        assert!(err.contains("has no reference answer"), "{err}");
    }
}
