//! LoRA runs (`models.lora`) with real `rlhf-worker` processes on loopback:
//!
//! - with the policy as reference, no reference role exists and the actor computes the
//!   reference log-probs with its adapters off; the run's metrics (KL included) equal, bit for
//!   bit, those of the same run whose reference is its own role on a copy of the policy files;
//! - a separate generator holds the base plus adapters and takes only the adapters at every
//!   weight sync (`sync/bytes` is the adapter size), and the run equals the colocated one bit
//!   for bit, with the generator's digest (base and adapters) equal to the actor's every step;
//! - with two actor replicas the reference rows are sharded over both, and the run matches
//!   the one-replica run within 1e-3.
//!
//! One libtorch thread everywhere (`OMP_NUM_THREADS=1`, `threads: 1`), as in replicas.rs.

use std::path::{Path, PathBuf};

mod common;
use common::{arithmetic_prompts, jsonl, launch, text, tiny_model, worker_bin};

const RANK: u64 = 4;

/// A PPO run file with rank-4 LoRA on the actor over `workers` in `dir`; `models` adds lines
/// under `models:`.
fn setup(dir: &Path, workers: &[&str], models: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    tiny_model(&dir.join("policy"));
    arithmetic_prompts(dir, 5);
    let workers: String = workers.iter().map(|w| format!("  - {w}\n")).collect();
    let yaml = format!(
        "run: {{name: t, dir: runs, seed: 9}}\n\
         launcher: {{worker_bin: {}, heartbeat_interval_ms: 100, heartbeat_timeout_ms: 30000, startup_timeout_s: 60, collective_timeout_s: 20}}\n\
         workers:\n{workers}\
         models:\n  policy: policy\n  reward: {{kind: exact_match}}\n  lora: {{rank: {RANK}, alpha: 8}}\n{models}\
         algorithm: {{name: ppo, kl: {{coef: 0.05}}}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 6}}\n\
         train: {{steps: 3, epochs: 2, minibatch_size: 4, micro_batch_size: 2, replica_check_every: 1, actor: {{lr: 5.0e-2}}, critic: {{lr: 1.0e-3}}}}\n\
         checkpoint: {{every: 0}}\n\
         logging: {{progress: false, plot: false}}\n",
        worker_bin().display()
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    f
}

type Row = serde_json::Map<String, serde_json::Value>;

/// Runs `file` to the end; its metrics and the coordinator's log.
fn run(file: &Path) -> (Vec<Row>, String) {
    let out = launch(file, &[]);
    let log = text(&out);
    assert!(out.status.success(), "launch failed:\n{log}");
    let rows = jsonl(&file.with_file_name("runs/t/metrics.jsonl"))
        .into_iter()
        .map(|r| r.as_object().unwrap().clone())
        .collect();
    (rows, log)
}

/// The workers' "role created" lines of the run in `dir`.
fn created_roles(dir: &Path) -> Vec<String> {
    let mut lines = vec![];
    for e in std::fs::read_dir(dir.join("runs/t/logs")).unwrap() {
        let log = std::fs::read_to_string(e.unwrap().path()).unwrap();
        lines.extend(
            log.lines()
                .filter(|l| l.contains("role created"))
                .map(str::to_string),
        );
    }
    lines
}

/// Wall-clock measurements and placement facts, not training.
fn placement_or_time(k: &str) -> bool {
    k.starts_with("time/")
        || k == "tokens_per_s"
        || k.starts_with("sync/")
        || k.starts_with("replicas/")
}

fn assert_same_training(want: &[Row], got: &[Row], after: &str) {
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(got) {
        for (k, v) in w.iter().filter(|(k, _)| !placement_or_time(k)) {
            assert_eq!(
                g.get(k),
                Some(v),
                "step {}: `{k}` differs {after}",
                w["step"]
            );
        }
    }
}

const ACTOR_ONLY: [&str; 2] = [
    "{name: a, roles: [actor], threads: 1}",
    "{name: b, roles: [reward, critic], threads: 1}",
];

#[test]
fn the_reference_through_the_actor_equals_a_reference_role() {
    let tmp = tempfile::tempdir().unwrap();
    // The policy as reference: no reference worker is placed at all.
    let via_actor = tmp.path().join("via-actor");
    let (got, log) = run(&setup(&via_actor, &ACTOR_ONLY, ""));
    assert!(
        log.contains("reference=\"actor with adapters off\""),
        "{log}"
    );
    let roles = created_roles(&via_actor);
    assert!(roles.iter().any(|l| l.contains("\"actor\"")), "{roles:?}");
    assert!(
        !roles.iter().any(|l| l.contains("reference")),
        "a reference role was created: {roles:?}"
    );

    // The same run with the reference its own role, on a copy of the policy's files.
    let own = tmp.path().join("own-role");
    let file = setup(
        &own,
        &[
            "{name: a, roles: [actor, reference], threads: 1}",
            ACTOR_ONLY[1],
        ],
        "  reference: ref\n",
    );
    std::fs::create_dir_all(own.join("ref")).unwrap();
    for e in std::fs::read_dir(own.join("policy")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, own.join("ref").join(p.file_name().unwrap())).unwrap();
    }
    let (want, log) = run(&file);
    assert!(log.contains("reference=\"own role\""), "{log}");
    assert!(
        created_roles(&own).iter().any(|l| l.contains("reference")),
        "{:?}",
        created_roles(&own)
    );

    // Stated tolerance: none. Adapters off run exactly the reference role's code on the same
    // weights (the base is frozen), so every metric, the KL included, is bitwise equal.
    assert_same_training(&want, &got, "with the reference computed by the actor");
    // The KL measured something: the adapters moved the policy away from the reference.
    let kl = |r: &Row| r["kl_mean"].as_f64().unwrap();
    assert!(kl(&got[2]).abs() > 1e-6, "{:?}", got[2]);
    assert_ne!(kl(&got[0]), kl(&got[2]));
}

