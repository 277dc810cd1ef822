//! `RunConfig`'s checks beyond types: ranges, cross-field rules, placement and the files the run
//! needs. Each failure names its key; the source (file line, variable, `--set`) comes from the
//! [`Provenance`].

use std::path::{Path, PathBuf};

use crate::error::ConfigError;
use crate::load::{ConfigSchema, Provenance};
use crate::schema::{
    AnswerExtract, JudgeKind, OptimizerConfig, RewardConfig, RewardKind, RewardSource, Role,
    RunConfig, LORA_TARGETS,
};

impl ConfigSchema for RunConfig {
    const REPLACED_MAPS: &'static [&'static str] = &["algorithm.reward.attribute_weights"];

    fn visit_paths(&mut self, visit: &mut dyn FnMut(&str, &mut PathBuf)) {
        visit("run.dir", &mut self.run.dir);
        if let Some(p) = &mut self.launcher.worker_bin {
            visit("launcher.worker_bin", p);
        }
        visit("models.policy", &mut self.models.policy);
        if let Some(p) = &mut self.models.reference {
            visit("models.reference", p);
        }
        if let Some(p) = &mut self.models.critic {
            visit("models.critic", p);
        }
        let mut sources: Vec<(String, &mut RewardConfig)> =
            vec![("models.reward".into(), &mut self.models.reward)];
        for (i, r) in self.models.rewards.iter_mut().enumerate() {
            sources.push((format!("models.rewards[{i}]"), r));
        }
        for (key, r) in sources {
            if let Some(p) = &mut r.path {
                visit(&format!("{key}.path"), p);
            }
            if let Some(p) = &mut r.workdir {
                visit(&format!("{key}.workdir"), p);
            }
        }
        visit("rollout.prompts", &mut self.rollout.prompts);
        if !self.validation.mt_bench.as_os_str().is_empty() {
            visit("validation.mt_bench", &mut self.validation.mt_bench);
        }
    }

    fn validate(&self, provenance: &Provenance) -> Result<(), ConfigError> {
        let c = Check(provenance);
        self.check_run(&c)?;
        self.check_launcher(&c)?;
        self.check_workers(&c)?;
        self.check_algorithm(&c)?;
        self.check_rollout_and_train(&c)?;
        self.check_checkpoint_and_validation(&c)?;
        // The file system last: a typo in a number is cheaper to report than a missing model.
        self.check_files(&c)
    }
}

/// Range checks that build errors through the provenance. Float checks are written so that NaN
/// fails them.
struct Check<'a>(&'a Provenance);

