//! The coordinator's side of the cluster: its gRPC service (workers register and heartbeat), the
//! registry of live workers, and the liveness watch that turns missed heartbeats into a run
//! failure naming the worker and its roles.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rlhf_proto::auth::{CheckToken, RunToken};
use rlhf_proto::limits::MAX_MESSAGE_BYTES;
use rlhf_proto::pb::{
    self, coordinator_server::Coordinator, coordinator_server::CoordinatorServer,
};
use rlhf_proto::tls::RunTls;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::codegen::InterceptedService;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// Why the run must stop because of a worker.
#[derive(Debug, Clone)]
pub struct WorkerFailure {
    pub worker: String,
    pub roles: Vec<String>,
    pub cause: String,
    /// The worker went silent (its node or the network to it is presumed gone) rather than
    /// exiting with an error: on Slurm the job requeues itself to resume, on other nodes.
    pub lost: bool,
}

/// The run stopped because a worker failed: the failure, and the call that failed with it when
/// a call noticed first.
#[derive(Debug)]
pub struct StoppedByWorker {
    pub failure: WorkerFailure,
    pub call: Option<String>,
}

impl std::fmt::Display for StoppedByWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; stopping the run", self.failure)?;
        if let Some(call) = &self.call {
            write!(f, " (the failed call: {call})")?;
        }
        Ok(())
    }
}

impl std::error::Error for StoppedByWorker {}

impl std::fmt::Display for WorkerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "worker `{}` (roles: {}) {}",
            self.worker,
            self.roles.join(", "),
            self.cause
        )
    }
}

/// A registered worker.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub name: String,
    pub address: String,
    pub host: String,
    pub pid: u32,
    pub devices: Vec<String>,
    pub last_seen: Instant,
    pub rss_bytes: u64,
}

/// Who is expected, who registered, and when each was last heard from.
pub struct Registry {
    run_name: String,
    /// Worker name -> its roles, from the placement.
    expected: BTreeMap<String, Vec<String>>,
    workers: Mutex<HashMap<String, WorkerInfo>>,
    heartbeat_interval: Duration,
    shutdown: watch::Receiver<bool>,
    registered: watch::Sender<usize>,
    /// The run's stop request (as a signal to the coordinator sets it): a worker reporting a
    /// signal it held sets it too.
    stop_request: watch::Sender<Option<String>>,
}

impl Registry {
    pub fn new(
        run_name: &str,
        expected: BTreeMap<String, Vec<String>>,
        heartbeat_interval: Duration,
        shutdown: watch::Receiver<bool>,
        stop_request: watch::Sender<Option<String>>,
    ) -> Arc<Registry> {
        Arc::new(Registry {
            run_name: run_name.to_string(),
            expected,
            workers: Mutex::new(HashMap::new()),
            heartbeat_interval,
            shutdown,
            registered: watch::channel(0).0,
            stop_request,
        })
    }

    pub fn roles_of(&self, worker: &str) -> Vec<String> {
        self.expected.get(worker).cloned().unwrap_or_default()
    }

    pub fn get(&self, worker: &str) -> Option<WorkerInfo> {
        self.workers.lock().ok()?.get(worker).cloned()
    }

    /// Waits until every expected worker registered, or `timeout` passes (an error listing the
    /// missing ones).
    pub async fn wait_all(&self, timeout: Duration) -> Result<()> {
        let mut rx = self.registered.subscribe();
        let want = self.expected.len();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|n| *n >= want)).await;
        if waited.is_err() {
            let have = self
                .workers
                .lock()
                .map(|w| w.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default();
            let missing: Vec<&String> =
                self.expected.keys().filter(|k| !have.contains(k)).collect();
            anyhow::bail!(
                "workers {missing:?} did not register within {} s (launcher.startup_timeout_s); \
                 see their logs under the run directory's logs/",
                timeout.as_secs_f64()
            );
        }
        Ok(())
    }

    /// The first worker silent for longer than `timeout`, if any.
    pub fn silent_worker(&self, timeout: Duration) -> Option<WorkerFailure> {
        let workers = self.workers.lock().ok()?;
        workers.values().find_map(|w| {
            let quiet = w.last_seen.elapsed();
            (quiet > timeout).then(|| WorkerFailure {
                worker: w.name.clone(),
                roles: self.roles_of(&w.name),
                cause: format!(
                    "on node {} (pid {}, address {}) missed heartbeats for {:.1} s \
                     (launcher.heartbeat_timeout_ms = {}); the node or the network to it is \
                     presumed down",
                    w.host,
                    w.pid,
                    w.address,
                    quiet.as_secs_f64(),
                    timeout.as_millis()
                ),
                lost: true,
            })
        })
    }
}

