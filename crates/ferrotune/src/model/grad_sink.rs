//! `GradSink`: parameter gradients summed in place beside candle's gradient store.
//!
//! candle's backward pass starts every gradient at zeros and adds each contribution into a new
//! tensor (`zeros + g`, then `sum + g'`), so summing a weight's gradient holds two extra buffers
//! of the weight's size. At Qwen2.5-0.5B the tied 152k × 896 embedding (545 MB) paid that twice:
//! ~1.1 GB of transients at the head, and a full copy at the embedding lookup, which runs last,
//! when every other gradient is alive too: the step's peak. Ops that know their weight is a
//! parameter hand its gradient here instead ([`GradSink::divert`], [`embedding`]): the first
//! contribution is kept as it is, later ones are added into it in place, in the order candle
//! would have added them (so the sums are the same bits), and the trainer takes the sums back by
//! parameter ([`GradSink::take`]).
//!
//! Only f32 CPU variables go here: their ids are the parameters the trainer reads, so nothing
//! sent here can be missed. Everything else stays on candle's path. Only the embedding and the
//! head use it: sending every bf16 linear layer's weight gradient here too gained no speed at
//! 0.5B and raised the step's peak RSS by ~480 MB of memory the allocator kept
//! (docs/PERFORMANCE.md).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Shape, Tensor, TensorId};

use super::fused::{cpu_error, f32_slice, f32_slice_mut};
use crate::error::Result;

/// Where ops send their parameters' gradients during one backward pass; cheap to clone (one
/// shared map).
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<HashMap<TensorId, Tensor>>>);

impl std::fmt::Debug for GradSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GradSink({} gradients)", self.len())
    }
}

impl GradSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `weight`'s gradient may come here: an f32 CPU variable, i.e. a parameter the
    /// trainer asks for by id.
    pub fn takes(weight: &Tensor) -> bool {
        weight.is_variable() && weight.dtype() == DType::F32 && weight.device().is_cpu()
    }

    /// For an op's backward: keeps `grad` (the gradient of `weight`) here when `sink` takes it
    /// and returns `None` for candle; otherwise returns it unchanged.
    pub fn divert(
        sink: Option<&GradSink>,
        weight: &Tensor,
        grad: Option<Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        match (sink, grad) {
            (Some(sink), Some(g))
                if Self::takes(weight)
                    && g.dtype() == DType::F32
                    && g.shape() == weight.shape()
                    && g.is_contiguous() =>
            {
                sink.add(weight, g)?;
                Ok(None)
            }
            (_, grad) => Ok(grad),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TensorId, Tensor>> {
        // A poisoned lock means a backward pass panicked; its sums are not trusted anyway.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `sum(weight) += grad`, or `sum(weight) = grad` for the first contribution. `grad` is a
    /// fresh, contiguous f32 tensor nobody else holds.
    fn add(&self, weight: &Tensor, grad: Tensor) -> candle_core::Result<()> {
        let mut map = self.lock();
        match map.get(&weight.id()) {
            Some(sum) => sum.inplace_op2(&grad, &AddInto),
            None => {
                map.insert(weight.id(), grad);
                Ok(())
            }
        }
    }

    /// `sum(weight)[ids[i]] += rows[i]` for every i in order (an embedding lookup's gradient),
    /// starting from zeros for the first contribution.
    fn scatter_rows(&self, weight: &Tensor, ids: &[u32], rows: &Tensor) -> candle_core::Result<()> {
        let mut map = self.lock();
        let sum = match map.get(&weight.id()) {
            Some(sum) => sum.clone(),
            None => {
                let zeros = weight.zeros_like()?;
                map.insert(weight.id(), zeros.clone());
                zeros
            }
        };
        let rows = rows.contiguous()?;
        sum.inplace_op2(&rows, &ScatterRows { ids })
    }

    /// The summed gradient of `weight`, if any op sent one; removes it from the sink.
    pub fn take(&self, weight: &Tensor) -> Option<Tensor> {
        self.lock().remove(&weight.id())
    }

    /// Gradients still held (none once the trainer took every parameter's).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `sum += g`, elementwise in place (f32 addition commutes, so `sum + g` here and candle's
/// `sum.add(g)` give the same bits).
struct AddInto;

impl InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "grad-sink-add"
    }

    fn cpu_fwd(
        &self,
        sum: &mut CpuStorage,
        sl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (sum, g) = (f32_slice_mut(sum, sl)?, f32_slice(g, gl)?);
        if sum.len() != g.len() {
            return Err(cpu_error("grad sink: gradient size differs from the sum's"));
        }
        sum.par_chunks_mut(1 << 16)
            .zip(g.par_chunks(1 << 16))
            .for_each(|(s, g)| s.iter_mut().zip(g).for_each(|(s, g)| *s += g));
        Ok(())
    }
}

/// `sum[ids[i]] += rows[i]`, sequentially in i (candle's `index_add` order).
struct ScatterRows<'a> {
    ids: &'a [u32],
}

impl InplaceOp2 for ScatterRows<'_> {
    fn name(&self) -> &'static str {
        "grad-sink-scatter-rows"
    }

    fn cpu_fwd(
        &self,
        sum: &mut CpuStorage,
        sl: &Layout,
        rows: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<()> {
        let (sum, rows) = (f32_slice_mut(sum, sl)?, f32_slice(rows, rl)?);
        let width = rows.len() / self.ids.len().max(1);
        if rows.len() != self.ids.len() * width || width == 0 && !rows.is_empty() {
            return Err(cpu_error("grad sink: rows do not match the ids"));
        }
        for (&id, row) in self.ids.iter().zip(rows.chunks(width.max(1))) {
            let start = id as usize * width;
            let Some(dst) = sum.get_mut(start..start + width) else {
                return Err(cpu_error("grad sink: row id outside the weight"));
            };
            dst.iter_mut().zip(row).for_each(|(d, r)| *d += r);
        }
        Ok(())
    }
}

/// Rows `ids` of `weight` ([V, H] → [ids, H]), as `index_select`; when `sink` takes `weight`,
/// its gradient is scattered into the sink instead of a new [V, H] tensor per contribution.
/// `ids` is a 1-D u32 tensor of valid rows.
pub fn embedding(weight: &Tensor, ids: &Tensor, sink: Option<&GradSink>) -> Result<Tensor> {
    match sink {
        Some(sink) if GradSink::takes(weight) && weight.is_contiguous() => {
            let ids_vec = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            let op = Lookup {
                ids: ids_vec,
                sink: sink.clone(),
            };
            Ok(weight.apply_op1(op)?)
        }
        _ => Ok(weight.index_select(ids, 0)?),
    }
}

struct Lookup {
    ids: Vec<u32>,
    sink: GradSink,
}

impl CustomOp1 for Lookup {
    fn name(&self) -> &'static str {
        "grad-sink-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, width) = l.shape().dims2()?;
        let w = f32_slice(s, l)?;
        let mut out = Vec::with_capacity(self.ids.len() * width);
        for &id in &self.ids {
            let id = id as usize;
            if id >= rows {
                return Err(cpu_error("embedding: token id outside the vocabulary"));
            }
            out.extend_from_slice(&w[id * width..(id + 1) * width]);
        }
        Ok((CpuStorage::F32(out), Shape::from((self.ids.len(), width))))
    }

    fn bwd(
        &self,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.to_dtype(DType::F32)?;
        self.sink.scatter_rows(weight, &self.ids, &grad)?;
        Ok(None)
    }
}