impl Check<'_> {
    fn fail(&self, key: &str, message: impl Into<String>) -> Result<(), ConfigError> {
        Err(self.0.error_at(key, message))
    }

    fn positive(&self, key: &str, v: f64) -> Result<(), ConfigError> {
        if v > 0.0 && v.is_finite() {
            return Ok(());
        }
        self.fail(key, format!("must be a number > 0, got {v}"))
    }

    fn non_negative(&self, key: &str, v: f64) -> Result<(), ConfigError> {
        if v >= 0.0 && v.is_finite() {
            return Ok(());
        }
        self.fail(key, format!("must be a number >= 0, got {v}"))
    }

    fn finite(&self, key: &str, v: f64) -> Result<(), ConfigError> {
        if v.is_finite() {
            return Ok(());
        }
        self.fail(key, format!("must be a finite number, got {v}"))
    }

    /// `v` in [lo, hi] (or [lo, hi) when `hi_open`).
    fn within(
        &self,
        key: &str,
        v: f64,
        lo: f64,
        hi: f64,
        hi_open: bool,
    ) -> Result<(), ConfigError> {
        let ok = v >= lo && if hi_open { v < hi } else { v <= hi };
        if ok {
            return Ok(());
        }
        let close = if hi_open { ')' } else { ']' };
        self.fail(key, format!("must be in [{lo}, {hi}{close}, got {v}"))
    }

    fn at_least(&self, key: &str, v: u64, min: u64) -> Result<(), ConfigError> {
        if v >= min {
            return Ok(());
        }
        self.fail(key, format!("must be >= {min}, got {v}"))
    }

    fn name(&self, key: &str, name: &str, what: &str) -> Result<(), ConfigError> {
        if name.is_empty() {
            return self.fail(
                key,
                format!("required: give a {what} (letters, digits, `.`, `_`, `-`)"),
            );
        }
        if !is_name(name) {
            return self.fail(
                key,
                format!("`{name}` is not a valid {what}: use only letters, digits, `.`, `_` and `-` (and not `.` or `..`)"),
            );
        }
        Ok(())
    }

    fn optimizer(&self, prefix: &str, o: &OptimizerConfig) -> Result<(), ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");
        self.positive(&key("lr"), o.lr)?;
        self.non_negative(&key("weight_decay"), o.weight_decay)?;
        if let Some(norm) = o.max_grad_norm {
            self.positive(&key("max_grad_norm"), norm)?;
        }
        self.within(&key("beta1"), o.beta1, 0.0, 1.0, true)?;
        self.within(&key("beta2"), o.beta2, 0.0, 1.0, true)?;
        self.positive(&key("eps"), o.eps)?;
        self.within(&key("min_lr_ratio"), o.min_lr_ratio, 0.0, 1.0, false)
    }

    /// `dir` exists and holds a `config.json` (a Hugging Face-layout model directory).
    fn model_dir(&self, key: &str, dir: &Path) -> Result<(), ConfigError> {
        if dir.as_os_str().is_empty() {
            return self.fail(
                key,
                "required: set it to a model directory (Hugging Face layout, with config.json)",
            );
        }
        if !dir.is_dir() {
            return self.fail(
                key,
                format!("model directory {} does not exist; check the path (relative paths in the file are relative to the file's directory)", dir.display()),
            );
        }
        if !dir.join("config.json").is_file() {
            return self.fail(
                key,
                format!(
                    "{} has no config.json; point it at a Hugging Face-layout model directory",
                    dir.display()
                ),
            );
        }
        Ok(())
    }
}

/// `[A-Za-z0-9._-]+`, and not `.` or `..`, which would escape the run directory's parent.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The `launcher.slurm` strings that `rlhf-coord launch` writes into the sbatch script: each
/// must be one line of what its directive takes, or a newline would end the `#SBATCH` comment
/// and run the rest as a shell command in the job.
fn check_sbatch_fields(c: &Check, s: &crate::schema::SlurmConfig) -> Result<(), ConfigError> {
    if let Some(p) = &s.partition {
        if p.is_empty() || !p.split(',').all(is_name) {
            return c.fail(
                "launcher.slurm.partition",
                format!("{p:?} is not a Slurm partition name (it goes into the sbatch script): use letters, digits, `.`, `_` and `-`, several separated by `,`"),
            );
        }
    }
    if let Some(a) = &s.account {
        if !is_name(a) {
            return c.fail(
                "launcher.slurm.account",
                format!("{a:?} is not a Slurm account name (it goes into the sbatch script): use letters, digits, `.`, `_` and `-`"),
            );
        }
    }
    for (i, d) in s.extra_directives.iter().enumerate() {
        let key = format!("launcher.slurm.extra_directives.{i}");
        if d.chars().any(char::is_control) {
            return c.fail(
                &key,
                format!("{d:?} holds a line break or control character; give one sbatch option per entry (a second line would run as a shell command in the job)"),
            );
        }
        // Written as `#SBATCH <option>`; an entry may carry the prefix itself.
        let option = d.trim();
        let option = option.strip_prefix("#SBATCH").unwrap_or(option).trim();
        if !option.starts_with('-') {
            return c.fail(
                &key,
                format!("{d:?} is not an sbatch option: write one option such as `--gres=gpu:4` or `-C a100` (with or without a leading `#SBATCH`)"),
            );
        }
    }
    Ok(())
}

