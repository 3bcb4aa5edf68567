//! `matmul_bf16`: batched matrix products `C[i] = A[i] · B[i]` (or `A[i] · B[i]ᵀ`) with bf16
//! compute and f32 accumulation on the CPU, with their own backward pass: attention's `Q·Kᵀ`
//! and `P·V` under bf16 autocast, as PyTorch's CPU autocast computes `bmm`.
//!
//! As in [`super::bf16_linear`], every tensor stays f32 and only the products round their
//! inputs to bf16 ([`super::bf16_gemm`]); each product (forward, and both gradients backward)
//! reads the operands as stored, so no transposed copy is made. The batch items are small
//! (one `[groups·T, D]` query block per KV head), so they are spread over rayon's workers one
//! item each rather than each cut across all workers. Off the CPU, or for non-f32 tensors, it
//! is candle's `matmul`.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::bf16_gemm::{matmul_uninit, Operand};
use super::fused::{cpu_error, f32_slice, two_input_grads};
use crate::error::{Error, Result};

/// `C[i] [m, n] = A[i] [m, k] · B[i]`, with `B[i]` stored `[k, n]`, or `[n, k]` when
/// `b_transposed` (then `C[i] = A[i] · B[i]ᵀ`).
struct BatchedMatmulBf16 {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    b_transposed: bool,
}

/// One product per batch item: `operands(i)` gives item i's A and B; `dims` its `(m, n, k)`.
/// Returns the `batch · m · n` results, each item's written by its product (no zero fill).
fn batched<'a>(
    batch: usize,
    (m, n, k): (usize, usize, usize),
    operands: impl Fn(usize) -> (Operand<'a>, Operand<'a>) + Sync,
) -> Vec<f32> {
    let len = batch * m * n;
    let mut c = Vec::with_capacity(len);
    let out = &mut c.spare_capacity_mut()[..len];
    let threads = candle_core::utils::get_num_threads();
    let product = |i: usize, dst: &mut [MaybeUninit<f32>], threads: usize| {
        let (a, b) = operands(i);
        matmul_uninit((m, n, k), a, b, dst, threads);
    };
    if m * n > 0 {
        if batch >= threads {
            out.par_chunks_mut(m * n)
                .enumerate()
                .for_each(|(i, dst)| product(i, dst, 1));
        } else {
            for (i, dst) in out.chunks_mut(m * n).enumerate() {
                product(i, dst, threads);
            }
        }
    }
    // SAFETY: `matmul_uninit` initialised every element of each item's m·n block, and the
    // blocks cover all `len` elements.
    unsafe { c.set_len(len) };
    c
}

impl BatchedMatmulBf16 {
    fn forward(&self, a: &[f32], b: &[f32]) -> Vec<f32> {
        let (m, n, k) = (self.m, self.n, self.k);
        batched(self.batch, (m, n, k), |i| {
            let a = Operand::DepthInner {
                data: &a[i * m * k..(i + 1) * m * k],
                ld: k,
            };
            let data = &b[i * k * n..(i + 1) * k * n];
            let b = if self.b_transposed {
                Operand::DepthInner { data, ld: k }
            } else {
                Operand::DepthOuter { data, ld: n }
            };
            (a, b)
        })
    }

    /// `dA = dC · Bᵀ` (depth n) and `dB = Aᵀ · dC` (`dBᵀ = dCᵀ · A` when transposed; depth m).
    fn backward(&self, a: &[f32], b: &[f32], dc: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (m, n, k) = (self.m, self.n, self.k);
        let a_item = |i: usize| &a[i * m * k..(i + 1) * m * k];
        let b_item = |i: usize| &b[i * k * n..(i + 1) * k * n];
        let dc_item = |i: usize| &dc[i * m * n..(i + 1) * m * n];
        // dA [m, k]: A-operand dC (index m, depth n); B-operand B (index k, depth n).
        let da = batched(self.batch, (m, k, n), |i| {
            let data = b_item(i);
            let b = if self.b_transposed {
                Operand::DepthOuter { data, ld: k }
            } else {
                Operand::DepthInner { data, ld: n }
            };
            (
                Operand::DepthInner {
                    data: dc_item(i),
                    ld: n,
                },
                b,
            )
        });
        let a_by_column = |i: usize| Operand::DepthOuter {
            data: a_item(i),
            ld: k,
        };
        let dc_by_column = |i: usize| Operand::DepthOuter {
            data: dc_item(i),
            ld: n,
        };
        let db = if self.b_transposed {
            // dB [n, k] = dCᵀ · A: the rows m are the depth of both.
            batched(self.batch, (n, k, m), |i| (dc_by_column(i), a_by_column(i)))
        } else {
            // dB [k, n] = Aᵀ · dC.
            batched(self.batch, (k, n, m), |i| (a_by_column(i), dc_by_column(i)))
        };
        (da, db)
    }
}

