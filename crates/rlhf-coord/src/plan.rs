//! `rlhf-coord plan RUN.yaml`: the placement (which role on which node and device), the
//! estimated memory per device from the model files, and (for `launcher.kind: slurm`) the sbatch
//! script, without starting anything. A device whose estimate exceeds its capacity is an error
//! saying by how much.
//!
//! Estimate per role, from the safetensors headers (exact parameter bytes, no weights read):
//! frozen roles (reference, reward) hold their weights; trainable roles (actor, critic) hold
//! weights + gradients (in `models.dtype`) + AdamW's two f32 moments; the actor also holds its
//! generation KV cache for the rollout batch (`batch_size * samples_per_prompt` sequences of
//! `max_prompt_tokens + max_new_tokens`). Activations of training forwards are not counted
//! (they scale with `train.micro_batch_size`); the report says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rlhf_config::{Device, EnvSource, LauncherKind, RewardKind, Role, RunConfig};

use crate::slurm;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// The run file (YAML).
    pub file: PathBuf,
    /// Override a config value (as for `launch`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// Parameter count and bytes of a model directory, from its safetensors headers.
#[derive(Debug, Clone, Copy, Default)]
struct ModelSize {
    params: u64,
    bytes: u64,
}

fn header_sizes(file: &Path, size: &mut ModelSize) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .with_context(|| format!("{}: not a safetensors file", file.display()))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        bail!("{}: safetensors header of {n} bytes", file.display());
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h)
        .with_context(|| format!("{}: truncated safetensors header", file.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&h)
        .with_context(|| format!("{}: bad safetensors header", file.display()))?;
    for (name, t) in v.as_object().into_iter().flatten() {
        if name == "__metadata__" {
            continue;
        }
        let shape = t["shape"]
            .as_array()
            .map(|s| s.iter().map(|d| d.as_u64().unwrap_or(0)).product::<u64>());
        let off = t["data_offsets"].as_array();
        if let (Some(p), Some(o)) = (shape, off) {
            size.params += p;
            size.bytes += o.get(1).and_then(|x| x.as_u64()).unwrap_or(0)
                - o.first().and_then(|x| x.as_u64()).unwrap_or(0);
        }
    }
    Ok(())
}

