//! Checkpoints of an RLHF run, on top of `rlhf-ckpt`'s file format: what the controller saves
//! beside the workers' role state, how a resume is checked against the current config, and the
//! ranking of checkpoints by validation score.
//!
//! A checkpoint directory (`RUN/checkpoints/step-NNNNNN/`) holds:
//!
//! ```text
//! actor/                 the actor's SaveState: HF-layout model (config.json, safetensors,
//!                        tokenizer), optimizer state (exp_avg/exp_avg_sq, step), trainer state
//! critic/                the same for the critic (PPO only)
//! controller.json        ControllerState: step, samples, prompt cursor, KL controller,
//!                        REINFORCE baseline, the config it ran with
//! config.resolved.yaml   the resolved config, for people
//! manifest.json          written last by rlhf-ckpt (sha256 of every file)
//! ```
//!
//! Randomness: the controller's only random streams are derived from `(run.seed, step)` (prompt
//! shuffling per epoch, the sampling seed of each Generate call, minibatch shuffling), and the
//! workers draw no random numbers outside those seeded requests, so restoring the step and the
//! cursor restores every random stream exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rlhf_algo::{BaselineState, KlControllerState};
use rlhf_config::RunConfig;
use serde::{Deserialize, Serialize};

use crate::prompts::PromptCursor;

/// File of the controller's state inside a checkpoint.
pub const CONTROLLER_FILE: &str = "controller.json";
/// Format version of [`ControllerState`].
pub const CONTROLLER_FORMAT: u32 = 1;
/// The ranking file inside `RUN/checkpoints/`.
pub const RANKING_FILE: &str = "ranking.json";

/// Everything the controller needs to continue a run exactly after `step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerState {
    pub format: u32,
    /// Steps completed.
    pub step: u64,
    /// Sequences generated so far.
    pub samples: u64,
    /// Prompt loader position and shuffle seed.
    pub cursor: PromptCursor,
    /// KL coefficient controller.
    pub kl: KlControllerState,
    /// REINFORCE running-mean baseline (unused by other estimators).
    pub baseline: BaselineState,
    /// Seconds spent training before this checkpoint, summed over all launches.
    pub train_seconds: f64,
    /// The run config as it was when saved (JSON), to check a resume against.
    pub config: serde_json::Value,
}

impl ControllerState {
    pub fn read(dir: &Path) -> Result<ControllerState> {
        let path = dir.join(CONTROLLER_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let s: ControllerState = serde_json::from_str(&text).with_context(|| {
            format!("{}: not a controller state of this version", path.display())
        })?;
        if s.format != CONTROLLER_FORMAT {
            bail!(
                "{}: format {}, this build reads {CONTROLLER_FORMAT}",
                path.display(),
                s.format
            );
        }
        Ok(s)
    }
}

/// Keys whose change makes a checkpoint unusable: the models and the batch geometry the
/// optimizer and cursor state were built for. A key matches itself and everything under it.
pub const RESUME_BREAKING: &[&str] = &[
    "models",
    "algorithm.name",
    "rollout.batch_size",
    "rollout.samples_per_prompt",
    "train.epochs",
    "train.minibatch_size",
];

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        // Lists item by item (`models.rewards.1.url`), so the keys below an item can be told
        // apart.
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}.{i}"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Keys whose values differ between two configs, as `(key, then, now)`.
pub fn config_diff(
    then: &serde_json::Value,
    now: &serde_json::Value,
) -> Vec<(String, String, String)> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", then, &mut a);
    flatten("", now, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let missing = "(absent)".to_string();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&missing), b.get(k).unwrap_or(&missing));
            (x != y).then(|| (k.clone(), x.clone(), y.clone()))
        })
        .collect()
}

/// Keys of a reward source that say how to reach the user's code rather than what it computes:
/// a resume may change them (the server moved to another port, the script was mended).
pub const REWARD_TRANSPORT_KEYS: [&str; 7] = [
    "url",
    "command",
    "workdir",
    "timeout_s",
    "retries",
    "concurrency",
    "batch_size",
];

fn breaks_resume(key: &str) -> bool {
    let under = |key: &str, p: &str| key == p || key.starts_with(&format!("{p}."));
    let source_key = key.strip_prefix("models.reward.").or_else(|| {
        key.strip_prefix("models.rewards.")
            .and_then(|rest| rest.split_once('.'))
            .map(|(_, k)| k)
    });
    if source_key.is_some_and(|k| REWARD_TRANSPORT_KEYS.iter().any(|t| under(k, t))) {
        return false;
    }
    RESUME_BREAKING.iter().any(|p| under(key, p))
}

