//! Differentiable building blocks of the decoder, written with candle-core ops that all have a
//! backward pass.
//!
//! candle-nn's fused kernels (`softmax_last_dim`, `rms_norm`, `rope`) return tensors with no
//! gradient path, so backward would "succeed" and train nothing upstream. Everything the
//! training path touches is here instead, or in the model's own fused CPU kernels
//! (`fused*.rs` beside this file: they have a backward pass, fall back to these ops off the CPU,
//! and are tested against them); inference may use candle-nn's kernels (see `fast`).

use candle_core::{Tensor, D};

use crate::error::Result;

/// RMSNorm as in HF Llama/Qwen2: `w * x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_square + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)?)
}

/// Softmax over the last dimension. The max is detached: it only stabilises the exponent and
/// its gradient contribution is exactly zero.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    Ok(exp.broadcast_div(&sum)?)
}

/// Attention probabilities `softmax(scale · scores + mask)` over the last dimension: `scores`
/// [B, H, T, S], `mask` an additive bias broadcast over them ([B, 1, T, S]).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    softmax_last_dim(&(scores * scale)?.broadcast_add(mask)?)
}

/// The SwiGLU activation of the Llama/Qwen2 MLP: `silu(gate) ⊙ up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// Log-softmax over the last dimension (stable, differentiable).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}

/// `x·cos + rotate_half(x)·sin`, where rotate_half swaps the two halves of the head dimension
/// and negates the new first half (the HF "rotate_half" convention, not interleaved pairs).
/// `x`: [B, H, T, D]; `cos`, `sin`: [B, 1, T, D].
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// `x @ weightᵀ (+ bias)` for `x` of any rank ≥ 2; the weight is [out, in] as stored by HF.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = *dims.last().expect("linear input has rank >= 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let out = x.reshape((rows, inner))?.matmul(&weight.t()?)?;
    let out = match bias {
        Some(b) => out.broadcast_add(b)?,
        None => out,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = weight.dim(0)?;
    Ok(out.reshape(out_dims)?)
}

/// Fused inference-only kernels. Never used where a gradient is needed.
pub mod fast {
    use super::*;

    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
    }

    pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            weight,
            eps as f32,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_and_differentiable_kernels_agree() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let a = rms_norm(&x, &w, 1e-6).unwrap();
        let b = fast::rms_norm(&x, &w, 1e-6).unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "rms_norm differs by {diff}");
        let a = softmax_last_dim(&x).unwrap();
        let b = fast::softmax_last_dim(&x).unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "softmax differs by {diff}");
    }

    #[test]
    fn log_softmax_matches_hand_computation() {
        let x = Tensor::new(&[[1f32, 2.0, 3.0]], &Device::Cpu).unwrap();
        let got = log_softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        let lse = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        for (i, v) in [1f32, 2.0, 3.0].iter().enumerate() {
            assert!((got[0][i] - (v - lse)).abs() < 1e-6);
        }
    }

    #[test]
    fn rms_norm_gradient_matches_finite_difference() {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[0.3f64, -1.2, 0.7, 2.0]], &dev).unwrap();
        let w = Tensor::new(&[1.1f64, 0.9, -0.5, 1.3], &dev).unwrap();
        let probe = Tensor::new(&[[0.2f64, -0.4, 1.0, 0.5]], &dev).unwrap();
        let x = Var::from_tensor(&x0).unwrap();
        let loss = rms_norm(x.as_tensor(), &w, 1e-6)
            .unwrap()
            .mul(&probe)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
        let f = |t: &Tensor| -> f64 {
            rms_norm(t, &w, 1e-6)
                .unwrap()
                .mul(&probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for i in 0..4 {
            let mut d = vec![0f64; 4];
            d[i] = 1e-6;
            let dt = Tensor::new(d.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let up = f(&(&x0 + &dt).unwrap());
            let down = f(&(&x0 - &dt).unwrap());
            let numeric = (up - down) / 2e-6;
            assert!(
                (numeric - g[0][i]).abs() < 1e-6,
                "component {i}: {numeric} vs {}",
                g[0][i]
            );
        }
    }
}
