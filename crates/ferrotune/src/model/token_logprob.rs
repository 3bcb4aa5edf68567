//! The next-token log-probabilities of full logits, `logits[row, target] − logsumexp(row)`, as
//! one op with its own backward: the GPU path of `objectives::token_logprobs`.
//!
//! Composed, this is an f32 copy of the `[tokens, vocab]` logits, a log-softmax over all of it
//! (max, subtract, exp, sum, log, subtract: a tensor each) and a gather, and the backward walks
//! those tensors again; at Qwen2.5-0.5B the logits of a batch are gigabytes. Here the forward
//! reads each row once and keeps one logsumexp per row, and the backward writes the logits'
//! gradient in one pass: `g · (onehot(target) − exp(logit − lse))`, in the logits' own type.
//!
//! On CUDA the kernels are cuda/kernels.cu's (through [`super::cuda_ops`]); the CPU has a plain
//! implementation of the same arithmetic, which the tests compare with the composed ops. The
//! CPU's training path does not use this op: its LM head and log-softmax are fused further
//! ([`super::fused::head_logprobs`]).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::fused::{cpu_error, f32_values, stored_like};
use crate::error::{Error, Result};

/// Log-probabilities of the next token at every position: `logits` [B, T, V] (f32 or bf16),
/// `input_ids` [B, T] (u32); position 0 is 0 and position i is log p(ids[i] | ids[..i]), as
/// `objectives::token_logprobs` defines it. f32 [B, T], with a gradient for the logits.
pub fn token_logprobs(logits: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if input_ids.dims() != [b, t] {
        return Err(Error::invalid(format!(
            "token_logprobs: ids {:?} do not fit logits {:?}",
            input_ids.dims(),
            logits.dims()
        )));
    }
    // Row r = (b, i) predicts ids[b, i + 1]; each sequence's last row predicts nothing (target
    // 0, its gradient 0, its value dropped below).
    let ids = input_ids.to_dtype(DType::U32)?;
    let next = Tensor::cat(
        &[
            &ids.narrow(1, 1, t - 1)?,
            &Tensor::zeros((b, 1), DType::U32, ids.device())?,
        ],
        1,
    )?
    .flatten_all()?;
    // On the CPU a bad id is an error here. On a GPU checking would wait for the queue on
    // every call; there the kernel gives such a row a NaN log-prob (the trainer stops on it),
    // and the decoder has already checked the ids it embedded.
    if next.device().is_cpu() {
        let max_id = next.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= v {
            return Err(Error::invalid(format!(
                "token id {max_id} is outside the head's vocabulary of {v}"
            )));
        }
    }
    let rows = logits.reshape((b * t, v))?.contiguous()?;
    let out = rows.apply_op2(&next, TokenLogprob { vocab: v })?;
    let logp = out.get(0)?.reshape((b, t))?;
    Ok(Tensor::cat(
        &[
            &Tensor::zeros((b, 1), DType::F32, logits.device())?,
            &logp.narrow(1, 0, t - 1)?,
        ],
        1,
    )?)
}

/// Forward: logits [N, V], targets u32 [N] → f32 [2, N] (the log-probs, then each row's
/// logsumexp for the backward).
struct TokenLogprob {
    vocab: usize,
}

/// Backward: logits [N, V], targets [N], stats f32 [2, N] (the log-probs' gradients, then the
/// logsumexps) → d logits [N, V] in the logits' type.
struct TokenLogprobGrad {
    vocab: usize,
}

fn cpu_u32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(x), Some((start, end))) => Ok(&x[start..end]),
        _ => Err(cpu_error("token_logprob: targets must be contiguous u32")),
    }
}

fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(x), Some((start, end))) => Ok(&x[start..end]),
        _ => Err(cpu_error("token_logprob: stats must be contiguous f32")),
    }
}

