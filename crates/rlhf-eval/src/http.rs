//! A judge behind any OpenAI-compatible `chat/completions` endpoint (OpenAI, vLLM, SGLang,
//! llama.cpp's server, ...), sent FastChat's MT-Bench single-answer prompts.
//!
//! **Boundary:** the endpoint is outside the run. Every way it can misbehave (refused or
//! dropped connections, timeouts, non-2xx statuses, bodies that are not chat completions,
//! answers without a rating) ends as a judgment with `rating: None` and the reason; nothing
//! here returns an error or panics because of one request.
//!
//! Requests are blocking (`ureq`) and run on tokio's blocking pool, at most
//! [`HttpJudgeConfig::max_concurrency`] at a time, so the coordinator's runtime is never
//! blocked.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Semaphore;

use crate::error::{EvalError, Result};
use crate::judge::{BoxFuture, Judge, JudgeItem, Judgment};
use crate::prompt::{fill_judge_prompt, parse_rating_reason, FilledPrompt, PromptKind};
use crate::JudgePrompts;

/// FastChat's `chat_completion_openai` settings for judging: greedy, room for the explanation.
pub const JUDGE_TEMPERATURE: f64 = 0.0;
/// See [`JUDGE_TEMPERATURE`].
pub const JUDGE_MAX_TOKENS: u32 = 2048;
/// Pause before the one retry; gives an overloaded server a moment without stretching the
/// worst case much.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// How much of an unexpected response body is kept in the reason.
const SNIPPET_CHARS: usize = 200;

/// Where and how to reach the judge.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpJudgeConfig {
    /// The API base, for example `http://127.0.0.1:8000/v1`; requests go to
    /// `{base_url}/chat/completions`. No default.
    pub base_url: String,
    /// The `model` field of each request, for example `gpt-4`. No default.
    pub model: String,
    /// Name of the environment variable holding the API key, sent as `Authorization: Bearer`.
    /// The key is read once in [`HttpJudge::new`] and never logged. Default: `None` (no
    /// header, for local servers).
    pub api_key_env: Option<String>,
    /// Limit for one request, connecting through reading the body. Default: 120 s.
    pub timeout: Duration,
    /// Requests in flight at once. Default: 8.
    pub max_concurrency: usize,
}

impl HttpJudgeConfig {
    /// A config with the defaults documented on each field.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key_env: None,
            timeout: Duration::from_secs(120),
            max_concurrency: 8,
        }
    }
}

impl fmt::Debug for HttpJudgeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpJudgeConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key_env", &self.api_key_env)
            .field("timeout", &self.timeout)
            .field("max_concurrency", &self.max_concurrency)
            .finish()
    }
}

/// What every request of one judge shares; cheap to clone into blocking tasks.
struct Endpoint {
    agent: ureq::Agent,
    url: String,
    api_key: Option<String>,
    timeout: Duration,
}

/// The MT-Bench judge over HTTP. See the module docs.
pub struct HttpJudge {
    endpoint: Arc<Endpoint>,
    model: String,
    prompts: JudgePrompts,
    max_concurrency: usize,
    name: String,
}

impl fmt::Debug for HttpJudge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpJudge")
            .field("url", &self.endpoint.url)
            .field("model", &self.model)
            .field(
                "api_key",
                &self.endpoint.api_key.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.endpoint.timeout)
            .field("max_concurrency", &self.max_concurrency)
            .finish()
    }
}

/// How one attempt went wrong, and whether another attempt may help.
enum Failure {
    /// Timeout, connection error or 5xx: worth one retry.
    Transient(String),
    /// 4xx, or a 2xx body that is not a chat completion: retrying will not help.
    Permanent(String),
}

