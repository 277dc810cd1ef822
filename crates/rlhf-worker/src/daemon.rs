//! The daemon's life: listen, register with the coordinator, heartbeat, serve until told to stop
//! (a `Shutdown` call, a heartbeat answer, or the coordinator unreachable for longer than the
//! orphan timeout, so a worker never outlives its run by more than that).
//!
//! Signals do not stop a worker while its coordinator lives. Slurm delivers a preemption's, a
//! time limit's or a `scancel`'s SIGTERM to every task of the job at once, workers included,
//! while the coordinator still needs them to finish the step and write the checkpoint; the
//! coordinator then sends `Shutdown`, and Slurm's SIGKILL after the grace time is the hard stop.
//! So SIGTERM, SIGUSR1 and a first SIGINT are logged and held; a second SIGINT (Ctrl-C twice on
//! a worker run by hand) stops it.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rlhf_proto::auth::{AddToken, CheckToken, RunToken};
use rlhf_proto::limits::MAX_MESSAGE_BYTES;
use rlhf_proto::pb::{self, coordinator_client::CoordinatorClient, worker_server::WorkerServer};
use rlhf_proto::tls::RunTls;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};
use tracing::{error, info, warn};

use crate::service::{PeerAddress, WorkerService};

/// How the daemon is started (flags or the environment the coordinator sets).
#[derive(Debug, Clone)]
pub struct DaemonArgs {
    /// The coordinator's gRPC address, `host:port`.
    pub coordinator: String,
    /// This worker's name from the placement.
    pub name: String,
    /// Interface to listen on.
    pub bind: IpAddr,
    /// Network interface whose address to listen on and advertise (`launcher.interface`).
    pub interface: Option<String>,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    pub token: RunToken,
    /// Give up registering after this long, whether the coordinator is unreachable or
    /// reachable but silent.
    pub register_timeout: Duration,
    /// Stop when the coordinator has not answered a heartbeat for this long.
    pub orphan_timeout: Duration,
    /// The directories requests may name (`--allow-root`): the run directory and the model
    /// directories of the run. CreateRole, SaveState and LoadState paths outside them are
    /// refused.
    pub roots: Vec<std::path::PathBuf>,
    /// The run's TLS (`--tls-dir`): with it this daemon serves and calls over mutual TLS only,
    /// without it over plaintext only.
    pub tls: Option<RunTls>,
}

type Client = CoordinatorClient<InterceptedService<Channel, AddToken>>;

