//! Which RLHF_ environment variables are config: only those naming a section; RLHF_LOG and
//! other tools' variables are ignored, and bad names are reported.

mod common;
use common::*;

use rlhf_config::ConfigError;

#[test]
fn unrelated_rlhf_variables_are_ignored() {
    let f = Fixture::new();
    let env = [
        ("RLHF_LOG", "debug"),
        ("RLHF_LOG_FORMAT", "json"),
        ("RLHF_TORCH_VENV", "/opt/venv"),
        ("RLHF_TEST_CUDA", "1"),
        ("RLHF_RUN_TOKEN", "abc"),
        ("RLHF_WORKER_ADDR", "x"),
        ("PATH", "/bin"),
    ];
    let loaded = f.load(BASE, &[], &env).unwrap();
    // RLHF_LOG_FORMAT is not logging.format.
    assert_eq!(loaded.config.logging.format, rlhf_config::LogFormat::Plain);
    assert_eq!(loaded.config.run.name, "t");
}

#[test]
fn section_variables_are_config_and_case_insensitive_in_keys() {
    let f = Fixture::new();
    let env = [
        ("RLHF_LOGGING__FORMAT", "json"),
        ("RLHF_ROLLOUT__SAMPLES_PER_PROMPT", "4"),
        ("RLHF_Run__Seed", "9"),
    ];
    let loaded = f.load(BASE, &[], &env).unwrap();
    assert_eq!(loaded.config.logging.format, rlhf_config::LogFormat::Json);
    assert_eq!(loaded.config.rollout.samples_per_prompt, 4);
    assert_eq!(loaded.config.run.seed, 9);
}

#[test]
fn a_section_variable_with_an_unknown_key_is_an_error() {
    let f = Fixture::new();
    // RLHF_RUN__TOKEN names the `run` section, so it is config, and `token` is unknown.
    let msg = err(f.load(BASE, &[], &[("RLHF_RUN__TOKEN", "abc")]));
    assert!(msg.starts_with("run.token: unknown key"), "{msg}");
    assert!(
        msg.contains("from environment variable RLHF_RUN__TOKEN"),
        "{msg}"
    );
}

#[test]
fn an_empty_segment_is_reported_with_the_variable() {
    let f = Fixture::new();
    let e = f
        .load(BASE, &[], &[("RLHF_TRAIN____STEPS", "3")])
        .unwrap_err();
    assert!(matches!(e, ConfigError::BadEnv { .. }), "{e}");
    assert!(e.to_string().contains("RLHF_TRAIN____STEPS"), "{e}");
}