/// Checks that `now` can continue from a checkpoint saved with `then`: an error listing every
/// resume-breaking key that differs; the other differences are returned for the log.
pub fn check_resume(
    ckpt: &Path,
    then: &serde_json::Value,
    now: &RunConfig,
) -> Result<Vec<(String, String, String)>> {
    let now = serde_json::to_value(now)?;
    // Read through today's schema first: keys added since the checkpoint was written take their
    // defaults on both sides instead of reading as changed. (A config this build cannot read
    // is compared as written.)
    let then = serde_json::from_value::<RunConfig>(then.clone())
        .ok()
        .and_then(|c| serde_json::to_value(c).ok())
        .unwrap_or_else(|| then.clone());
    let diff = config_diff(&then, &now);
    let (breaking, other): (Vec<_>, Vec<_>) =
        diff.into_iter().partition(|(k, _, _)| breaks_resume(k));
    if !breaking.is_empty() {
        let lines: Vec<String> = breaking
            .iter()
            .map(|(k, a, b)| format!("  {k}: {a} in the checkpoint, {b} now"))
            .collect();
        bail!(
            "cannot resume from {}: the config changed in keys a resume depends on:\n{}\nrestore those values, or start a new run (another run.name, or move {} away)",
            ckpt.display(),
            lines.join("\n"),
            ckpt.parent().and_then(Path::parent).unwrap_or(ckpt).display()
        );
    }
    Ok(other)
}

/// Rewrites `metrics.jsonl` so that it holds only steps `<= step` (the steps after a checkpoint
/// are recomputed by the resumed run). A torn last line (a crash mid-write) is dropped too.
/// Returns the number of lines kept.
pub fn truncate_metrics(path: &Path, step: u64) -> Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut kept = String::new();
    let mut n = 0;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v.get("step")
            .and_then(|s| s.as_u64())
            .is_some_and(|s| s <= step)
        {
            kept.push_str(line);
            kept.push('\n');
            n += 1;
        }
    }
    if kept.len() != text.len() {
        rlhf_ckpt::write_atomic(path, kept.as_bytes())
            .with_context(|| format!("rewriting {}", path.display()))?;
    }
    Ok(n)
}

/// One entry of `ranking.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ranked {
    pub step: u64,
    pub checkpoint: String,
    /// MT-Bench score (1-10); null when the judge gave no usable rating.
    pub score: Option<f64>,
    pub judge: String,
}

/// `RUN/checkpoints/ranking.json`: validated checkpoints, best first; `best` names the top one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ranking {
    pub best: Option<String>,
    pub entries: Vec<Ranked>,
}

impl Ranking {
    pub fn path(run_dir: &Path) -> PathBuf {
        rlhf_ckpt::checkpoints_dir(run_dir).join(RANKING_FILE)
    }

