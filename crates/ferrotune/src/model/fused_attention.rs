//! Training self-attention under bf16 autocast on the CPU as one op with its own backward
//! pass, from the joint q/k/v projection `[B, T, (H + 2·KV)·D]` to the `[B, T, H·D]` input of
//! the output projection: rotary embeddings on q and k ([`super::fused_rope`]), then
//! `softmax(scale · Q·Kᵀ + mask) · V`, the two products bf16 with f32 accumulation
//! ([`super::bf16_gemm`]), the softmax f32 (its exps through [`super::fast_exp`]), exactly the
//! arithmetic of the composed path ([`super::bf16_matmul`] and [`super::fused_softmax`]).
//!
//! Why one op: composed, attention is about fifteen nodes of candle's graph (three
//! projections, two rotations, the products, the softmax, and the reshapes and transposes
//! between the head and token layouts), and candle's backward pass gives every node's
//! gradient a zero fill and an add of the node's whole size; for the `[B, H, T, T]` scores
//! and probabilities and the head transposes that was most of a small model's gradient
//! bookkeeping, and the graph kept the scores alive as well as the probabilities. Here the
//! projection is one product (x packed once, not three times; x's gradient is one product,
//! not three summed) and the rest one node: V is read in the projection's own layout, the
//! gradient is written in it, and only the rotated q and k and the probabilities are kept
//! for the backward pass.
//!
//! Grouped KV heads: query heads `kv·groups .. (kv+1)·groups` share KV head `kv`, and each
//! (batch row, KV head) is one item whose `[groups·T, D]` queries meet its keys in one product.

use std::mem::MaybeUninit;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::bf16_gemm::{matmul_to_vec, matmul_uninit, Operand};
use super::fused::{cpu_error, cpu_f32, f32_slice, for_each_rows, new_written, with_f32};
use super::fused_rope::{rotate_heads, unrotate_row};
use super::fused_softmax::{normalize_row, row_dot};
use crate::error::{Error, Result};

