//! `linear_bf16`: a linear layer with bf16 compute and f32 accumulation on the CPU, with its
//! own backward pass (autocast semantics: the weight, the input and every gradient stay f32;
//! only the three products round their inputs to bf16, see [`super::bf16_gemm`]).
//!
//! Forward `y = x·wᵀ`, backward `dx = dy·w` and `dw = dyᵀ·x`, each one call of the bf16 GEMM
//! on the tensors as stored (no transposed copies). On other devices, or for non-f32 tensors,
//! it is the ordinary [`super::ops::linear`].

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};

use super::bf16_gemm::{matmul_to_vec, Operand};
use super::fused::{cpu_error, f32_slice, two_input_grads};
use super::ops;
use crate::error::Result;

fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// `x [rows, in] · w [out, in]ᵀ`.
struct LinearBf16 {
    rows: usize,
    inputs: usize,
    outputs: usize,
}

impl LinearBf16 {
    fn forward(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let (r, k, n) = (self.rows, self.inputs, self.outputs);
        matmul_to_vec(
            (r, n, k),
            Operand::DepthInner { data: x, ld: k },
            Operand::DepthInner { data: w, ld: k },
            threads(),
        )
    }

    fn backward(&self, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (r, k, n) = (self.rows, self.inputs, self.outputs);
        // dx [r, k] = dy [r, n] · w [n, k]: w's rows are the depth.
        let dx = matmul_to_vec(
            (r, k, n),
            Operand::DepthInner { data: dy, ld: n },
            Operand::DepthOuter { data: w, ld: k },
            threads(),
        );
        // dw [n, k] = dyᵀ [n, r] · x [r, k]: the rows (tokens) are the depth of both.
        let dw = matmul_to_vec(
            (n, k, r),
            Operand::DepthOuter { data: dy, ld: n },
            Operand::DepthOuter { data: x, ld: k },
            threads(),
        );
        (dx, dw)
    }
}

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "linear-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        if x.len() != self.rows * self.inputs || w.len() != self.outputs * self.inputs {
            return Err(cpu_error("linear-bf16: input shapes changed"));
        }
        let y = self.forward(x, w);
        Ok((CpuStorage::F32(y), Shape::from((self.rows, self.outputs))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        two_input_grads(x, w, grad_res, |xs, ws, g| self.backward(xs, ws, g))
    }
}

/// `x @ weightᵀ (+ bias)` for `x` [.., in] and `weight` [out, in], the products in bf16 with
/// f32 accumulation on the CPU (f32 tensors); gradients reach `x`, `weight` and `bias`. The
/// bias is added in f32 by the ordinary broadcast op.
pub fn linear_bf16(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        return ops::linear(x, weight, bias);
    }
    let (outputs, inputs) = weight.dims2()?;
    let dims = x.dims().to_vec();
    let rows = x.elem_count() / inputs.max(1);
    if x.dim(D::Minus1)? != inputs {
        return Err(crate::error::Error::invalid(format!(
            "linear_bf16: input {:?} against weight {:?}",
            dims,
            weight.dims()
        )));
    }
    let op = LinearBf16 {
        rows,
        inputs,
        outputs,
    };
    let x2 = x.reshape((rows, inputs))?.contiguous()?;
    let out = x2.apply_op2(&weight.contiguous()?, op)?;
    let out = match bias {
        Some(b) => out.broadcast_add(b)?,
        None => out,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = outputs;
    Ok(out.reshape(out_dims)?)
}

#[cfg(test)]
mod tests {
    use super::super::bf16_gemm::round_bf16;
    use super::super::test_tensors::max_abs_diff;
    use super::*;
    use candle_core::{Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        super::super::test_tensors::random(shape, seed, 1.0)
    }

    fn rounded(t: &Tensor) -> Tensor {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = v.into_iter().map(round_bf16).collect();
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    }

    /// Values and gradients against candle's f32 ops on bf16-rounded copies of the inputs.
    /// The gradients' products round their own inputs (dy, and x or w) to bf16, so they are
    /// compared to the composed reference with a bf16-sized tolerance; the forward is only
    /// f32-accumulation away from it.
    #[test]
    fn values_and_gradients_match_composed_ops_on_rounded_inputs() {
        let (b, t, k, n) = (2, 7, 45, 19);
        let x = Var::from_tensor(&random(&[b, t, k], 1)).unwrap();
        let w = Var::from_tensor(&random(&[n, k], 2)).unwrap();
        let bias = Var::from_tensor(&random(&[n], 3)).unwrap();
        let probe = random(&[b, t, n], 4);
        let y = linear_bf16(x.as_tensor(), w.as_tensor(), Some(bias.as_tensor())).unwrap();
        assert_eq!(y.dims(), &[b, t, n]);
        let xr = Var::from_tensor(&rounded(x.as_tensor())).unwrap();
        let wr = Var::from_tensor(&rounded(w.as_tensor())).unwrap();
        let br = Var::from_tensor(bias.as_tensor()).unwrap();
        let yr = ops::linear(xr.as_tensor(), wr.as_tensor(), Some(br.as_tensor())).unwrap();
        assert!(max_abs_diff(&y, &yr) < 1e-5, "{}", max_abs_diff(&y, &yr));
        // And not just the f32 result: rounding is visible at this size.
        let plain = ops::linear(x.as_tensor(), w.as_tensor(), Some(bias.as_tensor())).unwrap();
        assert!(max_abs_diff(&y, &plain) > 1e-5);

        let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // dx = dy·w and dw = dyᵀ·x, with dy = probe rounded too.
        let pr = rounded(&probe);
        let dx_exact = pr
            .reshape((b * t, n))
            .unwrap()
            .matmul(wr.as_tensor())
            .unwrap()
            .reshape((b, t, k))
            .unwrap();
        let dw_exact = pr
            .reshape((b * t, n))
            .unwrap()
            .t()
            .unwrap()
            .matmul(&xr.as_tensor().reshape((b * t, k)).unwrap())
            .unwrap();
        let dx = g.get(x.as_tensor()).unwrap();
        let dw = g.get(w.as_tensor()).unwrap();
        assert!(
            max_abs_diff(dx, &dx_exact) < 1e-5,
            "dx {}",
            max_abs_diff(dx, &dx_exact)
        );
        assert!(
            max_abs_diff(dw, &dw_exact) < 1e-5,
            "dw {}",
            max_abs_diff(dw, &dw_exact)
        );
        for (ours, reference, what) in [
            (dx, gr.get(xr.as_tensor()).unwrap(), "dx"),
            (dw, gr.get(wr.as_tensor()).unwrap(), "dw"),
            (
                g.get(bias.as_tensor()).unwrap(),
                gr.get(br.as_tensor()).unwrap(),
                "dbias",
            ),
        ] {
            assert_eq!(ours.dims(), reference.dims(), "{what}");
            let d = max_abs_diff(ours, reference);
            assert!(d < 0.05, "{what} differs by {d}");
        }
    }
}
