//! Requests a worker must refuse before they reach a model or the allocator, checked on a real
//! daemon over gRPC: token ids outside the vocabulary (LogProbs, Generate; Values and TrainStep
//! share LogProbs' check) are `InvalidArgument` naming the row, column and value, and an
//! ImportWeights stream declaring more bytes than the model holds (1 TiB in one chunk) is
//! `InvalidArgument` naming the tensor, with the daemon still serving afterwards.

use rlhf_model::init::{init_model, InitSpec, Preset};
use rlhf_model::Family;
use rlhf_proto::auth::{AddToken, RunToken};
use rlhf_proto::pb::{self, worker_client::WorkerClient};
use rlhf_proto::wire::to_wire;
use tch::{Device, Kind, Tensor};
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

mod common;
use common::TOKEN;

type Client = WorkerClient<InterceptedService<Channel, AddToken>>;

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A daemon with a reference role "ref" on a tiny model; returns it, a client and the vocab.
async fn reference() -> (Daemon, Client, tempfile::TempDir, i64) {
    let tmp = tempfile::tempdir().unwrap();
    init_model(&InitSpec::new(Family::Llama, Preset::Tiny), tmp.path()).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    let vocab = config["vocab_size"].as_i64().unwrap();
    let (child, addr) = common::spawn_daemon("inputs", 60);
    let daemon = Daemon(child);
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = WorkerClient::with_interceptor(ch, AddToken(RunToken::new(TOKEN.into()).unwrap()));
    for (id, kind, spec) in [
        (
            "ref",
            pb::RoleKind::Reference,
            pb::create_role_request::Spec::Reference(pb::ReferenceSpec {}),
        ),
        (
            "gen",
            pb::RoleKind::Generator,
            pb::create_role_request::Spec::Generator(pb::GeneratorSpec { lora: None }),
        ),
    ] {
        c.create_role(pb::CreateRoleRequest {
            role_id: id.into(),
            kind: kind as i32,
            model_path: tmp.path().to_string_lossy().into_owned(),
            device: "cpu".into(),
            dtype: "f32".into(),
            seed: 1,
            spec: Some(spec),
        })
        .await
        .unwrap();
    }
    (daemon, c, tmp, vocab)
}

fn sequences(ids: &[i64]) -> pb::SequencesRequest {
    let ids = Tensor::from_slice(ids).view([2, 4]);
    let mask = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
    pb::SequencesRequest {
        role_id: "ref".into(),
        sequences: Some(pb::Sequences {
            input_ids: Some(to_wire("input_ids", &ids).unwrap()),
            attention_mask: Some(to_wire("attention_mask", &mask).unwrap()),
            prompt_width: 2,
            response_len: 2,
        }),
        temperature: 1.0,
        adapters_off: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_token_ids_and_oversized_weights_are_refused() {
    let (_daemon, mut c, _tmp, vocab) = reference().await;

    // In range: answered.
    let ok = c.log_probs(sequences(&[1, 2, 3, 4, 5, 6, 7, 8])).await;
    assert!(ok.is_ok(), "{ok:?}");

    // One id past the vocabulary in row 1, column 2; then a negative one in row 0.
    for (ids, row, col, value) in [
        (vec![1, 2, 3, 4, 5, 6, vocab, 8], 1, 2, vocab),
        (vec![1, -3, 3, 4, 5, 6, 7, 8], 0, 1, -3),
    ] {
        let e = c.log_probs(sequences(&ids)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let m = e.message();
        assert!(
            m.contains("sequences.input_ids")
                && m.contains(&format!("row {row} "))
                && m.contains(&format!("column {col}"))
                && m.contains(&format!("token id {value} "))
                && m.contains(&format!("0..{vocab}")),
            "{m}"
        );
    }

    // Generate's prompts are checked the same way.
    let e = c
        .generate(pb::GenerateRequest {
            role_id: "gen".into(),
            prompts: vec![
                pb::PromptIds { ids: vec![1, 2] },
                pb::PromptIds {
                    ids: vec![3, vocab + 5],
                },
            ],
            samples_per_prompt: 1,
            max_new_tokens: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("prompt 1") && e.message().contains(&format!("{}", vocab + 5)),
        "{}",
        e.message()
    );

    // A 1-byte chunk declaring a 1 TiB tensor: refused by size, not by the allocator.
    let huge = pb::WeightChunk {
        role_id: "gen".into(),
        name: "model.embed_tokens.weight".into(),
        dtype: pb::Dtype::U8 as i32,
        shape: vec![1 << 40],
        offset: 0,
        data: vec![0],
        total_bytes: 1 << 40,
    };
    let e = c
        .import_weights(tokio_stream::iter(vec![huge]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("model.embed_tokens.weight") && e.message().contains("1099511627776"),
        "{}",
        e.message()
    );
    // The daemon is still there.
    let ok = c.log_probs(sequences(&[1, 2, 3, 4, 5, 6, 7, 8])).await;
    assert!(ok.is_ok(), "{ok:?}");
}
