//! Next-token cross-entropy on target tokens (SFT, pretraining, each GenRM term).
//!
//! The loss of an optimizer step is the sum of target-token NLL over all its micro-batches
//! divided by the number of target tokens in the whole step (CONTRACTS), so gradient
//! accumulation does not change the result. This module returns sums; the loop divides.

use candle_core::{DType, Tensor, D};

use super::token_logprobs;
use crate::error::Result;

/// Token-level sums of one micro-batch.
pub struct TokenLossSums {
    /// Σ −log p over target tokens (a differentiable scalar).
    pub nll_sum: Tensor,
    pub num_targets: f64,
    /// Target tokens whose argmax prediction is right (for `token_accuracy`).
    pub num_correct: f64,
}

/// `logits` [B, T, V], `input_ids` [B, T], `targets` [B, T] (1 = scored token).
pub fn token_loss_sums(
    logits: &Tensor,
    input_ids: &Tensor,
    targets: &Tensor,
) -> Result<TokenLossSums> {
    let targets = targets.to_dtype(DType::F32)?;
    let logp = token_logprobs(logits, input_ids)?;
    let nll_sum = (logp * &targets)?.sum_all()?.neg()?;
    let num_targets = targets.sum_all()?.to_scalar::<f32>()? as f64;
    // argmax at position i-1 predicts token i.
    let t = logits.dim(1)?;
    let predicted = logits.narrow(1, 0, t - 1)?.detach().argmax(D::Minus1)?;
    let actual = input_ids.narrow(1, 1, t - 1)?.to_dtype(DType::U32)?;
    let hits = predicted.eq(&actual)?.to_dtype(DType::F32)?;
    let num_correct = (hits * targets.narrow(1, 1, t - 1)?)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    Ok(TokenLossSums {
        nll_sum,
        num_targets,
        num_correct,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sums_cover_only_targets_and_count_hits() {
        let dev = Device::Cpu;
        // Position 0 strongly predicts token 1, position 1 predicts token 0.
        let logits = Tensor::new(&[[[0f32, 5.0], [5.0, 0.0], [0.0, 0.0]]], &dev).unwrap();
        let ids = Tensor::new(&[[0u32, 1, 1]], &dev).unwrap();
        let targets = Tensor::new(&[[0f32, 1.0, 1.0]], &dev).unwrap();
        let s = token_loss_sums(&logits, &ids, &targets).unwrap();
        let lse = (1.0 + 5f32.exp()).ln();
        let want = (lse - 5.0) + lse; // token 1 at pos 1 (right), token 1 at pos 2 (wrong)
        assert!((s.nll_sum.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
        assert_eq!(s.num_targets, 2.0);
        assert_eq!(s.num_correct, 1.0);
    }
}
