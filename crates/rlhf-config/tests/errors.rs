//! Load errors: malformed YAML, unknown keys, bad values and bad --set arguments, each naming the
//! key path and FILE:LINE (or the variable / --set argument the value came from).

mod common;
use common::*;

use rlhf_config::{load, ConfigError, EnvSource};

#[test]
fn malformed_yaml_names_file_line_and_column() {
    let f = Fixture::new();
    let yaml = "run:\n  name: t\nmodels:\n  policy: [models/policy\nrollout: {}\n";
    let e = f.load(yaml, &[], &[]).unwrap_err();
    let ConfigError::Malformed { line, column, .. } = &e else {
        panic!("expected Malformed, got {e}");
    };
    assert!(*line >= 4 && *column >= 1, "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "{}:{line}:{column}: malformed YAML",
            f.path().join("run.yaml").display()
        )),
        "{msg}"
    );
}

#[test]
fn duplicate_keys_point_at_the_repeated_key() {
    let f = Fixture::new();
    let yaml = format!("{BASE}train:\n  steps: 1\n  steps: 2\n");
    let msg = err(f.load(&yaml, &[], &[]));
    let line = yaml
        .lines()
        .collect::<Vec<_>>()
        .iter()
        .rposition(|l| l.contains("steps"))
        .unwrap()
        + 1;
    assert!(msg.contains(&format!("run.yaml:{line}:")), "{msg}");
    assert!(msg.contains("duplicate key `steps`"), "{msg}");
}

#[test]
fn a_top_level_that_is_not_a_mapping_is_an_error() {
    let f = Fixture::new();
    let msg = err(f.load("- run\n- models\n", &[], &[]));
    assert!(
        msg.contains("must be a mapping") && msg.contains("a list"),
        "{msg}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let f = Fixture::new();
    let missing = f.path().join("nope.yaml");
    let e = load(&missing, &[], EnvSource::empty()).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().contains("nope.yaml"), "{e}");
}

#[test]
fn unknown_nested_key_names_path_and_line() {
    let f = Fixture::new();
    let yaml = format!("{BASE}algorithm:\n  kl:\n    coeff: 0.1\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("algorithm.kl.coeff: unknown key `coeff`"),
        "{msg}"
    );
    assert!(msg.contains("`coef`"), "suggests the known keys: {msg}");
    assert!(msg.contains(&f.at(line_of(&yaml, "coeff"))), "{msg}");
}

#[test]
fn unknown_key_in_a_list_item_names_index_and_line() {
    let f = Fixture::new();
    let yaml = format!(
        "{BASE}workers:\n  - name: a\n    roles: [actor, critic]\n  - name: b\n    role: [reward, reference]\n"
    );
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(msg.starts_with("workers[1].role: unknown key"), "{msg}");
    assert!(msg.contains(&f.at(line_of(&yaml, "role:"))), "{msg}");
}

#[test]
fn bad_enum_value_names_path_line_and_choices() {
    let f = Fixture::new();
    let yaml = format!("{BASE}algorithm:\n  gamma: 1.0\n  name: ppo2\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("algorithm.name: invalid value `ppo2`"),
        "{msg}"
    );
    assert!(msg.contains("`reinforce_pp`"), "{msg}");
    assert!(msg.contains(&f.at(line_of(&yaml, "ppo2"))), "{msg}");
}

#[test]
fn bad_enum_value_inside_a_list_item() {
    let f = Fixture::new();
    let yaml = format!(
        "{BASE}workers:\n  - name: a\n    roles: [actor, critic]\n  - name: b\n    roles: [reward, refrence]\n"
    );
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("workers[1].roles[1]: invalid value `refrence`"),
        "{msg}"
    );
    assert!(msg.contains(&f.at(line_of(&yaml, "refrence"))), "{msg}");
}

