//! Training attention under bf16 autocast on the CPU as one op with its own backward pass:
//! `out = softmax(scale · Q·Kᵀ + mask) · V`, the two products bf16 with f32 accumulation
//! ([`super::bf16_gemm`]), the softmax f32 (its exps through [`super::fast_exp`]), exactly the
//! arithmetic of the composed path ([`super::bf16_matmul`] and [`super::fused_softmax`]).
//!
//! Why one op: composed, attention is about ten nodes of candle's graph (the products, the
//! softmax, and the reshapes and transposes between the head and token layouts), and candle's
//! backward pass gives every node's gradient a zero fill and an add of the node's whole size;
//! for the `[B, H, T, T]` scores and probabilities and the head transposes that was most of a
//! small model's gradient bookkeeping, and the graph kept the scores alive as well as the
//! probabilities. Here the graph holds one node: `V` is read in the projection's own
//! `[B, S, KV·D]` layout, the output is written in the `[B, T, H·D]` layout the output
//! projection reads, and only the probabilities are kept for the backward pass.
//!
//! Grouped KV heads: query heads `kv·groups .. (kv+1)·groups` share KV head `kv`, and each
//! (batch row, KV head) is one item whose `[groups·T, D]` queries meet its keys in one product.

use std::mem::MaybeUninit;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::bf16_gemm::{matmul_to_vec, matmul_uninit, Operand};
use super::fused::{cpu_error, cpu_f32, f32_slice, new_written, three_input_grads, with_f32};
use super::fused_softmax::{normalize_row, row_dot};
use crate::error::{Error, Result};

struct Attention {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    /// Queries per head (T).
    queries: usize,
    /// Keys per head (S).
    keys: usize,
    /// Head dimension (D).
    dim: usize,
    scale: f32,
    /// Additive mask [B, 1, T, S], shared by the heads.
    mask: Tensor,
    /// Whether a gradient will be asked for (else the probabilities are not kept).
    keep: bool,
    /// The forward's probabilities, one `[groups·T, S]` block per item (batch row, KV head).
    probs: Mutex<Vec<Vec<f32>>>,
}