impl CustomOp2 for BatchedMatmulBf16 {
    fn name(&self) -> &'static str {
        "batched-matmul-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let (batch, m, n, k) = (self.batch, self.m, self.n, self.k);
        if a.len() != batch * m * k || b.len() != batch * k * n {
            return Err(cpu_error("batched-matmul-bf16: input shapes changed"));
        }
        let c = self.forward(a, b);
        Ok((CpuStorage::F32(c), Shape::from((batch, m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        two_input_grads(a, b, grad_res, |xa, xb, g| self.backward(xa, xb, g))
    }
}

/// `a [.., m, k] · b [.., k, n]` over matching leading (batch) dimensions, the products in bf16
/// with f32 accumulation on the CPU (f32 tensors); gradients reach `a` and `b`.
pub fn matmul_bf16(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    batched_matmul(a, b, false)
}

/// `a [.., m, k] · b [.., n, k]ᵀ` (as [`matmul_bf16`], with `b` read transposed in place).
pub fn matmul_bf16_nt(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    batched_matmul(a, b, true)
}

fn batched_matmul(a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Tensor> {
    let composed = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        if b_transposed {
            Ok(a.matmul(&b.t()?)?)
        } else {
            Ok(a.matmul(b)?)
        }
    };
    let on_cpu = a.device().is_cpu() && b.device().is_cpu();
    if !on_cpu || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return composed(a, b);
    }
    let (a_dims, b_dims) = (a.dims(), b.dims());
    let rank = a_dims.len();
    let fits = rank >= 2 && b_dims.len() == rank && a_dims[..rank - 2] == b_dims[..rank - 2];
    let (m, k) = if fits {
        (a_dims[rank - 2], a_dims[rank - 1])
    } else {
        (0, 0)
    };
    let (b_depth, n) = match (fits, b_transposed) {
        (false, _) => (0, 0),
        (true, false) => (b_dims[rank - 2], b_dims[rank - 1]),
        (true, true) => (b_dims[rank - 1], b_dims[rank - 2]),
    };
    if !fits || b_depth != k {
        let b_shape = if b_transposed {
            "[.., n, k]"
        } else {
            "[.., k, n]"
        };
        return Err(Error::invalid(format!(
            "matmul_bf16: a {a_dims:?} ([.., m, k]) does not fit b {b_dims:?} ({b_shape})"
        )));
    }
    let batch: usize = a_dims[..rank - 2].iter().product();
    let op = BatchedMatmulBf16 {
        batch,
        m,
        n,
        k,
        b_transposed,
    };
    let b_rows = if b_transposed { (n, k) } else { (k, n) };
    let a3 = a.reshape((batch, m, k))?.contiguous()?;
    let b3 = b.reshape((batch, b_rows.0, b_rows.1))?.contiguous()?;
    let c = a3.apply_op2(&b3, op)?;
    let mut dims = a_dims.to_vec();
    dims[rank - 1] = n;
    Ok(c.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::super::bf16_gemm::round_bf16;
    use super::super::test_tensors::{max_abs_diff, random, weighted_sum};
    use super::*;
    use candle_core::{Device, Var};

    fn rounded(t: &Tensor) -> Tensor {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = v.into_iter().map(round_bf16).collect();
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    }

    /// Values against candle's f32 matmul of bf16-rounded inputs (only the accumulation order
    /// differs), gradients against the same composed reference (whose backward products do
    /// not round the incoming gradient, so a bf16-sized tolerance), and each gradient against
    /// its exact formula on rounded operands (tight).
    fn check(batch: &[usize], (m, n, k): (usize, usize, usize), b_transposed: bool) {
        let with = |tail: [usize; 2]| [batch, &tail[..]].concat();
        let a = Var::from_tensor(&random(&with([m, k]), 61, 1.0)).unwrap();
        let b_dims = if b_transposed { [n, k] } else { [k, n] };
        let b = Var::from_tensor(&random(&with(b_dims), 62, 1.0)).unwrap();
        let run = |a: &Tensor, b: &Tensor| {
            if b_transposed {
                matmul_bf16_nt(a, b).unwrap()
            } else {
                matmul_bf16(a, b).unwrap()
            }
        };
        let reference_of = |a: &Tensor, b: &Tensor| {
            if b_transposed {
                a.matmul(&b.t().unwrap()).unwrap()
            } else {
                a.matmul(b).unwrap()
            }
        };
        let c = run(a.as_tensor(), b.as_tensor());
        assert_eq!(c.dims(), with([m, n]).as_slice());
        let ar = Var::from_tensor(&rounded(a.as_tensor())).unwrap();
        let br = Var::from_tensor(&rounded(b.as_tensor())).unwrap();
        let cr = reference_of(ar.as_tensor(), br.as_tensor());
        let what = format!("{batch:?} {m}x{n}x{k} nt={b_transposed}");
        assert!(
            max_abs_diff(&c, &cr) < 1e-5,
            "{what}: {}",
            max_abs_diff(&c, &cr)
        );
        let plain = reference_of(a.as_tensor(), b.as_tensor());
        assert!(
            max_abs_diff(&c, &plain) > 1e-5,
            "{what}: rounding is visible"
        );

        let g = weighted_sum(&c, 63).backward().unwrap();
        let gr = weighted_sum(&cr, 63).backward().unwrap();
        let (da, db) = (g.get(a.as_tensor()).unwrap(), g.get(b.as_tensor()).unwrap());
        // The loss weights are dC; rounded, they give the exact bf16 gradients.
        let dc = rounded(&random(&with([m, n]), 63, 1.0));
        let da_exact = if b_transposed {
            dc.matmul(br.as_tensor()).unwrap()
        } else {
            dc.matmul(&br.as_tensor().t().unwrap()).unwrap()
        };
        let db_exact = if b_transposed {
            dc.t().unwrap().matmul(ar.as_tensor()).unwrap()
        } else {
            ar.as_tensor().t().unwrap().matmul(&dc).unwrap()
        };
        for (ours, exact, reference, name) in [
            (da, da_exact, gr.get(ar.as_tensor()).unwrap(), "da"),
            (db, db_exact, gr.get(br.as_tensor()).unwrap(), "db"),
        ] {
            assert_eq!(ours.dims(), reference.dims(), "{what} {name}");
            let d = max_abs_diff(ours, &exact);
            assert!(d < 1e-5, "{what} {name} vs exact: {d}");
            let d = max_abs_diff(ours, reference);
            assert!(d < 0.05, "{what} {name} vs composed: {d}");
            assert!(max_abs_diff(reference, &reference.zeros_like().unwrap()) > 0.5);
        }
    }

    #[test]
    fn values_and_gradients_match_composed_ops_on_rounded_inputs() {
        for b_transposed in [false, true] {
            // One item (threads cut the product), several (items spread over the workers),
            // shapes off every tile size and an odd depth.
            check(&[1], (13, 37, 19), b_transposed);
            check(&[2, 3], (25, 33, 7), b_transposed);
            check(&[5], (1, 3, 40), b_transposed);
        }
    }

    /// Attention's shapes: `Q·Kᵀ` with the query heads folded into their KV head, then `P·V`.
    #[test]
    fn attention_products_match_composed_ops() {
        check(&[2, 2], (2 * 24, 24, 16), true);
        check(&[2, 2], (2 * 24, 16, 24), false);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let a = random(&[2, 3, 4], 64, 1.0);
        assert!(matmul_bf16(&a, &random(&[2, 5, 6], 65, 1.0)).is_err());
        assert!(matmul_bf16(&a, &random(&[3, 4, 6], 66, 1.0)).is_err());
        assert!(matmul_bf16_nt(&a, &random(&[2, 6, 5], 67, 1.0)).is_err());
        assert!(matmul_bf16(&random(&[4], 68, 1.0), &random(&[4], 69, 1.0)).is_err());
        assert_eq!(
            matmul_bf16_nt(&a, &random(&[2, 6, 4], 70, 1.0))
                .unwrap()
                .dims(),
            &[2, 3, 6]
        );
    }

    #[test]
    fn other_dtypes_take_candles_matmul() {
        let a = random(&[2, 3, 4], 71, 1.0);
        let b = random(&[2, 4, 5], 72, 1.0);
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let c = matmul_bf16(&f64s(&a), &f64s(&b)).unwrap();
        assert_eq!(c.dtype(), DType::F64);
        let c = c.to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&c, &a.matmul(&b).unwrap()) < 1e-5);
    }
}
