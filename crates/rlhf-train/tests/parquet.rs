//! Parquet data written by pyarrow (scripts/golden/write_parquet.py): a Hugging Face dataset
//! directory with two splits, one of them in two shards, read in order across record batches
//! and row groups; a bad row (null prompt) named by file and row under both `on_bad_row`
//! policies; a missing column named with the columns the file has; column mapping; columns of
//! other types (binary) left unread.

use std::path::Path;

use rlhf_train::columnar::DEFAULT_SPLIT;
use rlhf_train::config::DataSource;
use rlhf_train::data::{
    parse_chat, parse_pairwise, read_rows, read_rows_from, DataInput, OnBadRow, RowOutcome,
};
use serde_json::{json, Value};

mod common;

/// Writes the files of `spec` (see write_parquet.py) with pyarrow.
fn write_parquet(dir: &Path, spec: Value) {
    let f = dir.join("spec.json");
    std::fs::write(&f, spec.to_string()).unwrap();
    common::run_python("write_parquet.py", &[&f]);
}

fn chat_row(i: usize) -> Value {
    json!({
        "id": i,
        "messages": [
            {"role": "user", "content": format!("question {i}")},
            {"role": "assistant", "content": format!("answer {i}")},
        ],
        "score": i as f64 / 2.0,
    })
}

/// Every row of `input` as (row number, JSON object).
fn all_rows(input: &DataInput<'_>) -> Vec<(u64, Value)> {
    read_rows_from(input, OnBadRow::Fail, |v| Ok(RowOutcome::Use(v.clone())))
        .unwrap()
        .0
}

#[test]
fn a_dataset_directory_is_read_split_by_split_in_shard_order() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    // 1500 + 700 training rows: more than one record batch (1024 rows) and several row groups
    // per shard; the second shard compressed with zstd.
    let train: Vec<Value> = (0..2200).map(chat_row).collect();
    let validation: Vec<Value> = (5000..5003).map(chat_row).collect();
    write_parquet(
        tmp.path(),
        json!([
            {"path": ds.join("data/train-00000-of-00002.parquet"), "rows": &train[..1500],
             "row_group_size": 600},
            {"path": ds.join("data/train-00001-of-00002.parquet"), "rows": &train[1500..],
             "compression": "zstd"},
            {"path": ds.join("data/validation-00000-of-00001.parquet"), "rows": validation},
        ]),
    );
    let rows = all_rows(&DataInput::new(&ds));
    assert_eq!(rows.len(), 2200);
    for (k, (n, v)) in rows.iter().enumerate() {
        let want_n = if k < 1500 { k } else { k - 1500 };
        assert_eq!(*n, want_n as u64, "row {k}");
        assert_eq!(v["id"], json!(k), "row {k}");
        assert_eq!(v["score"], json!(k as f64 / 2.0));
    }
    // Chat messages arrive as the list of {role, content} objects the chat parser reads.
    let msgs = parse_chat(&rows[1700].1).unwrap();
    assert_eq!(msgs[0].content, "question 1700");
    assert_eq!(msgs[1].role, "assistant");

    let mut input = DataInput::new(&ds);
    input.split = Some("validation");
    let ids: Vec<Value> = all_rows(&input)
        .into_iter()
        .map(|r| r.1["id"].clone())
        .collect();
    assert_eq!(ids, [json!(5000), json!(5001), json!(5002)]);

    input.split = Some("test");
    input.split_key = "data.train.split".into();
    let e = read_rows_from(&input, OnBadRow::Fail, |v| Ok(RowOutcome::Use(v.clone())))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no Parquet files of split `test`")
            && e.contains("its splits are train, validation")
            && e.contains("set data.train.split"),
        "{e}"
    );
    assert_eq!(DEFAULT_SPLIT, "train");

    // A single shard read as a file, and the `{split}/` layout.
    let one = ds.join("data/validation-00000-of-00001.parquet");
    assert_eq!(all_rows(&DataInput::new(&one)).len(), 3);
    let other = tmp.path().join("other");
    write_parquet(
        tmp.path(),
        json!([{"path": other.join("train/0000.parquet"), "rows": &train[..5]}]),
    );
    assert_eq!(all_rows(&DataInput::new(&other)).len(), 5);
}

#[test]
fn a_bad_row_is_named_by_file_and_row_under_either_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("pairs.parquet");
    write_parquet(
        tmp.path(),
        json!([{"path": &f, "rows": [
            {"prompt": "p0", "chosen": "good", "rejected": "bad"},
            {"prompt": null, "chosen": "good", "rejected": "bad"},
            {"prompt": "p2", "chosen": "good", "rejected": "bad"},
        ]}]),
    );
    let parse = |v: &Value| parse_pairwise(v).map(RowOutcome::Use);
    let e = read_rows(&f, OnBadRow::Fail, parse)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("pairs.parquet: row 1 (counting from 0): missing field `prompt`")
            && e.contains(rlhf_train::data::GENERIC_SKIP_HINT),
        "{e}"
    );
    let (rows, stats) = read_rows(&f, OnBadRow::Skip, parse).unwrap();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 2]);
    assert_eq!((stats.rows, stats.used, stats.skipped_bad), (3, 2, 1));
}

#[test]
fn missing_columns_are_named_with_the_columns_there_are() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("pairs.parquet");
    write_parquet(
        tmp.path(),
        json!([{"path": &f, "binary_columns": ["image"], "rows": [
            {"question": "q", "chosen": "good", "rej": "bad", "image": "\u{1}png"},
        ]}]),
    );
    let mut src = DataSource {
        path: f.clone(),
        ..DataSource::default()
    };
    let required = || vec![vec!["chosen"], vec!["rejected"]];
    let parse = |v: &Value| parse_pairwise(v).map(RowOutcome::Use);
    let e = read_rows_from(&src.input("data.train", required()), OnBadRow::Fail, parse)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("pairs.parquet: no column `rejected`")
            && e.contains(
                "the file has columns: question (Utf8), chosen (Utf8), rej (Utf8), image (Binary)"
            )
            && e.contains("rejected_key"),
        "{e}"
    );
    // A mapped column that is not there names the key that mapped it.
    src.prompt_key = Some("prompt_text".into());
    src.rejected_key = Some("rej".into());
    let e = read_rows_from(&src.input("data.train", required()), OnBadRow::Fail, parse)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no column `prompt_text` (data.train.prompt_key)"),
        "{e}"
    );
    // Mapped right, the row reads; the binary column is not decoded.
    src.prompt_key = Some("question".into());
    let (rows, _) = read_rows_from(
        &src.input("data.train", required()),
        OnBadRow::Fail,
        |v: &Value| {
            assert!(
                v.get("image").is_none() && v.get("question").is_none(),
                "{v}"
            );
            parse_pairwise(v).map(RowOutcome::Use)
        },
    )
    .unwrap();
    assert_eq!(rows[0].1.prompt[0].content, "q");
    assert_eq!(rows[0].1.rejected[0].content, "bad");
    // The same mapping reads a JSONL file.
    let j = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &j,
        "{\"question\": \"q\", \"chosen\": \"good\", \"rej\": \"bad\"}\n",
    )
    .unwrap();
    src.path = j;
    let (rows, _) =
        read_rows_from(&src.input("data.train", required()), OnBadRow::Fail, parse).unwrap();
    assert_eq!(rows[0].1.rejected[0].content, "bad");
}
