//! Training attention on a GPU that keeps no `[B, H, T, S]` tensor for the backward pass.
//!
//! Composed, attention keeps its scores (the masked softmax's input) and its probabilities (its
//! output, and the `P·V` product's input) in the graph of every layer until the backward pass:
//! at Qwen2.5-0.5B, seq 2048, batch 8 in bf16 that is 2 × 940 MB per layer, 45 GB over 24
//! layers. Here attention is one op: the forward runs `Q·Kᵀ` and `P·V` through the backend's own
//! batched products (cuBLAS on a GPU) and the masked softmax between them, and keeps only q, k
//! and v; the backward recomputes the scores and probabilities of its layer (one more `Q·Kᵀ`
//! and softmax) and frees them when the layer is done.
//!
//! Grouped KV heads are folded as in the decoder's composed attention: q [B, H, T, D] is
//! `[B·KV, G·T, D]` (query head h reads KV head h / G, as transformers' `repeat_kv`), so keys
//! and values are never repeated and their gradients sum the group's heads by the products
//! themselves. The CPU runs the same op (tests compare it with the composed ops, values and
//! gradients); the decoder uses it on a GPU only (`device::own_cuda_kernels`).

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use super::fused_softmax;
use crate::error::{Error, Result};

/// Whether [`attention`] takes these: q [B, H, T, D], k and v [B, KV, S, D] with H a multiple
/// of KV, mask [B, 1, T, S], one f32 or bf16 type for q, k, v, nothing empty.
pub fn fits(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> bool {
    let (Ok((b, h, t, d)), Ok((bk, kv, s, dk))) = (q.dims4(), k.dims4()) else {
        return false;
    };
    q.elem_count() > 0
        && k.elem_count() > 0
        && crate::device::kernel_dtype(q.dtype())
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && bk == b
        && dk == d
        && kv > 0
        && h % kv == 0
        && v.dims() == k.dims()
        && mask.dims() == [b, 1, t, s]
}

/// `softmax(scale · Q·Kᵀ + mask) · V` per query head (see [`fits`]): [B, H, T, D].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if !fits(q, k, v, mask) {
        return Err(Error::invalid(format!(
            "attention: q {:?}, k {:?}, v {:?}, mask {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.dims()
        )));
    }
    let (b, h, t, d) = q.dims4()?;
    let (_, kv, s, _) = k.dims4()?;
    let op = Attention {
        mask: mask.to_dtype(q.dtype())?.contiguous()?.detach(),
        scale,
        dims: Dims {
            batch: b,
            heads: h,
            kv_heads: kv,
            queries: t,
            keys: s,
            dim: d,
        },
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    dim: usize,
}

impl Dims {
    /// Query rows per KV head: the group's heads times the queries.
    fn rows(&self) -> usize {
        self.heads / self.kv_heads * self.queries
    }

    fn products(&self) -> usize {
        self.batch * self.kv_heads
    }
}

struct Attention {
    mask: Tensor,
    scale: f64,
    dims: Dims,
}

