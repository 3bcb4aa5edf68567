//! Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus), on the
//! host, with a per-sequence seeded generator so the same seed gives the same text whatever
//! else shares the batch.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Extra stop tokens beyond the tokenizer's end-of-sequence ids.
    pub stop_strings: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 256,
            stop_strings: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_new_tokens,
            ..Default::default()
        }
    }
}

/// The generator of one sample stream, seeded by (seed, item, sample) so that the first k
/// samples of a K-sample run equal a k-sample run (CONTRACTS, adaptive K).
pub fn sample_rng(seed: u64, item: u64, sample: u64) -> rand::rngs::StdRng {
    // SplitMix-style mixing keeps nearby (item, sample) pairs far apart.
    let mut x = seed
        ^ item.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ sample.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    rand::rngs::StdRng::seed_from_u64(x ^ (x >> 31))
}

/// Index of the largest logit (the first one on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// [`argmax`] of every row of `logits` [N, V]. On a GPU the argmax runs there
/// (cuda/kernels.cu, the same first-maximum rule) and only the N ids are read back, not the
/// logits; elsewhere the rows are read back and picked on the host.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let (n, v) = logits.dims2()?;
    if v == 0 {
        return Err(Error::invalid("argmax over an empty vocabulary"));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    if crate::device::own_kernels_for(logits, crate::device::Kernels::Argmax) {
        let ids = logits
            .contiguous()?
            .apply_op1_no_bwd(&ArgmaxRows { cols: v })?;
        return Ok(ids.to_vec1::<u32>()?);
    }
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows.iter().map(|r| argmax(r)).collect())
}

/// The op behind [`argmax_rows`]: [N, V] → u32 [N].
struct ArgmaxRows {
    cols: usize,
}

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "argmax-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let rows = crate::model::fused::f32_values(s, l)?;
        let ids: Vec<u32> = rows.chunks(self.cols).map(argmax).collect();
        let n = ids.len();
        Ok((CpuStorage::U32(ids), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n = l.shape().elem_count() / self.cols;
        let ids = crate::model::cuda_ops::argmax_rows((s, l), self.cols)?;
        Ok((ids, Shape::from(n)))
    }
}

/// Softmax probabilities of `logits / temperature`, in f64.
pub fn probabilities(logits: &[f32], temperature: f64) -> Vec<f64> {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) / t).exp())
        .collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    p
}

/// Draws the next token. Filters are applied as transformers' logits warpers do: temperature,
/// then top-k, then top-p on the renormalised distribution.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut impl Rng) -> u32 {
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    let probs = probabilities(logits, params.temperature);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // Only sort when a filter needs the ranking (152k-entry vocabularies).
    let filtered = params.top_k > 0 || params.top_p < 1.0;
    if filtered {
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        if params.top_k > 0 {
            order.truncate(params.top_k.max(1));
        }
        if params.top_p < 1.0 {
            let total: f64 = order.iter().map(|&i| probs[i]).sum();
            let mut cumulative = 0.0;
            let mut keep = 0;
            for &i in &order {
                cumulative += probs[i] / total;
                keep += 1;
                if cumulative >= params.top_p {
                    break;
                }
            }
            order.truncate(keep.max(1));
        }
    }
    let total: f64 = order.iter().map(|&i| probs[i]).sum();
    let mut u = rng.random::<f64>() * total;
    for &i in &order {
        u -= probs[i];
        if u <= 0.0 {
            return i as u32;
        }
    }
    *order.last().expect("non-empty vocabulary") as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let mut rng = sample_rng(0, 0, 0);
        assert_eq!(
            sample(&[0.1, 3.0, 2.0], &SamplingParams::greedy(1), &mut rng),
            1
        );
    }

    /// The op's rows (run here by its CPU forward, the GPU's by cuda/kernels.cu) pick what the
    /// host's argmax picks, ties included, from f32 and bf16 logits.
    #[test]
    fn argmax_rows_op_picks_the_first_maximum_of_every_row() {
        use candle_core::Device;
        let logits = Tensor::new(
            &[
                [0.1f32, 3.0, 3.0, -1.0],
                [2.0, 2.0, 2.0, 2.0],
                [-5.0, -4.0, -6.0, -4.5],
            ],
            &Device::Cpu,
        )
        .unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let x = logits.to_dtype(dtype).unwrap();
            let op = x.apply_op1_no_bwd(&ArgmaxRows { cols: 4 }).unwrap();
            assert_eq!(op.to_vec1::<u32>().unwrap(), [1, 0, 1]);
            assert_eq!(argmax_rows(&x).unwrap(), [1, 0, 1]);
        }
        let empty = Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap();
        assert!(argmax_rows(&empty).is_err());
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let logits = [1.0f32, 4.0, 3.9, -2.0];
        let mut rng = sample_rng(1, 2, 3);
        let p = SamplingParams {
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &p, &mut rng), 1);
        }
        // The two leading tokens hold ~0.95 of the mass: top_p 0.9 never picks the others.
        let p = SamplingParams {
            top_p: 0.9,
            ..Default::default()
        };
        for _ in 0..200 {
            let t = sample(&logits, &p, &mut rng);
            assert!(t == 1 || t == 2, "picked {t}");
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_seeds_repeat() {
        let logits = [0.0f32, (3f32).ln()]; // p = [0.25, 0.75]
        let p = SamplingParams::default();
        let mut rng = sample_rng(7, 0, 0);
        let ones = (0..4000)
            .filter(|_| sample(&logits, &p, &mut rng) == 1)
            .count();
        assert!((ones as f64 / 4000.0 - 0.75).abs() < 0.03, "{ones}");
        let a: Vec<u32> = {
            let mut r = sample_rng(5, 1, 2);
            (0..10).map(|_| sample(&logits, &p, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = sample_rng(5, 1, 2);
            (0..10).map(|_| sample(&logits, &p, &mut r)).collect()
        };
        assert_eq!(a, b);
    }
}
