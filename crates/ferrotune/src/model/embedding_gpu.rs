//! The token embedding's lookup as one op whose backward is parallel and deterministic on a GPU.
//!
//! The lookup's backward adds each position's gradient row into the table's gradient at its
//! token's row. candle's CUDA `index_add` does that with one thread per column of the table,
//! each walking every position in turn: at batch 8 × 2048 tokens on Qwen2.5-0.5B's 896-wide
//! table, 896 threads (28 of an H100's 132 SMs busy) and 16,384 dependent read-modify-writes
//! each, with the running sum rounded to bf16 after every position under bf16 compute.
//!
//! Here the positions are grouped by token on the host ([`Segments`]; the decoder reads the ids
//! back anyway, to check them), and cuda/kernels.cu's `embedding_bwd` gives every (token, column)
//! pair a thread that sums its positions' rows in f32, in position order, and writes the table
//! row once. Those are the sums, in the order, of candle's CPU `index_add`. The CPU forwards
//! here do the same arithmetic, for the tests and the GPU paths run on the CPU
//! (`FERROTUNE_GPU_PATHS_ON_CPU`; the table's gradient then goes to candle's store, not the
//! CPU's gradient sink, and the trainer adds the two as usual); the CPU trains through
//! `grad_sink::embedding`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::fused::{cpu_error, f32_values, stored_like};
use crate::error::{Error, Result};

/// `table` [V, W] (f32 or bf16) looked up at `ids` (u32 [N], on the table's device, equal to
/// `host_ids`): [N, W], with a gradient for the table. Every id must be below V.
pub fn embedding(table: &Tensor, ids: &Tensor, host_ids: &[u32]) -> Result<Tensor> {
    let (vocab, width) = table.dims2()?;
    if let Some(&bad) = host_ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::invalid(format!(
            "token id {bad} is outside the embedding table's {vocab} rows"
        )));
    }
    if ids.dims() != [host_ids.len()] {
        return Err(Error::invalid(format!(
            "embedding: ids {:?} are not the {} host ids",
            ids.dims(),
            host_ids.len()
        )));
    }
    let op = Lookup {
        segments: Arc::new(Segments::of(host_ids)),
        vocab,
        width,
    };
    Ok(table.contiguous()?.apply_op2(&ids.contiguous()?, op)?)
}

/// Positions grouped by token: `ids` the distinct tokens (increasing), and for `ids[s]` the
/// positions `order[starts[s]..starts[s + 1]]` (increasing).
#[derive(Debug, PartialEq)]
pub struct Segments {
    pub ids: Vec<u32>,
    pub starts: Vec<u32>,
    pub order: Vec<u32>,
}

impl Segments {
    pub fn of(tokens: &[u32]) -> Self {
        let mut order: Vec<u32> = (0..tokens.len() as u32).collect();
        // Stable: positions stay increasing within a token.
        order.sort_by_key(|&p| tokens[p as usize]);
        let (mut ids, mut starts) = (Vec::new(), Vec::new());
        for (k, &p) in order.iter().enumerate() {
            let token = tokens[p as usize];
            if ids.last() != Some(&token) {
                ids.push(token);
                starts.push(k as u32);
            }
        }
        starts.push(order.len() as u32);
        Segments { ids, starts, order }
    }

    fn segments(&self) -> impl Iterator<Item = (u32, &[u32])> {
        let bounds = self.starts.windows(2);
        let ids = self.ids.iter().copied();
        ids.zip(bounds.map(|w| &self.order[w[0] as usize..w[1] as usize]))
    }
}

/// Forward: (table, ids) → rows.
struct Lookup {
    segments: Arc<Segments>,
    vocab: usize,
    width: usize,
}

/// Backward: the rows' gradient [N, W] → the table's [V, W], in the rows' type.
struct TableGrad {
    segments: Arc<Segments>,
    vocab: usize,
    width: usize,
}

