//! TensorBoard event files of a run: `RUN_DIR/tensorboard/events.out.tfevents.SECS.HOST`, so
//! `tensorboard --logdir RUN_DIR/tensorboard` shows every scalar of `metrics.jsonl` per step and,
//! every `logging.samples_every` steps, the sampled prompts and completions as Markdown text
//! (tag `samples`). `logging.tensorboard: false` turns it off.
//!
//! The format is written here, not through a crate. The crates that write it were judged and
//! left: `tensorboard-rs` (0.5.9, last released in 2022) is built on `protobuf` 2, which is
//! unmaintained and has an advisory (RUSTSEC-2024-0437), pulls `image` 0.23, has no text
//! summaries and unwraps its I/O errors; `tfrecord` (0.15) brings its own, older `prost` and an
//! async runtime beside ours; `syntaxdot-summary` writes scalars only. The format itself is small
//! and documented: TFRecord framing (TensorFlow's `tensorflow/core/lib/io/record_writer.cc`,
//! as TensorBoard's own `tensorboard/summary/writer/record_writer.py` writes it) around
//! `tensorflow.Event` protos, encoded here by `prost` (already in the tree through tonic) from
//! the hand-written messages below, and CRC32C from the maintained `crc32c` crate.
//!
//! One file per launch process: the first record is the `file_version` event, then one event
//! per `metrics.jsonl` line and one per sampled step, each flushed at once (a preempted run loses
//! nothing that reached the file). A resumed run writes a new file beside the earlier ones and
//! TensorBoard reads them in name order (the name starts with the launch's Unix time) as one
//! run. The steps an earlier launch wrote after the checkpoint it is resumed from are done again
//! and written again; when a tag's step goes back TensorBoard drops the points at and after it
//! (its "preemption" handling), so it shows the newest value of each step, as `metrics.jsonl`,
//! which is cut back to the checkpoint, holds it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

use crate::metrics::SampleLine;

/// The folder under `RUN_DIR` that holds the event files.
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// The tag of the sampled responses' text.
pub const SAMPLES_TAG: &str = "samples";

// The messages, with the field numbers of TensorBoard's copies of TensorFlow's protos
// (tensorboard/compat/proto/event.proto, summary.proto, tensor.proto, tensor_shape.proto,
// types.proto). Only the fields written here are declared; a reader skips absent fields.

/// `tensorflow.Event` (event.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

/// `Event.what` (event.proto): `file_version = 3`, `summary = 5`.
#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary` (summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` (summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
    #[prost(oneof = "ValueKind", tags = "2, 8")]
    value: Option<ValueKind>,
}

/// `Summary.Value.value` (summary.proto): `simple_value = 2`, `tensor = 8`.
#[derive(Clone, PartialEq, prost::Oneof)]
enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// `tensorflow.SummaryMetadata` (summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData` (summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    content: Vec<u8>,
}

