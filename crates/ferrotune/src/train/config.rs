//! The resolved training configuration: TOML file → CLI overrides (`--set key=value` and the
//! common flags) → this struct, validated and saved as `config.toml` in the run directory.
//! Field names are the seed study's flag names with `_` for `-`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::objectives::dpo::DpoLossType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    Pretrain,
    Sft,
    Dpo,
    Rm,
    Genrm,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Pretrain => "pretrain",
            Objective::Sft => "sft",
            Objective::Dpo => "dpo",
            Objective::Rm => "rm",
            Objective::Genrm => "genrm",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    Linear,
    Cosine,
    Constant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub objective: Objective,
    pub model: PathBuf,
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub output_dir: Option<PathBuf>,
    pub name: Option<String>,
    pub schema: Option<String>,
    pub skip_bad_rows: bool,

    pub max_epochs: usize,
    pub max_steps: Option<usize>,
    /// Sequences (or pairs, for DPO and RM) per forward micro-batch.
    pub batch_size: usize,
    pub eval_batch_size: Option<usize>,
    /// Micro-batches per optimizer step; the loss is normalised over the whole step.
    pub accumulate_grad_batches: usize,
    /// Peak learning rate; when unset, the objective's TRL default (SFT/pretrain 2e-5,
    /// DPO 1e-6, RM 1e-5).
    pub lr: Option<f64>,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub lr_scheduler: LrScheduler,
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    /// Global-norm gradient clipping; 0 disables.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Compute precision: f32, bf16 or f16 (master weights and moments stay f32). bf16 on the
    /// CPU is autocast: f32 activations, bf16 products with f32 accumulation in the linear layers.
    pub precision: String,
    /// On the CPU, each micro-batch runs as this many parts (rows dealt out in turn, as ranks
    /// share a global batch) side by side on rayon's threads, their gradients summed in part
    /// order. 1 (the default) runs whole batches. For small models 2 is much faster on a
    /// multi-core CPU; the sums then differ from whole batches' in float summation order only,
    /// and the same value gives the same bits on any thread count.
    pub cpu_parts: usize,
    pub max_length: Option<usize>,
    /// `right` (default: cut the end), `left` (cut the start) or `drop` (skip the row).
    pub truncation: String,

    pub train_percentile: f64,
    pub test_percentile: f64,
    pub sanity_train: bool,
    pub train_dataset_length: Option<usize>,
    pub test_dataset_length: Option<usize>,
    pub dataset_random_sample: bool,
    /// Batch rows of similar length together (transformers' `group_by_length`): less padding,
    /// but each batch then holds one kind of row (in the quickstart world, one chain length),
    /// which slows learning a lot. Off by default, as in transformers.
    pub group_by_length: bool,

    /// Validate every N optimizer steps (unset: only per epoch).
    pub val_check_interval: Option<usize>,
    pub check_val_every_n_epoch: Option<usize>,
    pub num_sanity_val_steps: usize,
    pub eval_only: bool,
    pub log_every_n_steps: usize,
    pub checkpoint_frequency: Option<usize>,
    pub ckpt_to_keep: usize,
    pub resume_from_checkpoint: Option<PathBuf>,

    pub beta: f64,
    pub label_smoothing: f64,
    pub loss_type: DpoLossType,
    pub ref_model: Option<PathBuf>,

    /// SFT/pretrain eval: rows whose greedy generation is compared with the reference by
    /// normalised edit distance (the seed study's SFT metric); 0 disables.
    pub eval_generate: usize,

    /// GenRM: weight λ of the correct-solution term, `L = L_verify + λ·L_correct`.
    pub lambda: f64,
    /// GenRM: D_correct (correct solutions); `data` is then D_verify.
    pub correct_data: Option<PathBuf>,

    /// sft/dpo/genrm: each validation also judges the policy against the starting model
    /// (`win_rate`, `win_rate_se`; see `win_rate_eval.rs`).
    pub calculate_win_rate: bool,
    /// The win-rate judge: `rm:DIR`, `genrm:DIR`, `openai-reward:URL#MODEL`, `openai-judge:URL#MODEL`.
    pub win_rate_judge: Option<String>,
    /// Prompts judged: the first N eval rows'.
    pub win_rate_prompts: usize,
    /// Longest greedy answer of either side, in tokens.
    pub win_rate_max_new_tokens: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            objective: Objective::Sft,
            model: PathBuf::new(),
            data: PathBuf::new(),
            eval_data: None,
            output_dir: None,
            name: None,
            schema: None,
            skip_bad_rows: false,
            max_epochs: 1,
            max_steps: None,
            batch_size: 8,
            eval_batch_size: None,
            accumulate_grad_batches: 1,
            lr: None,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            lr_scheduler: LrScheduler::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            precision: "f32".into(),
            cpu_parts: 1,
            max_length: None,
            truncation: "right".into(),
            train_percentile: 100.0,
            test_percentile: 100.0,
            sanity_train: false,
            train_dataset_length: None,
            test_dataset_length: None,
            dataset_random_sample: false,
            group_by_length: false,
            val_check_interval: None,
            check_val_every_n_epoch: Some(1),
            num_sanity_val_steps: 2,
            eval_only: false,
            log_every_n_steps: 1,
            checkpoint_frequency: None,
            ckpt_to_keep: 2,
            resume_from_checkpoint: None,
            beta: 0.1,
            label_smoothing: 0.0,
            loss_type: DpoLossType::Sigmoid,
            ref_model: None,
            eval_generate: 16,
            lambda: 0.1,
            correct_data: None,
            calculate_win_rate: false,
            win_rate_judge: None,
            win_rate_prompts: super::win_rate_eval::DEFAULT_PROMPTS,
            win_rate_max_new_tokens: super::win_rate_eval::DEFAULT_MAX_NEW_TOKENS,
        }
    }
}

