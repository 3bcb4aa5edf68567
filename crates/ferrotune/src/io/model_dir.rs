//! HF model directories: `config.json` + safetensors weights + tokenizer files +
//! `generation_config.json`, loaded into a [`Decoder`] and written back so that transformers
//! (and ferrotune) load them again.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::checkpoint::{dtype_name, load_tensors, save_tensors, write_atomic};
use super::tokenizer::{Tokenizer, TOKENIZER_FILES};
use crate::error::{read_json, Error, Result};
use crate::model::{Decoder, ModelConfig};

/// Shard size used when saving: transformers' default `max_shard_size` is 5 GB.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

pub struct LoadedModel {
    pub decoder: Decoder,
    pub tokenizer: Option<Tokenizer>,
    pub dir: PathBuf,
}

impl LoadedModel {
    /// The tokenizer, or an error naming the directory that lacks one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::file(&self.dir, "no tokenizer.json in this model directory"))
    }
}

/// Reads and validates `config.json` of a model directory.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "model directory does not exist"));
    }
    ModelConfig::from_file(&dir.join("config.json"))
}

/// Loads a model directory in `dtype`. The tokenizer is loaded when `tokenizer.json` exists,
/// and must fit the embedding: a token id past `vocab_size` would index out of the table.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let config = load_config(dir)?;
    let tokenizer = if dir.join("tokenizer.json").exists() {
        let tok = Tokenizer::from_dir(dir, Some(&config.raw))?;
        if tok.id_bound() > config.vocab_size {
            return Err(Error::file(
                &dir.join("tokenizer.json"),
                format!(
                    "tokenizer has ids up to {} but config.json vocab_size is {}: the embedding is too small",
                    tok.id_bound() - 1,
                    config.vocab_size
                ),
            ));
        }
        Some(tok)
    } else {
        None
    };
    let tensors = load_tensors(dir, dtype, device)?;
    let decoder = Decoder::new(config, tensors, dir)?;
    Ok(LoadedModel {
        decoder,
        tokenizer,
        dir: dir.to_path_buf(),
    })
}

/// Loads a model directory to compute in `precision`. On the CPU, bf16 is autocast: the
/// weights load as f32 and the linear layers compute in bf16 with f32 accumulation
/// ([`Decoder::with_bf16_linears`]), since candle's CPU matmul has no bf16 kernel. Everywhere
/// else this is [`load_model`] in `precision`.
pub fn load_model_for(dir: &Path, precision: DType, device: &Device) -> Result<LoadedModel> {
    if device.is_cpu() && precision == DType::BF16 {
        let mut model = load_model(dir, DType::F32, device)?;
        model.decoder = model.decoder.with_bf16_linears(true);
        return Ok(model);
    }
    load_model(dir, precision, device)
}

/// Writes `decoder` as an HF directory in `dtype`, copying tokenizer files from
/// `tokenizer_dir` and carrying over its `generation_config.json` when it has one.
pub fn save_model(
    decoder: &Decoder,
    tokenizer_dir: Option<&Path>,
    out: &Path,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let config = decoder.config();
    save_tensors(out, decoder.params(), dtype, Some(DEFAULT_MAX_SHARD_BYTES))?;
    let config_json =
        serde_json::to_string_pretty(&config.to_json(dtype_name(dtype))).expect("JSON value");
    write_atomic(&out.join("config.json"), config_json.as_bytes())?;

    let source_generation = tokenizer_dir
        .map(|d| d.join("generation_config.json"))
        .filter(|p| p.exists() && p.parent() != Some(out));
    let generation = match source_generation {
        Some(p) => read_json(&p)?,
        None => {
            let mut g = serde_json::Map::new();
            for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                if let Some(v) = config.raw.get(key).filter(|v| !v.is_null()) {
                    g.insert(key.into(), v.clone());
                }
            }
            serde_json::Value::Object(g)
        }
    };
    write_atomic(
        &out.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)
            .expect("JSON value")
            .as_bytes(),
    )?;
    if let Some(src) = tokenizer_dir {
        copy_tokenizer_files(src, out)?;
    }
    Ok(())
}

/// Copies the tokenizer files that exist in `src` into `out`.
pub fn copy_tokenizer_files(src: &Path, out: &Path) -> Result<()> {
    if src == out {
        return Ok(());
    }
    for name in TOKENIZER_FILES {
        let from = src.join(name);
        if from.exists() {
            let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
            write_atomic(&out.join(name), &bytes)?;
        }
    }
    Ok(())
}