/// Slurm `--time` in `HH:MM:SS` or `D-HH:MM:SS`, in seconds.
fn slurm_time_seconds(s: &str) -> Option<u64> {
    if !is_slurm_time(s) {
        return None;
    }
    let (days, clock) = s.split_once('-').unwrap_or(("0", s));
    let mut secs = days.parse::<u64>().ok()? * 86_400;
    for (part, unit) in clock.split(':').zip([3600, 60, 1]) {
        secs += part.parse::<u64>().ok()? * unit;
    }
    Some(secs)
}

/// Slurm `--time` in `HH:MM:SS` or `D-HH:MM:SS`.
fn is_slurm_time(s: &str) -> bool {
    let (days, clock) = match s.split_once('-') {
        Some((d, rest)) => (Some(d), rest),
        None => (None, s),
    };
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if days.is_some_and(|d| !digits(d)) {
        return false;
    }
    let parts: Vec<&str> = clock.split(':').collect();
    let [h, m, sec] = parts.as_slice() else {
        return false;
    };
    let two =
        |p: &str, max: u32| p.len() == 2 && digits(p) && p.parse::<u32>().is_ok_and(|v| v < max);
    let hours_ok = digits(h) && (days.is_none() || h.parse::<u32>().is_ok_and(|v| v < 24));
    hours_ok && two(m, 60) && two(sec, 60)
}

impl RunConfig {
    fn check_run(&self, c: &Check) -> Result<(), ConfigError> {
        c.name("run.name", &self.run.name, "run name")?;
        if self.run.dir.as_os_str().is_empty() {
            return c.fail("run.dir", "must not be empty; the default is `runs`");
        }
        // The run directory is written into the sbatch script (`--output=`) and every log path.
        let dir = self.run.dir.to_string_lossy();
        if dir.chars().any(char::is_control) {
            return c.fail(
                "run.dir",
                format!("{dir:?} holds a line break or control character; choose a directory name without one"),
            );
        }
        Ok(())
    }

    fn check_launcher(&self, c: &Check) -> Result<(), ConfigError> {
        let l = &self.launcher;
        c.positive("launcher.startup_timeout_s", l.startup_timeout_s)?;
        c.positive("launcher.rpc_timeout_s", l.rpc_timeout_s)?;
        c.positive("launcher.collective_timeout_s", l.collective_timeout_s)?;
        c.at_least("launcher.heartbeat_interval_ms", l.heartbeat_interval_ms, 1)?;
        if l.heartbeat_timeout_ms <= l.heartbeat_interval_ms {
            return c.fail(
                "launcher.heartbeat_timeout_ms",
                format!(
                    "must be greater than launcher.heartbeat_interval_ms ({}), got {}",
                    l.heartbeat_interval_ms, l.heartbeat_timeout_ms
                ),
            );
        }
        let s = &l.slurm;
        c.at_least("launcher.slurm.nodes", s.nodes.into(), 1)?;
        if let Some(cpus) = s.cpus_per_task {
            c.at_least("launcher.slurm.cpus_per_task", cpus.into(), 1)?;
        }
        if let Some(time) = &s.time {
            let Some(limit) = slurm_time_seconds(time) else {
                return c.fail(
                    "launcher.slurm.time",
                    format!("`{time}` is not a Slurm time limit; write HH:MM:SS or D-HH:MM:SS (e.g. 12:00:00, 2-00:00:00)"),
                );
            };
            if l.kind == crate::schema::LauncherKind::Slurm && s.signal_grace_s >= limit {
                return c.fail(
                    "launcher.slurm.signal_grace_s",
                    format!("{} s is not shorter than the job's time limit launcher.slurm.time = {time} ({limit} s): Slurm would warn before the job starts; lower it or raise the time limit", s.signal_grace_s),
                );
            }
        }
        check_sbatch_fields(c, s)?;
        if let Some(name) = &l.interface {
            if name.is_empty() || name.chars().any(|ch| ch.is_whitespace() || ch == '/') {
                return c.fail(
                    "launcher.interface",
                    format!("`{name}` is not a network interface name (e.g. eth0, ib0)"),
                );
            }
            if !l.bind.is_unspecified() && !l.bind.is_loopback() {
                return c.fail(
                    "launcher.interface",
                    format!("both launcher.bind ({}) and launcher.interface ({name}) name where to listen; set one of them", l.bind),
                );
            }
        }
        if l.kind == crate::schema::LauncherKind::Slurm
            && l.interface.is_none()
            && l.bind.is_loopback()
        {
            let nodes = s.nodes.max(1) as usize;
            let spans = self
                .workers
                .iter()
                .enumerate()
                .any(|(i, w)| w.node.unwrap_or(i % nodes) != 0);
            if spans {
                return c.fail(
                    "launcher.bind",
                    format!("{} is loopback, but workers are placed on {nodes} nodes and could not reach each other or the coordinator; set launcher.bind: 0.0.0.0 (hosts advertise their names) or launcher.interface: IFACE", l.bind),
                );
            }
        }
        Ok(())
    }