async fn connect(
    addr: &str,
    token: &RunToken,
    tls: Option<&RunTls>,
    deadline: Instant,
) -> Result<Client> {
    let scheme = rlhf_proto::tls::scheme(tls.is_some());
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .with_context(|| format!("coordinator address `{addr}` is not host:port"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client())
            .with_context(|| format!("TLS settings from {}", tls.dir().display()))?;
    }
    loop {
        match endpoint.connect().await {
            Ok(ch) => {
                return Ok(
                    CoordinatorClient::with_interceptor(ch, AddToken(token.clone()))
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                )
            }
            // A refused handshake stays refused: say so now instead of retrying to the deadline.
            Err(e) if rlhf_proto::tls::is_tls_failure(&e) => bail!(
                "TLS with the coordinator at {addr} failed from host {}: {}: {}",
                rlhf_comm::net::host_name(),
                error_chain(&e),
                mismatch_hint(tls)
            ),
            Err(e) if Instant::now() < deadline => {
                warn!(error = %e, "coordinator at {addr} not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!(
                "could not reach the coordinator at {addr} from host {}: {e}",
                rlhf_comm::net::host_name()
            ),
        }
    }
}

/// What to change when this worker and the coordinator disagree on TLS.
fn mismatch_hint(tls: Option<&RunTls>) -> String {
    match tls {
        Some(t) => format!(
            "this worker uses the run's TLS (--tls-dir {}); the coordinator must be the same \
             run's, launched with TLS (launcher.tls: on, or auto with a non-loopback address), \
             so that its certificate comes from that directory",
            t.dir().display()
        ),
        None => format!(
            "this worker has no TLS; if the coordinator uses TLS (launcher.tls), start the \
             worker with --tls-dir RUN_DIR/{} (or {})",
            rlhf_proto::tls::DIR_NAME,
            rlhf_proto::tls::TLS_DIR_ENV
        ),
    }
}

/// `e` and its sources, `: `-separated (tonic's transport errors say little at the top).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

fn devices() -> Vec<pb::DeviceInfo> {
    let mut d = vec![pb::DeviceInfo {
        name: "cpu".into(),
        memory_bytes: host_memory_bytes(),
    }];
    // libtorch's CUDA library is opened only where an NVIDIA driver is installed: loading it
    // costs a CPU-only machine ~0.13 s per worker start for nothing (rlhf_model::cuda).
    let driver = std::path::Path::new("/proc/driver/nvidia/version").exists();
    let cuda = if driver && rlhf_model::cuda::load().is_ok() {
        tch::Cuda::device_count()
    } else {
        0
    };
    for i in 0..cuda {
        d.push(pb::DeviceInfo {
            name: format!("cuda:{i}"),
            memory_bytes: 0,
        });
    }
    d
}

/// Holds SIGTERM, SIGUSR1 and a first SIGINT (see the module docs); returns on a second SIGINT.
/// The handlers are installed before this returns its future, so a signal during start-up is
/// held too.
fn hold_signals(
    held: watch::Sender<Option<&'static str>>,
) -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        let mut interrupts = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = usr1.recv() => "SIGUSR1",
                _ = int.recv() => { interrupts += 1; "SIGINT" }
            };
            if interrupts >= 2 {
                warn!("second SIGINT: stopping without waiting for the coordinator");
                return;
            }
            // The first one goes to the coordinator with the next heartbeat.
            held.send_if_modified(|h| {
                let first = h.is_none();
                if first {
                    *h = Some(name);
                }
                first
            });
            warn!(
                signal = name,
                "held: the coordinator stops this worker once its checkpoint is written \
                 (or this worker stops by itself when the coordinator is gone); SIGINT twice stops it now"
            );
        }
    })
}

