//! Rewards computed by the user's own code: a reward server (`models.reward.kind: http`,
//! [`http`]) or a pool of the user's long-lived processes (`kind: command`, [`command`]).
//!
//! Both send each scored row as the JSON object [`row_json`] makes and read back, per row, either
//! a number (the reward) or an object with a numeric `score` (the reward) and any other numeric
//! keys (named components, logged as `attribute/<name>`), which [`assemble`] checks and turns into
//! the role's [`Scores`]. The transport modules only move rows and answers; they name the rows
//! (their index in the Score request) and quote what the user's code said when it fails.
//! docs/rewards.md documents the protocol for users.

pub mod command;
pub mod http;

use serde_json::{Map, Value};
use tch::Tensor;

use crate::error::{RoleError, RoleResult};
use crate::roles::{ScoreItem, Scores};

/// How a role built from `RewardRoleSpec.http` / `.command` reaches the user's code.
#[derive(Debug, Clone)]
pub enum ExternalSpec {
    Http(http::HttpSpec),
    Command(command::CommandSpec),
}

/// A started external reward: the HTTP client, or the running process pool.
pub enum External {
    Http(http::HttpReward),
    Command(command::CommandPool),
}

impl External {
    /// Builds the client or starts the processes.
    pub fn start(spec: &ExternalSpec) -> RoleResult<External> {
        Ok(match spec {
            ExternalSpec::Http(s) => External::Http(http::HttpReward::new(s.clone())?),
            ExternalSpec::Command(s) => External::Command(command::CommandPool::start(s.clone())?),
        })
    }

    /// The kind's name in the run file.
    pub fn name(&self) -> &'static str {
        match self {
            External::Http(_) => "http",
            External::Command(_) => "command",
        }
    }

    pub fn score(&mut self, items: &[ScoreItem]) -> RoleResult<Scores> {
        let rows: Vec<Value> = items.iter().map(row_json).collect();
        let answers = match self {
            External::Http(h) => h.score_rows(&rows)?,
            External::Command(c) => c.score_rows(&rows)?,
        };
        if answers.len() != rows.len() {
            return Err(RoleError::Reward(format!(
                "models.reward.kind {}: got {} answers for {} rows",
                self.name(),
                answers.len(),
                rows.len()
            )));
        }
        assemble(self.name(), &answers)
    }
}

/// One row as the user's code receives it: `prompt` (the last user message's text), `messages`
/// (the whole conversation), `response`, `answer` (the prompt row's reference answer, null when
/// it has none) and `extra` (the prompt row's other columns, `{}` when none).
pub fn row_json(item: &ScoreItem) -> Value {
    let prompt = item
        .prompt
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.clone())
        .unwrap_or_default();
    let messages: Vec<Value> = item
        .prompt
        .iter()
        .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
        .collect();
    serde_json::json!({
        "prompt": prompt,
        "messages": messages,
        "response": item.response,
        "answer": if item.answer.is_empty() { Value::Null } else { Value::String(item.answer.clone()) },
        "extra": Value::Object(item.extra.clone()),
    })
}

/// One row's answer read: the reward and its named components.
#[derive(Debug, Clone, PartialEq)]
pub struct RowScore {
    pub reward: f64,
    pub components: Vec<(String, f64)>,
}

/// A number, or an object with a numeric `score` and other numeric keys; `row` names the row
/// (its index in the request) in errors, which quote the answer.
pub fn parse_answer(row: usize, answer: &Value) -> Result<RowScore, String> {
    let quoted = || {
        let mut s = answer.to_string();
        if s.len() > 200 {
            let mut end = 200;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push('…');
        }
        s
    };
    let number = |v: &Value, what: &str| -> Result<f64, String> {
        match v.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(format!(
                "row {row}: {what} must be a finite number; the answer was {}",
                quoted()
            )),
        }
    };
    match answer {
        Value::Number(_) => Ok(RowScore {
            reward: number(answer, "the score")?,
            components: vec![],
        }),
        Value::Object(obj) => {
            let score = obj.get("score").ok_or_else(|| {
                format!(
                    "row {row}: the answer has no `score`; answer a number, or an object with `score` (the reward) and any named components; the answer was {}",
                    quoted()
                )
            })?;
            let reward = number(score, "`score`")?;
            let mut components = obj
                .iter()
                .filter(|(k, _)| *k != "score")
                .map(|(k, v)| Ok((k.clone(), number(v, &format!("component `{k}`"))?)))
                .collect::<Result<Vec<_>, String>>()?;
            components.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(RowScore { reward, components })
        }
        _ => Err(format!(
            "row {row}: expected a number or an object with `score`; the answer was {}",
            quoted()
        )),
    }
}

