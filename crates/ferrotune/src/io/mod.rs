//! The Hugging Face formats: safetensors checkpoints, model directories, the tokenizer and its
//! chat template.

pub mod chat_template;
pub mod checkpoint;
pub mod model_dir;
pub mod tokenizer;

pub use chat_template::{ChatTemplate, TemplateTokens};
pub use model_dir::{load_model, load_model_for, save_model, LoadedModel};
pub use tokenizer::Tokenizer;
