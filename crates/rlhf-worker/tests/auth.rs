//! A real `rlhf-worker` daemon refuses RPCs without the run token (or with a wrong one) and
//! serves the same call with it; it also stops by itself when no coordinator ever answers.

use std::time::{Duration, Instant};

mod common;

use rlhf_proto::auth::{AddToken, RunToken};
use rlhf_proto::pb::{self, worker_client::WorkerClient};

#[test]
fn rpcs_without_the_run_token_are_refused() {
    let token = common::TOKEN;
    let (mut child, addr) = common::spawn_daemon("w0", 5);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let req = || pb::RoleRef {
            role_id: "nope".into(),
        };
        let mut bare = WorkerClient::new(ch.clone());
        let e = bare.destroy_role(req()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("x-rlhf-token"), "{e:?}");
        let wrong = RunToken::new("f".repeat(32)).unwrap();
        let mut c = WorkerClient::with_interceptor(ch.clone(), AddToken(wrong));
        assert_eq!(
            c.destroy_role(req()).await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        // The right token reaches the handler, which answers about the role instead.
        let right = RunToken::new(token.into()).unwrap();
        let mut c = WorkerClient::with_interceptor(ch, AddToken(right));
        let e = c.destroy_role(req()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert!(e.message().contains("no role `nope`"), "{e:?}");
    });
    // Registration never succeeds: the daemon gives up and exits non-zero on its own.
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "worker did not give up registering"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
}
