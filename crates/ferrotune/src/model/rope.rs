//! Rotary position embeddings: inverse frequencies (with the `linear` and `llama3` scaling
//! rules as transformers computes them) and cos/sin tables for arbitrary position ids.

use candle_core::{DType, Device, Tensor};

use super::config::{ModelConfig, RopeScaling};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Rope {
    /// [head_dim / 2], f32.
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.head_dim;
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        let inv_freq = match &config.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_context,
            } => {
                // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
                // between interpolates smoothly (transformers' `_compute_llama3_parameters`).
                let low_freq_wavelen = old_context / low_freq_factor;
                let high_freq_wavelen = old_context / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_context / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Rope {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// cos and sin for `positions` ([B][T] ids), each shaped [B, 1, T, head_dim] in `dtype`.
    pub fn cos_sin(
        &self,
        positions: &[Vec<u32>],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let batch = positions.len();
        let seq = positions.first().map_or(0, |p| p.len());
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(batch * seq * half * 2);
        let mut sin = Vec::with_capacity(batch * seq * half * 2);
        for row in positions {
            for &p in row {
                // Both halves of the head dimension use the same frequencies (cat(freqs, freqs)).
                for _ in 0..2 {
                    for &f in &self.inv_freq {
                        let angle = p as f32 * f;
                        cos.push(angle.cos());
                        sin.push(angle.sin());
                    }
                }
            }
        }
        let shape = (batch, 1, seq, half * 2);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }
}