/// The gRPC service workers call.
pub struct CoordinatorService {
    registry: Arc<Registry>,
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let pb::RegisterRequest {
            worker_name,
            host,
            address,
            devices,
            pid,
            version,
        } = req.into_inner();
        let r = &self.registry;
        if !r.expected.contains_key(&worker_name) {
            return Err(Status::invalid_argument(format!(
                "worker_name `{worker_name}` is not in this run's placement (workers: {:?})",
                r.expected.keys().collect::<Vec<_>>()
            )));
        }
        if version != env!("CARGO_PKG_VERSION") {
            return Err(Status::failed_precondition(format!(
                "version: rlhf-worker {version} cannot serve rlhf-coord {}; install matching builds",
                env!("CARGO_PKG_VERSION")
            )));
        }
        // A host name is fine (workers bound to every interface advertise theirs); it must
        // resolve here, where the calls to the worker start.
        rlhf_comm::net::resolve(&address, Duration::from_secs(10))
            .await
            .map_err(|e| {
                Status::invalid_argument(format!(
                    "worker `{worker_name}` on host {host} advertised address: {e}"
                ))
            })?;
        {
            let mut w = r
                .workers
                .lock()
                .map_err(|_| Status::internal("registry lock poisoned"))?;
            if w.contains_key(&worker_name) {
                return Err(Status::already_exists(format!(
                    "worker_name `{worker_name}` registered twice; is another daemon using the name?"
                )));
            }
            w.insert(
                worker_name.clone(),
                WorkerInfo {
                    name: worker_name.clone(),
                    address: address.clone(),
                    host: host.clone(),
                    pid,
                    devices: devices.iter().map(|d| d.name.clone()).collect(),
                    last_seen: Instant::now(),
                    rss_bytes: 0,
                },
            );
            // Published under the lock: two registrations finishing at once must not publish
            // their counts out of order (a 2 overwritten by a 1 left `wait_all` waiting for a
            // worker that had registered).
            r.registered.send_replace(w.len());
        }
        info!(worker = %worker_name, %address, %host, pid, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: r.heartbeat_interval.as_millis() as u64,
            run_name: r.run_name.clone(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let pb::HeartbeatRequest {
            worker_name,
            seq: _,
            rss_bytes,
            signal,
        } = req.into_inner();
        let mut w = self
            .registry
            .workers
            .lock()
            .map_err(|_| Status::internal("registry lock poisoned"))?;
        let info = w.get_mut(&worker_name).ok_or_else(|| {
            Status::not_found(format!("worker_name `{worker_name}` has not registered"))
        })?;
        info.last_seen = Instant::now();
        info.rss_bytes = rss_bytes;
        let host = info.host.clone();
        drop(w);
        // Slurm signalled the job's tasks (a preemption, `scancel --signal=TERM`) and perhaps
        // not this process: stop the run as if it had been. Once a stop is requested, later
        // reports (every worker sends one with each heartbeat) only read the request.
        let stop = &self.registry.stop_request;
        if !signal.is_empty() && stop.borrow().is_none() {
            let from = format!("{signal} at worker `{worker_name}` on node {host}");
            stop.send_if_modified(|r| {
                let first = r.is_none();
                if first {
                    warn!(signal = %from, "a worker was signalled: finishing the current step, then writing a checkpoint and stopping");
                    *r = Some(from);
                }
                first
            });
        }
        Ok(Response::new(pb::HeartbeatResponse {
            shutdown: *self.registry.shutdown.borrow(),
        }))
    }
}

/// Starts the coordinator service on `addr` (port 0: any free port), over mutual TLS when `tls`
/// is given; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    token: RunToken,
    tls: Option<&RunTls>,
    mut stop: watch::Receiver<bool>,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "the coordinator cannot listen on {addr}: is the port in use? choose a free one or 0"
        )
    })?;
    let local = listener.local_addr()?;
    let svc = CoordinatorServer::new(CoordinatorService { registry })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let guarded = InterceptedService::new(svc, CheckToken(token));
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.server())
            .with_context(|| format!("TLS settings from {}", tls.dir().display()))?;
    }
    tokio::spawn(async move {
        let r = builder
            .add_service(guarded)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )
            .await;
        if let Err(e) = r {
            warn!(error = %e, "coordinator service stopped with an error");
        }
    });
    Ok(local)
}

