//! Every trainable tensor receives a non-zero gradient from a loss on `forward`. This guards
//! against fused ops that build outputs without a gradient path (candle-nn's rms_norm,
//! softmax_last_dim, rope): with one of them in the graph, upstream tensors get nothing.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use ferrotune::model::ops::log_softmax_last_dim;
use ferrotune::model::Decoder;
use ferrotune::model::ModelConfig;

use crate::{load_fixture, MODELS};

/// The fixture model's parameters as trainable variables, with its config.
fn fixture_vars(name: &str) -> (ModelConfig, BTreeMap<String, Var>) {
    let loaded = load_fixture(name);
    let config = loaded.decoder.config().clone();
    let vars = loaded
        .decoder
        .params()
        .iter()
        .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    (config, vars)
}

/// Every variable has a gradient with a finite, non-zero norm.
fn assert_every_gradient_nonzero(name: &str, vars: &BTreeMap<String, Var>, grads: &GradStore) {
    for (n, v) in vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
        let norm = g
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient of {n} is {norm}"
        );
    }
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    for name in MODELS {
        let (config, vars) = fixture_vars(name);
        let params = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let decoder = Decoder::from_params(config, params).unwrap();
        // Two rows, the second right padded, so the padding mask is in the graph too.
        let ids = Tensor::new(
            &[[5u32, 80, 300, 41, 7, 99], [12, 64, 3, 0, 0, 0]],
            &Device::Cpu,
        )
        .unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
        let logits = decoder.forward(&ids, Some(&mask)).unwrap();
        let logp = log_softmax_last_dim(&logits).unwrap();
        // Next-token loss on real positions only.
        let targets =
            Tensor::new(&[[80u32, 300, 41, 7, 99], [64, 3, 0, 0, 0]], &Device::Cpu).unwrap();
        let weights = Tensor::new(
            &[[1f32, 1., 1., 1., 1.], [1., 1., 0., 0., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let picked = logp
            .narrow(1, 0, 5)
            .unwrap()
            .contiguous()
            .unwrap()
            .gather(&targets.unsqueeze(2).unwrap(), 2)
            .unwrap()
            .squeeze(2)
            .unwrap();
        let loss = (picked * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert_every_gradient_nonzero(name, &vars, &grads);
    }
}

/// `--precision bf16` on the CPU (autocast: f32 weights, bf16 products in every linear layer
/// and the fused head): the training step's decoder and loss still reach every parameter.
#[test]
fn every_parameter_gets_a_nonzero_gradient_under_cpu_bf16_autocast() {
    use ferrotune::model::fused::head_logprobs;
    use ferrotune::train::trainer::compute_decoder;

    for name in MODELS {
        let (config, vars) = fixture_vars(name);
        let decoder = compute_decoder(&config, &vars, DType::BF16).unwrap();
        assert!(
            decoder.bf16_linears(),
            "{name}: bf16 on the CPU is autocast"
        );
        assert_eq!(decoder.dtype(), DType::F32, "{name}: weights stay f32");
        let ids = vec![vec![5u32, 80, 300, 41, 7, 99], vec![12, 64, 3, 0, 0, 0]];
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
        let scored = vec![
            vec![false, true, true, true, true, true],
            vec![false, true, true, false, false, false],
        ];
        let input = Tensor::new(
            &[[5u32, 80, 300, 41, 7, 99], [12, 64, 3, 0, 0, 0]],
            &Device::Cpu,
        )
        .unwrap();
        let hidden = decoder.forward_hidden(&input, Some(&mask)).unwrap();
        let (logp, _) = head_logprobs(&hidden, decoder.head_weight(), &ids, &scored, true).unwrap();
        let loss = logp.sum_all().unwrap().neg().unwrap();
        let grads = loss.backward().unwrap();
        assert_every_gradient_nonzero(name, &vars, &grads);
    }
}

/// The batch of `gradients.json` (`scripts/fixtures/make_grad_fixtures.py`) and its reference
/// gradients per model.
struct GradFixture {
    json: serde_json::Value,
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u32>>,
    scored: Vec<Vec<bool>>,
}

impl GradFixture {
    fn read() -> Self {
        let json = crate::read_fixture_json("gradients.json");
        let rows = |key: &str| -> Vec<Vec<u32>> {
            json[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    let r = r.as_array().unwrap();
                    r.iter().map(|x| x.as_u64().unwrap() as u32).collect()
                })
                .collect()
        };
        let (ids, mask) = (rows("input_ids"), rows("attention_mask"));
        let scored = rows("scored")
            .into_iter()
            .map(|r| r.into_iter().map(|x| x != 0).collect())
            .collect();
        GradFixture {
            json,
            ids,
            mask,
            scored,
        }
    }

    /// The mean next-token loss over the scored positions, through the training path
    /// (`forward_hidden` and the fused chunked head; `bf16`: its bf16 product).
    fn loss(&self, decoder: &Decoder, bf16: bool) -> Tensor {
        use ferrotune::model::fused::head_logprobs;

        let (b, t) = (self.ids.len(), self.ids[0].len());
        let flat = |v: &[Vec<u32>]| Tensor::from_vec(v.concat(), (b, t), &Device::Cpu).unwrap();
        let hidden = decoder
            .forward_hidden(&flat(&self.ids), Some(&flat(&self.mask)))
            .unwrap();
        let head = decoder.head_weight();
        let (logp, _) = head_logprobs(&hidden, head, &self.ids, &self.scored, bf16).unwrap();
        let count = self.scored.iter().flatten().filter(|&&s| s).count() as f64;
        (logp.sum_all().unwrap().neg().unwrap() / count).unwrap()
    }
}

/// A parameter's gradient as f32 values, with its norm and sum in f64.
fn gradient_of(grads: &GradStore, var: &Var, what: &str) -> (Vec<f32>, f64, f64) {
    let g: Vec<f32> = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("no gradient for {what}"))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let sum = g.iter().map(|&x| x as f64).sum();
    (g, norm, sum)
}

/// The training path's gradients (decoder with the fused RMSNorm, fused chunked head +
/// cross-entropy) equal transformers' autograd in float64 (`scripts/fixtures/make_grad_fixtures.py`)
/// for every parameter: norm, sum and the first 16 values, to 1e-4 relative.
#[test]
fn sft_loss_gradients_match_transformers() {
    let fixture = GradFixture::read();
    for (name, reference) in fixture.json["models"].as_object().unwrap() {
        let (config, vars) = fixture_vars(name);
        let params = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let decoder = Decoder::from_params(config, params).unwrap();
        let loss = fixture.loss(&decoder, false);
        let want_loss = reference["loss"].as_f64().unwrap();
        let got_loss = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (got_loss - want_loss).abs() < 1e-5 * want_loss.abs(),
            "{name}: loss {got_loss} vs {want_loss}"
        );
        let grads = loss.backward().unwrap();
        let close = |got: f64, want: f64, scale: f64| (got - want).abs() <= 1e-4 * scale + 1e-7;
        for (pname, want) in reference["params"].as_object().unwrap() {
            let var = vars
                .get(pname)
                .unwrap_or_else(|| panic!("{name}: no parameter {pname}"));
            let (g, norm, sum) = gradient_of(&grads, var, &format!("{name} {pname}"));
            let want_norm = want["norm"].as_f64().unwrap();
            assert!(
                close(norm, want_norm, want_norm),
                "{name} {pname}: norm {norm} vs {want_norm}"
            );
            assert!(
                close(sum, want["sum"].as_f64().unwrap(), want_norm),
                "{name} {pname}: sum {sum} vs {}",
                want["sum"]
            );
            for (i, w) in want["head"].as_array().unwrap().iter().enumerate() {
                let w = w.as_f64().unwrap();
                assert!(
                    close(g[i] as f64, w, want_norm),
                    "{name} {pname}[{i}]: {} vs {w}",
                    g[i]
                );
            }
        }
    }
}