    fn check_workers(&self, c: &Check) -> Result<(), ConfigError> {
        for (i, w) in self.workers.iter().enumerate() {
            c.name(&format!("workers.{i}.name"), &w.name, "worker name")?;
            let roles_key = format!("workers.{i}.roles");
            if w.roles.is_empty() {
                return c.fail(
                    &roles_key,
                    "must list at least one of actor, critic, reward, reference",
                );
            }
            for (j, role) in w.roles.iter().enumerate() {
                if w.roles[..j].contains(role) {
                    return c.fail(
                        &roles_key,
                        format!("role {role} is listed twice; list each role once"),
                    );
                }
            }
            c.at_least(&format!("workers.{i}.threads"), w.threads as u64, 1)?;
            let nodes = self.launcher.slurm.nodes as usize;
            if let Some(n) = w.node {
                if self.launcher.kind == crate::schema::LauncherKind::Slurm && n >= nodes {
                    return c.fail(
                        &format!("workers.{i}.node"),
                        format!("node {n} does not exist: launcher.slurm.nodes is {nodes} (nodes are numbered from 0)"),
                    );
                }
            }
            if self.launcher.kind == crate::schema::LauncherKind::Slurm {
                // gpus_per_node 0 requests no GPUs through this key (they may come from
                // extra_directives or whole-node allocations), so there is nothing to check.
                let per_node = self.launcher.slurm.gpus_per_node as usize;
                if let (crate::schema::Device::Cuda(g), true) = (w.device, per_node > 0) {
                    let need = g.unwrap_or(0) as usize + 1;
                    if need > per_node {
                        return c.fail(
                            &format!("workers.{i}.device"),
                            format!("{} needs {need} GPU(s) per node, but launcher.slurm.gpus_per_node is {per_node}; raise it or pick a lower device", w.device),
                        );
                    }
                }
            }
            if let Some(j) = self.workers[..i].iter().position(|o| o.name == w.name) {
                return c.fail(
                    &format!("workers.{i}.name"),
                    format!("duplicate worker name `{}` (also workers[{j}]); worker names must be unique", w.name),
                );
            }
        }
        if self.launcher.collective_backend == crate::schema::CollectiveBackend::Nccl {
            // Members of a group: replicas of a replicated actor or critic; with generators,
            // the first actor and the generators.
            let gens = self.replicas(Role::Generator) > 0;
            let first_actor = self
                .workers
                .iter()
                .position(|w| w.roles.contains(&Role::Actor));
            for (i, w) in self.workers.iter().enumerate() {
                let in_group = w.roles.iter().any(|r| match r {
                    Role::Actor | Role::Critic if self.replicas(*r) > 1 => true,
                    Role::Generator => true,
                    Role::Actor => gens && first_actor == Some(i),
                    _ => false,
                });
                if in_group && !matches!(w.device, crate::schema::Device::Cuda(_)) {
                    return c.fail(
                        &format!("workers.{i}.device"),
                        format!("worker `{}` is in a collective group and launcher.collective_backend is nccl, which needs a CUDA device, not {}; use cuda:N or collective_backend auto/tcp", w.name, w.device),
                    );
                }
            }
        }
        for role in [
            Role::Actor,
            Role::Critic,
            Role::Reward,
            Role::Reference,
            Role::Generator,
        ] {
            let hosts: Vec<String> = self
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| w.roles.contains(&role))
                .map(|(i, w)| format!("workers[{i}] ({})", w.name))
                .collect();
            let replicable = matches!(role, Role::Actor | Role::Critic | Role::Generator);
            match hosts.len() {
                0 if role == Role::Generator => {}
                0 if role == Role::Critic && !self.algorithm.name.uses_critic() => {}
                // The actor's base with its adapters off is the reference (docs/lora.md).
                0 if role == Role::Reference && self.models.reference_is_actor_base() => {}
                0 => {
                    return c.fail(
                        "workers",
                        format!("role {role} is placed on no worker; add `{role}` to one worker's roles (reward and reference on exactly one worker, actor and critic on one or more{})", if role == Role::Critic { "; only ppo trains a critic" } else { "" }),
                    )
                }
                1 => {}
                _ if replicable => {}
                _ => {
                    return c.fail(
                        "workers",
                        format!("role {role} is placed on {}; keep it on exactly one worker (only actor, critic and generator may have replicas)", hosts.join(" and ")),
                    )
                }
            }
        }
        Ok(())
    }

    fn check_algorithm(&self, c: &Check) -> Result<(), ConfigError> {
        let a = &self.algorithm;
        c.within("algorithm.gamma", a.gamma, 0.0, 1.0, false)?;
        c.within("algorithm.lam", a.lam, 0.0, 1.0, false)?;
        c.positive("algorithm.clip_eps", a.clip_eps)?;
        if let Some(dual) = a.dual_clip {
            if !(dual > 1.0 && dual.is_finite()) {
                return c.fail(
                    "algorithm.dual_clip",
                    format!("must be > 1 when set (null turns it off), got {dual}"),
                );
            }
        }
        if let Some(clip) = a.value_clip {
            c.positive("algorithm.value_clip", clip)?;
        }
        c.non_negative("algorithm.entropy_coef", a.entropy_coef)?;
        c.within("algorithm.baseline_decay", a.baseline_decay, 0.0, 1.0, true)?;
        c.non_negative("algorithm.kl.coef", a.kl.coef)?;
        if let Some(target) = a.kl.target {
            c.positive("algorithm.kl.target", target)?;
        }
        c.at_least("algorithm.kl.horizon", a.kl.horizon, 1)?;
        let r = &a.reward;
        for (name, weight) in &r.attribute_weights {
            c.finite(
                &format!("algorithm.reward.attribute_weights.{name}"),
                *weight,
            )?;
        }
        c.finite("algorithm.reward.mean", r.mean)?;
        c.positive("algorithm.reward.std", r.std)?;
        if let Some(clip) = r.clip {
            c.positive("algorithm.reward.clip", clip)?;
        }
        if let Some(penalty) = r.truncation_penalty {
            c.finite("algorithm.reward.truncation_penalty", penalty)?;
        }
        if let Some(l) = &self.models.lora {
            c.at_least("models.lora.rank", l.rank as u64, 1)?;
            c.finite("models.lora.alpha", l.alpha)?;
            c.within("models.lora.dropout", l.dropout, 0.0, 1.0, true)?;
            if l.targets.is_empty() {
                return c.fail(
                    "models.lora.targets",
                    format!("must name at least one of {}", LORA_TARGETS.join(", ")),
                );
            }
            if let Some(t) = l
                .targets
                .iter()
                .find(|t| !LORA_TARGETS.contains(&t.as_str()))
            {
                return c.fail(
                    "models.lora.targets",
                    format!("`{t}` is not one of {}", LORA_TARGETS.join(", ")),
                );
            }
        }
        self.check_reward_sources(c)
    }

    /// `models.reward`, or `models.rewards` (which then replaces it): each source's keys, and
    /// the sources' names.
    fn check_reward_sources(&self, c: &Check) -> Result<(), ConfigError> {
        if !self.models.rewards.is_empty() && self.models.reward != RewardConfig::default() {
            return c.fail(
                "models.reward",
                "is set together with models.rewards; list every source under models.rewards and remove models.reward",
            );
        }
        let sources = self.models.reward_sources();
        for (i, s) in sources.iter().enumerate() {
            check_reward(c, s)?;
            if let Some(earlier) = sources[..i].iter().find(|e| e.name == s.name) {
                return c.fail(
                    &format!("{}.name", s.key),
                    format!(
                        "`{}` is also the name of {}; give each source its own `name`",
                        s.name, earlier.key
                    ),
                );
            }
        }
        Ok(())
    }

    fn check_rollout_and_train(&self, c: &Check) -> Result<(), ConfigError> {
        let r = &self.rollout;
        c.at_least("rollout.batch_size", r.batch_size as u64, 1)?;
        c.at_least("rollout.samples_per_prompt", r.samples_per_prompt as u64, 1)?;
        if self.algorithm.name.needs_groups() && r.samples_per_prompt < 2 {
            return c.fail(
                "rollout.samples_per_prompt",
                format!(
                    "algorithm {} compares samples of the same prompt, so it needs at least 2, got {}; raise it or choose another algorithm",
                    self.algorithm.name.as_str(),
                    r.samples_per_prompt
                ),
            );
        }
        c.at_least("rollout.max_new_tokens", r.max_new_tokens as u64, 1)?;
        c.at_least("rollout.max_prompt_tokens", r.max_prompt_tokens as u64, 1)?;
        c.positive("rollout.temperature", r.temperature)?;
        if !(r.top_p > 0.0 && r.top_p <= 1.0) {
            return c.fail(
                "rollout.top_p",
                format!("must be in (0, 1], got {}", r.top_p),
            );
        }

        let t = &self.train;
        c.at_least("train.steps", t.steps, 1)?;
        c.at_least("train.epochs", t.epochs as u64, 1)?;
        let sequences = self.rollout_sequences();
        if let Some(mb) = t.minibatch_size {
            c.at_least("train.minibatch_size", mb as u64, 1)?;
            if sequences % mb != 0 {
                return c.fail(
                    "train.minibatch_size",
                    format!(
                        "{mb} does not divide the rollout batch of {sequences} sequences (rollout.batch_size {} x rollout.samples_per_prompt {}); pick a divisor or null for the whole batch",
                        r.batch_size, r.samples_per_prompt
                    ),
                );
            }
        }
        c.at_least("train.micro_batch_size", t.micro_batch_size as u64, 1)?;
        if t.zero_stage > 2 {
            return c.fail(
                "train.zero_stage",
                format!(
                    "{}: expected 0 (no sharding), 1 (optimizer state sharded) or 2 (optimizer state and gradients sharded)",
                    t.zero_stage
                ),
            );
        }
        let mb = self.minibatch_size();
        if mb % t.micro_batch_size != 0 {
            let of = if t.minibatch_size.is_some() {
                "train.minibatch_size"
            } else {
                "the whole rollout batch, as train.minibatch_size is null"
            };
            return c.fail(
                "train.micro_batch_size",
                format!(
                    "{} does not divide the minibatch size {mb} ({of}); pick a divisor",
                    t.micro_batch_size
                ),
            );
        }
        for role in [Role::Actor, Role::Critic] {
            let replicas = self.replicas(role);
            if replicas > mb {
                return c.fail(
                    "train.minibatch_size",
                    format!(
                        "the minibatch of {mb} sequences is sharded over the {replicas} {role} replicas in workers[].roles, so it needs at least {replicas}; raise it or place fewer replicas"
                    ),
                );
            }
        }
        if self.rollout.async_generation && self.replicas(Role::Generator) == 0 {
            return c.fail(
                "rollout.async_generation",
                "needs generator workers (add `generator` to a worker's roles): the actor cannot sample the next batch while it trains",
            );
        }
        c.optimizer("train.actor", &t.actor)?;
        c.optimizer("train.critic", &t.critic)
    }

    fn check_checkpoint_and_validation(&self, c: &Check) -> Result<(), ConfigError> {
        let k = &self.checkpoint;
        c.at_least("checkpoint.keep_last", k.keep_last as u64, 1)?;
        if let Some(m) = k.every_minutes {
            c.positive("checkpoint.every_minutes", m)?;
        }
        if let Some(s) = k.must_save_by {
            c.positive("checkpoint.must_save_by", s)?;
        }
        let v = &self.validation;
        if v.every == 0 {
            if v.at_start {
                return c.fail(
                    "validation.at_start",
                    "validates the initial policy, but validation is off (validation.every = 0); set validation.every or remove at_start",
                );
            }
            return Ok(());
        }
        c.at_least("validation.max_new_tokens", v.max_new_tokens as u64, 1)?;
        c.at_least("validation.batch_size", v.batch_size as u64, 1)?;
        c.non_negative("validation.temperature", v.temperature)?;
        if let Some(n) = v.max_questions {
            c.at_least("validation.max_questions", n as u64, 1)?;
        }
        match v.judge {
            JudgeKind::RewardModel => {
                if self.models.reward_model_source().is_none() {
                    return c.fail(
                        "validation.judge",
                        "reward_model judges with the run's reward model, but no reward source has kind: model; use judge: http (an OpenAI-compatible endpoint) or a model reward",
                    );
                }
            }
            JudgeKind::Http => {
                let u = &v.http.url;
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return c.fail(
                        "validation.http.url",
                        format!("required with judge: http; give the endpoint's base URL up to /v1 (http:// or https://), got `{u}`"),
                    );
                }
                c.positive("validation.http.timeout_s", v.http.timeout_s)?;
                c.at_least("validation.http.concurrency", v.http.concurrency as u64, 1)?;
            }
        }
        Ok(())
    }

    fn check_files(&self, c: &Check) -> Result<(), ConfigError> {
        let m = &self.models;
        c.model_dir("models.policy", &m.policy)?;
        if let Some(dir) = &m.reference {
            c.model_dir("models.reference", dir)?;
        }
        if let Some(dir) = &m.critic {
            c.model_dir("models.critic", dir)?;
        }
        for s in m.reward_sources() {
            if s.config.kind == RewardKind::Model {
                let key = format!("{}.path", s.key);
                match &s.config.path {
                    Some(dir) => c.model_dir(&key, dir)?,
                    None => {
                        return c.fail(
                            &key,
                            format!("required with {}.kind: model; set it to the reward model directory, or use another kind (exact_match, math, http, command)", s.key),
                        )
                    }
                }
            }
        }
        if let (RewardKind::Command, Some(dir)) = (m.reward.kind, &m.reward.workdir) {
            if !dir.is_dir() {
                return c.fail(
                    "models.reward.workdir",
                    format!("directory {} does not exist; check the path (relative paths in the file are relative to the file's directory), or remove the key to run the command in the run file's directory", dir.display()),
                );
            }
        }
        let prompts = &self.rollout.prompts;
        if prompts.as_os_str().is_empty() {
            return c.fail(
                "rollout.prompts",
                "required: set it to a JSONL or Parquet prompts file, or a Hugging Face dataset directory",
            );
        }
        if !prompts.is_file() && !prompts.is_dir() {
            return c.fail(
                "rollout.prompts",
                format!("prompts file {} does not exist; check the path (relative paths in the file are relative to the file's directory)", prompts.display()),
            );
        }
        let r = &self.rollout;
        for (key, v) in [
            ("rollout.split", &r.split),
            ("rollout.prompt_key", &r.prompt_key),
            ("rollout.messages_key", &r.messages_key),
            ("rollout.answer_key", &r.answer_key),
        ] {
            if v.trim().is_empty() {
                return c.fail(
                    key,
                    "must not be empty; name a split or column (remove the key for its default)",
                );
            }
        }
        let v = &self.validation;
        if v.every > 0 && !v.mt_bench.join("question.jsonl").is_file() {
            return c.fail(
                "validation.mt_bench",
                format!("`{}` has no question.jsonl; point it at FastChat's MT-Bench data directory (fastchat/llm_judge/data/mt_bench)", v.mt_bench.display()),
            );
        }
        Ok(())
    }
}

