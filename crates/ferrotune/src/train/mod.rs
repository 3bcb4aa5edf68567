//! Training: the one loop (`trainer`), AdamW with f32 master weights, LR schedules, metrics
//! sinks (JSONL + TensorBoard), checkpoints with exact resume, and the resolved config.

pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod optimizer;
pub mod prepare;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;
pub mod win_rate_eval;

pub use config::{Objective, TrainConfig};
pub use trainer::{run, Examples, RunSummary, TrainInputs};
