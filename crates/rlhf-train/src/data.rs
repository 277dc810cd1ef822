//! Streaming readers for the published data formats, from `.jsonl` or gzip-compressed
//! `.jsonl.gz` (detected by the gzip magic bytes, not the name), or from Parquet files and
//! Hugging Face dataset directories ([`crate::columnar`]; rows become the same JSON objects,
//! numbered from 0 within their file instead of by line):
//!
//! - HelpSteer2 ratings (<https://huggingface.co/datasets/nvidia/HelpSteer2>): `prompt`,
//!   `response`, and the attributes `helpfulness`, `correctness`, `coherence`, `complexity`,
//!   `verbosity` (0..4).
//! - HelpSteer2-Preference: `split`, `prompt`, `response_1`, `response_2`, `preference_strength`
//!   (-3..3; negative: response_1 is preferred), plus justification fields that are ignored.
//! - Generic pairwise: `prompt`, `chosen`, `rejected`, each a string or a chat message list.
//! - RewardBench: `prompt`, `chosen`, `rejected`, `subset` (and `id`).
//! - Chat (SFT): `messages`, or `prompt` + `response`.
//!
//! HelpSteer2 stores multi-turn prompts as one string with turns separated by `<extra_id_1>`,
//! each later turn starting with its role (`User` / `Assistant`) and a newline; [`parse_prompt`]
//! turns that into chat messages.
//!
//! Lines are read one at a time; a blank line is skipped, anything else must be one JSON object.
//! A row that breaks its schema is a bad row: with [`OnBadRow::Fail`] (the default) reading stops
//! with an error naming file and line, with [`OnBadRow::Skip`] it is logged (file:line and
//! reason) and counted in [`RowStats`]. Rows left out on purpose (a tie, another split) are
//! counted separately under [`RowStats::filtered`]; nothing is dropped silently.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use rlhf_model::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::columnar::{is_parquet, split_files, Columns, ParquetRows, DEFAULT_SPLIT};
use crate::error::{Result, TrainError};

/// The separator HelpSteer2 puts between the turns of a multi-turn prompt.
pub const HELPSTEER2_TURN_SEPARATOR: &str = "<extra_id_1>";

/// What to do with a row that breaks its schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRow {
    /// Stop with an error naming the file and line. The default.
    #[default]
    Fail,
    /// Log the file, line and reason, count the row, and go on.
    Skip,
}

/// The row formats this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// HelpSteer2 ratings: `prompt`, `response` and the attribute scores.
    Helpsteer2,
    /// HelpSteer2-Preference: `split`, `prompt`, `response_1`, `response_2`,
    /// `preference_strength`.
    Helpsteer2Preference,
    /// Generic pairwise: `prompt`, `chosen`, `rejected`.
    Pairwise,
    /// Chat transcripts for SFT: `messages`, or `prompt` + `response`.
    Chat,
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Helpsteer2 => "helpsteer2",
            DataFormat::Helpsteer2Preference => "helpsteer2_preference",
            DataFormat::Pairwise => "pairwise",
            DataFormat::Chat => "chat",
        }
    }
}

/// Counts of what happened to the rows of one file.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RowStats {
    pub path: PathBuf,
    /// Non-blank lines read.
    pub rows: u64,
    /// Rows turned into examples.
    pub used: u64,
    /// Bad rows skipped under `on_bad_row: skip`.
    pub skipped_bad: u64,
    /// Rows left out on purpose, by reason (e.g. `tie (preference_strength 0)`).
    pub filtered: BTreeMap<String, u64>,
}

impl std::fmt::Display for RowStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} rows, {} used, {} bad rows skipped",
            self.path.display(),
            self.rows,
            self.used,
            self.skipped_bad
        )?;
        for (why, n) in &self.filtered {
            write!(f, ", {n} left out: {why}")?;
        }
        Ok(())
    }
}