/// A tensor over storage this op made (no gradient).
fn wrap(storage: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

impl Attention {
    /// The forward on any backend: `S = Q·Kᵀ`, `P = masked softmax(S)`, `O = P·V`, with
    /// `into` and `from` moving the backend's storage in and out of candle's `Storage`.
    fn forward<B: BackendStorage>(
        &self,
        (q, ql): (&B, &Layout),
        (k, kl): (&B, &Layout),
        (v, vl): (&B, &Layout),
        into: impl Fn(B) -> Storage,
        from: impl Fn(&Storage) -> Option<&B>,
    ) -> candle_core::Result<(B, Shape)> {
        let Dims {
            keys: s, dim: d, ..
        } = self.dims;
        let (n, rows) = (self.dims.products(), self.dims.rows());
        let lq = Layout::contiguous_with_offset((n, rows, d), ql.start_offset());
        // Kᵀ: k's [n, S, D] read as [n, D, S] (what `t()` of the contiguous keys gives).
        let lk = Layout::new(Shape::from((n, d, s)), vec![s * d, 1, d], kl.start_offset());
        let lv = Layout::contiguous_with_offset((n, s, d), vl.start_offset());
        let scores = q.matmul(k, (n, rows, s, d), &lq, &lk)?;
        let Dims {
            batch,
            heads,
            queries,
            ..
        } = self.dims;
        let scores = wrap(into(scores), (batch, heads, queries, s));
        let probs = fused_softmax::masked_softmax_values(&scores, &self.mask, self.scale)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (storage, pl) = probs.storage_and_layout();
        if !pl.is_contiguous() {
            return Err(candle_core::Error::Msg(
                "attention: probabilities are not contiguous".into(),
            ));
        }
        let p =
            from(&storage).ok_or_else(|| candle_core::Error::Msg("attention: device".into()))?;
        let lp = Layout::contiguous_with_offset((n, rows, s), pl.start_offset());
        let out = p.matmul(v, (n, rows, d, s), &lp, &lv)?;
        Ok((out, Shape::from((batch, heads, queries, d))))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention-recompute"
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
        self.forward((s1, l1), (s2, l2), (s3, l3), Storage::Cpu, |s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
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
        self.forward((s1, l1), (s2, l2), (s3, l3), Storage::Cuda, |s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims {
            batch,
            heads,
            queries,
            keys,
            dim,
            ..
        } = self.dims;
        let (n, rows) = (self.dims.products(), self.dims.rows());
        let msg = |e: crate::error::Error| candle_core::Error::Msg(e.to_string());
        let q = q.detach().reshape((n, rows, dim))?;
        let k = k.detach().reshape((n, keys, dim))?;
        let v = v.detach().reshape((n, keys, dim))?;
        let g = grad.contiguous()?.reshape((n, rows, dim))?;
        // This layer's scores and probabilities again, dropped on return.
        let scores = q.matmul(&k.t()?)?.reshape((batch, heads, queries, keys))?;
        let probs =
            fused_softmax::masked_softmax_values(&scores, &self.mask, self.scale).map_err(msg)?;
        drop(scores);
        let p = probs.reshape((n, rows, keys))?;
        let dv = p.t()?.matmul(&g)?;
        let dp = g.matmul(&v.t()?)?.reshape((batch, heads, queries, keys))?;
        let ds = fused_softmax::masked_softmax_grad(&probs, &dp, self.scale).map_err(msg)?;
        let ds = ds.reshape((n, rows, keys))?;
        let dq = ds.matmul(&k)?.reshape((batch, heads, queries, dim))?;
        let dk = ds.t()?.matmul(&q)?;
        let kv_shape = (batch, self.dims.kv_heads, keys, dim);
        Ok((
            Some(dq),
            Some(dk.reshape(kv_shape)?),
            Some(dv.reshape(kv_shape)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::decoder::MASKED;
    use super::super::ops;
    use super::super::test_tensors::{assert_same_gradients, max_abs_diff, random};
    use super::*;
    use candle_core::{Device, Var};

    /// The composed attention of the decoder, query heads folded onto their KV head.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let (_, kv, s, _) = k.dims4().unwrap();
        let qg = q.reshape((b, kv, h / kv * t, d)).unwrap();
        let scores = qg
            .matmul(&k.t().unwrap())
            .unwrap()
            .reshape((b, h, t, s))
            .unwrap();
        let probs = ops::masked_softmax(&scores, mask, scale).unwrap();
        let probs = probs.reshape((b, kv, h / kv * t, s)).unwrap();
        probs.matmul(v).unwrap().reshape((b, h, t, d)).unwrap()
    }

    /// Causal with a padded key in batch row 1 and a fully masked query in row 0.
    fn mask(b: usize, t: usize) -> Tensor {
        let mut data = Vec::new();
        for row in 0..b {
            for i in 0..t {
                for j in 0..t {
                    let visible = j <= i && !(row == 1 && j == 0) && !(row == 0 && i == 2);
                    data.push(if visible { 0.0 } else { MASKED });
                }
            }
        }
        Tensor::from_vec(data, (b, 1, t, t), &Device::Cpu).unwrap()
    }

    /// Grouped KV heads (4 query heads on 2), values and the gradients of q, k and v against
    /// the composed ops.
    #[test]
    fn matches_the_composed_attention_values_and_gradients() {
        let (b, h, kv, t, d) = (2, 4, 2, 6, 8);
        let q = Var::from_tensor(&random(&[b, h, t, d], 61, 1.5)).unwrap();
        let k = Var::from_tensor(&random(&[b, kv, t, d], 62, 1.5)).unwrap();
        let v = Var::from_tensor(&random(&[b, kv, t, d], 63, 1.0)).unwrap();
        let m = mask(b, t);
        let scale = 1.0 / (d as f64).sqrt();
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        assert!(fits(qt, kt, vt, &m));
        let got = attention(qt, kt, vt, &m, scale).unwrap();
        let want = composed(qt, kt, vt, &m, scale);
        assert_eq!(got.dims(), [b, h, t, d]);
        assert!(max_abs_diff(&got, &want) < 1e-5);
        assert_same_gradients(&got, &want, &[&q, &k, &v], 64, 1e-5, Some(1e-2));
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        let q = random(&[1, 3, 4, 8], 1, 1.0);
        let k = random(&[1, 2, 4, 8], 2, 1.0);
        let m = mask(1, 4);
        assert!(!fits(&q, &k, &k, &m), "3 query heads on 2 KV heads");
        assert!(attention(&q, &k, &k, &m, 1.0).is_err());
        let q = random(&[1, 4, 4, 8], 3, 1.0);
        assert!(fits(&q, &k, &k, &m));
        assert!(!fits(&q, &k, &k, &mask(1, 3)));
    }
}
