//! Every trainable tensor receives a non-zero gradient from a loss on `forward`. This guards
//! against fused ops that build outputs without a gradient path (candle-nn's rms_norm,
//! softmax_last_dim, rope): with one of them in the graph, upstream tensors get nothing.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use ferrotune::model::ops::log_softmax_last_dim;
use ferrotune::model::Decoder;

use crate::{load_fixture, MODELS};

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    for name in MODELS {
        let loaded = load_fixture(name);
        let config = loaded.decoder.config().clone();
        let vars: BTreeMap<String, Var> = loaded
            .decoder
            .params()
            .iter()
            .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
            .collect();
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
        for (n, v) in &vars {
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
}
