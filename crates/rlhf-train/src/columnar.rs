//! Parquet files, and Hugging Face dataset directories as they lie on disk, read as rows of JSON
//! objects so that every row parser of [`crate::data`] (and the controller's prompts) reads them
//! as it reads JSONL.
//!
//! A dataset directory holds one split's shards as `data/{split}-00000-of-00003.parquet` (what
//! `datasets.push_to_hub` writes), `{split}-*.parquet` at the top, or every `*.parquet` under
//! `data/{split}/` or `{split}/`; the first of these that has files is read, shards in name
//! order. Files are read in record batches of [`BATCH_ROWS`] rows through the `parquet` crate's
//! Arrow reader, so a large dataset is never loaded whole, and only the columns whose types
//! become JSON (strings, numbers, booleans, and lists and structs of them: chat `messages` are a
//! list of `{role, content}` structs) are decoded; others (images, binary) are not read at all.
//! Rows are numbered from 0 within their file, as pyarrow and pandas count them.
//!
//! Every file's schema is checked when the reader opens, before the first row: a required
//! column that is missing, or of a type that does not become JSON, is an error naming the file,
//! the column, the config key that names it, and the columns the file has.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Schema};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde_json::{Map, Number, Value};

use crate::error::{Result, TrainError};

/// Rows per decoded record batch: large enough to amortise decoding, small enough that a batch
/// of long conversations stays a few megabytes.
pub const BATCH_ROWS: usize = 1024;

/// The split read from a dataset directory when none is named.
pub const DEFAULT_SPLIT: &str = "train";

/// Whether `path` is a Parquet file (it starts with the magic bytes `PAR1`).
pub fn is_parquet(path: &Path) -> bool {
    let mut head = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| &head == b"PAR1")
}

/// Where a dataset directory's splits may lie, in the order they are looked for: (folder,
/// whether file names start with the split).
fn split_layouts(split: &str) -> [(PathBuf, bool); 4] {
    [
        (PathBuf::from("data"), true),
        (PathBuf::from("."), true),
        (Path::new("data").join(split), false),
        (PathBuf::from(split), false),
    ]
}

fn parquet_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    names.sort();
    names
}

/// The split a shard name belongs to: `train-00000-of-00003.parquet` and `train.parquet` are
/// `train`.
fn split_of(name: &str) -> &str {
    let stem = name.strip_suffix(".parquet").unwrap_or(name);
    stem.split_once('-').map_or(stem, |(s, _)| s)
}

/// The Parquet files of `split` in the dataset directory `dir`, in name order.
pub fn split_files(dir: &Path, split: &str, key: &str) -> Result<Vec<PathBuf>> {
    for (sub, prefixed) in split_layouts(split) {
        let folder = dir.join(&sub);
        let files: Vec<PathBuf> = parquet_names(&folder)
            .into_iter()
            .filter(|n| !prefixed || split_of(n) == split)
            .map(|n| folder.join(n))
            .collect();
        if !files.is_empty() {
            return Ok(files);
        }
    }
    let mut found: Vec<String> = ["data", "."]
        .iter()
        .flat_map(|sub| parquet_names(&dir.join(sub)))
        .map(|n| split_of(&n).to_string())
        .collect();
    // Split folders: `data/{split}/`, `{split}/` (not `data/` itself).
    for sub in [dir.join("data"), dir.to_path_buf()] {
        for e in std::fs::read_dir(&sub).into_iter().flatten().flatten() {
            let is_data = sub == dir && e.file_name() == "data";
            if !is_data && !parquet_names(&e.path()).is_empty() {
                found.extend(e.file_name().into_string().ok());
            }
        }
    }
    found.sort();
    found.dedup();
    let have = if found.is_empty() {
        "it has no Parquet files".to_string()
    } else {
        format!("its splits are {}", found.join(", "))
    };
    Err(TrainError::Data {
        path: dir.to_path_buf(),
        msg: format!(
            "no Parquet files of split `{split}` (looked for data/{split}-*.parquet, \
             {split}-*.parquet, data/{split}/*.parquet and {split}/*.parquet); {have}: set {key} \
             to one of them"
        ),
    })
}

/// A row field read from a column of another name: the config key `key` (e.g.
/// `rollout.prompt_key`) says that field `field` (`prompt`) is in column `column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    pub field: &'static str,
    pub column: String,
    pub key: String,
}

/// The column mapping of a data source: which column holds each row field. Fields not mapped
/// are read from the column of their own name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    renames: Vec<Rename>,
}

impl Columns {
    /// Reads `field` from `column` when that is given and differs from the field's name.
    pub fn map(
        mut self,
        field: &'static str,
        column: Option<&str>,
        key: impl Into<String>,
    ) -> Self {
        if let Some(c) = column.filter(|c| *c != field) {
            self.renames.push(Rename {
                field,
                column: c.to_string(),
                key: key.into(),
            });
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.renames.is_empty()
    }

    /// The column that holds `field`, and the config key that chose it if one did.
    pub fn column_of<'a>(&'a self, field: &'a str) -> (&'a str, Option<&'a str>) {
        self.renames
            .iter()
            .find(|r| r.field == field)
            .map_or((field, None), |r| (r.column.as_str(), Some(r.key.as_str())))
    }

