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
        // A whole-sequence pass gives every row the positions 0..T: one row's table, copied on
        // the device, instead of B rows of trigonometry on the host (at batch 8 × 2048 on a GPU
        // that was tens of milliseconds with the device idle). Same values, same bits.
        if batch > 1 && positions.iter().all(|row| row == &positions[0]) {
            let (cos, sin) = self.cos_sin(&positions[..1], dtype, device)?;
            let shape = (batch, cos.dim(1)?, cos.dim(2)?, cos.dim(3)?);
            return Ok((
                cos.broadcast_as(shape)?.contiguous()?,
                sin.broadcast_as(shape)?.contiguous()?,
            ));
        }
        let seq = positions.first().map_or(0, |p| p.len());
        if positions.iter().any(|row| row.len() != seq) {
            return Err(crate::error::Error::invalid(
                "rotary positions: rows of different lengths".to_string(),
            ));
        }
        let half = self.inv_freq.len();
        let mut cos = vec![0f32; batch * seq * half * 2];
        let mut sin = vec![0f32; batch * seq * half * 2];
        // (`max(1)`: a head dimension under 2 has no pairs and empty tables.)
        let width = (2 * half).max(1);
        let slots = cos.chunks_exact_mut(width).zip(sin.chunks_exact_mut(width));
        for ((c, s), &p) in slots.zip(positions.iter().flatten()) {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let angle = p as f32 * f;
                // Both halves of the head dimension use the same frequencies (cat(freqs, freqs)).
                (c[i], s[i]) = (angle.cos(), angle.sin());
                (c[half + i], s[half + i]) = (c[i], s[i]);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(head_dim: usize) -> Rope {
        let half = head_dim / 2;
        Rope {
            inv_freq: (0..half)
                .map(|i| 10_000f32.powf(-((2 * i) as f32) / head_dim as f32))
                .collect(),
        }
    }

    /// Every row's table is cos/sin of position · frequency, the frequencies repeated over
    /// both halves, whether the rows share their positions (one table copied) or not.
    #[test]
    fn tables_hold_each_rows_angles() {
        let r = rope(8);
        let shared = vec![vec![0, 1, 5], vec![0, 1, 5], vec![0, 1, 5]];
        let mixed = vec![vec![0, 1, 5], vec![7, 8, 9], vec![0, 1, 5]];
        for positions in [shared, mixed] {
            let (cos, sin) = r.cos_sin(&positions, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(cos.dims(), [3, 1, 3, 8]);
            let cos = cos.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let sin = sin.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (slot, &p) in positions.iter().flatten().enumerate() {
                for d in 0..8 {
                    let angle = p as f32 * r.inv_freq[d % 4];
                    assert_eq!(cos[slot * 8 + d], angle.cos(), "position {p}, dim {d}");
                    assert_eq!(sin[slot * 8 + d], angle.sin(), "position {p}, dim {d}");
                }
            }
        }
        assert!(r
            .cos_sin(&[vec![0, 1], vec![0]], DType::F32, &Device::Cpu)
            .is_err());
    }
}
