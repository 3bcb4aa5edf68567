//! The MLP's SwiGLU activation, `silu(gate) ⊙ up`, as one CPU kernel with its own backward
//! pass.
//!
//! Composed, candle computes it as a unary map and a binary map forward, and five more tensors
//! backward (the silu derivative alone is built from several); this walks the `[B, T, I]`
//! activations once each way, recomputing the sigmoid in the backward pass instead of keeping
//! it. Off the CPU or outside f32 it is [`ops::swiglu`], the composed reference it is tested
//! against. Under bf16 autocast the sigmoids' exps go through [`fast_exp`] (16 lanes at a
//! time, a few ulp from libm's); the f32 path keeps `f32::exp`, so its results do not move.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::fast_exp;
use super::fused::{
    f32_slice, for_each_rows, for_each_rows2, new_written, new_written2, two_input_grads,
};
use super::ops;
use crate::error::{Error, Result};

pub(super) struct Swiglu {
    /// Sigmoids through [`fast_exp`] (bf16 autocast only).
    pub(super) fast_exp: bool,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Elements per pass of [`Swiglu::sigmoids`] (a stack buffer).
const CHUNK: usize = 256;

impl Swiglu {
    /// `s = σ(g)` for up to [`CHUNK`] gates.
    fn sigmoids<'a>(&self, g: &[f32], s: &'a mut [f32; CHUNK]) -> &'a [f32] {
        let s = &mut s[..g.len()];
        if self.fast_exp {
            for (s, &g) in s.iter_mut().zip(g) {
                *s = -g;
            }
            fast_exp::exp_in_place(s, 0.0);
            for s in s.iter_mut() {
                *s = 1.0 / (1.0 + *s);
            }
        } else {
            for (s, &g) in s.iter_mut().zip(g) {
                *s = sigmoid(g);
            }
        }
        s
    }

    pub(super) fn forward(&self, gate: &[f32], up: &[f32]) -> Vec<f32> {
        let write = |y: &mut [MaybeUninit<f32>]| {
            for_each_rows(y, 1, |offset, block| {
                let mut buf = [0f32; CHUNK];
                for (i, y) in block.chunks_mut(CHUNK).enumerate() {
                    let at = offset + i * CHUNK;
                    let (g, u) = (&gate[at..at + y.len()], &up[at..at + y.len()]);
                    let s = self.sigmoids(g, &mut buf);
                    for (((y, &g), &u), &s) in y.iter_mut().zip(g).zip(u).zip(s) {
                        y.write(g * s * u);
                    }
                }
            })
        };
        // SAFETY: every element of every block is written.
        unsafe { new_written(gate.len(), write) }
    }

    /// With `s = σ(g)`: `d up = dy · g·s` and `d gate = dy · u · s·(1 + g·(1 − s))`, the
    /// derivative of `g·σ(g)`.
    pub(super) fn backward(&self, gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let write = |d_gate: &mut [MaybeUninit<f32>], d_up: &mut [MaybeUninit<f32>]| {
            for_each_rows2(d_gate, d_up, 1, |offset, dg, du| {
                let mut buf = [0f32; CHUNK];
                for (c, (dg, du)) in dg.chunks_mut(CHUNK).zip(du.chunks_mut(CHUNK)).enumerate() {
                    let range = offset + c * CHUNK..offset + c * CHUNK + dg.len();
                    let (g, u, dy) = (&gate[range.clone()], &up[range.clone()], &dy[range]);
                    let s = self.sigmoids(g, &mut buf);
                    for i in 0..dg.len() {
                        du[i].write(dy[i] * g[i] * s[i]);
                        dg[i].write(dy[i] * u[i] * s[i] * (1.0 + g[i] * (1.0 - s[i])));
                    }
                }
            })
        };
        // SAFETY: both outputs are written at every index of every block.
        unsafe { new_written2(gate.len(), write) }
    }
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.forward(f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        two_input_grads(gate, up, grad_res, |g, u, dy| self.backward(g, u, dy))
    }
}

/// `silu(gate) ⊙ up` (gate and up of one shape), differentiable in both: one fused kernel each
/// way on the CPU in f32, cuda/kernels.cu's on a GPU ([`super::elementwise_gpu`]), the composed
/// [`ops::swiglu`] elsewhere. With `bf16` (the decoder
/// under bf16 autocast) the sigmoids' exps go through [`fast_exp`].
pub fn swiglu(gate: &Tensor, up: &Tensor, bf16: bool) -> Result<Tensor> {
    if crate::device::own_cuda_kernels(gate.device(), crate::device::Kernels::Swiglu)
        && super::elementwise_gpu::swiglu_fits(gate, up)
    {
        return super::elementwise_gpu::swiglu(gate, up);
    }
    let on_cpu = gate.device().is_cpu() && up.device().is_cpu();
    if !on_cpu || gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        return ops::swiglu(gate, up);
    }
    if gate.dims() != up.dims() {
        return Err(Error::invalid(format!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        )));
    }
    let op = Swiglu { fast_exp: bf16 };
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::super::test_tensors::{assert_same_gradients, max_abs_diff, random};
    use super::*;
    use candle_core::Var;

    /// `fast_exp`: the bf16 path's sigmoids, a few ulp from libm's.
    fn check_against_composed(dims: &[usize], fast_exp: bool) {
        // Gates wide enough to reach both tails of the sigmoid (and past exp's range).
        let mut gate = random(dims, 41, 12.0);
        if fast_exp {
            gate = gate.affine(10.0, 0.0).unwrap();
        }
        let gate = Var::from_tensor(&gate).unwrap();
        let up = Var::from_tensor(&random(dims, 42, 2.0)).unwrap();
        let fused = swiglu(gate.as_tensor(), up.as_tensor(), fast_exp).unwrap();
        let reference = ops::swiglu(gate.as_tensor(), up.as_tensor()).unwrap();
        let tol = if fast_exp { 1e-4 } else { 1e-5 };
        assert!(max_abs_diff(&fused, &reference) < tol);
        assert_same_gradients(&fused, &reference, &[&gate, &up], 43, tol, Some(1e-2));
    }

    #[test]
    fn swiglu_matches_composed_values_and_gradients() {
        for fast_exp in [false, true] {
            check_against_composed(&[2, 5, 7], fast_exp);
        }
    }

    #[test]
    fn swiglu_matches_composed_when_parallel() {
        for fast_exp in [false, true] {
            check_against_composed(&[3, 41, 689], fast_exp);
        }
    }

    #[test]
    fn swiglu_takes_the_composed_path_in_bf16() {
        let gate = random(&[2, 3, 5], 44, 3.0);
        let up = random(&[2, 3, 5], 45, 1.0);
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let y = swiglu(&bf16(&gate), &bf16(&up), true).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let y = y.to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&y, &swiglu(&gate, &up, false).unwrap()) < 3e-2);
    }
}
