//! Helpers shared by the multi-process tests of `rlhf-coord` (launch, resume, validation, slurm):
//! the binaries, a tiny model, arithmetic prompts and output text. Each test file uses a subset.
#![allow(dead_code)]

pub mod slurm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `rlhf-coord` with info logs and one libtorch thread (deterministic reductions).
pub fn coord() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf-coord"));
    c.env("RLHF_LOG", "info").env("OMP_NUM_THREADS", "1");
    c
}

/// The `rlhf-worker` built next to `rlhf-coord` (`cargo test --workspace` builds it).
pub fn worker_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_rlhf-coord")).with_file_name("rlhf-worker");
    assert!(
        p.exists(),
        "{} missing: build it with `cargo build -p rlhf-worker` (cargo test --workspace does)",
        p.display()
    );
    p
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// stdout then stderr, as text.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A tiny random Llama in HF layout at `dir`.
pub fn tiny_model(dir: &Path) {
    let out = coord()
        .args(["init-model", "--preset", "tiny", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "init-model: {}", text(&out));
}

/// `dir/prompts.jsonl`: `a+b=` with its answer for a, b in 0..n.
pub fn arithmetic_prompts(dir: &Path, n: u32) {
    let mut prompts = String::new();
    for a in 0..n {
        for b in 0..n {
            prompts.push_str(&format!(
                "{{\"prompt\": \"{a}+{b}=\", \"answer\": \"{}\"}}\n",
                a + b
            ));
        }
    }
    std::fs::write(dir.join("prompts.jsonl"), prompts).unwrap();
}

/// Parsed lines of a JSONL file (empty when it does not exist).
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `rlhf-coord launch FILE --set S ...`, waited for.
pub fn launch(file: &Path, set: &[&str]) -> Output {
    let mut c = coord();
    c.arg("launch").arg(file);
    for s in set {
        c.args(["--set", s]);
    }
    c.output().unwrap()
}

/// The venv interpreter with the test packages (scripts/setup-torch.sh --test-deps).
pub fn python() -> PathBuf {
    if let Ok(v) = std::env::var("RLHF_TORCH_VENV") {
        let p = Path::new(&v).join("bin/python");
        if p.exists() {
            return p;
        }
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = Path::new(&home).join(".cache/rlhf-coord/torch-venv/bin/python");
    if p.exists() {
        return p;
    }
    PathBuf::from("python3")
}

/// Writes Parquet files with pyarrow: `spec` as scripts/golden/write_parquet.py takes it (a
/// list of `{path, rows, compression?, row_group_size?}`), through a file in `dir`.
pub fn write_parquet(dir: &Path, spec: serde_json::Value) {
    let f = dir.join("parquet-spec.json");
    std::fs::write(&f, spec.to_string()).unwrap();
    let out = Command::new(python())
        .arg(repo().join("scripts/golden/write_parquet.py"))
        .arg(&f)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "write_parquet.py failed (did you run `scripts/setup-torch.sh --test-deps`?): {}",
        text(&out)
    );
}

/// The TensorBoard event files of a run directory as tbparse reads them
/// (scripts/golden/read_tensorboard.py): the files in name order, and `(file name, tag, step,
/// value)` rows of the scalars and of the texts.
pub struct TensorBoard {
    pub files: Vec<String>,
    pub scalars: Vec<(String, String, u64, f64)>,
    pub text: Vec<(String, String, u64, String)>,
}

/// Reads `run_dir/tensorboard` with tbparse; fails (never skips) without it.
pub fn read_tensorboard(run_dir: &Path) -> TensorBoard {
    let dir = run_dir.join("tensorboard");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let out = Command::new(python())
        .arg(repo().join("scripts/golden/read_tensorboard.py"))
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "read_tensorboard.py failed (did you run `scripts/setup-torch.sh --test-deps`?): {}",
        text(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = |kind: &str| -> Vec<(String, String, u64, serde_json::Value)> {
        v[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().to_string(),
                    r[1].as_str().unwrap().to_string(),
                    r[2].as_u64().unwrap(),
                    r[3].clone(),
                )
            })
            .collect()
    };
    TensorBoard {
        files,
        scalars: rows("scalars")
            .into_iter()
            .map(|(f, t, s, v)| (f, t, s, v.as_f64().unwrap()))
            .collect(),
        text: rows("text")
            .into_iter()
            .map(|(f, t, s, v)| (f, t, s, v.as_str().unwrap().to_string()))
            .collect(),
    }
}

impl TensorBoard {
    /// The scalars TensorBoard shows, by (tag, step): the files read in name order, each
    /// file's points of a tag replacing the earlier files' points at and after its first step
    /// (how TensorBoard takes a tag's step going back: a restarted job).
    pub fn shown_scalars(&self) -> std::collections::BTreeMap<(String, u64), f64> {
        let mut shown = std::collections::BTreeMap::<(String, u64), f64>::new();
        for file in &self.files {
            let mut first = std::collections::BTreeMap::<&str, u64>::new();
            for (f, tag, step, _) in &self.scalars {
                if f == file {
                    let s = first.entry(tag).or_insert(*step);
                    *s = (*s).min(*step);
                }
            }
            shown.retain(|(tag, step), _| first.get(tag.as_str()).is_none_or(|s| step < s));
            for (f, tag, step, v) in &self.scalars {
                if f == file {
                    shown.insert((tag.clone(), *step), *v);
                }
            }
        }
        shown
    }
}

/// Asserts that TensorBoard shows exactly the scalars of `run_dir/metrics.jsonl`: every finite
/// number of each line under its key at the line's step (TensorBoard keeps f32), nothing else.
pub fn assert_tensorboard_shows_the_metrics(tb: &TensorBoard, run_dir: &Path) {
    let mut want = std::collections::BTreeMap::new();
    for line in jsonl(&run_dir.join("metrics.jsonl")) {
        let step = line["step"].as_u64().unwrap();
        for (k, v) in line.as_object().unwrap() {
            if let Some(x) = v.as_f64().filter(|_| k != "step") {
                want.insert((k.clone(), step), x as f32);
            }
        }
    }
    let shown: std::collections::BTreeMap<(String, u64), f32> = tb
        .shown_scalars()
        .into_iter()
        .map(|(k, v)| (k, v as f32))
        .collect();
    for (key, w) in &want {
        assert_eq!(
            shown.get(key),
            Some(w),
            "TensorBoard's {key:?} vs metrics.jsonl"
        );
    }
    let extra: Vec<_> = shown.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        extra.is_empty(),
        "TensorBoard shows points metrics.jsonl does not have: {extra:?}"
    );
}
