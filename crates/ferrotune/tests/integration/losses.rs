//! DPO, Bradley–Terry, accumulated SFT cross-entropy and the GenRM mixture equal the
//! TRL/PyTorch references in tests/fixtures/losses.json (values and gradients, within 1e-5).

use candle_core::{DType, Device, Tensor, Var};
use ferrotune::objectives::dpo::{dpo_loss, DpoLossType, DpoParams};
use ferrotune::objectives::reward::bradley_terry_loss;
use ferrotune::objectives::sft::token_loss_sums;
use serde_json::Value;

use crate::read_fixture_json;

fn vec_f64(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn tensor(v: &Value) -> Tensor {
    Tensor::new(vec_f64(v).as_slice(), &Device::Cpu).unwrap()
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-5, "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn dpo_losses_and_gradients_match_trl() {
    let f = read_fixture_json("losses.json");
    let d = &f["dpo"];
    let ref_c = tensor(&d["reference_chosen_logps"]);
    let ref_r = tensor(&d["reference_rejected_logps"]);
    let counts_c = tensor(&d["chosen_token_counts"]);
    let counts_r = tensor(&d["rejected_token_counts"]);
    let cases = d["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let pc = Var::from_tensor(&tensor(&d["policy_chosen_logps"])).unwrap();
        let pr = Var::from_tensor(&tensor(&d["policy_rejected_logps"])).unwrap();
        let params = DpoParams {
            beta: case["beta"].as_f64().unwrap(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
            loss_type: if case["loss_type"] == "ipo" {
                DpoLossType::Ipo
            } else {
                DpoLossType::Sigmoid
            },
        };
        let out = dpo_loss(
            pc.as_tensor(),
            pr.as_tensor(),
            &ref_c,
            &ref_r,
            Some((&counts_c, &counts_r)),
            params,
        )
        .unwrap();
        assert_close(
            &out.losses.to_vec1::<f64>().unwrap(),
            &vec_f64(&case["per_pair_loss"]),
            name,
        );
        let loss = out.losses.mean_all().unwrap();
        assert_close(
            &[loss.to_scalar::<f64>().unwrap()],
            &[case["loss"].as_f64().unwrap()],
            name,
        );
        let grads = loss.backward().unwrap();
        assert_close(
            &grads.get(pc.as_tensor()).unwrap().to_vec1::<f64>().unwrap(),
            &vec_f64(&case["grad_policy_chosen_logps"]),
            name,
        );
        assert_close(
            &grads.get(pr.as_tensor()).unwrap().to_vec1::<f64>().unwrap(),
            &vec_f64(&case["grad_policy_rejected_logps"]),
            name,
        );
        // TRL's metrics, from the summed log-probs.
        let m = &case["metrics"];
        let mean = |t: &Tensor| t.mean_all().unwrap().to_scalar::<f64>().unwrap();
        let margins = (&out.chosen_rewards - &out.rejected_rewards).unwrap();
        let accuracies = margins.gt(0f64).unwrap().to_dtype(DType::F64).unwrap();
        assert_close(
            &[mean(&out.chosen_rewards)],
            &[m["rewards/chosen"].as_f64().unwrap()],
            name,
        );
        assert_close(
            &[mean(&out.rejected_rewards)],
            &[m["rewards/rejected"].as_f64().unwrap()],
            name,
        );
        assert_close(
            &[mean(&margins)],
            &[m["rewards/margins"].as_f64().unwrap()],
            name,
        );
        assert_close(
            &[mean(&accuracies)],
            &[m["rewards/accuracies"].as_f64().unwrap()],
            name,
        );
    }
}

#[test]
fn bradley_terry_loss_and_gradients_match_trl() {
    let f = read_fixture_json("losses.json");
    let r = &f["reward_model"];
    let case = r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "plain")
        .unwrap();
    let c = Var::from_tensor(&tensor(&r["r_chosen"])).unwrap();
    let j = Var::from_tensor(&tensor(&r["r_rejected"])).unwrap();
    let losses = bradley_terry_loss(c.as_tensor(), j.as_tensor()).unwrap();
    assert_close(
        &losses.to_vec1::<f64>().unwrap(),
        &vec_f64(&case["per_pair_bt_loss"]),
        "bt",
    );
    let loss = losses.mean_all().unwrap();
    assert_close(
        &[loss.to_scalar::<f64>().unwrap()],
        &[case["loss"].as_f64().unwrap()],
        "bt loss",
    );
    let grads = loss.backward().unwrap();
    assert_close(
        &grads.get(c.as_tensor()).unwrap().to_vec1::<f64>().unwrap(),
        &vec_f64(&case["grad_r_chosen"]),
        "grad chosen",
    );
    assert_close(
        &grads.get(j.as_tensor()).unwrap().to_vec1::<f64>().unwrap(),
        &vec_f64(&case["grad_r_rejected"]),
        "grad rejected",
    );
}

/// Builds our (input_ids, targets) convention from HF shift labels: logits position t
/// predicts token t+1, so token t+1 is `shift_labels[t]` and is a target unless −100. The
/// logits get one unused trailing position.
fn micro_batch(logits: &Value, shift_labels: &Value) -> (Var, Tensor, Tensor, Tensor) {
    let logits: Vec<Vec<Vec<f64>>> = serde_json::from_value(logits.clone()).unwrap();
    let labels: Vec<Vec<i64>> = serde_json::from_value(shift_labels.clone()).unwrap();
    let (b, t, v) = (logits.len(), logits[0].len(), logits[0][0].len());
    let flat: Vec<f32> = logits
        .iter()
        .flatten()
        .flatten()
        .map(|&x| x as f32)
        .collect();
    let var = Var::from_tensor(&Tensor::from_vec(flat, (b, t, v), &Device::Cpu).unwrap()).unwrap();
    let extended = Tensor::cat(
        &[
            var.as_tensor(),
            &Tensor::zeros((b, 1, v), DType::F32, &Device::Cpu).unwrap(),
        ],
        1,
    )
    .unwrap();
    let mut ids = Vec::new();
    let mut targets = Vec::new();
    for row in &labels {
        ids.push(0u32);
        targets.push(0f32);
        for &l in row {
            ids.push(if l < 0 { 0 } else { l as u32 });
            targets.push(if l < 0 { 0.0 } else { 1.0 });
        }
    }
    let ids = Tensor::from_vec(ids, (b, t + 1), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(targets, (b, t + 1), &Device::Cpu).unwrap();
    (var, extended, ids, targets)
}

fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn flat_json(v: &Value) -> Vec<f64> {
    fn walk(v: &Value, out: &mut Vec<f64>) {
        match v {
            Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            other => out.push(other.as_f64().unwrap()),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

#[test]
fn accumulated_sft_loss_is_normalised_over_the_whole_step() {
    let f = read_fixture_json("losses.json");
    let s = &f["sft_ce"];
    let total = s["total_targets"].as_f64().unwrap();
    let mut loss_value = 0f64;
    for mb in 0..2 {
        let (var, logits, ids, targets) = micro_batch(&s["logits"][mb], &s["shift_labels"][mb]);
        let sums = token_loss_sums(&logits, &ids, &targets).unwrap();
        let loss = (sums.nll_sum / total).unwrap();
        loss_value += loss.to_scalar::<f32>().unwrap() as f64;
        let grads = loss.backward().unwrap();
        assert_close(
            &flat_f64(grads.get(var.as_tensor()).unwrap()),
            &flat_json(&s["grad_logits"][mb]),
            "grad logits",
        );
    }
    assert_close(&[loss_value], &[s["loss"].as_f64().unwrap()], "step loss");
    // And it is not the naive mean of per-micro-batch means.
    assert!((loss_value - s["naive_accumulated_loss"].as_f64().unwrap()).abs() > 1e-3);
}

#[test]
fn genrm_mixture_matches_reference() {
    let f = read_fixture_json("losses.json");
    let g = &f["genrm"];
    let lambda = g["lambda"].as_f64().unwrap();
    let mut terms = Vec::new();
    for (logits_key, labels_key, count_key, grad_key, weight) in [
        (
            "verify_logits",
            "verify_shift_labels",
            "verify_targets",
            "grad_verify_logits",
            1.0,
        ),
        (
            "correct_logits",
            "correct_shift_labels",
            "correct_targets",
            "grad_correct_logits",
            lambda,
        ),
    ] {
        let (var, logits, ids, targets) = micro_batch(&g[logits_key], &g[labels_key]);
        let sums = token_loss_sums(&logits, &ids, &targets).unwrap();
        assert_eq!(sums.num_targets, g[count_key].as_f64().unwrap());
        let term = (sums.nll_sum / sums.num_targets).unwrap();
        let weighted = (&term * weight).unwrap();
        let grads = weighted.backward().unwrap();
        assert_close(
            &flat_f64(grads.get(var.as_tensor()).unwrap()),
            &flat_json(&g[grad_key]),
            grad_key,
        );
        terms.push(term.to_scalar::<f32>().unwrap() as f64);
    }
    assert_close(
        &[terms[0]],
        &[g["verify_term"].as_f64().unwrap()],
        "verify term",
    );
    assert_close(
        &[terms[1]],
        &[g["correct_term"].as_f64().unwrap()],
        "correct term",
    );
    assert_close(
        &[terms[0] + lambda * terms[1]],
        &[g["loss"].as_f64().unwrap()],
        "genrm loss",
    );
}
