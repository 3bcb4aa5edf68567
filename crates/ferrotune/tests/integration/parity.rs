//! Token ids and per-token log-probs equal transformers' on the fixture models.

use candle_core::{DType, Device, Tensor};
use ferrotune::model::ops::log_softmax_last_dim;
use ferrotune::model::{KvCache, LogitsAt};

use crate::{load_fixture, read_fixture_json, MODELS};

fn as_f32(v: &serde_json::Value) -> Option<f32> {
    v.as_f64().map(|x| x as f32)
}

/// log p(ids[i] | ids[<i]) from logits [T, V] of one row.
fn token_logprobs(logits: &Tensor, ids: &[u32]) -> Vec<f32> {
    let logp = log_softmax_last_dim(&logits.to_dtype(DType::F32).unwrap()).unwrap();
    let logp = logp.to_vec2::<f32>().unwrap();
    (1..ids.len())
        .map(|i| logp[i - 1][ids[i] as usize])
        .collect()
}

#[test]
fn ids_and_logprobs_match_transformers() {
    let fixture = read_fixture_json("parity.json");
    for name in MODELS {
        let model = load_fixture(name);
        let tokenizer = model.tokenizer().unwrap();
        let cases = fixture["models"][name].as_array().expect("cases for model");
        assert!(!cases.is_empty());
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let ids = tokenizer.encode(text, false).unwrap();
            let expected_ids: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(ids, expected_ids, "{name}: ids differ for {text:?}");
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model
                .decoder
                .forward(&input, None)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let got = token_logprobs(&logits, &ids);
            let expected = case["logprobs"].as_array().unwrap();
            assert!(expected[0].is_null());
            for (i, lp) in got.iter().enumerate() {
                let want = as_f32(&expected[i + 1]).unwrap();
                assert!(
                    (lp - want).abs() < 1e-4,
                    "{name} pos {}: {lp} vs {want}",
                    i + 1
                );
            }
            let last = logits.get(ids.len() - 1).unwrap().to_vec1::<f32>().unwrap();
            let want_last = case["last_logits"].as_array().unwrap();
            assert_eq!(last.len(), want_last.len());
            for (a, b) in last.iter().zip(want_last) {
                assert!(
                    (a - as_f32(b).unwrap()).abs() < 1e-4,
                    "{name}: last logits differ"
                );
            }
        }
    }
}

#[test]
fn right_padded_batch_matches_transformers() {
    let fixture = read_fixture_json("padded_batch.json");
    let model = load_fixture(fixture["model"].as_str().unwrap());
    let ids: Vec<Vec<u32>> = serde_json::from_value(fixture["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<u32>> = serde_json::from_value(fixture["attention_mask"].clone()).unwrap();
    let input = Tensor::new(ids.clone(), &Device::Cpu).unwrap();
    let mask_t = Tensor::new(mask.clone(), &Device::Cpu).unwrap();
    let logits = model.decoder.forward(&input, Some(&mask_t)).unwrap();
    for (row, row_ids) in ids.iter().enumerate() {
        let len = mask[row].iter().sum::<u32>() as usize;
        let got = token_logprobs(
            &logits.get(row).unwrap().narrow(0, 0, len).unwrap(),
            &row_ids[..len],
        );
        let want = fixture["logprobs"][row].as_array().unwrap();
        assert_eq!(want.len(), len);
        for (i, lp) in got.iter().enumerate() {
            let w = as_f32(&want[i + 1]).unwrap();
            assert!(
                (lp - w).abs() < 1e-4,
                "row {row} pos {}: {lp} vs {w}",
                i + 1
            );
        }
    }
}

/// The KV-cache path on a left-padded batch (as batched generation prefills prompts) equals
/// transformers called with the same padding and explicit position ids.
#[test]
fn left_padded_prefill_through_the_cache_matches_transformers() {
    let fixture = read_fixture_json("padded_batch.json");
    let left = &fixture["left_padded"];
    let model = load_fixture(fixture["model"].as_str().unwrap());
    let ids: Vec<Vec<u32>> = serde_json::from_value(left["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<u32>> = serde_json::from_value(left["attention_mask"].clone()).unwrap();
    let step_mask: Vec<Vec<bool>> = mask
        .iter()
        .map(|r| r.iter().map(|&m| m == 1).collect())
        .collect();
    let mut cache = KvCache::new(model.decoder.config(), ids.len());
    let input = Tensor::new(ids.clone(), &Device::Cpu).unwrap();
    let logits = model
        .decoder
        .forward_step(&input, Some(&step_mask), &mut cache, LogitsAt::All)
        .unwrap();
    let t = ids[0].len();
    for (row, row_ids) in ids.iter().enumerate() {
        let len = mask[row].iter().sum::<u32>() as usize;
        let start = t - len;
        let real = logits.get(row).unwrap().narrow(0, start, len).unwrap();
        let got = token_logprobs(&real, &row_ids[start..]);
        let want = left["logprobs"][row].as_array().unwrap();
        for (i, lp) in got.iter().enumerate() {
            let w = as_f32(&want[i + 1]).unwrap();
            assert!(
                (lp - w).abs() < 1e-4,
                "row {row} pos {}: {lp} vs {w}",
                i + 1
            );
        }
    }
    assert_eq!(
        cache.positions(),
        &mask
            .iter()
            .map(|r| r.iter().sum::<u32>())
            .collect::<Vec<_>>()[..]
    );
}
