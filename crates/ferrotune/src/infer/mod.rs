//! Inference: token sampling and batched generation with prefix sharing.

pub mod generate;
pub mod reward;
pub mod sampler;

pub use generate::{generate, Completion, FinishReason, GenerateOptions, Prompt};
pub use sampler::SamplingParams;
