//! Tensors for the kernel tests of this module (fused*.rs, bf16_linear.rs): seeded uniform
//! values, a loss that weighs every element differently, and the largest element-wise
//! difference of two tensors.

use candle_core::{Device, Tensor};

/// A CPU f32 tensor of `shape` with values uniform in (-scale, scale), seeded.
pub fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// `Σ t ⊙ w` with seeded weights `w` that are not all equal, so a wrong gradient cannot cancel
/// out (f32 tensors).
pub fn weighted_sum(t: &Tensor, seed: u64) -> Tensor {
    let w = random(t.dims(), seed, 1.0);
    (t * w).unwrap().sum_all().unwrap()
}

/// max |a - b| over all elements (f32 tensors of one shape).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