    /// The field a column is read as: its renamed field, `None` for a column whose name is a
    /// field that is read from another column (shadowed), else its own name.
    fn field_of<'a>(&'a self, column: &'a str) -> Option<&'a str> {
        if let Some(r) = self.renames.iter().find(|r| r.column == column) {
            return Some(r.field);
        }
        if self.renames.iter().any(|r| r.field == column) {
            return None;
        }
        Some(column)
    }

    /// Applies the mapping to a JSON object read from a JSONL line.
    pub fn apply(&self, obj: &mut Map<String, Value>) {
        for r in &self.renames {
            match obj.remove(&r.column) {
                Some(v) => obj.insert(r.field.to_string(), v),
                None => obj.remove(r.field),
            };
        }
    }

    /// ` (read with rollout.prompt_key: question, ...)`, for bad-row messages; empty when
    /// nothing is mapped.
    pub fn describe(&self) -> String {
        if self.renames.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = self
            .renames
            .iter()
            .map(|r| format!("{}: {}", r.key, r.column))
            .collect();
        format!(" (read with {})", parts.join(", "))
    }
}

/// Whether values of this type become JSON here.
fn json_type(t: &DataType) -> bool {
    use DataType::*;
    match t {
        Null | Boolean | Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64
        | Float32 | Float64 | Utf8 | LargeUtf8 | Utf8View => true,
        List(f) | LargeList(f) => json_type(f.data_type()),
        Struct(fields) => fields.iter().all(|f| json_type(f.data_type())),
        _ => false,
    }
}

fn number(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// Element `i` of an array of a type [`json_type`] accepts.
fn json_at(a: &dyn Array, i: usize) -> Value {
    if a.is_null(i) {
        return Value::Null;
    }
    match a.data_type() {
        DataType::Boolean => a.as_boolean().value(i).into(),
        DataType::Int8 => a.as_primitive::<Int8Type>().value(i).into(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).into(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).into(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).into(),
        DataType::UInt8 => a.as_primitive::<UInt8Type>().value(i).into(),
        DataType::UInt16 => a.as_primitive::<UInt16Type>().value(i).into(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(i).into(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).into(),
        DataType::Float32 => number(f64::from(a.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => number(a.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => a.as_string::<i32>().value(i).into(),
        DataType::LargeUtf8 => a.as_string::<i64>().value(i).into(),
        DataType::Utf8View => a.as_string_view().value(i).into(),
        DataType::List(_) => list_json(a.as_list::<i32>().value(i).as_ref()),
        DataType::LargeList(_) => list_json(a.as_list::<i64>().value(i).as_ref()),
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let obj: Map<String, Value> = fields
                .iter()
                .zip(s.columns())
                .map(|(f, c)| (f.name().clone(), json_at(c.as_ref(), i)))
                .collect();
            Value::Object(obj)
        }
        // Columns of other types are never decoded (see `ParquetRows::open_file`).
        _ => Value::Null,
    }
}

fn list_json(items: &dyn Array) -> Value {
    Value::Array((0..items.len()).map(|j| json_at(items, j)).collect())
}

/// One open file: its record batches and the mapping from its decoded columns to row fields.
struct OpenFile {
    path: PathBuf,
    batches: ParquetRecordBatchReader,
    /// Row field of each decoded column, `None` for a shadowed one.
    fields: Vec<Option<String>>,
}

/// The rows of one or more Parquet files, in order, streamed batch by batch.
pub struct ParquetRows {
    files: Vec<PathBuf>,
    columns: Columns,
    next_file: usize,
    open: Option<OpenFile>,
    batch: Option<RecordBatch>,
    /// Next row of `batch`.
    pos: usize,
    /// Number (from 0) of the next row of the open file.
    row: u64,
}

impl ParquetRows {
    /// Opens `files` (checking every schema now: `required` lists, for each field that must be
    /// there, the fields any one of which will do).
    pub fn open(files: Vec<PathBuf>, columns: Columns, required: &[Vec<&str>]) -> Result<Self> {
        for f in &files {
            let schema = Self::builder(f)?.schema().clone();
            check_schema(f, &schema, &columns, required)?;
        }
        Ok(ParquetRows {
            files,
            columns,
            next_file: 0,
            open: None,
            batch: None,
            pos: 0,
            row: 0,
        })
    }

    fn builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
        let f = File::open(path).map_err(|e| TrainError::io(path, e))?;
        ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| TrainError::Data {
            path: path.to_path_buf(),
            msg: format!("not a readable Parquet file: {e}"),
        })
    }

    fn open_file(&self, path: &Path) -> Result<OpenFile> {
        let b = Self::builder(path)?;
        let schema = b.schema().clone();
        // Decode only the columns that become JSON: an image or audio column is skipped
        // whole, not read and thrown away.
        let keep: Vec<usize> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| json_type(f.data_type()))
            .map(|(i, _)| i)
            .collect();
        let fields = keep
            .iter()
            .map(|&i| {
                self.columns
                    .field_of(schema.field(i).name())
                    .map(str::to_string)
            })
            .collect();
        let mask = ProjectionMask::roots(b.parquet_schema(), keep);
        let batches = b
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| TrainError::Data {
                path: path.to_path_buf(),
                msg: format!("cannot read: {e}"),
            })?;
        Ok(OpenFile {
            path: path.to_path_buf(),
            batches,
            fields,
        })
    }

    /// The file the last row came from.
    pub fn path(&self) -> &Path {
        self.open.as_ref().map_or_else(
            || self.files.first().map_or(Path::new(""), |p| p),
            |o| &o.path,
        )
    }

    /// The next row as `(row number in its file, JSON object)`; decoding errors end the read
    /// with an error naming the file and row.
    pub fn next_row(&mut self) -> Result<Option<(u64, Value)>> {
        loop {
            if let (Some(open), Some(batch)) = (&self.open, &self.batch) {
                if self.pos < batch.num_rows() {
                    let i = self.pos;
                    let obj: Map<String, Value> = open
                        .fields
                        .iter()
                        .zip(batch.columns())
                        .filter_map(|(f, c)| Some((f.clone()?, json_at(c.as_ref(), i))))
                        .collect();
                    self.pos += 1;
                    let n = self.row;
                    self.row += 1;
                    return Ok(Some((n, Value::Object(obj))));
                }
            }
            if let Some(open) = &mut self.open {
                match open.batches.next() {
                    Some(Ok(b)) => {
                        self.batch = Some(b);
                        self.pos = 0;
                        continue;
                    }
                    Some(Err(e)) => {
                        return Err(TrainError::BadRecord {
                            path: open.path.clone(),
                            row: self.row,
                            msg: format!("cannot decode (corrupt or truncated file?): {e}"),
                        })
                    }
                    None => {}
                }
            }
            let Some(next) = self.files.get(self.next_file).cloned() else {
                return Ok(None);
            };
            self.next_file += 1;
            self.open = Some(self.open_file(&next)?);
            self.batch = None;
            self.row = 0;
        }
    }
}

