//! The controller of rlhf-coord as a library: the `rlhf-coord` binary (`main.rs`) parses the
//! command line and calls into these modules. The step loop of `launch` is [`step_loop`]; it
//! reaches workers only through [`workers::RoleHandle`], so it is unit-tested with in-process
//! fakes (see `step_loop`'s tests) besides the multi-process tests in `tests/`.

pub mod checkpoint;
pub mod cluster;
pub mod export;
pub mod generate_cmd;
pub mod launch;
pub mod launcher;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod plan;
pub mod plot;
pub mod prompts;
pub mod replicas;
pub mod rewards;
pub mod rl;
pub mod run_state;
pub mod slurm;
pub mod status;
pub mod step_loop;
pub mod tensorboard;
pub mod tls;
pub mod train_cmds;
pub mod validation;
pub mod workers;

use anyhow::{Context, Result};
use rlhf_model::config::{device_from_str, kind_from_str};
use tch::{Device, Kind};

/// A `--dtype`-style flag's value as a torch kind; the error names `flag`.
pub fn parse_kind(flag: &str, s: &str) -> Result<Kind> {
    kind_from_str(s).with_context(|| format!("{flag} {s:?}: expected float32, bfloat16 or float16"))
}

/// A `--device` flag's value as a torch device.
pub fn parse_device(s: &str) -> Result<Device> {
    device_from_str(s).with_context(|| format!("--device {s:?}: expected cpu, cuda or cuda:N"))
}
