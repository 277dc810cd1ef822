//! `models.reward.kind: command` through a real `rlhf-worker` daemon: CreateRole starts the
//! pool, Score sends each item with its prompt row's other columns (`extra_json`) and reads the
//! scores and components back; DestroyRole ends the processes, and so does SIGKILL of the worker
//! itself (`PR_SET_PDEATHSIG`): no reward process outlives its worker.

use std::path::Path;
use std::time::{Duration, Instant};

use rlhf_proto::auth::{AddToken, RunToken};
use rlhf_proto::pb::{self, worker_client::WorkerClient};
use rlhf_proto::wire::from_wire;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

mod common;
use common::TOKEN;

type Client = WorkerClient<InterceptedService<Channel, AddToken>>;

/// Answers `extra.x * 2` with a component, after recording its pid in `pids/`; at the end of
/// stdin it lingers, so only a kill ends it.
const SCRIPT: &str = r#"import json, os, sys, time
os.makedirs("pids", exist_ok=True)
open(os.path.join("pids", str(os.getpid())), "w").close()
for line in sys.stdin:
    row = json.loads(line)
    x = row["extra"]["x"]
    print(json.dumps({"score": 2 * x, "echo": len(row["response"])}), flush=True)
time.sleep(600)
"#;

fn create(id: &str, dir: &Path) -> pb::CreateRoleRequest {
    pb::CreateRoleRequest {
        role_id: id.into(),
        kind: pb::RoleKind::Reward as i32,
        model_path: String::new(),
        device: "cpu".into(),
        dtype: "f32".into(),
        seed: 1,
        spec: Some(pb::create_role_request::Spec::Reward(pb::RewardRoleSpec {
            kind: Some(pb::reward_role_spec::Kind::Command(pb::CommandReward {
                command: vec!["python3".into(), "reward.py".into()],
                workdir: dir.display().to_string(),
                timeout_s: 30.0,
                concurrency: 3,
            })),
        })),
    }
}

fn items(n: usize) -> Vec<pb::ScoreItem> {
    (0..n)
        .map(|i| pb::ScoreItem {
            prompt: vec![pb::ChatMessage {
                role: "user".into(),
                content: format!("{i}+1="),
            }],
            response: "r".repeat(i),
            answer: String::new(),
            extra_json: format!("{{\"x\": {i}}}"),
        })
        .collect()
}

/// The pids the pool's processes recorded (all starts so far).
fn pids(dir: &Path) -> Vec<i32> {
    std::fs::read_dir(dir.join("pids"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.to_string()))
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

fn wait_gone(pids: &[i32], what: &str) {
    let t = Instant::now();
    while pids.iter().any(|&p| running(p)) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "reward processes {pids:?} outlived {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn client(addr: &str) -> Client {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    WorkerClient::with_interceptor(ch, AddToken(RunToken::new(TOKEN.into()).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_pool_scores_through_the_daemon_and_dies_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("reward.py"), SCRIPT).unwrap();
    let (mut child, addr) = common::spawn_daemon("command", 60);
    let mut c = client(&addr).await;

    let info = c.create_role(create("r", dir)).await.unwrap().into_inner();
    assert_eq!(info.attribute_names, ["command"], "{info:?}");
    let s = c
        .score(pb::ScoreRequest {
            role_id: "r".into(),
            items: items(40),
        })
        .await
        .unwrap()
        .into_inner();
    let rewards =
        Vec::<f32>::try_from(&from_wire("rewards", s.rewards.as_ref().unwrap()).unwrap()).unwrap();
    assert_eq!(rewards, (0..40).map(|i| 2.0 * i as f32).collect::<Vec<_>>());
    assert_eq!(s.attribute_names, ["echo"]);
    let echo = from_wire("attributes", s.attributes.as_ref().unwrap()).unwrap();
    assert_eq!(echo.size(), [40, 1]);
    assert_eq!(echo.double_value(&[39, 0]), 39.0);

    // DestroyRole drops the pool: its three processes are killed and reaped.
    let first = pids(dir);
    assert_eq!(first.len(), 3, "{first:?}");
    c.destroy_role(pb::RoleRef {
        role_id: "r".into(),
    })
    .await
    .unwrap();
    wait_gone(&first, "DestroyRole");

    // A worker killed outright takes its reward processes with it.
    c.create_role(create("r2", dir)).await.unwrap();
    // The processes record themselves once Python has started.
    let t = Instant::now();
    let second = loop {
        let new: Vec<i32> = pids(dir)
            .into_iter()
            .filter(|p| !first.contains(p))
            .collect();
        if new.len() == 3 || t.elapsed() > Duration::from_secs(10) {
            break new;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(second.len(), 3, "{second:?}");
    assert!(second.iter().all(|&p| running(p)));
    child.kill().unwrap();
    child.wait().unwrap();
    wait_gone(&second, "SIGKILL of their worker");
}
