//! `models.reward.kind: http`: batches of rows POSTed to the user's reward server.
//!
//! A Score call's rows are cut into requests of `batch_size` rows, each POSTed as
//! `{"rows": [row, ...]}` (Content-Type `application/json`); the server answers
//! `{"scores": [answer, ...]}` (or the bare list), one answer per row in the request's order.
//! At most `concurrency` requests are in flight, on scoped threads with a blocking `ureq` agent
//! (the role runs on its own OS thread, so blocking here stalls nothing else). A request that
//! times out, cannot connect, loses its connection, or is answered 429 or 5xx is retried up to
//! `retries` more times after 0.5 s, 1 s, 2 s, ... (plus up to a tenth more at random, so that
//! many workers do not come back at once); any other status and a malformed answer fail at
//! once, since sending the same rows again would get the same answer.
//!
//! **Boundary:** the server is outside the run. Every way it can fail ends as one
//! [`RoleError::Reward`] naming the URL, the rows of the failed request (their index in the
//! Score call), the attempts made, and a bounded quote of what the server said.
//!
//! https:// URLs need the crate's `https` feature (rustls on `ring`, as rlhf-eval's judge: about
//! a minute and a half more of clean build, so test builds leave it out); without it they are
//! refused when the role is created, saying how to build with it.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::error::{RoleError, RoleResult};

/// `RewardRoleSpec.http`, checked.
#[derive(Debug, Clone)]
pub struct HttpSpec {
    pub url: String,
    /// One request's limit.
    pub timeout: Duration,
    /// Further attempts after a failed request.
    pub retries: u32,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Rows per request.
    pub batch_size: usize,
}

/// The pause before the first retry; each further one doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// No pause is longer than this, however many retries the run file allows.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How much of a server's answer an error quotes.
const QUOTE_CHARS: usize = 300;

/// The reward server's client: one agent (its connection pool shared by the request threads).
pub struct HttpReward {
    spec: HttpSpec,
    agent: ureq::Agent,
}

/// The body of one request.
#[derive(Serialize)]
struct Request<'a> {
    rows: &'a [Value],
}

/// One request's answers, or the error that names it.
type Outcome = Result<Vec<Value>, String>;

/// How one attempt went wrong, and whether another may help.
enum Failure {
    /// Timeout, connection refused or dropped, 429, 5xx.
    Transient(String),
    /// Any other status, or an answer that is not one score per row: the same rows would get
    /// the same answer.
    Permanent(String),
}

