//! Roles with more than one instance, from the controller's side: data-parallel actor and
//! critic replicas, and generators separate from the training actor.
//!
//! The controller forms the collective groups (two-phase: every member's `OpenGroup` address,
//! then `JoinGroup` on all members at once) and afterwards only says *when* tensors move; they
//! flow between the workers directly (`rlhf-comm`), never through the controller.
//!
//! - Generation is sharded by prompt over the generators (or over the actor replicas when there
//!   are no generators). Row `i` of the batch samples from the stream of (seed, `i`) wherever it
//!   runs, so the shard boundaries do not change what is sampled; the shards' answers are merged
//!   into one padded batch ([`rl::merge_generations`]).
//! - A minibatch is sharded by rows over the replicas; every shard carries the whole minibatch's
//!   token and row counts, so each replica's loss is its share of the minibatch loss, and the
//!   replicas all-reduce (sum) gradients before clipping and the optimizer step. Their partial
//!   metrics add up to the minibatch's; `grad_norm` and `lr` are the same on every replica.
//! - After the actor's epochs, replica 0 broadcasts its weights to the generators.
//! - Every `train.replica_check_every` steps the weight digests must agree ([`check_digests`]).

use std::ops::Range;

use anyhow::{bail, Context, Result};
use futures::future::try_join_all;
use rlhf_config::CollectiveBackend;
use rlhf_proto::pb;

use crate::rl;
use crate::workers::{RoleClient, RoleHandle};

/// The backend a group over `members` uses: NCCL when asked for, or with `auto` when every
/// member is on a CUDA device of its own; TCP otherwise. NCCL refuses two ranks on one GPU
/// ("Duplicate GPU detected"), so `auto` takes TCP when two members share a host and a CUDA
/// device, and an explicit `nccl` is an error naming them (before any group is opened).
pub fn backend(members: &[RoleClient], wanted: CollectiveBackend) -> Result<pb::CollectiveBackend> {
    let members: Vec<Member<'_>> = members
        .iter()
        .map(|m| Member {
            worker: &m.worker,
            host: &m.host,
            device: &m.device,
        })
        .collect();
    choose_backend(&members, wanted)
}

/// Where a group member runs.
#[derive(Clone, Copy)]
struct Member<'a> {
    worker: &'a str,
    host: &'a str,
    device: &'a str,
}

fn choose_backend(
    members: &[Member<'_>],
    wanted: CollectiveBackend,
) -> Result<pb::CollectiveBackend> {
    fn gpu<'a>(m: &Member<'a>) -> Option<(&'a str, usize)> {
        match rlhf_model::config::device_from_str(m.device) {
            Some(tch::Device::Cuda(i)) => Some((m.host, i)),
            _ => None,
        }
    }
    let all_cuda = members.iter().all(|m| gpu(m).is_some());
    // The first two members on the same CUDA device of the same host (`cuda` is `cuda:0`).
    let shared = members.iter().enumerate().find_map(|(i, a)| {
        let ga = gpu(a)?;
        members[i + 1..]
            .iter()
            .find(|b| gpu(b) == Some(ga))
            .map(|b| (a, b))
    });
    Ok(match wanted {
        CollectiveBackend::Nccl => {
            if let Some((a, b)) = shared {
                bail!(
                    "launcher.collective_backend is nccl, but workers `{}` and `{}` share {} on \
                     host {} and NCCL cannot run two ranks on one GPU; give each its own device \
                     or use collective_backend auto/tcp",
                    a.worker,
                    b.worker,
                    a.device,
                    a.host
                );
            }
            pb::CollectiveBackend::Nccl
        }
        CollectiveBackend::Auto if all_cuda && shared.is_none() => pb::CollectiveBackend::Nccl,
        _ => pb::CollectiveBackend::Tcp,
    })
}

