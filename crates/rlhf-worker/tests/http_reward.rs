//! `models.reward.kind: http` against real reward servers: scripts/reward_server_example.py
//! (through `reward_server_faults.py`, which adds faults) started by each test on a free
//! loopback port. Scores come back in row order with their components across several requests
//! in flight at once; a server that is down, slow (always, or only on the first attempt),
//! answering 500 (once, or always), malformed JSON or the wrong number of scores ends as a
//! retry that succeeds or as an error naming the URL, the rows and what the server said. One
//! test goes through a real daemon over gRPC (CreateRole, Score).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rlhf_model::ChatMessage;
use rlhf_worker::external_rewards::http::HttpSpec;
use rlhf_worker::external_rewards::{External, ExternalSpec};
use rlhf_worker::roles::{ScoreItem, Scores};
use serde_json::{json, Value};

mod common;

/// A child process, killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A reward server process and the URL it serves the reward at.
struct Server {
    _process: Process,
    url: String,
}

impl Server {
    /// `reward_server_faults.py --fault FAULT --delay DELAY` on a port the OS picks.
    fn start(fault: &str, delay: f64) -> Server {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reward_server_faults.py");
        let mut child = Command::new(common::python())
            .arg(&script)
            .args([
                "--port",
                "0",
                "--fault",
                fault,
                "--delay",
                &delay.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", common::python().display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the server said {line:?}"))
            .trim()
            .to_string();
        Server {
            _process: Process(child),
            url: format!("{base}score"),
        }
    }

