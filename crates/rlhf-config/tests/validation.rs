//! Validation after extraction: cross-field rules, role placement, worker names and the files a
//! run needs, each error naming the key and FILE:LINE; plus `error_at`/`locate` for callers.

mod common;
use common::*;

use rlhf_config::{ConfigError, Origin};

#[test]
fn the_base_fixture_is_valid() {
    let f = Fixture::new();
    let loaded = f.load(BASE, &[], &[]).unwrap();
    assert_eq!(loaded.config.run.name, "t");
}

#[test]
fn rloo_with_one_sample_per_prompt_is_rejected_at_its_line() {
    let f = Fixture::new();
    let yaml = format!("{BASE}algorithm:\n  name: rloo\n");
    // Defaulted samples_per_prompt: the key is named, its source is the default.
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(msg.starts_with("rollout.samples_per_prompt:"), "{msg}");
    assert!(msg.contains("rloo") && msg.contains("at least 2"), "{msg}");
    assert!(msg.ends_with("(the default, as nothing sets it)"), "{msg}");

    let yaml = yaml.replace("rollout:\n", "rollout:\n  samples_per_prompt: 1\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(msg.starts_with("rollout.samples_per_prompt:"), "{msg}");
    assert!(
        msg.contains(&f.at(line_of(&yaml, "samples_per_prompt"))),
        "{msg}"
    );

    // grpo too; 2 samples pass.
    let yaml = yaml.replace("rloo", "grpo");
    assert!(err(f.load(&yaml, &[], &[])).contains("grpo"));
    f.load(&yaml, &["rollout.samples_per_prompt=2"], &[])
        .unwrap();
}

#[test]
fn a_duplicated_role_names_both_workers() {
    let f = Fixture::new();
    // Actor and critic may have replicas (one per worker); reward and reference may not.
    let yaml = format!(
        "{BASE}workers:\n  - name: a\n    roles: [actor, critic, reward]\n  - name: b\n    roles: [reward, reference, actor]\n"
    );
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("workers: role reward is placed on workers[0] (a) and workers[1] (b)"),
        "{msg}"
    );
    assert!(
        msg.contains("only actor, critic and generator may have replicas"),
        "{msg}"
    );
    assert!(msg.contains(&f.at(line_of(&yaml, "workers:"))), "{msg}");
}

#[test]
fn more_replicas_than_minibatch_rows_is_refused() {
    let f = Fixture::new();
    let yaml = format!(
        "{BASE}workers:\n  - {{name: a, roles: [actor, critic, reward, reference]}}\n  - {{name: b, roles: [actor, generator]}}\n  - {{name: c, roles: [actor, generator]}}\n"
    );
    let loaded = f
        .load(&yaml, &[], &[])
        .expect("three actor replicas and two generators are a valid placement");
    assert_eq!(loaded.config.replicas(rlhf_config::Role::Actor), 3);
    assert_eq!(loaded.config.replicas(rlhf_config::Role::Generator), 2);
    let msg = err(f.load(
        &yaml,
        &["train.minibatch_size=2", "train.micro_batch_size=1"],
        &[],
    ));
    assert!(msg.starts_with("train.minibatch_size: the minibatch of 2 sequences is sharded over the 3 actor replicas"), "{msg}");
}

#[test]
fn a_role_listed_twice_on_one_worker_names_its_roles() {
    let f = Fixture::new();
    let yaml = format!(
        "{BASE}workers:\n  - name: a\n    roles: [actor, critic]\n  - name: b\n    roles: [reward, reward, reference]\n"
    );
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("workers[1].roles: role reward is listed twice"),
        "{msg}"
    );
    assert!(
        msg.contains(&f.at(line_of(&yaml, "[reward, reward"))),
        "{msg}"
    );
}

