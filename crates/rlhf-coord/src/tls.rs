//! Whether a run's gRPC channels use mutual TLS, decided once (`launcher.tls`, and for `auto`
//! the coordinator's listening address), and the run's certificates in `RUN_DIR/tls/`
//! (`rlhf_proto::tls`). Everything else follows this answer: the coordinator's service and
//! its clients, and the workers, which get the directory on their command line.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use rlhf_config::{RunConfig, TlsMode};
use rlhf_proto::tls::{Origin, RunTls, DIR_NAME};
use tracing::{info, warn};

/// Whether TLS is on for a run whose coordinator listens on `listen`.
pub fn enabled(mode: TlsMode, listen: IpAddr) -> bool {
    match mode {
        TlsMode::On => true,
        TlsMode::Off => false,
        // The unspecified address (0.0.0.0, ::) listens on every interface: not loopback.
        TlsMode::Auto => !listen.is_loopback(),
    }
}

/// The run's TLS material when TLS is on (made, or reused on a resume), else None.
pub fn for_run(cfg: &RunConfig, run_dir: &Path, listen: IpAddr) -> Result<Option<RunTls>> {
    if !enabled(cfg.launcher.tls, listen) {
        let setting = serde_json::to_value(cfg.launcher.tls)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        info!(launcher.tls = %setting, %listen, "gRPC without TLS (loopback only)");
        return Ok(None);
    }
    // Absolute: the workers (srun tasks on other nodes included) get this path as it is.
    let dir = std::path::absolute(run_dir.join(DIR_NAME))
        .with_context(|| format!("resolving {}/{DIR_NAME}", run_dir.display()))?;
    let (tls, origin) = RunTls::create_or_reuse(&dir, &cfg.run.name)
        .with_context(|| format!("launcher.tls: the run's certificates in {}", dir.display()))?;
    match origin {
        Origin::Created => {
            info!(dir = %dir.display(), "mutual TLS on: made the run's CA and certificate")
        }
        Origin::Reused => {
            info!(dir = %dir.display(), "mutual TLS on: reusing the run's CA and certificate")
        }
        Origin::Replaced(why) => {
            warn!(dir = %dir.display(), reason = %why, "mutual TLS on: the run's earlier certificates were not usable; made new ones")
        }
    }
    Ok(Some(tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_on_exactly_off_loopback() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (addr, want) in [
            ("127.0.0.1", false),
            ("::1", false),
            ("0.0.0.0", true),
            ("::", true),
            ("10.1.2.3", true),
        ] {
            assert_eq!(enabled(TlsMode::Auto, ip(addr)), want, "{addr}");
            assert!(enabled(TlsMode::On, ip(addr)));
            assert!(!enabled(TlsMode::Off, ip(addr)));
        }
    }
}
