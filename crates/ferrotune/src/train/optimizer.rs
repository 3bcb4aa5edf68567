//! AdamW with f32 master weights and moments, as `torch.optim.AdamW` updates them:
//! decoupled weight decay `w ← w(1 − lr·wd)` on matrices and embeddings only (no decay on
//! norms and biases), then the bias-corrected Adam step.
//!
//! On the CPU the update runs in place (three passes: `m`, `v`, then `w`), like torch's
//! `foreach` AdamW: the composed tensor ops allocated about five parameter-sized temporaries
//! per tensor, 2.7 GB for the 0.5B model's embedding alone. Elsewhere (CUDA) it uses the
//! composed ops, which are also the test's second path.

use std::collections::BTreeMap;

use candle_core::{CpuStorage, DType, Layout, Tensor, Var};

use crate::error::{Error, Result};
use crate::model::fused::{f32_slice, f32_slice_mut};

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken (for bias correction).
    pub step: usize,
    /// First and second moments per parameter name.
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
    /// Update CPU f32 tensors in place (the default); `false` forces the composed tensor ops.
    pub in_place: bool,
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
            in_place: true,
        }
    }

    /// Allocates zero moments for every parameter now, before the first step. Lazily created
    /// moments (torch's way) take their memory from what the first step's activations freed, so
    /// the second step's activations land on fresh pages the kernel must fault in and zero:
    /// at the 0.5B shape that made step 2 half as fast as step 3. Allocated up front, the
    /// first step already has the steady-state footprint.
    pub fn init_moments(&mut self, params: &BTreeMap<String, Var>) -> Result<()> {
        for (name, var) in params {
            if !self.moments.contains_key(name) {
                let z = || Tensor::zeros(var.shape(), DType::F32, var.device());
                self.moments.insert(name.clone(), (z()?, z()?));
            }
        }
        Ok(())
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
            let decay = if self.weight_decay > 0.0 && decays(name) {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            if self.in_place && in_place(var, &g, &m, &v) {
                // Each constant is rounded to f32 from the same f64 expression the composed ops
                // use, and each kernel rounds in their order, so both paths give the same bits
                // (except the sign of a zero: the composed ops' `+ 0.0` turns −0 into +0). An
                // error in the last pass would leave m and v one step ahead of w; it can only
                // come from a layout candle refuses, which `in_place` rules out.
                m.inplace_op2(&g, &Moment::first(self.beta1))?;
                v.inplace_op2(&g, &Moment::second(self.beta2))?;
                var.as_tensor().inplace_op3(
                    &m,
                    &v,
                    &Apply {
                        decay: decay as f32,
                        step: (lr / bias1) as f32,
                        inv_bias2_sqrt: (1.0 / bias2_sqrt) as f32,
                        epsilon: self.epsilon as f32,
                    },
                )?;
                self.moments.insert(name.clone(), (m, v));
                continue;
            }
            let m = ((m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let mut w = var.as_tensor().detach();
            if decay != 1.0 {
                w = (w * decay)?;
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

/// Whether the in-place kernels can update this parameter: f32 contiguous tensors on the CPU
/// (or, with the `cuda` feature, on one GPU: cuda/kernels.cu's kernels), all of the weight's shape (the kernels walk the slices side by side, so a moment of the
/// wrong shape, from a hand-mixed checkpoint, must reach the composed ops, which report it). The
/// moments are this optimizer's own tensors; candle refuses an in-place op whose operands share
/// storage, so an alias would be an error, never a wrong update.
fn in_place(var: &Var, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let device = var.device();
    let kernels =
        device.is_cpu() || crate::device::own_cuda_kernels(device, crate::device::Kernels::Adamw);
    kernels
        && [var.as_tensor(), g, m, v].iter().all(|t| {
            t.device().same_device(device)
                && t.dtype() == DType::F32
                && t.is_contiguous()
                && t.shape() == var.shape()
        })
}

/// Pieces the in-place passes split a tensor into for the thread pool (memory-bound: a few
/// hundred KB each is enough to keep both cores streaming).
const PIECE: usize = 1 << 16;

/// A moment's update in place: `m ← β·m + (1−β)·g` (first) or `v ← β·v + (1−β)·g²` (second).
struct Moment {
    beta: f32,
    one_minus_beta: f32,
    squared: bool,
}

impl Moment {
    fn first(beta: f64) -> Self {
        Moment {
            beta: beta as f32,
            one_minus_beta: (1.0 - beta) as f32,
            squared: false,
        }
    }
    fn second(beta: f64) -> Self {
        Moment {
            squared: true,
            ..Moment::first(beta)
        }
    }
}

impl candle_core::InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }
    fn cpu_fwd(
        &self,
        m: &mut CpuStorage,
        ml: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (m, g) = (f32_slice_mut(m, ml)?, f32_slice(g, gl)?);
        let (b, c, squared) = (self.beta, self.one_minus_beta, self.squared);
        m.par_chunks_mut(PIECE)
            .zip(g.par_chunks(PIECE))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = if squared { g * g } else { g };
                    *m = *m * b + g * c;
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        m: &mut candle_core::CudaStorage,
        ml: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let params = (self.beta, self.one_minus_beta, self.squared);
        crate::model::cuda_ops::adamw_moment((m, ml), (g, gl), params)
    }
}

/// `w ← w·decay − step · m / (√v · inv_bias2_sqrt + ε)`, in place, with
/// `step = lr / (1 − β1ᵗ)` and `inv_bias2_sqrt = 1 / √(1 − β2ᵗ)` (candle divides a tensor by a
/// scalar as a product with its reciprocal).
struct Apply {
    decay: f32,
    step: f32,
    inv_bias2_sqrt: f32,
    epsilon: f32,
}

impl candle_core::InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "adamw-apply"
    }
    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        wl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (w, m, v) = (f32_slice_mut(w, wl)?, f32_slice(m, ml)?, f32_slice(v, vl)?);
        w.par_chunks_mut(PIECE)
            .zip(m.par_chunks(PIECE).zip(v.par_chunks(PIECE)))
            .for_each(|(w, (m, v))| {
                for ((w, m), v) in w.iter_mut().zip(m).zip(v) {
                    let denom = v.sqrt() * self.inv_bias2_sqrt + self.epsilon;
                    *w = *w * self.decay - (m / denom) * self.step;
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &mut candle_core::CudaStorage,
        wl: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        let params = [self.decay, self.step, self.inv_bias2_sqrt, self.epsilon];
        crate::model::cuda_ops::adamw_apply((w, wl), (m, ml), (v, vl), params)
    }
}

/// The global L2 norm of all gradients (f64 accumulation of the per-tensor sums).
pub fn global_grad_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    if grads.values().any(|g| !g.device().is_cpu()) {
        return grad_norm_one_read(grads);
    }
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

/// [`global_grad_norm`] with the per-tensor sums added on their device and read back once: on
/// a GPU each read-back waits for the whole queue, so one for all tensors, not one per tensor.
fn grad_norm_one_read(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let sums = grads
        .values()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&sums, 0)?.to_dtype(DType::F64)?.sum_all()?;
    Ok(total.to_scalar::<f64>()?.sqrt())
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
    /// The GPU's one-read norm is the CPU's norm (run here on the CPU): same tensors, f64 sum
    /// of f32 per-tensor sums.
    #[test]
    fn one_read_norm_matches_the_per_tensor_norm() {
        let dev = Device::Cpu;
        let grads = BTreeMap::from([
            ("a".to_string(), Tensor::new(&[3.0f32, -4.0], &dev).unwrap()),
            (
                "b".to_string(),
                Tensor::new(&[[1.0f32, 2.0], [-2.0, 0.5]], &dev).unwrap(),
            ),
        ]);
        let expected = (9.0f64 + 16.0 + 1.0 + 4.0 + 4.0 + 0.25).sqrt();
        assert_eq!(global_grad_norm(&grads).unwrap(), expected);
        assert_eq!(grad_norm_one_read(&grads).unwrap(), expected);
        assert_eq!(grad_norm_one_read(&BTreeMap::new()).unwrap(), 0.0);
    }

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

    /// The in-place kernels and the composed ops give the same bits (weights and moments) over three
    /// steps, with and without weight decay, on a tensor of several thread-pool pieces.
    #[test]
    fn in_place_update_equals_the_composed_ops() {
        let dev = Device::Cpu;
        let n = 3 * PIECE + 17;
        let w0 = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let gs: Vec<Tensor> = (0..3)
            .map(|step| (Tensor::randn(0f32, 1.0, n, &dev).unwrap() * (step as f64 + 1.0)).unwrap())
            .collect();
        let mut out = Vec::new();
        for in_place in [true, false] {
            let params = BTreeMap::from([
                ("a".to_string(), Var::from_tensor(&w0).unwrap()),
                ("b".to_string(), Var::from_tensor(&w0).unwrap()),
            ]);
            let mut opt = AdamW::new(0.9, 0.95, 1e-8, 0.1);
            opt.in_place = in_place;
            for g in &gs {
                let g = g.clone();
                let grads = BTreeMap::from([("a".to_string(), g.clone()), ("b".to_string(), g)]);
                opt.update(&params, &grads, 1e-2, |name| name == "a")
                    .unwrap();
            }
            let mut vals = Vec::new();
            for (name, var) in &params {
                vals.push(var.as_tensor().to_vec1::<f32>().unwrap());
                let (m, v) = &opt.moments[name];
                vals.push(m.to_vec1::<f32>().unwrap());
                vals.push(v.to_vec1::<f32>().unwrap());
            }
            out.push(vals);
        }
        for (fused, composed) in out[0].iter().zip(&out[1]) {
            for (x, y) in fused.iter().zip(composed) {
                assert_eq!(x.to_bits(), y.to_bits(), "{x} vs {y}");
            }
        }
        // Weight decay reached "a" only.
        assert_ne!(out[0][0], out[0][3]);
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
