//! Row reductions with `exp` for the softmax-like kernels of the bf16 autocast path, 16 lanes
//! at a time with AVX-512 (a scalar loop over `f32::exp` elsewhere).
//!
//! The vector `exp` is the Cephes single-precision scheme (`x = n·ln2 + r`, a degree-7
//! polynomial in r, scaled by `2ⁿ` with `vscalefps`), within about 2 ulp of libm's `expf`
//! but not bit-identical to it, and the sums run in 16 lanes rather than left to right. That
//! is noise next to the bf16 rounding of the products around these kernels, and it is why
//! only the bf16 path calls these: the f32 path keeps `f32::exp` in order, so its results do
//! not move.

/// Below this, `exp` is 0 in f32 (the smallest subnormal is `e^-103.3`); such inputs give an
/// exact 0, as the scalar kernels skip them (masked attention keys).
pub const EXP_UNDERFLOW: f32 = -104.0;

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// The largest element of `row` (−∞ for an empty row; NaN-free input assumed, as the callers'
/// scores are).
pub fn max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { avx512::max(row) };
    }
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `Σ exp(x − shift)` over `row`.
pub fn exp_sum(row: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { avx512::exp_sum(row, shift) };
    }
    row.iter().map(|&x| scalar_exp(x - shift)).sum()
}

/// `x ← exp(x − shift)` over `row`; returns the sum of the new values.
pub fn exp_in_place(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { avx512::exp_in_place(row, shift) };
    }
    let mut sum = 0.0;
    for x in row.iter_mut() {
        *x = scalar_exp(*x - shift);
        sum += *x;
    }
    sum
}

fn scalar_exp(d: f32) -> f32 {
    if d < EXP_UNDERFLOW {
        0.0
    } else {
        d.exp()
    }
}

/// The mask that keeps the low `n` of 16 lanes (a row's tail), for this module's and
/// [`super::bf16_gemm`]'s masked loads and stores.
#[cfg(target_arch = "x86_64")]
pub(super) fn lanes(n: usize) -> std::arch::x86_64::__mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as std::arch::x86_64::__mmask16
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{lanes, EXP_UNDERFLOW};
    use std::arch::x86_64::*;

    /// `exp(d)` in 16 lanes: `d = n·ln2 + r` with |r| ≤ ln2/2 (ln2 split in two for an exact
    /// `n·ln2_hi`), Cephes' `expf` polynomial for `e^r`, then `·2ⁿ`. Lanes below
    /// [`EXP_UNDERFLOW`] are exactly 0; above 88.7 the result overflows to +∞ as expf's does.
    #[target_feature(enable = "avx512f")]
    unsafe fn exp(d: __m512) -> __m512 {
        let x = _mm512_min_ps(d, _mm512_set1_ps(88.8));
        let x = _mm512_max_ps(x, _mm512_set1_ps(EXP_UNDERFLOW));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5, // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        let y = _mm512_scalef_ps(p, n);
        let live = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(d, _mm512_set1_ps(EXP_UNDERFLOW));
        _mm512_maskz_mov_ps(live, y)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max(row: &[f32]) -> f32 {
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < row.len() {
            let m = lanes(row.len() - i);
            let x = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, row.as_ptr().add(i));
            acc = _mm512_max_ps(acc, x);
            i += 16;
        }
        _mm512_reduce_max_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_sum(row: &[f32], shift: f32) -> f32 {
        let s = _mm512_set1_ps(shift);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < row.len() {
            let m = lanes(row.len() - i);
            let x = _mm512_maskz_loadu_ps(m, row.as_ptr().add(i));
            acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, exp(_mm512_sub_ps(x, s))));
            i += 16;
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_in_place(row: &mut [f32], shift: f32) -> f32 {
        let s = _mm512_set1_ps(shift);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < row.len() {
            let m = lanes(row.len() - i);
            let at = row.as_mut_ptr().add(i);
            let y = _mm512_maskz_mov_ps(m, exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, at), s)));
            _mm512_mask_storeu_ps(at, m, y);
            acc = _mm512_add_ps(acc, y);
            i += 16;
        }
        _mm512_reduce_add_ps(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f32 in a range that matters to a softmax, against libm's expf: within 2 ulp (in
    /// relative terms; subnormal results within 2 ulp of the smallest normal's spacing).
    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut inputs: Vec<f32> = (-104_000..=88_000).map(|i| i as f32 * 1e-3).collect();
        inputs.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            88.72,
            -103.9,
            -1e9,
            1e9,
            f32::NEG_INFINITY,
        ]);
        let mut values = inputs.clone();
        exp_in_place(&mut values, 0.0);
        for (&x, &got) in inputs.iter().zip(&values) {
            let want = x.exp();
            if x < EXP_UNDERFLOW {
                assert_eq!(got, 0.0, "exp({x})");
            } else if want.is_infinite() {
                assert_eq!(got, want, "exp({x})");
            } else {
                let ulp = (want.abs() * f32::EPSILON).max(f32::MIN_POSITIVE * f32::EPSILON);
                assert!(
                    (got - want).abs() <= 2.0 * ulp,
                    "exp({x}) = {got}, libm {want}"
                );
            }
        }
    }

    /// Rows of every length around the 16-lane width: sums, in-place values and the max agree
    /// with the scalar loops (up to the sum's order), and the tail lanes are left alone.
    #[test]
    fn rows_of_any_length_match_scalar_loops() {
        for len in [0usize, 1, 5, 15, 16, 17, 33, 100] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
                .collect();
            let scalar_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&row), scalar_max, "len {len}");
            let shift = if len == 0 { 0.0 } else { scalar_max };
            let want: f32 = row.iter().map(|&x| (x - shift).exp()).sum();
            let got = exp_sum(&row, shift);
            assert!((got - want).abs() <= 1e-6 * want.max(1.0), "len {len}");
            let mut buf = row.clone();
            buf.push(123.0);
            let sum = exp_in_place(&mut buf[..len], shift);
            assert!((sum - want).abs() <= 1e-6 * want.max(1.0), "len {len}");
            assert_eq!(buf[len], 123.0);
            for (&x, &y) in row.iter().zip(&buf) {
                assert!((y - (x - shift).exp()).abs() <= 2e-7, "len {len}");
            }
        }
    }
}