/// Watches heartbeats: sends a failure on `tx` as soon as a registered worker is silent for
/// longer than `timeout`, checking every `timeout / 10` (so detection takes at most 1.1x the
/// timeout).
pub fn watch_heartbeats(
    registry: Arc<Registry>,
    timeout: Duration,
    tx: mpsc::UnboundedSender<WorkerFailure>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval((timeout / 10).max(Duration::from_millis(10)));
        loop {
            tick.tick().await;
            if let Some(f) = registry.silent_worker(timeout) {
                warn!(worker = %f.worker, "{f}");
                let _ = tx.send(f);
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every worker reports the signal it held with each heartbeat. Once the run is stopping,
    /// those reports must not wait for the stop request's lock, which the step loop may be
    /// reading: a heartbeat blocked there while holding the registry once deadlocked a run's
    /// checkpoint-on-stop (seen in CI with `scancel --signal=TERM`).
    #[test]
    fn signal_reports_neither_block_nor_overwrite_a_stop_in_progress() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let expected = [("a".to_string(), vec![]), ("b".to_string(), vec![])].into();
            let (_stop_tx, stop) = watch::channel(false);
            let (request, requested) = watch::channel(None);
            let registry = Registry::new("t", expected, Duration::from_secs(1), stop, request);
            let svc = Arc::new(CoordinatorService {
                registry: registry.clone(),
            });
            for (i, name) in ["a", "b"].into_iter().enumerate() {
                svc.register(Request::new(pb::RegisterRequest {
                    worker_name: name.into(),
                    host: format!("node{i}"),
                    address: format!("127.0.0.1:{}", 1000 + i),
                    devices: vec![],
                    pid: 1,
                    version: env!("CARGO_PKG_VERSION").into(),
                }))
                .await
                .unwrap();
            }
            let beat = |name: &str| {
                Request::new(pb::HeartbeatRequest {
                    worker_name: name.into(),
                    seq: 1,
                    rss_bytes: 0,
                    signal: "SIGTERM".into(),
                })
            };
            svc.heartbeat(beat("a")).await.unwrap();
            let first = requested.borrow().clone();
            assert_eq!(
                first.as_deref(),
                Some("SIGTERM at worker `a` on node node0")
            );
            // The step loop reading the request while it writes the checkpoint; worker b's
            // report arrives on another thread (a lock wait would block that thread outright).
            let reading = requested.borrow();
            let (done_tx, done) = std::sync::mpsc::channel();
            let (svc2, handle) = (svc.clone(), tokio::runtime::Handle::current());
            std::thread::spawn(move || {
                let r = handle.block_on(svc2.heartbeat(beat("b")));
                let _ = done_tx.send(r.is_ok());
            });
            let answered = done.recv_timeout(Duration::from_secs(2));
            drop(reading);
            assert_eq!(
                answered,
                Ok(true),
                "a heartbeat waited for the stop request's lock"
            );
            assert_eq!(requested.borrow().clone(), first);
        });
    }

    /// Workers registering at the same instant (all daemons start together) must all be counted:
    /// CI once saw two registrations in the same microsecond publish their counts out of order,
    /// and `wait_all` then waited out its timeout for workers that had registered. (With the
    /// publication moved back outside the lock, 3 of 5 runs of this test failed on 2 cores; a
    /// race test can only make the bug likely to show.)
    #[test]
    fn simultaneous_registrations_all_count() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for round in 0..1000 {
                let names: Vec<String> = (0..32).map(|i| format!("w{i}")).collect();
                let expected = names.iter().map(|n| (n.clone(), vec![])).collect();
                let (_stop_tx, stop) = watch::channel(false);
                let registry = Registry::new(
                    "t",
                    expected,
                    Duration::from_secs(1),
                    stop,
                    watch::channel(None).0,
                );
                let svc = Arc::new(CoordinatorService {
                    registry: registry.clone(),
                });
                let barrier = Arc::new(tokio::sync::Barrier::new(names.len()));
                let calls: Vec<_> = names
                    .into_iter()
                    .enumerate()
                    .map(|(i, worker_name)| {
                        let (svc, barrier) = (svc.clone(), barrier.clone());
                        tokio::spawn(async move {
                            barrier.wait().await;
                            svc.register(Request::new(pb::RegisterRequest {
                                worker_name,
                                host: "h".into(),
                                address: format!("127.0.0.1:{}", 1000 + i),
                                devices: vec![],
                                pid: i as u32,
                                version: env!("CARGO_PKG_VERSION").into(),
                            }))
                            .await
                            .map(|_| ())
                        })
                    })
                    .collect();
                for c in calls {
                    c.await.unwrap().unwrap();
                }
                registry
                    .wait_all(Duration::from_millis(500))
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
            }
        });
    }
}
