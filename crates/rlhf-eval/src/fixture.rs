//! A stand-in for FastChat's `mt_bench` folder, in its format and with its shape, for tests on a
//! machine without the real data (a fresh clone, as a new user has it).
//!
//! Shape, as the real data has it: 80 two-turn questions with ids 81..=160, ten per category in
//! MT-Bench's order (writing, roleplay, reasoning, math, coding, extraction, stem, humanities);
//! reference answers for the 30 reasoning, math and coding questions, in id order; the eight
//! judge prompts under their FastChat names and in FastChat's order (four pairwise, then
//! `single-v1`, `single-math-v1`, `single-v1-multi-turn`, `single-math-v1-multi-turn`), with the
//! placeholders each takes. The wording is this file's own: it is test data, not the benchmark,
//! and scores on it mean nothing.

use std::path::Path;

use serde_json::{json, Value};

use crate::data::{JUDGE_PROMPT_FILE, QUESTION_FILE, REFERENCE_FILE};

/// MT-Bench's categories in the order its questions come.
pub const CATEGORIES: [&str; 8] = [
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
];

/// Writes `question.jsonl`, `judge_prompts.jsonl` and `reference_answer/gpt-4.jsonl` into `dir`.
pub fn write_mt_bench_fixture(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("reference_answer"))?;
    let mut questions = String::new();
    let mut references = String::new();
    for (c, category) in CATEGORIES.iter().enumerate() {
        for k in 0..10 {
            let id = 81 + 10 * c + k;
            let turns = [
                format!("Fixture {category} question {id}: answer in one short sentence."),
                format!("Fixture follow-up to question {id}: now say it in three words."),
            ];
            questions.push_str(&python_json(&[
                ("question_id", json!(id)),
                ("category", json!(category)),
                ("turns", json!(turns)),
            ]));
            if crate::data::NEED_REF_CATEGORIES.contains(category) {
                let turns = [
                    format!("Reference answer {id}, turn one."),
                    format!("Reference answer {id}, turn two."),
                ];
                references.push_str(&python_json(&[
                    ("question_id", json!(id)),
                    ("answer_id", json!(format!("fixture-{id}"))),
                    ("model_id", json!("gpt-4")),
                    ("choices", json!([{"index": 0, "turns": turns}])),
                    ("tstamp", json!(0.0)),
                ]));
            }
        }
    }
    let mut prompts = String::new();
    for (name, kind, category, template) in judge_prompts() {
        prompts.push_str(&python_json(&[
            ("name", json!(name)),
            ("type", json!(kind)),
            (
                "system_prompt",
                json!(format!("You judge the fixture's answers ({name}).")),
            ),
            ("prompt_template", json!(template)),
            ("description", json!("fixture prompt")),
            ("category", json!(category)),
            (
                "output_format",
                json!(if kind == "single" {
                    "[[rating]]"
                } else {
                    "[[A]]"
                }),
            ),
        ]));
    }
    std::fs::write(dir.join(QUESTION_FILE), questions)?;
    std::fs::write(dir.join(JUDGE_PROMPT_FILE), prompts)?;
    std::fs::write(dir.join(REFERENCE_FILE), references)
}

/// One JSONL line as FastChat's files have it (Python's `json.dumps`: keys in the given order,
/// `", "` and `": "` between items), so tests that edit lines by their text work on either.
fn python_json(fields: &[(&str, Value)]) -> String {
    fn value(v: &Value) -> String {
        match v {
            Value::Array(items) => {
                format!(
                    "[{}]",
                    items.iter().map(value).collect::<Vec<_>>().join(", ")
                )
            }
            Value::Object(map) => {
                let items: Vec<String> = map
                    .iter()
                    .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), value(v)))
                    .collect();
                format!("{{{}}}", items.join(", "))
            }
            scalar => scalar.to_string(),
        }
    }
    let items: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}: {}", Value::from(*k), value(v)))
        .collect();
    format!("{{{}}}\n", items.join(", "))
}

