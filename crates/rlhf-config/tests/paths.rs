//! Relative path resolution: paths from the file against the file's directory, paths from env
//! or --set (and defaults) against the working directory; absolute paths untouched.

mod common;
use common::*;

use rlhf_config::load;

#[test]
fn file_paths_resolve_against_the_file_directory() {
    let f = Fixture::new();
    // The file sits in a subdirectory and reaches the fixtures with `..`.
    std::fs::create_dir_all(f.path().join("configs")).unwrap();
    let yaml = format!(
        "{}launcher:\n  worker_bin: bin/rlhf-worker\n",
        BASE.replace("models/", "../models/")
            .replace("data/", "../data/")
            .replace("models:\n", "models:\n  reference: ../models/ref\n")
    );
    let file = f.write("configs/run.yaml", &yaml);
    let loaded = load(&file, &[], vars(&[])).unwrap();
    let c = &loaded.config;
    let configs = f.path().join("configs");
    assert_eq!(c.models.policy, configs.join("../models/policy"));
    assert_eq!(c.models.reference, Some(configs.join("../models/ref")));
    assert_eq!(c.models.reference_dir(), configs.join("../models/ref"));
    assert_eq!(
        c.models.critic_dir(),
        c.models.policy,
        "critic defaults to the policy"
    );
    assert_eq!(c.models.reward.path, Some(configs.join("../models/rm")));
    assert_eq!(c.rollout.prompts, configs.join("../data/prompts.jsonl"));
    assert_eq!(c.launcher.worker_bin, Some(configs.join("bin/rlhf-worker")));
    // run.dir was not in the file: its default resolves against the working directory.
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(c.run.dir, cwd.join("runs"));
    assert_eq!(c.run_dir(), cwd.join("runs/t"));
}

#[test]
fn override_paths_resolve_against_the_working_directory() {
    let f = Fixture::new();
    let cwd = std::env::current_dir().unwrap();
    let loaded = f
        .load(
            BASE,
            &["run.dir=out/runs"],
            &[("RLHF_LAUNCHER__WORKER_BIN", "target/w")],
        )
        .unwrap();
    assert_eq!(loaded.config.run.dir, cwd.join("out/runs"));
    assert_eq!(
        loaded.config.launcher.worker_bin,
        Some(cwd.join("target/w"))
    );

    // A relative prompts path from --set is looked up from the working directory, not the file's.
    let msg = err(f.load(BASE, &["rollout.prompts=data/prompts.jsonl"], &[]));
    assert!(msg.starts_with("rollout.prompts: prompts file"), "{msg}");
    assert!(
        msg.contains(&cwd.join("data/prompts.jsonl").display().to_string()),
        "{msg}"
    );
}

#[test]
fn absolute_paths_are_kept() {
    let f = Fixture::new();
    let policy = f.path().join("models/policy");
    let set = format!("models.policy={}", policy.display());
    let yaml = BASE.replace("  name: t\n", "  name: t\n  dir: /var/runs\n");
    let loaded = f.load(&yaml, &[&set], &[]).unwrap();
    assert_eq!(loaded.config.models.policy, policy);
    assert_eq!(loaded.config.run.dir, std::path::Path::new("/var/runs"));
}