impl Attention {
    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn items(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// Item `i`'s queries (or their gradient): `groups` heads of one batch row, contiguous.
    fn q_range(&self, i: usize) -> std::ops::Range<usize> {
        let len = self.groups() * self.queries * self.dim;
        i * len..(i + 1) * len
    }

    fn k_range(&self, i: usize) -> std::ops::Range<usize> {
        let len = self.keys * self.dim;
        i * len..(i + 1) * len
    }

    /// Item `i`'s values in the `[B, S, KV·D]` projection, as an operand indexed by the head
    /// dimension with the keys as depth (`by_key`: indexed by key, depth the head dimension).
    fn v_operand<'a>(&self, v: &'a [f32], i: usize, by_key: bool) -> Operand<'a> {
        let (kv, s, d) = (self.kv_heads, self.keys, self.dim);
        let data = &v[(i / kv) * s * kv * d + (i % kv) * d..];
        if by_key {
            Operand::DepthInner { data, ld: kv * d }
        } else {
            Operand::DepthOuter { data, ld: kv * d }
        }
    }

    /// Row `r` of an item's `[groups·T, D]` block sits in the `[B, T, H·D]` layout at this
    /// offset (query head `kv·groups + r / T`, position `r % T`).
    fn token_offset(&self, i: usize, r: usize) -> usize {
        let (h, t, d, g) = (self.heads, self.queries, self.dim, self.groups());
        let (bi, kv) = (i / self.kv_heads, i % self.kv_heads);
        (bi * t + r % t) * h * d + (kv * g + r / t) * d
    }

    /// Runs `f(item, threads)` for every item: items side by side, or one after another
    /// with every worker in each product when there are fewer items than workers.
    fn per_item<R: Send>(&self, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
        let threads = candle_core::utils::get_num_threads();
        if self.items() >= threads {
            (0..self.items()).into_par_iter().map(|i| f(i, 1)).collect()
        } else {
            (0..self.items()).map(|i| f(i, threads)).collect()
        }
    }

    /// Item `i`: its probabilities `[groups·T, S]` and its output rows `[groups·T, D]`.
    fn forward_item(
        &self,
        (q, k, v, mask): (&[f32], &[f32], &[f32], &[f32]),
        i: usize,
        threads: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (t, s, d) = (self.queries, self.keys, self.dim);
        let rows = self.groups() * t;
        let q = Operand::DepthInner {
            data: &q[self.q_range(i)],
            ld: d,
        };
        let k = Operand::DepthInner {
            data: &k[self.k_range(i)],
            ld: d,
        };
        let mut probs = matmul_to_vec((rows, s, d), q, k, threads);
        let bi = i / self.kv_heads;
        for (r, y) in probs.chunks_mut(s).enumerate() {
            let m = &mask[(bi * t + r % t) * s..][..s];
            for (y, &m) in y.iter_mut().zip(m) {
                *y = *y * self.scale + m;
            }
            normalize_row(y, true);
        }
        let p = Operand::DepthInner {
            data: &probs,
            ld: s,
        };
        let out = matmul_to_vec((rows, d, s), p, self.v_operand(v, i, false), threads);
        (probs, out)
    }

    /// Scatters each item's `[groups·T, D]` rows into a new `[B, T, H·D]` tensor's data.
    fn scatter_to_tokens(&self, items: &[Vec<f32>]) -> Vec<f32> {
        let d = self.dim;
        let len = self.batch * self.queries * self.heads * d;
        let write = |out: &mut [MaybeUninit<f32>]| {
            for (i, item) in items.iter().enumerate() {
                for (r, row) in item.chunks(d).enumerate() {
                    let at = self.token_offset(i, r);
                    for (o, &x) in out[at..at + d].iter_mut().zip(row) {
                        o.write(x);
                    }
                }
            }
        };
        // SAFETY: the items' rows cover every (batch row, position, head) once.
        unsafe { new_written(len, write) }
    }

    /// Item `i`'s rows of the `[B, T, H·D]` gradient as one `[groups·T, D]` block.
    fn item_rows(&self, grad: &[f32], i: usize) -> Vec<f32> {
        let d = self.dim;
        let rows = self.groups() * self.queries;
        let mut block = Vec::with_capacity(rows * d);
        for r in 0..rows {
            let at = self.token_offset(i, r);
            block.extend_from_slice(&grad[at..at + d]);
        }
        block
    }

    /// Item `i`'s gradients: `dQ` and `dK` into their slots of the head-layout results, `dV`
    /// returned as a `[S, D]` block (its rows interleave with other items' in `[B, S, KV·D]`).
    #[allow(clippy::too_many_arguments)]
    fn backward_item(
        &self,
        (q, k, v, grad): (&[f32], &[f32], &[f32], &[f32]),
        probs: &[f32],
        i: usize,
        dq: &mut [MaybeUninit<f32>],
        dk: &mut [MaybeUninit<f32>],
        threads: usize,
    ) -> Vec<f32> {
        let (s, d) = (self.keys, self.dim);
        let rows = self.groups() * self.queries;
        let d_out = self.item_rows(grad, i);
        let d_out_by_row = Operand::DepthInner {
            data: &d_out,
            ld: d,
        };
        // dP = dO · Vᵀ, then the softmax backward in place: dS = scale · P ⊙ (dP − Σ P ⊙ dP).
        let mut ds = matmul_to_vec(
            (rows, s, d),
            d_out_by_row,
            self.v_operand(v, i, true),
            threads,
        );
        for (g, y) in ds.chunks_mut(s).zip(probs.chunks(s)) {
            let dot = row_dot(y, g);
            for (g, &y) in g.iter_mut().zip(y) {
                *g = self.scale * y * (*g - dot);
            }
        }
        let by_row = |data| Operand::DepthInner { data, ld: s };
        let by_column = |data, ld| Operand::DepthOuter { data, ld };
        let k = &k[self.k_range(i)];
        let q = &q[self.q_range(i)];
        // dQ = dS · K, dK = dSᵀ · Q, dV = Pᵀ · dO.
        matmul_uninit((rows, d, s), by_row(&ds), by_column(k, d), dq, threads);
        matmul_uninit(
            (s, d, rows),
            by_column(&ds, s),
            by_column(q, d),
            dk,
            threads,
        );
        matmul_to_vec(
            (s, d, rows),
            by_column(probs, s),
            by_column(&d_out, d),
            threads,
        )
    }

    fn backward(
        &self,
        inputs: (&[f32], &[f32], &[f32]),
        grad: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let probs = self
            .probs
            .lock()
            .map_err(|_| cpu_error("attention: poisoned"))?;
        if probs.len() != self.items() {
            return Err(cpu_error(
                "attention: no saved probabilities to backpropagate",
            ));
        }
        let (q, k, v) = inputs;
        let (kv, s, d) = (self.kv_heads, self.keys, self.dim);
        let (q_item, k_item) = (self.q_range(0).len(), self.k_range(0).len());
        let (mut dq, mut dk) = (Vec::with_capacity(q.len()), Vec::with_capacity(k.len()));
        let dq_items = dq.spare_capacity_mut()[..q.len()].chunks_mut(q_item);
        let dk_items = dk.spare_capacity_mut()[..k.len()].chunks_mut(k_item);
        let mut slots: Vec<_> = dq_items.zip(dk_items).map(Mutex::new).collect();
        let dv_items = {
            let slots = &slots;
            self.per_item(|i, threads| {
                let mut slot = slots[i].lock().unwrap_or_else(|e| e.into_inner());
                let (dq, dk) = &mut *slot;
                self.backward_item((q, k, v, grad), &probs[i], i, dq, dk, threads)
            })
        };
        slots.clear();
        // SAFETY: every item wrote its whole dQ and dK slot (`matmul_uninit`), and the items'
        // slots cover both vectors.
        unsafe {
            dq.set_len(q.len());
            dk.set_len(k.len());
        }
        let write = |dv: &mut [MaybeUninit<f32>]| {
            for (i, item) in dv_items.iter().enumerate() {
                let base = (i / kv) * s * kv * d + (i % kv) * d;
                for (key, row) in item.chunks(d).enumerate() {
                    let at = base + key * kv * d;
                    for (o, &x) in dv[at..at + d].iter_mut().zip(row) {
                        o.write(x);
                    }
                }
            }
        };
        // SAFETY: the items' rows cover every (batch row, key, KV head) once.
        let dv = unsafe { new_written(v.len(), write) };
        Ok((dq, dk, dv))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention-bf16"
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
        let (q, k, v) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let (b, h, t, d) = (self.batch, self.heads, self.queries, self.dim);
        let kv_len = b * self.kv_heads * self.keys * d;
        if q.len() != b * h * t * d || k.len() != kv_len || v.len() != kv_len {
            return Err(cpu_error("attention: input shapes changed"));
        }
        let (probs, out): (Vec<_>, Vec<_>) = with_f32(&self.mask, |mask| {
            Ok(self
                .per_item(|i, threads| self.forward_item((q, k, v, mask), i, threads))
                .into_iter()
                .unzip())
        })?;
        let out = self.scatter_to_tokens(&out);
        if self.keep {
            *self
                .probs
                .lock()
                .map_err(|_| cpu_error("attention: poisoned"))? = probs;
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        three_input_grads((q, k, v), grad_res, |inputs, g| self.backward(inputs, g))
    }
}