fn model_size(dir: &Path) -> Result<ModelSize> {
    let mut size = ModelSize::default();
    let single = dir.join("model.safetensors");
    if single.is_file() {
        header_sizes(&single, &mut size)?;
        return Ok(size);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).with_context(|| {
        format!(
            "{}: neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let mut shards: Vec<&str> = v["weight_map"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, f)| f.as_str())
        .collect();
    shards.sort();
    shards.dedup();
    for s in shards {
        header_sizes(&dir.join(s), &mut size)?;
    }
    Ok(size)
}

fn kv_cache_bytes(cfg: &RunConfig, dir: &Path, dtype_bytes: u64) -> Result<u64> {
    // The model loader's reading of config.json (defaults and all), not a second one.
    let c = rlhf_model::config::Config::from_dir(dir)?;
    let per_token = (c.num_hidden_layers * c.num_key_value_heads * c.head_dim) as u64;
    let seqs = cfg.rollout_sequences() as u64;
    let len = (cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens) as u64;
    Ok(2 * per_token * seqs * len * dtype_bytes)
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// The plan as text; an error when a device cannot hold its roles.
pub fn plan_text(cfg: &RunConfig, script: Option<String>) -> Result<String> {
    let dtype_bytes: u64 = match cfg.models.dtype {
        rlhf_config::Dtype::F32 => 4,
        _ => 2,
    };
    let nodes = slurm::node_indices(cfg);
    let slurm_kind = cfg.launcher.kind == LauncherKind::Slurm;
    let mut out = String::new();
    writeln!(
        out,
        "placement ({}):",
        if slurm_kind {
            format!("slurm, {} node(s)", cfg.launcher.slurm.nodes)
        } else {
            "local".into()
        }
    )?;
    writeln!(
        out,
        "  {:<14} {:<5} {:<8} {:<26} {:>12}",
        "worker", "node", "device", "roles", "est. GiB"
    )?;
    // (node, device) -> bytes
    let mut per_device: BTreeMap<(usize, String), u64> = BTreeMap::new();
    let mut notes = vec![];
    for (i, w) in cfg.workers.iter().enumerate() {
        let mut bytes = 0u64;
        for role in &w.roles {
            let b = match role {
                Role::Actor => {
                    let s = model_size(&cfg.models.policy)?;
                    s.bytes * 2
                        + s.params * 8
                        + kv_cache_bytes(cfg, &cfg.models.policy, dtype_bytes)?
                }
                Role::Critic => {
                    let s = model_size(cfg.models.critic_dir())?;
                    s.bytes * 2 + s.params * 8
                }
                Role::Reference => model_size(cfg.models.reference_dir())?.bytes,
                Role::Generator => {
                    model_size(&cfg.models.policy)?.bytes
                        + kv_cache_bytes(cfg, &cfg.models.policy, dtype_bytes)?
                }
                Role::Reward => match (&cfg.models.reward.kind, &cfg.models.reward.path) {
                    (RewardKind::Model, Some(p)) => model_size(p)?.bytes,
                    _ => 0,
                },
            };
            bytes += b;
        }
        let node = if slurm_kind { nodes[i] } else { 0 };
        let roles: Vec<&str> = w.roles.iter().map(|r| r.as_str()).collect();
        writeln!(
            out,
            "  {:<14} {:<5} {:<8} {:<26} {:>12.3}",
            w.name,
            node,
            w.device.to_string(),
            roles.join(","),
            gib(bytes)
        )?;
        *per_device.entry((node, w.device.to_string())).or_default() += bytes;
    }
    writeln!(out, "per device:")?;
    let mut errors = vec![];
    for ((node, dev), bytes) in &per_device {
        let cap = match dev.parse::<Device>() {
            Ok(Device::Cuda(_)) => Some(cfg.launcher.slurm.gpu_memory_gib),
            _ => cfg.launcher.slurm.mem_per_node_gib,
        };
        let used = gib(*bytes);
        let cap_s = cap.map_or("unchecked".to_string(), |c| format!("{c:.1} GiB"));
        writeln!(out, "  node {node} {dev:<8} {used:>10.3} GiB of {cap_s}")?;
        if let Some(c) = cap {
            if used > c {
                errors.push(format!(
                    "node {node} {dev}: the roles placed there need an estimated {used:.3} GiB, {:.3} GiB more than its {c} GiB; move a role to another worker or node, use a smaller dtype, or raise launcher.slurm.{}",
                    used - c,
                    if dev.starts_with("cuda") { "gpu_memory_gib" } else { "mem_per_node_gib" }
                ));
            }
        }
    }
    notes.push(
        "estimates: weights, gradients and AdamW moments of trainable roles, the actor's KV cache; \
         training activations are not counted"
            .to_string(),
    );
    for n in notes {
        writeln!(out, "({n})")?;
    }
    if let Some(s) = script {
        writeln!(out, "sbatch script:")?;
        out.push_str(&s);
    }
    if !errors.is_empty() {
        bail!(
            "{out}\nthe placement does not fit:\n  {}",
            errors.join("\n  ")
        );
    }
    Ok(out)
}

pub fn run(args: PlanArgs) -> Result<()> {
    let loaded = rlhf_config::load(&args.file, &args.set, EnvSource::Process)?;
    let cfg = &loaded.config;
    let script = if cfg.launcher.kind == LauncherKind::Slurm {
        let file = std::path::absolute(&args.file)?;
        let me = std::env::current_exe()?;
        Some(slurm::sbatch_script(
            cfg,
            &me,
            &file,
            &args.set,
            &cfg.run_dir(),
        ))
    } else {
        None
    };
    print!("{}", plan_text(cfg, script)?);
    Ok(())
}
