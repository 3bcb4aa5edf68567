//! The MPI backend of `Communicator` (`--features mpi`), through the `mpi` crate (rsmpi).
//!
//! rsmpi's safe API has no in-place all-reduce, and a gradient all-reduce that needs a second
//! buffer of the same size doubles its memory. So `all_reduce_*` call `MPI_Allreduce` with
//! `MPI_IN_PLACE` through the crate's ffi; `MPI_IN_PLACE` is a macro, handed out by the C shim
//! `mpi_in_place.c` that build.rs compiles with the MPI compiler wrapper. MPI counts are C
//! `int`, and some implementations mishandle messages of 2 GiB or more, so buffers go in chunks
//! of fewer than 2^31 bytes (`max_bytes_per_call`, lowered by the tests to exercise the path).
//!
//! MPI is initialised with `MPI_THREAD_FUNNELED`: the compute thread pools never call MPI,
//! only the main thread does.

use std::ffi::{c_int, c_void};

use ::mpi::ffi;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::{AsRaw, Communicator as _, CommunicatorCollectives};

use super::communicator::{Communicator, ReduceOp};
use crate::error::{Error, Result};

extern "C" {
    /// `MPI_IN_PLACE` of the MPI implementation this crate was built against (mpi_in_place.c).
    fn ferrotune_mpi_in_place() -> *mut c_void;
}

/// The largest message of one MPI call: just under 2 GiB.
pub const DEFAULT_MAX_BYTES_PER_CALL: usize = (1 << 31) - 1;

pub struct MpiCommunicator {
    rank: usize,
    size: usize,
    /// Bytes per `MPI_Allreduce` call at most; larger buffers go in several calls.
    pub max_bytes_per_call: usize,
}

impl MpiCommunicator {
    /// The communicator of `MPI_COMM_WORLD`; MPI must be initialised.
    pub fn world() -> Self {
        let world = SimpleCommunicator::world();
        MpiCommunicator {
            rank: world.rank() as usize,
            size: world.size() as usize,
            max_bytes_per_call: DEFAULT_MAX_BYTES_PER_CALL,
        }
    }

    /// Ranks on this node before this one (`MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)`): the
    /// GPU index of a multi-GPU node.
    pub fn node_local_rank(&self) -> usize {
        SimpleCommunicator::world().split_shared(0).rank() as usize
    }

    fn all_reduce_raw<T>(
        &self,
        buf: &mut [T],
        datatype: ffi::MPI_Datatype,
        op: ReduceOp,
    ) -> Result<()> {
        if self.size == 1 || buf.is_empty() {
            return Ok(());
        }
        let op = unsafe {
            match op {
                ReduceOp::Sum => ffi::RSMPI_SUM,
                ReduceOp::Max => ffi::RSMPI_MAX,
            }
        };
        let per_call =
            (self.max_bytes_per_call / std::mem::size_of::<T>()).clamp(1, c_int::MAX as usize);
        let world = SimpleCommunicator::world();
        for chunk in buf.chunks_mut(per_call) {
            // Safety: MPI is initialised (a world exists), `chunk` is a live, exclusively
            // borrowed buffer of `chunk.len()` elements of `datatype`, and MPI_IN_PLACE makes
            // it both the send and the receive buffer.
            let rc = unsafe {
                ffi::MPI_Allreduce(
                    ferrotune_mpi_in_place(),
                    chunk.as_mut_ptr().cast::<c_void>(),
                    chunk.len() as c_int,
                    datatype,
                    op,
                    world.as_raw(),
                )
            };
            if rc != 0 {
                return Err(Error::invalid(format!(
                    "MPI_Allreduce of {} elements failed with MPI error {rc}",
                    chunk.len()
                )));
            }
        }
        Ok(())
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.all_reduce_raw(buf, unsafe { ffi::RSMPI_FLOAT }, op)
    }

    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        self.all_reduce_raw(buf, unsafe { ffi::RSMPI_DOUBLE }, op)
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        use ::mpi::datatype::PartitionMut;
        let world = SimpleCommunicator::world();
        let len = c_int::try_from(bytes.len()).map_err(|_| {
            Error::invalid(format!(
                "all-gather of {} bytes from one rank: the limit is 2 GiB",
                bytes.len()
            ))
        })?;
        let mut counts = vec![0 as c_int; self.size];
        world.all_gather_into(&len, &mut counts[..]);
        let mut displs = Vec::with_capacity(self.size);
        let mut total: usize = 0;
        for &c in &counts {
            displs.push(c_int::try_from(total).map_err(|_| {
                Error::invalid("all-gather of more than 2 GiB in total".to_string())
            })?);
            total += c as usize;
        }
        let mut all = vec![0u8; total];
        {
            let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            world.all_gather_varcount_into(bytes, &mut partition);
        }
        let mut out = Vec::with_capacity(self.size);
        for (&c, &d) in counts.iter().zip(&displs) {
            out.push(all[d as usize..d as usize + c as usize].to_vec());
        }
        Ok(out)
    }

    fn abort(&self, code: i32) -> ! {
        SimpleCommunicator::world().abort(code)
    }
}
