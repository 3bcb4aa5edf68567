//! Gradient all-reduce in flat buckets, as PyTorch DDP does: the gradients (in name order, the
//! same on every rank) are packed into f32 buckets of about `bucket_elements` values, and each
//! bucket is summed across ranks by one in-place collective. Few large messages run near the
//! interconnect's bandwidth; one collective per tensor would pay the latency hundreds of times.
//! A tensor larger than a bucket travels alone (the communicator chunks it below 2 GiB).
//!
//! Not here: the division by the step's global target count (the trainer normalises the loss
//! before backward, so the sum of the ranks' gradients is already the global mean).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::communicator::{Communicator, ReduceOp};
use crate::error::Result;

/// 25M f32 values (100 MB) per bucket: DDP's default bucket is 25 MB; larger buckets cut the
/// per-message cost further on CPU, where nothing overlaps the reduction with backward anyway.
pub const DEFAULT_BUCKET_ELEMENTS: usize = 25_000_000;

/// Groups of consecutive tensor sizes whose sum stays within `bucket_elements` (a tensor larger
/// than that forms its own group). Returns index ranges into `sizes`.
pub fn plan_buckets(sizes: &[usize], bucket_elements: usize) -> Vec<std::ops::Range<usize>> {
    let mut buckets = Vec::new();
    let mut start = 0;
    let mut filled = 0;
    for (i, &n) in sizes.iter().enumerate() {
        if i > start && filled + n > bucket_elements {
            buckets.push(start..i);
            start = i;
            filled = 0;
        }
        filled += n;
    }
    if start < sizes.len() {
        buckets.push(start..sizes.len());
    }
    buckets
}

/// Appends the values of `tensor` (as f32) to `out`, without an intermediate vector when it is a
/// contiguous f32 CPU tensor.
fn extend_with(out: &mut Vec<f32>, tensor: &Tensor) -> Result<()> {
    if tensor.dtype() == DType::F32 && tensor.device().is_cpu() {
        let (storage, layout) = tensor.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            out.extend_from_slice(&cpu.as_slice::<f32>()?[start..end]);
            return Ok(());
        }
    }
    out.extend(
        tensor
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
    );
    Ok(())
}

/// Sums every gradient across ranks, in place of `grads`. Every rank must hold the same names
/// with the same shapes (a rank that saw no examples holds zeros).
pub fn all_reduce_gradients(
    comm: &dyn Communicator,
    grads: &mut BTreeMap<String, Tensor>,
    bucket_elements: usize,
) -> Result<()> {
    if comm.size() == 1 || grads.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = grads.keys().cloned().collect();
    let sizes: Vec<usize> = names.iter().map(|n| grads[n].elem_count()).collect();
    let mut flat: Vec<f32> = Vec::new();
    for bucket in plan_buckets(&sizes, bucket_elements) {
        flat.clear();
        flat.reserve(sizes[bucket.clone()].iter().sum());
        for name in &names[bucket.clone()] {
            extend_with(&mut flat, &grads[name])?;
        }
        comm.all_reduce_f32(&mut flat, ReduceOp::Sum)?;
        let mut offset = 0;
        for (name, &n) in names[bucket.clone()].iter().zip(&sizes[bucket]) {
            let old = &grads[name];
            let summed = Tensor::from_slice(&flat[offset..offset + n], old.shape(), old.device())?
                .to_dtype(old.dtype())?;
            grads.insert(name.clone(), summed);
            offset += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use candle_core::Device;

    /// N ranks that all hold the same values: every all-reduce multiplies by N. Records the
    /// length of each collective.
    struct Identical {
        size: usize,
        calls: Mutex<Vec<usize>>,
    }

    impl Communicator for Identical {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            self.size
        }
        fn backend(&self) -> &'static str {
            "test"
        }
        fn all_reduce_f32(&self, buf: &mut [f32], _op: ReduceOp) -> Result<()> {
            self.calls.lock().unwrap().push(buf.len());
            buf.iter_mut().for_each(|x| *x *= self.size as f32);
            Ok(())
        }
        fn all_reduce_f64(&self, buf: &mut [f64], _op: ReduceOp) -> Result<()> {
            buf.iter_mut().for_each(|x| *x *= self.size as f64);
            Ok(())
        }
        fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
            Ok(vec![bytes.to_vec(); self.size])
        }
        fn abort(&self, code: i32) -> ! {
            panic!("abort {code}")
        }
    }

    #[test]
    fn buckets_fill_up_to_the_limit_and_big_tensors_go_alone() {
        assert_eq!(plan_buckets(&[3, 4, 5, 11], 8), vec![0..2, 2..3, 3..4]);
        // Exactly at the boundary: one bucket.
        assert_eq!(plan_buckets(&[3, 5, 8], 8), vec![0..2, 2..3]);
        assert_eq!(plan_buckets(&[1; 5], 100), vec![0..5]);
        assert_eq!(plan_buckets(&[], 8), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(plan_buckets(&[9, 9], 8), vec![0..1, 1..2]);
    }

    #[test]
    fn gradients_are_summed_bucket_by_bucket_and_keep_their_shapes() {
        let device = Device::Cpu;
        let mut grads = BTreeMap::new();
        // Odd sizes, a non-contiguous tensor and one larger than a bucket.
        let shapes: [(&str, &[usize]); 4] =
            [("a", &[3]), ("b", &[2, 2]), ("c", &[5]), ("d", &[11])];
        for (i, (name, shape)) in shapes.iter().enumerate() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|j| (i * 100 + j) as f32 + 0.5).collect();
            grads.insert(
                name.to_string(),
                Tensor::from_vec(values, *shape, &device).unwrap(),
            );
        }
        grads.insert("b".into(), grads["b"].t().unwrap());
        let before: BTreeMap<String, Vec<f32>> = grads
            .iter()
            .map(|(n, t)| (n.clone(), t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        let comm = Identical {
            size: 3,
            calls: Mutex::new(Vec::new()),
        };
        all_reduce_gradients(&comm, &mut grads, 8).unwrap();
        assert_eq!(*comm.calls.lock().unwrap(), vec![7, 5, 11]);
        for (name, t) in &grads {
            let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> = before[name].iter().map(|x| x * 3.0).collect();
            assert_eq!(got, want, "{name}");
        }
        assert_eq!(grads["b"].dims(), &[2, 2]);
        // A world of one does no collective.
        let single = Identical {
            size: 1,
            calls: Mutex::new(Vec::new()),
        };
        all_reduce_gradients(&single, &mut grads, 8).unwrap();
        assert!(single.calls.lock().unwrap().is_empty());
    }
}
