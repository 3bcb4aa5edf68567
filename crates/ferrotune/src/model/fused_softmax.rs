//! The attention softmax of training, `softmax(scale · scores + mask)`, as one CPU kernel with
//! its own backward pass.
//!
//! Composed, it is seven tensors each way (scale, mask add, max, subtract, exp, sum, divide),
//! each a walk over the `[B, H, T, S]` scores; at the 5M benchmark shape those walks were a
//! quarter of a training step. Here the forward is one pass per row and the backward one more,
//! from the saved probabilities alone.
//!
//! On CUDA the same op runs cuda/kernels.cu's kernels (f32 or bf16 scores, f32 math), one block
//! per row each way, through [`super::cuda_ops`].
//!
//! This is not the inference softmax: decoding keeps candle-nn's kernel (no gradient needed).
//! Elsewhere (bf16 on the CPU, other devices) it is [`ops::masked_softmax`], the composed
//! reference it is tested against.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::fast_exp::{self, EXP_UNDERFLOW};
use super::fused::{assume_written, f32_slice, for_each_rows, new_written};
use super::ops;
use crate::error::{Error, Result};

#[derive(Clone)]
struct MaskedSoftmax {
    scale: f32,
    /// Query heads sharing one mask row (the mask is [B, 1, T, S]).
    heads: usize,
    /// Queries per head (T).
    queries: usize,
    /// Keys per row (S).
    keys: usize,
    /// The forward's exps and sums through [`fast_exp`] (bf16 autocast only).
    fast_exp: bool,
}

impl MaskedSoftmax {
    /// The mask row of scores row `row` (rows ordered b, h, t).
    fn mask_row<'a>(&self, mask: &'a [f32], row: usize) -> &'a [f32] {
        let (t, s) = (self.queries, self.keys);
        let b = row / (self.heads * t);
        let m = b * t + row % t;
        &mask[m * s..(m + 1) * s]
    }

    fn forward(&self, scores: &[f32], mask: &[f32]) -> Vec<f32> {
        // SAFETY: each row's first loop writes every element of the row.
        unsafe { new_written(scores.len(), |probs| self.forward_into(scores, mask, probs)) }
    }

    /// [`MaskedSoftmax::forward`] into `probs` (initialised on return).
    fn forward_into(&self, scores: &[f32], mask: &[f32], probs: &mut [MaybeUninit<f32>]) {
        let s = self.keys;
        for_each_rows(probs, s, |offset, block| {
            for (i, y) in block.chunks_mut(s).enumerate() {
                let row = offset / s + i;
                let x = &scores[row * s..(row + 1) * s];
                let m = self.mask_row(mask, row);
                for ((y, &x), &m) in y.iter_mut().zip(x).zip(m) {
                    y.write(x * self.scale + m);
                }
                // SAFETY: the loop above wrote the whole row.
                normalize_row(unsafe { assume_written(y) }, self.fast_exp);
            }
        });
    }

    /// `d scores = scale · y ⊙ (dy − Σ_row dy ⊙ y)`: the softmax Jacobian applied to `dy`,
    /// times the scale the scores were multiplied by. The mask's gradient is not needed.
    fn backward(&self, probs: &[f32], grad: &[f32]) -> Vec<f32> {
        let s = self.keys;
        let write = |dx: &mut [MaybeUninit<f32>]| {
            for_each_rows(dx, s, |offset, block| {
                let y = &probs[offset..offset + block.len()];
                let dy = &grad[offset..offset + block.len()];
                for ((dx, y), dy) in block.chunks_mut(s).zip(y.chunks(s)).zip(dy.chunks(s)) {
                    let dot = row_dot(y, dy);
                    for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                        dx.write(self.scale * y * (dy - dot));
                    }
                }
            })
        };
        // SAFETY: every row of every block is written, one element per element of `probs`.
        unsafe { new_written(probs.len(), write) }
    }
}

/// Turns one row of scaled, masked scores into probabilities in place: the max, the exps
/// (through [`fast_exp`] with `fast_exp`, else `f32::exp`) and their sum, then a divide.
pub(super) fn normalize_row(y: &mut [f32], fast_exp: bool) {
    if fast_exp {
        let max = fast_exp::max(y);
        let inv = 1.0 / fast_exp::exp_in_place(y, max);
        for y in y.iter_mut() {
            *y *= inv;
        }
        return;
    }
    let mut max = f32::NEG_INFINITY;
    for &y in y.iter() {
        max = max.max(y);
    }
    // A row whose keys are all masked has every value near MASKED, so `max` is finite and the
    // row comes out uniform, as the composed softmax gives it. Masked keys (`d` near −1e9)
    // skip the call to `exp`: half the scores of a causal mask.
    let mut sum = 0f32;
    for y in y.iter_mut() {
        let d = *y - max;
        *y = if d < EXP_UNDERFLOW { 0.0 } else { d.exp() };
        sum += *y;
    }
    let inv = 1.0 / sum;
    for y in y.iter_mut() {
        *y *= inv;
    }
}

