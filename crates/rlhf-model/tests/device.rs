//! The model on an accelerator: with `RLHF_TEST_CUDA=1` every check runs on GPU 0 (and fails if
//! there is none); without it the same checks run on the CPU, where they compare f32 against the
//! f64 reference. Logits of a padded batch agree with a CPU f64 forward of the same files to
//! 1e-4, cached greedy decoding equals the argmax of a full forward on the device, gradients of
//! the training forward agree with the CPU's, weights saved from the device are the bytes that
//! were loaded, and reduced precision generates finite log-probs.

mod common;

use std::path::Path;

use rlhf_model::{
    generate, token_logprobs, Family, GenerationConfig, LoadOptions, Model, Sampling, SaveOptions,
};
use tch::{Device, Kind, Tensor};

fn load(dir: &Path, device: Device, dtype: Kind) -> Model {
    Model::load(
        dir,
        &LoadOptions {
            device,
            dtype: Some(dtype),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("load {} on {device:?}: {e}", dir.display()))
}

/// A left-padded batch: row 1 has two pad columns, row 2 one.
fn batch(device: Device) -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&[
        5i64, 9, 13, 200, 31, 7, 0, 0, 8, 100, 3, 4, 0, 77, 77, 77, 77, 2,
    ])
    .view([3, 6]);
    let mask =
        Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1]).view([3, 6]);
    (ids.to_device(device), mask.to_device(device))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_device(Device::Cpu).to_kind(Kind::Double)
        - b.to_device(Device::Cpu).to_kind(Kind::Double))
    .abs()
    .max()
    .double_value(&[])
}

fn cases(root: &Path) -> Vec<(&'static str, std::path::PathBuf)> {
    vec![
        (
            "llama_gqa",
            common::tiny(&root.join("llama"), Family::Llama, Some(false), Some(2), 1),
        ),
        (
            "qwen2_bias_tied",
            common::tiny(&root.join("qwen2"), Family::Qwen2, Some(true), None, 2),
        ),
    ]
}

#[test]
fn logits_match_the_cpu_f64_reference_and_greedy_decoding_is_consistent() {
    let dev = rlhf_model::cuda::test_device();
    let tmp = tempfile::tempdir().unwrap();
    let _g = tch::no_grad_guard();
    for (name, dir) in cases(tmp.path()) {
        let m = load(&dir, dev, Kind::Float);
        let reference = load(&dir, Device::Cpu, Kind::Double);
        let (ids, mask) = batch(dev);
        let logits = m.logits(&m.forward_padded(&ids, &mask).unwrap()).unwrap();
        assert_eq!(logits.device(), dev, "{name}: logits left the device");
        let (cids, cmask) = batch(Device::Cpu);
        let want = reference
            .logits(&reference.forward_padded(&cids, &cmask).unwrap())
            .unwrap();
        // Padded positions are not compared: their values are unspecified.
        let keep = cmask.unsqueeze(-1).to_kind(Kind::Double);
        let diff = max_abs(
            &(logits.to_device(Device::Cpu).to_kind(Kind::Double) * &keep),
            &(want * &keep),
        );
        assert!(
            diff < 1e-4,
            "{name} on {dev:?}: max |Δlogits| {diff} vs CPU f64"
        );

        // Cached greedy decoding on the device picks the argmax of a full device forward.
        let prompts = vec![
            vec![5i64, 9, 13],
            vec![8i64, 100, 3, 4, 5, 6],
            vec![5i64, 9, 13],
        ];
        let out = generate(&m, &prompts, &GenerationConfig::greedy(24)).unwrap();
        assert_eq!(
            out.response_ids.device(),
            dev,
            "{name}: generation left the device"
        );
        let argmax = m
            .logits(
                &m.forward_padded(&out.sequences, &out.attention_mask)
                    .unwrap(),
            )
            .unwrap()
            .argmax(-1, false);
        let n = out.response_ids.size()[1];
        let expect = argmax.narrow(1, out.prompt_width - 1, n);
        assert!(
            expect.equal(&out.response_ids),
            "{name} on {dev:?}: cached greedy != argmax of the full forward"
        );

        // Seeded sampling repeats itself on the device.
        let cfg = GenerationConfig {
            sampling: Sampling::Sample {
                temperature: 1.0,
                top_k: Some(50),
                top_p: Some(0.9),
            },
            seed: 11,
            ..GenerationConfig::greedy(16)
        };
        let a = generate(&m, &prompts, &cfg).unwrap();
        let b = generate(&m, &prompts, &cfg).unwrap();
        assert!(
            a.response_ids.equal(&b.response_ids),
            "{name}: seeded sampling differs"
        );
    }
}

#[test]
fn training_gradients_match_the_cpu() {
    let dev = rlhf_model::cuda::test_device();
    let tmp = tempfile::tempdir().unwrap();
    for (name, dir) in cases(tmp.path()) {
        let grads = |d: Device| {
            let m = load(&dir, d, Kind::Float);
            let (ids, mask) = batch(d);
            let out = token_logprobs(&m, &ids, &mask, 1.0, true).unwrap();
            let mask = mask.narrow(1, 1, 5).to_kind(Kind::Float);
            let ent = out.entropy.unwrap();
            ((out.logprobs + ent * 0.1) * &mask)
                .sum(Kind::Float)
                .backward();
            m.named_tensors()
                .into_iter()
                .map(|(n, t)| (n, t.grad().to_device(Device::Cpu)))
                .collect::<Vec<_>>()
        };
        let on_dev = grads(dev);
        let on_cpu = grads(Device::Cpu);
        for ((n, g), (_, c)) in on_dev.iter().zip(&on_cpu) {
            let scale = c.abs().max().double_value(&[]).max(1e-3);
            let diff = max_abs(g, c) / scale;
            assert!(
                diff < 1e-3,
                "{name} on {dev:?}: grad of {n} differs by {diff} (relative)"
            );
        }
    }
}

#[test]
fn weights_saved_from_the_device_are_the_loaded_bytes_and_reduced_precision_generates() {
    let dev = rlhf_model::cuda::test_device();
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny(&tmp.path().join("m"), Family::Llama, Some(true), None, 9);
    let m = load(&dir, dev, Kind::Float);
    let out = tmp.path().join("saved");
    m.save(&out, &SaveOptions::default()).unwrap();
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        "saving from {dev:?} changed the weights' bytes"
    );
    if dev == Device::Cpu {
        return; // reduced precision on the CPU is covered by model_io.rs
    }
    for kind in [Kind::BFloat16, Kind::Half] {
        let m = load(&dir, dev, kind);
        let out = generate(&m, &[vec![1, 2, 3], vec![4]], &GenerationConfig::greedy(8)).unwrap();
        assert!(
            !bool::try_from(out.response_logprobs.isnan().any()).unwrap(),
            "{kind:?} on {dev:?}: NaN log-probs"
        );
    }
}
