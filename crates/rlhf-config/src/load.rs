//! The loader: defaults < YAML file < `RLHF_` environment < `--set`, merged by figment, then
//! extracted, path-resolved and validated, with every error mapped to a key and its source.
//!
//! figment merges dictionaries but replaces lists whole, so an override that addresses a list
//! item (`--set workers.0.threads=2`, `RLHF_WORKERS__0__THREADS=2`) is applied to a copy of the
//! list from the layers below; the copied items keep their figment tags, so an error in an
//! untouched item still points at the file. The file, env and `--set` layers share one provider
//! type ([`Layer`]): figment's `Env` reads only the process environment (tests inject theirs),
//! and the file's data is adjusted before merging (a section left empty, `slurm:` with its keys
//! commented out, means "defaults", not null).

use std::path::{Path, PathBuf};

use figment::providers::Serialized;
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{display_key, key_segments, ConfigError, Origin};
use crate::lines::LineMap;

/// The prefix of environment variables that may be config.
pub const ENV_PREFIX: &str = "RLHF_";

const FILE_PROVIDER: &str = "YAML file";
const ENV_PROVIDER: &str = "RLHF_ environment variables";
const SET_PROVIDER: &str = "--set arguments";

/// Where `RLHF_` variables are read from.
#[derive(Debug, Clone, Default)]
pub enum EnvSource {
    /// The process environment.
    #[default]
    Process,
    /// Exactly these `(name, value)` pairs and nothing from the process (tests, embedding).
    Vars(Vec<(String, String)>),
}

impl EnvSource {
    /// No environment variables at all.
    pub fn empty() -> Self {
        EnvSource::Vars(Vec::new())
    }

    fn pairs(&self) -> Vec<(String, String)> {
        match self {
            EnvSource::Process => std::env::vars_os()
                .map(|(k, v)| {
                    (
                        k.to_string_lossy().into_owned(),
                        v.to_string_lossy().into_owned(),
                    )
                })
                .collect(),
            EnvSource::Vars(pairs) => pairs.clone(),
        }
    }
}

/// A config type the loader can load: a serde struct whose `Default` is the documented
/// defaults, with hooks for paths, secrets and validation.
///
/// Its top-level fields are the sections: only `RLHF_<SECTION>[__...]` variables whose first
/// segment (lowercased) names one of them are read; other `RLHF_` variables (`RLHF_LOG`, ...)
/// are left alone.
pub trait ConfigSchema: Serialize + DeserializeOwned + Default {
    /// Dotted keys of map-valued fields whose default is replaced whole, not merged key by
    /// key, when a source names the map (figment merges maps; weights the user did not write
    /// must not survive from the defaults). The field's serde default fills it when no source
    /// names it.
    const REPLACED_MAPS: &'static [&'static str] = &[];

    /// Dotted keys of secret fields: [`to_yaml`] writes `<redacted>` in their place.
    const SECRET_KEYS: &'static [&'static str] = &[];

    /// Calls `visit(key, path)` for every path-valued field, so the loader can resolve relative
    /// paths: against the YAML file's directory when the value came from the file, against the
    /// working directory otherwise.
    fn visit_paths(&mut self, visit: &mut dyn FnMut(&str, &mut PathBuf)) {
        let _ = visit;
    }

    /// Checks beyond types, after paths are resolved; report with [`Provenance::error_at`].
    fn validate(&self, provenance: &Provenance) -> Result<(), ConfigError> {
        let _ = provenance;
        Ok(())
    }
}

/// A loaded config with the provenance of its values.
#[derive(Debug)]
pub struct Loaded<T> {
    /// The merged, path-resolved, validated config.
    pub config: T,
    /// Where each value came from.
    pub provenance: Provenance,
}

impl<T: ConfigSchema> Loaded<T> {
    /// `FILE:LINE` of `key` (`algorithm.kl.coef`, `workers[1].roles` or `workers.1.roles`)
    /// when the YAML file spells it out.
    pub fn locate(&self, key: &str) -> Option<String> {
        self.provenance.locate(key)
    }

    /// Where the value of `key` came from.
    pub fn origin(&self, key: &str) -> Origin {
        self.provenance.origin(key)
    }