impl HttpReward {
    /// Checks the URL and builds the client; connects to nothing yet.
    pub fn new(spec: HttpSpec) -> RoleResult<HttpReward> {
        let bad = |msg: String| RoleError::bad("spec.reward.http.url", msg);
        let https = spec.url.starts_with("https://");
        if !(https || spec.url.starts_with("http://")) {
            return Err(bad(format!(
                "`{}` must start with http:// or https://",
                spec.url
            )));
        }
        if https && !cfg!(feature = "https") {
            return Err(bad(format!(
                "`{}` is https, but this rlhf-worker was built without its `https` feature; \
                 build it with `cargo build --release -p rlhf-worker --features https`, or \
                 serve the reward on plain http:// (a server on the worker's own host or \
                 network)",
                spec.url
            )));
        }
        let uri: ureq::http::Uri = spec
            .url
            .parse()
            .map_err(|e| bad(format!("`{}` is not a URL: {e}", spec.url)))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad(format!("`{}` names no host", spec.url)));
        }
        let agent = ureq::Agent::config_builder()
            // Connecting through reading the whole answer.
            .timeout_global(Some(spec.timeout))
            // Non-2xx answers come back as answers, so their status and body can be quoted.
            .http_status_as_error(false)
            // One kept-alive connection per request thread.
            .max_idle_connections_per_host(spec.concurrency)
            .user_agent(concat!("rlhf-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(HttpReward { spec, agent })
    }

    /// One answer per row, in order.
    pub fn score_rows(&mut self, rows: &[Value]) -> RoleResult<Vec<Value>> {
        let size = self.spec.batch_size.max(1);
        let requests: Vec<(usize, usize)> = (0..rows.len())
            .step_by(size)
            .map(|start| (start, (start + size).min(rows.len())))
            .collect();
        let results: Vec<Mutex<Option<Outcome>>> =
            requests.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        // Set by the first request that fails for good: the others take no new rows and make no
        // more attempts, since the call fails anyway.
        let failed = AtomicBool::new(false);
        let threads = self.spec.concurrency.clamp(1, requests.len().max(1));
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(start, end)) = requests.get(i) else {
                        return;
                    };
                    let result = self.post_with_retries(&rows[start..end], start, &failed);
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(result);
                    }
                });
            }
        });
        let mut answers = Vec::with_capacity(rows.len());
        for (slot, &(start, end)) in results.into_iter().zip(&requests) {
            match slot.into_inner().ok().flatten() {
                Some(Ok(mut a)) => answers.append(&mut a),
                Some(Err(e)) => return Err(RoleError::Reward(e)),
                // Not sent because another request had failed: that one's error comes later in
                // row order (the lower ones succeeded).
                None if failed.load(Ordering::Relaxed) => continue,
                None => {
                    return Err(RoleError::Reward(format!(
                        "models.reward.kind http: POST {} ({}): no answer was recorded",
                        self.spec.url,
                        rows_label(start, end)
                    )))
                }
            }
        }
        Ok(answers)
    }

    /// One request's answers, after at most `1 + retries` attempts; the error names the URL, the
    /// rows and the attempts.
    fn post_with_retries(
        &self,
        rows: &[Value],
        start: usize,
        stop: &AtomicBool,
    ) -> Result<Vec<Value>, String> {
        let label = rows_label(start, start + rows.len());
        let body = serde_json::to_vec(&Request { rows }).map_err(|e| {
            format!(
                "models.reward.kind http: the request body for {label} could not be written: {e}"
            )
        })?;
        let attempts = self.spec.retries.saturating_add(1);
        let mut attempt = 1;
        loop {
            let why = match self.post_once(&body, rows.len()) {
                Ok(answers) => return Ok(answers),
                Err(Failure::Transient(why))
                    if attempt < attempts && !stop.load(Ordering::Relaxed) =>
                {
                    why
                }
                Err(failure) => {
                    let cut_short = matches!(failure, Failure::Transient(_)) && attempt < attempts;
                    let (Failure::Transient(why) | Failure::Permanent(why)) = failure;
                    let mut of = if attempt == 1 {
                        "on the first attempt".to_string()
                    } else {
                        format!("after {attempt} attempts")
                    };
                    if cut_short {
                        of.push_str(" (no more: another request of this call had failed)");
                    }
                    return Err(format!(
                        "models.reward.kind http: POST {} ({label}) failed {of}: {why}",
                        self.spec.url
                    ));
                }
            };
            let delay = backoff(attempt);
            tracing::warn!(
                url = %self.spec.url,
                rows = %label,
                attempt,
                of = attempts,
                retry_in_s = delay.as_secs_f64(),
                reason = %why,
                "reward server request failed; retrying"
            );
            std::thread::sleep(delay);
            attempt += 1;
        }
    }

    /// One attempt: the answers of `n` rows, or why not.
    fn post_once(&self, body: &[u8], n: usize) -> Result<Vec<Value>, Failure> {
        let transport = |e: ureq::Error| match e {
            ureq::Error::Timeout(_) => Failure::Transient(format!(
                "no answer within {} s (models.reward.timeout_s)",
                self.spec.timeout.as_secs_f64()
            )),
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                Failure::Transient(format!(
                    "{e}; is the reward server running at this address?"
                ))
            }
            other => Failure::Permanent(other.to_string()),
        };
        let mut response = self
            .agent
            .post(&self.spec.url)
            .header("Content-Type", "application/json")
            .send(body)
            .map_err(transport)?;
        let status = response.status();
        let text = response.body_mut().read_to_string().map_err(transport)?;
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(Failure::Transient(format!(
                "HTTP {status}: {}",
                quote(&text)
            )));
        }
        if !status.is_success() {
            return Err(Failure::Permanent(format!(
                "HTTP {status}: {}",
                quote(&text)
            )));
        }
        parse_scores(&text, n).map_err(Failure::Permanent)
    }
}

