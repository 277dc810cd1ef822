//! `rlhf-config` owns the run file: the schema of an RLHF run and its cluster placement
//! ([`RunConfig`] and its sections), loading it with the one documented precedence, validating
//! it, and reporting every error with the key at fault and where its value came from.
//!
//! Precedence, lowest first: built-in defaults < the YAML file < `RLHF_` environment variables
//! (`__` splits nesting: `RLHF_TRAIN__STEPS=5`; only variables whose first segment names a
//! section count, so `RLHF_LOG` and friends are ignored) < `--set key.path=value` arguments
//! (values read as YAML: `--set rollout.temperature=0.7`, `--set workers.0.roles=[actor]`).
//! Lists are replaced whole, except that an override naming an item index changes that item.
//! Relative paths are resolved against the YAML file's directory when the file set them and
//! against the working directory otherwise. Errors carry the key path (`workers[1].roles`) and
//! `FILE:LINE`, the environment variable, or the `--set` argument.
//!
//! It may use serde, figment (merging), serde_norway (YAML) and yaml-rust2 (key lines), and
//! `rlhf-settings` (the algorithm settings, shared with `rlhf-algo`). It knows nothing about tch,
//! tonic, tokio or any other crate of ours: the coordinator maps these plain types onto the
//! launchers itself, and validates what needs more than this file (prompt lengths, tokenizers)
//! with [`Provenance::error_at`] so its errors read the same.

mod error;
mod lines;
mod load;
mod schema;
mod validate;

pub use error::{display_key, ConfigError, Origin};
pub use load::{load_as, to_yaml, ConfigSchema, EnvSource, Loaded, Provenance, ENV_PREFIX};
pub use schema::*;

use std::path::Path;

/// A loaded [`RunConfig`] with the provenance of its values.
pub type LoadedConfig = Loaded<RunConfig>;

/// Loads, resolves and validates a run file: defaults < `file` < `RLHF_` variables from `env` <
/// `overrides` (`key.path=value`).
pub fn load(
    file: &Path,
    overrides: &[String],
    env: EnvSource,
) -> Result<LoadedConfig, ConfigError> {
    load_as(file, overrides, env)
}