impl TrainConfig {
    /// Builds the config from an optional TOML file and override tables (later wins).
    pub fn resolve(file: Option<&Path>, overrides: &[toml::Table]) -> Result<Self> {
        match file {
            Some(path) => Self::resolve_str(&crate::error::read_to_string(path)?, path, overrides),
            None => Self::resolve_str("", Path::new("(no config file)"), overrides),
        }
    }

    /// As [`TrainConfig::resolve`] from TOML text; `source` names it in errors.
    pub fn resolve_str(text: &str, source: &Path, overrides: &[toml::Table]) -> Result<Self> {
        let mut table = text
            .parse::<toml::Table>()
            .map_err(|e| Error::file(source, format!("invalid TOML: {e}")))?;
        for o in overrides {
            for (k, v) in o {
                table.insert(k.clone(), v.clone());
            }
        }
        let config: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e| Error::invalid(format!("config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() {
            return Err(Error::invalid("config: `model` is required (--model DIR)"));
        }
        if self.data.as_os_str().is_empty() && !self.eval_only {
            return Err(Error::invalid(
                "config: `data` is required (--data FILE_OR_DIR)",
            ));
        }
        if self.batch_size == 0 || self.accumulate_grad_batches == 0 {
            return Err(Error::invalid(
                "config: batch_size and accumulate_grad_batches must be ≥ 1",
            ));
        }
        for (name, p) in [
            ("train_percentile", self.train_percentile),
            ("test_percentile", self.test_percentile),
        ] {
            if !(0.0..=100.0).contains(&p) {
                return Err(Error::invalid(format!(
                    "config: {name} must be within 0–100, got {p}"
                )));
            }
        }
        if !["right", "left", "drop"].contains(&self.truncation.as_str()) {
            return Err(Error::invalid(format!(
                "config: truncation must be right, left or drop, got `{}`",
                self.truncation
            )));
        }
        if self.beta <= 0.0 {
            return Err(Error::invalid("config: beta must be > 0"));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(Error::invalid(
                "config: label_smoothing must be in [0, 0.5)",
            ));
        }
        crate::io::checkpoint::parse_dtype(&self.precision)?;
        if self.cpu_parts == 0 {
            return Err(Error::invalid("config: cpu_parts must be at least 1"));
        }
        super::win_rate_eval::check_config(self)?;
        Ok(())
    }

    pub fn learning_rate(&self) -> f64 {
        self.lr.unwrap_or(match self.objective {
            Objective::Pretrain | Objective::Sft | Objective::Genrm => 2e-5,
            Objective::Dpo => 1e-6,
            Objective::Rm => 1e-5,
        })
    }

    /// `output_dir`, else `runs/NAME`, else `runs/<objective>`.
    pub fn run_dir(&self) -> PathBuf {
        match (&self.output_dir, &self.name) {
            (Some(d), _) => d.clone(),
            (None, Some(n)) => PathBuf::from("runs").join(n),
            (None, None) => PathBuf::from("runs").join(self.objective.name()),
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// Parses `key=value` with the value read as TOML (numbers, booleans, strings; a bare word
/// is taken as a string).
pub fn parse_set(assignment: &str) -> Result<toml::Table> {
    let (key, value) = assignment
        .split_once('=')
        .ok_or_else(|| Error::invalid(format!("--set expects key=value, got `{assignment}`")))?;
    let key = key.trim().replace('-', "_");
    let value = value.trim();
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut t = toml::Table::new();
    t.insert(key, parsed);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_and_unknown_keys_fail() {
        let a = parse_set("lr=0.001").unwrap();
        let b = parse_set("model=some/dir").unwrap();
        let c = parse_set("max-epochs=3").unwrap();
        let cfg =
            TrainConfig::resolve(None, &[a, b, c, parse_set("data=x.jsonl").unwrap()]).unwrap();
        assert_eq!(cfg.learning_rate(), 0.001);
        assert_eq!(cfg.model, PathBuf::from("some/dir"));
        assert_eq!(cfg.max_epochs, 3);
        let err = TrainConfig::resolve(None, &[parse_set("lrr=1").unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lrr"), "{err}");
        let back: TrainConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back.max_epochs, 3);
    }
}
