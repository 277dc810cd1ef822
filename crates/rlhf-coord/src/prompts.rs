//! The prompt set: a JSONL file with one object per line, or a Parquet file, or a Hugging Face
//! dataset directory (`rollout.split`'s shards, read through `rlhf_train::columnar` in record
//! batches), each row holding a `prompt` string or a chat `messages` list, and optionally a
//! reference `answer` (for rule rewards), in the columns `rollout.prompt_key`, `messages_key`
//! and `answer_key` name. Everything is read, checked and tokenized before training starts, so a
//! bad line or row is an error naming the file and its line (JSONL) or row (Parquet, from 0)
//! instead of a crash at step 300. Batches come from a resumable cursor over seeded per-epoch
//! permutations.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rlhf_algo::shuffled_indices;
use rlhf_config::RolloutConfig;
use rlhf_model::{ChatMessage, Tokenizer};
use rlhf_train::columnar::{is_parquet, Columns};
use rlhf_train::data::{DataInput, RowSource};
use serde::{Deserialize, Serialize};

/// One prompt row.
#[derive(Debug, Clone)]
pub struct PromptRow {
    pub messages: Vec<ChatMessage>,
    pub answer: Option<String>,
    /// The row's other columns (not `prompt`, `messages` or `answer` after the column mapping):
    /// sent to `http` and `command` rewards.
    pub extra: serde_json::Map<String, serde_json::Value>,
    pub ids: Vec<i64>,
}

pub struct PromptSet {
    pub file: PathBuf,
    pub rows: Vec<PromptRow>,
}

/// How rows are read.
pub struct PromptOptions<'a> {
    pub tokenizer: &'a Tokenizer,
    pub chat_template: bool,
    pub max_prompt_tokens: usize,
    /// Every row must carry `answer` (rule rewards).
    pub need_answer: bool,
    /// The split read from a dataset directory (`rollout.split`).
    pub split: &'a str,
    /// Which columns hold `prompt`, `messages` and `answer` ([`columns`]).
    pub columns: Columns,
}

/// The column mapping of `rollout.prompt_key`, `messages_key` and `answer_key`.
pub fn columns(r: &RolloutConfig) -> Columns {
    Columns::default()
        .map("prompt", Some(&r.prompt_key), "rollout.prompt_key")
        .map("messages", Some(&r.messages_key), "rollout.messages_key")
        .map("answer", Some(&r.answer_key), "rollout.answer_key")
}

fn parse_messages(v: &serde_json::Value) -> std::result::Result<Vec<ChatMessage>, String> {
    let list = v
        .as_array()
        .ok_or("`messages` must be a list of {role, content} objects")?;
    if list.is_empty() {
        return Err("`messages` is empty".into());
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(|r| r.as_str());
            let content = m.get("content").and_then(|c| c.as_str());
            match (role, content) {
                (Some(r), Some(c)) => Ok(ChatMessage::new(r, c)),
                _ => Err(format!("`messages[{i}]` needs string `role` and `content`")),
            }
        })
        .collect()
}

/// Messages, answer and the other columns.
type Row = (
    Vec<ChatMessage>,
    Option<String>,
    serde_json::Map<String, serde_json::Value>,
);

/// A JSONL line, with the column mapping applied.
fn parse_row(text: &str, columns: &Columns) -> std::result::Result<Row, String> {
    let mut v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = v.as_object_mut().ok_or("each line must be a JSON object")?;
    columns.apply(obj);
    parse_fields(std::mem::take(obj))
}

/// A row's fields; a null counts as absent (Parquet rows have every column).
fn parse_fields(
    mut obj: serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<Row, String> {
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let messages = match (get("prompt"), get("messages")) {
        (Some(_), Some(_)) => return Err("has both `prompt` and `messages`; keep one".into()),
        (Some(p), None) => {
            let p = p.as_str().ok_or("`prompt` must be a string")?;
            if p.is_empty() {
                return Err("`prompt` is empty".into());
            }
            vec![ChatMessage::new("user", p)]
        }
        (None, Some(m)) => parse_messages(m)?,
        (None, None) if obj.contains_key("prompt") || obj.contains_key("messages") => {
            return Err(
                "the prompt is null; every row needs a `prompt` string or a `messages` list".into(),
            )
        }
        (None, None) => return Err("needs a `prompt` string or a `messages` list".into()),
    };
    let answer = match obj.get("answer") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err("`answer` must be a string or a number".into()),
    };
    for k in ["prompt", "messages", "answer"] {
        obj.remove(k);
    }
    Ok((messages, answer, obj))
}

/// Longest line of a prompts file, in bytes: 64 per allowed prompt token (room for JSON escapes,
/// chat messages and an `answer`) and never under 1 MiB. Lines are read at most this far, so a
/// file without newlines cannot make the coordinator read gigabytes into one string.
pub fn max_line_bytes(max_prompt_tokens: usize) -> usize {
    max_prompt_tokens.saturating_mul(64).max(1 << 20)
}

