//! RMSNorm as one op each way on a GPU: `y = x · rsqrt(mean(x²) + eps) · w` with f32 statistics
//! whatever the storage type, as HF Llama/Qwen2 compute it (they upcast to f32).
//!
//! Composed on candle's CUDA backend it is seven tensors forward and about fifteen backward, and
//! in bf16 the mean of squares is summed in bf16. Here the forward is one pass per row
//! (cuda/kernels.cu's `rms_norm_fwd`), and the backward two kernels: `x`'s gradient per row, and
//! the weight's gradient as per-block partial sums over rows that candle then adds in order
//! (deterministic, no atomics).
//!
//! The CPU trains through its own fused f32 op ([`super::fused::rms_norm`]); the CPU forwards
//! here run that op's arithmetic ([`RmsNorm`]) on the values read as f32, so the tests can check
//! this op's graph, shapes and gradients against the composed reference (the kernels' own
//! arithmetic is checked under emulation, tests/integration/cuda_emulation.rs).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};

use super::fused::{f32_values, stored_like, RmsNorm};
use crate::error::Result;

/// Parts the weight-gradient kernel aims for, one block each (a few per SM of an H100's 132).
const PARTS: usize = 512;

/// Rows each part of the weight gradient sums: a function of the shape alone, so the order of
/// the float sums is too.
fn rows_per_part(rows: usize) -> usize {
    rows.div_ceil(PARTS).max(1)
}
/// The widest row the weight-gradient kernel's shared accumulator holds (RMS_MAX_HIDDEN).
pub const MAX_HIDDEN: usize = 8192;

/// Whether [`rms_norm`] takes this input: not empty, f32 or bf16 `x` and `weight` of one type,
/// rows no wider than [`MAX_HIDDEN`].
pub fn fits(x: &Tensor, weight: &Tensor) -> bool {
    let h = x.dim(D::Minus1).unwrap_or(0);
    x.elem_count() > 0
        && crate::device::kernel_dtype(x.dtype())
        && weight.dtype() == x.dtype()
        && weight.dims() == [h]
        && (1..=MAX_HIDDEN).contains(&h)
}

/// RMSNorm over the last dimension, differentiable in `x` and `weight` (see [`fits`]).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let hidden = x.dim(D::Minus1)?;
    let op = RmsNormRows(RmsNorm {
        eps: eps as f32,
        hidden_size: hidden,
    });
    Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?)
}

#[derive(Clone, Copy)]
struct RmsNormRows(RmsNorm);

/// `x`'s gradient: (x, w, dy) → dx.
struct GradX(RmsNorm);

/// The weight's gradient in parts: (x, dy) → f32 [parts, H], part b summing `dy · x · r` over
/// its [`rows_per_part`] rows.
struct GradWParts(RmsNorm);

impl CustomOp2 for RmsNormRows {
    fn name(&self) -> &'static str {
        "rms-norm-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.0.forward(&f32_values(s1, l1)?, &f32_values(s2, l2)?);
        Ok((stored_like(s1, y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (h, eps) = (self.0.hidden_size, self.0.eps);
        let y = super::cuda_ops::rms_norm_fwd((s1, l1), (s2, l2), h, eps)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &GradX(self.0))?;
        let parts = x.apply_op2_no_bwd(&dy, &GradWParts(self.0))?;
        let dw = parts.sum(0)?.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for GradX {
    fn name(&self) -> &'static str {
        "rms-norm-grad-x"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, dy) = (
            f32_values(s1, l1)?,
            f32_values(s2, l2)?,
            f32_values(s3, l3)?,
        );
        // The CPU op's backward also sums the weight's gradient, unused here: this forward
        // only serves tests and the GPU paths run on the CPU.
        let (dx, _) = self.0.backward(&x, &w, &dy);
        Ok((stored_like(s1, dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (h, eps) = (self.0.hidden_size, self.0.eps);
        let dx = super::cuda_ops::rms_norm_bwd_x((s1, l1), (s2, l2), (s3, l3), h, eps)?;
        Ok((dx, l1.shape().clone()))
    }
}

impl CustomOp2 for GradWParts {
    fn name(&self) -> &'static str {
        "rms-norm-grad-w-parts"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, dy) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        let h = self.0.hidden_size;
        let per = rows_per_part(x.len() / h);
        let blocks = (x.len() / h).div_ceil(per);
        let mut parts = vec![0f32; blocks * h];
        for (i, (row, g)) in x.chunks(h).zip(dy.chunks(h)).enumerate() {
            let r = self.0.inv_rms(row);
            let part = &mut parts[(i / per) * h..][..h];
            for ((p, v), g) in part.iter_mut().zip(row).zip(g) {
                *p += g * v * r;
            }
        }
        Ok((CpuStorage::F32(parts), Shape::from((blocks, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let h = self.0.hidden_size;
        let rows = l1.shape().elem_count() / h;
        let per = rows_per_part(rows);
        let blocks = rows.div_ceil(per);
        let parts = super::cuda_ops::rms_norm_bwd_w((s1, l1), (s2, l2), (h, per), self.0.eps)?;
        Ok((parts, Shape::from((blocks, h))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::ops;
    use super::super::test_tensors::{assert_same_gradients, max_abs_diff, random};
    use super::*;
    use candle_core::{DType, Var};

    /// More rows than one weight-gradient block (with a remainder), a row wider than a CUDA
    /// block's 256 threads: values and both gradients against the composed ops, in f32.
    #[test]
    fn matches_the_composed_rms_norm_values_and_gradients() {
        let x = Var::from_tensor(&random(&[3, 50, 300], 11, 2.0)).unwrap();
        let w = Var::from_tensor(&(random(&[300], 12, 0.5) + 1.0).unwrap()).unwrap();
        assert!(fits(x.as_tensor(), w.as_tensor()));
        let got = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
        let want = ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
        assert_same_gradients(&got, &want, &[&x, &w], 13, 1e-4, Some(1e-2));
    }

    /// bf16 storage: the statistics stay f32, so the result is the f32 one rounded once.
    #[test]
    fn bf16_storage_keeps_f32_statistics() {
        let x32 = random(&[4, 96], 3, 2.0);
        let w32 = (random(&[96], 4, 0.5) + 1.0).unwrap();
        let want = ops::rms_norm(&x32, &w32, 1e-6).unwrap();
        let x = x32.to_dtype(DType::BF16).unwrap();
        let w = w32.to_dtype(DType::BF16).unwrap();
        let got = rms_norm(&x, &w, 1e-6).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let diff = max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want);
        assert!(diff < 0.05, "{diff}");
        let wide = Tensor::zeros((2, MAX_HIDDEN + 1), DType::F32, x.device()).unwrap();
        let wide_w = Tensor::ones(MAX_HIDDEN + 1, DType::F32, x.device()).unwrap();
        assert!(!fits(&wide, &wide_w));
        assert!(!fits(&x32, &w));
    }
}
