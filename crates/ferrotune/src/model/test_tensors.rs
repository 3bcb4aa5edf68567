//! Tensors for the kernel tests of this module (fused*.rs, bf16_linear.rs) and the trainer's:
//! seeded uniform values, a loss that weighs every element differently, the largest
//! element-wise difference of two tensors, and the check that a kernel's gradients equal its
//! composed reference's.

use candle_core::{Device, Tensor, Var};

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

/// Backpropagates [`weighted_sum`]`(·, seed)` through `fused` and through `reference` and
/// asserts that, for each of `vars`, the two gradients differ by less than `tol`; with
/// `at_least`, also that the reference gradient reaches that size somewhere (so the agreement is
/// not two vanishing gradients).
pub fn assert_same_gradients(
    fused: &Tensor,
    reference: &Tensor,
    vars: &[&Var],
    seed: u64,
    tol: f32,
    at_least: Option<f32>,
) {
    let gf = weighted_sum(fused, seed).backward().unwrap();
    let gr = weighted_sum(reference, seed).backward().unwrap();
    for var in vars {
        let a = gf.get(var.as_tensor()).unwrap();
        let r = gr.get(var.as_tensor()).unwrap();
        assert!(max_abs_diff(a, r) < tol, "{}", max_abs_diff(a, r));
        if let Some(size) = at_least {
            assert!(max_abs_diff(r, &r.zeros_like().unwrap()) > size);
        }
    }
}
