//! The run's reward sources (`models.reward`, or several under `models.rewards`): the reward
//! role each one becomes on the worker placed with `reward`, and the step's reward combined from
//! their answers as `sum(weight * reward)`. With several sources each one's unweighted reward is
//! kept as the attribute `<name>` and its own attributes as `<name>/<attribute>`, so metrics log
//! every source on its own (`attribute/<name>`).

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rlhf_config::{AnswerExtract, RewardConfig, RewardKind, RewardSource, RunConfig};
use rlhf_proto::pb;
use rlhf_proto::wire::{from_wire, to_wire};
use tch::{Kind, Tensor};

use crate::workers::RoleHandle;

/// One reward source as the step loop holds it.
#[derive(Clone)]
pub struct RewardRole<R> {
    pub name: String,
    pub weight: f64,
    /// A reward model (`kind: model`): what validation's `reward_model` judge may use.
    pub is_model: bool,
    pub role: R,
}

/// The worker role id of a source: `reward` alone, `reward/<name>` among several.
pub fn role_id(cfg: &RunConfig, source: &RewardSource<'_>) -> String {
    if cfg.models.rewards.is_empty() {
        "reward".to_string()
    } else {
        format!("reward/{}", source.name)
    }
}

/// The longest a Score of `rows` rows may legitimately take with this source, so that the
/// coordinator's deadline never cuts a user reward short that is still within its own limits:
/// `http`: every request with all its retries and their backoffs (0.5 s doubling, at most 30 s,
/// plus a tenth), in rounds of `concurrency`; `command`: every row up to `timeout_s` twice (one
/// retry after a restart), spread over the pool. Zero for the in-process kinds.
pub fn score_worst_case(r: &RewardConfig, rows: usize) -> Duration {
    let timeout = r.timeout_s.max(0.0);
    let pool = r.concurrency.max(1) as usize;
    let secs = match r.kind {
        RewardKind::Http => {
            let backoffs: f64 = (0..r.retries)
                .map(|i| (0.5 * 2f64.powi(i as i32)).min(30.0) * 1.1)
                .sum();
            let per_request = timeout * (r.retries as f64 + 1.0) + backoffs;
            let requests = rows.div_ceil(r.batch_size.max(1) as usize);
            per_request * requests.div_ceil(pool) as f64
        }
        RewardKind::Command => 2.0 * timeout * rows.div_ceil(pool) as f64,
        RewardKind::Model | RewardKind::ExactMatch | RewardKind::Math => 0.0,
    };
    // Room for connecting, starting processes and the answer's way back.
    Duration::from_secs_f64(if secs > 0.0 { secs + 30.0 } else { 0.0 })
}

/// What CreateRole carries for a source. `file_dir` is the run file's directory (a command's
/// default working directory).
pub fn role_spec(
    cfg: &RunConfig,
    source: &RewardSource<'_>,
    file_dir: &Path,
) -> pb::RewardRoleSpec {
    let r = source.config;
    let kind = match r.kind {
        RewardKind::Model => pb::reward_role_spec::Kind::Model(pb::ModelReward {
            attribute_weights: cfg
                .algorithm
                .reward
                .attribute_weights
                .clone()
                .into_iter()
                .collect(),
            mean: cfg.algorithm.reward.mean,
            std: cfg.algorithm.reward.std,
        }),
        RewardKind::ExactMatch => pb::reward_role_spec::Kind::ExactMatch(pb::ExactMatchReward {
            extract: match r.extract {
                AnswerExtract::LastNumber => "last_number",
                AnswerExtract::AfterMarker => "after_marker",
                AnswerExtract::Full => "full",
            }
            .into(),
            marker: r.marker.clone(),
            correct: r.correct,
            incorrect: r.incorrect,
        }),
        RewardKind::Math => pb::reward_role_spec::Kind::Math(pb::MathReward {
            marker: r.marker.clone(),
            correct: r.correct,
            incorrect: r.incorrect,
        }),
        RewardKind::Http => pb::reward_role_spec::Kind::Http(pb::HttpReward {
            url: r.url.clone().unwrap_or_default(),
            timeout_s: r.timeout_s,
            retries: r.retries,
            concurrency: r.concurrency,
            batch_size: r.batch_size,
        }),
        RewardKind::Command => pb::reward_role_spec::Kind::Command(pb::CommandReward {
            command: r.command.clone(),
            workdir: r
                .workdir
                .as_deref()
                .unwrap_or(file_dir)
                .to_string_lossy()
                .into_owned(),
            timeout_s: r.timeout_s,
            concurrency: r.concurrency,
        }),
    };
    pb::RewardRoleSpec { kind: Some(kind) }
}

/// Scores the items with every source at once and combines the answers; an error names the
/// source.
pub async fn score<R: RoleHandle>(
    sources: &[RewardRole<R>],
    items: Vec<pb::ScoreItem>,
) -> Result<pb::ScoreResponse> {
    let calls = sources.iter().map(|s| {
        let items = items.clone();
        async move {
            s.role
                .score(items)
                .await
                .with_context(|| format!("reward `{}`", s.name))
        }
    });
    let answers = futures::future::try_join_all(calls).await?;
    combine(sources, answers)
}

