//! load_as with another config type (as a reward-model training job would use it): its own
//! sections filter the environment, its secrets are redacted, its paths and checks run.

mod common;
use common::*;

use std::path::PathBuf;

use rlhf_config::{load_as, to_yaml, ConfigError, ConfigSchema, Provenance};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RmJob {
    data: Data,
    judge: Judge,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Data {
    train: PathBuf,
    epochs: u64,
}

impl Default for Data {
    fn default() -> Self {
        Data {
            train: PathBuf::new(),
            epochs: 2,
        }
    }
}

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Judge {
    api_key: Option<String>,
}

impl ConfigSchema for RmJob {
    const SECRET_KEYS: &'static [&'static str] = &["judge.api_key"];

    fn visit_paths(&mut self, visit: &mut dyn FnMut(&str, &mut PathBuf)) {
        visit("data.train", &mut self.data.train);
    }

    fn validate(&self, provenance: &Provenance) -> Result<(), ConfigError> {
        if self.data.epochs > 10 {
            return Err(provenance.error_at("data.epochs", "at most 10"));
        }
        Ok(())
    }
}

#[test]
fn another_schema_gets_the_same_precedence_and_errors() {
    let f = Fixture::new();
    let yaml = "data:\n  train: pairs.jsonl\n  epochs: 3\njudge:\n  api_key: s3cret\n";
    let file = f.write("rm.yaml", yaml);
    let env = vars(&[
        ("RLHF_DATA__EPOCHS", "4"),
        ("RLHF_RUN__NAME", "not-a-section-here"),
    ]);
    let loaded = load_as::<RmJob>(&file, &[], env).unwrap();
    assert_eq!(loaded.config.data.epochs, 4);
    assert_eq!(loaded.config.data.train, f.path().join("pairs.jsonl"));

    let written = to_yaml(&loaded.config).unwrap();
    assert!(!written.contains("s3cret"), "{written}");
    assert!(written.contains("api_key: <redacted>"), "{written}");

    let e = load_as::<RmJob>(&file, &strings(&["data.epochs=11"]), vars(&[])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "data.epochs: at most 10 (from --set data.epochs=11)"
    );

    let bad = f.write("bad.yaml", "data:\n  train: x\n  epoch: 3\n");
    let e = load_as::<RmJob>(&bad, &[], vars(&[])).unwrap_err();
    assert!(e.to_string().starts_with("data.epoch: unknown key"), "{e}");
    assert!(e.to_string().contains("bad.yaml:3"), "{e}");
}
