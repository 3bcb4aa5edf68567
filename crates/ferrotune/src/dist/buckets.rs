//! Gradient all-reduce in flat buckets, as PyTorch DDP does: the gradients (in name order, the
//! same on every rank) are packed into f32 buckets of about `bucket_elements` values, and each
//! bucket is summed across ranks by one in-place collective. Few large messages run near the
//! interconnect's bandwidth; one collective per tensor would pay the latency hundreds of times.
//! A tensor larger than a bucket travels alone (the communicator chunks it below 2 GiB).
//!
//! Two ways to move a bucket. Host (CPU gradients, MPI): copied into one f32 vector, reduced,
//! copied back. Device (a backend that `reduces_on` the gradients' device: NCCL on CUDA): the
//! bucket's gradients are flattened into one fresh tensor on their device, summed in place by one
//! collective, and cut back into the gradients' shapes, so gradients never visit the host.
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

/// One flat f32 tensor holding `tensors` one after the other, in storage of its own: the
/// collective writes into it, and a gradient may share its storage with another (backward hands
/// the same tensor to both inputs of an addition; `cat` of one tensor and `to_dtype` to the same
/// dtype return their input).
pub fn flatten_fresh(tensors: &[&Tensor]) -> Result<Tensor> {
    let parts = tensors
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let flat = Tensor::cat(&parts, 0)?;
    Ok(if parts.len() == 1 { flat.copy()? } else { flat })
}

/// The pieces of `flat` back in the shapes and dtypes of `like`, in order (views of `flat` where
/// the dtype is f32).
pub fn split_like(flat: &Tensor, like: &[&Tensor]) -> Result<Vec<Tensor>> {
    let mut offset = 0;
    let mut out = Vec::with_capacity(like.len());
    for old in like {
        let n = old.elem_count();
        out.push(
            flat.narrow(0, offset, n)?
                .reshape(old.shape())?
                .to_dtype(old.dtype())?,
        );
        offset += n;
    }
    Ok(out)
}

