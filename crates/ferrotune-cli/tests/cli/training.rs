//! The training commands end to end on the shipped samples and a tiny fixture model:
//! sanity-train overfits (SFT loss, DPO reward accuracy, RM pairwise accuracy), kill-and-resume
//! reproduces the uninterrupted run bit for bit, and bad runs stop with clear errors.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{ferrotune, fixtures, stdout_json};

fn shared(file: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(file)
        .to_string_lossy()
        .to_string()
}

fn model() -> String {
    fixtures().join("qwen2-tiny").to_string_lossy().to_string()
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train_losses(run: &Path) -> Vec<f64> {
    metrics(run)
        .iter()
        .filter(|r| r["split"] == "train")
        .map(|r| r["loss"].as_f64().unwrap())
        .collect()
}

/// Runs `command` and asserts that it succeeded (its stderr otherwise).
fn ran(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_ok(args: &[&str]) -> serde_json::Value {
    stdout_json(&ferrotune(args))
}

/// The GPU paths (attention that recomputes its probabilities, the RMSNorm, SwiGLU, rotary and
/// log-prob ops, greedy ids), run on the CPU through their ops' CPU forwards: 4 SFT and 4 DPO
/// steps give the losses and gradient norms of the CPU's own path. What a GPU adds on top is
/// only the kernels' launches (cuda/kernels.cu is checked under emulation, the launches by
/// scripts/gpu/check.sh).
#[test]
fn the_gpu_paths_train_as_the_cpu_path_does() {
    let tmp = tempfile::tempdir().unwrap();
    // A random 5M Qwen2-shape model (grouped KV heads) with the fixture tokenizer.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = tmp.path().join("model");
    let made = ferrotune(&[
        "init-model",
        "--config",
        root.join("scripts/bench/configs/tiny.json")
            .to_str()
            .unwrap(),
        "--tokenizer",
        fixtures().join("tokenizer").to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--seed",
        "0",
    ]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    for (objective, data) in [("sft", "chat.jsonl"), ("dpo", "preference.jsonl")] {
        let mut runs = Vec::new();
        for gpu_paths in ["0", "1"] {
            let out = tmp.path().join(format!("{objective}-{gpu_paths}"));
            let data = fixtures().join("data").join(data);
            let mut command = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
            command
                .args([objective, "--model", model.to_str().unwrap(), "--data"])
                .arg(&data)
                .arg("--output-dir")
                .arg(&out)
                .args([
                    "--max-steps",
                    "4",
                    "--batch-size",
                    "2",
                    "--max-length",
                    "128",
                ])
                .args(["--precision", "f32", "--lr", "1e-3", "--seed", "0"])
                .env("FERROTUNE_GPU_PATHS_ON_CPU", gpu_paths)
                // Blocks of 16 queries: the causal blocks of the GPU attention, not one square.
                .env("FERROTUNE_ATTENTION_BLOCK", "16")
                .env("RUST_LOG", "warn");
            ran(&mut command);
            runs.push(out);
        }
        let rows = |run: &Path| -> Vec<(f64, f64)> {
            metrics(run)
                .iter()
                .filter(|r| r["split"] == "train")
                .map(|r| {
                    (
                        r["loss"].as_f64().unwrap(),
                        r["grad_norm"].as_f64().unwrap(),
                    )
                })
                .collect()
        };
        let (cpu, gpu) = (rows(&runs[0]), rows(&runs[1]));
        assert_eq!(cpu.len(), 4, "{objective}");
        assert_eq!(cpu.len(), gpu.len(), "{objective}");
        for (step, (a, b)) in cpu.iter().zip(&gpu).enumerate() {
            for (what, x, y) in [("loss", a.0, b.0), ("grad_norm", a.1, b.1)] {
                assert!(
                    (x - y).abs() <= 1e-4 * x.abs().max(1e-3),
                    "{objective} step {}: {what} {x} (CPU path) vs {y} (GPU paths)",
                    step + 1
                );
            }
        }
    }
}

/// Greedy decoding down the GPU paths (the joint q/k/v product, the one-kernel softmax and
/// the embedding op, run on the CPU) writes the CPU path's completions, with and without q/k/v
/// biases, batched with padded prompts.
#[test]
fn the_gpu_paths_decode_as_the_cpu_path_does() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    let rows = [
        "The capital of France is",
        "1 2 3 4",
        "Once upon a time there was a",
        "def add(a, b):",
        "x",
    ];
    let text: String = rows
        .iter()
        .map(|p| format!("{}\n", serde_json::json!({ "prompt": p })))
        .collect();
    std::fs::write(&prompts, text).unwrap();
    for model in ["llama-tiny", "qwen2-tiny"] {
        let mut outputs = Vec::new();
        for gpu_paths in ["0", "1"] {
            let out = tmp.path().join(format!("{model}-{gpu_paths}.jsonl"));
            let mut command = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
            command
                .arg("generate")
                .arg("--model")
                .arg(fixtures().join(model))
                .arg("--prompts")
                .arg(&prompts)
                .arg("--out")
                .arg(&out)
                .args(["--max-new-tokens", "24", "--temperature", "0"])
                .args(["--batch-size", "4"])
                .env("FERROTUNE_GPU_PATHS_ON_CPU", gpu_paths)
                .env("RUST_LOG", "warn");
            ran(&mut command);
            outputs.push(std::fs::read_to_string(&out).unwrap());
        }
        assert_eq!(outputs[0].lines().count(), rows.len(), "{model}");
        assert_eq!(outputs[0], outputs[1], "{model}");
    }
}

#[test]
fn sft_sanity_train_overfits_32_chats() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let summary = run_ok(&[
        "sft",
        "--model",
        &model(),
        "--data",
        &shared("chat/llamafactory_dpo_en_demo_chat.jsonl"),
        "--output-dir",
        out.to_str().unwrap(),
        "--train-dataset-length",
        "32",
        "--sanity-train",
        "--batch-size",
        "32",
        "--max-length",
        "64",
        "--truncation",
        "left",
        "--max-steps",
        "60",
        "--lr",
        "3e-3",
        "--lr-scheduler",
        "constant",
        "--num-sanity-val-steps",
        "0",
        "--json",
    ]);
    let losses = train_losses(&out);
    assert_eq!(losses.len(), 60);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.1 * first, "train loss went from {first} to {last}");
    // Every row carries the contract keys; the eval row has the SFT metrics.
    for row in metrics(&out) {
        assert!(
            row.get("step").is_some() && row.get("split").is_some() && row.get("epoch").is_some()
        );
    }
    let eval = metrics(&out)
        .into_iter()
        .rev()
        .find(|r| r["split"] == "eval")
        .unwrap();
    for key in ["loss", "token_accuracy", "perplexity", "edit_distance"] {
        assert!(eval.get(key).is_some(), "eval row lacks {key}");
    }
    // The overfit model reproduces its training answers: small edit distance.
    assert!(eval["edit_distance"].as_f64().unwrap() < 0.2, "{eval}");
    assert!(summary["eval"]["token_accuracy"].as_f64().unwrap() > 0.9);
    // The run directory holds the resolved config, TensorBoard events and an HF final model.
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("max_steps = 60") && config.contains("objective = \"sft\""));
    let events = std::fs::read_dir(&out).unwrap().flatten().find(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with("events.out.tfevents")
    });
    assert!(events.unwrap().metadata().unwrap().len() > 100);
    assert!(out.join("final/config.json").exists() && out.join("final/tokenizer.json").exists());
}