#[test]
fn a_missing_role_is_named() {
    let f = Fixture::new();
    let yaml = format!(
        "{BASE}workers:\n  - name: a\n    roles: [actor, reference]\n  - name: b\n    roles: [reward]\n"
    );
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("workers: role critic is placed on no worker"),
        "{msg}"
    );
    assert!(msg.contains(&f.at(line_of(&yaml, "workers:"))), "{msg}");
    assert!(msg.contains("only ppo trains a critic"), "{msg}");

    // The REINFORCE family trains no critic, so none need be placed.
    let grpo = format!("{yaml}algorithm:\n  name: grpo\n");
    f.load(&grpo, &["rollout.samples_per_prompt=2"], &[])
        .unwrap();
}

#[test]
fn worker_names_are_required_unique_and_safe() {
    let f = Fixture::new();
    let yaml = format!(
        "{BASE}workers:\n  - name: a\n    roles: [actor, critic]\n  - name: a\n    roles: [reward, reference]\n"
    );
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("workers[1].name: duplicate worker name `a`"),
        "{msg}"
    );
    let second = yaml
        .lines()
        .collect::<Vec<_>>()
        .iter()
        .rposition(|l| l.contains("name: a"))
        .unwrap()
        + 1;
    assert!(msg.contains(&f.at(second)), "{msg}");

    let yaml = format!(
        "{BASE}workers:\n  - name: a\n    roles: [actor, critic]\n  - roles: [reward, reference]\n"
    );
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(msg.starts_with("workers[1].name: required"), "{msg}");
    // No `name:` line: the item's own line is the nearest the file has.
    assert!(msg.contains(&f.at(line_of(&yaml, "- roles"))), "{msg}");

    let msg = err(f.load(BASE, &["workers.0.name=a/b"], &[]));
    assert!(
        msg.starts_with("workers[0].name: `a/b` is not a valid worker name"),
        "{msg}"
    );
}

