//! The HTTP judge against a real OpenAI-compatible server on loopback: a deterministic judge
//! that grades all 160 (question, turn) items of the shared MT-Bench data, and a faulty one
//! (garbage, timeouts, 5xx, dropped connections, unrateable text, wrong key, nobody listening)
//! whose failures must be counted as missing while validation still completes in bounded time.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use rlhf_eval::{
    judge_items, validate, HttpJudge, HttpJudgeConfig, Judge, ModelAnswer, MtBench, Outcome,
    Report, Turn,
};
use serde_json::{json, Value};

const GOOD_KEY_VAR: &str = "RLHF_EVAL_HTTP_TEST_GOOD_KEY";
const WRONG_KEY_VAR: &str = "RLHF_EVAL_HTTP_TEST_WRONG_KEY";
const GOOD_KEY: &str = "sk-test-3f9a1c";
const MODEL: &str = "judge-model";

/// Sets the key variables once, before any test reads the environment (every test calls this
/// first, so no thread reads the environment while it is written).
fn init_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var(GOOD_KEY_VAR, GOOD_KEY);
        std::env::set_var(WRONG_KEY_VAR, "sk-not-the-key");
    });
}

/// MT-Bench's files from `RLHF_MT_BENCH_DIR` or `shared/data/mt_bench` beside the repository,
/// else (a fresh clone) the fixture of the same shape: the tests run either way.
fn data_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("http_judge_mt_bench");
        rlhf_eval::fixture::shared_or_fixture(&scratch).unwrap()
    })
    .clone()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Short fake answers whose text names the question and turn, with lengths that vary.
fn fake_answers(bench: &MtBench) -> Vec<ModelAnswer> {
    let a1 = bench
        .questions()
        .iter()
        .map(|q| {
            format!(
                "q{}-t1 {}",
                q.question_id,
                "x".repeat(q.question_id as usize % 7)
            )
        })
        .collect();
    let a2 = bench
        .questions()
        .iter()
        .map(|q| {
            format!(
                "q{}-t2 {}",
                q.question_id,
                "y".repeat(q.question_id as usize % 5)
            )
        })
        .collect();
    bench.model_answers("fake-policy", a1, a2).unwrap()
}

/// What the fake judge gives an answer: 1 + its length mod 10.
fn expected_rating(answer: &str) -> f64 {
    (answer.len() % 10 + 1) as f64
}

