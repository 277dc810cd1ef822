//! Helpers shared by this crate's integration tests: model directories made on the spot and the
//! Python reference interpreter.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use rlhf_model::init::{init_model, InitSpec, Preset};
use rlhf_model::Family;

/// The venv interpreter that has torch + transformers (scripts/setup-torch.sh --test-deps).
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

/// Runs a script from `scripts/golden/` and panics with its stderr on failure.
pub fn run_python(script: &str, args: &[&Path]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("scripts/golden").join(script);
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "{} failed (did you run `scripts/setup-torch.sh --test-deps`?):\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn tiny(
    dir: &Path,
    family: Family,
    tied: Option<bool>,
    kv: Option<usize>,
    seed: i64,
) -> PathBuf {
    let mut spec = InitSpec::new(family, Preset::Tiny);
    spec.tie_word_embeddings = tied;
    spec.num_key_value_heads = kv;
    spec.seed = seed;
    init_model(&spec, dir).expect("init_model");
    dir.to_path_buf()
}

/// Edits `config.json` in place.
pub fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}