#[test]
fn a_missing_model_dir_names_the_key_and_the_path() {
    let f = Fixture::new();
    let yaml = BASE.replace("models/policy", "models/missing");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(msg.starts_with("models.policy: model directory"), "{msg}");
    assert!(
        msg.contains(&f.path().join("models/missing").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains(&f.at(line_of(&yaml, "policy:"))), "{msg}");

    // A directory without config.json.
    std::fs::create_dir_all(f.path().join("models/empty")).unwrap();
    let yaml = BASE.replace("models:\n", "models:\n  critic: models/empty\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("models.critic:") && msg.contains("no config.json"),
        "{msg}"
    );
    assert!(msg.contains(&f.at(line_of(&yaml, "critic:"))), "{msg}");
}

#[test]
fn the_reward_model_is_required_unless_the_reward_is_a_rule() {
    let f = Fixture::new();
    let yaml = BASE.replace("  reward:\n    path: models/rm\n", "");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(msg.starts_with("models.reward.path: required"), "{msg}");
    for kind in ["exact_match", "math"] {
        let loaded = f
            .load(&yaml, &[&format!("models.reward.kind={kind}")], &[])
            .unwrap();
        assert_eq!(loaded.config.models.reward.path, None);
        assert!(loaded.config.models.reward.kind.needs_answer());
    }
}

#[test]
fn math_rewards_refuse_exact_match_keys_and_an_empty_marker() {
    let f = Fixture::new();
    let yaml = BASE.replace(
        "  reward:\n    path: models/rm\n",
        "  reward:\n    kind: math\n",
    );
    let loaded = f.load(&yaml, &[], &[]).unwrap();
    assert_eq!(loaded.config.models.reward.kind.name(), "math");
    let msg = err(f.load(&yaml, &["models.reward.extract=full"], &[]));
    assert!(
        msg.starts_with("models.reward.extract: ")
            && msg.contains("kind: exact_match")
            && msg.contains("remove the key"),
        "{msg}"
    );
    let no_marker = yaml.replace("kind: math\n", "kind: math\n    marker: \"\"\n");
    let msg = err(f.load(&no_marker, &[], &[]));
    assert!(
        msg.starts_with("models.reward.marker: must not be empty with kind: math")
            && msg.contains(&f.at(line_of(&no_marker, "marker:"))),
        "{msg}"
    );
}

#[test]
fn http_rewards_need_an_http_url_that_other_kinds_refuse() {
    let f = Fixture::new();
    let yaml = BASE.replace(
        "  reward:\n    path: models/rm\n",
        "  reward:\n    kind: http\n",
    );
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("models.reward.url: required with kind: http")
            && msg.contains("http://host:port/path"),
        "{msg}"
    );
    let with_url = yaml.replace(
        "kind: http\n",
        "kind: http\n    url: 127.0.0.1:8000/score\n",
    );
    let msg = err(f.load(&with_url, &[], &[]));
    assert!(
        msg.starts_with(
            "models.reward.url: `127.0.0.1:8000/score` is not an http:// or https:// URL"
        ) && msg.contains(&f.at(line_of(&with_url, "url:"))),
        "{msg}"
    );
    let loaded = f
        .load(
            &yaml,
            &["models.reward.url=http://127.0.0.1:8000/score"],
            &[],
        )
        .unwrap();
    let r = &loaded.config.models.reward;
    assert_eq!(r.url.as_deref(), Some("http://127.0.0.1:8000/score"));
    assert_eq!(
        (r.timeout_s, r.retries, r.concurrency, r.batch_size),
        (30.0, 2, 4, 64)
    );
    assert!(!r.kind.needs_answer());
    for (set, key) in [
        ("models.reward.timeout_s=0", "models.reward.timeout_s"),
        ("models.reward.concurrency=0", "models.reward.concurrency"),
        ("models.reward.batch_size=0", "models.reward.batch_size"),
    ] {
        let msg = err(f.load(
            &yaml,
            &["models.reward.url=http://127.0.0.1:8000/score", set],
            &[],
        ));
        assert!(msg.starts_with(&format!("{key}: ")), "{set}: {msg}");
    }
    // A url on another kind is refused rather than silently ignored.
    for kind in ["model", "exact_match", "math"] {
        let msg = err(f.load(
            BASE,
            &[
                &format!("models.reward.kind={kind}"),
                "models.reward.url=http://127.0.0.1:8000/score",
            ],
            &[],
        ));
        assert!(
            msg.starts_with(&format!(
                "models.reward.url: is for kind: http, not kind: {kind}; remove the key"
            )),
            "{msg}"
        );
    }
}

#[test]
fn several_reward_sources_are_named_weighted_and_checked_each() {
    let f = Fixture::new();
    let yaml = BASE.replace(
        "  reward:\n    path: models/rm\n",
        "  rewards:\n    - {kind: math, weight: 2.0}\n    - {name: helpful, path: models/rm, weight: 0.5}\n",
    );
    let loaded = f.load(&yaml, &[], &[]).unwrap();
    let m = &loaded.config.models;
    let sources = m.reward_sources();
    let seen: Vec<(&str, f64, String)> = sources
        .iter()
        .map(|s| (s.name, s.config.weight, s.key.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("math", 2.0, "models.rewards[0]".to_string()),
            ("helpful", 0.5, "models.rewards[1]".to_string())
        ]
    );
    // Paths resolve against the file in list items too; the rule needs answers.
    assert_eq!(
        sources[1].config.path.as_deref(),
        Some(f.dir.path().join("models/rm").as_path())
    );
    assert!(m.rewards_need_answer());
    assert_eq!(m.reward_model_source().unwrap().name, "helpful");

    // Each source's keys are checked under its own index.
    let msg = err(f.load(
        &yaml.replace("name: helpful, path: models/rm", "name: helpful"),
        &[],
        &[],
    ));
    assert!(msg.starts_with("models.rewards[1].path: required"), "{msg}");
    let msg = err(f.load(
        &yaml.replace("kind: math,", "kind: math, url: http://x,"),
        &[],
        &[],
    ));
    assert!(
        msg.starts_with("models.rewards[0].url: is for kind: http, not kind: math"),
        "{msg}"
    );
    // Names are unique and usable as metrics keys.
    let msg = err(f.load(&yaml.replace("name: helpful", "name: math"), &[], &[]));
    assert!(
        msg.starts_with("models.rewards[1].name: `math` is also the name of models.rewards[0]"),
        "{msg}"
    );
    let msg = err(f.load(&yaml.replace("name: helpful", "name: \"a b\""), &[], &[]));
    assert!(
        msg.starts_with("models.rewards[1].name: `a b`: use letters"),
        "{msg}"
    );
    // One place for the sources: not both keys.
    let msg = err(f.load(&yaml, &["models.reward.kind=math"], &[]));
    assert!(
        msg.starts_with("models.reward: is set together with models.rewards"),
        "{msg}"
    );
    // A weight must be a number.
    let msg = err(f.load(&yaml, &["models.rewards.0.weight=.nan"], &[]));
    assert!(
        msg.starts_with("models.rewards[0].weight: must be a finite"),
        "{msg}"
    );
}