/// System prompts by judge-prompt name, read straight from the file (not through the crate).
fn system_prompts(dir: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(dir.join("judge_prompts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["name"].as_str().unwrap().to_owned(),
                v["system_prompt"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A request as the fake judge understood it.
struct Seen {
    question_id: u64,
    answer: String,
    with_reference: bool,
    multi_turn: bool,
    /// How many requests for this (question, turn) arrived so far, this one included.
    attempt: usize,
}

enum Reply {
    /// 200 with this chat-completion content.
    Content(String),
    /// This status and raw body.
    Raw(u16, String),
    /// Sleep this long, then close without answering.
    Hang(Duration),
    /// Close the connection without answering.
    Drop,
}

type Behaviour = dyn Fn(&Seen) -> Reply + Send + Sync;

/// What the fake judge counts.
#[derive(Default)]
struct Counters {
    /// Requests per (question, turn); (0, 0) counts rejected keys.
    attempts: Mutex<HashMap<(u64, u8), usize>>,
    /// Requests being answered right now, and the most there ever were.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

struct FakeJudge {
    addr: SocketAddr,
    counters: Arc<Counters>,
}

impl FakeJudge {
    fn start(data: &Path, behaviour: Box<Behaviour>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let ctx = Arc::new((system_prompts(data), behaviour, Arc::clone(&counters)));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let ctx = Arc::clone(&ctx);
                std::thread::spawn(move || {
                    let (prompts, behaviour, counters) = &*ctx;
                    serve(stream, prompts, behaviour.as_ref(), counters);
                });
            }
        });
        Self { addr, counters }
    }

    fn config(&self, key_var: Option<&str>, timeout: Duration) -> HttpJudgeConfig {
        let mut c = HttpJudgeConfig::new(format!("http://{}/v1", self.addr), MODEL);
        c.api_key_env = key_var.map(str::to_owned);
        c.timeout = timeout;
        c.max_concurrency = 8;
        c
    }

    fn attempts(&self, question_id: u64, turn: u8) -> usize {
        self.counters
            .attempts
            .lock()
            .unwrap()
            .get(&(question_id, turn))
            .copied()
            .unwrap_or(0)
    }
}

fn respond(stream: &mut TcpStream, status: u16, body: &str) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Other",
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

/// Handles one request on one connection: checks it is a well-formed MT-Bench judge request and
/// answers as `behaviour` says. Protocol problems get a 4xx whose body says what was wrong, which
/// the judge records as the failure reason.
fn serve(
    mut stream: TcpStream,
    system_prompts: &HashMap<String, String>,
    behaviour: &Behaviour,
    counters: &Counters,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }

    if request_line.trim_end() != "POST /v1/chat/completions HTTP/1.1" {
        return respond(
            &mut stream,
            404,
            &json!({"error": request_line.trim_end()}).to_string(),
        );
    }
    if headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {GOOD_KEY}")) {
        // Counted under (0, 0): no real question has id 0.
        *counters.attempts.lock().unwrap().entry((0, 0)).or_insert(0) += 1;
        return respond(&mut stream, 401, r#"{"error":"invalid api key"}"#);
    }
    let seen = match check_request(&body, system_prompts) {
        Ok(s) => s,
        Err(why) => return respond(&mut stream, 400, &json!({ "error": why }).to_string()),
    };
    let attempt = {
        let mut a = counters.attempts.lock().unwrap();
        let n = a.entry((seen.0, seen.1)).or_insert(0);
        *n += 1;
        *n
    };
    let seen = Seen {
        question_id: seen.0,
        answer: seen.2,
        with_reference: seen.3,
        multi_turn: seen.4,
        attempt,
    };
    let now = counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    counters.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let reply = behaviour(&seen);
    if let Reply::Hang(d) = reply {
        std::thread::sleep(d);
    }
    // The request leaves the count before its answer is written: once the client has the
    // answer it may send its next request, which must not find this one still counted (under
    // load that race read as 9 requests at once with a limit of 8).
    counters.in_flight.fetch_sub(1, Ordering::SeqCst);
    match reply {
        Reply::Content(text) => {
            let body = json!({
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "model": MODEL,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop"
                }]
            });
            respond(&mut stream, 200, &body.to_string());
        }
        Reply::Raw(status, body) => respond(&mut stream, status, &body),
        Reply::Hang(_) | Reply::Drop => {}
    }
}