impl HttpJudge {
    /// Builds the judge. `prompts` are the data set's judge prompts
    /// ([`crate::MtBench::judge_prompts`]).
    ///
    /// Fails when the base URL is not `http://` or `https://` (`https://` only with the crate's
    /// `https` feature, off by default), `max_concurrency` or `timeout` is zero, or `api_key_env`
    /// names a variable that is unset or not UTF-8.
    pub fn new(config: HttpJudgeConfig, prompts: &JudgePrompts) -> Result<Self> {
        let base = config.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(EvalError::Config(format!(
                "base_url {:?} must start with http:// or https:// (for example \
                 http://127.0.0.1:8000/v1)",
                config.base_url
            )));
        }
        if base.starts_with("https://") && !cfg!(feature = "https") {
            return Err(EvalError::Config(format!(
                "base_url {:?} is https, but rlhf-eval was built without its `https` feature; \
                 build rlhf-coord with `--features https` (scripts/demo.sh and the README's \
                 release build do) or use an http:// endpoint",
                config.base_url
            )));
        }
        if config.max_concurrency == 0 {
            return Err(EvalError::Config(
                "max_concurrency must be at least 1".into(),
            ));
        }
        if config.timeout.is_zero() {
            return Err(EvalError::Config("timeout must be positive".into()));
        }
        let api_key = match &config.api_key_env {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|e| {
                EvalError::Config(format!(
                    "API key variable {var}: {e}; export {var}, or for a judge that needs no \
                     key set the variable name to the empty string (`validation.http.api_key_env: \
                     \"\"` in a run file; leaving the key out means the default, OPENAI_API_KEY)"
                ))
            })?),
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            // Non-2xx responses come back as responses so their body can go into the reason.
            .http_status_as_error(false)
            .user_agent(concat!("rlhf-eval/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Self {
            endpoint: Arc::new(Endpoint {
                agent,
                url: format!("{base}/chat/completions"),
                api_key,
                timeout: config.timeout,
            }),
            name: format!("http:{}", config.model),
            model: config.model,
            prompts: prompts.clone(),
            max_concurrency: config.max_concurrency,
        })
    }

    fn request_body(&self, prompt: &FilledPrompt) -> String {
        // FastChat's `to_openai_api_messages` leaves out an empty system message.
        let mut messages = Vec::with_capacity(2);
        if !prompt.system.is_empty() {
            messages.push(json!({"role": "system", "content": prompt.system}));
        }
        messages.push(json!({"role": "user", "content": prompt.user}));
        json!({
            "model": self.model,
            "messages": messages,
            "temperature": JUDGE_TEMPERATURE,
            "max_tokens": JUDGE_MAX_TOKENS,
        })
        .to_string()
    }
}

impl Judge for HttpJudge {
    fn name(&self) -> &str {
        &self.name
    }

    fn judge<'a>(&'a self, items: &'a [JudgeItem<'a>]) -> BoxFuture<'a, Vec<Judgment>> {
        Box::pin(self.judge_all(items))
    }
}

impl HttpJudge {
    /// Grades every item concurrently; see [`Judge::judge`].
    #[tracing::instrument(skip_all, fields(judge = %self.name, items = items.len()))]
    pub async fn judge_all(&self, items: &[JudgeItem<'_>]) -> Vec<Judgment> {
        let permits = Arc::new(Semaphore::new(self.max_concurrency));
        let mut handles = Vec::with_capacity(items.len());
        for item in items {
            let label = format!(
                "{}/{}",
                self.model,
                PromptKind::for_question(item.question, item.turn).prompt_name()
            );
            let prompt =
                match fill_judge_prompt(&self.prompts, item.question, item.answer, item.turn) {
                    Ok(p) => p,
                    Err(why) => {
                        handles.push(Err(Judgment::failed(item, &label, why)));
                        continue;
                    }
                };
            let body = self.request_body(&prompt);
            let permit = match permits.clone().acquire_owned().await {
                Ok(p) => p,
                // Unreachable (the semaphore is never closed); fail the item rather than panic.
                Err(e) => {
                    handles.push(Err(Judgment::failed(item, &label, e.to_string())));
                    continue;
                }
            };
            let endpoint = Arc::clone(&self.endpoint);
            handles.push(Ok((
                label,
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    complete_with_retry(&endpoint, &body)
                }),
            )));
        }

        let mut judgments = Vec::with_capacity(items.len());
        for (item, handle) in items.iter().zip(handles) {
            let judgment = match handle {
                Err(j) => j,
                Ok((label, task)) => match task.await {
                    Err(e) => Judgment::failed(item, &label, format!("judge request task: {e}")),
                    Ok(Err(why)) => Judgment::failed(item, &label, why),
                    Ok(Ok(text)) => match parse_rating_reason(&text) {
                        Ok(r) => Judgment::rated(item, &label, r, text),
                        Err(why) => Judgment::unparseable(item, &label, text, why),
                    },
                },
            };
            tracing::debug!(
                question_id = judgment.question_id,
                turn = %judgment.turn,
                rating = ?judgment.rating,
                error = judgment.error.as_deref(),
                "judged"
            );
            judgments.push(judgment);
        }
        let missing: Vec<&Judgment> = judgments.iter().filter(|j| j.rating.is_none()).collect();
        if let Some(first) = missing.first() {
            tracing::warn!(
                missing = missing.len(),
                of = judgments.len(),
                first_question = first.question_id,
                first_reason = first.error.as_deref(),
                "some MT-Bench judgments have no rating"
            );
        }
        judgments
    }
}

/// One request plus at most one retry on a transient failure. Returns the judge's text.
fn complete_with_retry(endpoint: &Endpoint, body: &str) -> std::result::Result<String, String> {
    match complete_once(endpoint, body) {
        Ok(text) => Ok(text),
        Err(Failure::Permanent(why)) => Err(why),
        Err(Failure::Transient(first)) => {
            tracing::debug!(reason = %first, "judge request failed; retrying once");
            std::thread::sleep(RETRY_DELAY);
            complete_once(endpoint, body).map_err(|f| match f {
                Failure::Transient(why) | Failure::Permanent(why) if why == first => {
                    format!("{why} (on both attempts)")
                }
                Failure::Transient(why) | Failure::Permanent(why) => {
                    format!("{why} (after a retry; first attempt: {first})")
                }
            })
        }
    }
}