/// The role's scores from one answer per row: every row must name the same components (row 0
/// sets them). With no components the attribute is the kind's name, as for the rule rewards.
pub fn assemble(kind: &str, answers: &[Value]) -> RoleResult<Scores> {
    let scores = answers
        .iter()
        .enumerate()
        .map(|(i, a)| parse_answer(i, a))
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| RoleError::Reward(format!("models.reward.kind {kind}: {e}")))?;
    let names: Vec<String> = scores
        .first()
        .map(|s| s.components.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    for (i, s) in scores.iter().enumerate() {
        let these: Vec<&str> = s.components.iter().map(|(k, _)| k.as_str()).collect();
        if these != names.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(RoleError::Reward(format!(
                "models.reward.kind {kind}: row {i} names the components [{}] but row 0 named [{}]; every row must give the same ones",
                these.join(", "),
                names.join(", ")
            )));
        }
    }
    let rewards: Vec<f32> = scores.iter().map(|s| s.reward as f32).collect();
    if names.is_empty() {
        return Ok(Scores {
            rewards: Tensor::f_from_slice(&rewards)?,
            attributes: None,
            attribute_names: vec![kind.to_string()],
        });
    }
    let flat: Vec<f32> = scores
        .iter()
        .flat_map(|s| s.components.iter().map(|(_, v)| *v as f32))
        .collect();
    let attributes =
        Tensor::f_from_slice(&flat)?.f_view([scores.len() as i64, names.len() as i64])?;
    Ok(Scores {
        rewards: Tensor::f_from_slice(&rewards)?,
        attributes: Some(attributes),
        attribute_names: names,
    })
}

/// The prompt row's other columns from `ScoreItem.extra_json` ("" is none).
pub fn parse_extra(item: usize, json: &str) -> RoleResult<Map<String, Value>> {
    if json.is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str(json) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(RoleError::bad(
            &format!("items[{item}].extra_json"),
            "must be a JSON object".into(),
        )),
        Err(e) => Err(RoleError::bad(
            &format!("items[{item}].extra_json"),
            format!("not valid JSON: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_model::ChatMessage;
    use serde_json::json;

    #[test]
    fn rows_carry_prompt_messages_response_answer_and_extra() {
        let item = ScoreItem {
            prompt: vec![
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "2+2?"),
            ],
            response: "4".into(),
            answer: String::new(),
            extra: parse_extra(0, r#"{"level": 1}"#).unwrap(),
        };
        assert_eq!(
            row_json(&item),
            json!({"prompt": "2+2?", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
                   "response": "4", "answer": null, "extra": {"level": 1}})
        );
        assert!(parse_extra(3, "[1]")
            .unwrap_err()
            .to_string()
            .contains("items[3].extra_json"));
    }

    #[test]
    fn answers_are_numbers_or_scores_with_components() {
        let s = assemble("http", &[json!(1.5), json!(-2)]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&s.rewards).unwrap(), [1.5, -2.0]);
        assert!(s.attributes.is_none());
        assert_eq!(s.attribute_names, ["http"]);

        let s = assemble(
            "command",
            &[
                json!({"score": 1, "format": 0.5, "correct": 1}),
                json!({"correct": 0, "score": 0.25, "format": 1}),
            ],
        )
        .unwrap();
        assert_eq!(s.attribute_names, ["correct", "format"]);
        assert_eq!(Vec::<f32>::try_from(&s.rewards).unwrap(), [1.0, 0.25]);
        let a = s.attributes.unwrap();
        assert_eq!(a.size(), [2, 2]);
        assert_eq!(
            Vec::<f32>::try_from(&a.reshape([-1])).unwrap(),
            [1.0, 0.5, 0.0, 1.0]
        );

        for (answers, why) in [
            (vec![json!(1), json!("x")], "row 1: expected a number"),
            (
                vec![json!({"format": 1})],
                "row 0: the answer has no `score`",
            ),
            (
                vec![json!({"score": "high"})],
                "row 0: `score` must be a finite number",
            ),
            (vec![json!({"score": 1, "f": null})], "component `f`"),
            (
                vec![json!({"score": 1, "a": 1}), json!({"score": 1, "b": 1})],
                "row 1 names the components [b] but row 0 named [a]",
            ),
        ] {
            let e = assemble("http", &answers).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("kind http"), "{e}");
        }
        let long = json!("y".repeat(1000));
        let e = assemble("http", &[long]).unwrap_err().to_string();
        assert!(e.len() < 400 && e.ends_with('…'), "{e}");
    }
}
