//! The daemon's life: listen, register with the coordinator, heartbeat, serve until told to stop
//! (a `Shutdown` call, a heartbeat answer, SIGTERM/SIGINT, or the coordinator unreachable for
//! longer than the orphan timeout, so a worker never outlives its run by more than that).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rlhf_proto::auth::{AddToken, CheckToken, RunToken};
use rlhf_proto::limits::MAX_MESSAGE_BYTES;
use rlhf_proto::pb::{self, coordinator_client::CoordinatorClient, worker_server::WorkerServer};
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
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    pub token: RunToken,
    /// Give up registering after this long.
    pub register_timeout: Duration,
    /// Stop when the coordinator has not answered a heartbeat for this long.
    pub orphan_timeout: Duration,
}

type Client = CoordinatorClient<InterceptedService<Channel, AddToken>>;

async fn connect(addr: &str, token: &RunToken, deadline: Instant) -> Result<Client> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("coordinator address `{addr}` is not host:port"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    loop {
        match endpoint.connect().await {
            Ok(ch) => {
                return Ok(
                    CoordinatorClient::with_interceptor(ch, AddToken(token.clone()))
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                )
            }
            Err(e) if Instant::now() < deadline => {
                warn!(error = %e, "coordinator at {addr} not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("could not reach the coordinator at {addr}: {e}"),
        }
    }
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

async fn wait_for_signal() -> Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Runs the daemon until it is told to stop. Returns an error when it could not start.
pub async fn run(args: DaemonArgs) -> Result<()> {
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (port in use? pick another with --port)")
    })?;
    let local = listener.local_addr()?;
    info!(worker = %args.name, address = %local, "worker listening");

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    // Bound to every interface (multi-node): other hosts reach us by host name.
    let advertised = match local.ip() {
        ip if ip.is_unspecified() => host.clone(),
        IpAddr::V6(ip) => format!("[{ip}]"),
        IpAddr::V4(ip) => ip.to_string(),
    };
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let service = WorkerService::new(
        stop_tx.clone(),
        PeerAddress {
            bind: local.ip(),
            host: advertised.clone(),
        },
    );
    let server = WorkerServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let guarded = InterceptedService::new(server, CheckToken(args.token.clone()));
    let mut shutdown_rx = stop_rx.clone();
    let serve = tokio::spawn(
        Server::builder()
            .tcp_nodelay(true)
            .add_service(guarded)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    let _ = shutdown_rx.wait_for(|s| *s).await;
                },
            ),
    );

    // Register.
    let deadline = Instant::now() + args.register_timeout;
    let mut client = connect(&args.coordinator, &args.token, deadline).await?;
    let reg = client
        .register(pb::RegisterRequest {
            worker_name: args.name.clone(),
            host: host.clone(),
            address: format!("{advertised}:{}", local.port()),
            devices: devices(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .await
        .with_context(|| format!("registering with the coordinator at {}", args.coordinator))?
        .into_inner();
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
        sig = wait_for_signal() => {
            info!(signal = sig?, "stopping");
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
