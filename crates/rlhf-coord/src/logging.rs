//! Which log lines a command prints, and how: the tracing filter and format, decided once from
//! the command line, the environment and (for `launch`) the run file. `main.rs` installs the
//! subscriber with what [`LogSettings::resolve`] says.
//!
//! Precedence, highest first, as for every other key: `-v` / `-q` on the command line;
//! `logging.level` from `--set` or `RLHF_LOGGING__LEVEL`; `RLHF_LOG` (a tracing filter, e.g.
//! `rlhf_coord=debug,info`: an environment variable, one level above the file); the run file's
//! `logging.level`; `info`. The format likewise: `RLHF_LOG_FORMAT` (`json`) sits where
//! `RLHF_LOGGING__FORMAT` does, below `--set logging.format=...` and above the file.

use rlhf_config::{LoadedConfig, LogFormat, Origin};

/// The filter and format the subscriber is installed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// A tracing `EnvFilter` directive (`info`, `warn`, `rlhf_coord=debug,info`).
    pub filter: String,
    pub json: bool,
}

/// What `-v` / `-q` ask for: `-v` debug, `-vv` trace, `-q` warn, `-qq` error.
pub fn verbosity_filter(verbose: u8, quiet: u8) -> Option<&'static str> {
    match (verbose, quiet) {
        (0, 0) => None,
        (1, _) => Some("debug"),
        (v, _) if v >= 2 => Some("trace"),
        (_, 1) => Some("warn"),
        _ => Some("error"),
    }
}

impl LogSettings {
    /// The settings for a command with the given `-v`/`-q` counts, the `RLHF_LOG` and
    /// `RLHF_LOG_FORMAT` variables (`env`), and the run file when the command has one.
    pub fn resolve(
        verbose: u8,
        quiet: u8,
        env: impl Fn(&str) -> Option<String>,
        run: Option<&LoadedConfig>,
    ) -> LogSettings {
        let above_env = |key: &str| {
            run.is_some_and(|r| matches!(r.origin(key), Origin::Set { .. } | Origin::Env { .. }))
        };
        let level_from_run = run.map(|r| r.config.logging.level.clone());
        let filter = match verbosity_filter(verbose, quiet) {
            Some(f) => f.to_string(),
            None if above_env("logging.level") => level_from_run.unwrap_or_default(),
            None => env("RLHF_LOG")
                .filter(|v| !v.trim().is_empty())
                .or(level_from_run)
                .unwrap_or_else(|| "info".to_string()),
        };
        let json_from_run = run.map(|r| r.config.logging.format == LogFormat::Json);
        let json = match (above_env("logging.format"), env("RLHF_LOG_FORMAT")) {
            (true, _) => json_from_run.unwrap_or(false),
            (false, Some(f)) => f == "json",
            (false, None) => json_from_run.unwrap_or(false),
        };
        LogSettings { filter, json }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_config::EnvSource;

    fn run_file(
        dir: &std::path::Path,
        yaml: &str,
        sets: &[&str],
        env: &[(&str, &str)],
    ) -> LoadedConfig {
        // The paths the file names exist (the loader checks them), though nothing reads them.
        std::fs::create_dir_all(dir.join("p")).unwrap();
        std::fs::write(dir.join("p/config.json"), "{}").unwrap();
        std::fs::write(dir.join("p.jsonl"), "").unwrap();
        let f = dir.join("run.yaml");
        std::fs::write(&f, yaml).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        rlhf_config::load(&f, &sets, EnvSource::Vars(env)).unwrap()
    }

    #[test]
    fn flags_beat_set_beats_env_beats_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = "run: {name: t}\nmodels: {policy: p, reward: {kind: exact_match}}\n\
                    rollout: {prompts: p.jsonl}\nlogging: {level: error, format: json}\n";
        let no_env = |_: &str| None;
        let log_env = |k: &str| match k {
            "RLHF_LOG" => Some("debug".to_string()),
            "RLHF_LOG_FORMAT" => Some("plain".to_string()),
            _ => None,
        };
        let plain = run_file(tmp.path(), file, &[], &[]);
        // The file alone.
        let s = LogSettings::resolve(0, 0, no_env, Some(&plain));
        assert_eq!(
            s,
            LogSettings {
                filter: "error".into(),
                json: true
            }
        );
        // RLHF_LOG / RLHF_LOG_FORMAT over the file.
        let s = LogSettings::resolve(0, 0, log_env, Some(&plain));
        assert_eq!(
            s,
            LogSettings {
                filter: "debug".into(),
                json: false
            }
        );
        // --set over RLHF_LOG.
        let set = run_file(
            tmp.path(),
            file,
            &["logging.level=warn", "logging.format=json"],
            &[],
        );
        let s = LogSettings::resolve(0, 0, log_env, Some(&set));
        assert_eq!(
            s,
            LogSettings {
                filter: "warn".into(),
                json: true
            }
        );
        // RLHF_LOGGING__LEVEL is the key's own variable: also over RLHF_LOG.
        let env = run_file(tmp.path(), file, &[], &[("RLHF_LOGGING__LEVEL", "trace")]);
        assert_eq!(
            LogSettings::resolve(0, 0, log_env, Some(&env)).filter,
            "trace"
        );
        // -v / -q over everything.
        assert_eq!(
            LogSettings::resolve(1, 0, log_env, Some(&set)).filter,
            "debug"
        );
        assert_eq!(
            LogSettings::resolve(0, 1, log_env, Some(&set)).filter,
            "warn"
        );
        assert_eq!(
            LogSettings::resolve(0, 2, log_env, Some(&set)).filter,
            "error"
        );
        assert_eq!(LogSettings::resolve(2, 0, no_env, None).filter, "trace");
        // No run file: RLHF_LOG, else info.
        assert_eq!(LogSettings::resolve(0, 0, log_env, None).filter, "debug");
        assert_eq!(
            LogSettings::resolve(0, 0, no_env, None),
            LogSettings {
                filter: "info".into(),
                json: false
            }
        );
    }
}
