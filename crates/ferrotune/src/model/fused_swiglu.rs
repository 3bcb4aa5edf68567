//! The MLP's SwiGLU activation, `silu(gate) ⊙ up`, as one CPU kernel with its own backward
//! pass.
//!
//! Composed, candle computes it as a unary map and a binary map forward, and five more tensors
//! backward (the silu derivative alone is built from several); this walks the `[B, T, I]`
//! activations once each way, recomputing the sigmoid in the backward pass instead of keeping
//! it. Off the CPU or outside f32 it is [`ops::swiglu`], the composed reference it is tested
//! against.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::fused::{
    f32_slice, for_each_rows, for_each_rows2, new_written, new_written2, two_input_grads,
};
use super::ops;
use crate::error::{Error, Result};

struct Swiglu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Swiglu {
    fn forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
        let write = |y: &mut [MaybeUninit<f32>]| {
            for_each_rows(y, 1, |offset, block| {
                let n = block.len();
                let (g, u) = (&gate[offset..offset + n], &up[offset..offset + n]);
                for ((y, &g), &u) in block.iter_mut().zip(g).zip(u) {
                    y.write(g * sigmoid(g) * u);
                }
            })
        };
        // SAFETY: every element of every block is written.
        unsafe { new_written(gate.len(), write) }
    }

    /// With `s = σ(g)`: `d up = dy · g·s` and `d gate = dy · u · s·(1 + g·(1 − s))`, the
    /// derivative of `g·σ(g)`.
    fn backward(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let write = |d_gate: &mut [MaybeUninit<f32>], d_up: &mut [MaybeUninit<f32>]| {
            for_each_rows2(d_gate, d_up, 1, |offset, dg, du| {
                let n = dg.len();
                let range = offset..offset + n;
                let (g, u, dy) = (&gate[range.clone()], &up[range.clone()], &dy[range]);
                for i in 0..n {
                    let s = sigmoid(g[i]);
                    du[i].write(dy[i] * g[i] * s);
                    dg[i].write(dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)));
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
        let y = Self::forward(f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        two_input_grads(gate, up, grad_res, Self::backward)
    }
}

/// `silu(gate) ⊙ up` (gate and up of one shape), differentiable in both: one fused kernel each
/// way on the CPU in f32, the composed [`ops::swiglu`] elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
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
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)?)
}

#[cfg(test)]
mod tests {
    use super::super::test_tensors::{assert_same_gradients, max_abs_diff, random};
    use super::*;
    use candle_core::Var;

    fn check_against_composed(dims: &[usize]) {
        // Gates wide enough to reach both tails of the sigmoid.
        let gate = Var::from_tensor(&random(dims, 41, 12.0)).unwrap();
        let up = Var::from_tensor(&random(dims, 42, 2.0)).unwrap();
        let fused = swiglu(gate.as_tensor(), up.as_tensor()).unwrap();
        let reference = ops::swiglu(gate.as_tensor(), up.as_tensor()).unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-5);
        assert_same_gradients(&fused, &reference, &[&gate, &up], 43, 1e-5, Some(1e-2));
    }

    #[test]
    fn swiglu_matches_composed_values_and_gradients() {
        check_against_composed(&[2, 5, 7]);
    }

    #[test]
    fn swiglu_matches_composed_when_parallel() {
        check_against_composed(&[3, 41, 689]);
    }

    #[test]
    fn swiglu_takes_the_composed_path_in_bf16() {
        let gate = random(&[2, 3, 5], 44, 3.0);
        let up = random(&[2, 3, 5], 45, 1.0);
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let y = swiglu(&bf16(&gate), &bf16(&up)).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let y = y.to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&y, &swiglu(&gate, &up).unwrap()) < 3e-2);
    }
}
