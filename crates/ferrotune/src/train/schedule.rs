//! Learning-rate schedules with linear warm-up, matching transformers' `get_*_schedule_with_warmup`
//! lambdas (the multiplier for optimizer step `step`, counted from 0).

use super::config::LrScheduler;

pub fn lr_multiplier(kind: LrScheduler, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match kind {
        LrScheduler::Constant => 1.0,
        LrScheduler::Linear => (1.0 - progress).max(0.0),
        LrScheduler::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert_eq!(lr_multiplier(LrScheduler::Linear, 0, 2, 10), 0.0);
        assert_eq!(lr_multiplier(LrScheduler::Linear, 1, 2, 10), 0.5);
        assert_eq!(lr_multiplier(LrScheduler::Linear, 2, 2, 10), 1.0);
        assert_eq!(lr_multiplier(LrScheduler::Linear, 6, 2, 10), 0.5);
        assert!((lr_multiplier(LrScheduler::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_multiplier(LrScheduler::Constant, 9, 2, 10), 1.0);
        assert_eq!(lr_multiplier(LrScheduler::Linear, 0, 0, 10), 1.0);
    }
}
