//! Batched generation: greedy equals step-by-step argmax of the full forward; a seeded sample
//! stream does not depend on what else shares its batch; finished rows leave the batch.

use candle_core::{Device, Tensor};
use ferrotune::infer::{generate, FinishReason, GenerateOptions, Prompt, SamplingParams};
use ferrotune::model::Decoder;

use crate::load_fixture;

fn greedy_reference(decoder: &Decoder, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..steps {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = decoder.forward(&input, None).unwrap().squeeze(0).unwrap();
        let last = logits.get(ids.len() - 1).unwrap().to_vec1::<f32>().unwrap();
        ids.push(ferrotune::infer::sampler::argmax(&last));
    }
    ids[prompt.len()..].to_vec()
}

#[test]
fn batched_greedy_equals_full_forward_argmax() {
    let model = load_fixture("qwen2-tiny");
    let prompts: Vec<Prompt> = [
        vec![5u32, 80, 300, 41],
        vec![12, 64],
        vec![7, 8, 9, 10, 11, 12, 13],
    ]
    .into_iter()
    .enumerate()
    .map(|(i, ids)| Prompt {
        ids,
        item: i as u64,
        n: 1,
        first_sample: 0,
    })
    .collect();
    let options = GenerateOptions {
        params: SamplingParams::greedy(12),
        seed: 0,
        stop_ids: vec![],
        batch_size: 8,
        tokenizer: None,
        capture_after_stop: None,
    };
    let out = generate(&model.decoder, &prompts, &options).unwrap();
    assert_eq!(out.len(), 3);
    for c in &out {
        let want = greedy_reference(&model.decoder, &prompts[c.prompt].ids, 12);
        assert_eq!(c.ids, want, "prompt {}", c.prompt);
        assert_eq!(c.finish_reason, FinishReason::Length);
    }
}

#[test]
fn seeded_samples_do_not_depend_on_the_batch() {
    let model = load_fixture("llama-tiny");
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        max_new_tokens: 10,
        ..Default::default()
    };
    let mk = |batch_size| GenerateOptions {
        params: params.clone(),
        seed: 42,
        stop_ids: vec![499],
        batch_size,
        tokenizer: None,
        capture_after_stop: None,
    };
    let alone = generate(
        &model.decoder,
        &[Prompt {
            ids: vec![3, 4, 5],
            item: 7,
            n: 4,
            first_sample: 0,
        }],
        &mk(8),
    )
    .unwrap();
    let crowd = vec![
        Prompt {
            ids: vec![100, 101, 102, 103, 104],
            item: 1,
            n: 3,
            first_sample: 0,
        },
        Prompt {
            ids: vec![3, 4, 5],
            item: 7,
            n: 4,
            first_sample: 0,
        },
    ];
    let together = generate(&model.decoder, &crowd, &mk(3)).unwrap();
    let from_crowd: Vec<_> = together.iter().filter(|c| c.prompt == 1).collect();
    assert_eq!(from_crowd.len(), 4);
    for (a, b) in alone.iter().zip(from_crowd) {
        assert_eq!(a.ids, b.ids, "sample {}", a.sample_index);
    }
    // The first 2 samples of a 4-sample run equal a 2-sample run (adaptive K relies on it).
    let two = generate(
        &model.decoder,
        &[Prompt {
            ids: vec![3, 4, 5],
            item: 7,
            n: 2,
            first_sample: 0,
        }],
        &mk(8),
    )
    .unwrap();
    assert_eq!(two[0].ids, alone[0].ids);
    assert_eq!(two[1].ids, alone[1].ids);
    // Different samples of one prompt differ (the streams are distinct).
    assert!(alone.iter().any(|c| c.ids != alone[0].ids));
}

#[test]
fn empty_and_overlong_prompts_are_errors() {
    let model = load_fixture("qwen2-tiny");
    let options = GenerateOptions {
        params: SamplingParams::greedy(4),
        seed: 0,
        stop_ids: vec![],
        batch_size: 4,
        tokenizer: None,
        capture_after_stop: None,
    };
    let err = generate(
        &model.decoder,
        &[Prompt {
            ids: vec![],
            item: 0,
            n: 1,
            first_sample: 0,
        }],
        &options,
    )
    .unwrap_err();
    assert!(err.to_string().contains("prompt 0 is empty"), "{err}");
    let long = vec![1u32; 300];
    let err = generate(
        &model.decoder,
        &[Prompt {
            ids: long,
            item: 0,
            n: 1,
            first_sample: 0,
        }],
        &options,
    )
    .unwrap_err();
    assert!(err.to_string().contains("context is 256"), "{err}");
}

/// The probabilities captured right after a stop string equal a full forward over the prompt
/// and the completion (what a GenRM verdict is read from).
#[test]
fn probabilities_captured_after_a_stop_string_equal_a_full_forward() {
    let model = load_fixture("qwen2-tiny");
    let tokenizer = model.tokenizer().unwrap();
    let prompt = tokenizer.encode("The quick brown fox", false).unwrap();
    let options = GenerateOptions {
        params: SamplingParams {
            temperature: 1.0,
            max_new_tokens: 40,
            stop_strings: vec!["e".into()],
            ..Default::default()
        },
        seed: 3,
        stop_ids: vec![],
        batch_size: 8,
        tokenizer: Some(tokenizer),
        capture_after_stop: Some(vec![5, 77, 300]),
    };
    let out = generate(
        &model.decoder,
        &[Prompt {
            ids: prompt.clone(),
            item: 0,
            n: 6,
            first_sample: 0,
        }],
        &options,
    )
    .unwrap();
    let mut checked = 0;
    for c in out.iter().filter(|c| c.stop_string.is_some()) {
        let captured = c.captured.as_ref().expect("captured after the stop string");
        let ids = [prompt.clone(), c.ids.clone()].concat();
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
        let last = logits.get(ids.len() - 1).unwrap().to_vec1::<f32>().unwrap();
        let probs = ferrotune::infer::sampler::probabilities(&last, 1.0);
        for (k, &id) in [5usize, 77, 300].iter().enumerate() {
            assert!(
                (captured[k] - probs[id]).abs() < 1e-5,
                "{} vs {}",
                captured[k],
                probs[id]
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "no sample hit the stop string");
}
