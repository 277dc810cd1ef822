//! Documented defaults: the `Default: X` in each field's doc comment equals the value the
//! loader produces for a file that leaves the field out.

mod common;
use common::*;

/// (key in the config, struct in schema.rs or rlhf-settings, field)
const DOCUMENTED: &[(&str, &str, &str)] = &[
    ("run.dir", "RunSection", "dir"),
    ("run.seed", "RunSection", "seed"),
    ("launcher.kind", "LauncherConfig", "kind"),
    ("launcher.bind", "LauncherConfig", "bind"),
    (
        "launcher.startup_timeout_s",
        "LauncherConfig",
        "startup_timeout_s",
    ),
    (
        "launcher.heartbeat_interval_ms",
        "LauncherConfig",
        "heartbeat_interval_ms",
    ),
    (
        "launcher.heartbeat_timeout_ms",
        "LauncherConfig",
        "heartbeat_timeout_ms",
    ),
    ("launcher.rpc_timeout_s", "LauncherConfig", "rpc_timeout_s"),
    ("launcher.tls", "LauncherConfig", "tls"),
    ("launcher.slurm.nodes", "SlurmConfig", "nodes"),
    (
        "launcher.slurm.signal_grace_s",
        "SlurmConfig",
        "signal_grace_s",
    ),
    ("models.dtype", "ModelsConfig", "dtype"),
    ("models.reward.marker", "RewardConfig", "marker"),
    ("models.reward.correct", "RewardConfig", "correct"),
    ("algorithm.name", "AlgorithmConfig", "name"),
    ("algorithm.gamma", "AlgorithmConfig", "gamma"),
    ("algorithm.lam", "AlgorithmConfig", "lam"),
    ("algorithm.clip_eps", "AlgorithmConfig", "clip_eps"),
    ("algorithm.dual_clip", "AlgorithmConfig", "dual_clip"),
    ("algorithm.value_clip", "AlgorithmConfig", "value_clip"),
    ("algorithm.loss_agg", "AlgorithmConfig", "loss_agg"),
    (
        "algorithm.baseline_decay",
        "AlgorithmConfig",
        "baseline_decay",
    ),
    ("algorithm.kl.coef", "KlConfig", "coef"),
    ("algorithm.kl.estimator", "KlConfig", "estimator"),
    ("algorithm.kl.horizon", "KlConfig", "horizon"),
    ("algorithm.kl.mode", "KlConfig", "mode"),
    ("algorithm.kl.target", "KlConfig", "target"),
    ("algorithm.reward.std", "RewardShapingConfig", "std"),
    ("algorithm.reward.mean", "RewardShapingConfig", "mean"),
    ("algorithm.reward.clip", "RewardShapingConfig", "clip"),
    (
        "algorithm.reward.truncation_penalty",
        "RewardShapingConfig",
        "truncation_penalty",
    ),
    ("rollout.batch_size", "RolloutConfig", "batch_size"),
    (
        "rollout.samples_per_prompt",
        "RolloutConfig",
        "samples_per_prompt",
    ),
    ("rollout.max_new_tokens", "RolloutConfig", "max_new_tokens"),
    (
        "rollout.max_prompt_tokens",
        "RolloutConfig",
        "max_prompt_tokens",
    ),
    ("rollout.temperature", "RolloutConfig", "temperature"),
    ("rollout.top_p", "RolloutConfig", "top_p"),
    ("rollout.shuffle", "RolloutConfig", "shuffle"),
    ("train.steps", "TrainConfig", "steps"),
    ("train.minibatch_size", "TrainConfig", "minibatch_size"),
    ("train.micro_batch_size", "TrainConfig", "micro_batch_size"),
    ("train.actor.beta1", "OptimizerConfig", "beta1"),
    ("train.actor.beta2", "OptimizerConfig", "beta2"),
    ("train.actor.eps", "OptimizerConfig", "eps"),
    (
        "train.actor.weight_decay",
        "OptimizerConfig",
        "weight_decay",
    ),
    (
        "train.actor.max_grad_norm",
        "OptimizerConfig",
        "max_grad_norm",
    ),
    ("train.actor.schedule", "OptimizerConfig", "schedule"),
    (
        "train.actor.warmup_steps",
        "OptimizerConfig",
        "warmup_steps",
    ),
    (
        "train.actor.min_lr_ratio",
        "OptimizerConfig",
        "min_lr_ratio",
    ),
    (
        "train.critic.max_grad_norm",
        "OptimizerConfig",
        "max_grad_norm",
    ),
    ("logging.level", "LoggingConfig", "level"),
    ("logging.format", "LoggingConfig", "format"),
    ("logging.tensorboard", "LoggingConfig", "tensorboard"),
    ("checkpoint.every", "CheckpointConfig", "every"),
    (
        "checkpoint.every_minutes",
        "CheckpointConfig",
        "every_minutes",
    ),
    ("checkpoint.keep_last", "CheckpointConfig", "keep_last"),
    ("checkpoint.keep_best", "CheckpointConfig", "keep_best"),
    (
        "checkpoint.must_save_by",
        "CheckpointConfig",
        "must_save_by",
    ),
    ("validation.every", "ValidationConfig", "every"),
    ("validation.judge", "ValidationConfig", "judge"),
    (
        "validation.max_new_tokens",
        "ValidationConfig",
        "max_new_tokens",
    ),
    ("validation.temperature", "ValidationConfig", "temperature"),
    ("validation.batch_size", "ValidationConfig", "batch_size"),
    ("validation.http.model", "HttpJudgeConfig", "model"),
    ("validation.http.timeout_s", "HttpJudgeConfig", "timeout_s"),
    (
        "validation.http.concurrency",
        "HttpJudgeConfig",
        "concurrency",
    ),
];