#[test]
fn a_missing_prompts_file_is_named() {
    let f = Fixture::new();
    let yaml = BASE.replace("data/prompts.jsonl", "data/nope.jsonl");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(msg.starts_with("rollout.prompts: prompts file"), "{msg}");
    assert!(msg.contains(&f.at(line_of(&yaml, "prompts:"))), "{msg}");
}

#[test]
fn a_minibatch_that_does_not_divide_the_rollout_batch() {
    let f = Fixture::new();
    let yaml = format!("{BASE}train:\n  minibatch_size: 3\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("train.minibatch_size: 3 does not divide the rollout batch of 8"),
        "{msg}"
    );
    assert!(
        msg.contains(&f.at(line_of(&yaml, "minibatch_size"))),
        "{msg}"
    );

    // 4 divides 8, but the default micro batch of 8 does not divide 4.
    let yaml = format!("{BASE}train:\n  minibatch_size: 4\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("train.micro_batch_size: 8 does not divide the minibatch size 4"),
        "{msg}"
    );
    let loaded = f.load(&yaml, &["train.micro_batch_size=2"], &[]).unwrap();
    assert_eq!(loaded.config.minibatch_size(), 4);
}

#[test]
fn range_and_cross_field_rules() {
    let f = Fixture::new();
    for (set, key) in [
        (
            "launcher.heartbeat_timeout_ms=500",
            "launcher.heartbeat_timeout_ms",
        ),
        ("launcher.startup_timeout_s=0", "launcher.startup_timeout_s"),
        ("algorithm.gamma=1.5", "algorithm.gamma"),
        ("algorithm.dual_clip=1.0", "algorithm.dual_clip"),
        ("algorithm.baseline_decay=1", "algorithm.baseline_decay"),
        ("algorithm.kl.coef=-1", "algorithm.kl.coef"),
        ("algorithm.reward.std=0", "algorithm.reward.std"),
        ("rollout.temperature=.nan", "rollout.temperature"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("train.critic.beta2=1", "train.critic.beta2"),
        ("workers.2.threads=0", "workers[2].threads"),
        ("launcher.slurm.time=12:00", "launcher.slurm.time"),
        ("run.name=..", "run.name"),
    ] {
        let msg = err(f.load(BASE, &[set], &[]));
        assert!(msg.starts_with(&format!("{key}: ")), "{set}: {msg}");
        assert!(msg.contains(&format!("from --set {set}")), "{msg}");
    }
}

#[test]
fn callers_report_their_own_checks_the_same_way() {
    let f = Fixture::new();
    let yaml = format!("{BASE}algorithm:\n  kl:\n    coef: 0.01\n");
    let loaded = f.load(&yaml, &[], &[("RLHF_TRAIN__STEPS", "3")]).unwrap();
    let line = line_of(&yaml, "coef");
    assert_eq!(loaded.locate("algorithm.kl.coef"), Some(f.at(line)));
    assert_eq!(loaded.locate("algorithm.kl.target"), None);
    assert_eq!(loaded.provenance.line("workers.0.name"), None);

    let e = loaded.error_at("algorithm.kl.coef", "too large for this model");
    assert_eq!(
        e.to_string(),
        format!(
            "algorithm.kl.coef: too large for this model (at {})",
            f.at(line)
        )
    );
    let ConfigError::Invalid { key, origin, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(key, "algorithm.kl.coef");
    assert!(matches!(origin, Origin::File { line: Some(l), .. } if *l == line));

    let e = loaded.error_at("train.steps", "no");
    assert!(
        e.to_string()
            .ends_with("(from environment variable RLHF_TRAIN__STEPS)"),
        "{e}"
    );
}

#[test]
fn nccl_groups_need_cuda_devices() {
    let f = Fixture::new();
    let yaml = format!(
        "{BASE}launcher:\n  collective_backend: nccl\nworkers:\n  - {{name: a, roles: [actor, critic, reward, reference], device: cuda:0}}\n  - {{name: g, roles: [generator]}}\n"
    );
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("workers[1].device: worker `g` is in a collective group"),
        "{msg}"
    );
    assert!(msg.contains("needs a CUDA device, not cpu"), "{msg}");
    // auto picks TCP for such a group: valid.
    let auto = yaml.replace("collective_backend: nccl", "collective_backend: auto");
    f.load(&auto, &[], &[])
        .expect("auto accepts a CPU generator");
}

#[test]
fn the_shipped_run_files_load() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // The run files name assets made elsewhere (the demo's, a cluster's shared filesystem):
    // point those paths at a stand-in here.
    let f = Fixture::new();
    let dir = f.path().display().to_string();
    let prompts = f.write("prompts.jsonl", "{\"prompt\": \"hi\"}\n");
    f.write("config.json", "{}");
    f.write("question.jsonl", "");
    let sets: Vec<String> = [
        format!("models.policy={dir}"),
        format!("models.critic={dir}"),
        format!("models.reward.path={dir}"),
        format!("rollout.prompts={}", prompts.display()),
        format!("validation.mt_bench={dir}"),
    ]
    .into();
    rlhf_config::load(&root.join("configs/local.yaml"), &sets, vars(&[]))
        .unwrap_or_else(|e| panic!("configs/local.yaml does not load: {e}"));
    let example = rlhf_config::load(&root.join("configs/example-command.yaml"), &sets, vars(&[]))
        .unwrap_or_else(|e| panic!("configs/example-command.yaml does not load: {e}"));
    assert_eq!(
        example.config.models.reward.command,
        ["python3", "example-reward.py"]
    );
    let loaded = rlhf_config::load(&root.join("cluster/example.yaml"), &sets, vars(&[]))
        .unwrap_or_else(|e| panic!("cluster/example.yaml does not load: {e}"));
    let c = &loaded.config;
    // Four actor and four critic replicas with ZeRO-2 (the 8B layout `plan` fits; plan_8b.rs).
    assert_eq!(c.replicas(rlhf_config::Role::Actor), 4);
    assert_eq!(c.replicas(rlhf_config::Role::Critic), 4);
    assert_eq!(c.replicas(rlhf_config::Role::Generator), 4);
    assert_eq!(c.train.zero_stage, 2);
    assert!(c.train.gradient_checkpointing);
}