/// `Σ y ⊙ dy` of one row: the softmax backward's `d scores = scale · y ⊙ (dy − Σ y ⊙ dy)`.
pub(super) fn row_dot(y: &[f32], dy: &[f32]) -> f32 {
    y.iter().zip(dy).map(|(a, b)| a * b).sum()
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let probs = self.forward(f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        Ok((CpuStorage::F32(probs), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = (self.heads, self.queries, self.keys);
        let probs = super::cuda_ops::masked_softmax_fwd((s1, l1), (s2, l2), dims, self.scale)?;
        Ok((probs, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        probs: &Tensor,
        grad_probs: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad_probs.contiguous()?;
        let dx = probs
            .contiguous()?
            .apply_op2_no_bwd(&grad, &MaskedSoftmaxGrad(self.clone()))?;
        Ok((Some(dx), None))
    }
}

/// The backward of [`MaskedSoftmax`] as an op of its own (probabilities, their gradient → the
/// scores' gradient), so that it runs on the device the tensors are on.
struct MaskedSoftmaxGrad(MaskedSoftmax);

impl CustomOp2 for MaskedSoftmaxGrad {
    fn name(&self) -> &'static str {
        "masked-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dx = self.0.backward(f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (keys, scale) = (self.0.keys, self.0.scale);
        let dx = super::cuda_ops::masked_softmax_bwd((s1, l1), (s2, l2), keys, scale)?;
        Ok((dx, l1.shape().clone()))
    }
}

/// Attention probabilities `softmax(scale · scores + mask)` over the last dimension, with a
/// gradient for `scores` [B, H, T, S] only; `mask` [B, 1, T, S] is an additive bias shared by
/// the heads (finite, so a fully masked row is uniform rather than NaN). One fused kernel each
/// way on the CPU in f32; the composed [`ops::masked_softmax`] elsewhere. With `bf16` (the
/// decoder under bf16 autocast) the forward's exps and sums go through [`fast_exp`]: a few
/// ulp from the f32 path's values, which stay bit for bit those of `f32::exp`.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64, bf16: bool) -> Result<Tensor> {
    match kernel(scores, mask, scale, bf16)? {
        Some((op, mask)) => Ok(scores.contiguous()?.apply_op2(&mask, op)?),
        None => ops::masked_softmax(scores, mask, scale),
    }
}

/// [`masked_softmax`]'s values without a gradient (the attention that recomputes its
/// probabilities in the backward pass, `attention_gpu`).
pub(crate) fn masked_softmax_values(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    match kernel(scores, mask, scale, false)? {
        Some((op, mask)) => Ok(scores.contiguous()?.apply_op2_no_bwd(&mask, &op)?),
        None => Ok(ops::masked_softmax(scores, mask, scale)?.detach()),
    }
}

/// The scores' gradient from the probabilities and their gradient (both [B, H, T, S]):
/// `scale · p ⊙ (g − Σ_row p ⊙ g)`, by the kernels where [`masked_softmax`] has them.
pub(crate) fn masked_softmax_grad(probs: &Tensor, grad: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, _, _, s) = probs.dims4()?;
    if kernels_take(probs) && grad.dtype() == probs.dtype() && grad.dims() == probs.dims() {
        let op = MaskedSoftmaxGrad(MaskedSoftmax {
            scale: scale as f32,
            heads: 1,
            queries: 1,
            keys: s,
            fast_exp: false,
        });
        return Ok(probs
            .contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &op)?);
    }
    let dot = (probs * grad)?.sum_keepdim(candle_core::D::Minus1)?;
    Ok((probs * grad.broadcast_sub(&dot)?)?.affine(scale, 0.0)?)
}

/// Whether the op's kernels take `t`: f32 on the CPU, f32 or bf16 through cuda/kernels.cu on a
/// GPU.
fn kernels_take(t: &Tensor) -> bool {
    if t.device().is_cpu() {
        t.dtype() == DType::F32
    } else {
        t.device().is_cuda() && crate::device::own_kernels_for(t, crate::device::Kernels::Softmax)
    }
}