/// What a row parser decided.
pub enum RowOutcome<T> {
    Use(T),
    /// Left out on purpose; the reason is counted in [`RowStats::filtered`].
    Filter(&'static str),
}

/// A line-by-line reader of a `.jsonl` or `.jsonl.gz` file that knows its line numbers.
pub struct JsonlReader {
    path: PathBuf,
    inner: Box<dyn BufRead + Send>,
    line: u64,
    buf: Vec<u8>,
}

impl JsonlReader {
    /// Opens `path`, decompressing on the fly when it starts with the gzip magic bytes.
    pub fn open(path: &Path) -> Result<JsonlReader> {
        let f = File::open(path).map_err(|e| TrainError::io(path, e))?;
        let mut r = BufReader::with_capacity(1 << 16, f);
        let head = r.fill_buf().map_err(|e| TrainError::io(path, e))?;
        let gz = head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b;
        let inner: Box<dyn BufRead + Send> = if gz {
            // Multi-member aware: `cat a.gz b.gz` is a valid gzip stream too.
            Box::new(BufReader::with_capacity(
                1 << 16,
                flate2::read::MultiGzDecoder::new(r),
            ))
        } else {
            Box::new(r)
        };
        Ok(JsonlReader {
            path: path.to_path_buf(),
            inner,
            line: 0,
            buf: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next non-blank line as `(line number, JSON or the reason it is not)`. I/O and
    /// decompression errors end the read with an error naming the file and line.
    pub fn next_row(&mut self) -> Result<Option<(u64, std::result::Result<Value, String>)>> {
        loop {
            self.buf.clear();
            let n =
                self.inner
                    .read_until(b'\n', &mut self.buf)
                    .map_err(|e| TrainError::BadRow {
                        path: self.path.clone(),
                        line: self.line + 1,
                        msg: format!("cannot read (truncated or corrupt gzip?): {e}"),
                    })?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            let text = match std::str::from_utf8(&self.buf) {
                Ok(t) => t,
                Err(e) => return Ok(Some((self.line, Err(format!("not UTF-8: {e}"))))),
            };
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let parsed = match serde_json::from_str::<Value>(text) {
                Ok(v @ Value::Object(_)) => Ok(v),
                Ok(other) => Err(format!(
                    "expected a JSON object, found {}",
                    json_type(&other)
                )),
                Err(e) => Err(format!("not JSON (column {}): {e}", e.column())),
            };
            return Ok(Some((self.line, parsed)));
        }
    }
}

/// Where rows are read from: a `.jsonl` / `.jsonl.gz` file, a Parquet file (told by its magic
/// bytes, not its name), or a Hugging Face dataset directory (one split's Parquet shards, see
/// [`crate::columnar`]).
#[derive(Debug, Clone)]
pub struct DataInput<'a> {
    pub path: &'a Path,
    /// The split read from a dataset directory; `None`: `train`. Ignored for files.
    pub split: Option<&'a str>,
    /// The config key that sets `split`, for errors.
    pub split_key: String,
    /// Which column holds which row field (JSONL keys and Parquet columns alike).
    pub columns: Columns,
    /// Row fields whose columns a Parquet file must have, checked before the first row: for
    /// each entry, any one of its fields will do. JSONL rows are checked one by one instead.
    pub required: Vec<Vec<&'a str>>,
}

impl<'a> DataInput<'a> {
    /// A file or directory read with the default split and no column mapping.
    pub fn new(path: &'a Path) -> Self {
        DataInput {
            path,
            split: None,
            split_key: "the split".into(),
            columns: Columns::default(),
            required: vec![],
        }
    }
}

enum Reader {
    Jsonl(JsonlReader),
    Parquet(ParquetRows),
}

/// The rows of a [`DataInput`], whatever its format, as JSON objects with the column mapping
/// applied, each with its line (JSONL, from 1) or row (Parquet, from 0 within its file).
pub struct RowSource {
    reader: Reader,
    columns: Columns,
}

impl RowSource {
    pub fn open(input: &DataInput<'_>) -> Result<RowSource> {
        let parquet_files = if input.path.is_dir() {
            Some(split_files(
                input.path,
                input.split.unwrap_or(DEFAULT_SPLIT),
                &input.split_key,
            )?)
        } else if is_parquet(input.path) {
            Some(vec![input.path.to_path_buf()])
        } else {
            None
        };
        let reader = match parquet_files {
            Some(files) => Reader::Parquet(ParquetRows::open(
                files,
                input.columns.clone(),
                &input.required,
            )?),
            None => Reader::Jsonl(JsonlReader::open(input.path)?),
        };
        Ok(RowSource {
            reader,
            columns: input.columns.clone(),
        })
    }

    /// The file the last row came from.
    pub fn path(&self) -> &Path {
        match &self.reader {
            Reader::Jsonl(r) => r.path(),
            Reader::Parquet(r) => r.path(),
        }
    }

    /// Whether rows are Parquet rows (numbered from 0) rather than JSONL lines (from 1).
    pub fn is_parquet(&self) -> bool {
        matches!(self.reader, Reader::Parquet(_))
    }

    /// `FILE:LINE` or `FILE: row N (counting from 0)`, for log lines.
    pub fn location(&self, n: u64) -> String {
        if self.is_parquet() {
            format!("{}: row {n} (counting from 0)", self.path().display())
        } else {
            format!("{}:{n}", self.path().display())
        }
    }

    /// The error for a bad row `n` of the current file.
    pub fn bad_row(&self, n: u64, msg: String) -> TrainError {
        let msg = format!("{msg}{}", self.columns.describe());
        let path = self.path().to_path_buf();
        if self.is_parquet() {
            TrainError::BadRecord { path, row: n, msg }
        } else {
            TrainError::BadRow { path, line: n, msg }
        }
    }

    /// The next row: its number and the JSON object, or the reason the line is not one.
    pub fn next_row(&mut self) -> Result<Option<(u64, std::result::Result<Value, String>)>> {
        match &mut self.reader {
            Reader::Jsonl(r) => Ok(r.next_row()?.map(|(n, v)| {
                let v = v.map(|mut v| {
                    if let Value::Object(obj) = &mut v {
                        self.columns.apply(obj);
                    }
                    v
                });
                (n, v)
            })),
            Reader::Parquet(r) => Ok(r.next_row()?.map(|(n, v)| (n, Ok(v)))),
        }
    }
}

/// How many skipped rows are logged one by one before only the count goes on.
const LOGGED_BAD_ROWS: u64 = 20;

/// The skip hint of a refused row until the caller names its own setting
/// ([`TrainError::with_skip_hint`]: [`JOB_SKIP_HINT`] for job files, the command's flag for
/// the commands that take one).
pub const GENERIC_SKIP_HINT: &str = "the `skip` bad-row policy skips and counts such rows";
/// The skip hint of the training jobs, whose bad-row policy is a job-file key.
pub const JOB_SKIP_HINT: &str = "to skip and count bad rows, set `data.on_bad_row: skip` in the \
                                 job file, or pass `--set data.on_bad_row=skip`";

/// Reads every row of the file or dataset directory `path` (split `train`, no column mapping)
/// through `parse`; see [`read_rows_from`].
pub fn read_rows<T>(
    path: &Path,
    on_bad: OnBadRow,
    parse: impl FnMut(&Value) -> std::result::Result<RowOutcome<T>, String>,
) -> Result<(Vec<(u64, T)>, RowStats)> {
    read_rows_from(&DataInput::new(path), on_bad, parse)
}

/// Reads every row of `input` through `parse`, applying the bad-row policy. Returns the examples
/// in order (with their line numbers, or row numbers within their Parquet file) and the counts;
/// logs a summary.
pub fn read_rows_from<T>(
    input: &DataInput<'_>,
    on_bad: OnBadRow,
    mut parse: impl FnMut(&Value) -> std::result::Result<RowOutcome<T>, String>,
) -> Result<(Vec<(u64, T)>, RowStats)> {
    let mut reader = RowSource::open(input)?;
    let mut stats = RowStats {
        path: input.path.to_path_buf(),
        ..Default::default()
    };
    let mut out = Vec::new();
    while let Some((line, row)) = reader.next_row()? {
        stats.rows += 1;
        let outcome = row.and_then(|v| parse(&v));
        match outcome {
            Ok(RowOutcome::Use(t)) => {
                stats.used += 1;
                out.push((line, t));
            }
            Ok(RowOutcome::Filter(why)) => *stats.filtered.entry(why.to_string()).or_insert(0) += 1,
            Err(msg) => match on_bad {
                OnBadRow::Fail => {
                    return Err(TrainError::RowRefused {
                        row: Box::new(reader.bad_row(line, msg)),
                        hint: GENERIC_SKIP_HINT.into(),
                    })
                }
                OnBadRow::Skip => {
                    stats.skipped_bad += 1;
                    if stats.skipped_bad <= LOGGED_BAD_ROWS {
                        tracing::warn!("{}: skipping bad row: {msg}", reader.location(line));
                    }
                }
            },
        }
    }
    if stats.skipped_bad > 0 || !stats.filtered.is_empty() {
        tracing::warn!("{stats}");
    } else {
        tracing::info!("{stats}");
    }
    Ok((out, stats))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn field<'a>(v: &'a Value, key: &str) -> std::result::Result<&'a Value, String> {
    match v.get(key) {
        None | Some(Value::Null) => Err(format!("missing field `{key}`")),
        Some(x) => Ok(x),
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> std::result::Result<&'a str, String> {
    match field(v, key)? {
        Value::String(s) => Ok(s),
        other => Err(format!(
            "field `{key}` must be a string, found {}",
            json_type(other)
        )),
    }
}

fn num_field(v: &Value, key: &str) -> std::result::Result<f64, String> {
    match field(v, key)? {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| format!("field `{key}` is not a finite number")),
        other => Err(format!(
            "field `{key}` must be a number, found {}",
            json_type(other)
        )),
    }
}

/// Turns a HelpSteer2 prompt string into chat messages. Without `<extra_id_1>` it is one user
/// turn. With it, the first segment is the first user turn and every later segment starts with
/// `User` or `Assistant` and a newline. The last turn must be the user's (the response answers
/// it). Turn texts are trimmed.
pub fn parse_prompt(s: &str) -> std::result::Result<Vec<ChatMessage>, String> {
    let mut parts = s.split(HELPSTEER2_TURN_SEPARATOR);
    let first = parts.next().unwrap_or("").trim();
    if first.is_empty() {
        return Err("empty prompt".into());
    }
    let mut msgs = vec![ChatMessage::new("user", first)];
    for (i, part) in parts.enumerate() {
        let (role, rest) = if let Some(r) = part.strip_prefix("User") {
            ("user", r)
        } else if let Some(r) = part.strip_prefix("Assistant") {
            ("assistant", r)
        } else {
            let head: String = part.chars().take(20).collect();
            return Err(format!(
                "prompt turn {} after {HELPSTEER2_TURN_SEPARATOR} must start with `User` or \
                 `Assistant`, found {head:?}",
                i + 2
            ));
        };
        if !(rest.is_empty() || rest.starts_with('\n') || rest.starts_with(' ')) {
            return Err(format!(
                "prompt turn {}: expected a newline after the role `{role}`",
                i + 2
            ));
        }
        msgs.push(ChatMessage::new(role, rest.trim()));
    }
    if msgs.last().map(|m| m.role.as_str()) != Some("user") {
        return Err("multi-turn prompt must end with a `User` turn".into());
    }
    Ok(msgs)
}

/// A chat message list from a JSON array of `{"role", "content"}` objects.
fn messages(v: &Value, key: &str) -> std::result::Result<Vec<ChatMessage>, String> {
    let arr = match v {
        Value::Array(a) => a,
        other => {
            return Err(format!(
                "field `{key}` must be a string or a list of messages, found {}",
                json_type(other)
            ))
        }
    };
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = str_field(m, "role").map_err(|e| format!("`{key}[{i}]`: {e}"))?;
            let content = str_field(m, "content").map_err(|e| format!("`{key}[{i}]`: {e}"))?;
            if role.is_empty() {
                return Err(format!("`{key}[{i}]`: empty role"));
            }
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// The prompt of a row: a string (HelpSteer2 style, maybe multi-turn) or a message list.
pub fn prompt_field(v: &Value, key: &str) -> std::result::Result<Vec<ChatMessage>, String> {
    match field(v, key)? {
        Value::String(s) => parse_prompt(s),
        other => {
            let m = messages(other, key)?;
            if m.is_empty() {
                return Err(format!("field `{key}` is an empty message list"));
            }
            Ok(m)
        }
    }
}

/// A response: a string (one assistant turn) or a message list ending with an assistant turn.
/// Empty responses are bad rows.
pub fn completion_field(v: &Value, key: &str) -> std::result::Result<Vec<ChatMessage>, String> {
    let msgs = match field(v, key)? {
        Value::String(s) => vec![ChatMessage::new("assistant", s)],
        other => messages(other, key)?,
    };
    match msgs.last() {
        None => Err(format!("field `{key}` is an empty message list")),
        Some(m) if m.role != "assistant" => Err(format!(
            "field `{key}` must end with an assistant message, ends with role `{}`",
            m.role
        )),
        Some(m) if m.content.trim().is_empty() => Err(format!("empty response in `{key}`")),
        Some(_) => Ok(msgs),
    }
}

/// The full conversation of a prompt and one of its responses.
pub fn conversation(prompt: &[ChatMessage], completion: &[ChatMessage]) -> Vec<ChatMessage> {
    prompt.iter().chain(completion).cloned().collect()
}

/// One HelpSteer2 ratings row.
#[derive(Debug, Clone, PartialEq)]
pub struct Rated {
    pub prompt: Vec<ChatMessage>,
    pub response: Vec<ChatMessage>,
    /// Scores of the requested attributes, in their order.
    pub ratings: Vec<f64>,
}

/// The range HelpSteer2's attribute scores live in.
pub const RATING_RANGE: (f64, f64) = (0.0, 4.0);

/// Parses a ratings row, requiring `attributes` (each a number in 0..4).
pub fn parse_rating(v: &Value, attributes: &[String]) -> std::result::Result<Rated, String> {
    let prompt = prompt_field(v, "prompt")?;
    let response = completion_field(v, "response")?;
    let ratings = attributes
        .iter()
        .map(|a| {
            let x = num_field(v, a).map_err(|e| format!("{e} (a HelpSteer2 attribute)"))?;
            if !(RATING_RANGE.0..=RATING_RANGE.1).contains(&x) {
                return Err(format!("rating `{a}` = {x} is outside 0..4"));
            }
            Ok(x)
        })
        .collect::<std::result::Result<Vec<f64>, String>>()?;
    Ok(Rated {
        prompt,
        response,
        ratings,
    })
}

/// One preference pair, from either pairwise format.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub prompt: Vec<ChatMessage>,
    pub chosen: Vec<ChatMessage>,
    pub rejected: Vec<ChatMessage>,
    /// |preference_strength| (1..3) for HelpSteer2-Preference rows; `None` for generic pairs.
    pub strength: Option<f64>,
}

/// Parses a HelpSteer2-Preference row. Rows of another `split` (when `split` is given) and ties
/// (strength 0) are filtered, not bad.
pub fn parse_hs2_preference(
    v: &Value,
    split: Option<&str>,
) -> std::result::Result<RowOutcome<Pair>, String> {
    if let Some(want) = split {
        let have = str_field(v, "split")?;
        if have != want {
            return Ok(RowOutcome::Filter("another split"));
        }
    }
    let prompt = prompt_field(v, "prompt")?;
    let r1 = completion_field(v, "response_1")?;
    let r2 = completion_field(v, "response_2")?;
    let s = num_field(v, "preference_strength")?;
    if !(-3.0..=3.0).contains(&s) {
        return Err(format!("preference_strength = {s} is outside -3..3"));
    }
    if s == 0.0 {
        return Ok(RowOutcome::Filter("tie (preference_strength 0)"));
    }
    // Negative strength: response_1 is preferred.
    let (chosen, rejected) = if s < 0.0 { (r1, r2) } else { (r2, r1) };
    Ok(RowOutcome::Use(Pair {
        prompt,
        chosen,
        rejected,
        strength: Some(s.abs()),
    }))
}

/// Parses a generic pairwise row. `prompt` may be absent when `chosen` and `rejected` are full
/// conversations (message lists that hold the prompt turns).
pub fn parse_pairwise(v: &Value) -> std::result::Result<Pair, String> {
    let chosen = completion_field(v, "chosen")?;
    let rejected = completion_field(v, "rejected")?;
    let prompt = match v.get("prompt") {
        None | Some(Value::Null) if chosen.len() > 1 && rejected.len() > 1 => vec![],
        _ => prompt_field(v, "prompt")?,
    };
    Ok(Pair {
        prompt,
        chosen,
        rejected,
        strength: None,
    })
}

/// One RewardBench row.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    pub prompt: Vec<ChatMessage>,
    pub chosen: Vec<ChatMessage>,
    pub rejected: Vec<ChatMessage>,
    pub subset: String,
}

/// The subset a RewardBench row without a `subset` field is counted under (pair files as
/// `derive-pairs` writes them have none).
pub const DEFAULT_SUBSET: &str = "all";

/// A RewardBench row: the pairwise fields and an optional `subset` (default [`DEFAULT_SUBSET`]).
pub fn parse_rewardbench(v: &Value) -> std::result::Result<BenchRow, String> {
    let pair = parse_pairwise(v)?;
    let subset = match v.get("subset") {
        None | Some(Value::Null) => DEFAULT_SUBSET,
        Some(_) => str_field(v, "subset")?,
    };
    if subset.is_empty() {
        return Err("empty `subset` (leave the field out to count the row under `all`)".into());
    }
    Ok(BenchRow {
        prompt: pair.prompt,
        chosen: pair.chosen,
        rejected: pair.rejected,
        subset: subset.to_string(),
    })
}

/// A chat transcript for SFT: `messages` (must hold a non-empty assistant turn), or `prompt` +
/// `response`.
pub fn parse_chat(v: &Value) -> std::result::Result<Vec<ChatMessage>, String> {
    if v.get("messages").is_some() {
        let m = messages(field(v, "messages")?, "messages")?;
        if !m
            .iter()
            .any(|m| m.role == "assistant" && !m.content.trim().is_empty())
        {
            return Err("`messages` has no non-empty assistant turn to learn from".into());
        }
        return Ok(m);
    }
    let prompt = prompt_field(v, "prompt")?;
    let response = completion_field(v, "response")?;
    Ok(conversation(&prompt, &response))
}

/// A `prompt` + `response` row (what `score` reads; HelpSteer2 rows qualify).
pub fn parse_prompt_response(
    v: &Value,
) -> std::result::Result<(Vec<ChatMessage>, Vec<ChatMessage>), String> {
    Ok((prompt_field(v, "prompt")?, completion_field(v, "response")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn multi_turn_prompts_become_messages() {
        let p = "What is 2+2?\n<extra_id_1>Assistant\n4.\n<extra_id_1>User\nAnd 3+3?";
        let m = parse_prompt(p).unwrap();
        assert_eq!(
            m,
            vec![
                ChatMessage::new("user", "What is 2+2?"),
                ChatMessage::new("assistant", "4."),
                ChatMessage::new("user", "And 3+3?"),
            ]
        );
        assert_eq!(
            parse_prompt("c#").unwrap(),
            vec![ChatMessage::new("user", "c#")]
        );
        assert!(parse_prompt("hi<extra_id_1>Robot\nx")
            .unwrap_err()
            .contains("`User` or `Assistant`"));
        assert!(parse_prompt("hi<extra_id_1>Assistant\nx")
            .unwrap_err()
            .contains("must end with a `User` turn"));
        assert!(parse_prompt("  ").unwrap_err().contains("empty prompt"));
    }

    #[test]
    fn ratings_are_checked() {
        let attrs: Vec<String> = ["helpfulness", "verbosity"].map(String::from).to_vec();
        let ok = json!({"prompt": "p", "response": "r", "helpfulness": 3, "verbosity": 1.5,
                        "correctness": 9});
        let r = parse_rating(&ok, &attrs).unwrap();
        assert_eq!(r.ratings, vec![3.0, 1.5]);
        let bad = json!({"prompt": "p", "response": "r", "helpfulness": 5, "verbosity": 1});
        assert!(parse_rating(&bad, &attrs)
            .unwrap_err()
            .contains("outside 0..4"));
        let missing = json!({"prompt": "p", "response": "r", "helpfulness": 2});
        assert!(parse_rating(&missing, &attrs)
            .unwrap_err()
            .contains("missing field `verbosity`"));
        let empty = json!({"prompt": "p", "response": " ", "helpfulness": 2, "verbosity": 1});
        assert!(parse_rating(&empty, &attrs)
            .unwrap_err()
            .contains("empty response"));
    }

    #[test]
    fn preference_strength_orders_and_filters() {
        let row = |s: i64| {
            json!({"split": "train", "prompt": "p", "response_1": "one", "response_2": "two",
                   "preference_strength": s, "preference_statement": "ignored"})
        };
        match parse_hs2_preference(&row(-2), None).unwrap() {
            RowOutcome::Use(p) => {
                assert_eq!(p.chosen[0].content, "one");
                assert_eq!(p.strength, Some(2.0));
            }
            RowOutcome::Filter(_) => panic!("filtered"),
        }
        match parse_hs2_preference(&row(3), None).unwrap() {
            RowOutcome::Use(p) => assert_eq!(p.chosen[0].content, "two"),
            RowOutcome::Filter(_) => panic!("filtered"),
        }
        assert!(matches!(
            parse_hs2_preference(&row(0), None).unwrap(),
            RowOutcome::Filter(_)
        ));
        assert!(matches!(
            parse_hs2_preference(&row(1), Some("validation")).unwrap(),
            RowOutcome::Filter("another split")
        ));
        assert!(parse_hs2_preference(&row(4), None)
            .err()
            .unwrap()
            .contains("outside -3..3"));
    }

    #[test]
    fn pairwise_accepts_strings_and_message_lists() {
        let p = parse_pairwise(&json!({"prompt": "q", "chosen": "a", "rejected": "b"})).unwrap();
        assert_eq!(p.prompt, vec![ChatMessage::new("user", "q")]);
        let full = json!({
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]
        });
        let p = parse_pairwise(&full).unwrap();
        assert!(p.prompt.is_empty());
        assert_eq!(p.chosen.len(), 2);
        let bad = json!({"prompt": "q", "chosen": [{"role": "user", "content": "a"}],
                         "rejected": "b"});
        assert!(parse_pairwise(&bad)
            .unwrap_err()
            .contains("must end with an assistant message"));
    }

    #[test]
    fn rewardbench_rows_without_subset_count_under_all() {
        // A pair as `derive-pairs` writes it: no `subset`.
        let row = json!({"prompt": "q", "chosen": "a", "rejected": "b",
                         "chosen_helpfulness": 3, "rejected_helpfulness": 1});
        assert_eq!(parse_rewardbench(&row).unwrap().subset, DEFAULT_SUBSET);
        let mut named = row.clone();
        named["subset"] = json!("hep-go");
        assert_eq!(parse_rewardbench(&named).unwrap().subset, "hep-go");
        named["subset"] = json!(3);
        assert!(parse_rewardbench(&named)
            .unwrap_err()
            .contains("`subset` must be a string"));
        named["subset"] = json!("");
        assert!(parse_rewardbench(&named)
            .unwrap_err()
            .contains("empty `subset`"));
    }

    #[test]
    fn reader_handles_gzip_blank_lines_and_bad_json() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(
            File::create(&path).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all(b"{\"prompt\": \"a\", \"response\": \"b\"}\n\n[1]\n{oops\n")
            .unwrap();
        gz.finish().unwrap();
        let mut r = JsonlReader::open(&path).unwrap();
        let (l1, v1) = r.next_row().unwrap().unwrap();
        assert_eq!((l1, v1.unwrap()["prompt"].as_str()), (1, Some("a")));
        let (l3, v3) = r.next_row().unwrap().unwrap();
        assert_eq!(l3, 3);
        assert!(v3.unwrap_err().contains("expected a JSON object"));
        let (l4, v4) = r.next_row().unwrap().unwrap();
        assert_eq!(l4, 4);
        assert!(v4.unwrap_err().contains("not JSON"));
        assert!(r.next_row().unwrap().is_none());

        let e = read_rows(&path, OnBadRow::Fail, |v| {
            parse_prompt_response(v).map(RowOutcome::Use)
        })
        .err()
        .unwrap();
        let text = e.to_string();
        assert!(
            text.contains("d.jsonl.gz:3:") && text.contains(GENERIC_SKIP_HINT),
            "{text}"
        );
        // The caller's own setting replaces the generic hint.
        let text = e.with_skip_hint(JOB_SKIP_HINT).to_string();
        assert!(
            text.contains("d.jsonl.gz:3:") && text.ends_with(&format!("({JOB_SKIP_HINT})")),
            "{text}"
        );
        let (rows, stats) = read_rows(&path, OnBadRow::Skip, |v| {
            parse_prompt_response(v).map(RowOutcome::Use)
        })
        .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((stats.rows, stats.used, stats.skipped_bad), (3, 1, 2));
    }
}
