//! Integration tests of the library against reference fixtures made by
//! `scripts/fixtures/make_fixtures.py` with transformers (see scripts/fixtures/README.md).

mod chat_templates;
mod checkpoints;
mod cuda_emulation;
mod data;
mod generation;
mod gradients;
mod kv_cache;
mod losses;
mod parity;

use std::path::PathBuf;

use candle_core::{DType, Device};
use ferrotune::io::{load_model, LoadedModel};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn load_fixture(name: &str) -> LoadedModel {
    load_model(&fixtures().join(name), DType::F32, &Device::Cpu).expect("fixture model loads")
}

pub fn read_fixture_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("fixture file");
    serde_json::from_str(&text).expect("fixture JSON")
}

/// Copies a fixture model directory into a temp dir so a test can damage it.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

pub const MODELS: [&str; 3] = ["qwen2-tiny", "llama-tiny", "llama-linear"];