/// The fused op for these scores and the mask in their type, or `None` where the composed ops
/// run (bf16 on the CPU, other devices, f16).
fn kernel(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
    bf16: bool,
) -> Result<Option<(MaskedSoftmax, Tensor)>> {
    // On a GPU the mask is converted to the scores' type below; the CPU kernel reads f32 only.
    let cpu_mask_fits = mask.device().is_cpu() && mask.dtype() == DType::F32;
    if !kernels_take(scores) || (scores.device().is_cpu() && !cpu_mask_fits) {
        return Ok(None);
    }
    let mask = mask.to_dtype(scores.dtype())?.contiguous()?;
    let (b, h, t, s) = scores.dims4()?;
    if mask.dims() != [b, 1, t, s] {
        return Err(Error::invalid(format!(
            "masked_softmax: mask {:?} does not fit scores {:?} (expected [{b}, 1, {t}, {s}])",
            mask.dims(),
            scores.dims()
        )));
    }
    let op = MaskedSoftmax {
        scale: scale as f32,
        heads: h,
        queries: t,
        keys: s,
        fast_exp: bf16,
    };
    Ok(Some((op, mask)))
}

#[cfg(test)]
mod tests {
    use super::super::decoder::MASKED;
    use super::super::test_tensors::{assert_same_gradients, max_abs_diff, random};
    use super::*;
    use candle_core::{Device, Var};

    /// A causal mask over `s` keys for the last `t` queries, [b, 1, t, s], with padded keys
    /// after `valid[b]` and, in batch row 0, query 1 seeing nothing at all.
    fn mask(b: usize, t: usize, s: usize, valid: &[usize]) -> Tensor {
        let mut data = Vec::with_capacity(b * t * s);
        for (row, &valid) in valid.iter().enumerate().take(b) {
            for i in 0..t {
                for j in 0..s {
                    let visible = j < valid && j <= s - t + i && !(row == 0 && i == 1);
                    data.push(if visible { 0.0 } else { MASKED });
                }
            }
        }
        Tensor::from_vec(data, (b, 1, t, s), &Device::Cpu).unwrap()
    }

    /// `fast_exp`: the bf16 path's exps, a few ulp from libm's, so a few ulp of a probability.
    fn check_against_composed(dims: [usize; 4], scale: f64, fast_exp: bool) {
        let [b, _, t, s] = dims;
        let scores = Var::from_tensor(&random(&dims, 31, 4.0)).unwrap();
        let valid: Vec<usize> = (0..b).map(|r| s - r % 3).collect();
        let mask = mask(b, t, s, &valid);
        let fused = masked_softmax(scores.as_tensor(), &mask, scale, fast_exp).unwrap();
        let reference = ops::masked_softmax(scores.as_tensor(), &mask, scale).unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-6);
        // The fully masked query is uniform over all keys, in every head.
        let dead = fused.get(0).unwrap().narrow(1, 1, 1).unwrap();
        let uniform = (dead.ones_like().unwrap() / s as f64).unwrap();
        assert!(max_abs_diff(&dead, &uniform) < 1e-7, "{dead}");
        assert_same_gradients(&fused, &reference, &[&scores], 32, 1e-5, Some(1e-3));
    }

    #[test]
    fn masked_softmax_matches_composed_values_and_gradients() {
        for fast_exp in [false, true] {
            check_against_composed([2, 3, 5, 7], 1.0 / 6f64.sqrt(), fast_exp);
        }
    }

    /// Large enough to be split over rayon's workers, in blocks that cut no row.
    #[test]
    fn masked_softmax_matches_composed_when_parallel() {
        for fast_exp in [false, true] {
            check_against_composed([2, 3, 67, 131], 0.125, fast_exp);
        }
    }

    #[test]
    fn masked_softmax_takes_the_composed_path_in_bf16() {
        let scores = random(&[1, 2, 3, 4], 33, 2.0);
        let mask = mask(1, 3, 4, &[4]);
        let f32_probs = masked_softmax(&scores, &mask, 0.5, false).unwrap();
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let probs = masked_softmax(&bf16(&scores), &bf16(&mask), 0.5, true).unwrap();
        assert_eq!(probs.dtype(), DType::BF16);
        let probs = probs.to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&probs, &f32_probs) < 1e-2);
    }
}