    /// An error about `key` that names it and the source of its value, as the loader's own.
    pub fn error_at(&self, key: &str, message: impl Into<String>) -> ConfigError {
        self.provenance.error_at(key, message)
    }

    /// The resolved config as YAML (secrets redacted): what a run writes as
    /// `config.resolved.yaml`.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        to_yaml(&self.config)
    }
}

/// Which source set each value: the figment (for value tags), the file's key lines, and the
/// env / `--set` entries in the order they were applied.
#[derive(Debug)]
pub struct Provenance {
    file: PathBuf,
    lines: LineMap,
    figment: Figment,
    root: Value,
    overrides: Vec<OverrideEntry>,
    cwd: PathBuf,
}

#[derive(Debug, Clone)]
struct OverrideEntry {
    segments: Vec<String>,
    origin: Origin,
}

impl Provenance {
    /// The YAML file, as given to the loader.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The 1-based line of `key` in the YAML file, if the file spells it out.
    pub fn line(&self, key: &str) -> Option<usize> {
        self.lines.line(&key_segments(key).join("."))
    }

    /// `FILE:LINE` of `key` when the YAML file spells it out.
    pub fn locate(&self, key: &str) -> Option<String> {
        self.line(key)
            .map(|line| format!("{}:{line}", self.file.display()))
    }

    /// Where the value of `key` came from: the file (with the key's line), an environment
    /// variable, a `--set` argument, or the default. A key with no value of its own (a field
    /// the file's list item leaves out) takes the source of its nearest enclosing value.
    pub fn origin(&self, key: &str) -> Origin {
        let segments = key_segments(key);
        let value = deepest(&self.root, &segments);
        let metadata = self.figment.get_metadata(value.tag());
        self.classify(metadata, &segments)
    }

    /// An [`ConfigError::Invalid`] for `key` with `message`, naming the value's source.
    pub fn error_at(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let segments = key_segments(key);
        ConfigError::Invalid {
            key: display_key(&segments),
            origin: self.origin(key),
            message: message.into(),
        }
    }

    fn classify(&self, metadata: Option<&Metadata>, segments: &[String]) -> Origin {
        let Some(metadata) = metadata else {
            return Origin::Default;
        };
        if let Some(Source::File(_)) = &metadata.source {
            // The key's own line, else that of the nearest enclosing key the file spells out.
            let line = (0..=segments.len())
                .rev()
                .find_map(|n| self.lines.line(&segments[..n].join(".")));
            return Origin::File {
                file: self.file.clone(),
                line,
            };
        }
        let is_env = metadata.name == ENV_PROVIDER;
        if !is_env && metadata.name != SET_PROVIDER {
            return Origin::Default;
        }
        let related = |e: &&OverrideEntry| {
            matches!(
                (&e.origin, is_env),
                (Origin::Env { .. }, true) | (Origin::Set { .. }, false)
            ) && (segments.starts_with(&e.segments) || e.segments.starts_with(segments))
        };
        // The last entry that set this key (or an enclosing one) wins, as in the merge; an
        // entry below the key (the key is a section it patched) is the next best answer.
        let entries: Vec<_> = self.overrides.iter().filter(related).collect();
        entries
            .iter()
            .rev()
            .find(|e| segments.starts_with(&e.segments))
            .or_else(|| entries.last())
            .map(|e| e.origin.clone())
            .unwrap_or(Origin::Default)
    }

    fn map_figment_error(&self, error: figment::Error) -> ConfigError {
        use figment::error::Kind;
        let mut segments = error.path.clone();
        let message = match &error.kind {
            Kind::UnknownField(field, expected) => format!(
                "unknown key `{field}`; expected one of {}; remove it or fix its spelling",
                one_of(expected)
            ),
            Kind::MissingField(field) => {
                segments.push(field.to_string());
                "missing required key; add it".to_owned()
            }
            Kind::UnknownVariant(variant, expected) => {
                format!(
                    "invalid value `{variant}`; expected one of {}",
                    one_of(expected)
                )
            }
            Kind::InvalidType(actual, expected) => {
                format!("expected {expected}, found {actual}")
            }
            Kind::InvalidValue(actual, expected) => {
                format!("invalid value {actual}, expected {expected}")
            }
            Kind::Message(message) => message.clone(),
            other => other.to_string(),
        };
        let origin = match &error.metadata {
            Some(metadata) => self.classify(Some(metadata), &segments),
            None => self.origin(&segments.join(".")),
        };
        ConfigError::Invalid {
            key: display_key(&segments),
            origin,
            message,
        }
    }

