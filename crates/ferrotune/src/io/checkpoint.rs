//! Safetensors checkpoints: single-file and sharded (`model.safetensors.index.json`), f32 / bf16
//! / f16 on disk, loaded into the compute dtype. Saving writes every file under a temporary
//! name and renames it, so an interrupted save never leaves a half-written file in place.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};

use crate::error::{read_json, Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Loads every tensor of the checkpoint in `dir`, converted to `dtype`.
pub fn load_tensors(dir: &Path, dtype: DType, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let index_path = dir.join(INDEX_FILE);
    let single_path = dir.join(SINGLE_FILE);
    if index_path.exists() {
        load_sharded(&index_path, dtype, device)
    } else if single_path.exists() {
        load_file(&single_path, dtype, device)
    } else {
        Err(Error::file(
            dir,
            format!("no {SINGLE_FILE} or {INDEX_FILE} in this directory"),
        ))
    }
}

fn load_sharded(
    index_path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let index = read_json(index_path)?;
    let weight_map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::file(index_path, "missing `weight_map` object"))?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, file) in weight_map {
        let file = file.as_str().ok_or_else(|| {
            Error::file(
                index_path,
                format!("weight_map[`{name}`] must be a file name"),
            )
        })?;
        by_file
            .entry(file.to_string())
            .or_default()
            .push(name.clone());
    }
    // Check that every shard exists before reading any: a missing shard is the common failure
    // of a partial download, and it should be named at once.
    for file in by_file.keys() {
        let shard = dir.join(file);
        if !shard.exists() {
            return Err(Error::file(
                index_path,
                format!(
                    "shard `{file}` is listed in weight_map but {} does not exist",
                    shard.display()
                ),
            ));
        }
    }
    let mut tensors = BTreeMap::new();
    for (file, names) in by_file {
        let shard = dir.join(&file);
        let mut loaded = load_file(&shard, dtype, device)?;
        for name in names {
            let t = loaded.remove(&name).ok_or_else(|| {
                Error::file(
                    &shard,
                    format!("tensor `{name}` is listed in {INDEX_FILE} but not in this shard"),
                )
            })?;
            tensors.insert(name, t);
        }
    }
    Ok(tensors)
}

/// Loads one safetensors file. The file is memory-mapped, so only the converted tensors
/// occupy memory.
pub fn load_file(path: &Path, dtype: DType, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and dropped before this function returns; a concurrent
    // writer truncating the file is the only hazard, and checkpoints are replaced by rename.
    let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
        Error::file(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        match view.dtype() {
            safetensors::Dtype::F32
            | safetensors::Dtype::BF16
            | safetensors::Dtype::F16
            | safetensors::Dtype::F64 => {}
            other => {
                return Err(Error::file(
                    path,
                    format!("tensor `{name}` has dtype {other:?}; expected f32, bf16 or f16"),
                ))
            }
        }
        let t = view
            .load(device)
            .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?
            .to_dtype(dtype)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// The HF name of a dtype, as written in config.json.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Parses `f32|bf16|f16` (and HF's long names).
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        other => Err(Error::invalid(format!(
            "unknown precision `{other}` (expected f32, bf16 or f16)"
        ))),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn write_safetensors(path: &Path, tensors: &[(&String, Tensor)]) -> Result<()> {
    let tmp = temp_sibling(path);
    // transformers refuses safetensors files whose metadata lacks a known `format`.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        &tmp,
    )
    .map_err(|e| Error::file(&tmp, format!("writing safetensors: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Saves tensors into `dir` as `dtype`: one `model.safetensors`, or shards of at most
/// `max_shard_bytes` with an index when the total is larger (HF's layout and names).
pub fn save_tensors(
    dir: &Path,
    tensors: &BTreeMap<String, Tensor>,
    dtype: DType,
    max_shard_bytes: Option<usize>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut converted = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        converted.push((name, t.to_dtype(dtype)?.contiguous()?));
    }
    let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let total: usize = converted.iter().map(|(_, t)| bytes(t)).sum();
    let limit = max_shard_bytes.unwrap_or(usize::MAX);
    if total <= limit {
        // A stale index from an earlier sharded save would take precedence on load.
        let _ = std::fs::remove_file(dir.join(INDEX_FILE));
        return write_safetensors(&dir.join(SINGLE_FILE), &converted);
    }
    let mut shards: Vec<Vec<(&String, Tensor)>> = vec![Vec::new()];
    let mut current = 0usize;
    for (name, t) in converted {
        let size = bytes(&t);
        if current > 0 && current + size > limit {
            shards.push(Vec::new());
            current = 0;
        }
        current += size;
        shards
            .last_mut()
            .expect("at least one shard")
            .push((name, t));
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
        write_safetensors(&dir.join(&file), shard)?;
        for (name, _) in shard {
            weight_map.insert((*name).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let _ = std::fs::remove_file(dir.join(SINGLE_FILE));
    write_atomic(
        &dir.join(INDEX_FILE),
        serde_json::to_string_pretty(&index)
            .expect("JSON of strings")
            .as_bytes(),
    )
}

/// The dtype of the weights on disk (of the first tensor of the first file), read from the
/// safetensors header only.
pub fn stored_dtype(dir: &Path) -> Result<String> {
    let index_path = dir.join(INDEX_FILE);
    let file = if index_path.exists() {
        let index = read_json(&index_path)?;
        let first = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .and_then(|m| m.values().next())
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::file(&index_path, "empty or missing `weight_map`"))?
            .to_string();
        dir.join(first)
    } else {
        dir.join(SINGLE_FILE)
    };
    let f = std::fs::File::open(&file).map_err(|e| Error::io(&file, e))?;
    // SAFETY: read-only map, dropped at the end of this function.
    let mmap = unsafe { memmap2::MmapOptions::new().map(&f) }.map_err(|e| Error::io(&file, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| Error::file(&file, format!("not a valid safetensors file: {e}")))?;
    let name = match meta.tensors().values().next().map(|info| info.dtype) {
        Some(safetensors::Dtype::BF16) => "bfloat16",
        Some(safetensors::Dtype::F16) => "float16",
        Some(safetensors::Dtype::F64) => "float64",
        _ => "float32",
    };
    Ok(name.to_string())
}
