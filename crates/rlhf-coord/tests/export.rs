//! `rlhf-coord export` and `rlhf-coord generate` on run and checkpoint directories, with real
//! training runs (tiny model, RLOO, two steps, a checkpoint every step): the exported directory
//! loads in `transformers` and decodes greedily to the same tokens as ours; it holds the chosen
//! step's weights and no optimizer or trainer state; `--step`, `--best` and `--latest` pick the
//! right checkpoint; a LoRA run exports merged (and `--adapter-only` loads with `peft` on the
//! base to the same tokens); bad inputs are refused with messages that say what is wrong.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{arithmetic_prompts, coord, launch, python, text, tiny_model, worker_bin};

/// A tiny policy, arithmetic prompts and a two-step RLOO run with a checkpoint at each step;
/// `lora` is YAML under `models:` (empty for full fine-tuning).
fn train(dir: &Path, lora: &str, lr: f64) -> PathBuf {
    tiny_model(&dir.join("policy"));
    arithmetic_prompts(dir, 4);
    let yaml = format!(
        "run: {{name: t, dir: runs, seed: 3}}\n\
         launcher: {{worker_bin: {}, heartbeat_interval_ms: 100, heartbeat_timeout_ms: 2000, startup_timeout_s: 60}}\n\
         workers:\n  - {{name: w, roles: [actor, reference, reward], threads: 1}}\n\
         models:\n  policy: policy\n  reward: {{kind: exact_match}}\n{lora}\
         algorithm: {{name: rloo, kl: {{coef: 0.01}}}}\n\
         rollout: {{prompts: prompts.jsonl, batch_size: 4, samples_per_prompt: 2, max_new_tokens: 6}}\n\
         train: {{steps: 2, micro_batch_size: 4, actor: {{lr: {lr:?}}}}}\n\
         checkpoint: {{every: 1, keep_last: 2}}\n\
         logging: {{progress: false, plot: false}}\n",
        worker_bin().display()
    );
    let f = dir.join("run.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = launch(&f, &[]);
    assert!(out.status.success(), "launch failed:\n{}", text(&out));
    dir.join("runs/t")
}

fn export(run: &Path, out: &Path, flags: &[&str]) -> Output {
    coord()
        .arg("export")
        .arg(run)
        .arg("--out")
        .arg(out)
        .args(flags)
        .output()
        .unwrap()
}

fn export_ok(run: &Path, out: &Path, flags: &[&str]) {
    let o = export(run, out, flags);
    assert!(o.status.success(), "export {flags:?} failed:\n{}", text(&o));
}

/// The error of a command that must fail.
fn refused(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure:\n{}", text(o));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Our greedy continuation of `prompt` from `model` (a model, checkpoint or run directory):
/// (token ids, log-probs).
fn ours(model: &Path, prompt: &str) -> (Vec<i64>, Vec<f64>) {
    let o = coord()
        .arg("generate")
        .arg(model)
        .args(["--prompt", prompt, "--greedy", "--json", "--max-new-tokens"])
        .arg(MAX_NEW.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "generate failed:\n{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    let ids = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let lps = v["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (ids, lps)
}

const MAX_NEW: usize = 16;
const PROMPTS: [&str; 2] = ["1+2=", "3+3="];

/// transformers' (and peft's) greedy new ids for each job, via `export_reference.py`.
fn reference(tmp: &Path, jobs: serde_json::Value) -> Vec<Vec<i64>> {
    let (jobs_path, out_path) = (tmp.join("jobs.json"), tmp.join("ref.json"));
    std::fs::write(&jobs_path, jobs.to_string()).unwrap();
    let script = common::repo().join("scripts/golden/export_reference.py");
    let o = std::process::Command::new(python())
        .arg(&script)
        .arg(&jobs_path)
        .arg(&out_path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        o.status.success(),
        "{} failed (did you run `scripts/setup-torch.sh --test-deps`?):\n{}",
        script.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    v.iter()
        .map(|r| {
            r["new_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn ckpt(run: &Path, step: u64) -> PathBuf {
    run.join(format!("checkpoints/step-{step:06}"))
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}: token {i}: {x} vs {y}");
    }
}

#[test]
fn full_fine_tune_exports_a_model_transformers_decodes_like_we_do() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let run = train(t, "", 1e-2);
    let policy = t.join("policy");

    // Default --latest: step 2's weights, the model files only.
    let latest = t.join("export-latest");
    export_ok(&run, &latest, &[]);
    let got = files(&latest);
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(got.contains(&f.to_string()), "{f} missing from {got:?}");
    }
    for f in got.iter() {
        assert!(
            !f.contains("optimizer") && !f.contains("trainer_state") && !f.contains("adapter"),
            "{f} must not be exported: {got:?}"
        );
    }
    // No staging directory left next to the output.
    assert!(
        !files(t).iter().any(|f| f.contains(".tmp-")),
        "{:?}",
        files(t)
    );
    let weights = |d: &Path| bytes(&d.join("model.safetensors"));
    assert_eq!(weights(&latest), weights(&ckpt(&run, 2).join("actor")));
    assert_ne!(
        weights(&latest),
        weights(&policy),
        "the export holds the initial weights: training changed nothing?"
    );

    // transformers reads the export and decodes greedily to our tokens.
    let jobs: Vec<serde_json::Value> = PROMPTS
        .iter()
        .map(|p| serde_json::json!({"model": latest, "prompt": p, "max_new_tokens": MAX_NEW}))
        .collect();
    let theirs = reference(t, serde_json::json!(jobs));
    for (p, want) in PROMPTS.iter().zip(&theirs) {
        let (ids, lps) = ours(&latest, p);
        assert_eq!(&ids, want, "prompt {p:?}: ours vs transformers");
        // generate takes the run directory (its latest checkpoint) and a checkpoint directory.
        let (run_ids, run_lps) = ours(&run, p);
        assert_eq!(run_ids, ids);
        assert_close(&run_lps, &lps, 0.0, "run dir vs export");
        let (ck_ids, ck_lps) = ours(&ckpt(&run, 2), p);
        assert_eq!(ck_ids, ids);
        assert_close(&ck_lps, &lps, 0.0, "checkpoint dir vs export");
    }

    // --step picks that step.
    let one = t.join("export-1");
    export_ok(&run, &one, &["--step", "1"]);
    assert_eq!(weights(&one), weights(&ckpt(&run, 1).join("actor")));
    assert_ne!(weights(&one), weights(&latest));

    // --best needs validation scores; with a ranking it takes the ranking's best.
    let e = refused(&export(&run, &t.join("best"), &["--best"]));
    assert!(e.contains("has no validation scores"), "{e}");
    assert!(e.contains("available steps: 1, 2"), "{e}");
    assert!(!t.join("best").exists());
    std::fs::write(
        run.join("checkpoints/ranking.json"),
        serde_json::json!({"best": "step-000001", "entries": [
            {"step": 1, "checkpoint": "step-000001", "score": 7.5, "judge": "reward_model"},
            {"step": 2, "checkpoint": "step-000002", "score": 6.0, "judge": "reward_model"}]})
        .to_string(),
    )
    .unwrap();
    export_ok(&run, &t.join("best"), &["--best"]);
    assert_eq!(weights(&t.join("best")), weights(&one));

    // Bad inputs.
    let e = refused(&export(&policy, &t.join("x"), &[]));
    assert!(e.contains("is not a run directory"), "{e}");
    let e = refused(&export(&t.join("nope"), &t.join("x"), &[]));
    assert!(
        e.contains("is not a run directory: it does not exist"),
        "{e}"
    );
    let e = refused(&export(&ckpt(&run, 2), &t.join("x"), &[]));
    assert!(
        e.contains("is a checkpoint directory, not a run directory"),
        "{e}"
    );
    assert!(e.contains("--step 2"), "{e}");
    let e = refused(&export(&run, &t.join("x"), &["--step", "7"]));
    assert!(
        e.contains("has no checkpoint of step 7; available steps: 1, 2"),
        "{e}"
    );
    let before = files(&latest);
    let e = refused(&export(&run, &latest, &[]));
    assert!(e.contains("already exists and is not empty"), "{e}");
    assert!(e.contains("export-latest"), "{e}");
    assert_eq!(
        files(&latest),
        before,
        "a refused export touched the directory"
    );
    let e = refused(&export(&run, &t.join("x"), &["--adapter-only"]));
    assert!(e.contains("has no LoRA adapters"), "{e}");
    let e = refused(&export(&run, &t.join("x"), &["--step", "1", "--best"]));
    assert!(e.contains("cannot be used with"), "{e}");
    assert!(!t.join("x").exists());
    // A damaged checkpoint is refused by export and by generate, naming the file.
    let w = ckpt(&run, 1).join("actor/model.safetensors");
    let mut b = bytes(&w);
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&w, b).unwrap();
    let e = refused(&export(&run, &t.join("x"), &["--step", "1"]));
    assert!(e.contains("does not verify against its manifest"), "{e}");
    assert!(e.contains("actor/model.safetensors"), "{e}");
    assert!(e.contains("sha256"), "{e}");
    let o = coord()
        .arg("generate")
        .arg(ckpt(&run, 1))
        .args(["--prompt", "1+1="])
        .output()
        .unwrap();
    let e = refused(&o);
    assert!(e.contains("does not verify against its manifest"), "{e}");
    let o = coord()
        .arg("generate")
        .arg(t)
        .args(["--prompt", "1+1="])
        .output()
        .unwrap();
    let e = refused(&o);
    assert!(
        e.contains("is neither a model directory (no ")
            && e.contains("config.json), a checkpoint directory"),
        "{e}"
    );
}

#[test]
fn lora_run_exports_merged_and_adapter_only_loads_with_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let run = train(t, "  lora: {rank: 4, alpha: 16}\n", 5e-2);
    let policy = t.join("policy");
    let actor = ckpt(&run, 2).join("actor");
    assert!(actor.join("adapter_model.safetensors").is_file());

    let merged = t.join("merged");
    export_ok(&run, &merged, &[]);
    let got = files(&merged);
    assert!(got.contains(&"model.safetensors".to_string()), "{got:?}");
    assert!(
        got.contains(&"generation_config.json".to_string()),
        "{got:?}"
    );
    assert!(
        !got.iter()
            .any(|f| f.contains("adapter") || f.contains("optimizer") || f.contains("trainer")),
        "{got:?}"
    );
    // The checkpoint's model.safetensors is the frozen base; the export has B A folded in.
    assert_eq!(
        bytes(&actor.join("model.safetensors")),
        bytes(&policy.join("model.safetensors"))
    );
    assert_ne!(
        bytes(&merged.join("model.safetensors")),
        bytes(&policy.join("model.safetensors"))
    );

    let adapter = t.join("adapter");
    export_ok(&run, &adapter, &["--adapter-only"]);
    let got = files(&adapter);
    assert!(got.contains(&"adapter_config.json".to_string()), "{got:?}");
    assert!(
        got.contains(&"adapter_model.safetensors".to_string()),
        "{got:?}"
    );
    assert!(
        !got.iter()
            .any(|f| f.starts_with("model.") || f == "config.json" || f.contains("optimizer")),
        "{got:?}"
    );

    // transformers on the merged export and peft on base + adapter decode like we do.
    let mut jobs = Vec::new();
    for p in PROMPTS {
        jobs.push(serde_json::json!({"model": merged, "prompt": p, "max_new_tokens": MAX_NEW}));
        jobs.push(serde_json::json!({"model": policy, "adapter": adapter, "prompt": p, "max_new_tokens": MAX_NEW}));
    }
    let theirs = reference(t, serde_json::json!(jobs));
    let mut any_differs = false;
    for (i, p) in PROMPTS.iter().enumerate() {
        let (ids, lps) = ours(&merged, p);
        assert_eq!(
            ids,
            theirs[2 * i],
            "prompt {p:?}: ours vs transformers (merged)"
        );
        assert_eq!(
            ids,
            theirs[2 * i + 1],
            "prompt {p:?}: ours vs peft (adapter)"
        );
        // generate on the checkpoint applies the adapters to the base: the merged model's
        // tokens and (to rounding) log-probs.
        let (ck_ids, ck_lps) = ours(&ckpt(&run, 2), p);
        assert_eq!(ck_ids, ids);
        assert_close(
            &ck_lps,
            &lps,
            1e-4,
            "checkpoint (base + adapters) vs merged export",
        );
        let (base_ids, base_lps) = ours(&policy, p);
        any_differs |=
            base_ids != ids || base_lps.iter().zip(&lps).any(|(a, b)| (a - b).abs() > 1e-3);
    }
    assert!(
        any_differs,
        "the merged export decodes exactly like the untrained base: adapters not applied?"
    );
}