#[test]
fn dpo_sanity_train_reaches_reward_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    run_ok(&[
        "dpo",
        "--model",
        &model(),
        "--data",
        &shared("preference/ultrafeedback_binarized_h4schema.jsonl"),
        "--output-dir",
        out.to_str().unwrap(),
        "--train-dataset-length",
        "32",
        "--sanity-train",
        "--batch-size",
        "16",
        "--max-length",
        "96",
        "--max-steps",
        "20",
        "--lr",
        "2e-3",
        "--lr-scheduler",
        "constant",
        "--num-sanity-val-steps",
        "0",
        "--json",
    ]);
    let rows = metrics(&out);
    let first_train = rows.iter().find(|r| r["split"] == "train").unwrap();
    // Before any update the policy equals the reference: loss ln 2, zero rewards.
    assert!((first_train["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4);
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(first_train.get(key).is_some(), "train row lacks {key}");
    }
    let eval = rows.iter().rev().find(|r| r["split"] == "eval").unwrap();
    let accuracy = eval["rewards/accuracies"].as_f64().unwrap();
    assert!(accuracy >= 0.9, "rewards/accuracies {accuracy}");
    // The reference log-probs were computed once and cached in the run directory.
    assert!(out.join("reference_logps.json").exists());
}

#[test]
fn reward_model_trains_saves_as_classifier_and_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let data = shared("preference/ultrafeedback_binarized_h4schema.jsonl");
    let summary = run_ok(&[
        "rm",
        "--model",
        &model(),
        "--data",
        &data,
        "--output-dir",
        out.to_str().unwrap(),
        "--train-dataset-length",
        "32",
        "--sanity-train",
        "--batch-size",
        "16",
        "--max-length",
        "96",
        "--max-steps",
        "20",
        "--lr",
        "3e-3",
        "--lr-scheduler",
        "constant",
        "--num-sanity-val-steps",
        "0",
        "--json",
    ]);
    assert!(
        summary["eval"]["accuracy"].as_f64().unwrap() >= 0.9,
        "{summary}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "Qwen2ForSequenceClassification");
    assert_eq!(config["num_labels"], 1);
    assert!(config["pad_token_id"].is_u64());
    let scored = ferrotune(&[
        "reward",
        "--model",
        out.join("final").to_str().unwrap(),
        "--data",
        &data,
        "--max-length",
        "96",
    ]);
    assert!(
        scored.status.success(),
        "{}",
        String::from_utf8_lossy(&scored.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(scored.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 200);
    assert!(rows[0]["score_chosen"].is_f64() && rows[0]["score_rejected"].is_f64());
    assert!(String::from_utf8_lossy(&scored.stderr).contains("pairwise_accuracy"));
}

fn resume_args(out: &str) -> Vec<&str> {
    vec![
        "sft",
        "--model",
        "MODEL",
        "--data",
        "DATA",
        "--output-dir",
        out,
        "--train-dataset-length",
        "48",
        "--batch-size",
        "4",
        "--accumulate-grad-batches",
        "2",
        "--max-length",
        "64",
        "--truncation",
        "left",
        "--max-steps",
        "40",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "3",
        "--lr-scheduler",
        "cosine",
        "--checkpoint-frequency",
        "3",
        "--ckpt-to-keep",
        "2",
        "--val-check-interval",
        "10",
        "--num-sanity-val-steps",
        "0",
        "--seed",
        "7",
        "--json",
    ]
}

fn with_paths(args: Vec<&str>, model: &str, data: &str) -> Vec<String> {
    args.into_iter()
        .map(|a| match a {
            "MODEL" => model.to_string(),
            "DATA" => data.to_string(),
            other => other.to_string(),
        })
        .collect()
}

#[test]
fn killed_run_resumes_to_the_same_losses_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shared("chat/llamafactory_dpo_en_demo_chat.jsonl");
    let m = model();
    let full = tmp.path().join("full");
    let args = with_paths(resume_args(full.to_str().unwrap()), &m, &data);
    run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let reference = train_losses(&full);
    assert_eq!(reference.len(), 40);

    // Same run, killed with SIGKILL once a checkpoint exists.
    let killed = tmp.path().join("killed");
    let args = with_paths(resume_args(killed.to_str().unwrap()), &m, &data);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !killed.join("checkpoints/step-3").exists() && !killed.join("checkpoints/step-6").exists()
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.join("final").exists(),
        "the run finished before it could be killed"
    );
    let latest = std::fs::read_dir(killed.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap();
    let checkpoint = killed.join(format!("checkpoints/step-{latest}"));
    let mut args = with_paths(resume_args(killed.to_str().unwrap()), &m, &data);
    args.extend([
        "--resume-from-checkpoint".to_string(),
        checkpoint.to_string_lossy().to_string(),
    ]);
    run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let resumed = train_losses(&killed);
    assert_eq!(
        resumed.len(),
        40,
        "metrics.jsonl continues without gaps or duplicates"
    );
    for (i, (a, b)) in reference.iter().zip(&resumed).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "step {}: {a} vs {b}", i + 1);
    }
    let steps: Vec<u64> = metrics(&killed)
        .iter()
        .filter(|r| r["split"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=40).collect::<Vec<u64>>());
    let weights = |d: &Path| std::fs::read(d.join("final/model.safetensors")).unwrap();
    assert!(
        weights(&full) == weights(&killed),
        "final weights differ after resume"
    );
    // keep-last-K pruned older checkpoints.
    let kept = std::fs::read_dir(full.join("checkpoints")).unwrap().count();
    assert_eq!(kept, 2);
}

