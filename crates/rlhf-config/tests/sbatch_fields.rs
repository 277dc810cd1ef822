//! The `launcher.slurm` strings written into the sbatch script (`partition`, `account`,
//! `extra_directives`) and `run.dir` (its `--output=`) are refused at load time when a line
//! break or a character that does not belong would inject shell lines, each error naming the
//! key and where its value came from.

mod common;
use common::*;

fn slurm(extra: &str) -> String {
    format!("{BASE}launcher:\n  kind: slurm\n  slurm:\n{extra}")
}

#[test]
fn a_partition_with_a_newline_is_refused_naming_the_key() {
    let f = Fixture::new();
    let yaml = slurm("    partition: \"gpu\\necho pwned > /tmp/x\"\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(msg.starts_with("launcher.slurm.partition:"), "{msg}");
    assert!(msg.contains("not a Slurm partition name"), "{msg}");
    assert!(msg.contains(&f.at(line_of(&yaml, "partition"))), "{msg}");
    // From --set too, named as such.
    let msg = err(f.load(
        &slurm("    nodes: 1\n"),
        &["launcher.slurm.partition=a;b"],
        &[],
    ));
    assert!(msg.starts_with("launcher.slurm.partition:"), "{msg}");
    assert!(msg.contains("--set"), "{msg}");
    // Names and comma-separated lists pass.
    f.load(&slurm("    partition: gpu-a100,debug\n"), &[], &[])
        .unwrap();
}

#[test]
fn an_account_with_shell_characters_is_refused() {
    let f = Fixture::new();
    for bad in ["\"proj$(id)\"", "\"proj x\"", "\"a\\rb\""] {
        let msg = err(f.load(&slurm(&format!("    account: {bad}\n")), &[], &[]));
        assert!(msg.starts_with("launcher.slurm.account:"), "{bad}: {msg}");
    }
    f.load(&slurm("    account: proj_42.x\n"), &[], &[])
        .unwrap();
}

#[test]
fn extra_directives_must_be_single_sbatch_options() {
    let f = Fixture::new();
    let yaml =
        slurm("    extra_directives:\n      - --exclusive\n      - \"--gres=gpu:4\\nrm -rf ~\"\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("launcher.slurm.extra_directives[1]:"),
        "{msg}"
    );
    assert!(msg.contains("line break"), "{msg}");
    let msg = err(f.load(&slurm("    extra_directives: [\"echo hi\"]\n"), &[], &[]));
    assert!(
        msg.starts_with("launcher.slurm.extra_directives[0]:")
            && msg.contains("not an sbatch option"),
        "{msg}"
    );
    f.load(
        &slurm("    extra_directives: [\"#SBATCH --gres=gpu:4\", \"-C a100&nvlink\", \"--mail-user=a@b.c\"]\n"),
        &[],
        &[],
    )
    .unwrap();
}

#[test]
fn a_run_dir_with_a_newline_is_refused() {
    let f = Fixture::new();
    let yaml = BASE.replace("run:\n", "run:\n  dir: \"runs\\nx\"\n");
    let msg = err(f.load(&yaml, &[], &[]));
    assert!(
        msg.starts_with("run.dir:") && msg.contains("line break"),
        "{msg}"
    );
}