/// Sums every gradient across ranks, in place of `grads`. Every rank must hold the same names
/// with the same shapes (a rank that saw no examples holds zeros).
pub fn all_reduce_gradients(
    comm: &dyn Communicator,
    grads: &mut BTreeMap<String, Tensor>,
    bucket_elements: usize,
) -> Result<()> {
    if (comm.size() == 1 && !comm.runs_alone()) || grads.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = grads.keys().cloned().collect();
    let sizes: Vec<usize> = names.iter().map(|n| grads[n].elem_count()).collect();
    let mut flat: Vec<f32> = Vec::new();
    for bucket in plan_buckets(&sizes, bucket_elements) {
        let members = &names[bucket.clone()];
        if members.iter().all(|n| comm.reduces_on(grads[n].device())) {
            let old: Vec<&Tensor> = members.iter().map(|n| &grads[n]).collect();
            let summed = flatten_fresh(&old)?;
            comm.all_reduce_tensor_sum(&summed)?;
            let pieces = split_like(&summed, &old)?;
            for (name, piece) in members.iter().zip(pieces) {
                grads.insert(name.clone(), piece);
            }
            continue;
        }
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

    /// N ranks that all hold the same values, summing CPU tensors in place as a GPU backend sums
    /// device tensors: exercises the device path of `all_reduce_gradients` on the CPU.
    struct IdenticalOnDevice {
        size: usize,
        calls: Mutex<Vec<usize>>,
    }

    struct Scale(f32);

    impl candle_core::InplaceOp1 for Scale {
        fn name(&self) -> &'static str {
            "scale"
        }
        fn cpu_fwd(
            &self,
            storage: &mut candle_core::CpuStorage,
            layout: &candle_core::Layout,
        ) -> candle_core::Result<()> {
            let (start, end) = layout.contiguous_offsets().expect("contiguous");
            match storage {
                candle_core::CpuStorage::F32(v) => {
                    v[start..end].iter_mut().for_each(|x| *x *= self.0)
                }
                _ => candle_core::bail!("f32 only"),
            }
            Ok(())
        }
    }

    impl Communicator for IdenticalOnDevice {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            self.size
        }
        fn backend(&self) -> &'static str {
            "test-device"
        }
        fn all_reduce_f32(&self, _buf: &mut [f32], _op: ReduceOp) -> Result<()> {
            panic!("the device path must not stage through the host")
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
        fn reduces_on(&self, device: &Device) -> bool {
            device.is_cpu()
        }
        fn all_reduce_tensor_sum(&self, flat: &Tensor) -> Result<()> {
            assert_eq!(flat.rank(), 1);
            assert!(flat.is_contiguous());
            assert_eq!(flat.dtype(), DType::F32);
            self.calls.lock().unwrap().push(flat.elem_count());
            flat.inplace_op1(&Scale(self.size as f32))?;
            Ok(())
        }
        fn runs_alone(&self) -> bool {
            true
        }
    }

    #[test]
    fn the_device_path_sums_each_bucket_once_and_restores_shapes_and_dtypes() {
        let mut grads = odd_shaped_grads(0.25);
        // Non-contiguous (b), another dtype, and two names sharing one storage (as backward hands
        // one tensor to both inputs of an addition): each must be summed exactly once.
        grads.insert("c".into(), grads["c"].to_dtype(DType::F64).unwrap());
        grads.insert("e".into(), grads["d"].clone());
        let before: BTreeMap<String, Vec<f32>> = grads
            .iter()
            .map(|(n, t)| {
                let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                (n.clone(), v.to_vec1().unwrap())
            })
            .collect();
        let comm = IdenticalOnDevice {
            size: 3,
            calls: Mutex::new(Vec::new()),
        };
        all_reduce_gradients(&comm, &mut grads, 8).unwrap();
        // Buckets: a+b (7), c (5), d (11), e (11).
        assert_eq!(*comm.calls.lock().unwrap(), vec![7, 5, 11, 11]);
        for (name, t) in &grads {
            let got: Vec<f32> = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = before[name].iter().map(|x| x * 3.0).collect();
            assert_eq!(got, want, "{name}");
        }
        assert_eq!(grads["b"].dims(), &[2, 2]);
        assert_eq!(grads["c"].dtype(), DType::F64);
        assert_eq!(grads["d"].dims(), &[11]);
        // A backend that runs alone reduces in a world of one too.
        let single = IdenticalOnDevice {
            size: 1,
            calls: Mutex::new(Vec::new()),
        };
        all_reduce_gradients(&single, &mut grads, 100).unwrap();
        assert_eq!(*single.calls.lock().unwrap(), vec![34]);
    }

    #[test]
    fn flatten_and_split_round_trip() {
        let device = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &device)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[7f64, 8.0], &device).unwrap();
        let flat = flatten_fresh(&[&a, &b]).unwrap();
        assert_eq!(
            flat.to_vec1::<f32>().unwrap(),
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 8.0]
        );
        let back = split_like(&flat, &[&a, &b]).unwrap();
        assert_eq!(
            back[0].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(back[1].dtype(), DType::F64);
        assert_eq!(back[1].to_vec1::<f64>().unwrap(), vec![7.0, 8.0]);
        // One contiguous f32 tensor still gets storage of its own.
        let alone = flatten_fresh(&[&a]).unwrap();
        alone.inplace_op1(&Scale(2.0)).unwrap();
        assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap()[5], 5.0);
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

    /// Gradients of odd sizes (3, 2×2, 5, 11: one larger than an 8-element bucket), `b`
    /// transposed so it is not contiguous; element j of the i-th is `i·100 + j + offset`.
    fn odd_shaped_grads(offset: f32) -> BTreeMap<String, Tensor> {
        let mut grads = BTreeMap::new();
        let shapes: [(&str, &[usize]); 4] =
            [("a", &[3]), ("b", &[2, 2]), ("c", &[5]), ("d", &[11])];
        for (i, (name, shape)) in shapes.iter().enumerate() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|j| (i * 100 + j) as f32 + offset).collect();
            grads.insert(
                name.to_string(),
                Tensor::from_vec(values, *shape, &Device::Cpu).unwrap(),
            );
        }
        grads.insert("b".into(), grads["b"].t().unwrap());
        grads
    }

    #[test]
    fn gradients_are_summed_bucket_by_bucket_and_keep_their_shapes() {
        // Odd sizes, a non-contiguous tensor and one larger than a bucket.
        let mut grads = odd_shaped_grads(0.5);
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
