//! Checkpoint round trips and the errors bad model directories give.

use std::path::Path;

use candle_core::{DType, Device};
use ferrotune::io::checkpoint::{load_tensors, save_tensors};
use ferrotune::io::{load_model, save_model};

use crate::{copy_fixture, fixtures, load_fixture};

fn load_err(dir: &Path) -> String {
    match load_model(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn load_save_load_gives_identical_tensors() {
    for (name, dtype) in [
        ("qwen2-tiny", DType::F32),
        ("llama-tiny", DType::BF16),
        ("llama-linear", DType::F16),
    ] {
        let original = load_tensors(&fixtures().join(name), dtype, &Device::Cpu).unwrap();
        let model = load_model(&fixtures().join(name), dtype, &Device::Cpu).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_model(
            &model.decoder,
            Some(&fixtures().join(name)),
            out.path(),
            dtype,
        )
        .unwrap();
        let again = load_tensors(out.path(), dtype, &Device::Cpu).unwrap();
        assert_eq!(original.len(), again.len(), "{name}: tensor count");
        for (k, a) in &original {
            let b = &again[k];
            assert_eq!(a.dims(), b.dims());
            let a = a
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = b
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(a == b, "{name}: tensor {k} changed in the round trip");
        }
        // The saved directory is a complete model directory again.
        let reloaded = load_model(out.path(), DType::F32, &Device::Cpu).unwrap();
        assert!(reloaded.tokenizer.is_some());
        assert!(out.path().join("generation_config.json").exists());
    }
}

#[test]
fn sharded_save_writes_an_index_that_loads() {
    let model = load_fixture("qwen2-tiny");
    let out = tempfile::tempdir().unwrap();
    save_tensors(
        out.path(),
        model.decoder.params(),
        DType::F32,
        Some(100_000),
    )
    .unwrap();
    assert!(out.path().join("model.safetensors.index.json").exists());
    assert!(
        out.path().join("model-00001-of-00007.safetensors").exists()
            || std::fs::read_dir(out.path()).unwrap().count() > 3
    );
    let again = load_tensors(out.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(again.len(), model.decoder.params().len());
}

#[test]
fn missing_directory_and_files_are_named() {
    let err = load_err(Path::new("/nonexistent/model"));
    assert!(
        err.contains("/nonexistent/model") && err.contains("does not exist"),
        "{err}"
    );
    let dir = copy_fixture("llama-tiny");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("no model.safetensors"), "{err}");
}

#[test]
fn truncated_and_corrupt_safetensors_are_reported() {
    let dir = copy_fixture("llama-tiny");
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
    std::fs::write(&file, b"this is not a safetensors file at all").unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

#[test]
fn shard_listed_in_index_but_absent_is_named() {
    let dir = copy_fixture("qwen2-tiny");
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model-00002-of-00003.safetensors") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn tensor_shape_mismatch_names_the_tensor() {
    let dir = copy_fixture("qwen2-tiny");
    edit_json(&dir.path().join("config.json"), |c| {
        c["intermediate_size"] = 128.into()
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("mlp.gate_proj.weight")
            && err.contains("[160, 64]")
            && err.contains("[128, 64]"),
        "{err}"
    );
}

#[test]
fn unknown_architecture_is_named() {
    let dir = copy_fixture("llama-tiny");
    edit_json(&dir.path().join("config.json"), |c| {
        c["architectures"] = serde_json::json!(["MambaForCausalLM"])
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("MambaForCausalLM"),
        "{err}"
    );
}

#[test]
fn tokenizer_larger_than_embedding_is_rejected() {
    let dir = copy_fixture("llama-tiny");
    edit_json(&dir.path().join("config.json"), |c| {
        c["vocab_size"] = 300.into()
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("tokenizer.json") && err.contains("vocab_size is 300"),
        "{err}"
    );
}

#[test]
fn malformed_chat_template_names_the_file() {
    let dir = copy_fixture("llama-tiny");
    edit_json(&dir.path().join("tokenizer_config.json"), |c| {
        c["chat_template"] = "{% for m in messages %}{{ m.content }".into()
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("tokenizer_config.json") && err.contains("chat template"),
        "{err}"
    );
}
