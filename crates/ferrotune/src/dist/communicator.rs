//! The collective operations data parallelism needs, behind one trait: in-place all-reduce of
//! f32/f64 buffers, all-gather of byte strings, and abort. `SingleProcess` is the world of one
//! process (every collective is the identity); `dist::mpi` implements it over MPI.
//!
//! Not here: bucketing of gradients (`dist::buckets`), deciding who does which work
//! (`dist::shard`), finding the world (`dist::world`).
//!
//! An NCCL backend (GPU, a `nccl` feature, not built yet) fits beside it: gradient buckets
//! become flat device tensors reduced in place by `ncclAllReduce`, so gradients never visit the
//! host, while this trait's host collectives stay on MPI; docs/DISTRIBUTED.md has the plan.

use crate::error::Result;

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
    /// The backend's name for logs: `single` or `mpi`.
    fn backend(&self) -> &'static str;
    /// Reduces `buf` element-wise across all ranks, in place: every rank ends with the result.
    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()>;
    /// Every rank's `bytes`, in rank order, on every rank.
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Ends every process of the job with `code` (MPI_Abort); in a world of one, this process.
    fn abort(&self, code: i32) -> !;
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
