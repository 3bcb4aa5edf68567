//! The gated MLP's first half under bf16 autocast on the CPU, `silu(x·w_gateᵀ) ⊙ (x·w_upᵀ)`,
//! as one op with its own backward pass: the two projections ([`super::bf16_gemm`], as
//! [`super::bf16_linear`] computes them) and the SwiGLU ([`super::fused_swiglu`]).
//!
//! Composed it is three nodes of candle's graph, and candle's backward pass gives each node's
//! gradient a zero fill and an add of its whole `[B, T, I]` size and sums the two input
//! gradients into a third tensor; here the graph has one node, the gate and up activations
//! are kept by the op for its backward pass, and the weight gradients share one packing of
//! `x`. The arithmetic is the composed path's, so the results are the same bits.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};

use super::bf16_gemm::{matmul_packed_to_vec, Operand, PackedB};
use super::bf16_linear::{threads, LinearBf16};
use super::fused::{cpu_error, cpu_f32, f32_slice, three_input_grads};
use super::fused_swiglu::Swiglu;
use crate::error::{Error, Result};

struct GatedMlp {
    /// Both projections' dimensions: x's rows, hidden size in, intermediate size out.
    linear: LinearBf16,
    /// Whether a gradient will be asked for (else the activations are not kept).
    keep: bool,
    /// The forward's gate and up activations, `[rows, outputs]` each.
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl GatedMlp {
    fn swiglu(&self) -> Swiglu {
        Swiglu { fast_exp: true }
    }

    /// `dx = d_gate·w_gate + d_up·w_up`, `dw_gate = d_gateᵀ·x`, `dw_up = d_upᵀ·x`.
    fn backward(
        &self,
        (x, w_gate, w_up): (&[f32], &[f32], &[f32]),
        grad: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| cpu_error("gated-mlp: poisoned"))?;
        let Some((gate, up)) = saved.as_ref() else {
            return Err(cpu_error(
                "gated-mlp: no saved activations to backpropagate",
            ));
        };
        let linear = &self.linear;
        let (r, k, n) = (linear.rows, linear.inputs, linear.outputs);
        let (d_gate, d_up) = self.swiglu().backward(gate, up, grad);
        let mut dx = linear.input_grad(&d_gate, w_gate);
        for (a, b) in dx.iter_mut().zip(linear.input_grad(&d_up, w_up)) {
            *a += b;
        }
        // The tokens are the depth of both weight gradients; x is packed once for the two.
        let x_by_column = Operand::DepthOuter { data: x, ld: k };
        let x_packed = PackedB::new(x_by_column, (k, r), threads());
        let dw = |dy: &[f32]| {
            let dy = Operand::DepthOuter { data: dy, ld: n };
            matmul_packed_to_vec(n, dy, &x_packed, threads())
        };
        Ok((dx, dw(&d_gate), dw(&d_up)))
    }
}

