//! Precedence: defaults < YAML file < RLHF_ environment variables < --set, on scalars, nested
//! keys, list items and whole lists.

mod common;
use common::*;

use rlhf_config::{AlgorithmName, Device, Origin, Role};

#[test]
fn file_overrides_defaults_env_overrides_file_set_overrides_env() {
    let f = Fixture::new();
    let yaml = format!("{BASE}train:\n  steps: 10\n  epochs: 2\n  micro_batch_size: 4\n");

    let only_file = f.load(&yaml, &[], &[]).unwrap();
    assert_eq!(only_file.config.train.steps, 10);
    assert_eq!(only_file.config.train.epochs, 2);
    assert_eq!(only_file.config.train.micro_batch_size, 4);
    // Not in the file: the default.
    assert_eq!(only_file.config.rollout.batch_size, 8);

    let env = [("RLHF_TRAIN__STEPS", "20"), ("RLHF_TRAIN__EPOCHS", "3")];
    let with_env = f.load(&yaml, &[], &env).unwrap();
    assert_eq!(with_env.config.train.steps, 20);
    assert_eq!(with_env.config.train.epochs, 3);
    assert_eq!(with_env.config.train.micro_batch_size, 4, "file value kept");

    let with_set = f.load(&yaml, &["train.steps=30"], &env).unwrap();
    assert_eq!(with_set.config.train.steps, 30);
    assert_eq!(with_set.config.train.epochs, 3, "env value kept");

    assert_eq!(
        with_set.origin("train.steps"),
        Origin::Set {
            arg: "train.steps=30".into()
        }
    );
    assert_eq!(
        with_set.origin("train.epochs"),
        Origin::Env {
            var: "RLHF_TRAIN__EPOCHS".into()
        }
    );
    assert_eq!(
        with_set.origin("train.micro_batch_size"),
        Origin::File {
            file: f.path().join("run.yaml"),
            line: Some(line_of(&yaml, "micro_batch_size"))
        }
    );
    assert_eq!(with_set.origin("rollout.batch_size"), Origin::Default);
}

#[test]
fn set_values_are_read_as_yaml() {
    let f = Fixture::new();
    let loaded = f
        .load(
            BASE,
            &[
                "rollout.temperature=0.7",
                "run.name=x",
                "algorithm.name=reinforce",
                "algorithm.dual_clip=3",
                "algorithm.value_clip=null",
                "rollout.shuffle=false",
                "algorithm.reward.attribute_weights={helpfulness: 1}",
            ],
            &[],
        )
        .unwrap();
    let c = &loaded.config;
    assert_eq!(c.rollout.temperature, 0.7);
    assert_eq!(c.run.name, "x");
    assert_eq!(c.algorithm.name, AlgorithmName::Reinforce);
    assert_eq!(c.algorithm.dual_clip, Some(3.0));
    assert_eq!(c.algorithm.value_clip, None);
    assert!(!c.rollout.shuffle);
    // A map named by a source replaces the default map; it is not merged into it.
    assert_eq!(c.algorithm.reward.attribute_weights.len(), 1);
    assert_eq!(c.algorithm.reward.attribute_weights["helpfulness"], 1.0);
}

#[test]
fn a_name_that_reads_as_a_number_stays_text() {
    let f = Fixture::new();
    let loaded = f.load(BASE, &["run.name=2024"], &[]).unwrap();
    assert_eq!(loaded.config.run.name, "2024");
    let msg = err(f.load(BASE, &["run.name="], &[]));
    assert!(
        msg.starts_with("run.name: expected a string, found nothing"),
        "{msg}"
    );
    assert!(msg.contains("from --set run.name="), "{msg}");
}