#[test]
fn async_generation_needs_generators() {
    let f = Fixture::new();
    let msg = err(f.load(BASE, &["rollout.async_generation=true"], &[]));
    assert!(
        msg.starts_with("rollout.async_generation: needs generator workers"),
        "{msg}"
    );
}

#[test]
fn multi_node_addresses_and_slurm_time_rules() {
    let f = Fixture::new();
    let slurm =
        format!("{BASE}launcher:\n  kind: slurm\n  slurm: {{nodes: 2, time: \"00:10:00\"}}\n");
    // Workers round-robin over two nodes cannot meet on loopback.
    let msg = err(f.load(&slurm, &[], &[]));
    assert!(
        msg.starts_with("launcher.bind: 127.0.0.1 is loopback, but workers are placed on 2 nodes"),
        "{msg}"
    );
    f.load(&slurm, &["launcher.bind=0.0.0.0"], &[])
        .expect("every interface is fine");
    f.load(&slurm, &["launcher.interface=eth0"], &[])
        .expect("an interface is fine");
    // One node: loopback is enough.
    f.load(&slurm, &["launcher.slurm.nodes=1"], &[])
        .expect("one node");
    for (set, key, says) in [
        (
            "launcher.slurm.signal_grace_s=600",
            "launcher.slurm.signal_grace_s",
            "600 s is not shorter than the job's time limit launcher.slurm.time = 00:10:00 (600 s)",
        ),
        (
            "launcher.interface=eth 0",
            "launcher.interface",
            "is not a network interface name",
        ),
    ] {
        let msg = err(f.load(&slurm, &["launcher.bind=0.0.0.0", set], &[]));
        assert!(msg.starts_with(&format!("{key}: ")), "{set}: {msg}");
        assert!(msg.contains(says), "{set}: {msg}");
    }
    let msg = err(f.load(
        &slurm,
        &["launcher.bind=10.0.0.1", "launcher.interface=eth0"],
        &[],
    ));
    assert!(
        msg.starts_with(
            "launcher.interface: both launcher.bind (10.0.0.1) and launcher.interface (eth0)"
        ),
        "{msg}"
    );
    f.load(
        &slurm,
        &["launcher.bind=0.0.0.0", "launcher.slurm.signal_grace_s=599"],
        &[],
    )
    .expect("a grace time below the limit");
}