impl CustomOp2 for TokenLogprob {
    fn name(&self) -> &'static str {
        "token-logprob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_values(s1, l1)?;
        let targets = cpu_u32(s2, l2)?;
        let n = targets.len();
        let mut out = vec![0f32; 2 * n];
        for (r, row) in x.chunks(self.vocab).enumerate().take(n) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
            let lse = max + sum.ln();
            out[r] = row.get(targets[r] as usize).map_or(f32::NAN, |x| x - lse);
            out[n + r] = lse;
        }
        Ok((CpuStorage::F32(out), Shape::from((2, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n = l2.shape().elem_count();
        let out = super::cuda_ops::token_logprob_fwd((s1, l1), (s2, l2), self.vocab)?;
        Ok((out, Shape::from((2, n))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Only the log-probs (row 0) carry a gradient; the logsumexps are the op's own.
        let stats = Tensor::stack(&[grad_res.get(0)?, res.get(1)?], 0)?.contiguous()?;
        let grad =
            logits.apply_op3_no_bwd(targets, &stats, &TokenLogprobGrad { vocab: self.vocab })?;
        Ok((Some(grad), None))
    }
}

impl CustomOp3 for TokenLogprobGrad {
    fn name(&self) -> &'static str {
        "token-logprob-grad"
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
        let x = f32_values(s1, l1)?;
        let targets = cpu_u32(s2, l2)?;
        let stats = cpu_f32(s3, l3)?;
        let n = targets.len();
        let mut dx = vec![0f32; x.len()];
        for (r, (row, d)) in x
            .chunks(self.vocab)
            .zip(dx.chunks_mut(self.vocab))
            .enumerate()
        {
            let (g, lse) = (stats[r], stats[n + r]);
            for (j, (d, &v)) in d.iter_mut().zip(row).enumerate() {
                let onehot = if j == targets[r] as usize { 1.0 } else { 0.0 };
                *d = g * (onehot - (v - lse).exp());
            }
        }
        Ok((stored_like(s1, dx), l1.shape().clone()))
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
        let dx = super::cuda_ops::token_logprob_bwd((s1, l1), (s2, l2), (s3, l3), self.vocab)?;
        Ok((dx, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_tensors::{assert_same_gradients, max_abs_diff, random};
    use super::*;
    use candle_core::{Device, Var};

    fn ids(b: usize, t: usize, v: usize) -> Tensor {
        let data: Vec<u32> = (0..b * t).map(|i| ((i * 7919 + 3) % v) as u32).collect();
        Tensor::from_vec(data, (b, t), &Device::Cpu).unwrap()
    }

    /// Values and gradients against the composed log-softmax and gather of
    /// `objectives::token_logprobs` (with a per-position weight, so every row's gradient is
    /// distinct), f32.
    #[test]
    fn matches_the_composed_log_softmax_values_and_gradients() {
        let (b, t, v) = (2, 5, 37);
        let logits = Var::from_tensor(&random(&[b, t, v], 5, 3.0)).unwrap();
        let ids = ids(b, t, v);
        let fused = token_logprobs(logits.as_tensor(), &ids).unwrap();
        let composed =
            crate::objectives::token_logprobs_composed(logits.as_tensor(), &ids).unwrap();
        assert_eq!(fused.dims(), [b, t]);
        assert!(max_abs_diff(&fused, &composed) < 1e-5);
        assert_same_gradients(&fused, &composed, &[&logits], 9, 1e-5, Some(1e-4));
    }

    /// bf16 logits: values within f32 rounding of the composed ops on the same bf16 inputs, and
    /// a bf16 gradient within bf16 rounding.
    #[test]
    fn bf16_logits_give_f32_values_and_a_bf16_gradient() {
        let (b, t, v) = (2, 4, 29);
        let logits =
            Var::from_tensor(&random(&[b, t, v], 8, 3.0).to_dtype(DType::BF16).unwrap()).unwrap();
        let ids = ids(b, t, v);
        let fused = token_logprobs(logits.as_tensor(), &ids).unwrap();
        assert_eq!(fused.dtype(), DType::F32);
        let composed =
            crate::objectives::token_logprobs_composed(logits.as_tensor(), &ids).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-5);
        let grad = fused.sum_all().unwrap().backward().unwrap();
        let g = grad.get(logits.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::BF16);
        let want = composed.sum_all().unwrap().backward().unwrap();
        let want = want.get(logits.as_tensor()).unwrap();
        let diff = max_abs_diff(
            &g.to_dtype(DType::F32).unwrap(),
            &want.to_dtype(DType::F32).unwrap(),
        );
        assert!(diff < 1e-2, "{diff}");
    }

    #[test]
    fn an_id_outside_the_vocabulary_is_an_error() {
        let logits = random(&[1, 3, 5], 1, 1.0);
        let ids = Tensor::new(&[[0u32, 1, 5]], &Device::Cpu).unwrap();
        let err = token_logprobs(&logits, &ids).unwrap_err().to_string();
        assert!(err.contains("token id 5"), "{err}");
    }
}