fn complete_once(endpoint: &Endpoint, body: &str) -> std::result::Result<String, Failure> {
    let mut request = endpoint
        .agent
        .post(&endpoint.url)
        .header("Content-Type", "application/json");
    if let Some(key) = &endpoint.api_key {
        request = request.header("Authorization", format!("Bearer {key}"));
    }
    let transport = |e: ureq::Error| match e {
        ureq::Error::Timeout(_) => {
            Failure::Transient(format!("no response within {:?} ({e})", endpoint.timeout))
        }
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            Failure::Transient(format!("connection to {} failed: {e}", endpoint.url))
        }
        other => Failure::Permanent(format!("request to {} failed: {other}", endpoint.url)),
    };
    let mut response = request.send(body).map_err(transport)?;
    let status = response.status();
    let text = response.body_mut().read_to_string().map_err(transport)?;
    if status.is_server_error() {
        return Err(Failure::Transient(format!(
            "HTTP {status}: {}",
            snippet(&text)
        )));
    }
    if !status.is_success() {
        return Err(Failure::Permanent(format!(
            "HTTP {status}: {}",
            snippet(&text)
        )));
    }
    completion_text(&text).map_err(Failure::Permanent)
}

/// `choices[0].message.content` of an OpenAI chat-completion body.
fn completion_text(body: &str) -> std::result::Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| format!("response is not JSON ({e}): {}", snippet(body)))?;
    value
        .pointer("/choices/0/message/content")
        .and_then(|c| c.as_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            format!(
                "response has no choices[0].message.content string: {}",
                snippet(body)
            )
        })
}

fn snippet(text: &str) -> String {
    let mut s: String = text.chars().take(SNIPPET_CHARS).collect();
    if s.len() < text.len() {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_text_reads_openai_bodies_and_explains_others() {
        let ok = r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"Rating: [[7]]"}}]}"#;
        assert_eq!(completion_text(ok).unwrap(), "Rating: [[7]]");
        let e = completion_text("<html>oops</html>").unwrap_err();
        assert!(e.contains("not JSON") && e.contains("<html>"), "{e}");
        let e = completion_text(r#"{"choices":[]}"#).unwrap_err();
        assert!(e.contains("no choices[0].message.content"), "{e}");
        let e = completion_text(r#"{"choices":[{"message":{"content":null}}]}"#).unwrap_err();
        assert!(e.contains("no choices[0].message.content"), "{e}");
    }

    #[test]
    fn snippet_truncates_on_char_boundaries() {
        let long = "é".repeat(500);
        let s = snippet(&long);
        assert!(s.ends_with("...") && s.chars().count() == SNIPPET_CHARS + 3);
        assert_eq!(snippet("short"), "short");
    }

    #[test]
    fn config_errors_name_the_problem_and_debug_hides_the_key() {
        let dir = crate::data::tests::mt_bench_dir();
        let bench = crate::MtBench::load(&dir).unwrap();
        let mut c = HttpJudgeConfig::new("127.0.0.1:8000/v1", "judge");
        let e = HttpJudge::new(c.clone(), bench.judge_prompts()).unwrap_err();
        assert!(e.to_string().contains("must start with http://"), "{e}");
        c.base_url = "http://127.0.0.1:8000/v1/".into();
        c.api_key_env = Some("RLHF_EVAL_UNIT_TEST_SURELY_UNSET_KEY".into());
        let e = HttpJudge::new(c.clone(), bench.judge_prompts()).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("RLHF_EVAL_UNIT_TEST_SURELY_UNSET_KEY"), "{e}");
        // The way out that works: an empty variable name (leaving the key out of a run file
        // gives the default OPENAI_API_KEY, which is what failed for users).
        assert!(
            e.contains(r#"validation.http.api_key_env: """#) && !e.contains("unset"),
            "{e}"
        );
        c.api_key_env = None;
        let mut tls = c.clone();
        tls.base_url = "https://judge.invalid/v1".into();
        let result = HttpJudge::new(tls, bench.judge_prompts()).map_err(|e| e.to_string());
        #[cfg(feature = "https")]
        assert!(result.is_ok(), "{:?}", result.err());
        #[cfg(not(feature = "https"))]
        assert!(
            result.unwrap_err().contains("without its `https` feature"),
            "https accepted without the feature"
        );
        let j = HttpJudge::new(c, bench.judge_prompts()).unwrap();
        assert_eq!(j.endpoint.url, "http://127.0.0.1:8000/v1/chat/completions");
        assert!(format!("{j:?}").contains("api_key: None"));
    }
}