#[test]
fn lora_is_off_by_default_and_its_keys_are_checked() {
    let f = Fixture::new();
    assert_eq!(f.load(BASE, &[], &[]).unwrap().config.models.lora, None);
    let yaml = BASE.replace("models:\n", "models:\n  lora: {}\n");
    let lora = f.load(&yaml, &[], &[]).unwrap().config.models.lora.unwrap();
    assert_eq!(lora, rlhf_config::LoraConfig::default());
    assert_eq!((lora.rank, lora.alpha, lora.dropout), (8, 16.0, 0.0));
    assert_eq!(lora.targets.len(), 7);
    let yaml = BASE.replace(
        "models:\n",
        "models:\n  lora:\n    rank: 4\n    targets: [q_proj, v_proj]\n",
    );
    let lora = f.load(&yaml, &[], &[]).unwrap().config.models.lora.unwrap();
    assert_eq!((lora.rank, lora.targets.len()), (4, 2));

    for (set, key, says) in [
        ("models.lora.rank=0", "models.lora.rank:", ">= 1"),
        ("models.lora.dropout=1.0", "models.lora.dropout:", "[0, 1)"),
        ("models.lora.targets=[]", "models.lora.targets:", "q_proj"),
        ("models.lora.targets=[qkv]", "models.lora.targets:", "`qkv`"),
    ] {
        let msg = err(f.load(&yaml, &[set], &[]));
        assert!(msg.starts_with(key) && msg.contains(says), "{set}: {msg}");
    }
}