/// One reward source's keys (`models.reward` or `models.rewards[i]`).
fn check_reward(c: &Check, s: &RewardSource<'_>) -> Result<(), ConfigError> {
    let (m, k) = (s.config, &s.key);
    if s.name.is_empty()
        || !s
            .name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
    {
        return c.fail(
            &format!("{k}.name"),
            format!(
                "`{}`: use letters, digits, `_` and `-` only (it becomes the metrics key attribute/<name>)",
                s.name
            ),
        );
    }
    c.finite(&format!("{k}.weight"), m.weight)?;
    c.finite(&format!("{k}.correct"), m.correct)?;
    c.finite(&format!("{k}.incorrect"), m.incorrect)?;
    if m.kind == RewardKind::ExactMatch
        && m.extract == AnswerExtract::AfterMarker
        && m.marker.is_empty()
    {
        return c.fail(
            &format!("{k}.marker"),
            "must not be empty with extract: after_marker",
        );
    }
    check_external_reward(c, s)?;
    if m.kind == RewardKind::Math {
        if m.extract != AnswerExtract::default() {
            return c.fail(
                &format!("{k}.extract"),
                "is for kind: exact_match; kind: math finds the answer itself (the last \\boxed{}, else the text after `marker`, else the last number): remove the key",
            );
        }
        if m.marker.is_empty() {
            return c.fail(
                &format!("{k}.marker"),
                "must not be empty with kind: math (the default is \"####\", GSM8K's)",
            );
        }
    }
    Ok(())
}

