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
//! Under the decoder's causal mask, long sequences go in blocks of queries, each against the keys
//! up to its last query only ([`QUERY_BLOCK`]): at 2048 positions, 10/16 of the products and
//! softmax work of the whole square. Grouped KV heads are repeated to the query heads first
//! (as transformers' `repeat_kv`; [B, H, S, D] is small next to the scores), so a block is one
//! batched product over all heads. The CPU runs the same op (tests compare it with the composed
//! ops, values and gradients, in one block and in several); the decoder uses it on a GPU only
//! (`device::own_cuda_kernels`).

use candle_core::backend::{BackendDevice, BackendStorage};
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

/// Queries per block of the causal attention: block i (queries `i·QUERY_BLOCK ..`) needs only
/// the keys up to its last query, so at 2048 positions the four blocks compute 10/16 of the
/// scores (the rest are hidden by the causal mask). Fewer, larger blocks keep the products
/// large and the launches few.
pub const QUERY_BLOCK: usize = 512;

/// Overrides [`QUERY_BLOCK`] (a positive count of queries): short test sequences then take the
/// blocked path too (the GPU check's training runs, the CLI test of the GPU paths).
pub const QUERY_BLOCK_VAR: &str = "FERROTUNE_ATTENTION_BLOCK";

/// [`QUERY_BLOCK`], or [`QUERY_BLOCK_VAR`] where it holds a positive number.
fn query_block() -> usize {
    static BLOCK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BLOCK.get_or_init(|| {
        std::env::var(QUERY_BLOCK_VAR)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(QUERY_BLOCK)
    })
}

/// `softmax(scale · Q·Kᵀ + mask) · V` per query head (see [`fits`]): [B, H, T, D]. With
/// `causal` the caller promises that the mask hides every key after its query (the decoder's
/// training mask): then, for T = S above [`QUERY_BLOCK`], each block of queries multiplies only
/// the keys up to its last query. The loss and every gradient are those of the whole product;
/// only a query row that sees no key at all (a padding position nothing reads) comes out uniform
/// over its block's keys instead of all keys.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    attention_in_blocks(q, k, v, mask, scale, causal.then(query_block))
}

/// [`attention`] with causal blocks of `block` queries (`None`: one block, all keys).
fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    block: Option<usize>,
) -> Result<Tensor> {
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
    let blocks = match block {
        Some(rows) if t == s && rows > 0 && t > rows => (0..t)
            .step_by(rows)
            .map(|i0| {
                let i1 = (i0 + rows).min(t);
                Block {
                    first: i0,
                    queries: i1 - i0,
                    keys: i1,
                }
            })
            .collect(),
        _ => vec![Block {
            first: 0,
            queries: t,
            keys: s,
        }],
    };
    // One mask for all blocks: each block reads its part as a view (a copy of a block's part
    // kept per layer would be 10/16 of the mask per layer, gigabytes over a deep model).
    let mask = mask.to_dtype(q.dtype())?.detach();
    // Each query head reads its own copy of its KV head's keys and values ([B, H, S, D], as
    // transformers' `repeat_kv`), so one batched product covers every head of a block; candle's
    // broadcast sums the copies' gradients back onto the KV heads.
    let repeat = |x: &Tensor| -> Result<Tensor> {
        if kv == h {
            return Ok(x.contiguous()?);
        }
        let x = x.unsqueeze(2)?.broadcast_as((b, kv, h / kv, s, d))?;
        Ok(x.contiguous()?.reshape((b, h, s, d))?)
    };
    let op = Attention {
        mask,
        blocks,
        scale,
        dims: Dims {
            batch: b,
            heads: h,
            queries: t,
            keys: s,
            dim: d,
        },
    };
    Ok(q.contiguous()?.apply_op3(&repeat(k)?, &repeat(v)?, op)?)
}

#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    queries: usize,
    keys: usize,
    dim: usize,
}

/// Queries `first..first + queries` against keys `0..keys`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Block {
    first: usize,
    queries: usize,
    keys: usize,
}

struct Attention {
    /// [B, 1, T, S], in the scores' type.
    mask: Tensor,
    blocks: Vec<Block>,
    scale: f64,
    dims: Dims,
}