    /// Reads `ranking.json`; every entry's `checkpoint` must name a directory inside
    /// `RUN/checkpoints` (protection writes and deletes files there).
    pub fn read(run_dir: &Path) -> Result<Ranking> {
        let path = Ranking::path(run_dir);
        let ranking: Ranking = match std::fs::read_to_string(&path) {
            Ok(t) => {
                serde_json::from_str(&t).with_context(|| format!("parsing {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ranking::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        for i in 0..ranking.entries.len() {
            ranking.dir_of(run_dir, i)?;
        }
        Ok(ranking)
    }

    /// The directory of entry `i`, confined to `RUN/checkpoints` (no `..`, no absolute path, no
    /// symlink out of it).
    fn dir_of(&self, run_dir: &Path, i: usize) -> Result<PathBuf> {
        let root = rlhf_ckpt::checkpoints_dir(run_dir);
        rlhf_ckpt::join_within(&root, &self.entries[i].checkpoint).with_context(|| {
            format!(
                "{}: entries[{i}].checkpoint: a checkpoint must be a directory inside {}; fix or delete the file",
                Ranking::path(run_dir).display(),
                root.display()
            )
        })
    }

    /// Adds (or replaces) the entry of `step` and sorts: score descending, missing scores last,
    /// ties by the earlier step.
    pub fn record(&mut self, e: Ranked) {
        self.entries.retain(|x| x.step != e.step);
        self.entries.push(e);
        self.sort();
    }

    fn sort(&mut self) {
        self.entries.sort_by(|a, b| match (a.score, b.score) {
            (Some(x), Some(y)) => y.total_cmp(&x).then(a.step.cmp(&b.step)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.step.cmp(&b.step),
        });
        self.best = self
            .entries
            .first()
            .filter(|e| e.score.is_some())
            .map(|e| e.checkpoint.clone());
    }

    /// Drops entries whose checkpoint directory no longer exists.
    pub fn retain_existing(&mut self, run_dir: &Path) {
        let keep: Vec<bool> = (0..self.entries.len())
            .map(|i| self.dir_of(run_dir, i).is_ok_and(|d| d.is_dir()))
            .collect();
        let mut keep = keep.into_iter();
        self.entries.retain(|_| keep.next().unwrap_or(false));
        self.sort();
    }

    pub fn write(&self, run_dir: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        let path = Ranking::path(run_dir);
        rlhf_ckpt::write_atomic(&path, &bytes)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Protects the top `k` scored checkpoints from pruning and unprotects the rest.
    pub fn apply_protection(&self, run_dir: &Path, k: usize) -> Result<()> {
        for (i, e) in self.entries.iter().enumerate() {
            let dir = self.dir_of(run_dir, i)?;
            if !dir.is_dir() {
                continue;
            }
            if i < k && e.score.is_some() {
                rlhf_ckpt::protect(&dir)?;
            } else {
                rlhf_ckpt::unprotect(&dir)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_controller_state_saved_before_the_settings_crate_still_loads() {
        // controller.json as checkpoints wrote it when rlhf-config and rlhf-algo each had their
        // own settings types: the KL controller and baseline state, and the run config's
        // algorithm settings, must read back as they were written.
        let saved = json!({
            "format": 1,
            "step": 3,
            "samples": 24,
            "cursor": {"seed": 7, "shuffle": true, "epoch": 1, "pos": 2},
            "kl": {"coef": 0.0512345, "target": 6.0, "horizon": 10000, "updates": 3},
            "baseline": {"value": 0.25, "updates": 3},
            "train_seconds": 1.5,
            "config": {"algorithm": {
                "loss_agg": "seq_mean_token_mean",
                "kl": {"coef": 0.05, "estimator": "k3", "mode": "loss", "target": 6.0,
                       "horizon": 10000},
                "reward": {"attribute_weights": {"helpfulness": 1.0}, "mean": 0.0, "std": 1.0,
                           "clip": null, "truncation_penalty": 0.5}
            }, "train": {"actor": {"lr": 1e-6, "weight_decay": 0.0, "max_grad_norm": 1.0,
                "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "schedule": "cosine",
                "warmup_steps": 2, "min_lr_ratio": 0.1}}}
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONTROLLER_FILE), saved.to_string()).unwrap();
        let s = ControllerState::read(dir.path()).unwrap();
        let kl = rlhf_algo::KlController::from_state(s.kl.clone()).unwrap();
        assert_eq!(kl.coef(), 0.0512345);
        assert_eq!(s.baseline.value, Some(0.25));
        assert_eq!(serde_json::to_value(&s).unwrap(), saved);
        let a = &s.config["algorithm"];
        let kl: rlhf_config::KlConfig = serde_json::from_value(a["kl"].clone()).unwrap();
        assert_eq!(kl.estimator, rlhf_config::KlEstimator::K3);
        let agg: rlhf_config::LossAgg = serde_json::from_value(a["loss_agg"].clone()).unwrap();
        assert_eq!(agg, rlhf_config::LossAgg::SeqMeanTokenMean);
        let reward: rlhf_config::RewardShapingConfig =
            serde_json::from_value(a["reward"].clone()).unwrap();
        let actor: rlhf_config::OptimizerConfig =
            serde_json::from_value(s.config["train"]["actor"].clone()).unwrap();
        assert_eq!(actor.schedule, rlhf_config::LrSchedule::Cosine);
        // Written back today, the settings are the same JSON, so a resume sees no config change.
        assert_eq!(serde_json::to_value(&kl).unwrap(), a["kl"]);
        assert_eq!(serde_json::to_value(&reward).unwrap(), a["reward"]);
        assert_eq!(
            serde_json::to_value(&actor).unwrap(),
            s.config["train"]["actor"]
        );
    }

    #[test]
    fn diff_lists_changed_keys_and_breaking_ones_refuse() {
        let then = json!({"models": {"policy": "/a"}, "rollout": {"batch_size": 8, "max_new_tokens": 16}, "train": {"steps": 10}});
        let now = json!({"models": {"policy": "/b"}, "rollout": {"batch_size": 4, "max_new_tokens": 16}, "train": {"steps": 20}});
        let d = config_diff(&then, &now);
        let keys: Vec<&str> = d.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(keys, ["models.policy", "rollout.batch_size", "train.steps"]);
        assert!(breaks_resume("models.policy"));
        assert!(breaks_resume("rollout.batch_size"));
        assert!(!breaks_resume("train.steps"));
        assert!(!breaks_resume("rollout.batch_size_x"));
        // How to reach the user's reward code may change; what scores may not.
        assert!(!breaks_resume("models.reward.url"));
        assert!(!breaks_resume("models.reward.command.1"));
        assert!(!breaks_resume("models.rewards.2.timeout_s"));
        assert!(breaks_resume("models.reward.kind"));
        assert!(breaks_resume("models.rewards.0.weight"));
        assert!(breaks_resume("models.rewards.1"));
        let then = json!({"models": {"rewards": [{"kind": "http", "url": "http://h:1"}]}});
        let now = json!({"models": {"rewards": [{"kind": "http", "url": "http://h:2"}, {"kind": "math"}]}});
        let keys: Vec<String> = config_diff(&then, &now).into_iter().map(|x| x.0).collect();
        assert_eq!(keys, ["models.rewards.0.url", "models.rewards.1.kind"]);
    }

    #[test]
    fn keys_added_since_a_checkpoint_take_their_defaults() {
        let cfg: RunConfig = serde_json::from_value(json!({"models": {"policy": "/p"}})).unwrap();
        let mut then = serde_json::to_value(&cfg).unwrap();
        // As an older build wrote it: without the reward keys added later.
        for k in ["name", "weight", "url", "command"] {
            then["models"]["reward"].as_object_mut().unwrap().remove(k);
        }
        then["models"].as_object_mut().unwrap().remove("rewards");
        let tmp = tempfile::tempdir().unwrap();
        assert!(check_resume(tmp.path(), &then, &cfg).unwrap().is_empty());
        // A real change still counts.
        then["models"]["reward"]["kind"] = json!("math");
        let e = check_resume(tmp.path(), &then, &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("models.reward.kind"), "{e}");
    }

    #[test]
    fn metrics_are_cut_at_the_checkpoint_and_torn_lines_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("metrics.jsonl");
        std::fs::write(&p, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"ste").unwrap();
        assert_eq!(truncate_metrics(&p, 2).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"step\":1}\n{\"step\":2}\n"
        );
        assert_eq!(truncate_metrics(&tmp.path().join("none"), 2).unwrap(), 0);
    }

    #[test]
    fn ranking_checkpoints_outside_the_checkpoints_dir_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        // A committed-looking directory outside the run: protection would write into it and
        // unprotection delete its marker.
        let victim = tmp.path().join("x");
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join(rlhf_ckpt::MANIFEST), "{}").unwrap();
        std::fs::create_dir_all(rlhf_ckpt::checkpoints_dir(&run)).unwrap();
        let ranking = Ranking {
            best: Some("../../x".into()),
            entries: vec![Ranked {
                step: 10,
                checkpoint: "../../x".into(),
                score: Some(9.0),
                judge: "rm".into(),
            }],
        };
        std::fs::write(
            Ranking::path(&run),
            serde_json::to_string(&ranking).unwrap(),
        )
        .unwrap();
        let e = format!("{:#}", Ranking::read(&run).unwrap_err());
        assert!(
            e.contains("ranking.json")
                && e.contains("entries[0].checkpoint")
                && e.contains("../../x"),
            "{e}"
        );
        let e = format!("{:#}", ranking.apply_protection(&run, 1).unwrap_err());
        assert!(e.contains("entries[0].checkpoint"), "{e}");
        assert!(!victim.join(rlhf_ckpt::PROTECTED).exists());
        // Through a symlink named like a checkpoint, too.
        std::os::unix::fs::symlink(
            &victim,
            rlhf_ckpt::checkpoints_dir(&run).join("step-000010"),
        )
        .unwrap();
        let linked = Ranking {
            best: None,
            entries: vec![Ranked {
                checkpoint: "step-000010".into(),
                ..ranking.entries[0].clone()
            }],
        };
        assert!(linked.apply_protection(&run, 1).is_err());
        assert!(!victim.join(rlhf_ckpt::PROTECTED).exists());
        let mut kept = linked.clone();
        kept.retain_existing(&run);
        assert!(kept.entries.is_empty(), "an escaping entry is not kept");
    }

    #[test]
    fn ranking_orders_by_score_with_missing_last() {
        let mut r = Ranking::default();
        let e = |step, score| Ranked {
            step,
            checkpoint: rlhf_ckpt::dir_name(step),
            score,
            judge: "rm".into(),
        };
        r.record(e(10, Some(5.0)));
        r.record(e(20, None));
        r.record(e(30, Some(7.5)));
        r.record(e(40, Some(5.0)));
        let steps: Vec<u64> = r.entries.iter().map(|e| e.step).collect();
        assert_eq!(steps, [30, 10, 40, 20]);
        assert_eq!(r.best.as_deref(), Some("step-000030"));
        r.record(e(30, None));
        assert_eq!(r.best.as_deref(), Some("step-000010"));
    }
}