/// Under CPU bf16 autocast (bf16 products, the fused attention, MLP and head ops) the same
/// gradients as transformers' float64 autograd, within bf16's rounding: every parameter's norm
/// to 6 %, its sum and first 16 values to 6 % of that norm (the fixtures' largest gap is 3.4 %,
/// q_proj's, the same with the composed ops). A gradient sent to the wrong parameter (k's and
/// v's slices of the joint projection swapped) fails this.
#[test]
fn sft_loss_gradients_under_cpu_bf16_autocast_match_transformers_within_rounding() {
    use ferrotune::train::trainer::compute_decoder;

    let fixture = GradFixture::read();
    let mut worst = 0f64;
    for (name, reference) in fixture.json["models"].as_object().unwrap() {
        let (config, vars) = fixture_vars(name);
        let decoder = compute_decoder(&config, &vars, DType::BF16).unwrap();
        assert!(
            decoder.bf16_linears(),
            "{name}: bf16 on the CPU is autocast"
        );
        let grads = fixture.loss(&decoder, true).backward().unwrap();
        for (pname, want) in reference["params"].as_object().unwrap() {
            let (g, norm, sum) = gradient_of(&grads, &vars[pname], &format!("{name} {pname}"));
            let want_norm = want["norm"].as_f64().unwrap();
            let mut gaps = vec![(norm - want_norm).abs() / want_norm];
            gaps.push((sum - want["sum"].as_f64().unwrap()).abs() / want_norm);
            for (i, w) in want["head"].as_array().unwrap().iter().enumerate() {
                gaps.push((g[i] as f64 - w.as_f64().unwrap()).abs() / want_norm);
            }
            let gap = gaps.iter().copied().fold(0.0, f64::max);
            worst = worst.max(gap);
            assert!(gap < 0.06, "{name} {pname}: off by {gap} of its norm");
        }
    }
    eprintln!("largest gap, relative to the gradient's norm: {worst}");
}