    /// The directory of the config file, absolute (the working directory when the file has no
    /// directory part).
    pub fn file_dir(&self) -> PathBuf {
        match self.file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => self.cwd.join(dir),
            _ => self.cwd.clone(),
        }
    }

    fn resolve_path(&self, key: &str, path: &mut PathBuf) {
        if path.as_os_str().is_empty() || path.is_absolute() {
            return;
        }
        let base = match self.origin(key) {
            Origin::File { .. } => match self.file.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => self.cwd.join(dir),
                _ => self.cwd.clone(),
            },
            _ => self.cwd.clone(),
        };
        *path = base.join(&*path);
    }
}

fn one_of(expected: &[&str]) -> String {
    let quoted: Vec<_> = expected.iter().map(|e| format!("`{e}`")).collect();
    quoted.join(", ")
}

/// The value at `segments`, or at the deepest prefix of it that exists.
fn deepest<'a>(root: &'a Value, segments: &[String]) -> &'a Value {
    let mut value = root;
    for segment in segments {
        let next = match value {
            Value::Dict(_, dict) => dict.get(segment),
            Value::Array(_, items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        match next {
            Some(next) => value = next,
            None => break,
        }
    }
    value
}

/// Loads `file` as a `T`: defaults < file < `RLHF_` variables from `env` (those naming a
/// section of `T`) < `overrides` (`key.path=value`, value read as YAML), then resolves relative
/// paths and runs [`ConfigSchema::validate`].
pub fn load_as<T: ConfigSchema>(
    file: &Path,
    overrides: &[String],
    env: EnvSource,
) -> Result<Loaded<T>, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_owned(),
        source,
    })?;
    let lines = LineMap::parse(&text).map_err(|e| ConfigError::Malformed {
        file: file.to_owned(),
        line: e.line,
        column: e.column,
        message: e.message,
    })?;
    // serde_norway (which parses the file into figment's Dict) rejects a few documents
    // yaml-rust2 accepts, such as multiple documents or non-string keys; it reports those with a
    // position too.
    let malformed = |e: serde_norway::Error| ConfigError::Malformed {
        file: file.to_owned(),
        line: e.location().map_or(1, |l| l.line()),
        column: e.location().map_or(1, |l| l.column()),
        message: e.to_string(),
    };
    let document: serde_norway::Value = serde_norway::from_str(&text).map_err(malformed)?;
    let set_args = parse_set_args(overrides)?;

    let defaults =
        Value::serialize(T::default()).map_err(|e| ConfigError::Serialize(e.to_string()))?;
    let Value::Dict(_, mut defaults) = defaults else {
        return Err(ConfigError::Serialize(
            "the config type must serialize to a mapping of sections".to_owned(),
        ));
    };
    let sections: Vec<String> = defaults.keys().cloned().collect();
    let env_vars = parse_env(env.pairs(), &sections)?;

    let file_data = match document {
        serde_norway::Value::Null => Dict::new(),
        serde_norway::Value::Mapping(_) => {
            let mut data: Dict = serde_norway::from_str(&text).map_err(malformed)?;
            drop_empty_sections(&mut data, &defaults);
            data
        }
        other => {
            return Err(ConfigError::NotAMapping {
                file: file.to_owned(),
                found: yaml_kind(&other).to_owned(),
            })
        }
    };

    for key in T::REPLACED_MAPS {
        remove_key(&mut defaults, &key_segments(key));
    }
    let mut figment = Figment::from(Serialized::defaults(defaults)).merge(Layer {
        name: FILE_PROVIDER,
        file: Some(file.to_owned()),
        dict: file_data,
    });
    let mut entries = Vec::new();
    figment = merge_overrides(figment, ENV_PROVIDER, env_vars, &mut entries)?;
    figment = merge_overrides(figment, SET_PROVIDER, set_args, &mut entries)?;

    let cwd = std::env::current_dir().map_err(|source| ConfigError::Read {
        file: PathBuf::from("."),
        source,
    })?;
    let mut provenance = Provenance {
        file: file.to_owned(),
        lines,
        figment,
        root: Value::from(Dict::new()),
        overrides: entries,
        cwd,
    };
    provenance.root = provenance
        .figment
        .find_value("")
        .map_err(|e| provenance.map_figment_error(e))?;
    let mut config: T = provenance
        .figment
        .extract()
        .map_err(|e| provenance.map_figment_error(e))?;
    config.visit_paths(&mut |key, path| provenance.resolve_path(key, path));
    config.validate(&provenance)?;
    Ok(Loaded { config, provenance })
}

