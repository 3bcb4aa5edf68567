//! The key/value cache for incremental decoding, kept outside the model.
//!
//! One cache holds a batch of rows that advance together by slots; each row has its own
//! position counter and key-validity list, so prompts of different lengths (left padded in
//! the prefill) share a batch. Storage is preallocated and grown by doubling, and new keys are
//! written in place. Rows can be selected or repeated ([`KvCache::select_rows`]): K samples of
//! one prompt fork its prefilled cache instead of recomputing it, and finished rows are dropped.

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct KvCache {
    /// Per layer, keys and values shaped [B, KV, capacity, D]; `None` until the first step.
    layers: Vec<Option<(Tensor, Tensor)>>,
    capacity: usize,
    len: usize,
    key_valid: Vec<Vec<bool>>,
    next_position: Vec<u32>,
    num_kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    pub fn new(config: &ModelConfig, batch_size: usize) -> Self {
        KvCache {
            layers: vec![None; config.num_hidden_layers],
            capacity: 0,
            len: 0,
            key_valid: vec![Vec::new(); batch_size],
            next_position: vec![0; batch_size],
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        }
    }

    pub fn batch_size(&self) -> usize {
        self.key_valid.len()
    }

    /// Slots filled so far (the same for every row; padding slots included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of real tokens of each row seen so far, i.e. each row's next position id.
    pub fn positions(&self) -> &[u32] {
        &self.next_position
    }

    pub(crate) fn key_valid(&self) -> &[Vec<bool>] {
        &self.key_valid
    }

    /// Position ids for a step: each real token takes its row's next position.
    pub(crate) fn next_positions(&self, step_mask: &[Vec<bool>]) -> Vec<Vec<u32>> {
        step_mask
            .iter()
            .zip(&self.next_position)
            .map(|(row, &start)| {
                let mut p = start;
                row.iter()
                    .map(|&real| {
                        let here = p;
                        if real {
                            p += 1;
                        }
                        here
                    })
                    .collect()
            })
            .collect()
    }

    /// Makes room for `needed` slots, doubling the storage when it is full.
    pub(crate) fn reserve(&mut self, needed: usize, dtype: DType, device: &Device) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let new_capacity = needed.max(self.capacity * 2).max(16);
        let shape = (
            self.batch_size(),
            self.num_kv_heads,
            new_capacity,
            self.head_dim,
        );
        for layer in self.layers.iter_mut() {
            let k = Tensor::zeros(shape, dtype, device)?;
            let v = Tensor::zeros(shape, dtype, device)?;
            if let Some((old_k, old_v)) = layer.as_ref() {
                if self.len > 0 {
                    k.slice_set(&old_k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    v.slice_set(&old_v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            *layer = Some((k, v));
        }
        self.capacity = new_capacity;
        Ok(())
    }

    pub(crate) fn push_validity(&mut self, step_mask: &[Vec<bool>]) {
        for (row, step) in self.key_valid.iter_mut().zip(step_mask) {
            row.extend_from_slice(step);
        }
    }

    /// Writes one layer's new keys/values at slot `past` and returns all keys/values so far.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        past: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (ks, vs) = self.layers[layer]
            .as_ref()
            .ok_or_else(|| Error::invalid("KV cache used before reserve"))?;
        let t = k.dim(2)?;
        ks.slice_set(&k.contiguous()?, 2, past)?;
        vs.slice_set(&v.contiguous()?, 2, past)?;
        Ok((ks.narrow(2, 0, past + t)?, vs.narrow(2, 0, past + t)?))
    }

    pub(crate) fn advance(&mut self, t: usize, step_mask: &[Vec<bool>]) {
        self.len += t;
        for (p, row) in self.next_position.iter_mut().zip(step_mask) {
            *p += row.iter().filter(|&&real| real).count() as u32;
        }
    }

    /// A new cache whose row i is this cache's row `rows[i]` (rows may repeat: forking a
    /// prompt's cache into K samples) or be left out (dropping finished sequences).
    pub fn select_rows(&self, rows: &[usize]) -> Result<KvCache> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch_size()) {
            return Err(Error::invalid(format!(
                "row {bad} is outside a cache of {} rows",
                self.batch_size()
            )));
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            layers.push(match layer {
                Some((k, v)) => {
                    let index = Tensor::from_vec(
                        rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                        rows.len(),
                        k.device(),
                    )?;
                    Some((k.index_select(&index, 0)?, v.index_select(&index, 0)?))
                }
                None => None,
            });
        }
        Ok(KvCache {
            layers,
            capacity: self.capacity,
            len: self.len,
            key_valid: rows.iter().map(|&r| self.key_valid[r].clone()).collect(),
            next_position: rows.iter().map(|&r| self.next_position[r]).collect(),
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        })
    }
}
