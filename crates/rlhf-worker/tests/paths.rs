//! Request paths are confined to the directories the worker was started for (`--allow-root`):
//! CreateRole's `model_path`, SaveState's and LoadState's `dir` outside them, or reaching out
//! through a symlink or `..`, are refused with InvalidArgument naming the field, and nothing is
//! read or written there.

use std::os::unix::fs::symlink;
use std::path::Path;

use rlhf_model::init::{init_model, InitSpec, Preset};
use rlhf_model::Family;
use rlhf_proto::auth::{AddToken, RunToken};
use rlhf_proto::pb::{self, worker_client::WorkerClient};
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

mod common;
use common::TOKEN;

type Client = WorkerClient<InterceptedService<Channel, AddToken>>;

fn create(id: &str, path: &Path) -> pb::CreateRoleRequest {
    pb::CreateRoleRequest {
        role_id: id.into(),
        kind: pb::RoleKind::Reference as i32,
        model_path: path.to_string_lossy().into_owned(),
        device: "cpu".into(),
        dtype: "f32".into(),
        seed: 1,
        spec: Some(pb::create_role_request::Spec::Reference(
            pb::ReferenceSpec {},
        )),
    }
}

fn state(dir: &Path) -> pb::StateRequest {
    pb::StateRequest {
        role_id: "ok".into(),
        dir: dir.to_string_lossy().into_owned(),
    }
}

fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let s = r.expect_err("the path was accepted");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let m = s.message();
    assert!(
        m.contains(&format!("`{field}`")) && (m.contains("outside") || m.contains("absolute")),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_allowed_roots_are_refused_naming_the_field() {
    let run = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let model = run.path().join("model");
    let foreign = outside.path().join("model");
    for d in [&model, &foreign] {
        init_model(&InitSpec::new(Family::Llama, Preset::Tiny), d).unwrap();
    }
    let (mut child, addr) = common::spawn_daemon_in("paths", 60, &[run.path()]);
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c: Client =
        WorkerClient::with_interceptor(ch, AddToken(RunToken::new(TOKEN.into()).unwrap()));

    // A valid model outside, named directly, through `..` and through a symlink inside.
    refused(c.create_role(create("a", &foreign)).await, "model_path");
    // Both temporary directories share a parent: RUN/../OUTSIDE/model.
    let dotdot = run
        .path()
        .join("..")
        .join(outside.path().file_name().unwrap())
        .join("model");
    refused(c.create_role(create("b", &dotdot)).await, "model_path");
    symlink(&foreign, run.path().join("linked")).unwrap();
    refused(
        c.create_role(create("c", &run.path().join("linked"))).await,
        "model_path",
    );

    // Inside: served.
    c.create_role(create("ok", &model)).await.unwrap();
    let saved = run.path().join("state");
    c.save_state(state(&saved)).await.unwrap();
    c.load_state(state(&saved)).await.unwrap();

    // SaveState / LoadState out of the roots: nothing written there.
    let target = outside.path().join("state");
    refused(c.save_state(state(&target)).await, "dir");
    assert!(
        !target.exists(),
        "the refused SaveState wrote {}",
        target.display()
    );
    refused(c.load_state(state(&foreign)).await, "dir");
    refused(
        c.save_state(state(Path::new("relative/state"))).await,
        "dir",
    );

    let _ = child.kill();
    let _ = child.wait();
}
