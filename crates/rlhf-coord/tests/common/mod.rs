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
