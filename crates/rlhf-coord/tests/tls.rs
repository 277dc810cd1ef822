//! Mutual TLS on the run's gRPC channels (`launcher.tls`), with real processes on loopback: a
//! run with `tls: on` trains, its certificates are private (directory 0700, files 0600), and a
//! resumed launch reuses the run's CA with workers that connect again; the coordinator's
//! registry refuses a plaintext client, a client with another CA's certificate and one without
//! a certificate even when they carry the right run token.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::{arithmetic_prompts, coord, jsonl, launch, tiny_model, worker_bin};

use rlhf_proto::auth::{AddToken, RunToken};
use rlhf_proto::pb::{self, coordinator_client::CoordinatorClient};
use rlhf_proto::tls::{RunTls, SERVER_NAME};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn setup(dir: &Path, worker: &Path, extra: &str) -> PathBuf {
    tiny_model(&dir.join("policy"));
    arithmetic_prompts(dir, 4);
    let yaml = format!(
        "run: {{name: t, dir: runs, seed: 3}}\n\
         launcher: {{worker_bin: {}, heartbeat_interval_ms: 100, heartbeat_timeout_ms: 2000, startup_timeout_s: 60, tls: on}}\n\
         workers:\n  - {{name: a, roles: [actor, reference], threads: 1}}\n  - {{name: b, roles: [reward], threads: 1}}\n\
         models:\n  policy: policy\n  reward: {{kind: exact_match}}\n\
         algorithm: {{name: rloo}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 4}}\n\
         train: {{steps: 2, micro_batch_size: 4, actor: {{lr: 1.0e-3}}}}\n\
         checkpoint: {{every: 1}}\n\
         logging: {{progress: false, plot: false}}\n{extra}",
        worker.display()
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    f
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_run_with_tls_on_trains_and_a_resume_reuses_its_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let f = setup(tmp.path(), &worker_bin(), "");
    let out = launch(&f, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("made the run's CA and certificate"), "{err}");
    let run = tmp.path().join("runs/t");
    assert_eq!(jsonl(&run.join("metrics.jsonl")).len(), 2);

    let tls = run.join("tls");
    assert_eq!(mode(&tls), 0o700);
    for f in ["ca.pem", "run.pem", "run.key"] {
        assert_eq!(mode(&tls.join(f)), 0o600, "{f}");
    }
    // Every worker served over TLS from that directory (the loopback would not turn it on).
    for w in ["a", "b"] {
        let log = std::fs::read_to_string(run.join(format!("logs/{w}.log"))).unwrap();
        assert!(
            log.contains(&format!("tls={}", tls.display())),
            "worker {w}: {log}"
        );
    }
    let ca = std::fs::read(tls.join("ca.pem")).unwrap();

    // Resume for a third step: same CA, and the relaunched workers register and train with it.
    let out = launch(&f, &["train.steps=3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming from"), "{err}");
    assert!(
        err.contains("reusing the run's CA and certificate"),
        "{err}"
    );
    assert_eq!(std::fs::read(tls.join("ca.pem")).unwrap(), ca);
    let m = jsonl(&run.join("metrics.jsonl"));
    assert_eq!(m.len(), 3);
    assert_eq!(m[2]["step"], 3);

    // With TLS off the same run needs no certificates and the workers get none.
    let out = launch(&f, &["train.steps=4", "launcher.tls=off"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("gRPC without TLS"), "{err}");
    let log = std::fs::read_to_string(run.join("logs/a.log")).unwrap();
    assert!(log.contains("tls=off"), "{log}");
}

/// Calls Register over `endpoint` with `token`.
async fn register(endpoint: Endpoint, token: &RunToken) -> Result<(), tonic::Status> {
    let ch = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
    let mut c = CoordinatorClient::with_interceptor(ch, AddToken(token.clone()));
    c.register(pb::RegisterRequest {
        worker_name: "intruder".into(),
        host: "h".into(),
        address: "127.0.0.1:9".into(),
        devices: vec![],
        pid: 1,
        version: env!("CARGO_PKG_VERSION").into(),
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

/// Refused before the handler (whose answer to an unknown worker is InvalidArgument) and not
/// for the token, which was right.
fn assert_refused(r: Result<(), tonic::Status>, who: &str) {
    let e = r.expect_err(who);
    assert!(
        !matches!(
            e.code(),
            tonic::Code::InvalidArgument | tonic::Code::Unauthenticated | tonic::Code::Ok
        ),
        "{who}: {e:?}"
    );
}

#[test]
fn the_registry_refuses_clients_without_the_runs_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    // A stand-in worker that records what the launcher handed it and never registers, so the
    // coordinator's service stays up (until launcher.startup_timeout_s) for the probes below.
    let fake = tmp.path().join("fake-worker");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nenv > {}/worker.env.tmp && mv {0}/worker.env.tmp {0}/worker.env\nexec sleep 30\n",
            tmp.path().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = setup(tmp.path(), &fake, "");
    let child = coord()
        .arg("launch")
        .arg(&f)
        .args(["--set", "launcher.startup_timeout_s=10"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let env_file = tmp.path().join("worker.env");
    let t0 = Instant::now();
    while !env_file.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the fake worker never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let env = std::fs::read_to_string(&env_file).unwrap();
    let var = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} not passed to the worker: {env}"))
            .to_string()
    };
    let token = RunToken::new(var("RLHF_RUN_TOKEN")).unwrap();
    let addr = var("RLHF_COORD_ADDR");
    let tls_dir = PathBuf::from(var("RLHF_TLS_DIR"));
    assert_eq!(tls_dir, tmp.path().join("runs/t/tls"));
    let run = RunTls::load(&tls_dir).unwrap();
    let other = RunTls::create_or_reuse(&tmp.path().join("other"), "other")
        .unwrap()
        .0;
    let read = |d: &Path, n: &str| std::fs::read_to_string(d.join(n)).unwrap();
    let run_ca = Certificate::from_pem(read(&tls_dir, "ca.pem"));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The run's certificate and token get through to the handler.
        let e = register(https(&addr, run.client()), &token)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("not in this run's placement"), "{e:?}");

        let plain = Endpoint::from_shared(format!("http://{addr}")).unwrap();
        assert_refused(register(plain, &token).await, "plaintext client");

        let foreign = ClientTlsConfig::new()
            .ca_certificate(run_ca.clone())
            .identity(Identity::from_pem(
                read(other.dir(), "run.pem"),
                read(other.dir(), "run.key"),
            ))
            .domain_name(SERVER_NAME);
        assert_refused(
            register(https(&addr, foreign), &token).await,
            "client with another CA's certificate",
        );

        let anonymous = ClientTlsConfig::new()
            .ca_certificate(run_ca)
            .domain_name(SERVER_NAME);
        assert_refused(
            register(https(&addr, anonymous), &token).await,
            "client without a certificate",
        );
    });
    // No worker ever registers: the launch ends at its start-up timeout.
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
}
