//! The model: HF config, the Llama-family decoder, rotary embeddings, the KV cache,
//! differentiable ops and random initialisation.

pub mod attention_gpu;
pub mod bf16_gemm;
pub mod bf16_linear;
pub mod bf16_matmul;
pub mod config;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_ops;
pub mod decoder;
pub mod elementwise_gpu;
pub mod embedding_gpu;
pub mod fast_exp;
pub mod fused;
pub mod fused_attention;
pub mod fused_mlp;
pub mod fused_rope;
pub mod fused_softmax;
pub mod fused_swiglu;
pub mod grad_sink;
pub mod init;
pub mod kv_cache;
pub mod ops;
pub mod params;
pub mod rms_norm_gpu;
pub mod rope;
#[cfg(test)]
pub(crate) mod test_tensors;
pub mod token_logprob;

pub use config::{Family, Head, ModelConfig, RopeScaling};
pub use decoder::{Decoder, LogitsAt};
pub use kv_cache::KvCache;
pub use params::{matmul_parameters, num_parameters, parameter_specs, ParamKind, ParamSpec};
