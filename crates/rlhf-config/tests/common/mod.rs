//! Shared fixtures: a temp directory with fake model directories, a prompts file and a run file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rlhf_config::{load, ConfigError, EnvSource, LoadedConfig};

/// The smallest valid run file, relative to the fixture directory.
pub const BASE: &str = "\
run:
  name: t
models:
  policy: models/policy
  reward:
    path: models/rm
rollout:
  prompts: data/prompts.jsonl
";

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// `models/policy/config.json`, `models/rm/config.json`, `data/prompts.jsonl`.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for model in ["policy", "rm", "ref"] {
            let d = dir.path().join("models").join(model);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("config.json"), "{}").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(
            dir.path().join("data/prompts.jsonl"),
            "{\"prompt\": \"2+2?\", \"answer\": \"4\"}\n",
        )
        .unwrap();
        Fixture { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `yaml` as `name` in the fixture directory.
    pub fn write(&self, name: &str, yaml: &str) -> PathBuf {
        let file = self.path().join(name);
        std::fs::write(&file, yaml).unwrap();
        file
    }

    /// Writes `yaml` as `run.yaml` and loads it with these `--set`s and env variables only.
    pub fn load(
        &self,
        yaml: &str,
        sets: &[&str],
        env: &[(&str, &str)],
    ) -> Result<LoadedConfig, ConfigError> {
        let file = self.write("run.yaml", yaml);
        load(&file, &strings(sets), vars(env))
    }

    /// `run.yaml:LINE` as errors spell it.
    pub fn at(&self, line: usize) -> String {
        format!("{}:{line}", self.path().join("run.yaml").display())
    }
}

pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

pub fn vars(env: &[(&str, &str)]) -> EnvSource {
    EnvSource::Vars(
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// The 1-based line of the only line of `yaml` containing `needle`.
pub fn line_of(yaml: &str, needle: &str) -> usize {
    let hits: Vec<usize> = yaml
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(hits.len(), 1, "`{needle}` must occur on exactly one line");
    hits[0]
}

/// The error's message, after asserting the load failed.
pub fn err(result: Result<LoadedConfig, ConfigError>) -> String {
    match result {
        Ok(_) => panic!("expected the load to fail"),
        Err(e) => e.to_string(),
    }
}
