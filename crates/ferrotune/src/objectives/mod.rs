//! Training objectives as small pure functions from logits / log-probs to losses and metrics.
//! They know nothing about data loading or the loop; the loop (`train/`) dispatches on them.
//!
//! Shared convention: a batch is `input_ids` [B, T] with a target mask [B, T] where
//! `targets[b][i] = 1` means token i is predicted (from the tokens before it) and scored.

pub mod dpo;
pub mod reward;
pub mod sft;

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::model::ops::log_softmax_last_dim;

/// Log-probability of each token given the ones before it, aligned to the token:
/// `out[b][i] = log p(input_ids[b][i] | input_ids[b][<i])` for i ≥ 1, and 0 at i = 0.
/// `logits` [B, T, V] → [B, T] (f32).
///
/// On a GPU this is one op each way ([`crate::model::token_logprob`]); elsewhere the composed
/// ops of [`token_logprobs_composed`].
pub fn token_logprobs(logits: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
    if crate::device::own_kernels_for(logits, crate::device::Kernels::Logprob) {
        return crate::model::token_logprob::token_logprobs(logits, input_ids);
    }
    token_logprobs_composed(logits, input_ids)
}

/// [`token_logprobs`] through composed ops: a log-softmax over the whole f32 logits and a gather.
pub fn token_logprobs_composed(logits: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
    let (b, t, _) = logits.dims3()?;
    let logp = log_softmax_last_dim(&logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?)?;
    let next = input_ids.narrow(1, 1, t - 1)?.contiguous()?.unsqueeze(2)?;
    let picked = logp.contiguous()?.gather(&next, 2)?.squeeze(2)?;
    let first = Tensor::zeros((b, 1), DType::F32, logits.device())?;
    Ok(Tensor::cat(&[&first, &picked], 1)?)
}

/// Sum of target log-probs per sequence: [B]. This is log π(y|x) of DPO (summed over
/// completion tokens).
pub fn sequence_logprobs(logits: &Tensor, input_ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let per_token = token_logprobs(logits, input_ids)?;
    Ok((per_token * targets.to_dtype(DType::F32)?)?.sum(D::Minus1)?)
}

/// `log σ(x)`, stable for large |x| and with the exact derivative σ(−x) everywhere, also at 0.
/// Written as two branches selected by `where_cond` (each fed only its own half of the inputs,
/// so neither overflows): `−log(1 + e^{−x})` for x ≥ 0 and `x − log(1 + e^{x})` for x < 0.
/// The `min(x, 0) − log(1 + e^{−|x|})` form is equal in value, but its kinked pieces give the
/// wrong subgradient at exactly x = 0 (a DPO pair with h = 0).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    let non_negative = x.ge(&zeros)?;
    let x_pos = non_negative.where_cond(x, &zeros)?;
    let x_neg = non_negative.where_cond(&zeros, x)?;
    let pos = (x_pos.neg()?.exp()? + 1.0)?.log()?.neg()?;
    let neg = (&x_neg - (x_neg.exp()? + 1.0)?.log()?)?;
    Ok(non_negative.where_cond(&pos, &neg)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn log_sigmoid_is_stable_and_exact() {
        let x = Tensor::new(&[-200f32, -1.0, 0.0, 2.0, 200.0], &Device::Cpu).unwrap();
        let got = log_sigmoid(&x).unwrap().to_vec1::<f32>().unwrap();
        let want = [
            -200f32,
            -(1.0 + 1f32.exp()).ln(),
            -(2f32).ln(),
            -(1.0 + (-2f32).exp()).ln(),
            0.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn sequence_logprobs_sum_only_targets() {
        // Uniform logits over 4 tokens: every token has log-prob −ln 4.
        let logits = Tensor::zeros((1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[0u32, 1, 2, 3]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[0f32, 0.0, 1.0, 1.0]], &Device::Cpu).unwrap();
        let got = sequence_logprobs(&logits, &ids, &targets)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((got[0] + 2.0 * 4f32.ln()).abs() < 1e-6);
    }
}