/// A tensor over storage this op made (no gradient).
fn wrap(storage: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

impl Attention {
    /// The mask's [B, 1, queries, keys] part for a block, as a view.
    fn block_mask(&self, bl: &Block) -> candle_core::Result<Tensor> {
        self.mask
            .narrow(2, bl.first, bl.queries)?
            .narrow(3, 0, bl.keys)
    }

    /// The forward on any backend, block by block: `S = Q·Kᵀ`, `P = masked softmax(S)`,
    /// `O = P·V`, each block's rows of O copied into place, with `into` and `from` moving the
    /// backend's storage in and out of candle's `Storage`.
    fn forward<B>(
        &self,
        (q, ql): (&B, &Layout),
        (k, kl): (&B, &Layout),
        (v, vl): (&B, &Layout),
        into: impl Fn(B) -> Storage,
        from: impl Fn(&Storage) -> Option<&B>,
    ) -> candle_core::Result<(B, Shape)>
    where
        B: BackendStorage,
        B::Device: BackendDevice<Storage = B>,
    {
        let Dims {
            batch,
            heads,
            queries: t,
            keys: s,
            dim: d,
        } = self.dims;
        let n = batch * heads;
        let shape = Shape::from((batch, heads, t, d));
        let mut out = None;
        for bl in &self.blocks {
            let (rows, keys) = (bl.queries, bl.keys);
            let mask = self.block_mask(bl)?;
            let lq = Layout::new(
                Shape::from((n, rows, d)),
                vec![t * d, d, 1],
                ql.start_offset() + bl.first * d,
            );
            // Kᵀ: the first `keys` keys of each head, [n, keys, D] read as [n, D, keys].
            let lk = Layout::new(
                Shape::from((n, d, keys)),
                vec![s * d, 1, d],
                kl.start_offset(),
            );
            let lv = Layout::new(
                Shape::from((n, keys, d)),
                vec![s * d, d, 1],
                vl.start_offset(),
            );
            let scores = q.matmul(k, (n, rows, keys, d), &lq, &lk)?;
            let scores = wrap(into(scores), (batch, heads, rows, keys));
            let probs = fused_softmax::masked_softmax_values(&scores, &mask, self.scale)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            drop(scores);
            let (storage, pl) = probs.storage_and_layout();
            if !pl.is_contiguous() {
                return Err(candle_core::Error::Msg(
                    "attention: probabilities are not contiguous".into(),
                ));
            }
            let p = from(&storage)
                .ok_or_else(|| candle_core::Error::Msg("attention: device".into()))?;
            let lp = Layout::contiguous_with_offset((n, rows, keys), pl.start_offset());
            let o = p.matmul(v, (n, rows, d, keys), &lp, &lv)?;
            if self.blocks.len() == 1 {
                return Ok((o, shape));
            }
            let dst = match &mut out {
                Some(dst) => dst,
                None => out.insert(q.device().zeros_impl(&shape, q.dtype())?),
            };
            // The block's [n, rows, D] into rows `first..` of each head's [T, D].
            o.copy2d(dst, n, rows * d, rows * d, t * d, 0, bl.first * d)?;
        }
        let out = out.ok_or_else(|| candle_core::Error::Msg("attention: no blocks".into()))?;
        Ok((out, shape))
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

    /// Each block's scores and probabilities again (dropped with the block), then
    /// `dV = Pᵀ·G`, `dS = softmax'(G·Vᵀ)`, `dQ = dS·K`, `dK = dSᵀ·Q`. The blocks' key
    /// gradients overlap (block i reaches keys 0..its end), so with several blocks they are
    /// summed in f32.
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
        } = self.dims;
        let n = batch * heads;
        let msg = |e: crate::error::Error| candle_core::Error::Msg(e.to_string());
        let q = q.detach().reshape((n, queries, dim))?;
        let k = k.detach().reshape((n, keys, dim))?;
        let v = v.detach().reshape((n, keys, dim))?;
        let g = grad.contiguous()?.reshape((n, queries, dim))?;
        let sums = if self.blocks.len() > 1 {
            let zeros = || Tensor::zeros((n, keys, dim), candle_core::DType::F32, q.device());
            Some((zeros()?, zeros()?))
        } else {
            None
        };
        let (mut dq_parts, mut dk_one, mut dv_one) = (Vec::new(), None, None);
        for bl in &self.blocks {
            let (rows, seen) = (bl.queries, bl.keys);
            let mask = self.block_mask(bl)?;
            let qb = q.narrow(1, bl.first, rows)?;
            let gb = g.narrow(1, bl.first, rows)?;
            let (kb, vb) = (k.narrow(1, 0, seen)?, v.narrow(1, 0, seen)?);
            let scores = qb.matmul(&kb.t()?)?.reshape((batch, heads, rows, seen))?;
            let probs =
                fused_softmax::masked_softmax_values(&scores, &mask, self.scale).map_err(msg)?;
            drop(scores);
            let p = probs.reshape((n, rows, seen))?;
            let dv = p.t()?.matmul(&gb)?;
            let dp = gb.matmul(&vb.t()?)?.reshape((batch, heads, rows, seen))?;
            let ds = fused_softmax::masked_softmax_grad(&probs, &dp, self.scale).map_err(msg)?;
            let ds = ds.reshape((n, rows, seen))?;
            dq_parts.push(ds.matmul(&kb)?);
            let dk = ds.t()?.matmul(&qb)?;
            match &sums {
                Some((dk_sum, dv_sum)) => {
                    for (sum, part) in [(dk_sum, dk), (dv_sum, dv)] {
                        let total = (sum.narrow(1, 0, seen)? + part.to_dtype(sum.dtype())?)?;
                        sum.slice_set(&total, 1, 0)?;
                    }
                }
                None => (dk_one, dv_one) = (Some(dk), Some(dv)),
            }
        }
        let dq = Tensor::cat(&dq_parts, 1)?.reshape((batch, heads, queries, dim))?;
        let shape = (batch, heads, keys, dim);
        let (dk, dv) = match (dk_one, dv_one, sums) {
            (Some(dk), Some(dv), _) => (dk, dv),
            (_, _, Some((dk, dv))) => (dk.to_dtype(q.dtype())?, dv.to_dtype(q.dtype())?),
            _ => return Err(candle_core::Error::Msg("attention: no blocks".into())),
        };
        Ok((Some(dq), Some(dk.reshape(shape)?), Some(dv.reshape(shape)?)))
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

    /// An additive [b, 1, t, t] mask: key j visible to query i of batch row `row` where
    /// `visible(row, i, j)`.
    fn mask_where(b: usize, t: usize, visible: impl Fn(usize, usize, usize) -> bool) -> Tensor {
        let mut data = Vec::new();
        for row in 0..b {
            for i in 0..t {
                for j in 0..t {
                    data.push(if visible(row, i, j) { 0.0 } else { MASKED });
                }
            }
        }
        Tensor::from_vec(data, (b, 1, t, t), &Device::Cpu).unwrap()
    }

    /// Causal with a padded key in batch row 1 and a fully masked query in row 0.
    fn mask(b: usize, t: usize) -> Tensor {
        mask_where(b, t, |row, i, j| {
            j <= i && !(row == 1 && j == 0) && !(row == 0 && i == 2)
        })
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
        let got = attention(qt, kt, vt, &m, scale, false).unwrap();
        let want = composed(qt, kt, vt, &m, scale);
        assert_eq!(got.dims(), [b, h, t, d]);
        assert!(max_abs_diff(&got, &want) < 1e-5);
        assert_same_gradients(&got, &want, &[&q, &k, &v], 64, 1e-5, Some(1e-2));
    }

    /// Causal with right padding (batch row 1's last 3 positions pad: real queries never see
    /// them, and every query sees at least key 0).
    fn causal_padded_mask(b: usize, t: usize) -> Tensor {
        mask_where(b, t, |row, i, j| j <= i && !(row == 1 && j >= t - 3))
    }

    /// Causal blocks of 4 queries over 11 positions (the last block short), each against the
    /// keys up to its end: the same values and gradients as the composed whole square.
    #[test]
    fn causal_blocks_match_the_whole_square() {
        let (b, h, kv, t, d) = (2, 4, 2, 11, 8);
        let q = Var::from_tensor(&random(&[b, h, t, d], 71, 1.5)).unwrap();
        let k = Var::from_tensor(&random(&[b, kv, t, d], 72, 1.5)).unwrap();
        let v = Var::from_tensor(&random(&[b, kv, t, d], 73, 1.0)).unwrap();
        let m = causal_padded_mask(b, t);
        let scale = 1.0 / (d as f64).sqrt();
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let want = composed(qt, kt, vt, &m, scale);
        for block in [4, 1, 10, 11] {
            let got = attention_in_blocks(qt, kt, vt, &m, scale, Some(block)).unwrap();
            assert_eq!(got.dims(), [b, h, t, d]);
            assert!(max_abs_diff(&got, &want) < 1e-5, "blocks of {block}");
            assert_same_gradients(&got, &want, &[&q, &k, &v], 74, 1e-5, Some(1e-2));
        }
        // Without grouped heads too.
        let k4 = Var::from_tensor(&random(&[b, h, t, d], 75, 1.5)).unwrap();
        let v4 = Var::from_tensor(&random(&[b, h, t, d], 76, 1.0)).unwrap();
        let (kt, vt) = (k4.as_tensor(), v4.as_tensor());
        let got = attention_in_blocks(qt, kt, vt, &m, scale, Some(3)).unwrap();
        let want = composed(qt, kt, vt, &m, scale);
        assert!(max_abs_diff(&got, &want) < 1e-5);
        assert_same_gradients(&got, &want, &[&q, &k4, &v4], 77, 1e-5, Some(1e-2));
        // The decoder's causal entry point keeps one block below its block size.
        let one = attention(qt, kt, vt, &m, scale, true).unwrap();
        assert!(max_abs_diff(&one, &want) < 1e-5);
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        let q = random(&[1, 3, 4, 8], 1, 1.0);
        let k = random(&[1, 2, 4, 8], 2, 1.0);
        let m = mask(1, 4);
        assert!(!fits(&q, &k, &k, &m), "3 query heads on 2 KV heads");
        assert!(attention(&q, &k, &k, &m, 1.0, true).is_err());
        let q = random(&[1, 4, 4, 8], 3, 1.0);
        assert!(fits(&q, &k, &k, &m));
        assert!(!fits(&q, &k, &k, &mask(1, 3)));
    }
}