/// `tensorflow.TensorProto` (tensor.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    /// A `tensorflow.DataType` (types.proto).
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShapeProto>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto` (tensor_shape.proto) with no `dim`: a scalar.
#[derive(Clone, PartialEq, prost::Message)]
struct TensorShapeProto {}

/// `DT_STRING` in types.proto.
const DT_STRING: i32 = 7;

/// What TensorBoard expects as the first record of an event file (event.proto: "brain.Event:"
/// followed by the format version; 2 since TensorFlow 0.x).
const FILE_VERSION: &str = "brain.Event:2";

/// CRC32C as TFRecord stores it: rotated right by 15 bits plus a constant, because a CRC of
/// data that itself holds CRCs is weak (`tensorflow/core/lib/hash/crc32c.h`, `Mask`).
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length (u64 LE), masked CRC32C of those 8 bytes, the data, masked CRC32C of
/// the data.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// The scalars of one serialized metrics line: every finite number under its key (a nested
/// object's keys joined with `/`), `step` itself excepted; nulls (non-finite values), strings and
/// booleans are left out.
fn scalars(line: &serde_json::Value) -> Vec<(String, f64)> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, f64)>) {
        match v {
            serde_json::Value::Number(n) => {
                if let Some(x) = n.as_f64().filter(|x| x.is_finite()) {
                    out.push((prefix.to_string(), x));
                }
            }
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    if prefix.is_empty() && k == "step" {
                        continue;
                    }
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}/{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = vec![];
    walk("", line, &mut out);
    out
}

/// The sampled prompts of a step as Markdown: each prompt's messages and answer, then its
/// completions with score, attribute scores and whether `rollout.max_new_tokens` cut them.
/// Text the model wrote goes into fenced blocks, so it shows as written.
pub fn samples_markdown(lines: &[SampleLine]) -> String {
    let mut md = String::new();
    for (p, line) in lines.iter().enumerate() {
        if p > 0 {
            md.push_str("\n---\n\n");
        }
        md.push_str(&format!("### Prompt {}\n\n", p + 1));
        for m in &line.prompt {
            md.push_str(&format!("**{}**\n\n{}\n", m.role, fenced(&m.content)));
        }
        if let Some(a) = &line.answer {
            md.push_str(&format!("**answer**\n\n{}\n", fenced(a)));
        }
        for (i, c) in line.completions.iter().enumerate() {
            let score = if c.score.is_finite() {
                format!("{:.4}", c.score)
            } else {
                "none".to_string()
            };
            md.push_str(&format!("**completion {}**: score {score}", i + 1));
            for (name, v) in &c.attributes {
                md.push_str(&format!(", {name} {v:.4}"));
            }
            if !c.finished {
                md.push_str(", cut by rollout.max_new_tokens");
            }
            md.push_str(&format!("\n\n{}\n", fenced(&c.text)));
        }
    }
    md
}

/// `text` in a fenced code block whose fence is longer than any run of backticks inside.
fn fenced(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat(longest.max(2) + 1);
    format!("{fence}text\n{text}\n{fence}\n")
}

/// The event file of one launch process.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates a new event file in `dir` (made if missing), named as TensorBoard's writers name
    /// theirs: `events.out.tfevents.SECS.HOST`, with `.N` added in the rare case that name is
    /// taken (a relaunch within the same second), and writes its `file_version` record.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "creating {} for the TensorBoard event files (set logging.tensorboard: false to \
                 run without them)",
                dir.display()
            )
        })?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("the system clock is before 1970")?;
        let base = format!(
            "events.out.tfevents.{}.{}",
            now.as_secs(),
            rlhf_comm::net::host_name()
        );
        let mut n = 0u32;
        let (path, file) = loop {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            let path = dir.join(name);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "creating the TensorBoard event file {} (set logging.tensorboard: \
                             false to run without it)",
                            path.display()
                        )
                    })
                }
            }
        };
        let mut w = EventWriter {
            path,
            file: BufWriter::new(file),
        };
        w.write(0, What::FileVersion(FILE_VERSION.to_string()))?;
        Ok(w)
    }

    /// The file this writer appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes every finite number of a serialized metrics line (`StepMetrics`,
    /// `InitialValidation`) as a scalar under its key at `step`, in one event, and flushes.
    pub fn scalars(&mut self, step: u64, line: &impl serde::Serialize) -> Result<()> {
        let json = serde_json::to_value(line).context("serializing a metrics line")?;
        let value = scalars(&json)
            .into_iter()
            .map(|(tag, x)| SummaryValue {
                tag,
                metadata: None,
                // TensorBoard's scalars are f32 (`simple_value`).
                value: Some(ValueKind::SimpleValue(x as f32)),
            })
            .collect();
        self.write(step, What::Summary(Summary { value }))
    }

    /// Writes `markdown` as a text summary under `tag` at `step` (the text plugin's format: a
    /// scalar `DT_STRING` tensor with plugin name `text`), and flushes.
    pub fn text(&mut self, tag: &str, step: u64, markdown: &str) -> Result<()> {
        let value = SummaryValue {
            tag: tag.to_string(),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "text".to_string(),
                    content: vec![],
                }),
            }),
            value: Some(ValueKind::Tensor(TensorProto {
                dtype: DT_STRING,
                tensor_shape: Some(TensorShapeProto {}),
                string_val: vec![markdown.as_bytes().to_vec()],
            })),
        };
        self.write(step, What::Summary(Summary { value: vec![value] }))
    }

    /// Frames one event, appends it and flushes it to the file.
    fn write(&mut self, step: u64, what: What) -> Result<()> {
        let event = event(wall_time(), step, what);
        let record = frame(&event.encode_to_vec());
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .with_context(|| {
                format!(
                    "writing the TensorBoard event file {} (free disk space, or set \
                     logging.tensorboard: false to run without it)",
                    self.path.display()
                )
            })
    }
}

fn event(wall_time: f64, step: u64, what: What) -> Event {
    Event {
        wall_time,
        step: i64::try_from(step).unwrap_or(i64::MAX),
        what: Some(what),
    }
}

/// Seconds since the Unix epoch, as `Event.wall_time` holds them.
fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Completion, SampleMessage, StepMetrics};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads the records of a file back, checking both CRCs of each.
    fn records(bytes: &[u8]) -> Vec<Event> {
        let mut out = vec![];
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc32c(len_bytes), "length CRC at {at}");
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data), "data CRC at {at}");
            out.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        out
    }

    #[test]
    fn masked_crc32c_matches_known_values() {
        // The CRC-32C check value ("123456789" -> 0xe3069283, RFC 3720 B.4), and its masked
        // form as TensorBoard's `masked_crc32c` computes it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
    }

    // The expected bytes below were made by TensorBoard 2.21's protos and record writer:
    // `event_pb2.Event(wall_time=1.5, step=3, ...).SerializeToString()` and
    // `tensorboard.summary.writer.record_writer.RecordWriter` around it.

    #[test]
    fn records_are_framed_as_tensorboard_frames_them() {
        let e = event(1.5, 3, What::FileVersion(FILE_VERSION.into()));
        assert_eq!(
            hex(&e.encode_to_vec()),
            "09000000000000f83f10031a0d627261696e2e4576656e743a32"
        );
        assert_eq!(
            hex(&frame(&e.encode_to_vec())),
            "1a00000000000000129bd82d09000000000000f83f10031a0d627261696e2e4576656e743a32e3c0b95c"
        );
    }

    #[test]
    fn scalar_and_text_events_encode_as_tensorboard_encodes_them() {
        let scalar = event(
            1.5,
            3,
            What::Summary(Summary {
                value: vec![SummaryValue {
                    tag: "reward/mean".into(),
                    metadata: None,
                    value: Some(ValueKind::SimpleValue(0.25)),
                }],
            }),
        );
        assert_eq!(
            hex(&scalar.encode_to_vec()),
            "09000000000000f83f10032a140a120a0b7265776172642f6d65616e150000803e"
        );
        // `Summary.Value(tag="samples", metadata=SummaryMetadata(plugin_data=PluginData(
        // plugin_name="text")), tensor=TensorProto(dtype=DT_STRING, tensor_shape=
        // TensorShapeProto(), string_val=[b"# hi"]))`.
        let text = event(
            1.5,
            3,
            What::Summary(Summary {
                value: vec![SummaryValue {
                    tag: "samples".into(),
                    metadata: Some(SummaryMetadata {
                        plugin_data: Some(PluginData {
                            plugin_name: "text".into(),
                            content: vec![],
                        }),
                    }),
                    value: Some(ValueKind::Tensor(TensorProto {
                        dtype: DT_STRING,
                        tensor_shape: Some(TensorShapeProto {}),
                        string_val: vec![b"# hi".to_vec()],
                    })),
                }],
            }),
        );
        assert_eq!(
            hex(&text.encode_to_vec()),
            "09000000000000f83f10032a210a1f0a0773616d706c6573420a080712004204232068694a080a060a0474657874"
        );
    }

    #[test]
    fn metrics_lines_become_every_finite_scalar_under_its_key() {
        let mut m = StepMetrics {
            step: 7,
            reward_mean: 0.5,
            kl_mean: f64::NAN,
            ..Default::default()
        };
        m.attributes.prefix = "attribute/";
        m.attributes.values.insert("helpfulness".into(), 2.0);
        m.train.insert("actor/loss".into(), -1.25);
        m.sync_bytes = Some(1024.0);
        let s = scalars(&serde_json::to_value(&m).unwrap());
        let get = |k: &str| s.iter().find(|(t, _)| t == k).map(|(_, v)| *v);
        assert_eq!(get("reward_mean"), Some(0.5));
        assert_eq!(get("attribute/helpfulness"), Some(2.0));
        assert_eq!(get("actor/loss"), Some(-1.25));
        assert_eq!(get("sync/bytes"), Some(1024.0));
        assert_eq!(get("time/step_s"), Some(0.0));
        assert_eq!(get("kl_mean"), None, "NaN is written as null, and skipped");
        assert_eq!(get("step"), None);
        assert_eq!(
            get("rollout/off_policy"),
            None,
            "absent optional keys stay absent"
        );
        // A nested object (none today) is flattened with `/`; strings and booleans are skipped.
        let s = scalars(&serde_json::json!({"step": 1, "a": {"b": 2, "c": "x", "d": true}}));
        assert_eq!(s, vec![("a/b".to_string(), 2.0)]);
    }

    #[test]
    fn a_file_holds_the_version_then_each_event_and_relaunches_get_their_own() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tb");
        let mut w = EventWriter::create(&dir).unwrap();
        let m = StepMetrics {
            step: 2,
            reward_mean: 0.75,
            ..Default::default()
        };
        w.scalars(2, &m).unwrap();
        w.text(SAMPLES_TAG, 2, "**hi**").unwrap();
        let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("events.out.tfevents.")
                && name.ends_with(&rlhf_comm::net::host_name()),
            "{name}"
        );
        // Flushed after each event: readable while the writer is still open.
        let events = records(&std::fs::read(w.path()).unwrap());
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].what, Some(What::FileVersion(FILE_VERSION.into())));
        assert_eq!(events[1].step, 2);
        let Some(What::Summary(s)) = &events[1].what else {
            panic!("{:?}", events[1])
        };
        let reward = s.value.iter().find(|v| v.tag == "reward_mean").unwrap();
        assert_eq!(reward.value, Some(ValueKind::SimpleValue(0.75)));
        let Some(What::Summary(s)) = &events[2].what else {
            panic!("{:?}", events[2])
        };
        let Some(ValueKind::Tensor(t)) = &s.value[0].value else {
            panic!("{s:?}")
        };
        assert_eq!(t.string_val, vec![b"**hi**".to_vec()]);

        // A second writer in the same second gets a name of its own, never the first's file.
        let w2 = EventWriter::create(&dir).unwrap();
        assert_ne!(w2.path(), w.path());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        assert_eq!(records(&std::fs::read(w.path()).unwrap()).len(), 3);
    }

    #[test]
    fn an_unwritable_directory_is_named_with_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let blocker = tmp.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let err = EventWriter::create(&blocker.join("tb"))
            .err()
            .expect("a directory under a file cannot be made");
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&blocker.join("tb").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("logging.tensorboard: false"), "{msg}");
    }

    #[test]
    fn a_failed_write_is_an_error_naming_the_file() {
        // /dev/full refuses every write with ENOSPC, as a full disk does.
        let path = PathBuf::from("/dev/full");
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut w = EventWriter {
            path,
            file: BufWriter::new(file),
        };
        let err = w.scalars(1, &StepMetrics::default()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("/dev/full"), "{msg}");
        assert!(msg.contains("logging.tensorboard: false"), "{msg}");
    }

    #[test]
    fn samples_render_as_markdown_with_model_text_fenced() {
        let lines = vec![SampleLine {
            step: 4,
            prompt: vec![SampleMessage {
                role: "user".into(),
                content: "1+2=".into(),
            }],
            answer: Some("3".into()),
            completions: vec![
                Completion {
                    text: "3 ``` | *".into(),
                    score: 1.0,
                    attributes: [("helpfulness".to_string(), 0.5)].into(),
                    finished: true,
                },
                Completion {
                    text: "4".into(),
                    score: f64::NAN,
                    attributes: Default::default(),
                    finished: false,
                },
            ],
        }];
        let md = samples_markdown(&lines);
        assert!(
            md.starts_with("### Prompt 1\n\n**user**\n\n```text\n1+2=\n```\n"),
            "{md}"
        );
        assert!(md.contains("**answer**\n\n```text\n3\n```\n"), "{md}");
        assert!(
            md.contains(
                "**completion 1**: score 1.0000, helpfulness 0.5000\n\n````text\n3 ``` | *\n````\n"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "**completion 2**: score none, cut by rollout.max_new_tokens\n\n```text\n4\n```\n"
            ),
            "{md}"
        );
    }
}
