//! The collective operations data parallelism needs, behind one trait: in-place all-reduce of
//! f32/f64 host buffers, all-gather of byte strings, abort, and, for backends that can, the
//! in-place sum of a flat tensor where it lives (a GPU). `SingleProcess` is the world of one
//! process (every collective is the identity); `dist::mpi` implements the trait over MPI and
//! `dist::nccl` over NCCL.
//!
//! Not here: bucketing of gradients (`dist::buckets`), deciding who does which work
//! (`dist::shard`), finding the world (`dist::world`), choosing the backend (`dist::backend`).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// The element-wise reduction of an all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

pub trait Communicator: Send + Sync {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// The backend's name for logs: `single`, `mpi` or `nccl`.
    fn backend(&self) -> &'static str;
    /// Reduces `buf` element-wise across all ranks, in place: every rank ends with the result.
    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()>;
    /// Every rank's `bytes`, in rank order, on every rank.
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Ends every process of the job with `code` (MPI_Abort); in a world of one, this process.
    fn abort(&self, code: i32) -> !;

    /// Whether `all_reduce_tensor_sum` takes tensors on `device` (so gradients there are summed
    /// without a copy to the host).
    fn reduces_on(&self, _device: &Device) -> bool {
        false
    }

    /// Sums `flat` (contiguous, one dimension, f32, on a device `reduces_on` accepts) across
    /// all ranks, in place. The caller owns `flat` alone: no other tensor shares its storage.
    fn all_reduce_tensor_sum(&self, flat: &Tensor) -> Result<()> {
        Err(Error::invalid(format!(
            "the {} backend cannot all-reduce a tensor on {:?}",
            self.backend(),
            flat.device().location()
        )))
    }

    /// Whether the collectives run even in a world of one. NCCL's do, so a one-GPU run started
    /// with the launcher variables goes through the same path (and costs) as N GPUs.
    fn runs_alone(&self) -> bool {
        false
    }
}

/// The world of one process: no launcher, or a build without `mpi`.
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn backend(&self) -> &'static str {
        "single"
    }

    fn all_reduce_f32(&self, _buf: &mut [f32], _op: ReduceOp) -> Result<()> {
        Ok(())
    }

    fn all_reduce_f64(&self, _buf: &mut [f64], _op: ReduceOp) -> Result<()> {
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