    /// What the server saw: requests, the most in flight at once, the rows of each.
    fn stats(&self) -> Value {
        let base = self.url.trim_end_matches("score");
        let text = ureq::get(format!("{base}stats"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

fn spec(
    url: &str,
    batch_size: usize,
    concurrency: usize,
    retries: u32,
    timeout_s: f64,
) -> ExternalSpec {
    ExternalSpec::Http(HttpSpec {
        url: url.into(),
        timeout: Duration::from_secs_f64(timeout_s),
        retries,
        concurrency,
        batch_size,
    })
}

/// Row `i` asks for `i + i`; even rows answer it right, odd rows one more. The responses are
/// `10 + i` characters long or so, past the `max_chars: 12` of `extra` from row 3 on.
fn items(n: usize) -> Vec<ScoreItem> {
    (0..n)
        .map(|i| {
            let sum = 2 * i + i % 2;
            ScoreItem {
                prompt: vec![ChatMessage::new("user", &format!("{i}+{i}="))],
                response: format!("it is {}{sum}", "x".repeat(i)),
                answer: (2 * i).to_string(),
                extra: json!({"max_chars": 12}).as_object().unwrap().clone(),
            }
        })
        .collect()
}

/// The example server's scores of [`items`]: (reward, correct, length_penalty) per row.
fn expected(items: &[ScoreItem]) -> Vec<(f32, f32, f32)> {
    items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let correct = if i % 2 == 0 { 1.0 } else { 0.0 };
            let penalty = -0.001 * (it.response.len() as f64 - 12.0).max(0.0);
            ((correct + penalty) as f32, correct as f32, penalty as f32)
        })
        .collect()
}

fn score(spec: &ExternalSpec, items: &[ScoreItem]) -> Result<Scores, String> {
    let mut ext = External::start(spec).map_err(|e| e.to_string())?;
    ext.score(items).map_err(|e| e.to_string())
}

fn assert_scores(s: &Scores, items: &[ScoreItem]) {
    assert_eq!(s.attribute_names, ["correct", "length_penalty"]);
    let rewards = Vec::<f32>::try_from(&s.rewards).unwrap();
    let attrs = Vec::<f32>::try_from(&s.attributes.as_ref().unwrap().reshape([-1])).unwrap();
    for (i, (r, c, p)) in expected(items).into_iter().enumerate() {
        assert!(
            (rewards[i] - r).abs() < 1e-6,
            "row {i}: {} != {r}",
            rewards[i]
        );
        assert_eq!([attrs[2 * i], attrs[2 * i + 1]], [c, p], "row {i}");
    }
}

/// A loopback URL nothing listens on.
fn nobody_listening() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/score")
}

#[test]
fn scores_come_back_in_row_order_across_concurrent_batches() {
    // Each request takes 0.2 s, so the four requests of 3, 3, 3 and 1 rows overlap two at a
    // time, and no more.
    let server = Server::start("none", 0.2);
    let rows = items(10);
    let s = score(&spec(&server.url, 3, 2, 0, 5.0), &rows).unwrap();
    assert_scores(&s, &rows);
    let stats = server.stats();
    assert_eq!(stats["requests"], 4, "{stats}");
    assert_eq!(stats["max_in_flight"], 2, "{stats}");
    let mut sizes: Vec<u64> = stats["batch_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    sizes.sort();
    assert_eq!(sizes, [1, 3, 3, 3]);
    // One request carrying every row.
    let s = score(&spec(&server.url, 64, 4, 0, 5.0), &rows).unwrap();
    assert_scores(&s, &rows);
    assert_eq!(server.stats()["requests"], 5);
}

#[test]
fn a_server_that_is_down_fails_after_the_retries_naming_the_url() {
    let url = nobody_listening();
    let t = Instant::now();
    let e = score(&spec(&url, 4, 2, 1, 0.3), &items(6)).unwrap_err();
    assert!(
        e.starts_with(&format!(
            "models.reward.kind http: POST {url} (rows 0 to 3) failed after 2 attempts"
        )),
        "{e}"
    );
    assert!(e.contains("is the reward server running"), "{e}");
    // One backoff of 0.5 s (plus jitter) between the two attempts.
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn a_slow_server_times_out_and_one_slow_only_once_succeeds_on_the_retry() {
    let server = Server::start("slow", 2.0);
    let e = score(&spec(&server.url, 8, 1, 1, 0.3), &items(3)).unwrap_err();
    assert!(
        e.contains(&format!(
            "POST {} (rows 0 to 2) failed after 2 attempts",
            server.url
        )) && e.contains("no answer within 0.3 s (models.reward.timeout_s)"),
        "{e}"
    );
    assert_eq!(server.stats()["requests"], 2);

    let server = Server::start("slow-first", 2.0);
    let rows = items(3);
    let s = score(&spec(&server.url, 8, 1, 1, 0.3), &rows).unwrap();
    assert_scores(&s, &rows);
    assert_eq!(server.stats()["requests"], 2);
}

#[test]
fn a_500_is_retried_and_one_that_persists_is_quoted() {
    let server = Server::start("500-first", 0.0);
    let rows = items(5);
    let s = score(&spec(&server.url, 8, 1, 1, 5.0), &rows).unwrap();
    assert_scores(&s, &rows);
    assert_eq!(server.stats()["requests"], 2);

    let server = Server::start("500", 0.0);
    let e = score(&spec(&server.url, 2, 1, 2, 5.0), &items(5)).unwrap_err();
    assert!(
        e.contains(&format!(
            "POST {} (rows 0 to 1) failed after 3 attempts",
            server.url
        )) && e.contains("HTTP 500 Internal Server Error: reward backend exploded"),
        "{e}"
    );
    // The failed request's retries, and no other request started after it failed.
    assert_eq!(server.stats()["requests"], 3);
}

#[test]
fn malformed_answers_and_wrong_counts_fail_at_once_naming_the_rows() {
    let server = Server::start("malformed", 0.0);
    let e = score(&spec(&server.url, 4, 1, 2, 5.0), &items(2)).unwrap_err();
    assert!(
        e.contains(&format!(
            "POST {} (rows 0 to 1) failed on the first attempt",
            server.url
        )) && e.contains("the answer is not JSON")
            && e.contains(r#"it was {"scores": [1, 2"#),
        "{e}"
    );
    assert_eq!(server.stats()["requests"], 1, "not retried");

    let server = Server::start("short", 0.0);
    let e = score(&spec(&server.url, 4, 1, 2, 5.0), &items(1)).unwrap_err();
    assert!(
        e.contains("(row 0) failed on the first attempt: the answer has 0 scores for 1 row;"),
        "{e}"
    );
    let e = score(&spec(&server.url, 4, 1, 2, 5.0), &items(6)).unwrap_err();
    assert!(
        e.contains("(rows 0 to 3) failed on the first attempt: the answer has 3 scores for 4 rows"),
        "{e}"
    );
}

/// Through a real daemon: CreateRole with the http spec, Score items carrying `extra_json`; a
/// server gone between steps makes Score `Unavailable` with the message naming the URL.
#[tokio::test]
async fn a_daemon_scores_through_the_server_and_reports_its_failure() {
    use rlhf_proto::auth::{AddToken, RunToken};
    use rlhf_proto::pb::{self, worker_client::WorkerClient};
    use rlhf_proto::wire::from_wire;

    let server = Server::start("none", 0.0);
    let (child, addr) = common::spawn_daemon("http-reward", 60);
    let _daemon = Process(child);
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c =
        WorkerClient::with_interceptor(ch, AddToken(RunToken::new(common::TOKEN.into()).unwrap()));
    c.create_role(pb::CreateRoleRequest {
        role_id: "rw".into(),
        kind: pb::RoleKind::Reward as i32,
        model_path: String::new(),
        device: "cpu".into(),
        dtype: "f32".into(),
        seed: 1,
        spec: Some(pb::create_role_request::Spec::Reward(pb::RewardRoleSpec {
            kind: Some(pb::reward_role_spec::Kind::Http(pb::HttpReward {
                url: server.url.clone(),
                timeout_s: 5.0,
                retries: 0,
                concurrency: 2,
                batch_size: 2,
            })),
        })),
    })
    .await
    .unwrap();
    let rows = items(5);
    let request = || pb::ScoreRequest {
        role_id: "rw".into(),
        items: rows
            .iter()
            .map(|it| pb::ScoreItem {
                prompt: it
                    .prompt
                    .iter()
                    .map(|m| pb::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
                response: it.response.clone(),
                answer: it.answer.clone(),
                extra_json: Value::Object(it.extra.clone()).to_string(),
            })
            .collect(),
    };
    let r = c.score(request()).await.unwrap().into_inner();
    let scores = Scores {
        rewards: from_wire("rewards", r.rewards.as_ref().unwrap()).unwrap(),
        attributes: Some(from_wire("attributes", r.attributes.as_ref().unwrap()).unwrap()),
        attribute_names: r.attribute_names,
    };
    assert_scores(&scores, &rows);

    let url = server.url.clone();
    drop(server);
    let status = c.score(request()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with(&format!(
            "models.reward.kind http: POST {url} (rows 0 to 1) failed on the first attempt"
        )),
        "{status:?}"
    );
}