/// The lines of a file, each read no further than `cap` bytes.
struct BoundedLines<R> {
    reader: R,
    cap: usize,
    buf: Vec<u8>,
    /// Number of the line last returned, from 1.
    n: usize,
}

impl<R: BufRead> BoundedLines<R> {
    /// The next line without its `\n` / `\r\n`, with its number; `None` at the end. A longer
    /// line than `cap` or one that is not UTF-8 is an error naming `file` and the line.
    fn next_line(&mut self, file: &Path) -> Result<Option<(usize, &str)>> {
        use std::io::Read;
        self.n += 1;
        let n = self.n;
        self.buf.clear();
        let got = (&mut self.reader)
            .take(self.cap as u64 + 1)
            .read_until(b'\n', &mut self.buf)
            .with_context(|| format!("{}:{n}: unreadable line", file.display()))?;
        if got == 0 {
            return Ok(None);
        }
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        } else if self.buf.len() > self.cap {
            bail!(
                "{}:{n}: the line is longer than {} bytes, the most a prompt line may have with \
                 rollout.max_prompt_tokens as set; shorten it (one JSON object per line)",
                file.display(),
                self.cap
            );
        }
        let line = std::str::from_utf8(&self.buf)
            .with_context(|| format!("{}:{n}: the line is not UTF-8", file.display()))?;
        Ok(Some((n, line)))
    }
}

/// Checks and tokenizes one row; `at` names it (`FILE:LINE`, `FILE: row N`) in errors.
fn accept(
    opts: &PromptOptions<'_>,
    at: impl Fn() -> String,
    (messages, answer, extra): Row,
) -> Result<PromptRow> {
    if opts.need_answer && answer.is_none() {
        bail!(
            "{}: no `answer`, which a rule reward (models.reward.kind: exact_match or math) needs on every row{}",
            at(),
            opts.columns.describe()
        );
    }
    let ids = opts
        .tokenizer
        .encode_messages(&messages, opts.chat_template, true)
        .with_context(|| {
            format!(
                "{}: applying the policy's chat template (set rollout.chat_template: false for \
                 plain prompts)",
                at()
            )
        })?;
    if ids.is_empty() {
        bail!("{}: the prompt tokenizes to nothing", at());
    }
    if ids.len() > opts.max_prompt_tokens {
        bail!(
            "{}: the prompt has {} tokens, more than rollout.max_prompt_tokens = {}; shorten it \
             or raise the limit (prompts are never truncated silently)",
            at(),
            ids.len(),
            opts.max_prompt_tokens
        );
    }
    Ok(PromptRow {
        messages,
        answer,
        extra,
        ids,
    })
}

/// Reads, checks and tokenizes the whole file or dataset directory.
pub fn load(file: &Path, opts: &PromptOptions<'_>) -> Result<PromptSet> {
    let rows = if file.is_dir() || is_parquet(file) {
        load_parquet(file, opts)?
    } else {
        load_jsonl(file, opts)?
    };
    if rows.is_empty() {
        bail!("rollout.prompts: {} has no prompts", file.display());
    }
    Ok(PromptSet {
        file: file.to_path_buf(),
        rows,
    })
}

fn load_jsonl(file: &Path, opts: &PromptOptions<'_>) -> Result<Vec<PromptRow>> {
    let f = std::fs::File::open(file)
        .with_context(|| format!("rollout.prompts: cannot open {}", file.display()))?;
    let mut rows = vec![];
    let mut lines = BoundedLines {
        reader: std::io::BufReader::new(f),
        cap: max_line_bytes(opts.max_prompt_tokens),
        buf: Vec::new(),
        n: 0,
    };
    while let Some((n, line)) = lines.next_line(file)? {
        if line.trim().is_empty() {
            continue;
        }
        let row = parse_row(line, &opts.columns)
            .map_err(|e| anyhow!("{}:{n}: {e}{}", file.display(), opts.columns.describe()))?;
        rows.push(accept(opts, || format!("{}:{n}", file.display()), row)?);
    }
    Ok(rows)
}

/// A Parquet file or a dataset directory's split, streamed in record batches.
fn load_parquet(file: &Path, opts: &PromptOptions<'_>) -> Result<Vec<PromptRow>> {
    let mut required = vec![vec!["prompt", "messages"]];
    if opts.need_answer {
        required.push(vec!["answer"]);
    }
    let input = DataInput {
        path: file,
        split: Some(opts.split),
        split_key: "rollout.split".into(),
        columns: opts.columns.clone(),
        required,
    };
    let mut src = RowSource::open(&input).context("rollout.prompts")?;
    let mut rows = vec![];
    while let Some((n, v)) = src.next_row()? {
        let fields = v.and_then(|v| match v {
            serde_json::Value::Object(obj) => parse_fields(obj),
            _ => Err("not a row".into()),
        });
        let row = fields.map_err(|e| src.bad_row(n, e))?;
        rows.push(accept(opts, || src.location(n), row)?);
    }
    Ok(rows)
}