#[test]
fn wrong_type_names_path_and_line() {
    let f = Fixture::new();
    let yaml = format!("{BASE}train:\n  epochs: 1\n  steps: many\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("train.steps: expected u64, found string \"many\""),
        "{msg}"
    );
    assert!(msg.contains(&f.at(line_of(&yaml, "many"))), "{msg}");

    let yaml = format!("{BASE}launcher:\n  bind: localhost\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("launcher.bind: invalid IP address"),
        "{msg}"
    );
    assert!(msg.contains(&f.at(line_of(&yaml, "bind"))), "{msg}");
}

#[test]
fn custom_value_errors_name_path_and_line() {
    let f = Fixture::new();
    let yaml = format!(
        "{BASE}workers:\n  - name: a\n    roles: [actor, critic, reward, reference]\n    device: gpu\n"
    );
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("workers[0].device: invalid device `gpu`"),
        "{msg}"
    );
    assert!(msg.contains(&f.at(line_of(&yaml, "gpu"))), "{msg}");
}

#[test]
fn bad_value_from_env_names_the_variable() {
    let f = Fixture::new();
    let msg = err(f.load(BASE, &[], &[("RLHF_TRAIN__STEPS", "abc")]));
    assert!(msg.starts_with("train.steps: expected u64"), "{msg}");
    assert!(
        msg.contains("from environment variable RLHF_TRAIN__STEPS"),
        "{msg}"
    );
    assert!(!msg.contains("run.yaml"), "{msg}");
}

#[test]
fn bad_value_from_set_names_the_argument() {
    let f = Fixture::new();
    // Even when the file sets the key too, the error blames the --set that won.
    let yaml = format!("{BASE}train:\n  steps: 5\n");
    let msg = err(f.load(&yaml, &["train.steps=abc"], &[]));
    assert!(msg.starts_with("train.steps: expected u64"), "{msg}");
    assert!(msg.contains("from --set train.steps=abc"), "{msg}");

    let msg = err(f.load(BASE, &["workers.2.threads=x"], &[]));
    assert!(msg.starts_with("workers[2].threads:"), "{msg}");
    assert!(msg.contains("from --set workers.2.threads=x"), "{msg}");
}

#[test]
fn unknown_key_from_set_and_env_names_the_source() {
    let f = Fixture::new();
    let msg = err(f.load(BASE, &["rollout.temprature=0.5"], &[]));
    assert!(msg.starts_with("rollout.temprature: unknown key"), "{msg}");
    assert!(msg.contains("from --set rollout.temprature=0.5"), "{msg}");

    let msg = err(f.load(BASE, &[], &[("RLHF_ROLLOUT__TEMPRATURE", "0.5")]));
    assert!(msg.starts_with("rollout.temprature: unknown key"), "{msg}");
    assert!(msg.contains("RLHF_ROLLOUT__TEMPRATURE"), "{msg}");
}

#[test]
fn malformed_set_arguments_are_named() {
    let f = Fixture::new();
    for (arg, reason) in [
        ("train.steps", "no `=`"),
        ("=3", "the key is empty"),
        ("  =3", "the key is empty"),
        ("train..steps=3", "empty segment"),
        ("workers.7.threads=2", "out of range"),
        ("workers.name=x", "is a list"),
        ("run.name.first=x", "not a section"),
    ] {
        let e = f.load(BASE, &[arg], &[]).unwrap_err();
        assert!(matches!(e, ConfigError::BadOverride { .. }), "{arg}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("`{arg}`")), "{msg}");
        assert!(msg.contains(reason), "{arg}: {msg}");
    }
}

#[test]
fn errors_expose_their_key() {
    let f = Fixture::new();
    let e = f.load(BASE, &["rollout.top_p=0"], &[]).unwrap_err();
    assert_eq!(e.key(), Some("rollout.top_p"));
}

#[test]
fn bad_tls_mode_names_the_key_and_the_choices() {
    let f = Fixture::new();
    let yaml = format!("{BASE}launcher:\n  tls: maybe\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("launcher.tls: invalid value `maybe`"),
        "{msg}"
    );
    assert!(
        msg.contains("`auto`") && msg.contains("`on`") && msg.contains("`off`"),
        "{msg}"
    );
    assert!(msg.contains(&f.at(line_of(&yaml, "maybe"))), "{msg}");
}
