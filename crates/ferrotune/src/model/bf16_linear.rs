//! `linear_bf16`: a linear layer with bf16 compute and f32 accumulation on the CPU, with its
//! own backward pass (autocast semantics: the weight, the input and every gradient stay f32;
//! only the three products round their inputs to bf16, see [`super::bf16_gemm`]).
//!
//! Forward `y = x·wᵀ (+ b)`, backward `dx = dy·w`, `dw = dyᵀ·x` (each one call of the bf16
//! GEMM on the tensors as stored, no transposed copies) and `db = Σ_rows dy`. The op takes
//! `x` with any leading dimensions and adds the bias itself: a reshape to two dimensions and
//! a broadcast add around it would be three more nodes in candle's graph, and its backward
//! pass gives each node's gradient a zero fill and an add of the whole tensor (and sums the
//! bias gradient one element at a time). On other devices, or for non-f32 tensors, it is the
//! ordinary [`super::ops::linear`].

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};

use super::bf16_gemm::{matmul_to_vec, Operand};
use super::fused::{cpu_error, cpu_f32, f32_slice, two_input_grads, with_f32};
use super::ops;
use crate::error::Result;

/// The workers a product may use: candle's thread count.
pub(super) fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// `x [.., in] · w [out, in]ᵀ (+ b [out])`, `rows` = the product of x's leading dimensions.
/// Also the projections of [`super::fused_mlp`].
pub(super) struct LinearBf16 {
    pub(super) rows: usize,
    pub(super) inputs: usize,
    pub(super) outputs: usize,
    /// The output's shape: x's with the last dimension `outputs`.
    pub(super) shape: Shape,
}

impl LinearBf16 {
    /// For an `x` of dimensions `x_dims` (at least one, the last the weight's inputs) and a
    /// weight of `outputs` rows.
    pub(super) fn for_input(x_dims: &[usize], outputs: usize) -> Self {
        let (&inputs, leading) = x_dims.split_last().expect("x has at least one dimension");
        let mut dims = x_dims.to_vec();
        *dims.last_mut().expect("x has at least one dimension") = outputs;
        LinearBf16 {
            rows: leading.iter().product(),
            inputs,
            outputs,
            shape: Shape::from(dims),
        }
    }

    /// `x · wᵀ`.
    pub(super) fn product(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let (r, k, n) = (self.rows, self.inputs, self.outputs);
        let x = Operand::DepthInner { data: x, ld: k };
        matmul_to_vec(
            (r, n, k),
            x,
            Operand::DepthInner { data: w, ld: k },
            threads(),
        )
    }

    /// `dx [r, k] = dy [r, n] · w [n, k]`: w's rows are the depth.
    pub(super) fn input_grad(&self, dy: &[f32], w: &[f32]) -> Vec<f32> {
        let (r, k, n) = (self.rows, self.inputs, self.outputs);
        let dy = Operand::DepthInner { data: dy, ld: n };
        matmul_to_vec(
            (r, k, n),
            dy,
            Operand::DepthOuter { data: w, ld: k },
            threads(),
        )
    }

    fn forward(&self, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
        let (r, k, n) = (self.rows, self.inputs, self.outputs);
        let bias_fits = bias.is_none_or(|b| b.len() == n);
        if x.len() != r * k || w.len() != n * k || !bias_fits {
            return Err(cpu_error("linear-bf16: input shapes changed"));
        }
        let mut y = self.product(x, w);
        if let Some(b) = bias.filter(|_| n > 0) {
            for row in y.chunks_mut(n) {
                for (y, &b) in row.iter_mut().zip(b) {
                    *y += b;
                }
            }
        }
        Ok(y)
    }

    fn backward(&self, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (r, k, n) = (self.rows, self.inputs, self.outputs);
        let dx = self.input_grad(dy, w);
        // dw [n, k] = dyᵀ [n, r] · x [r, k]: the rows (tokens) are the depth of both.
        let dw = matmul_to_vec(
            (n, k, r),
            Operand::DepthOuter { data: dy, ld: n },
            Operand::DepthOuter { data: x, ld: k },
            threads(),
        );
        (dx, dw)
    }