/// Position in the prompt stream: epoch `epoch`'s permutation, next index `pos`. Checkpointed so
/// a resumed run continues with exactly the prompts it would have seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptCursor {
    pub seed: u64,
    pub shuffle: bool,
    pub epoch: u64,
    pub pos: usize,
}

impl PromptCursor {
    pub fn new(seed: u64, shuffle: bool) -> Self {
        PromptCursor {
            seed,
            shuffle,
            epoch: 0,
            pos: 0,
        }
    }

    fn order(&self, n: usize) -> Vec<usize> {
        if self.shuffle {
            shuffled_indices(n, self.seed, self.epoch)
                .into_iter()
                .map(|i| i as usize)
                .collect()
        } else {
            (0..n).collect()
        }
    }

    /// The next `k` row indices, continuing into the next epoch's permutation at the end.
    pub fn next_batch(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        let mut order = self.order(n);
        while out.len() < k {
            if self.pos >= n {
                self.epoch += 1;
                self.pos = 0;
                order = self.order(n);
            }
            out.push(order[self.pos]);
            self.pos += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_long_lines_are_refused_naming_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("prompts.jsonl");
        let read_all = |bytes: &[u8], cap: usize| -> Result<Vec<(usize, String)>> {
            std::fs::write(&file, bytes)?;
            let mut lines = BoundedLines {
                reader: std::io::BufReader::new(std::fs::File::open(&file)?),
                cap,
                buf: Vec::new(),
                n: 0,
            };
            let mut out = vec![];
            while let Some((n, l)) = lines.next_line(&file)? {
                out.push((n, l.to_string()));
            }
            Ok(out)
        };
        // Exactly `cap` bytes before the newline, CRLF, and a last line without newline: fine.
        let ok = read_all(b"12345\nab\r\n\nxyz", 5).unwrap();
        let want = [(1, "12345"), (2, "ab"), (3, ""), (4, "xyz")];
        assert_eq!(ok, want.map(|(n, l)| (n, l.to_string())).to_vec());
        // Line 2 is one byte over, with and without a newline after it.
        for bytes in [&b"{}\n123456\n{}"[..], b"{}\n123456"] {
            let e = format!("{:#}", read_all(bytes, 5).unwrap_err());
            assert!(
                e.contains("prompts.jsonl:2:") && e.contains("longer than 5 bytes"),
                "{e}"
            );
        }
        let e = format!("{:#}", read_all(b"\xff\xfe\n", 5).unwrap_err());
        assert!(e.contains("prompts.jsonl:1:") && e.contains("UTF-8"), "{e}");
        assert_eq!(max_line_bytes(512), 1 << 20);
        assert_eq!(max_line_bytes(65_536), 64 << 16);
    }

    #[test]
    fn rows_parse_or_say_why_not() {
        assert_eq!(
            parse_row(r#"{"prompt": "hi", "answer": 3}"#, &Columns::default())
                .unwrap()
                .1
                .as_deref(),
            Some("3")
        );
        let (m, a, extra) = parse_row(r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "level": 3, "tags": ["x"]}"#, &Columns::default()).unwrap();
        assert_eq!((m.len(), a), (2, None));
        // The other columns stay with the row, for http and command rewards.
        assert_eq!(
            serde_json::Value::Object(extra),
            serde_json::json!({"level": 3, "tags": ["x"]})
        );
        for (bad, why) in [
            ("[1]", "JSON object"),
            ("{\"prompt\": 1}", "must be a string"),
            ("{}", "needs a `prompt`"),
            ("{\"prompt\": \"a\", \"messages\": []}", "both"),
            ("{\"messages\": [{\"role\": \"user\"}]}", "messages[0]"),
            ("{\"prompt\": \"a\", \"answer\": [1]}", "`answer`"),
            ("{not json", "not valid JSON"),
        ] {
            let e = parse_row(bad, &Columns::default()).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn cursor_covers_each_epoch_once_and_resumes() {
        let mut c = PromptCursor::new(7, true);
        let a = c.next_batch(10, 4);
        let b = c.next_batch(10, 4);
        let mut first: Vec<usize> = a.iter().chain(&b).copied().collect();
        let saved = c;
        let d = c.next_batch(10, 4); // crosses into epoch 1
        first.extend(&d[..2]);
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        assert_eq!(c.epoch, 1);
        let mut r = saved;
        assert_eq!(r.next_batch(10, 4), d);
        assert_ne!(
            PromptCursor::new(8, true).next_batch(10, 10),
            PromptCursor::new(7, true).next_batch(10, 10)
        );
    }
}