/// Forms a collective group over `members`, rank = index.
pub async fn form_group(
    members: &[RoleClient],
    group_id: u64,
    purpose: pb::GroupPurpose,
    backend: pb::CollectiveBackend,
    timeout_s: f64,
) -> Result<()> {
    let names = || {
        format!(
            "{} group ({}) of {}",
            purpose.as_str_name(),
            backend.as_str_name(),
            members
                .iter()
                .map(|m| format!("`{}`", m.worker))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let opened = try_join_all(members.iter().map(|m| m.open_group(group_id, backend)))
        .await
        .with_context(|| format!("opening the {}", names()))?;
    let addrs: Vec<String> = opened.iter().map(|o| o.address.clone()).collect();
    let nccl_id = opened[0].nccl_id.clone();
    try_join_all(members.iter().enumerate().map(|(rank, m)| {
        m.join_group(
            group_id,
            purpose,
            rank,
            addrs.clone(),
            timeout_s,
            backend,
            nccl_id.clone(),
        )
    }))
    .await
    .with_context(|| format!("forming the {}", names()))?;
    Ok(())
}

/// Generates `req`'s prompts on `gens`, sharded by prompt, and merges the answers in order.
pub async fn generate<R: RoleHandle>(
    gens: &[R],
    req: pb::GenerateRequest,
) -> Result<pb::GenerateResponse> {
    if gens.len() == 1 {
        return gens[0].generate(req).await;
    }
    let per_prompt = req.samples_per_prompt as u64;
    let parts = rl::shards(req.prompts.len(), gens.len());
    let calls = parts.iter().zip(gens).map(|(r, g)| {
        let shard = pb::GenerateRequest {
            prompts: req.prompts[r.clone()].to_vec(),
            first_row: req.first_row + r.start as u64 * per_prompt,
            ..req.clone()
        };
        g.generate(shard)
    });
    let answers = try_join_all(calls).await?;
    tokio::task::block_in_place(|| rl::merge_generations(answers))
}

/// Reference log-probs of `seqs` from the actor replicas with their LoRA adapters switched off
/// (the reference is the policy's frozen base, `ModelsConfig::reference_is_actor_base`): rows
/// sharded over the replicas at prompt-group boundaries (`group` rows per prompt, so each
/// shard keeps its prompts' shared prefix), the answers concatenated in order.
pub async fn base_log_probs<R: RoleHandle>(
    actors: &[R],
    seqs: pb::Sequences,
    temperature: f64,
    group: usize,
) -> Result<pb::Tensor> {
    if actors.len() <= 1 {
        let actor = actors.first().context("no actor replica to ask")?;
        return actor.log_probs(seqs, temperature, true).await;
    }
    let rows = seqs
        .input_ids
        .as_ref()
        .and_then(|t| t.shape.first())
        .copied()
        .unwrap_or(0) as usize;
    let group = group.max(1);
    let parts: Vec<Range<usize>> = if rows % group == 0 {
        rl::shards(rows / group, actors.len())
            .into_iter()
            .map(|r| r.start * group..r.end * group)
            .collect()
    } else {
        rl::shards(rows, actors.len())
    };
    let pieces = tokio::task::block_in_place(|| rl::split_sequences(&seqs, &parts))?;
    let answers = try_join_all(
        actors
            .iter()
            .zip(pieces)
            .map(|(a, s)| a.log_probs(s, temperature, true)),
    )
    .await?;
    tokio::task::block_in_place(|| rl::concat_rows("ref_logprobs", &answers))
}

/// Combines the replicas' answers to one minibatch's TrainStep: partial metrics add up,
/// `grad_norm` and `lr` (computed after the all-reduce) are taken from replica 0.
pub fn combine_metrics(parts: &[pb::TrainStepResponse]) -> pb::TrainStepResponse {
    let mut out = pb::TrainStepResponse {
        metrics: Default::default(),
        optimizer_step: parts.first().map_or(0, |p| p.optimizer_step),
    };
    for (i, p) in parts.iter().enumerate() {
        for (k, v) in &p.metrics {
            let shared = matches!(k.as_str(), "grad_norm" | "lr");
            if shared {
                if i == 0 {
                    out.metrics.insert(k.clone(), *v);
                }
            } else {
                *out.metrics.entry(k.clone()).or_default() += v;
            }
        }
    }
    out
}

/// Broadcasts replica 0's actor weights to every generator; returns (bytes, seconds of the
/// slowest member).
pub async fn sync_generators<R: RoleHandle>(actor: &R, gens: &[R]) -> Result<(u64, f64)> {
    let calls = std::iter::once(actor)
        .chain(gens)
        .map(|m| m.sync_weights(0));
    let answers = try_join_all(calls)
        .await
        .context("weight sync from the actor to the generators")?;
    let secs = answers.iter().map(|a| a.seconds).fold(0.0, f64::max);
    Ok((answers[0].bytes, secs))
}

/// Checks that every member of `members` holds the same weights as `members[0]`. `what` names
/// the set in the error ("actor replicas", "generators (after weight sync)").
pub async fn check_digests<R: RoleHandle>(members: &[R], what: &str, step: u64) -> Result<()> {
    if members.len() < 2 {
        return Ok(());
    }
    let digests = try_join_all(members.iter().map(|m| m.weights_digest())).await?;
    for (m, d) in members.iter().zip(&digests).skip(1) {
        if d != &digests[0] {
            bail!(
                "replica check after step {step}: {what} differ: worker `{}` (role {}) has weights sha256 {}…, worker `{}` (role {}) has {}…; \
                 replicas must stay bitwise equal (same model files, dtype and seed on every worker); stopping",
                m.worker(),
                m.role(),
                &d[..16],
                members[0].worker(),
                members[0].role(),
                &digests[0][..16]
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_only_for_members_on_gpus_of_their_own() {
        use pb::CollectiveBackend::{Nccl, Tcp};
        let m = |worker, host, device| Member {
            worker,
            host,
            device,
        };
        let pick = |ms: &[Member<'_>], w| choose_backend(ms, w);
        let own = [
            m("a", "n1", "cuda:0"),
            m("b", "n1", "cuda:1"),
            m("c", "n2", "cuda"),
        ];
        assert_eq!(pick(&own, CollectiveBackend::Auto).unwrap(), Nccl);
        assert_eq!(pick(&own, CollectiveBackend::Nccl).unwrap(), Nccl);
        assert_eq!(pick(&own, CollectiveBackend::Tcp).unwrap(), Tcp);
        let cpu = [m("a", "n1", "cuda:0"), m("b", "n1", "cpu")];
        assert_eq!(pick(&cpu, CollectiveBackend::Auto).unwrap(), Tcp);
        // `cuda` is `cuda:0`: two members on one host share that GPU.
        let shared = [
            m("a", "n1", "cuda:1"),
            m("g", "n1", "cuda:0"),
            m("h", "n1", "cuda"),
        ];
        assert_eq!(pick(&shared, CollectiveBackend::Auto).unwrap(), Tcp);
        let e = pick(&shared, CollectiveBackend::Nccl)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`g` and `h` share cuda:0 on host n1") && e.contains("auto/tcp"),
            "{e}"
        );
    }

    #[test]
    fn metrics_add_up_except_shared_ones() {
        let part = |pg: f64, norm: f64| pb::TrainStepResponse {
            metrics: [("pg_loss".to_string(), pg), ("grad_norm".to_string(), norm)]
                .into_iter()
                .collect(),
            optimizer_step: 3,
        };
        let c = combine_metrics(&[part(0.25, 2.0), part(0.5, 2.0)]);
        assert_eq!(c.metrics["pg_loss"], 0.75);
        assert_eq!(c.metrics["grad_norm"], 2.0);
        assert_eq!(c.optimizer_step, 3);
    }
}
