//! Collective groups between two real `rlhf-worker` daemons, driven over gRPC as the coordinator
//! drives them: a TCP weights group makes a generator's weights bitwise equal to another's
//! (digests), a generator with another model layout refuses the sync and keeps its weights,
//! LoRA generators (base + adapters) sync the adapters only and a plain generator refuses them, and
//! asking for NCCL where libnccl/CUDA are missing is a clear error, not a crash.

use std::path::Path;
use std::process::Child;

use rlhf_model::init::{init_model, InitSpec, Preset};
use rlhf_model::Family;
use rlhf_proto::auth::{AddToken, RunToken};
use rlhf_proto::pb::{self, worker_client::WorkerClient};
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

mod common;
use common::TOKEN;

type Client = WorkerClient<InterceptedService<Channel, AddToken>>;

struct Daemon {
    child: Child,
    addr: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker daemon that serves while it tries to register with a coordinator nobody runs.
fn daemon(name: &str) -> Daemon {
    let (child, addr) = common::spawn_daemon(name, 60);
    Daemon { child, addr }
}

async fn client(d: &Daemon) -> Client {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", d.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    WorkerClient::with_interceptor(ch, AddToken(RunToken::new(TOKEN.into()).unwrap()))
}

fn model(dir: &Path, seed: i64, layers_like: Preset) -> String {
    let mut spec = InitSpec::new(Family::Llama, layers_like);
    spec.seed = seed;
    init_model(&spec, dir).unwrap();
    dir.to_string_lossy().into_owned()
}

async fn generator(c: &mut Client, path: &str) {
    generator_with(c, path, 1, None).await
}

/// A generator seeded `seed` (its fresh adapters' A), with adapters of `lora` when given.
async fn generator_with(c: &mut Client, path: &str, seed: u64, lora: Option<pb::LoraSpec>) {
    c.create_role(pb::CreateRoleRequest {
        role_id: "gen".into(),
        kind: pb::RoleKind::Generator as i32,
        model_path: path.into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        seed,
        spec: Some(pb::create_role_request::Spec::Generator(
            pb::GeneratorSpec { lora },
        )),
    })
    .await
    .unwrap();
}

async fn digest(c: &mut Client) -> String {
    c.weights_digest(pb::RoleRef {
        role_id: "gen".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .sha256
}

/// Forms a TCP weights group over `cs` (rank = index), as the coordinator does.
async fn form(cs: &mut [Client], group_id: u64) {
    let mut addrs = vec![];
    for c in cs.iter_mut() {
        let o = c
            .open_group(pb::OpenGroupRequest {
                role_id: "gen".into(),
                group_id,
                backend: pb::CollectiveBackend::Tcp as i32,
            })
            .await
            .unwrap()
            .into_inner();
        addrs.push(o.address);
    }
    let joins = cs.iter().enumerate().map(|(rank, c)| {
        let mut c = c.clone();
        let peers = addrs.clone();
        async move {
            c.join_group(pb::JoinGroupRequest {
                role_id: "gen".into(),
                group_id,
                purpose: pb::GroupPurpose::Weights as i32,
                rank: rank as u32,
                peers,
                timeout_s: 10.0,
                backend: pb::CollectiveBackend::Tcp as i32,
                nccl_id: vec![],
            })
            .await
        }
    });
    for r in futures::future::join_all(joins).await {
        r.unwrap();
    }
}

async fn sync(cs: &[Client]) -> Vec<Result<pb::SyncWeightsResponse, tonic::Status>> {
    let calls = cs.iter().map(|c| {
        let mut c = c.clone();
        async move {
            c.sync_weights(pb::SyncWeightsRequest {
                role_id: "gen".into(),
                root: 0,
            })
            .await
            .map(|r| r.into_inner())
        }
    });
    futures::future::join_all(calls).await
}

#[test]
fn weight_sync_makes_generators_bitwise_equal_and_refuses_another_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let a = model(&tmp.path().join("a"), 1, Preset::Tiny);
    let b = model(&tmp.path().join("b"), 2, Preset::Tiny);
    let (d0, d1) = (daemon("w0"), daemon("w1"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut cs = vec![client(&d0).await, client(&d1).await];
        generator(&mut cs[0], &a).await;
        generator(&mut cs[1], &b).await;
        let (da, db) = (digest(&mut cs[0]).await, digest(&mut cs[1]).await);
        assert_ne!(da, db, "different seeds must give different weights");
        form(&mut cs, 77).await;
        let out = sync(&cs).await;
        let bytes: Vec<u64> = out.into_iter().map(|r| r.unwrap().bytes).collect();
        assert!(bytes[0] > 100_000 && bytes[0] == bytes[1], "{bytes:?}");
        assert_eq!(
            digest(&mut cs[1]).await,
            da,
            "the receiver holds the sender's weights"
        );
        assert_eq!(digest(&mut cs[0]).await, da, "the sender is unchanged");
    });
    drop((d0, d1));

    // A receiver with another layout (the small preset) refuses and keeps its weights.
    let c = model(&tmp.path().join("c"), 3, Preset::Small);
    let (d0, d1) = (daemon("w0"), daemon("w1"));
    rt.block_on(async {
        let mut cs = vec![client(&d0).await, client(&d1).await];
        generator(&mut cs[0], &a).await;
        generator(&mut cs[1], &c).await;
        let before = digest(&mut cs[1]).await;
        form(&mut cs, 78).await;
        let out = sync(&cs).await;
        let e = out[1].as_ref().unwrap_err();
        assert!(e.message().contains("another layout"), "{e:?}");
        assert_eq!(
            digest(&mut cs[1]).await,
            before,
            "a refused sync changes nothing"
        );
    });
}

#[test]
fn nccl_without_nccl_is_a_clear_error() {
    if rlhf_comm::nccl_available().is_ok() {
        eprintln!("SKIPPED: NCCL and a CUDA device are available here");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let a = model(&tmp.path().join("a"), 1, Preset::Tiny);
    let d = daemon("w0");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = client(&d).await;
        generator(&mut c, &a).await;
        let e = c
            .open_group(pb::OpenGroupRequest {
                role_id: "gen".into(),
                group_id: 1,
                backend: pb::CollectiveBackend::Nccl as i32,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("collective_backend: tcp"), "{e:?}");
        assert!(
            e.message().contains("lib"),
            "names the missing library: {e:?}"
        );
    });
}

#[test]
fn lora_generators_sync_the_adapters_only() {
    let tmp = tempfile::tempdir().unwrap();
    let a = model(&tmp.path().join("a"), 1, Preset::Tiny);
    let lora = || {
        Some(pb::LoraSpec {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "down_proj".into()],
        })
    };
    let (d0, d1) = (daemon("w0"), daemon("w1"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut cs = vec![client(&d0).await, client(&d1).await];
        // Same base files, adapters drawn from different seeds.
        generator_with(&mut cs[0], &a, 1, lora()).await;
        generator_with(&mut cs[1], &a, 2, lora()).await;
        let da = digest(&mut cs[0]).await;
        assert_ne!(
            digest(&mut cs[1]).await,
            da,
            "the digest covers the adapters"
        );
        form(&mut cs, 79).await;
        let out = sync(&cs).await;
        let r: Vec<pb::SyncWeightsResponse> = out.into_iter().map(|r| r.unwrap()).collect();
        // Tiny preset (hidden 64, intermediate 176, 2 layers), rank 2: q_proj 2 * (64 + 64)
        // and down_proj 2 * (176 + 64) f32 values per layer; 2 tensors each.
        let adapter_bytes = 2 * (2 * (64 + 64) + 2 * (176 + 64)) * 4;
        assert_eq!(r[0].bytes, adapter_bytes, "{r:?}");
        assert_eq!((r[1].bytes, r[0].tensors), (adapter_bytes, 8));
        assert_eq!(digest(&mut cs[1]).await, da, "base and adapters now equal");
    });
    drop((d0, d1));

    // A generator without the LoRA spec holds another layout: it refuses and keeps its weights.
    let (d0, d1) = (daemon("w0"), daemon("w1"));
    rt.block_on(async {
        let mut cs = vec![client(&d0).await, client(&d1).await];
        generator_with(&mut cs[0], &a, 1, lora()).await;
        generator(&mut cs[1], &a).await;
        let before = digest(&mut cs[1]).await;
        form(&mut cs, 80).await;
        let out = sync(&cs).await;
        let e = out[1].as_ref().unwrap_err();
        assert!(e.message().contains("another layout"), "{e:?}");
        assert_eq!(digest(&mut cs[1]).await, before);
    });
}