struct Attention {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    /// Queries per head (T).
    queries: usize,
    /// Keys per head (S; self-attention, so S = T).
    keys: usize,
    /// Head dimension (D).
    dim: usize,
    scale: f32,
    /// Additive mask [B, 1, T, S], shared by the heads.
    mask: Tensor,
    /// Rotary tables [B, 1, T, D].
    cos: Tensor,
    sin: Tensor,
    /// Whether a gradient will be asked for (else nothing is kept).
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

/// What the forward keeps for the backward pass.
struct Saved {
    /// Rotated queries [B, H, T, D] and keys [B, KV, S, D].
    q: Vec<f32>,
    k: Vec<f32>,
    /// Probabilities, one `[groups·T, S]` block per item (batch row, KV head).
    probs: Vec<Vec<f32>>,
}

impl Attention {
    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn items(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// Columns of the joint projection: q heads, then k heads, then v heads.
    fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.dim
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

    /// Item `i`'s values in the joint projection, as an operand indexed by the head dimension
    /// with the keys as depth (`by_key`: indexed by key, depth the head dimension).
    fn v_operand<'a>(&self, qkv: &'a [f32], i: usize, by_key: bool) -> Operand<'a> {
        let (h, kv, s, d, w) = (self.heads, self.kv_heads, self.keys, self.dim, self.width());
        let data = &qkv[(i / kv) * s * w + (h + kv + i % kv) * d..];
        if by_key {
            Operand::DepthInner { data, ld: w }
        } else {
            Operand::DepthOuter { data, ld: w }
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

    /// Item `i`: its probabilities `[groups·T, S]` and its output rows `[groups·T, D]`, from
    /// the rotated heads `q` and `k` and the values in `qkv`.
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
    /// returned as a `[S, D]` block (its rows go to the v columns of the joint projection's
    /// gradient, interleaved with other items').
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

    fn forward(&self, qkv: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (b, h, kv, t, d) = (
            self.batch,
            self.heads,
            self.kv_heads,
            self.queries,
            self.dim,
        );
        if qkv.len() != b * t * self.width() {
            return Err(cpu_error("attention: input shape changed"));
        }
        let w = self.width();
        let (q, k) = with_f32(&self.cos, |cos| {
            with_f32(&self.sin, |sin| {
                let q = rotate_heads(qkv, (0, w), (h, t, d), cos, sin);
                let k = rotate_heads(qkv, (h * d, w), (kv, t, d), cos, sin);
                Ok((q, k))
            })
        })?;
        let (probs, out): (Vec<_>, Vec<_>) = with_f32(&self.mask, |mask| {
            Ok(self
                .per_item(|i, threads| self.forward_item((&q, &k, qkv, mask), i, threads))
                .into_iter()
                .unzip())
        })?;
        if self.keep {
            let mut saved = self
                .saved
                .lock()
                .map_err(|_| cpu_error("attention: poisoned"))?;
            *saved = Some(Saved { q, k, probs });
        }
        Ok(self.scatter_to_tokens(&out))
    }

    fn backward(&self, qkv: &[f32], grad: &[f32]) -> candle_core::Result<Vec<f32>> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| cpu_error("attention: poisoned"))?;
        let Some(Saved { q, k, probs }) = saved.as_ref() else {
            return Err(cpu_error("attention: nothing saved to backpropagate"));
        };
        let (h, kv, t, d, w) = (
            self.heads,
            self.kv_heads,
            self.queries,
            self.dim,
            self.width(),
        );
        let (q_item, k_item) = (self.q_range(0).len(), self.k_range(0).len());
        let (mut dq, mut dk) = (Vec::with_capacity(q.len()), Vec::with_capacity(k.len()));
        let dq_items = dq.spare_capacity_mut()[..q.len()].chunks_mut(q_item);
        let dk_items = dk.spare_capacity_mut()[..k.len()].chunks_mut(k_item);
        let slots: Vec<_> = dq_items.zip(dk_items).map(Mutex::new).collect();
        let dv_items = self.per_item(|i, threads| {
            let mut slot = slots[i].lock().unwrap_or_else(|e| e.into_inner());
            let (dq, dk) = &mut *slot;
            self.backward_item((q, k, qkv, grad), &probs[i], i, dq, dk, threads)
        });
        drop(slots);
        // SAFETY: every item wrote its whole dQ and dK slot (`matmul_uninit`), and the items'
        // slots cover both vectors.
        unsafe {
            dq.set_len(q.len());
            dk.set_len(k.len());
        }
        // The joint projection's gradient, one token row at a time: the q and k heads through
        // the rotary's transpose, the v heads as they are.
        with_f32(&self.cos, |cos| {
            with_f32(&self.sin, |sin| {
                let write = |out: &mut [MaybeUninit<f32>]| {
                    for_each_rows(out, w, |offset, block| {
                        for (j, row) in block.chunks_mut(w).enumerate() {
                            let r = offset / w + j;
                            let (bi, ti) = (r / t, r % t);
                            let table = r * d..(r + 1) * d;
                            let (c, s) = (&cos[table.clone()], &sin[table]);
                            let (rq, rest) = row.split_at_mut(h * d);
                            let (rk, rv) = rest.split_at_mut(kv * d);
                            for (hi, dx) in rq.chunks_mut(d).enumerate() {
                                let at = ((bi * h + hi) * t + ti) * d;
                                unrotate_row(&dq[at..at + d], c, s, dx);
                            }
                            for (g, dx) in rk.chunks_mut(d).enumerate() {
                                let at = ((bi * kv + g) * t + ti) * d;
                                unrotate_row(&dk[at..at + d], c, s, dx);
                            }
                            for (g, dx) in rv.chunks_mut(d).enumerate() {
                                let dv = &dv_items[bi * kv + g][ti * d..(ti + 1) * d];
                                for (o, &x) in dx.iter_mut().zip(dv) {
                                    o.write(x);
                                }
                            }
                        }
                    })
                };
                // SAFETY: every token row is written whole: its q, k and v heads.
                Ok(unsafe { new_written(qkv.len(), write) })
            })
        })
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.forward(f32_slice(s, l)?)?;
        let (b, h, t, d) = (self.batch, self.heads, self.queries, self.dim);
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        let dqkv = with_f32(qkv, |x| with_f32(&grad, |g| self.backward(x, g)))?;
        Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?))
    }
}

