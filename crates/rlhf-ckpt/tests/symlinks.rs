//! Checkpoint discovery, verification and protection do not follow symlinks out of the run
//! directory: a `step-N` linked elsewhere, a checkpoint subdirectory linked elsewhere, and a
//! protection marker written through a link are all refused.

use std::os::unix::fs::symlink;
use std::path::Path;

use rlhf_ckpt::{checkpoints_dir, latest_valid, protect, unprotect, verify, CheckpointWriter};

fn commit(run: &Path, step: u64, payload: &[u8]) -> std::path::PathBuf {
    let w = CheckpointWriter::begin(run, step).unwrap();
    w.write_file("policy/model.safetensors", payload).unwrap();
    w.commit(serde_json::json!({})).unwrap().dir
}

#[test]
fn a_step_dir_symlinked_out_of_the_run_is_not_followed() {
    let run = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    commit(run.path(), 1, b"ours");
    // A complete, valid checkpoint outside the run, linked in as the newest step.
    let foreign = commit(elsewhere.path(), 9, b"theirs");
    let link = checkpoints_dir(run.path()).join("step-000009");
    symlink(&foreign, &link).unwrap();
    rlhf_ckpt::write_atomic(
        &checkpoints_dir(run.path()).join(rlhf_ckpt::LATEST),
        b"step-000009\n",
    )
    .unwrap();
    let r = latest_valid(run.path()).unwrap().unwrap();
    assert_eq!(r.checkpoint.step, 1, "{r}");
    assert!(
        r.rejected[0].reason.contains("outside"),
        "the rejection says why: {r}"
    );
    // Protection through the link would write into the foreign directory.
    let e = protect(&link).unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    assert!(unprotect(&link).is_err());
    assert!(!foreign.join(rlhf_ckpt::PROTECTED).exists());
}

#[test]
fn a_subdirectory_symlinked_out_of_a_checkpoint_fails_verification() {
    let run = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let dir = commit(run.path(), 3, b"weights");
    // The same bytes elsewhere: only the link, not the content, is wrong.
    let copy = elsewhere.path().join("policy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::write(copy.join("model.safetensors"), b"weights").unwrap();
    std::fs::remove_dir_all(dir.join("policy")).unwrap();
    symlink(&copy, dir.join("policy")).unwrap();
    let e = verify(&dir).unwrap_err().to_string();
    assert!(
        e.contains("policy/model.safetensors") && e.contains("outside"),
        "{e}"
    );
    // A file symlinked even to an identical file is refused.
    std::fs::remove_file(dir.join("policy")).unwrap();
    std::fs::create_dir(dir.join("policy")).unwrap();
    symlink(
        copy.join("model.safetensors"),
        dir.join("policy/model.safetensors"),
    )
    .unwrap();
    let e = verify(&dir).unwrap_err().to_string();
    assert!(
        e.contains("outside") || e.contains("not a regular file"),
        "{e}"
    );
}
