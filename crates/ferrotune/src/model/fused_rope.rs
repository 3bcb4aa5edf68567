//! Rotary position embeddings applied to queries or keys, `x·cos + rotate_half(x)·sin` (the HF
//! rotate_half convention of [`ops::apply_rotary`]), as one CPU kernel with its own backward
//! pass.
//!
//! Composed, it is two narrows, a negation, a concatenation, two broadcast products and a sum,
//! plus a copy of `x` out of the head transpose; here it is one pass that reads `x` through its
//! strides (the `[B, T, H, D]` projection seen as `[B, H, T, D]`) and writes a contiguous
//! result. Only `x` gets a gradient: cos and sin are tables of the positions. Off the CPU or
//! outside f32 it is the composed op, the reference it is tested against.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use std::mem::MaybeUninit;

use super::fused::{cpu_error, f32_slice, for_each_rows, new_written, with_f32};
use super::ops;
use crate::error::Result;

/// The rotary's arithmetic over f32 rows: this file's CPU op, and the CPU forwards of
/// [`super::elementwise_gpu`]'s GPU op.
#[derive(Clone, Copy)]
pub(super) struct Rotary {
    /// Heads sharing one cos/sin row (cos and sin are [B, 1, T, D]).
    pub(super) heads: usize,
    /// Positions per head (T).
    pub(super) positions: usize,
    /// The head dimension (D), even.
    pub(super) dim: usize,
}

impl Rotary {
    /// The cos/sin row of output row `row` (rows ordered b, h, t).
    fn table_row(&self, row: usize) -> std::ops::Range<usize> {
        let t = self.positions;
        let r = row / (self.heads * t) * t + row % t;
        r * self.dim..(r + 1) * self.dim
    }

    /// `y = x·cos + rotate_half(x)·sin` with `rotate_half(x) = [−x₂, x₁]` for the halves
    /// `x = [x₁, x₂]`. `x` is read at `start + b·s₀ + h·s₁ + t·s₂ + d` (unit stride in d).
    pub(super) fn forward(
        &self,
        x: &[f32],
        start: usize,
        strides: [usize; 3],
        cos: &[f32],
        sin: &[f32],
    ) -> Vec<f32> {
        let (h, t, d) = (self.heads, self.positions, self.dim);
        let half = d / 2;
        let rows = cos.len() / d * h;
        let write = |y: &mut [MaybeUninit<f32>]| {
            for_each_rows(y, d, |offset, block| {
                for (i, y) in block.chunks_mut(d).enumerate() {
                    let row = offset / d + i;
                    let (bi, hi, ti) = (row / (h * t), row / t % h, row % t);
                    let at = start + bi * strides[0] + hi * strides[1] + ti * strides[2];
                    let x = &x[at..at + d];
                    let table = self.table_row(row);
                    let (c, s) = (&cos[table.clone()], &sin[table]);
                    for k in 0..half {
                        y[k].write(x[k] * c[k] - x[k + half] * s[k]);
                        y[k + half].write(x[k + half] * c[k + half] + x[k] * s[k + half]);
                    }
                }
            })
        };
        // SAFETY: every row of every block is written, both halves.
        unsafe { new_written(rows * d, write) }
    }