impl CustomOp3 for GatedMlp {
    fn name(&self) -> &'static str {
        "gated-mlp-bf16"
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
        let (x, w_gate, w_up) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let linear = &self.linear;
        let weight_len = linear.outputs * linear.inputs;
        if x.len() != linear.rows * linear.inputs
            || w_gate.len() != weight_len
            || w_up.len() != weight_len
        {
            return Err(cpu_error("gated-mlp: input shapes changed"));
        }
        let (gate, up) = (linear.product(x, w_gate), linear.product(x, w_up));
        let y = self.swiglu().forward(&gate, &up);
        if self.keep {
            *self
                .saved
                .lock()
                .map_err(|_| cpu_error("gated-mlp: poisoned"))? = Some((gate, up));
        }
        Ok((CpuStorage::F32(y), self.linear.shape.clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w_gate: &Tensor,
        w_up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        three_input_grads((x, w_gate, w_up), grad_res, |inputs, g| {
            self.backward(inputs, g)
        })
    }
}

/// `silu(x·w_gateᵀ) ⊙ (x·w_upᵀ)` for `x` [.., hidden] and weights [intermediate, hidden]: the
/// products in bf16 with f32 accumulation, the SwiGLU's exps through the vector `exp`, as the
/// decoder computes them under bf16 autocast; gradients to all three. CPU f32 tensors only.
pub fn gated_mlp_bf16(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[x, w_gate, w_up]) {
        return Err(Error::invalid("gated_mlp_bf16: CPU f32 tensors only"));
    }
    let (outputs, inputs) = w_gate.dims2()?;
    if w_up.dims() != [outputs, inputs] || x.dim(D::Minus1)? != inputs {
        return Err(Error::invalid(format!(
            "gated_mlp_bf16: x {:?}, gate {:?} and up {:?} do not fit",
            x.dims(),
            w_gate.dims(),
            w_up.dims()
        )));
    }
    let op = GatedMlp {
        linear: LinearBf16::for_input(x.dims(), outputs),
        keep: x.track_op() || w_gate.track_op() || w_up.track_op(),
        saved: Mutex::new(None),
    };
    Ok(x.contiguous()?
        .apply_op3(&w_gate.contiguous()?, &w_up.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::super::bf16_linear::linear_bf16;
    use super::super::fused_swiglu::swiglu;
    use super::super::ops;
    use super::super::test_tensors::{assert_same_gradients, max_abs_diff, random, weighted_sum};
    use super::*;
    use candle_core::Var;

    fn check(dims: &[usize], hidden: usize, intermediate: usize) {
        let mut x_dims = dims.to_vec();
        x_dims.push(hidden);
        let x = Var::from_tensor(&random(&x_dims, 71, 1.0)).unwrap();
        let wg = Var::from_tensor(&random(&[intermediate, hidden], 72, 0.5)).unwrap();
        let wu = Var::from_tensor(&random(&[intermediate, hidden], 73, 0.5)).unwrap();
        let fused = gated_mlp_bf16(&x, &wg, &wu).unwrap();
        // The composed bf16 path: two bf16 linears and the SwiGLU kernel.
        let gate = linear_bf16(&x, &wg, None).unwrap();
        let up = linear_bf16(&x, &wu, None).unwrap();
        let same = swiglu(&gate, &up, true).unwrap();
        assert_eq!(fused.dims(), same.dims());
        assert_eq!(max_abs_diff(&fused, &same), 0.0);
        assert_same_gradients(
            &fused,
            &same,
            &[&x, &wg, &wu],
            74,
            f32::MIN_POSITIVE,
            Some(1e-2),
        );
        // Against f32 candle ops: the bf16 rounding of the products only.
        let plain = ops::swiglu(
            &ops::linear(&x, &wg, None).unwrap(),
            &ops::linear(&x, &wu, None).unwrap(),
        )
        .unwrap();
        // Each bf16 input is within 2^-9 of its f32 value: relative to the output's size.
        let size = max_abs_diff(&plain, &plain.zeros_like().unwrap());
        let d = max_abs_diff(&fused, &plain);
        assert!(d < 1e-2 * size, "{d} vs output size {size}");
        // And the gradients, each relative to its own size.
        let gf = weighted_sum(&fused, 75).backward().unwrap();
        let gp = weighted_sum(&plain, 75).backward().unwrap();
        for var in [&x, &wg, &wu] {
            let (a, r) = (gf.get(var).unwrap(), gp.get(var).unwrap());
            let size = max_abs_diff(r, &r.zeros_like().unwrap());
            let d = max_abs_diff(a, r);
            assert!(
                size > 1e-2 && d < 2e-2 * size,
                "{d} vs gradient size {size}"
            );
        }
    }

    #[test]
    fn gated_mlp_matches_the_composed_path_values_and_gradients() {
        check(&[2, 5], 24, 40);
        // Large enough for the threaded products.
        check(&[3, 70], 64, 172);
    }

    #[test]
    fn mismatched_weights_are_errors() {
        let x = random(&[2, 8], 1, 1.0);
        let err = gated_mlp_bf16(&x, &random(&[4, 8], 2, 1.0), &random(&[5, 8], 3, 1.0));
        assert!(err.unwrap_err().to_string().contains("do not fit"));
    }
}
