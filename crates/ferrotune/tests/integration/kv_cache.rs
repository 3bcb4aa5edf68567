//! `forward_step` with the external KV cache reproduces `forward`, batched, with padding,
//! and after forking rows.

use candle_core::{Device, Tensor};
use ferrotune::model::{Decoder, KvCache, LogitsAt};

use crate::{load_fixture, MODELS};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Full-sequence logits of one unpadded row: [T, V].
fn reference(decoder: &Decoder, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    decoder.forward(&input, None).unwrap().squeeze(0).unwrap()
}

fn rows() -> Vec<Vec<u32>> {
    vec![
        (0..23).map(|i| (i * 37 + 5) % 490).collect(),
        (0..9).map(|i| (i * 11 + 3) % 490).collect(),
        (0..16).map(|i| (i * 7 + 100) % 490).collect(),
    ]
}

#[test]
fn incremental_decoding_matches_full_forward_with_left_padding() {
    for name in MODELS {
        incremental_matches_full(name, false, 1e-4);
    }
}

/// Under CPU bf16 autocast `forward_step` multiplies by the weights' cached bf16 panels and
/// `forward` by the differentiable bf16 linear: the same rounding, so the two agree up to
/// accumulation order (which can flip an activation's bf16 rounding, hence the tolerance).
#[test]
fn incremental_decoding_matches_full_forward_under_bf16_autocast() {
    for name in MODELS {
        incremental_matches_full(name, true, 2e-3);
    }
}

fn incremental_matches_full(name: &str, bf16: bool, tolerance: f32) {
    let model = load_fixture(name);
    let decoder = &model.decoder.with_bf16_linears(bf16);
    let rows = rows();
    let prefill = 6;
    // Prefill the first `prefill` tokens of each row, left padded to a common width.
    let width = prefill;
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for r in &rows {
        let take = prefill.min(r.len());
        let pad = width - take;
        ids.push([vec![0u32; pad], r[..take].to_vec()].concat());
        mask.push([vec![false; pad], vec![true; take]].concat());
    }
    let mut cache = KvCache::new(decoder.config(), rows.len());
    let input = Tensor::new(ids, &Device::Cpu).unwrap();
    let prefill_logits = decoder
        .forward_step(&input, Some(&mask), &mut cache, LogitsAt::All)
        .unwrap();
    for (b, r) in rows.iter().enumerate() {
        let full = reference(decoder, r);
        let got = prefill_logits
            .get(b)
            .unwrap()
            .narrow(0, 0, prefill)
            .unwrap();
        let diff = max_abs_diff(&got, &full.narrow(0, 0, prefill).unwrap());
        assert!(diff < tolerance, "{name} row {b} prefill differs by {diff}");
    }
    // Then one token per step; rows that ran out feed padding that is masked.
    let longest = rows.iter().map(|r| r.len()).max().unwrap();
    let refs: Vec<Tensor> = rows.iter().map(|r| reference(decoder, r)).collect();
    for pos in prefill..longest {
        let step: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| vec![*r.get(pos).unwrap_or(&0)])
            .collect();
        let step_mask: Vec<Vec<bool>> = rows.iter().map(|r| vec![pos < r.len()]).collect();
        let input = Tensor::new(step, &Device::Cpu).unwrap();
        let logits = decoder
            .forward_step(&input, Some(&step_mask), &mut cache, LogitsAt::Last)
            .unwrap();
        for (b, r) in rows.iter().enumerate() {
            if pos < r.len() {
                let diff = max_abs_diff(&logits.get(b).unwrap(), &refs[b].get(pos).unwrap());
                assert!(
                    diff < tolerance,
                    "{name} row {b} pos {pos} differs by {diff}"
                );
            }
        }
    }
}

#[test]
fn forked_cache_rows_continue_like_the_original() {
    let model = load_fixture("qwen2-tiny");
    let decoder = &model.decoder;
    let prompt: Vec<u32> = (0..12).map(|i| (i * 13 + 1) % 490).collect();
    let mut cache = KvCache::new(decoder.config(), 1);
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    decoder
        .forward_step(&input, None, &mut cache, LogitsAt::Last)
        .unwrap();
    // Fork into 3 samples that continue with different tokens.
    let mut forked = cache.select_rows(&[0, 0, 0]).unwrap();
    let next = Tensor::new(&[[7u32], [8], [9]], &Device::Cpu).unwrap();
    let logits = decoder
        .forward_step(&next, None, &mut forked, LogitsAt::Last)
        .unwrap();
    for (i, tok) in [7u32, 8, 9].iter().enumerate() {
        let full = reference(decoder, &[prompt.clone(), vec![*tok]].concat());
        let diff = max_abs_diff(&logits.get(i).unwrap(), &full.get(prompt.len()).unwrap());
        assert!(diff < 1e-4, "fork {i} differs by {diff}");
    }
    // Dropping a finished row keeps the others intact.
    let mut kept = forked.select_rows(&[2]).unwrap();
    let next = Tensor::new(&[[3u32]], &Device::Cpu).unwrap();
    let logits = decoder
        .forward_step(&next, None, &mut kept, LogitsAt::Last)
        .unwrap();
    let full = reference(decoder, &[prompt.clone(), vec![9, 3]].concat());
    assert!(
        max_abs_diff(
            &logits.get(0).unwrap(),
            &full.get(prompt.len() + 1).unwrap()
        ) < 1e-4
    );
    assert!(cache.select_rows(&[1]).is_err());
}

#[test]
fn cache_grows_past_its_first_allocation() {
    let model = load_fixture("llama-tiny");
    let decoder = &model.decoder;
    let ids: Vec<u32> = (0..40).map(|i| (i * 29 + 2) % 490).collect();
    let full = reference(decoder, &ids);
    let mut cache = KvCache::new(decoder.config(), 1);
    for (pos, id) in ids.iter().enumerate() {
        let input = Tensor::new(&[[*id]], &Device::Cpu).unwrap();
        let logits = decoder
            .forward_step(&input, None, &mut cache, LogitsAt::Last)
            .unwrap();
        let diff = max_abs_diff(&logits.get(0).unwrap(), &full.get(pos).unwrap());
        assert!(diff < 1e-4, "pos {pos} differs by {diff}");
    }
    assert_eq!(cache.len(), 40);
}