#[test]
fn lora_with_the_policy_as_reference_needs_no_reference_worker() {
    let f = Fixture::new();
    let workers = "workers:\n  - {name: a, roles: [actor, critic, reward]}\n";
    let plain = format!("{BASE}{workers}");
    // Without LoRA the reference is its own role and must be placed.
    let msg = err(f.load(&plain, &[], &[]));
    assert!(
        msg.starts_with("workers: role reference is placed on no worker"),
        "{msg}"
    );
    // With LoRA and the policy as reference (unset, or the same directory spelled another
    // way) the actor's base is the reference.
    let lora = plain.replace("models:\n", "models:\n  lora: {}\n");
    let with_ref = |r: &str| lora.replace("models:\n", &format!("models:\n  reference: {r}\n"));
    for yaml in [
        lora.clone(),
        with_ref("models/./policy"),
        with_ref("models/../models/policy"),
    ] {
        let c = f.load(&yaml, &[], &[]).unwrap().config;
        assert!(c.models.reference_is_actor_base(), "{yaml}");
    }
    // Another reference directory keeps its own role, so it must be placed.
    let msg = err(f.load(&with_ref("models/ref"), &[], &[]));
    assert!(
        msg.starts_with("workers: role reference is placed on no worker"),
        "{msg}"
    );
}

#[test]
fn command_rewards_need_a_command_that_other_kinds_refuse() {
    let f = Fixture::new();
    let yaml = BASE.replace(
        "  reward:\n    path: models/rm\n",
        "  reward:\n    kind: command\n",
    );
    for set in [&[][..], &["models.reward.command=[\"\"]"][..]] {
        let msg = err(f.load(&yaml, set, &[]));
        assert!(
            msg.starts_with("models.reward.command: required with kind: command")
                && msg.contains("[python3, my_reward.py]"),
            "{set:?}: {msg}"
        );
    }
    let with_command = yaml.replace(
        "kind: command\n",
        "kind: command\n    command: [python3, my_reward.py]\n",
    );
    let r = f
        .load(&with_command, &[], &[])
        .unwrap()
        .config
        .models
        .reward;
    assert_eq!(r.command, ["python3", "my_reward.py"]);
    assert_eq!((r.timeout_s, r.concurrency, &r.workdir), (30.0, 4, &None));
    assert!(!r.kind.needs_answer());
    for (set, key) in [
        ("models.reward.timeout_s=0", "models.reward.timeout_s"),
        ("models.reward.concurrency=0", "models.reward.concurrency"),
    ] {
        let msg = err(f.load(&with_command, &[set], &[]));
        assert!(msg.starts_with(&format!("{key}: ")), "{set}: {msg}");
    }
    // The command's keys on another kind are refused rather than silently ignored.
    for kind in ["model", "exact_match", "math"] {
        for (set, key) in [
            ("models.reward.command=[python3, r.py]", "command"),
            ("models.reward.workdir=data", "workdir"),
        ] {
            let msg = err(f.load(BASE, &[&format!("models.reward.kind={kind}"), set], &[]));
            assert!(
                msg.starts_with(&format!(
                    "models.reward.{key}: is for kind: command, not kind: {kind}; remove the key"
                )),
                "{msg}"
            );
        }
    }
}

#[test]
fn a_command_rewards_workdir_is_relative_to_the_run_file() {
    let f = Fixture::new();
    std::fs::create_dir_all(f.path().join("configs/rewards")).unwrap();
    let yaml = BASE
        .replace("models/", "../models/")
        .replace("data/", "../data/")
        .replace(
            "  reward:\n    path: ../models/rm\n",
            "  reward:\n    kind: command\n    command: [python3, r.py]\n    workdir: rewards\n",
        );
    let file = f.write("configs/run.yaml", &yaml);
    let c = rlhf_config::load(&file, &[], vars(&[])).unwrap().config;
    assert_eq!(
        c.models.reward.workdir,
        Some(f.path().join("configs/rewards"))
    );
    // A directory that is not there is named with the file's line, before any worker starts.
    let gone = f.write(
        "configs/gone.yaml",
        &yaml.replace("workdir: rewards", "workdir: nope"),
    );
    let msg = err(rlhf_config::load(&gone, &[], vars(&[])));
    assert!(
        msg.starts_with(&format!(
            "models.reward.workdir: directory {} does not exist",
            f.path().join("configs/nope").display()
        )) && msg.contains(&format!(
            "{}:{}",
            gone.display(),
            line_of(&yaml, "workdir:")
        )),
        "{msg}"
    );
}