#[test]
fn a_lora_generator_takes_only_the_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let colocated = tmp.path().join("colocated");
    let (want, _) = run(&setup(&colocated, &ACTOR_ONLY, ""));
    let split = tmp.path().join("generator");
    let mut workers = ACTOR_ONLY.to_vec();
    workers.push("{name: g, roles: [generator], threads: 1}");
    let (got, log) = run(&setup(&split, &workers, ""));
    assert!(log.contains("generators hold the actor's weights"), "{log}");
    assert_same_training(&want, &got, "with a separate LoRA generator");

    // Adapter bytes from the model's shape: rank * (in + out) f32 values per adapted
    // projection (all seven) and layer.
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(split.join("policy/config.json")).unwrap())
            .unwrap();
    let n = |k: &str| c[k].as_u64().unwrap();
    let (h, i, layers) = (
        n("hidden_size"),
        n("intermediate_size"),
        n("num_hidden_layers"),
    );
    let head = h / n("num_attention_heads");
    let (q, kv) = (h, n("num_key_value_heads") * head);
    let per_layer = (h + q) + 2 * (h + kv) + (q + h) + 3 * (h + i);
    let adapter_bytes = RANK * per_layer * layers * 4;
    for g in &got {
        assert_eq!(
            g["sync/bytes"].as_f64().unwrap(),
            adapter_bytes as f64,
            "the sync must move the adapters only: {g:?}"
        );
        // The generator's base and adapters equalled the actor's after every sync.
        assert_eq!(g["replicas/checked"], 1.0, "{g:?}");
    }
    // Training moved the adapters (so a generator left on stale adapters would be caught).
    assert_ne!(want[0]["actor/pg_loss"], want[2]["actor/pg_loss"]);
}

#[test]
fn the_reference_through_two_actor_replicas_matches_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (want, _) = run(&setup(&tmp.path().join("one"), &ACTOR_ONLY, ""));
    // Two actor replicas: the reference rows are sharded over both (adapters off on each).
    let two = [
        "{name: a, roles: [actor], threads: 1}",
        "{name: a2, roles: [actor], threads: 1}",
        ACTOR_ONLY[1],
    ];
    let (got, log) = run(&setup(&tmp.path().join("two"), &two, ""));
    assert!(log.contains("actor_replicas=2"), "{log}");
    // Stated tolerance, as replicas.rs: the runs differ only in the order float32 sums are
    // taken (batch shapes, the gradient all-reduce), far below 1e-3 over 3 steps.
    for (w, g) in want.iter().zip(&got) {
        for (k, v) in w.iter().filter(|(k, _)| !placement_or_time(k)) {
            let (a, b) = (v.as_f64().unwrap(), g[k].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-3 * a.abs().max(1.0),
                "step {}: `{k}` = {b} with two replicas, {a} with one",
                w["step"]
            );
        }
    }
}