/// `(question_id, turn, graded answer, has reference, multi-turn)` from a request body, after
/// checking the fields FastChat sends.
fn check_request(
    body: &[u8],
    system_prompts: &HashMap<String, String>,
) -> Result<(u64, u8, String, bool, bool), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    if v["model"] != MODEL {
        return Err(format!("model {}", v["model"]));
    }
    if v["temperature"].as_f64() != Some(0.0) || v["max_tokens"].as_u64() != Some(2048) {
        return Err(format!(
            "temperature {} max_tokens {}",
            v["temperature"], v["max_tokens"]
        ));
    }
    let messages = v["messages"].as_array().ok_or("no messages")?;
    let [system, user] = messages.as_slice() else {
        return Err(format!(
            "{} messages, expected system + user",
            messages.len()
        ));
    };
    if system["role"] != "system" || user["role"] != "user" {
        return Err("roles are not system, user".into());
    }
    let user = user["content"]
        .as_str()
        .ok_or("user content is not a string")?;
    let with_reference = user.contains("Reference Answer");
    let multi_turn = user.contains("<|The Start of Assistant A's Conversation with User|>");
    let answer = if multi_turn {
        let end = "\n\n<|The End of Assistant A's Conversation with User|>";
        let before = &user[..user.rfind(end).ok_or("no end of conversation")?];
        let start = before
            .rfind("### Assistant A:\n")
            .ok_or("no second answer")?;
        before[start + "### Assistant A:\n".len()..].to_owned()
    } else {
        let start = "[The Start of Assistant's Answer]\n";
        let s = user.find(start).ok_or("no answer start")? + start.len();
        let e = user
            .find("\n[The End of Assistant's Answer]")
            .ok_or("no answer end")?;
        user[s..e].to_owned()
    };
    let name = match (with_reference, multi_turn) {
        (false, false) => "single-v1",
        (false, true) => "single-v1-multi-turn",
        (true, false) => "single-math-v1",
        (true, true) => "single-math-v1-multi-turn",
    };
    if system["content"].as_str() != system_prompts.get(name).map(String::as_str) {
        return Err(format!("system prompt is not {name}'s"));
    }
    // The fake answers start with "q{id}-t{turn} ".
    let tag = answer.split(' ').next().unwrap_or_default();
    let (id, turn) = tag
        .strip_prefix('q')
        .and_then(|t| t.split_once("-t"))
        .ok_or_else(|| format!("graded answer {answer:?} is not a fake answer"))?;
    let id: u64 = id.parse().map_err(|_| format!("bad id in {answer:?}"))?;
    let turn: u8 = turn
        .parse()
        .map_err(|_| format!("bad turn in {answer:?}"))?;
    if (turn == 2) != multi_turn {
        return Err(format!("turn-{turn} answer graded with {name}"));
    }
    Ok((id, turn, answer, with_reference, multi_turn))
}

fn honest(seen: &Seen) -> Reply {
    Reply::Content(format!(
        "ref={} multi={} The answer is fine.\n\nRating: [[{}]]",
        seen.with_reference,
        seen.multi_turn,
        expected_rating(&seen.answer)
    ))
}

fn needs_ref(category: &str) -> bool {
    matches!(category, "math" | "reasoning" | "coding")
}

fn approx(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-9)
}

