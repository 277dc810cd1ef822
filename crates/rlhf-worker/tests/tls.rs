//! A real `rlhf-worker` started with `--tls-dir` serves only over mutual TLS: a plaintext
//! client, a client whose certificate comes from another CA and a client that does not trust the
//! run's CA are all refused even with the right run token, while the run's own certificate gets
//! through to the handler. A TLS worker and a plaintext one refuse each other, each failing at
//! once with an error that says what to change, and a worker refuses a TLS directory with a key
//! other users can read.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

use rlhf_proto::auth::{AddToken, RunToken};
use rlhf_proto::pb::{self, worker_client::WorkerClient};
use rlhf_proto::tls::{RunTls, SERVER_NAME};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn tls_dir(root: &Path, name: &str) -> RunTls {
    RunTls::create_or_reuse(&root.join(name), name).unwrap().0
}

/// Calls DestroyRole("nope") over `endpoint` with the right token.
async fn call(endpoint: Endpoint) -> Result<(), tonic::Status> {
    let token = RunToken::new(common::TOKEN.into()).unwrap();
    let ch = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
    let mut c = WorkerClient::with_interceptor(ch, AddToken(token));
    c.destroy_role(pb::RoleRef {
        role_id: "nope".into(),
    })
    .await
    .map(|_| ())
}

fn https(addr: &str, tls: ClientTlsConfig) -> Endpoint {
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
}

/// Refused before any handler ran: not the handler's own NotFound, and not a token refusal
/// either (the token was right).
fn assert_refused(r: Result<(), tonic::Status>, who: &str) {
    let e = r.expect_err(who);
    assert!(
        !matches!(
            e.code(),
            tonic::Code::NotFound | tonic::Code::Unauthenticated | tonic::Code::Ok
        ),
        "{who}: {e:?}"
    );
}

#[test]
fn a_tls_worker_serves_only_the_runs_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tls_dir(tmp.path(), "run");
    let other = tls_dir(tmp.path(), "other");
    let dir = run.dir().to_str().unwrap().to_string();
    let (mut child, addr) =
        common::spawn_daemon_with("w0", 30, "127.0.0.1:9", &["--tls-dir", &dir]);
    let read = |name: &str| std::fs::read_to_string(other.dir().join(name)).unwrap();
    let stranger = Identity::from_pem(read("run.pem"), read("run.key"));
    let run_ca = Certificate::from_pem(std::fs::read_to_string(run.dir().join("ca.pem")).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The run's own certificate reaches the handler, which answers about the role.
        let e = call(https(&addr, run.client())).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert!(e.message().contains("no role `nope`"), "{e:?}");

        // Plaintext, with the right token.
        let plain = Endpoint::from_shared(format!("http://{addr}")).unwrap();
        assert_refused(call(plain).await, "plaintext client");

        // Trusts the run's CA but presents another CA's certificate: mutual TLS refuses it.
        let foreign = ClientTlsConfig::new()
            .ca_certificate(run_ca.clone())
            .identity(stranger.clone())
            .domain_name(SERVER_NAME);
        // (Under TLS 1.3 the client sends its request before the server has checked its
        // certificate, so what it sees is the connection closing, not a named alert.)
        assert_refused(
            call(https(&addr, foreign)).await,
            "client with another CA's certificate",
        );

        // Trusts the run's CA and presents no certificate at all.
        let anonymous = ClientTlsConfig::new()
            .ca_certificate(run_ca)
            .domain_name(SERVER_NAME);
        assert_refused(
            call(https(&addr, anonymous)).await,
            "client without a certificate",
        );

        // Another run's client: the worker's certificate does not verify against its CA.
        let e = call(https(&addr, other.client())).await.unwrap_err();
        assert!(
            format!("{e:?}").contains("UnknownIssuer"),
            "another run's client must refuse this worker's certificate: {e:?}"
        );
    });
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs a worker to its end (it fails by itself); its output and how long it took.
fn run_worker(coordinator: &str, extra: &[&str]) -> (Output, Duration) {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf-worker"))
        .env("RLHF_RUN_TOKEN", common::TOKEN)
        .env("OMP_NUM_THREADS", "1")
        .env_remove("RLHF_LOG_FORMAT")
        .env_remove("RLHF_TLS_DIR")
        .args(["--coordinator", coordinator, "--name", "w1"])
        .args(["--register-timeout-s", "20"])
        .args(extra)
        .output()
        .unwrap();
    (out, t0.elapsed())
}

#[test]
fn tls_and_plaintext_workers_refuse_each_other_and_say_what_to_change() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tls_dir(tmp.path(), "run");
    let dir = run.dir().to_str().unwrap().to_string();
    // Each side is a worker's gRPC server standing in for the coordinator: one with TLS and one
    // without. Both keep serving while they try to register with nobody.
    let (mut tls_server, tls_addr) =
        common::spawn_daemon_with("tls", 60, "127.0.0.1:9", &["--tls-dir", &dir]);
    let (mut plain_server, plain_addr) = common::spawn_daemon_with("plain", 60, "127.0.0.1:9", &[]);

    // A plaintext worker registering with a TLS listener.
    let (out, took) = run_worker(&tls_addr, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    assert!(err.contains("start the worker with --tls-dir"), "{err}");

    // A TLS worker registering with a plaintext listener: the handshake fails, at once rather
    // than after the 20 s registration deadline.
    let (out, took) = run_worker(&plain_addr, &["--tls-dir", &dir]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    assert!(err.contains("TLS with the coordinator at"), "{err}");
    assert!(err.contains("launcher.tls"), "{err}");

    for c in [&mut tls_server, &mut plain_server] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn a_tls_dir_whose_key_others_can_read_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tls_dir(tmp.path(), "run");
    let key = run.dir().join("run.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (out, _) = run_worker("127.0.0.1:9", &["--tls-dir", run.dir().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--tls-dir"), "{err}");
    assert!(
        err.contains("mode 0640") && err.contains("chmod 600"),
        "{err}"
    );
}
