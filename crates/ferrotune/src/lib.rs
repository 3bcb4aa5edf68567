//! ferrotune: post-training for small decoder LLMs (Qwen2 / Llama family) in Rust.
//!
//! The library holds everything but the command line: the model (`model`), the Hugging Face
//! formats it reads and writes (`io`), and — as they land — data, objectives, training and
//! inference. It reads and writes the HF layouts (safetensors, `tokenizer.json`, chat templates)
//! so that models move freely between ferrotune and transformers.

pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod eval;
pub mod infer;
pub mod io;
pub mod model;
pub mod objectives;
pub mod pool;
pub mod synth;
pub mod train;

pub use error::{Error, Result};
