//! Seeded random initialisation, as transformers initialises a fresh Llama/Qwen2: matrices and
//! embeddings ~ N(0, initializer_range²), biases 0, norm weights 1. Used by `init-model`, tests
//! and benchmarks; the same seed gives the same weights on every machine.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::config::ModelConfig;
use super::params::{parameter_specs, ParamKind};
use crate::error::Result;

/// Standard normal samples by Box–Muller, so the stream depends only on the seeded generator
/// (no extra distribution crate, stable across versions).
pub fn normal_samples(rng: &mut impl Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32 * std);
        out.push((r * theta.sin()) as f32 * std);
    }
    out.truncate(n);
    out
}

pub fn random_params(
    config: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let std = config
        .raw
        .get("initializer_range")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.02) as f32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut params = BTreeMap::new();
    for spec in parameter_specs(config) {
        let n: usize = spec.shape.iter().product();
        let data = match spec.kind {
            ParamKind::Embedding | ParamKind::Matrix => normal_samples(&mut rng, n, std),
            ParamKind::Bias => vec![0f32; n],
            ParamKind::Norm => vec![1f32; n],
        };
        let t = Tensor::from_vec(data, spec.shape.as_slice(), device)?.to_dtype(dtype)?;
        params.insert(spec.name, t);
    }
    Ok(params)
}
