//! The command-line contracts (CONTRACTS.md): exact outputs other tools rely on.

#[cfg(feature = "mpi")]
mod distributed;
mod genrm;
mod training;
mod winrate;

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn ferrotune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ferrotune")
}

pub fn stdout_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "--json prints exactly one line: {text}"
    );
    serde_json::from_str(&text).unwrap()
}

#[test]
fn score_json_matches_transformers_logprobs() {
    let parity: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("parity.json")).unwrap())
            .unwrap();
    let case = &parity["models"]["qwen2-tiny"][1];
    let tmp = tempfile::tempdir().unwrap();
    let text_file = tmp.path().join("text.txt");
    std::fs::write(&text_file, case["text"].as_str().unwrap()).unwrap();
    let model = fixtures().join("qwen2-tiny");
    let out = ferrotune(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--text-file",
        text_file.to_str().unwrap(),
        "--json",
    ]);
    let got = stdout_json(&out);
    assert_eq!(got["ids"], case["ids"]);
    let got_lp = got["logprobs"].as_array().unwrap();
    let want_lp = case["logprobs"].as_array().unwrap();
    assert!(got_lp[0].is_null());
    assert_eq!(got_lp.len(), want_lp.len());
    for (a, b) in got_lp.iter().zip(want_lp).skip(1) {
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4);
    }
}

#[test]
fn chat_template_prints_the_render_exactly() {
    let renders: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chat_renders.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("qwen2-tiny");
    let cases: Vec<_> = renders["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["name"] == "ferrotune-chatml"
                && c.get("tools").is_none()
                && c.get("extra_context").is_none()
        })
        .collect();
    assert!(cases.len() >= 4);
    for case in cases {
        let messages = tmp.path().join("messages.json");
        std::fs::write(&messages, case["messages"].to_string()).unwrap();
        let mut args = vec![
            "chat-template",
            "--model",
            model.to_str().unwrap(),
            "--messages",
            messages.to_str().unwrap(),
        ];
        if case["add_generation_prompt"].as_bool().unwrap() {
            args.push("--add-generation-prompt");
        }
        let out = ferrotune(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            case["expected"].as_str().unwrap(),
            "{}",
            case["case"]
        );
    }
}

#[test]
fn init_model_then_inspect_reports_the_contract_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let out_dir = tmp.path().join("model");
    let tok = fixtures().join("tokenizer");
    let out = ferrotune(&[
        "init-model",
        "--config",
        config.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--seed",
        "3",
        "--dtype",
        "bf16",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = stdout_json(&ferrotune(&[
        "inspect",
        "--model",
        out_dir.to_str().unwrap(),
        "--json",
    ]));
    for key in [
        "architecture",
        "model_type",
        "num_parameters",
        "dtype",
        "vocab_size",
        "tokenizer_vocab_size",
        "num_layers",
        "hidden_size",
        "has_chat_template",
        "eos_token",
        "pad_token",
    ] {
        assert!(info.get(key).is_some(), "inspect --json lacks `{key}`");
    }
    // 512·32 embedding (tied) + 2 layers · (2 norms + q,k,v with bias + o + 3 MLP) + final norm.
    let layer = 2 * 32 + (32 * 32 + 32) + 2 * (16 * 32 + 16) + 32 * 32 + 3 * 32 * 64;
    assert_eq!(info["num_parameters"], 512 * 32 + 2 * layer + 32);
    assert_eq!(info["dtype"], "bfloat16");
    assert_eq!(info["tokenizer_vocab_size"], 500);
    assert_eq!(info["has_chat_template"], true);
    assert_eq!(info["eos_token"], "<|im_end|>");
    // Same seed, same weights.
    let again = tmp.path().join("again");
    ferrotune(&[
        "init-model",
        "--config",
        config.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "--seed",
        "3",
        "--dtype",
        "bf16",
    ]);
    assert_eq!(
        std::fs::read(out_dir.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
}

#[test]
fn bad_input_exits_nonzero_with_the_path() {
    let out = ferrotune(&[
        "score",
        "--model",
        "/no/such/model",
        "--text-file",
        "/dev/null",
        "--json",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model"));
    assert!(out.stdout.is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let messages = tmp.path().join("m.json");
    std::fs::write(&messages, "{not json").unwrap();
    let model = fixtures().join("qwen2-tiny");
    let out = ferrotune(&[
        "chat-template",
        "--model",
        model.to_str().unwrap(),
        "--messages",
        messages.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("m.json"));
}

#[test]
fn data_inspect_reports_schema_rows_and_lengths() {
    let data = fixtures().join("data/chat.parquet");
    let model = fixtures().join("qwen2-tiny");
    let report = stdout_json(&ferrotune(&[
        "data",
        "inspect",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(report["schema"], "chat");
    assert_eq!(report["rows"], 7);
    assert_eq!(report["bad_rows"], 0);
    assert_eq!(report["truncated"], 3);
    assert!(report["tokens"]["max"].as_u64().unwrap() >= report["tokens"]["min"].as_u64().unwrap());
    let broken = ferrotune(&[
        "data",
        "inspect",
        fixtures().join("data/gzip.parquet").to_str().unwrap(),
        "--json",
    ]);
    assert!(!broken.status.success());
    assert!(String::from_utf8_lossy(&broken.stderr).contains("gzip.parquet"));
}

/// A misspelt kernel switch is a clear error before any work, not a silent run with the kernels
/// on (the GPU check relies on it to turn groups off).
#[test]
fn a_bad_kernel_switch_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let text_file = tmp.path().join("text.txt");
    std::fs::write(&text_file, "hello").unwrap();
    let model = fixtures().join("qwen2-tiny");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["score", "--model", model.to_str().unwrap()])
        .args(["--text-file", text_file.to_str().unwrap(), "--json"])
        .env("FERROTUNE_CUDA_KERNELS", "-rope,-embeddings")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FERROTUNE_CUDA_KERNELS") && err.contains("-embeddings"),
        "{err}"
    );
}
