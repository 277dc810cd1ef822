//! Shard names in `model.safetensors.index.json` are confined to the model directory: `..`,
//! absolute names and symlinks out of it are refused with an error naming the index and its
//! `weight_map` key, before any file is opened.

use std::os::unix::fs::symlink;
use std::path::Path;

use rlhf_model::weights::{save_file, WeightFiles, INDEX_FILE};
use tch::{Kind, Tensor};

fn index(dir: &Path, shard: &str) {
    let json = serde_json::json!({"metadata": {}, "weight_map": {"w": shard}});
    std::fs::write(dir.join(INDEX_FILE), json.to_string()).unwrap();
}

fn open_err(dir: &Path) -> String {
    match WeightFiles::open(dir) {
        Ok(_) => panic!("the index was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn shard_names_leaving_the_model_directory_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    // A valid safetensors file beside the model directory: opening it would succeed.
    let evil = tmp.path().join("evil.safetensors");
    save_file(
        &evil,
        &[(
            "w".into(),
            Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)),
        )],
        Kind::Float,
    )
    .unwrap();

    for shard in ["../evil.safetensors", evil.to_str().unwrap()] {
        index(&model, shard);
        let msg = open_err(&model);
        assert!(
            msg.contains(INDEX_FILE) && msg.contains("weight_map") && msg.contains(shard),
            "{msg}"
        );
    }

    // A symlink inside the directory that points out of it.
    symlink(&evil, model.join("linked.safetensors")).unwrap();
    index(&model, "linked.safetensors");
    let msg = open_err(&model);
    assert!(msg.contains("outside"), "{msg}");

    // The same file really inside is fine.
    std::fs::remove_file(model.join("linked.safetensors")).unwrap();
    std::fs::copy(&evil, model.join("inside.safetensors")).unwrap();
    index(&model, "inside.safetensors");
    let files = WeightFiles::open(&model).unwrap();
    assert!(files.contains("w"));
}