/// One answer per source → the step's answer. A lone source with weight 1 passes through as it
/// came.
pub fn combine<R>(
    sources: &[RewardRole<R>],
    answers: Vec<pb::ScoreResponse>,
) -> Result<pb::ScoreResponse> {
    if let ([s], [a]) = (sources, answers.as_slice()) {
        if s.weight == 1.0 {
            return Ok(a.clone());
        }
    }
    let mut total: Option<Tensor> = None;
    let mut columns: Vec<Tensor> = vec![];
    let mut names: Vec<String> = vec![];
    let several = sources.len() > 1;
    for (s, a) in sources.iter().zip(&answers) {
        let r = from_wire(
            "rewards",
            a.rewards
                .as_ref()
                .ok_or_else(|| anyhow!("reward `{}`: the Score answer has no rewards", s.name))?,
        )?
        .f_to_kind(Kind::Float)?;
        if let Some(t) = &total {
            if t.size() != r.size() {
                return Err(anyhow!(
                    "reward `{}` answered {:?} rewards where the others answered {:?}",
                    s.name,
                    r.size(),
                    t.size()
                ));
            }
        }
        let weighted = r.f_mul_scalar(s.weight)?;
        total = Some(match total {
            None => weighted,
            Some(t) => t.f_add(&weighted)?,
        });
        let prefix = |n: &str| {
            if several {
                format!("{}/{n}", s.name)
            } else {
                n.to_string()
            }
        };
        if several {
            columns.push(r.f_unsqueeze(1)?);
            names.push(s.name.clone());
        }
        if let Some(at) = &a.attributes {
            let at = from_wire("attributes", at)?.f_to_kind(Kind::Float)?;
            if at.dim() == 2 && at.size()[0] == r.size()[0] {
                columns.push(at);
                names.extend(a.attribute_names.iter().map(|n| prefix(n)));
            }
        } else if !several {
            names.extend(a.attribute_names.iter().cloned());
        }
    }
    let total = total.ok_or_else(|| anyhow!("no reward sources"))?;
    let attributes = if columns.is_empty() {
        None
    } else {
        Some(to_wire("attributes", &Tensor::f_cat(&columns, 1)?)?)
    };
    Ok(pb::ScoreResponse {
        rewards: Some(to_wire("rewards", &total)?),
        attributes,
        attribute_names: names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(rewards: &[f32], attributes: Option<(&[&str], Vec<f32>)>) -> pb::ScoreResponse {
        let b = rewards.len() as i64;
        let (names, at) = match attributes {
            Some((names, flat)) => {
                let a = names.len() as i64;
                (
                    names.iter().map(|n| n.to_string()).collect(),
                    Some(to_wire("a", &Tensor::from_slice(&flat).reshape([b, a])).unwrap()),
                )
            }
            None => (vec!["math".to_string()], None),
        };
        pb::ScoreResponse {
            rewards: Some(to_wire("r", &Tensor::from_slice(rewards)).unwrap()),
            attributes: at,
            attribute_names: names,
        }
    }

    fn source(name: &str, weight: f64) -> RewardRole<()> {
        RewardRole {
            name: name.into(),
            weight,
            is_model: false,
            role: (),
        }
    }

    fn floats(t: &pb::Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(from_wire("t", t).unwrap().reshape([-1])).unwrap()
    }

    #[test]
    fn one_source_passes_through_and_several_are_weighted_and_kept_apart() {
        let rm = answer(
            &[0.5, -1.0],
            Some((&["help", "safe"], vec![1.0, 2.0, 3.0, 4.0])),
        );
        let one = combine(&[source("rm", 1.0)], vec![rm.clone()]).unwrap();
        assert_eq!(one, rm);
        let scaled = combine(&[source("rm", 2.0)], vec![rm.clone()]).unwrap();
        assert_eq!(floats(scaled.rewards.as_ref().unwrap()), [1.0, -2.0]);
        assert_eq!(scaled.attribute_names, ["help", "safe"]);

        let rule = answer(&[1.0, 0.0], None);
        let both = combine(&[source("rm", 0.5), source("math", 2.0)], vec![rm, rule]).unwrap();
        assert_eq!(floats(both.rewards.as_ref().unwrap()), [0.25 + 2.0, -0.5]);
        assert_eq!(both.attribute_names, ["rm", "rm/help", "rm/safe", "math"]);
        // Row-major (2, 4): each source's own reward unweighted, then its attributes.
        assert_eq!(
            floats(both.attributes.as_ref().unwrap()),
            [0.5, 1.0, 2.0, 1.0, -1.0, 3.0, 4.0, 0.0]
        );
    }

    #[test]
    fn user_rewards_get_their_worst_case_as_deadline() {
        let http = RewardConfig {
            kind: RewardKind::Http,
            url: Some("http://h".into()),
            ..Default::default()
        };
        // 512 rows in 8 requests of 64, 4 at a time: 2 rounds of 3 x 30 s + 0.55 + 1.1 s.
        let want = 2.0 * (90.0 + 0.55 + 1.1) + 30.0;
        assert!((score_worst_case(&http, 512).as_secs_f64() - want).abs() < 1e-9);
        let command = RewardConfig {
            kind: RewardKind::Command,
            command: vec!["python3".into()],
            timeout_s: 2.0,
            ..Default::default()
        };
        assert_eq!(
            score_worst_case(&command, 10).as_secs_f64(),
            2.0 * 2.0 * 3.0 + 30.0
        );
        assert_eq!(
            score_worst_case(&RewardConfig::default(), 512),
            Duration::ZERO
        );
    }

    #[test]
    fn sources_must_agree_on_the_rows() {
        let e = combine(
            &[source("a", 1.0), source("b", 1.0)],
            vec![answer(&[1.0, 2.0], None), answer(&[1.0], None)],
        )
        .unwrap_err();
        assert!(e.to_string().contains("reward `b` answered [1]"), "{e}");
    }
}