/// The answers in a 2xx body: `{"scores": [...]}` or the bare list, with `n` entries.
fn parse_scores(text: &str, n: usize) -> Result<Vec<Value>, String> {
    const SHAPE: &str = r#"answer {"scores": [...]} with one score per row, in the rows' order"#;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "the answer is not JSON ({e}); {SHAPE}; it was {}",
            quote(text)
        )
    })?;
    let scores = match value {
        Value::Object(mut obj) => match obj.remove("scores") {
            Some(Value::Array(a)) => a,
            _ => {
                return Err(format!(
                    "the answer has no `scores` list; {SHAPE}; it was {}",
                    quote(text)
                ))
            }
        },
        Value::Array(a) => a,
        _ => return Err(format!("{SHAPE}; it was {}", quote(text))),
    };
    if scores.len() != n {
        return Err(format!(
            "the answer has {} scores for {n} row{}; {SHAPE}; it was {}",
            scores.len(),
            if n == 1 { "" } else { "s" },
            quote(text)
        ));
    }
    Ok(scores)
}

/// "row 5" or "rows 64 to 127": the rows of a request by their index in the Score call.
fn rows_label(start: usize, end: usize) -> String {
    if end == start + 1 {
        format!("row {start}")
    } else {
        format!("rows {start} to {}", end.saturating_sub(1))
    }
}

/// The pause before attempt `attempt + 1`: 0.5 s doubled per earlier retry, capped, plus up to
/// a tenth more at random.
fn backoff(attempt: u32) -> Duration {
    let base = FIRST_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    // A random fraction in [0, 1) from the standard library's per-process random hash keys.
    let fraction = (RandomState::new().hash_one(attempt) >> 11) as f64 / (1u64 << 53) as f64;
    base + base.mul_f64(0.1 * fraction)
}

/// At most [`QUOTE_CHARS`] characters of `text` on one line, with `…` when cut.
fn quote(text: &str) -> String {
    let mut s: String = text
        .chars()
        .take(QUOTE_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(url: &str) -> HttpSpec {
        HttpSpec {
            url: url.into(),
            timeout: Duration::from_secs(1),
            retries: 0,
            concurrency: 2,
            batch_size: 4,
        }
    }

    #[test]
    fn answers_are_a_scores_list_or_a_bare_list_of_the_right_length() {
        assert_eq!(
            parse_scores(r#"{"scores": [1, {"score": 0.5}]}"#, 2).unwrap(),
            [json!(1), json!({"score": 0.5})]
        );
        assert_eq!(parse_scores("[0, 1]", 2).unwrap(), [json!(0), json!(1)]);
        for (text, why) in [
            ("<html>oops</html>", "the answer is not JSON"),
            (r#"{"score": [1]}"#, "no `scores` list"),
            (r#"{"scores": 3}"#, "no `scores` list"),
            ("3", r#"answer {"scores": [...]}"#),
            (r#"{"scores": [1]}"#, "the answer has 1 scores for 2 rows"),
        ] {
            let e = parse_scores(text, 2).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
        let long = format!("[{}]", "1,".repeat(1000));
        let e = parse_scores(&long, 2).unwrap_err();
        assert!(e.len() < 600 && e.contains('…'), "{e}");
    }

    #[test]
    fn rows_are_named_by_their_index_in_the_call() {
        assert_eq!(rows_label(5, 6), "row 5");
        assert_eq!(rows_label(64, 128), "rows 64 to 127");
    }

    #[test]
    fn backoff_doubles_from_half_a_second_with_a_little_jitter() {
        for (attempt, base) in [(1, 0.5), (2, 1.0), (3, 2.0), (10, 30.0), (40, 30.0)] {
            let d = backoff(attempt).as_secs_f64();
            assert!(d >= base && d < base * 1.1, "attempt {attempt}: {d}");
        }
    }

    #[test]
    fn urls_are_checked_when_the_role_is_created() {
        for (url, why) in [
            ("127.0.0.1:8000/score", "must start with http://"),
            ("ftp://host/score", "must start with http://"),
            ("http://", "not a URL"),
            ("http:// bad host", "not a URL"),
        ] {
            let e = HttpReward::new(spec(url)).err().unwrap().to_string();
            assert!(
                e.contains(why) && e.contains("spec.reward.http.url"),
                "{url}: {e}"
            );
        }
        let https = HttpReward::new(spec("https://rewards.invalid/score")).map(|_| ());
        if cfg!(feature = "https") {
            assert!(https.is_ok());
        } else {
            let e = https.unwrap_err().to_string();
            assert!(e.contains("--features https"), "{e}");
        }
        assert!(HttpReward::new(spec("http://127.0.0.1:8000/score")).is_ok());
    }
}