/// The resolved config as YAML, with [`ConfigSchema::SECRET_KEYS`] replaced by `<redacted>`.
/// Loading the output gives back an equal config (when nothing was redacted).
pub fn to_yaml<T: ConfigSchema>(config: &T) -> Result<String, ConfigError> {
    let mut value =
        serde_norway::to_value(config).map_err(|e| ConfigError::Serialize(e.to_string()))?;
    for key in T::SECRET_KEYS {
        redact(&mut value, &key_segments(key));
    }
    serde_norway::to_string(&value).map_err(|e| ConfigError::Serialize(e.to_string()))
}

fn redact(value: &mut serde_norway::Value, segments: &[String]) {
    let Some((head, rest)) = segments.split_first() else {
        if !value.is_null() {
            *value = serde_norway::Value::String("<redacted>".to_owned());
        }
        return;
    };
    if let Some(child) = value.get_mut(head.as_str()) {
        redact(child, rest);
    }
}

fn yaml_kind(value: &serde_norway::Value) -> &'static str {
    match value {
        serde_norway::Value::Null => "nothing",
        serde_norway::Value::Bool(_) => "a boolean",
        serde_norway::Value::Number(_) => "a number",
        serde_norway::Value::String(_) => "a string",
        serde_norway::Value::Sequence(_) => "a list",
        serde_norway::Value::Mapping(_) => "a mapping",
        serde_norway::Value::Tagged(_) => "a tagged value",
    }
}

/// Removes null values from `data` where `defaults` has a section: YAML reads a section whose
/// keys are all commented out as null, and the user means "the defaults".
fn drop_empty_sections(data: &mut Dict, defaults: &Dict) {
    data.retain(|key, value| {
        !matches!(
            (&*value, defaults.get(key)),
            (Value::Empty(..), Some(Value::Dict(..)))
        )
    });
    for (key, value) in data.iter_mut() {
        if let (Value::Dict(_, child), Some(Value::Dict(_, child_defaults))) =
            (value, defaults.get(key))
        {
            drop_empty_sections(child, child_defaults);
        }
    }
}

fn remove_key(dict: &mut Dict, segments: &[String]) {
    match segments {
        [] => {}
        [last] => {
            dict.remove(last);
        }
        [head, rest @ ..] => {
            if let Some(Value::Dict(_, child)) = dict.get_mut(head) {
                remove_key(child, rest);
            }
        }
    }
}

/// One override: key segments, the value's text, and the source to name in errors.
#[derive(Debug)]
struct RawOverride {
    segments: Vec<String>,
    text: String,
    origin: Origin,
}

fn parse_set_args(args: &[String]) -> Result<Vec<RawOverride>, ConfigError> {
    args.iter()
        .map(|arg| {
            let bad = |reason: &str| ConfigError::BadOverride {
                arg: arg.clone(),
                reason: reason.to_owned(),
            };
            let (key, text) = arg.split_once('=').ok_or_else(|| bad("no `=`"))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(bad("the key is empty"));
            }
            let segments = split_key(key).ok_or_else(|| bad("the key has an empty segment"))?;
            Ok(RawOverride {
                segments,
                text: text.to_owned(),
                origin: Origin::Set { arg: arg.clone() },
            })
        })
        .collect()
}

/// `a.b[0].c` → `[a, b, 0, c]`; None when a segment is empty (`a..b`, `.a`).
fn split_key(key: &str) -> Option<Vec<String>> {
    let dotted = key.replace('[', ".").replace(']', "");
    let segments: Vec<String> = dotted.split('.').map(|s| s.trim().to_owned()).collect();
    if segments.iter().any(String::is_empty) {
        return None;
    }
    Some(segments)
}