/// The text after `Default: ` in the doc comment of `field` of `pub struct name`, up to the
/// first space or the sentence's full stop, without backticks (quotes stay: YAML reads them).
fn documented_default(source: &str, name: &str, field: &str) -> String {
    let start = source
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name} not in schema.rs or rlhf-settings"));
    let body = &source[start..];
    let body = &body[..body.find("\n}").unwrap()];
    let field_at = body
        .find(&format!("    pub {field}: "))
        .unwrap_or_else(|| panic!("{name}.{field} not in schema.rs or rlhf-settings"));
    let docs: Vec<&str> = body[..field_at]
        .lines()
        .rev()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.trim_start().starts_with("///") || l.trim_start().starts_with("#["))
        .collect();
    let doc: String = docs
        .iter()
        .rev()
        .map(|l| l.trim_start().trim_start_matches("///").trim())
        .collect::<Vec<_>>()
        .join(" ");
    let after = doc
        .split("Default: ")
        .nth(1)
        .unwrap_or_else(|| panic!("{name}.{field} documents no default: {doc}"));
    let word = after.split_whitespace().next().unwrap();
    let word = word.strip_suffix(',').unwrap_or(word);
    let word = word.strip_suffix('.').unwrap_or(word);
    word.trim_matches('`').to_owned()
}

#[test]
fn documented_defaults_equal_loaded_values() {
    // The run file's structs: its own sections, and the algorithm settings it embeds.
    let source = [
        concat!(env!("CARGO_MANIFEST_DIR"), "/src/schema.rs"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/../rlhf-settings/src/lib.rs"),
    ]
    .map(|p| std::fs::read_to_string(p).unwrap())
    .join("\n");
    let f = Fixture::new();
    let loaded = f.load(BASE, &[], &[]).unwrap();
    let actual = serde_norway::to_value(&loaded.config).unwrap();
    let cwd = std::env::current_dir().unwrap();
    for (key, name, field) in DOCUMENTED {
        let doc = documented_default(&source, name, field);
        let mut value = &actual;
        for segment in key.split('.') {
            value = &value[segment];
        }
        let expected: serde_norway::Value = serde_norway::from_str(&doc).unwrap();
        let value = match (*key, value) {
            // Paths come back resolved against the working directory.
            ("run.dir", serde_norway::Value::String(s)) => serde_norway::Value::String(
                std::path::Path::new(s)
                    .strip_prefix(&cwd)
                    .unwrap()
                    .display()
                    .to_string(),
            ),
            _ => value.clone(),
        };
        match (value.as_f64(), expected.as_f64()) {
            // `60` documents the float 60.0 as well.
            (Some(v), Some(e)) => assert_eq!(v, e, "{key}: documented `{doc}`"),
            _ => assert_eq!(value, expected, "{key}: documented `{doc}`"),
        }
    }
}

#[test]
fn the_brief_numbers_hold() {
    // A few values pinned by the design (HelpSteer2's KL penalty and goodness weights).
    let f = Fixture::new();
    let c = f.load(BASE, &[], &[]).unwrap().config;
    assert_eq!(c.algorithm.kl.coef, 3e-3);
    let w = &c.algorithm.reward.attribute_weights;
    assert_eq!(
        (w["helpfulness"], w["correctness"], w["coherence"]),
        (0.65, 0.8, 0.45)
    );
    assert_eq!(c.train.actor.lr, 1e-6);
    assert_eq!(c.train.critic.lr, 1e-5);
    assert_eq!(c.train.critic.max_grad_norm, Some(1.0));
    assert_eq!(c.workers.len(), 4);
}
