//! The per-step cost of `models.reward.kind: http` at 512 responses, side by side with the
//! in-process `exact_match` rule on the same rows (scripts/bench/reward_server.sh starts the
//! server and runs this). Both sides do what a reward role's Score does on the worker: the
//! http side makes the rows' JSON, POSTs them in batches and assembles the answers into the
//! reward tensor and components; the rule side scores each row and makes the tensor. The gRPC
//! transfer of the items, the same for every kind, is left out.
//!
//! Usage: reward_bench --url URL [--rows 512] [--rounds 7]. Prints a Markdown table: per shape
//! (response length, batch_size, concurrency) the median over rounds of milliseconds per step
//! for each side, the rounds alternating between the sides.

use std::time::{Duration, Instant};

use rlhf_model::ChatMessage;
use rlhf_worker::external_rewards::http::HttpSpec;
use rlhf_worker::external_rewards::{External, ExternalSpec};
use rlhf_worker::reward_rules::{ExactMatch, Extract, Rule};
use rlhf_worker::roles::ScoreItem;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut url = None;
    let (mut rows, mut rounds) = (512usize, 7usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--url" => url = Some(value()?),
            "--rows" => rows = value()?.parse()?,
            "--rounds" => rounds = value()?.parse()?,
            other => return Err(format!("unknown argument {other}; see the file's docs").into()),
        }
    }
    let url = url.ok_or("--url URL of the reward server is required")?;
    let rule = Rule::ExactMatch(ExactMatch {
        extract: Extract::LastNumber,
        marker: "####".into(),
        correct: 1.0,
        incorrect: 0.0,
    });
    println!(
        "{rows} rows per step, median of {rounds} rounds; response lengths: short {} B, long {} B",
        items(1, false)[0].response.len(),
        items(1, true)[0].response.len()
    );
    println!();
    println!("| response | batch_size | concurrency | requests | http ms/step | exact_match ms/step | http overhead ms/step |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for long in [false, true] {
        let items = items(rows, long);
        for batch_size in [16, 64, 512] {
            for concurrency in [1, 4] {
                let mut http = External::start(&ExternalSpec::Http(HttpSpec {
                    url: url.clone(),
                    timeout: Duration::from_secs(60),
                    retries: 0,
                    concurrency,
                    batch_size,
                }))?;
                // One warm-up call each: connections, the server's first request.
                http.score(&items)?;
                rule.score_items(&items)?;
                let (mut h, mut r) = (vec![], vec![]);
                for _ in 0..rounds {
                    let t = Instant::now();
                    let s = http.score(&items)?;
                    h.push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(s.rewards.size(), [rows as i64]);
                    let t = Instant::now();
                    let s = rule.score_items(&items)?;
                    r.push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(s.rewards.size(), [rows as i64]);
                }
                let (h, r) = (median(h), median(r));
                println!(
                    "| {} | {batch_size} | {concurrency} | {} | {h:.2} | {r:.3} | {:.2} |",
                    if long { "long" } else { "short" },
                    rows.div_ceil(batch_size),
                    h - r
                );
            }
        }
    }
    Ok(())
}

/// Sums with answers; a short response is a sentence, a long one about 2 KB of reasoning.
fn items(n: usize, long: bool) -> Vec<ScoreItem> {
    (0..n)
        .map(|i| {
            let (a, b) = (i % 97, i % 89);
            let reasoning = if long {
                format!("Let me add {a} and {b} step by step. ").repeat(50)
            } else {
                String::new()
            };
            ScoreItem {
                prompt: vec![ChatMessage::new("user", &format!("What is {a}+{b}?"))],
                response: format!("{reasoning}The answer is {}.", a + b + i % 2),
                answer: (a + b).to_string(),
                extra: serde_json::Map::from_iter([("level".to_string(), (i % 5).into())]),
            }
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
