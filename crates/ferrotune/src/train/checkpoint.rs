//! Training checkpoints: `run_dir/checkpoints/step-N/` holds the model as an HF directory,
//! `optimizer.safetensors` (AdamW moments) and `trainer_state.json` (step, data cursor, seed).
//! A checkpoint is written under a temporary name and renamed into place, so a kill during the
//! write leaves the previous checkpoints intact; only the newest `keep` are kept.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::optimizer::AdamW;
use crate::error::{Error, Result};
use crate::io::checkpoint::{load_file, save_tensors, write_atomic};
use crate::io::save_model;
use crate::model::Decoder;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// The data cursor: epoch and index of the next micro-batch within that epoch's plan.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    /// Samples (sequences or pairs) consumed so far, counted globally.
    pub samples_seen: usize,
    pub seed: u64,
    pub objective: String,
    /// The global batch the cursor counts in (`--batch-size`, `--accumulate-grad-batches`):
    /// a resume must use the same; absent in checkpoints older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accumulate_grad_batches: Option<usize>,
    /// Processes that trained up to this checkpoint (informational: any world size resumes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
}

pub fn checkpoint_dir(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step}"))
}

pub fn save_checkpoint(
    run_dir: &Path,
    decoder: &Decoder,
    tokenizer_dir: &Path,
    optimizer: &AdamW,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let final_dir = checkpoint_dir(run_dir, state.step);
    let tmp = root.join(format!(".step-{}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    save_model(decoder, Some(tokenizer_dir), &tmp, DType::F32)?;
    let opt = optimizer.state_tensors();
    let opt_dir = tmp.join("optimizer");
    save_tensors(&opt_dir, &opt, DType::F32, None)?;
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    write_atomic(&tmp.join("trainer_state.json"), json.as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    prune(&root, keep)?;
    Ok(final_dir)
}

/// Steps of the complete checkpoints under `root`, ascending.
pub fn list_checkpoints(root: &Path) -> Vec<usize> {
    let mut steps: Vec<usize> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    steps
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let steps = list_checkpoints(root);
    if keep == 0 || steps.len() <= keep {
        return Ok(());
    }
    for step in &steps[..steps.len() - keep] {
        let dir = root.join(format!("step-{step}"));
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    Ok(())
}

/// Reads a checkpoint's trainer state and optimizer moments into `optimizer`.
pub fn load_checkpoint_state(
    dir: &Path,
    optimizer: &mut AdamW,
    device: &Device,
) -> Result<TrainerState> {
    let state_path = dir.join("trainer_state.json");
    let text = crate::error::read_to_string(&state_path)?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::file(&state_path, format!("invalid trainer state: {e}")))?;
    let opt_file = dir
        .join("optimizer")
        .join(crate::io::checkpoint::SINGLE_FILE);
    let tensors = load_file(&opt_file, DType::F32, device)?;
    optimizer.load_state_tensors(tensors.into_iter().collect(), state.step)?;
    Ok(state)
}