/// Whether [`attention_bf16`] takes these tensors (CPU, f32); it has no fallback.
pub fn fuses(tensors: &[&Tensor]) -> bool {
    cpu_f32(tensors)
}

/// `softmax(scale · Q·Kᵀ + mask) · V` with `q` [B, H, T, D] and `k` [B, KV, S, D] (the rotated
/// heads), `v` the value projection [B, S, KV·D] and `mask` [B, 1, T, S]; returns [B, T, H·D],
/// the layout of the output projection's input. Products in bf16 with f32 accumulation,
/// gradients to `q`, `k` and `v`. For CPU f32 tensors ([`fuses`]) only.
pub fn attention_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if !fuses(&[q, k, v, mask]) {
        return Err(Error::invalid("attention_bf16: CPU f32 tensors only"));
    }
    let (b, h, t, d) = q.dims4()?;
    let (kb, kv, s, kd) = k.dims4()?;
    let fits = kb == b
        && kd == d
        && kv > 0
        && h.is_multiple_of(kv)
        && b * h * t * d * s > 0
        && v.dims() == [b, s, kv * d]
        && mask.dims() == [b, 1, t, s];
    if !fits {
        return Err(Error::invalid(format!(
            "attention_bf16: q {:?}, k {:?}, v {:?}, mask {:?} do not fit \
             ([B, H, T, D], [B, KV, S, D], [B, S, KV*D], [B, 1, T, S], none empty)",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.dims()
        )));
    }
    let op = Attention {
        batch: b,
        heads: h,
        kv_heads: kv,
        queries: t,
        keys: s,
        dim: d,
        scale: scale as f32,
        mask: mask.contiguous()?,
        keep: q.track_op() || k.track_op() || v.track_op(),
        probs: Mutex::new(Vec::new()),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::super::bf16_matmul::{matmul_bf16, matmul_bf16_nt};
    use super::super::decoder::MASKED;
    use super::super::fused_softmax::masked_softmax;
    use super::super::ops;
    use super::super::test_tensors::{assert_same_gradients, max_abs_diff, random};
    use super::*;
    use candle_core::{Device, Var};

    /// Causal over the last `t` of `s` keys, with batch row `r` missing its first `r` keys
    /// (left padding).
    fn mask(b: usize, t: usize, s: usize) -> Tensor {
        let mut data = Vec::with_capacity(b * t * s);
        for r in 0..b {
            for i in 0..t {
                for j in 0..s {
                    let visible = j >= r && j <= s - t + i;
                    data.push(if visible { 0.0 } else { MASKED });
                }
            }
        }
        Tensor::from_vec(data, (b, 1, t, s), &Device::Cpu).unwrap()
    }

    /// The composed path the decoder took before this op: fold the groups, `Q·Kᵀ`, masked
    /// softmax, `P·V`, unfold to tokens.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f64,
        bf16: bool,
    ) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let (_, kv, s, _) = k.dims4().unwrap();
        let v = v.reshape((b, s, kv, d)).unwrap().transpose(1, 2).unwrap();
        let q = q.reshape((b, kv, h / kv * t, d)).unwrap();
        let (scores, probs_v);
        if bf16 {
            scores = matmul_bf16_nt(&q, k).unwrap();
        } else {
            scores = q.matmul(&k.t().unwrap()).unwrap();
        }
        let scores = scores.reshape((b, h, t, s)).unwrap();
        let probs = if bf16 {
            masked_softmax(&scores, mask, scale, true).unwrap()
        } else {
            ops::masked_softmax(&scores, mask, scale).unwrap()
        };
        let probs = probs.reshape((b, kv, h / kv * t, s)).unwrap();
        let v = v.contiguous().unwrap();
        if bf16 {
            probs_v = matmul_bf16(&probs, &v).unwrap();
        } else {
            probs_v = probs.matmul(&v).unwrap();
        }
        probs_v
            .reshape((b, h, t, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
    }

    fn check([b, h, kv, t, s, d]: [usize; 6]) {
        let q = Var::from_tensor(&random(&[b, h, t, d], 61, 1.5)).unwrap();
        let k = Var::from_tensor(&random(&[b, kv, s, d], 62, 1.5)).unwrap();
        let v = Var::from_tensor(&random(&[b, s, kv * d], 63, 1.0)).unwrap();
        let mask = mask(b, t, s);
        let scale = 1.0 / (d as f64).sqrt();
        let fused = attention_bf16(&q, &k, &v, &mask, scale).unwrap();
        // The same arithmetic as the composed bf16 path, in the same order: the same bits,
        // values and gradients.
        let same = composed(&q, &k, &v, &mask, scale, true);
        assert_eq!(max_abs_diff(&fused, &same), 0.0);
        assert_same_gradients(
            &fused,
            &same,
            &[&q, &k, &v],
            64,
            f32::MIN_POSITIVE,
            Some(1e-2),
        );
        // Without a gradient to track (nothing kept for a backward pass): the same values.
        let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
        let untracked = attention_bf16(&qd, &kd, &vd, &mask, scale).unwrap();
        assert_eq!(max_abs_diff(&untracked, &fused), 0.0);
        // Against plain f32 attention (candle's ops): the bf16 rounding of the products only.
        let f32_reference = composed(&q, &k, &v, &mask, scale, false);
        assert!(max_abs_diff(&fused, &f32_reference) < 2e-2);
        assert_same_gradients(&fused, &f32_reference, &[&q, &k, &v], 65, 5e-2, Some(1e-2));
    }

    #[test]
    fn attention_matches_the_composed_path_values_and_gradients() {
        // Grouped heads, keys longer than queries (a cached prefix), odd sizes.
        check([2, 4, 2, 5, 7, 6]);
        check([1, 3, 3, 4, 4, 8]);
    }

    /// Fewer items than workers (one batch row, one KV head): one item at a time, its products
    /// large enough to be shared by the workers.
    #[test]
    fn attention_matches_with_one_item() {
        check([1, 2, 1, 33, 33, 16]);
        check([1, 2, 1, 260, 260, 64]);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let q = random(&[1, 2, 3, 4], 1, 1.0);
        let k = random(&[1, 1, 3, 4], 2, 1.0);
        let v = random(&[1, 3, 8], 3, 1.0);
        let err = attention_bf16(&q, &k, &v, &mask(1, 3, 3), 0.5).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        // Empty sequences are refused, not run.
        let q = random(&[1, 2, 0, 4], 1, 1.0);
        let k = random(&[1, 1, 0, 4], 2, 1.0);
        let v = random(&[1, 0, 4], 3, 1.0);
        let err = attention_bf16(&q, &k, &v, &mask(1, 0, 0), 0.5).unwrap_err();
        assert!(err.to_string().contains("none empty"), "{err}");
    }
}
