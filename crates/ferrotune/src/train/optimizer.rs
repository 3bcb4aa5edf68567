//! AdamW with f32 master weights and moments, as `torch.optim.AdamW` updates them:
//! decoupled weight decay `w ← w(1 − lr·wd)` on matrices and embeddings only (no decay on
//! norms and biases), then the bias-corrected Adam step.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken (for bias correction).
    pub step: usize,
    /// First and second moments per parameter name.
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(beta1: f64, beta2: f64, epsilon: f64, weight_decay: f64) -> Self {
        AdamW {
            beta1,
            beta2,
            epsilon,
            weight_decay,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    /// One update of every parameter that has a gradient. `decays(name)` says whether weight
    /// decay applies to it.
    pub fn update(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        decays: impl Fn(&str) -> bool,
    ) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            let g = g.to_dtype(DType::F32)?;
            let (m, v) = match self.moments.get(name) {
                Some(mv) => mv.clone(),
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = ((m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let mut w = var.as_tensor().detach();
            if self.weight_decay > 0.0 && decays(name) {
                w = (w * (1.0 - lr * self.weight_decay))?;
            }
            let denom = ((v.sqrt()? / bias2_sqrt)? + self.epsilon)?;
            let update = ((&m / denom)? * (lr / bias1))?;
            var.set(&(w - update)?)?;
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }

    /// Moments as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (name, (m, v)) in &self.moments {
            out.insert(format!("exp_avg.{name}"), m.clone());
            out.insert(format!("exp_avg_sq.{name}"), v.clone());
        }
        out
    }

    pub fn load_state_tensors(
        &mut self,
        mut tensors: BTreeMap<String, Tensor>,
        step: usize,
    ) -> Result<()> {
        self.moments.clear();
        let names: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_prefix("exp_avg.").map(str::to_string))
            .collect();
        for name in names {
            let m = tensors
                .remove(&format!("exp_avg.{name}"))
                .expect("listed key");
            let v = tensors
                .remove(&format!("exp_avg_sq.{name}"))
                .ok_or_else(|| {
                    Error::invalid(format!("optimizer state lacks exp_avg_sq.{name}"))
                })?;
            self.moments.insert(name, (m, v));
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of all gradients (f64 accumulation).
pub fn global_grad_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads.values() {
        sum += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(sum.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (torch's clip_grad_norm_:
/// factor max_norm / (norm + 1e-6), applied only when it is below 1).
pub fn clip_grad_norm(
    grads: &mut BTreeMap<String, Tensor>,
    norm: f64,
    max_norm: f64,
) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * factor)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps of torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    /// on w = [1, −2] with gradients [0.5, −1] then [0.2, 0.4], computed by hand from the
    /// update rule in torch's documentation.
    #[test]
    fn matches_torch_adamw_rule() {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let params = BTreeMap::from([("w".to_string(), var.clone())]);
        let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.1);
        let mut w = [1.0f64, -2.0];
        let mut m = [0.0f64; 2];
        let mut v = [0.0f64; 2];
        for (t, g) in [[0.5f64, -1.0], [0.2, 0.4]].iter().enumerate() {
            let grads = BTreeMap::from([(
                "w".to_string(),
                Tensor::new(&[g[0] as f32, g[1] as f32], &dev).unwrap(),
            )]);
            opt.update(&params, &grads, 0.1, |_| true).unwrap();
            let step = (t + 1) as i32;
            for i in 0..2 {
                w[i] *= 1.0 - 0.1 * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(step));
                let vh = v[i] / (1.0 - 0.999f64.powi(step));
                w[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - w[i]).abs() < 1e-5,
                "{} vs {}",
                got[i],
                w[i]
            );
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let dev = Device::Cpu;
        let mut grads =
            BTreeMap::from([("a".to_string(), Tensor::new(&[3f32, 4.0], &dev).unwrap())]);
        let norm = global_grad_norm(&grads).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        clip_grad_norm(&mut grads, norm, 1.0).unwrap();
        assert!((global_grad_norm(&grads).unwrap() - 1.0).abs() < 1e-5);
    }
}
