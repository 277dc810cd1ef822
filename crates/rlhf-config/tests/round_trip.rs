//! to_yaml: the resolved config written as YAML loads back to an equal config.

mod common;
use common::*;

use rlhf_config::{load, to_yaml, ConfigSchema, EnvSource, RunConfig};

#[test]
fn the_resolved_yaml_loads_back_equal() {
    let f = Fixture::new();
    let yaml = format!(
        "{}\
launcher:
  kind: slurm
  bind: 0.0.0.0
  slurm: {{partition: gpu, time: \"1-00:00:00\", extra_directives: [\"--exclusive\"]}}
workers:
  - {{name: gen, roles: [actor, reference], device: \"cuda:1\", threads: 2}}
  - {{name: score, roles: [critic, reward], device: cuda}}
algorithm:
  name: grpo
  dual_clip: 3.0
  value_clip: null
  whiten_advantages: false
  kl: {{coef: 0.0001, estimator: k3, mode: loss, target: 6.0}}
  reward: {{attribute_weights: {{helpfulness: 1.0, verbosity: -0.1}}, clip: 5.0}}
",
        BASE.replace(
            "rollout:\n",
            "rollout:\n  samples_per_prompt: 4\n  top_p: 0.9\n"
        )
    );
    let loaded = f
        .load(
            &yaml,
            &["run.name=2024", "train.actor.lr=1e-7"],
            &[("RLHF_RUN__SEED", "7")],
        )
        .unwrap();
    let written = loaded.to_yaml().unwrap();
    assert_eq!(written, to_yaml(&loaded.config).unwrap());

    // Somewhere else entirely: the paths are absolute, so they need no file directory.
    let other = tempfile::tempdir().unwrap();
    let resolved = other.path().join("config.resolved.yaml");
    std::fs::write(&resolved, &written).unwrap();
    let again = load(&resolved, &[], EnvSource::empty()).unwrap();
    assert_eq!(again.config, loaded.config, "written:\n{written}");
    assert_eq!(again.config.run.name, "2024");
    assert_eq!(again.config.run.seed, 7);
    assert_eq!(again.config.train.actor.lr, 1e-7);
    assert_eq!(again.config.algorithm.reward.attribute_weights.len(), 2);
}

#[test]
fn defaults_round_trip_through_yaml() {
    let yaml = to_yaml(&RunConfig::default()).unwrap();
    let back: RunConfig = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(back, RunConfig::default());
    assert!(<RunConfig as ConfigSchema>::SECRET_KEYS.is_empty());
}
