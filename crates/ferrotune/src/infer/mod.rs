//! Inference: token sampling and batched generation with prefix sharing.

pub mod best_of_n;
pub mod generate;
pub mod reward;
pub mod sampler;
pub mod verify;

pub use generate::{generate, Completion, FinishReason, GenerateOptions, Prompt};
pub use sampler::SamplingParams;