/// The training step's gradient sink (embedding and head gradients summed in place beside
/// candle's store) gives every parameter the same bits as candle's own backward pass, in f32
/// and under CPU bf16 autocast, tied and untied; nothing of the embedding or head is left in
/// candle's store, and the sink holds nothing else.
#[test]
fn the_gradient_sink_gives_candles_gradients_bit_for_bit() {
    use ferrotune::model::fused::{head_logprobs, head_logprobs_with_sink};
    use ferrotune::model::grad_sink::GradSink;
    use ferrotune::train::trainer::compute_decoder;

    let ids = vec![vec![5u32, 80, 300, 41, 7, 99], vec![12, 64, 3, 5, 0, 0]];
    let input = Tensor::new(
        &[[5u32, 80, 300, 41, 7, 99], [12, 64, 3, 5, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let scored = vec![
        vec![false, true, true, true, true, true],
        vec![false, true, true, true, false, false],
    ];
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    for name in MODELS {
        for dtype in [DType::F32, DType::BF16] {
            let (config, vars) = fixture_vars(name);
            // Plain: candle's store only.
            let decoder = compute_decoder(&config, &vars, dtype).unwrap();
            let hidden = decoder.forward_hidden(&input, Some(&mask)).unwrap();
            let bf16 = decoder.bf16_linears();
            let (logp, _) =
                head_logprobs(&hidden, decoder.head_weight(), &ids, &scored, bf16).unwrap();
            let plain = logp.sum_all().unwrap().neg().unwrap().backward().unwrap();
            // Sunk: the step's path.
            let sink = GradSink::new();
            let decoder = compute_decoder(&config, &vars, dtype)
                .unwrap()
                .with_grad_sink(sink.clone());
            let hidden = decoder.forward_hidden(&input, Some(&mask)).unwrap();
            let (logp, _) = head_logprobs_with_sink(
                &hidden,
                decoder.head_weight(),
                &ids,
                &scored,
                bf16,
                decoder.grad_sink(),
            )
            .unwrap();
            let store = logp.sum_all().unwrap().neg().unwrap().backward().unwrap();
            let embed = decoder
                .params()
                .keys()
                .find(|n| n.contains("embed_tokens"))
                .unwrap();
            assert!(
                store.get(vars[embed].as_tensor()).is_none(),
                "{name} {dtype:?}: the embedding's gradient went to candle's store"
            );
            let mut from_sink = 0;
            for (pname, var) in &vars {
                let want = plain
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
                let got = match (store.get(var.as_tensor()), sink.take(var.as_tensor())) {
                    (Some(g), None) => g.clone(),
                    (None, Some(g)) => {
                        from_sink += 1;
                        g
                    }
                    other => panic!("{name} {dtype:?} {pname}: store/sink {:?}", other),
                };
                assert_eq!(got.dims(), want.dims(), "{name} {pname}");
                assert!(
                    bits(&got) == bits(want),
                    "{name} {dtype:?}: gradient of {pname} differs from candle's"
                );
            }
            let tied = !vars.keys().any(|n| n == "lm_head.weight");
            assert_eq!(from_sink, if tied { 1 } else { 2 }, "{name} {dtype:?}");
            assert!(sink.is_empty(), "{name} {dtype:?}: {sink:?} left");
        }
    }
}