/// The `RLHF_` variables that name a section, as overrides: `RLHF_TRAIN__ACTOR__LR` →
/// `train.actor.lr`. Parents apply before children so the more specific variable wins.
fn parse_env(
    pairs: Vec<(String, String)>,
    sections: &[String],
) -> Result<Vec<RawOverride>, ConfigError> {
    let mut out = Vec::new();
    for (name, text) in pairs {
        let Some(rest) = name
            .get(..ENV_PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
            .map(|_| &name[ENV_PREFIX.len()..])
        else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let segments: Vec<String> = rest.split("__").map(str::to_owned).collect();
        if !sections.contains(&segments[0]) {
            // RLHF_LOG, RLHF_TORCH_VENV, ...: some other part of the system's variable.
            continue;
        }
        if segments.iter().any(String::is_empty) {
            return Err(ConfigError::BadEnv {
                var: name,
                reason: "a key segment is empty".to_owned(),
            });
        }
        out.push(RawOverride {
            segments,
            text,
            origin: Origin::Env { var: name },
        });
    }
    out.sort_by(|a, b| {
        (a.segments.len(), &a.segments, a.origin.to_string()).cmp(&(
            b.segments.len(),
            &b.segments,
            b.origin.to_string(),
        ))
    });
    Ok(out)
}

/// A value as written on the command line or in a variable, read as a YAML scalar or flow
/// collection (`0.7`, `x`, `[actor, critic]`, `{lr: 1e-5}`, `null`); text that is not YAML is
/// taken as a string.
fn parse_value(text: &str) -> Value {
    serde_norway::from_str::<Value>(text).unwrap_or_else(|_| Value::from(text.to_owned()))
}

/// One source's data (the file, env or `--set`), provided to figment under `name`.
struct Layer {
    name: &'static str,
    file: Option<PathBuf>,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        match &self.file {
            Some(file) => Metadata::from(self.name, file.as_path()),
            None => Metadata::named(self.name),
        }
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

fn merge_overrides(
    figment: Figment,
    name: &'static str,
    raw: Vec<RawOverride>,
    entries: &mut Vec<OverrideEntry>,
) -> Result<Figment, ConfigError> {
    if raw.is_empty() {
        return Ok(figment);
    }
    // The merged layers below, to copy lists from; if they fail, extraction reports it.
    let base = figment
        .find_value("")
        .unwrap_or_else(|_| Value::from(Dict::new()));
    let mut patch = Value::from(Dict::new());
    for o in raw {
        let value = parse_value(&o.text);
        set_path(&mut patch, Some(&base), &o.segments, value, 0).map_err(|reason| {
            match &o.origin {
                Origin::Env { var } => ConfigError::BadEnv {
                    var: var.clone(),
                    reason,
                },
                Origin::Set { arg } => ConfigError::BadOverride {
                    arg: arg.clone(),
                    reason,
                },
                _ => ConfigError::Serialize(reason),
            }
        })?;
        entries.push(OverrideEntry {
            segments: o.segments,
            origin: o.origin,
        });
    }
    let Value::Dict(_, dict) = patch else {
        unreachable!("the patch root is created as a dict and only its children change")
    };
    Ok(figment.merge(Layer {
        name,
        file: None,
        dict,
    }))
}

/// Sets `segments[depth..]` under `node` (the patch) to `value`. Where the layers below hold a
/// list at a segment, the list is copied into the patch so one item can be changed.
fn set_path(
    node: &mut Value,
    base: Option<&Value>,
    segments: &[String],
    value: Value,
    depth: usize,
) -> Result<(), String> {
    let head = &segments[depth];
    let last = depth + 1 == segments.len();
    let here = || display_key(&segments[..depth]);
    let child_base = base.and_then(|b| deepest_child(b, head));
    match node {
        Value::Dict(_, dict) => {
            if last {
                dict.insert(head.clone(), value);
                return Ok(());
            }
            if let Some(Value::String(..) | Value::Num(..) | Value::Bool(..) | Value::Char(..)) =
                child_base
            {
                return Err(format!(
                    "`{}` is a single value, not a section",
                    display_key(&segments[..=depth])
                ));
            }
            let entry = dict
                .entry(head.clone())
                .or_insert_with(|| match child_base {
                    Some(list @ Value::Array(..)) => list.clone(),
                    _ => Value::from(Dict::new()),
                });
            if !matches!(entry, Value::Dict(..) | Value::Array(..)) {
                // An earlier override set this key to a scalar; a deeper one makes it a section.
                *entry = Value::from(Dict::new());
            }
            set_path(entry, child_base, segments, value, depth + 1)
        }
        Value::Array(_, items) => {
            let index: usize = head.parse().map_err(|_| {
                format!(
                    "`{}` is a list: address an item by its index, e.g. {}.0.{head}",
                    here(),
                    here()
                )
            })?;
            let len = items.len();
            let item = items.get_mut(index).ok_or_else(|| {
                format!(
                    "`{}` has {len} items, so index {index} is out of range; set the whole list \
                     to add items",
                    here()
                )
            })?;
            if last {
                *item = value;
                return Ok(());
            }
            if !matches!(item, Value::Dict(..) | Value::Array(..)) {
                return Err(format!(
                    "`{}` is a single value, not a section",
                    display_key(&segments[..=depth])
                ));
            }
            set_path(item, child_base, segments, value, depth + 1)
        }
        _ => Err(format!("`{}` is a single value, not a section", here())),
    }
}

fn deepest_child<'a>(value: &'a Value, segment: &str) -> Option<&'a Value> {
    match value {
        Value::Dict(_, dict) => dict.get(segment),
        Value::Array(_, items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaded_configs_can_cross_threads() {
        // The coordinator shares the loaded config (and its provenance, for later errors)
        // with its tasks.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Loaded<crate::RunConfig>>();
    }

    #[test]
    fn set_args_split_on_the_first_equals_sign() {
        let parsed = parse_set_args(&["logging.level=info,rlhf=debug".to_owned()]).unwrap();
        assert_eq!(parsed[0].segments, ["logging", "level"]);
        assert_eq!(parsed[0].text, "info,rlhf=debug");
        let parsed = parse_set_args(&["workers[0].threads=2".to_owned()]).unwrap();
        assert_eq!(parsed[0].segments, ["workers", "0", "threads"]);
    }

    #[test]
    fn bad_set_args_name_the_argument() {
        for (arg, reason) in [
            ("train.steps", "no `=`"),
            ("=5", "the key is empty"),
            ("train..steps=5", "empty segment"),
        ] {
            let err = parse_set_args(&[arg.to_owned()]).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("`{arg}`")), "{msg}");
            assert!(msg.contains(reason), "{msg}");
        }
    }

    #[test]
    fn values_read_as_yaml_scalars_and_flow_collections() {
        assert!(matches!(parse_value("0.7"), Value::Num(..)));
        assert!(matches!(parse_value("x"), Value::String(..)));
        assert!(matches!(parse_value("true"), Value::Bool(..)));
        assert!(matches!(parse_value("null"), Value::Empty(..)));
        assert!(matches!(parse_value("[actor, critic]"), Value::Array(..)));
        assert!(matches!(parse_value("{lr: 1e-5}"), Value::Dict(..)));
        // Not YAML (an unclosed flow list): kept as the text, so the type error shows it.
        assert_eq!(parse_value("[a, b").as_str(), Some("[a, b"));
    }

    #[test]
    fn env_keeps_only_variables_naming_a_section() {
        let sections = vec!["run".to_owned(), "train".to_owned()];
        let pairs = [
            ("RLHF_LOG", "debug"),
            ("RLHF_RUN_TOKEN", "secret"),
            ("RLHF_TRAIN__STEPS", "5"),
            ("RLHF_TRAIN", "{epochs: 2}"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec();
        let parsed = parse_env(pairs, &sections).unwrap();
        let keys: Vec<_> = parsed.iter().map(|o| o.segments.join(".")).collect();
        // The section-level variable applies first, the more specific one after it.
        assert_eq!(keys, ["train", "train.steps"]);
        let err = parse_env(
            vec![("RLHF_TRAIN____STEPS".to_owned(), "5".to_owned())],
            &sections,
        )
        .unwrap_err();
        assert!(err.to_string().contains("RLHF_TRAIN____STEPS"), "{err}");
    }
}
