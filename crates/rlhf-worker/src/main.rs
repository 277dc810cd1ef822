//! `rlhf-worker`: the per-node worker daemon binary. Started by `rlhf-coord launch` (locally or
//! through `srun`), which passes the coordinator's address, the worker's name and the run token
//! in the environment (and, when the run uses TLS, the directory of its certificates); flags
//! override the environment for manual runs. This binary owns the
//! tracing subscriber (`RLHF_LOG` filter, `RLHF_LOG_FORMAT=json`) and the libtorch thread count;
//! all logic lives in the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use rlhf_proto::auth::RunToken;
use rlhf_worker::daemon::{run, DaemonArgs};

#[derive(Parser)]
#[command(name = "rlhf-worker", version, about = "rlhf-coord worker daemon")]
struct Cli {
    /// Coordinator address, host:port.
    #[arg(long, env = "RLHF_COORD_ADDR")]
    coordinator: String,
    /// This worker's name from the placement.
    #[arg(long, env = "RLHF_WORKER_NAME")]
    name: String,
    /// Interface to listen on.
    #[arg(long, env = "RLHF_WORKER_BIND", default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Network interface whose address to listen on and advertise (as NCCL_SOCKET_IFNAME).
    #[arg(long, env = "RLHF_WORKER_INTERFACE")]
    interface: Option<String>,
    /// Port to listen on (0: any free port).
    #[arg(long, env = "RLHF_WORKER_PORT", default_value_t = 0)]
    port: u16,
    /// libtorch intra-op threads.
    #[arg(long, env = "RLHF_WORKER_THREADS", default_value_t = 1)]
    threads: i32,
    /// Seconds to keep trying to register.
    #[arg(long, env = "RLHF_REGISTER_TIMEOUT_S", default_value_t = 60.0)]
    register_timeout_s: f64,
    /// Stop when the coordinator has not answered heartbeats for this many seconds.
    #[arg(long, env = "RLHF_ORPHAN_TIMEOUT_S", default_value_t = 30.0)]
    orphan_timeout_s: f64,
    /// A directory requests may name (repeat for several): model paths of CreateRole and the
    /// directories of SaveState / LoadState must lie inside one. `rlhf-coord launch` passes the
    /// run directory and the run's model directories; with none, every such path is refused.
    #[arg(long = "allow-root", value_name = "DIR")]
    allow_root: Vec<std::path::PathBuf>,
    /// The run's TLS directory (RUN_DIR/tls, made by the coordinator): serve and call over
    /// mutual TLS with its certificates. Without it the worker speaks plaintext only.
    #[arg(long, env = rlhf_proto::tls::TLS_DIR_ENV)]
    tls_dir: Option<PathBuf>,
}

fn init_tracing(name: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RLHF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if std::env::var("RLHF_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
    tracing::debug!(worker = name, "tracing initialised");
}

fn main() -> ExitCode {
    let malloc = rlhf_worker::malloc::keep_freed_memory();
    let cli = Cli::parse();
    init_tracing(&cli.name);
    tracing::debug!(malloc, "allocator settings");
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "rlhf-worker: error: {}",
                rlhf_proto::errors::one_line(e.chain())
            );
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let token = RunToken::from_env().map_err(anyhow::Error::msg)?;
    if cli.threads < 1 {
        anyhow::bail!("--threads must be >= 1, found {}", cli.threads);
    }
    tch::set_num_threads(cli.threads);
    tch::set_num_interop_threads(1);
    let tls = cli
        .tls_dir
        .as_deref()
        .map(rlhf_proto::tls::RunTls::load)
        .transpose()
        .context("--tls-dir: the run's TLS files")?;
    let args = DaemonArgs {
        coordinator: cli.coordinator,
        name: cli.name,
        bind: cli.bind,
        interface: cli.interface,
        port: cli.port,
        token,
        register_timeout: Duration::from_secs_f64(cli.register_timeout_s.max(0.1)),
        orphan_timeout: Duration::from_secs_f64(cli.orphan_timeout_s.max(0.1)),
        roots: cli.allow_root,
        tls,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(args))
}