fn check_schema(
    path: &Path,
    schema: &Arc<Schema>,
    columns: &Columns,
    required: &[Vec<&str>],
) -> Result<()> {
    let have = || {
        schema
            .fields()
            .iter()
            .map(|f| format!("{} ({})", f.name(), f.data_type()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for r in &columns.renames {
        if schema.field_with_name(&r.column).is_err() {
            return Err(TrainError::Data {
                path: path.to_path_buf(),
                msg: format!(
                    "no column `{}` ({}); the file has columns: {}",
                    r.column,
                    r.key,
                    have()
                ),
            });
        }
    }
    for any_of in required {
        let found = any_of
            .iter()
            .map(|f| columns.column_of(f))
            .find(|(c, _)| schema.field_with_name(c).is_ok());
        let Some((col, _)) = found else {
            let names: Vec<String> = any_of
                .iter()
                .map(|f| match columns.column_of(f) {
                    (c, Some(key)) => format!("`{c}` ({key})"),
                    (c, None) => format!("`{c}`"),
                })
                .collect();
            return Err(TrainError::Data {
                path: path.to_path_buf(),
                msg: format!(
                    "no column {}; the file has columns: {}{}",
                    names.join(" or "),
                    have(),
                    if any_of.len() == 1 && columns.column_of(any_of[0]).1.is_none() {
                        format!(
                            " (if another column holds the {} field, map it with the `{}_key` \
                             setting)",
                            any_of[0], any_of[0]
                        )
                    } else {
                        String::new()
                    }
                ),
            });
        };
        let t = schema
            .field_with_name(col)
            .map(|f| f.data_type().clone())
            .unwrap_or(DataType::Null);
        if !json_type(&t) {
            return Err(TrainError::Data {
                path: path.to_path_buf(),
                msg: format!(
                    "column `{col}` has type {t}, which is not read (strings, numbers, booleans, \
                     and lists and structs of them are)"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_and_column_mapping() {
        assert_eq!(split_of("train-00000-of-00003.parquet"), "train");
        assert_eq!(split_of("validation.parquet"), "validation");
        let c = Columns::default()
            .map("prompt", Some("question"), "rollout.prompt_key")
            .map("answer", Some("answer"), "rollout.answer_key");
        assert_eq!(
            c.column_of("prompt"),
            ("question", Some("rollout.prompt_key"))
        );
        assert_eq!(c.column_of("answer"), ("answer", None));
        assert_eq!(c.field_of("question"), Some("prompt"));
        assert_eq!(c.field_of("prompt"), None);
        assert_eq!(c.field_of("other"), Some("other"));
        let mut obj = serde_json::json!({"question": "q", "prompt": "old"});
        c.apply(obj.as_object_mut().unwrap());
        assert_eq!(obj, serde_json::json!({"prompt": "q"}));
        let mut obj = serde_json::json!({"prompt": "old"});
        c.apply(obj.as_object_mut().unwrap());
        assert_eq!(obj, serde_json::json!({}));
        assert_eq!(c.describe(), " (read with rollout.prompt_key: question)");
    }
}