impl CustomOp2 for Lookup {
    fn name(&self) -> &'static str {
        "embedding-lookup"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let table = f32_values(s1, l1)?;
        let w = self.width;
        let mut rows = vec![0f32; self.segments.order.len() * w];
        for (id, positions) in self.segments.segments() {
            let src = &table[id as usize * w..][..w];
            for &p in positions {
                rows[p as usize * w..][..w].copy_from_slice(src);
            }
        }
        let n = self.segments.order.len();
        Ok((stored_like(s1, rows), Shape::from((n, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        // candle's gather is parallel over the output already; only its backward is not.
        let rows = s1.index_select(s2, l1, l2, 0)?;
        Ok((rows, Shape::from((l2.shape().elem_count(), self.width))))
    }

    fn bwd(
        &self,
        _table: &Tensor,
        _ids: &Tensor,
        _rows: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let op = TableGrad {
            segments: self.segments.clone(),
            vocab: self.vocab,
            width: self.width,
        };
        Ok((Some(grad.contiguous()?.apply_op1_no_bwd(&op)?), None))
    }
}

impl CustomOp1 for TableGrad {
    fn name(&self) -> &'static str {
        "embedding-table-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let grad = f32_values(s, l)?;
        let w = self.width;
        if grad.len() != self.segments.order.len() * w {
            return Err(cpu_error("embedding backward: gradient shape changed"));
        }
        let mut table = vec![0f32; self.vocab * w];
        for (id, positions) in self.segments.segments() {
            let row = &mut table[id as usize * w..][..w];
            for &p in positions {
                for (t, g) in row.iter_mut().zip(&grad[p as usize * w..][..w]) {
                    *t += g;
                }
            }
        }
        Ok((stored_like(s, table), Shape::from((self.vocab, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let seg = &*self.segments;
        let table = super::cuda_ops::embedding_bwd(
            (s, l),
            (&seg.ids, &seg.starts, &seg.order),
            (self.vocab, self.width),
        )?;
        Ok((table, Shape::from((self.vocab, self.width))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_tensors::{max_abs_diff, random};
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn positions_are_grouped_by_token_in_order() {
        let s = Segments::of(&[5, 2, 5, 9, 2, 5]);
        assert_eq!(s.ids, [2, 5, 9]);
        assert_eq!(s.starts, [0, 2, 5, 6]);
        assert_eq!(s.order, [1, 4, 0, 2, 5, 3]);
        let empty = Segments::of(&[]);
        assert_eq!(
            (empty.ids.len(), empty.starts, empty.order.len()),
            (0, vec![0], 0)
        );
    }

    /// Rows and the table's gradient against candle's index_select (whose CPU index_add sums
    /// in the same order: the same bits in f32), with repeated tokens and unused rows; bf16
    /// within its rounding.
    #[test]
    fn lookup_and_gradient_match_index_select() {
        let dev = Device::Cpu;
        let tokens: Vec<u32> = vec![3, 0, 3, 7, 3, 1, 0, 9, 3];
        let ids = Tensor::new(tokens.as_slice(), &dev).unwrap();
        let probe = random(&[tokens.len(), 6], 11, 1.0);
        let diff = |a: &Tensor, b: &Tensor| {
            max_abs_diff(
                &a.to_dtype(DType::F32).unwrap(),
                &b.to_dtype(DType::F32).unwrap(),
            )
        };
        for dtype in [DType::F32, DType::BF16] {
            let table =
                Var::from_tensor(&random(&[10, 6], 5, 1.0).to_dtype(dtype).unwrap()).unwrap();
            let ours = embedding(table.as_tensor(), &ids, &tokens).unwrap();
            let reference = table.as_tensor().index_select(&ids, 0).unwrap();
            assert_eq!(diff(&ours, &reference), 0.0);
            let weigh = |rows: &Tensor| {
                let rows = rows.to_dtype(DType::F32).unwrap();
                (rows * &probe).unwrap().sum_all().unwrap()
            };
            let g = weigh(&ours).backward().unwrap();
            let gr = weigh(&reference).backward().unwrap();
            let (g, gr) = (
                g.get(table.as_tensor()).unwrap(),
                gr.get(table.as_tensor()).unwrap(),
            );
            assert_eq!(g.dtype(), dtype);
            let tolerance = if dtype == DType::F32 { 0.0 } else { 0.02 };
            assert!(diff(g, gr) <= tolerance, "{dtype:?}");
        }
        let table = random(&[10, 6], 5, 1.0);
        assert!(embedding(&table, &ids, &[3, 0, 3, 7, 3, 1, 0, 10, 3]).is_err());
    }
}