/// Runs the daemon until it is told to stop. Returns an error when it could not start.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let (held_tx, held) = watch::channel(None);
    let mut signals = std::pin::pin!(hold_signals(held_tx)?);
    let listen = rlhf_comm::net::choose(args.bind, args.interface.as_deref())?;
    let addr = SocketAddr::new(listen.bind, args.port);
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (port in use? pick another with --port)")
    })?;
    let local = listener.local_addr()?;
    let host = rlhf_comm::net::host_name();
    let advertised = listen.advertise(local.port());
    // NCCL picks its bootstrap and ring interface by itself unless this names one (the launcher
    // sets it from launcher.interface): worth seeing when a multi-node NCCL group hangs.
    let nccl_ifname =
        std::env::var("NCCL_SOCKET_IFNAME").unwrap_or_else(|_| "(NCCL's own choice)".into());
    let tls = args.tls.as_ref().map(|t| t.dir().display().to_string());
    let tls = tls.as_deref().unwrap_or("off");
    info!(worker = %args.name, address = %local, %advertised, %nccl_ifname, %tls, "worker listening");
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let service = WorkerService::new(
        stop_tx.clone(),
        PeerAddress {
            bind: listen.bind,
            host: listen.host.clone(),
            key: rlhf_comm::CollectiveKey::from_run_token(args.token.expose().as_bytes()),
        },
        args.roots.clone(),
    );
    let server = WorkerServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let guarded = InterceptedService::new(server, CheckToken(args.token.clone()));
    let mut shutdown_rx = stop_rx.clone();
    let mut builder = Server::builder().tcp_nodelay(true);
    if let Some(tls) = &args.tls {
        builder = builder
            .tls_config(tls.server())
            .with_context(|| format!("TLS settings from {}", tls.dir().display()))?;
    }
    let serve = tokio::spawn(builder.add_service(guarded).serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        async move {
            let _ = shutdown_rx.wait_for(|s| *s).await;
        },
    ));

    // Register, within the deadline as a whole: a coordinator (or a stranger on its port) that
    // accepts the connection but never answers must not hold the worker.
    let deadline = Instant::now() + args.register_timeout;
    let registering = async {
        let mut client =
            connect(&args.coordinator, &args.token, args.tls.as_ref(), deadline).await?;
        let reg = client
            .register(pb::RegisterRequest {
                worker_name: args.name.clone(),
                host: host.clone(),
                address: advertised.clone(),
                devices: devices(),
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .await
            .map_err(|s| {
                anyhow::anyhow!(
                    "registering with the coordinator at {} from host {host}: {} ({:?}){}",
                    args.coordinator,
                    s.message(),
                    s.code(),
                    // A plaintext call to a TLS listener fails as a broken or cancelled
                    // connection, not as a handshake (which of those varies from run to run):
                    // only the hint can say that TLS may be what differs.
                    match s.code() {
                        tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Internal
                        | tonic::Code::Cancelled =>
                            format!("; {}", mismatch_hint(args.tls.as_ref())),
                        _ => String::new(),
                    }
                )
            })?
            .into_inner();
        anyhow::Ok((client, reg))
    };
    let registered = tokio::select! {
        r = tokio::time::timeout_at(deadline.into(), registering) => r,
        _ = &mut signals => bail!("stopped by a second SIGINT while registering"),
    };
    let (mut client, reg) = registered
        .map_err(|_| {
            anyhow::anyhow!(
                "registering with the coordinator at {} from host {host} did not finish within {:.1} s \
                 (launcher.startup_timeout_s): it accepted the connection but never answered; \
                 is that address the run's coordinator?",
                args.coordinator,
                args.register_timeout.as_secs_f64()
            )
        })??;
    let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(10));
    info!(run = %reg.run_name, ?interval, "registered");

    // Heartbeats until stopped; the coordinator being gone for the orphan timeout stops us too.
    let hb_stop = stop_tx.clone();
    let name = args.name.clone();
    let orphan = args.orphan_timeout;
    let heartbeat = tokio::spawn(async move {
        let mut seq = 0u64;
        let mut last_ok = Instant::now();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            seq += 1;
            let mut req = tonic::Request::new(pb::HeartbeatRequest {
                worker_name: name.clone(),
                seq,
                rss_bytes: rss_bytes(),
                signal: held.borrow().unwrap_or_default().to_string(),
            });
            req.set_timeout(interval.max(Duration::from_secs(1)));
            match client.heartbeat(req).await {
                Ok(r) => {
                    last_ok = Instant::now();
                    if r.into_inner().shutdown {
                        info!("the coordinator asked this worker to stop");
                        let _ = hb_stop.send(true);
                        return;
                    }
                }
                Err(e) if last_ok.elapsed() > orphan => {
                    error!(error = %e, "coordinator unreachable for {:?}; stopping", orphan);
                    let _ = hb_stop.send(true);
                    return;
                }
                Err(e) => warn!(error = %e, "heartbeat failed"),
            }
        }
    });

    tokio::select! {
        _ = &mut signals => {
            let _ = stop_tx.send(true);
        }
        _ = stop_rx.wait_for(|s| *s) => {}
    }
    heartbeat.abort();
    match tokio::time::timeout(Duration::from_secs(10), serve).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => bail!("server error: {e}"),
        Ok(Err(e)) => bail!("server task failed: {e}"),
        Err(_) => warn!("in-flight calls did not finish within 10 s; exiting anyway"),
    }
    info!("worker stopped");
    Ok(())
}