    /// `db = Σ_rows dy`, row after row from zero (the order of candle's sum over rows).
    fn bias_grad(&self, dy: &[f32]) -> Vec<f32> {
        let mut db = vec![0f32; self.outputs];
        for row in dy.chunks(self.outputs.max(1)) {
            for (d, &g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
        db
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
        let y = self.forward(f32_slice(s1, l1)?, f32_slice(s2, l2)?, None)?;
        Ok((CpuStorage::F32(y), self.shape.clone()))
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

impl CustomOp3 for LinearBf16 {
    fn name(&self) -> &'static str {
        "linear-bf16-bias"
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
        let bias = f32_slice(s3, l3)?;
        let y = self.forward(f32_slice(s1, l1)?, f32_slice(s2, l2)?, Some(bias))?;
        Ok((CpuStorage::F32(y), self.shape.clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let db = with_f32(&grad, |g| Ok(self.bias_grad(g)))?;
        let (dx, dw) = two_input_grads(x, w, &grad, |xs, ws, g| self.backward(xs, ws, g))?;
        Ok((dx, dw, Some(Tensor::from_vec(db, b.shape(), b.device())?)))
    }
}

/// `x @ weightᵀ (+ bias)` for `x` [.., in], `weight` [out, in] and `bias` [out], the products
/// in bf16 with f32 accumulation on the CPU (f32 tensors), the bias added in f32; gradients
/// reach `x`, `weight` and `bias`.
pub fn linear_bf16(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let tensors: Vec<&Tensor> = [x, weight].into_iter().chain(bias).collect();
    if !cpu_f32(&tensors) {
        return ops::linear(x, weight, bias);
    }
    let (outputs, inputs) = weight.dims2()?;
    let bias_fits = bias.is_none_or(|b| b.dims() == [outputs]);
    if x.dim(D::Minus1)? != inputs || !bias_fits {
        return Err(crate::error::Error::invalid(format!(
            "linear_bf16: input {:?} against weight {:?} and bias {:?}",
            x.dims(),
            weight.dims(),
            bias.map(|b| b.dims().to_vec())
        )));
    }
    let op = LinearBf16::for_input(x.dims(), outputs);
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    Ok(match bias {
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, op)?,
        None => x.apply_op2(&weight, op)?,
    })
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
        // The bias gradient is the f32 sum of dy over every leading index (no rounding).
        let db_exact = probe.sum((0, 1)).unwrap();
        let db = g.get(bias.as_tensor()).unwrap();
        assert!(max_abs_diff(db, &db_exact) < 1e-5);
    }

    /// Empty inner or outer dimensions give the right shapes (zeros plus the bias), no panic.
    #[test]
    fn empty_dimensions_are_products_of_zeros() {
        let x = Var::from_tensor(&random(&[3, 0], 8)).unwrap();
        let w = random(&[4, 0], 9);
        let b = random(&[4], 10);
        let y = linear_bf16(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.dims(), &[3, 4]);
        let want = b.unsqueeze(0).unwrap().broadcast_as((3, 4)).unwrap();
        assert_eq!(max_abs_diff(&y, &want.contiguous().unwrap()), 0.0);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(&x).unwrap().dims(), &[3, 0]);
        let none = linear_bf16(
            &random(&[2, 5], 11),
            &random(&[0, 5], 12),
            Some(&random(&[0], 13)),
        );
        assert_eq!(none.unwrap().dims(), &[2, 0]);
    }

    /// Without a bias: the same product, and the output keeps x's leading dimensions.
    #[test]
    fn no_bias_is_the_same_product() {
        let x = random(&[3, 2, 5, 33], 5);
        let w = random(&[17, 33], 6);
        let b = random(&[17], 7);
        let plain = linear_bf16(&x, &w, None).unwrap();
        assert_eq!(plain.dims(), &[3, 2, 5, 17]);
        let biased = linear_bf16(&x, &w, Some(&b)).unwrap();
        let unbiased = biased.broadcast_sub(&b).unwrap();
        assert!(max_abs_diff(&plain, &unbiased) < 1e-6);
    }
}