/// The keys of the `http` and `command` kinds: required where they apply, refused where they
/// do not, in range.
fn check_external_reward(c: &Check, s: &RewardSource<'_>) -> Result<(), ConfigError> {
    let (m, k) = (s.config, &s.key);
    let kind = m.kind.name();
    match (m.kind, &m.url) {
        (RewardKind::Http, None) => return c.fail(
            &format!("{k}.url"),
            "required with kind: http; set it to your reward server's URL (http://host:port/path)",
        ),
        (RewardKind::Http, Some(url)) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return c.fail(
                    &format!("{k}.url"),
                    format!("`{url}` is not an http:// or https:// URL"),
                );
            }
        }
        (_, Some(_)) => {
            return c.fail(
                &format!("{k}.url"),
                format!("is for kind: http, not kind: {kind}; remove the key"),
            )
        }
        (_, None) => {}
    }
    match m.kind {
        RewardKind::Command if m.command.is_empty() || m.command[0].is_empty() => {
            return c.fail(
                &format!("{k}.command"),
                "required with kind: command; give the program and its arguments, e.g. [python3, my_reward.py]",
            )
        }
        RewardKind::Command => {}
        _ if !m.command.is_empty() => {
            return c.fail(
                &format!("{k}.command"),
                format!("is for kind: command, not kind: {kind}; remove the key"),
            )
        }
        _ if m.workdir.is_some() => {
            return c.fail(
                &format!("{k}.workdir"),
                format!("is for kind: command, not kind: {kind}; remove the key"),
            )
        }
        _ => {}
    }
    if matches!(m.kind, RewardKind::Http | RewardKind::Command) {
        c.positive(&format!("{k}.timeout_s"), m.timeout_s)?;
        c.at_least(&format!("{k}.concurrency"), m.concurrency as u64, 1)?;
        c.at_least(&format!("{k}.batch_size"), m.batch_size as u64, 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_allow_only_safe_characters() {
        for ok in ["a", "run-1.b_c", "2024"] {
            assert!(is_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü"] {
            assert!(!is_name(bad), "{bad}");
        }
    }

    #[test]
    fn slurm_times_take_the_two_documented_forms() {
        for ok in [
            "12:00:00",
            "0:30:00",
            "48:00:00",
            "2-00:00:00",
            "1-23:59:59",
        ] {
            assert!(is_slurm_time(ok), "{ok}");
        }
        for bad in [
            "12:00",
            "1-24:00:00",
            "12:60:00",
            "12:00:0",
            "x-1:00:00",
            "",
            "1:2:3:4",
        ] {
            assert!(!is_slurm_time(bad), "{bad}");
        }
    }
}
