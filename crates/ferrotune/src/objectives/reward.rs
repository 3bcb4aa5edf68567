//! Bradley–Terry reward model loss: `−log σ(r(x, y_w) − r(x, y_l))` per pair, with the
//! pairwise accuracy and margin TRL's RewardTrainer reports.

use candle_core::Tensor;

use super::log_sigmoid;
use crate::error::Result;

/// Per-pair losses [B] from chosen and rejected scores [B].
pub fn bradley_terry_loss(chosen_scores: &Tensor, rejected_scores: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(&(chosen_scores - rejected_scores)?)?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn loss_by_hand() {
        let c = Tensor::new(&[1.0f64, 0.0], &Device::Cpu).unwrap();
        let r = Tensor::new(&[0.0f64, 2.0], &Device::Cpu).unwrap();
        let got = bradley_terry_loss(&c, &r)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!((got[0] - (1.0 + (-1f64).exp()).ln()).abs() < 1e-12);
        assert!((got[1] - (1.0 + 2f64.exp()).ln()).abs() < 1e-12);
    }
}
