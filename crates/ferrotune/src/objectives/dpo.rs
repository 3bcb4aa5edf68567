//! Direct Preference Optimization (Rafailov et al. 2023) and its variants, as TRL computes them.
//!
//! `h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))`
//! - sigmoid: `−log σ(βh)`; with label smoothing ε (cDPO): `−(1−ε) log σ(βh) − ε log σ(−βh)`;
//! - IPO: `(h − 1/(2β))²` with each log-ratio divided by its completion's token count (TRL's
//!   IPO averages over tokens; sigmoid uses sums).
//!
//! Rewards as TRL logs them, from the SUMMED log-probs whatever the loss:
//! `rewards/chosen = β (log π(y_w) − log π_ref(y_w))`, likewise rejected.

use candle_core::Tensor;

use super::log_sigmoid;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    Sigmoid,
    Ipo,
}

impl std::str::FromStr for DpoLossType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sigmoid" => Ok(DpoLossType::Sigmoid),
            "ipo" => Ok(DpoLossType::Ipo),
            other => Err(Error::invalid(format!(
                "unknown DPO loss type `{other}` (sigmoid or ipo)"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct DpoParams {
    pub beta: f64,
    pub label_smoothing: f64,
    pub loss_type: DpoLossType,
}

pub struct DpoOutput {
    /// Per-pair losses [B] (differentiable through the policy log-probs).
    pub losses: Tensor,
    /// β (log π(y_w) − log π_ref(y_w)), detached, [B].
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// All inputs are [B] log-probs summed over completion tokens; the reference ones are
/// constants. `token_counts` (chosen, rejected) are the completion lengths, needed for IPO.
pub fn dpo_loss(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    reference_chosen: &Tensor,
    reference_rejected: &Tensor,
    token_counts: Option<(&Tensor, &Tensor)>,
    p: DpoParams,
) -> Result<DpoOutput> {
    let chosen_ratio = (policy_chosen - reference_chosen)?;
    let rejected_ratio = (policy_rejected - reference_rejected)?;
    let h = match (p.loss_type, token_counts) {
        (DpoLossType::Ipo, Some((nc, nr))) => ((&chosen_ratio / nc)? - (&rejected_ratio / nr)?)?,
        (DpoLossType::Ipo, None) => {
            return Err(Error::invalid("IPO needs completion token counts"))
        }
        _ => (&chosen_ratio - &rejected_ratio)?,
    };
    let losses = match p.loss_type {
        DpoLossType::Sigmoid => {
            let bh = (&h * p.beta)?;
            let a = (log_sigmoid(&bh)? * -(1.0 - p.label_smoothing))?;
            if p.label_smoothing > 0.0 {
                (a - (log_sigmoid(&bh.neg()?)? * p.label_smoothing)?)?
            } else {
                a
            }
        }
        DpoLossType::Ipo => (h - 1.0 / (2.0 * p.beta))?.sqr()?,
    };
    Ok(DpoOutput {
        losses,
        chosen_rewards: (chosen_ratio.detach() * p.beta)?,
        rejected_rewards: (rejected_ratio.detach() * p.beta)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn sigmoid_loss_by_hand() {
        // h = (−10 − −12) − (−15 − −14) = 2 − (−1) = 3; β = 0.1 → −log σ(0.3).
        let out = dpo_loss(
            &t(&[-10.0]),
            &t(&[-15.0]),
            &t(&[-12.0]),
            &t(&[-14.0]),
            None,
            DpoParams {
                beta: 0.1,
                label_smoothing: 0.0,
                loss_type: DpoLossType::Sigmoid,
            },
        )
        .unwrap();
        let want = (1.0 + (-0.3f64).exp()).ln();
        assert!((out.losses.to_vec1::<f64>().unwrap()[0] - want).abs() < 1e-12);
        assert!((out.chosen_rewards.to_vec1::<f64>().unwrap()[0] - 0.2).abs() < 1e-12);
        assert!((out.rejected_rewards.to_vec1::<f64>().unwrap()[0] + 0.1).abs() < 1e-12);
    }

    #[test]
    fn cdpo_and_ipo_by_hand() {
        let out = dpo_loss(
            &t(&[-10.0]),
            &t(&[-15.0]),
            &t(&[-12.0]),
            &t(&[-14.0]),
            None,
            DpoParams {
                beta: 0.1,
                label_smoothing: 0.2,
                loss_type: DpoLossType::Sigmoid,
            },
        )
        .unwrap();
        let sp = |x: f64| (1.0 + (-x).exp()).ln(); // −log σ(x)
        let want = 0.8 * sp(0.3) + 0.2 * sp(-0.3);
        assert!((out.losses.to_vec1::<f64>().unwrap()[0] - want).abs() < 1e-12);
        // Completions of 2 and 1 tokens: h = 0.2/2 − (−0.1)/1.
        let out = dpo_loss(
            &t(&[-1.0]),
            &t(&[-1.5]),
            &t(&[-1.2]),
            &t(&[-1.4]),
            Some((&t(&[2.0]), &t(&[1.0]))),
            DpoParams {
                beta: 0.1,
                label_smoothing: 0.0,
                loss_type: DpoLossType::Ipo,
            },
        )
        .unwrap();
        let h = 0.1 - (-0.1);
        assert!((out.losses.to_vec1::<f64>().unwrap()[0] - (h - 5.0f64).powi(2)).abs() < 1e-12);
    }
}