/// Self-attention from the joint projection `qkv` [B, T, (H + 2·KV)·D] (q heads, then k, then
/// v): q and k rotated with `cos`/`sin` [B, 1, T, D], then `softmax(scale · Q·Kᵀ + mask) · V`
/// with `mask` [B, 1, T, T]; returns [B, T, H·D], the layout of the output projection's input.
/// Products in bf16 with f32 accumulation, the gradient to `qkv`. CPU f32 tensors only (no
/// fallback), no empty dimension.
pub fn qkv_attention_bf16(
    qkv: &Tensor,
    (heads, kv_heads): (usize, usize),
    (cos, sin): (&Tensor, &Tensor),
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if !cpu_f32(&[qkv, cos, sin, mask]) {
        return Err(Error::invalid("qkv_attention_bf16: CPU f32 tensors only"));
    }
    let (b, t, width) = qkv.dims3()?;
    let d = width / (heads + 2 * kv_heads).max(1);
    let fits = heads > 0
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && width == (heads + 2 * kv_heads) * d
        && d.is_multiple_of(2)
        && b * t * d > 0
        && cos.dims() == [b, 1, t, d]
        && sin.dims() == [b, 1, t, d]
        && mask.dims() == [b, 1, t, t];
    if !fits {
        return Err(Error::invalid(format!(
            "qkv_attention_bf16: qkv {:?} ({heads} heads, {kv_heads} KV heads), cos {:?}, \
             sin {:?}, mask {:?} do not fit ([B, T, (H+2KV)*D] with D even, [B, 1, T, D] twice, \
             [B, 1, T, T], none empty)",
            qkv.dims(),
            cos.dims(),
            sin.dims(),
            mask.dims()
        )));
    }
    let op = Attention {
        batch: b,
        heads,
        kv_heads,
        queries: t,
        keys: t,
        dim: d,
        scale: scale as f32,
        mask: mask.contiguous()?,
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        keep: qkv.track_op(),
        saved: Mutex::new(None),
    };
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

#[cfg(test)]
mod tests {
    use super::super::bf16_matmul::{matmul_bf16, matmul_bf16_nt};
    use super::super::decoder::MASKED;
    use super::super::fused_rope::apply_rotary;
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

    /// The composed path the decoder took before this op, from the joint projection: split,
    /// rotate the head views (`bf16`: the fused rotary; else candle's ops), fold the groups,
    /// `Q·Kᵀ`, masked softmax, `P·V`, unfold to tokens.
    fn composed(
        qkv: &Tensor,
        (h, kv): (usize, usize),
        (cos, sin): (&Tensor, &Tensor),
        mask: &Tensor,
        scale: f64,
        bf16: bool,
    ) -> Tensor {
        let (b, t, width) = qkv.dims3().unwrap();
        let d = width / (h + 2 * kv);
        let part = |start: usize, heads: usize| qkv.narrow(2, start * d, heads * d).unwrap();
        let rotated = |x: Tensor, heads: usize| {
            let view = x
                .reshape((b, t, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            if bf16 {
                apply_rotary(&view, cos, sin).unwrap()
            } else {
                ops::apply_rotary(&view, cos, sin).unwrap()
            }
        };
        let q = rotated(part(0, h), h);
        let k = rotated(part(h, kv), kv).contiguous().unwrap();
        let v = part(h + kv, kv);
        let v = v.reshape((b, t, kv, d)).unwrap().transpose(1, 2).unwrap();
        let v = v.contiguous().unwrap();
        let q = q
            .contiguous()
            .unwrap()
            .reshape((b, kv, h / kv * t, d))
            .unwrap();
        let scores = if bf16 {
            matmul_bf16_nt(&q, &k).unwrap()
        } else {
            q.matmul(&k.t().unwrap()).unwrap()
        };
        let scores = scores.reshape((b, h, t, t)).unwrap();
        let probs = if bf16 {
            masked_softmax(&scores, mask, scale, true).unwrap()
        } else {
            ops::masked_softmax(&scores, mask, scale).unwrap()
        };
        let probs = probs.reshape((b, kv, h / kv * t, t)).unwrap();
        let out = if bf16 {
            matmul_bf16(&probs, &v).unwrap()
        } else {
            probs.matmul(&v).unwrap()
        };
        out.reshape((b, h, t, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
    }

    fn check([b, h, kv, t, d]: [usize; 5]) {
        let qkv = Var::from_tensor(&random(&[b, t, (h + 2 * kv) * d], 61, 1.5)).unwrap();
        let angles = random(&[b, 1, t, d], 62, 3.0);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let mask = mask(b, t, t);
        let scale = 1.0 / (d as f64).sqrt();
        let fused = qkv_attention_bf16(&qkv, (h, kv), (&cos, &sin), &mask, scale).unwrap();
        assert_eq!(fused.dims(), [b, t, h * d]);
        // The same arithmetic as the composed bf16 path, in the same order: the same bits,
        // values and gradients.
        let same = composed(&qkv, (h, kv), (&cos, &sin), &mask, scale, true);
        assert_eq!(max_abs_diff(&fused, &same), 0.0);
        assert_same_gradients(&fused, &same, &[&qkv], 64, f32::MIN_POSITIVE, Some(1e-2));
        // Without a gradient to track (nothing kept for a backward pass): the same values.
        let untracked =
            qkv_attention_bf16(&qkv.detach(), (h, kv), (&cos, &sin), &mask, scale).unwrap();
        assert_eq!(max_abs_diff(&untracked, &fused), 0.0);
        // Against plain f32 attention (candle's ops): the bf16 rounding of the products only.
        let f32_reference = composed(&qkv, (h, kv), (&cos, &sin), &mask, scale, false);
        assert!(max_abs_diff(&fused, &f32_reference) < 2e-2);
        assert_same_gradients(&fused, &f32_reference, &[&qkv], 65, 5e-2, Some(1e-2));
    }

    #[test]
    fn attention_matches_the_composed_path_values_and_gradients() {
        // Grouped heads, padded rows, odd sizes; KV heads as many as query heads.
        check([2, 4, 2, 5, 6]);
        check([3, 3, 3, 4, 8]);
    }

    /// Fewer items than workers (one batch row, one KV head): one item at a time, its products
    /// large enough to be shared by the workers.
    #[test]
    fn attention_matches_with_one_item() {
        check([1, 2, 1, 33, 16]);
        check([1, 2, 1, 260, 64]);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let qkv = random(&[1, 3, 16], 1, 1.0);
        let angles = random(&[1, 1, 3, 4], 2, 1.0);
        // 16 columns are not (3 + 2·1)·D for any D.
        let err = qkv_attention_bf16(&qkv, (3, 1), (&angles, &angles), &mask(1, 3, 3), 0.5);
        assert!(err.unwrap_err().to_string().contains("do not fit"));
        // No query heads, or an empty sequence: refused, not run.
        let none = qkv_attention_bf16(&qkv, (0, 2), (&angles, &angles), &mask(1, 3, 3), 0.5);
        assert!(none.unwrap_err().to_string().contains("do not fit"));
        let qkv = random(&[1, 0, 16], 1, 1.0);
        let angles = random(&[1, 1, 0, 4], 2, 1.0);
        let err = qkv_attention_bf16(&qkv, (2, 1), (&angles, &angles), &mask(1, 0, 0), 0.5);
        assert!(err.unwrap_err().to_string().contains("none empty"));
    }
}