#[test]
fn list_items_can_be_overridden_by_index() {
    let f = Fixture::new();
    // Over the default placement (no `workers:` in the file).
    let loaded = f
        .load(
            BASE,
            &["workers.0.threads=2", "workers[3].device=cuda:1"],
            &[],
        )
        .unwrap();
    let w = &loaded.config.workers;
    assert_eq!(w.len(), 4);
    assert_eq!((w[0].name.as_str(), w[0].threads), ("actor", 2));
    assert_eq!(w[3].device, Device::Cuda(Some(1)));
    assert_eq!(w[1].threads, 1);

    // Over a list from the file, by env then --set: untouched items and fields stay as written.
    let yaml = format!(
        "{BASE}workers:\n  - name: gen\n    roles: [actor, reference]\n    threads: 3\n  - name: score\n    roles: [critic, reward]\n"
    );
    let loaded = f
        .load(
            &yaml,
            &["workers.1.threads=5"],
            &[("RLHF_WORKERS__0__DEVICE", "cuda")],
        )
        .unwrap();
    let w = &loaded.config.workers;
    assert_eq!(w.len(), 2);
    assert_eq!(
        (w[0].name.as_str(), w[0].threads, w[0].device),
        ("gen", 3, Device::Cuda(None))
    );
    assert_eq!((w[1].name.as_str(), w[1].threads), ("score", 5));
    assert_eq!(w[1].roles, [Role::Critic, Role::Reward]);
    // The untouched item's name still points at the file.
    assert_eq!(
        loaded.locate("workers[1].name"),
        Some(f.at(line_of(&yaml, "name: score")))
    );
    assert_eq!(
        loaded.origin("workers[1].name"),
        Origin::File {
            file: f.path().join("run.yaml"),
            line: Some(line_of(&yaml, "name: score"))
        }
    );
}

#[test]
fn a_whole_list_can_be_set_as_a_flow_value() {
    let f = Fixture::new();
    let loaded = f
        .load(
            BASE,
            &["workers=[{name: all, roles: [actor, critic, reward, reference], threads: 2}]"],
            &[],
        )
        .unwrap();
    assert_eq!(loaded.config.workers.len(), 1);
    assert_eq!(loaded.config.workers[0].threads, 2);
    assert_eq!(loaded.config.workers[0].roles.len(), 4);
}

#[test]
fn a_section_variable_applies_before_its_more_specific_keys() {
    let f = Fixture::new();
    let env = [
        ("RLHF_TRAIN__ACTOR__LR", "0.001"),
        (
            "RLHF_TRAIN",
            "{actor: {lr: 0.5, weight_decay: 0.1}, steps: 7}",
        ),
    ];
    let loaded = f.load(BASE, &[], &env).unwrap();
    let t = &loaded.config.train;
    assert_eq!(t.actor.lr, 0.001);
    assert_eq!(t.actor.weight_decay, 0.1);
    assert_eq!(t.steps, 7);
    // Sections merge: what neither variable names keeps its default.
    assert_eq!(t.critic.lr, 1e-5);
}

#[test]
fn a_section_left_empty_means_its_defaults() {
    let f = Fixture::new();
    // Every key of `slurm:` and `train:` commented out: YAML reads null, the user means defaults.
    let yaml = format!("{BASE}launcher:\n  slurm:\n    # partition: gpu\ntrain:\n  # steps: 3\n");
    let loaded = f.load(&yaml, &[], &[]).unwrap();
    assert_eq!(loaded.config.launcher.slurm.nodes, 1);
    assert_eq!(loaded.config.train.steps, 100);
    // A null option is still a null option.
    let yaml = format!("{BASE}algorithm:\n  value_clip:\n");
    let loaded = f.load(&yaml, &[], &[]).unwrap();
    assert_eq!(loaded.config.algorithm.value_clip, None);
}

/// `on` and `off` are words here, not YAML 1.1 booleans, in the file, the environment and
/// `--set` alike.
#[test]
fn tls_mode_from_file_env_and_set() {
    use rlhf_config::TlsMode;
    let f = Fixture::new();
    let yaml = format!("{BASE}launcher:\n  tls: on\n");
    assert_eq!(
        f.load(BASE, &[], &[]).unwrap().config.launcher.tls,
        TlsMode::Auto
    );
    assert_eq!(
        f.load(&yaml, &[], &[]).unwrap().config.launcher.tls,
        TlsMode::On
    );
    let env = [("RLHF_LAUNCHER__TLS", "off")];
    assert_eq!(
        f.load(&yaml, &[], &env).unwrap().config.launcher.tls,
        TlsMode::Off
    );
    let set = f.load(&yaml, &["launcher.tls=auto"], &env).unwrap();
    assert_eq!(set.config.launcher.tls, TlsMode::Auto);
}