#[test]
fn bad_rows_stop_the_run_or_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chat.jsonl");
    let good = std::fs::read_to_string(shared("chat/llamafactory_dpo_en_demo_chat.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().take(12).collect();
    lines.insert(3, "{\"messages\": [{\"role\": \"user\"}]}");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = tmp.path().join("run");
    let base = [
        "sft",
        "--model",
        &model(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
        "--max-length",
        "64",
        "--num-sanity-val-steps",
        "0",
    ];
    let failed = ferrotune(&base);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("chat.jsonl:4") && err.contains("content"),
        "{err}"
    );
    let mut skipping = base.to_vec();
    skipping.extend(["--skip-bad-rows", "--json"]);
    let summary = stdout_json(&ferrotune(&skipping));
    assert_eq!(summary["steps"], 1);
}

#[test]
fn non_finite_loss_stops_with_a_clear_error() {
    // A model whose final norm is NaN gives NaN logits and loss.
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(fixtures().join("llama-tiny"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
    }
    let path = broken.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let offsets = &header["model.norm.weight"]["data_offsets"];
    let start = 8 + header_len + offsets[0].as_u64().unwrap() as usize;
    let mut bytes = bytes;
    bytes[start..start + 2].copy_from_slice(&[0xc0, 0x7f]); // bf16 NaN
    std::fs::write(&path, bytes).unwrap();
    let out = tmp.path().join("run");
    let failed = ferrotune(&[
        "sft",
        "--model",
        broken.to_str().unwrap(),
        "--data",
        &shared("chat/llamafactory_dpo_en_demo_chat.jsonl"),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "2",
        "--max-length",
        "64",
        "--num-sanity-val-steps",
        "0",
        "--train-dataset-length",
        "8",
    ]);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("non-finite") && err.contains("last good checkpoint"),
        "{err}"
    );
    assert!(!out.join("final").exists());
}

#[test]
fn eval_only_writes_one_eval_row_and_config_errors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let summary = run_ok(&[
        "sft",
        "--model",
        &model(),
        "--data",
        &shared("gsm8k/train_first500.jsonl"),
        "--eval-only",
        "--test-dataset-length",
        "20",
        "--max-length",
        "128",
        "--output-dir",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(summary["steps"], 0);
    let rows = metrics(&out);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["split"], "eval");
    let bad = ferrotune(&[
        "sft",
        "--model",
        &model(),
        "--data",
        "x.jsonl",
        "--set",
        "learning_rat=1",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("learning_rat"));
}