/// (name, type, category, template) of the eight prompts, in FastChat's order.
fn judge_prompts() -> [(&'static str, &'static str, &'static str, String); 8] {
    const RATE: &str = "Rate the answer from 1 to 10 as \"[[rating]]\".";
    let reference =
        "[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]";
    // The conversation markers are FastChat's: judges (and the tests' fake judge) find the
    // graded answer between them.
    let conversation = |who: &str, a1: &str, a2: &str| {
        format!(
            "<|The Start of Assistant {who}'s Conversation with User|>\n\n### User:\n{{question_1}}\n\n### Assistant {who}:\n{{{a1}}}\n\n### User:\n{{question_2}}\n\n### Assistant {who}:\n{{{a2}}}\n\n<|The End of Assistant {who}'s Conversation with User|>"
        )
    };
    let reference_conversation = "<|The Start of Reference Answer|>\n### User:\n{question_1}\n### Reference answer:\n{ref_answer_1}\n### User:\n{question_2}\n### Reference answer:\n{ref_answer_2}\n<|The End of Reference Answer|>";
    let pair = "[Question]\n{question}\n[Assistant A]\n{answer_a}\n[Assistant B]\n{answer_b}";
    let pair_turns = format!(
        "{}\n{}",
        conversation("A", "answer_a_1", "answer_a_2"),
        conversation("B", "answer_b_1", "answer_b_2")
    );
    let single = "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]";
    let single_turns = conversation("A", "answer_1", "answer_2");
    [
        ("pair-v2", "pairwise", "general", format!("{RATE}\n{pair}")),
        (
            "pair-v2-multi-turn",
            "pairwise",
            "general",
            format!("{RATE}\n{pair_turns}"),
        ),
        (
            "pair-math-v1",
            "pairwise",
            "math",
            format!("{RATE}\n{reference}\n{pair}"),
        ),
        (
            "pair-math-v1-multi-turn",
            "pairwise",
            "general",
            format!("{RATE}\n{reference_conversation}\n{pair_turns}"),
        ),
        (
            "single-v1",
            "single",
            "general",
            format!("{RATE}\n\n{single}"),
        ),
        (
            "single-math-v1",
            "single",
            "math",
            format!("{RATE}\n{reference}\n\n{single}"),
        ),
        (
            "single-v1-multi-turn",
            "single",
            "general",
            format!("{RATE}\n\n{single_turns}"),
        ),
        (
            "single-math-v1-multi-turn",
            "single",
            "math",
            format!("{RATE}\n{reference_conversation}\n\n{single_turns}"),
        ),
    ]
}

/// The MT-Bench data for tests: `RLHF_MT_BENCH_DIR`, else `shared/data/mt_bench` beside the
/// repository, when it holds MT-Bench's files; else `scratch` with the fixture written into it.
/// Tests run on a fresh clone and on the real data where it is present. Callers write each
/// scratch directory once (a `OnceLock`) so no test reads a half-written one.
pub fn shared_or_fixture(scratch: &Path) -> std::io::Result<std::path::PathBuf> {
    let real = std::env::var_os("RLHF_MT_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mt_bench")
        });
    if real.join(QUESTION_FILE).is_file() {
        return Ok(real);
    }
    write_mt_bench_fixture(scratch)?;
    Ok(scratch.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::NEED_REF_CATEGORIES;
    use crate::MtBench;

    #[test]
    fn the_fixture_has_mt_bench_s_shape() {
        let tmp = tempfile::tempdir().unwrap();
        write_mt_bench_fixture(tmp.path()).unwrap();
        let bench = MtBench::load(tmp.path()).unwrap();
        let qs = bench.questions();
        assert_eq!(qs.len(), 80);
        assert_eq!(qs.first().map(|q| q.question_id), Some(81));
        for (c, category) in CATEGORIES.iter().enumerate() {
            let ids: Vec<u64> = qs
                .iter()
                .filter(|q| q.category == *category)
                .map(|q| q.question_id)
                .collect();
            let first = 81 + 10 * c as u64;
            assert_eq!(ids, (first..first + 10).collect::<Vec<_>>(), "{category}");
            let with_ref = qs
                .iter()
                .filter(|q| q.category == *category && q.reference_answer.is_some())
                .count();
            let want = if NEED_REF_CATEGORIES.contains(category) {
                10
            } else {
                0
            };
            assert_eq!(with_ref, want, "{category}");
        }
        let names: Vec<&str> = bench
            .judge_prompts()
            .all
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names.len(), 8);
        assert_eq!(
            &names[4..],
            [
                "single-v1",
                "single-math-v1",
                "single-v1-multi-turn",
                "single-math-v1-multi-turn"
            ]
        );
    }
}