    /// The transpose of the forward map: `dx = dy·cos + rotate_halfᵀ(dy·sin)`, where
    /// `rotate_halfᵀ([a₁, a₂]) = [a₂, −a₁]`, `dy` and `dx` `[B, H, T, D]`.
    pub(super) fn backward(&self, dy: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f32> {
        let d = self.dim;
        let write = |dx: &mut [MaybeUninit<f32>]| {
            for_each_rows(dx, d, |offset, block| {
                for (i, dx) in block.chunks_mut(d).enumerate() {
                    let row = offset / d + i;
                    let table = self.table_row(row);
                    let dy = &dy[row * d..(row + 1) * d];
                    unrotate_row(dy, &cos[table.clone()], &sin[table], dx);
                }
            })
        };
        // SAFETY: every row of every block is written, both halves.
        unsafe { new_written(dy.len(), write) }
    }
}

/// One row of the rotary's backward, `dx = dy·cos + rotate_halfᵀ(dy·sin)` with
/// `rotate_halfᵀ([a₁, a₂]) = [a₂, −a₁]`, for the cos and sin rows of its position.
pub(super) fn unrotate_row(dy: &[f32], c: &[f32], s: &[f32], dx: &mut [MaybeUninit<f32>]) {
    let half = dy.len() / 2;
    for k in 0..half {
        dx[k].write(dy[k] * c[k] + dy[k + half] * s[k + half]);
        dx[k + half].write(dy[k + half] * c[k + half] - dy[k] * s[k]);
    }
}

/// The rotary's forward of `heads` heads read from a token-layout buffer: head `h` of token
/// `t` of batch row `b` at `x[start + (b·T + t)·ld + h·D ..][..D]`, cos/sin `[B, 1, T, D]`.
/// Returns the rotated heads `[B, heads, T, D]`.
pub(super) fn rotate_heads(
    x: &[f32],
    (start, ld): (usize, usize),
    (heads, positions, dim): (usize, usize, usize),
    cos: &[f32],
    sin: &[f32],
) -> Vec<f32> {
    let rotary = Rotary {
        heads,
        positions,
        dim,
    };
    rotary.forward(x, start, [positions * ld, dim, ld], cos, sin)
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
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
        let stride = l1.stride();
        if stride.len() != 4 || stride[3] != 1 {
            return Err(cpu_error(
                "rotary: x must have a unit stride in the head dimension",
            ));
        }
        let x = s1.as_slice::<f32>()?;
        let strides = [stride[0], stride[1], stride[2]];
        let (cos, sin) = (f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let y = self.forward(x, l1.start_offset(), strides, cos, sin);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let dx = with_f32(&grad, |dy| {
            with_f32(cos, |c| with_f32(sin, |s| Ok(self.backward(dy, c, s))))
        })?;
        let dx = Tensor::from_vec(dx, res.shape(), res.device())?;
        Ok((Some(dx), None, None))
    }
}

/// [`ops::apply_rotary`] (`x` [B, H, T, D], `cos`/`sin` [B, 1, T, D]) with a gradient for `x`
/// only: one fused kernel each way on the CPU in f32, reading `x` through its strides,
/// cuda/kernels.cu's on a GPU ([`super::elementwise_gpu`]), and the composed op elsewhere or for
/// tables of any other shape.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::device::own_cuda_kernels(x.device(), crate::device::Kernels::Rope)
        && super::elementwise_gpu::rope_fits(x, cos, sin)
    {
        return super::elementwise_gpu::rope(x, cos, sin);
    }
    let on_cpu = x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu();
    let f32s = [x, cos, sin].iter().all(|t| t.dtype() == DType::F32);
    let fits = |(b, _, t, d): (usize, usize, usize, usize)| {
        cos.dims() == [b, 1, t, d] && sin.dims() == [b, 1, t, d] && d % 2 == 0
    };
    let (_, h, t, d) = match x.dims4() {
        Ok(dims) if on_cpu && f32s && fits(dims) => dims,
        _ => return ops::apply_rotary(x, cos, sin),
    };
    // The kernel reads rows of D through any outer strides; only a strided D needs a copy.
    let x = if x.stride()[3] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    let op = Rotary {
        heads: h,
        positions: t,
        dim: d,
    };
    Ok(x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::super::test_tensors::{assert_same_gradients, max_abs_diff, random};
    use super::*;
    use candle_core::Var;

    /// `x` as the decoder makes it: a [B, T, H, D] projection transposed to [B, H, T, D] (and,
    /// with `offset`, a view that does not start at the storage's first element).
    fn check_against_composed([b, h, t, d]: [usize; 4], offset: bool) {
        let skip = usize::from(offset);
        let base = Var::from_tensor(&random(&[b + skip, t, h, d], 51, 2.0)).unwrap();
        let x = base.narrow(0, skip, b).unwrap().transpose(1, 2).unwrap();
        assert!(!x.is_contiguous());
        let angles = random(&[b, 1, t, d], 52, 3.0);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let fused = apply_rotary(&x, &cos, &sin).unwrap();
        let reference = ops::apply_rotary(&x, &cos, &sin).unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-6);
        assert_same_gradients(&fused, &reference, &[&base], 53, 1e-5, Some(1e-2));
    }

    #[test]
    fn rotary_matches_composed_values_and_gradients() {
        check_against_composed([2, 3, 5, 6], false);
        check_against_composed([2, 3, 5, 6], true);
    }

    #[test]
    fn rotary_matches_composed_when_parallel() {
        check_against_composed([2, 5, 67, 64], true);
    }

    #[test]
    fn rotary_takes_the_composed_path_in_bf16() {
        let x = random(&[1, 2, 3, 4], 54, 1.0);
        let angles = random(&[1, 1, 3, 4], 55, 3.0);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let y = apply_rotary(&bf16(&x), &bf16(&cos), &bf16(&sin)).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let y = y.to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&y, &apply_rotary(&x, &cos, &sin).unwrap()) < 2e-2);
    }
}