#[test]
fn judges_all_160_items_and_reports_the_expected_scores() {
    init_env();
    let dir = data_dir();
    let bench = MtBench::load(&dir).unwrap();
    // A little thinking time per request makes overlapping requests observable.
    let server = FakeJudge::start(
        &dir,
        Box::new(|seen: &Seen| {
            std::thread::sleep(Duration::from_millis(20));
            honest(seen)
        }),
    );
    let judge = HttpJudge::new(
        server.config(Some(GOOD_KEY_VAR), Duration::from_secs(20)),
        bench.judge_prompts(),
    )
    .unwrap();
    let answers = fake_answers(&bench);

    let v = runtime()
        .block_on(validate(&bench, &judge, answers.clone()))
        .unwrap();

    // Expected numbers, computed from the answers alone.
    let mut all = Vec::new();
    let mut by_turn: BTreeMap<u8, Vec<f64>> = BTreeMap::new();
    let mut by_cat: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for a in &answers {
        for (t, text) in a.turns.iter().enumerate() {
            let r = expected_rating(text);
            all.push(r);
            by_turn.entry(t as u8 + 1).or_default().push(r);
            by_cat.entry(a.category.clone()).or_default().push(r);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let r = &v.report;
    assert_eq!((r.judged, r.missing, r.unparseable), (160, 0, 0), "{r:?}");
    assert!(approx(r.overall, mean(&all)), "{r:?}");
    assert!(approx(r.turn1, mean(&by_turn[&1])), "{r:?}");
    assert!(approx(r.turn2, mean(&by_turn[&2])), "{r:?}");
    assert_eq!(r.per_category.len(), 8);
    for (cat, ratings) in &by_cat {
        assert!(approx(r.per_category[cat], mean(ratings)), "{cat}: {r:?}");
    }
    // The scores must not be trivially flat, or the check above would prove little.
    assert!(r.turn1 != r.turn2, "{r:?}");

    assert_eq!(v.judgments.len(), 160);
    for j in &v.judgments {
        assert_eq!(j.outcome, Outcome::Rated, "{j:?}");
        let out = j.judge_output.as_deref().unwrap();
        assert!(
            out.contains(&format!("ref={}", needs_ref(&j.category))),
            "{j:?}"
        );
        assert!(
            out.contains(&format!("multi={}", j.turn == Turn::Second)),
            "{j:?}"
        );
        let prompt = match (needs_ref(&j.category), j.turn) {
            (false, Turn::First) => "single-v1",
            (false, Turn::Second) => "single-v1-multi-turn",
            (true, Turn::First) => "single-math-v1",
            (true, Turn::Second) => "single-math-v1-multi-turn",
        };
        assert_eq!(j.judge, format!("{MODEL}/{prompt}"));
        assert_eq!(server.attempts(j.question_id, j.turn.number()), 1, "{j:?}");
    }

    let max_in_flight = server.counters.max_in_flight.load(Ordering::SeqCst);
    assert!(
        max_in_flight <= 8,
        "{max_in_flight} requests at once, limit 8"
    );

    // The saved directory holds the same numbers.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("validation/step-000004");
    v.save(&out).unwrap();
    assert_eq!(Report::read(&out).unwrap(), v.report);
    let lines = std::fs::read_to_string(out.join("judgments.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 160);
}

/// Misbehaviour by `question_id % 10`; each residue covers 8 questions, so 16 items.
fn faulty(seen: &Seen) -> Reply {
    match seen.question_id % 10 {
        1 => Reply::Raw(200, "<html>this is not a chat completion</html>".into()),
        2 => Reply::Hang(Duration::from_secs(60)),
        3 => Reply::Raw(500, r#"{"error":"judge exploded"}"#.into()),
        4 => Reply::Content("I would rather not say.".into()),
        5 if seen.attempt == 1 => Reply::Raw(503, r#"{"error":"busy"}"#.into()),
        6 => Reply::Content("Rating: [[11]]".into()),
        7 if seen.attempt == 1 => Reply::Drop,
        _ => honest(seen),
    }
}

#[test]
fn faulty_judge_gives_missing_ratings_with_reasons_in_bounded_time() {
    init_env();
    let dir = data_dir();
    let bench = MtBench::load(&dir).unwrap();
    let server = FakeJudge::start(&dir, Box::new(faulty));
    let timeout = Duration::from_secs(1);
    let mut config = server.config(Some(GOOD_KEY_VAR), timeout);
    config.max_concurrency = 16;
    let judge = HttpJudge::new(config, bench.judge_prompts()).unwrap();
    let answers = fake_answers(&bench);

    let started = Instant::now();
    let v = runtime()
        .block_on(validate(&bench, &judge, answers.clone()))
        .unwrap();
    let elapsed = started.elapsed();
    // Permit time: 16 hanging items x 2.5 s (two 1 s timeouts and the 0.5 s retry pause) plus
    // 48 retried items x 0.5 s, 16 at a time: about 4 s. Without working timeouts each hanging
    // item alone would take 60 s.
    assert!(elapsed < Duration::from_secs(25), "took {elapsed:?}");

    let r = &v.report;
    assert_eq!((r.judged, r.missing, r.unparseable), (80, 80, 32), "{r:?}");

    let mut rated = Vec::new();
    for (j, a) in v
        .judgments
        .iter()
        .zip(answers.iter().flat_map(|a| [&a.turns[0], &a.turns[1]]))
    {
        let attempts = server.attempts(j.question_id, j.turn.number());
        let error = j.error.as_deref().unwrap_or_default();
        let what = format!("{j:?} attempts={attempts}");
        match j.question_id % 10 {
            1 => {
                assert_eq!(j.outcome, Outcome::Failed, "{what}");
                assert!(
                    error.contains("not JSON") && error.contains("<html>"),
                    "{what}"
                );
                assert_eq!(attempts, 1, "garbage is not retried: {what}");
            }
            2 => {
                assert_eq!(j.outcome, Outcome::Failed, "{what}");
                assert!(error.contains("no response within 1s"), "{what}");
                assert!(error.contains("on both attempts"), "{what}");
                assert_eq!(attempts, 2, "a timeout is retried once: {what}");
            }
            3 => {
                assert_eq!(j.outcome, Outcome::Failed, "{what}");
                assert!(
                    error.contains("HTTP 500") && error.contains("judge exploded"),
                    "{what}"
                );
                assert_eq!(attempts, 2, "a 5xx is retried once: {what}");
            }
            4 => {
                assert_eq!(j.outcome, Outcome::Unparseable, "{what}");
                assert!(error.contains("no [[rating]]"), "{what}");
                assert_eq!(j.judge_output.as_deref(), Some("I would rather not say."));
            }
            6 => {
                assert_eq!(j.outcome, Outcome::Unparseable, "{what}");
                assert!(error.contains("outside 1..10"), "{what}");
            }
            residue => {
                assert_eq!(j.outcome, Outcome::Rated, "{what}");
                assert_eq!(j.rating, Some(expected_rating(a)), "{what}");
                let expected_attempts = if residue == 5 || residue == 7 { 2 } else { 1 };
                assert_eq!(attempts, expected_attempts, "{what}");
                rated.push(expected_rating(a));
            }
        }
    }
    let mean = rated.iter().sum::<f64>() / rated.len() as f64;
    assert!(approx(r.overall, mean), "{r:?}");
}

#[test]
fn wrong_key_is_a_reasoned_failure_without_retry() {
    init_env();
    let dir = data_dir();
    let bench = MtBench::load(&dir).unwrap();
    let server = FakeJudge::start(&dir, Box::new(honest));
    let judge = HttpJudge::new(
        server.config(Some(WRONG_KEY_VAR), Duration::from_secs(10)),
        bench.judge_prompts(),
    )
    .unwrap();
    let answers = fake_answers(&bench);
    let items = judge_items(&bench, &answers).unwrap();
    let js = runtime().block_on(judge.judge(&items[..6]));
    assert_eq!(js.len(), 6);
    for j in &js {
        assert_eq!(j.outcome, Outcome::Failed, "{j:?}");
        let e = j.error.as_deref().unwrap();
        assert!(
            e.contains("HTTP 401") && e.contains("invalid api key"),
            "{j:?}"
        );
        assert!(
            !e.contains("sk-not-the-key"),
            "the key leaked into a reason: {e}"
        );
        assert_eq!(server.attempts(j.question_id, j.turn.number()), 0);
    }
    assert_eq!(server.attempts(0, 0), 6, "a 401 is not retried");
    assert!(!format!("{judge:?}").contains("sk-not-the-key"));
}

#[test]
fn nobody_listening_fails_fast_after_one_retry() {
    init_env();
    let dir = data_dir();
    let bench = MtBench::load(&dir).unwrap();
    // A port that was just free: connections to it are refused.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = HttpJudgeConfig::new(format!("http://{addr}/v1"), MODEL);
    config.timeout = Duration::from_secs(5);
    let judge = HttpJudge::new(config, bench.judge_prompts()).unwrap();
    let answers = fake_answers(&bench);
    let items = judge_items(&bench, &answers).unwrap();

    let started = Instant::now();
    let js = runtime().block_on(judge.judge(&items[..16]));
    // 16 refused connections, 8 at a time, each retried once after 0.5 s: about 1 s.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let report = Report::from_judgments(&js);
    assert_eq!(report.overall, None);
    assert_eq!(
        (report.judged, report.missing, report.unparseable),
        (0, 16, 0)
    );
    let e = js[0].error.as_deref().unwrap();
    assert!(
        e.contains("connection to") && e.contains("on both attempts"),
        "{e}"
    );
}
