//! The NCCL backend of `Communicator` (`--features nccl`), through the NCCL bindings of the
//! cudarc that candle re-exports.
//!
//! Gradients: `all_reduce_tensor_sum` runs one in-place `ncclAllReduce` on a flat CUDA tensor,
//! on the stream candle computes on, so it is ordered after the backward pass without a host
//! wait and the gradients never leave the GPU. Host collectives (loss and metric sums, shard
//! results): over MPI when an MPI launcher started the job (small messages, and MPI is up
//! anyway); otherwise staged through the GPU (copy in, NCCL collective, copy out), so a job
//! launched with the torchrun variables alone still has every collective.
//!
//! The unique id: rank 0 makes it and MPI carries it, or every rank derives it from
//! `NCCL_COMM_ID` (`dist::backend` has the rules and the reasons). cudarc's safe `Comm` hides its
//! handle and panics when dropping it fails, so this file keeps the raw `ncclComm_t` and calls
//! cudarc's `result` layer, which returns errors.
//!
//! Threads: NCCL calls on one communicator must not overlap, so every call holds `lock`; in
//! practice only the main thread calls (the compute thread pools never do).

use std::ffi::{c_void, CStr};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::cuda_backend::cudarc;
use candle_core::{CudaStorage, DType, Device, Layout, Tensor};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};

use super::backend::{self, IdSource};
use super::communicator::{Communicator, ReduceOp};
use super::world::LaunchEnv;
use crate::error::{Error, Result};

pub struct NcclCommunicator {
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
    /// The GPU this rank's communicator is bound to.
    ordinal: usize,
    ctx: Arc<CudaContext>,
    /// The calling thread's default stream: candle's device computes on the same one
    /// (`CudaContext::per_thread_stream`), so staged copies and collectives are ordered with
    /// the model's kernels.
    stream: Arc<CudaStream>,
    lock: Mutex<()>,
    /// MPI, when an MPI launcher started the job: host collectives and abort go through it.
    #[cfg(feature = "mpi")]
    mpi: Option<super::mpi::MpiCommunicator>,
}

// Safety: `comm` is an opaque handle owned by this value; NCCL allows a communicator to be used
// from any thread as long as calls do not overlap, which `lock` guarantees.
unsafe impl Send for NcclCommunicator {}
unsafe impl Sync for NcclCommunicator {}

/// NCCL's own words for a result code.
fn describe(code: sys::ncclResult_t) -> String {
    // Safety: ncclGetErrorString returns a static NUL-terminated string for any code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(code)) };
    format!("{} ({code:?})", text.to_string_lossy())
}

fn check(what: &str, r: std::result::Result<nccl::NcclStatus, nccl::NcclError>) -> Result<()> {
    r.map(|_| ())
        .map_err(|e| Error::invalid(format!("NCCL {what} failed: {}", describe(e.0))))
}

fn cuda(what: &str, r: std::result::Result<(), cudarc::driver::DriverError>) -> Result<()> {
    r.map_err(|e| Error::invalid(format!("CUDA {what} failed: {e}")))
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

/// This rank's own bootstrap id (the same on every rank when NCCL_COMM_ID is set).
fn own_id() -> Result<sys::ncclUniqueId> {
    nccl::get_uniqueid()
        .map_err(|e| Error::invalid(format!("ncclGetUniqueId failed: {}", describe(e.0))))
}

/// Rank 0's bootstrap id, carried to every rank by MPI (an all-gather where only rank 0 sends).
#[cfg(feature = "mpi")]
fn id_over_mpi(mpi: &super::mpi::MpiCommunicator, rank: usize) -> Result<sys::ncclUniqueId> {
    let mine: Vec<u8> = if rank == 0 {
        own_id()?.internal.iter().map(|&c| c as u8).collect()
    } else {
        Vec::new()
    };
    let all = mpi.all_gather_bytes(&mine)?;
    let root = &all[0];
    let mut internal = [0 as std::ffi::c_char; 128];
    if root.len() != internal.len() {
        return Err(Error::invalid(format!(
            "the NCCL unique id from rank 0 has {} bytes, not 128",
            root.len()
        )));
    }
    for (dst, &src) in internal.iter_mut().zip(root) {
        *dst = src as std::ffi::c_char;
    }
    Ok(sys::ncclUniqueId { internal })
}

impl NcclCommunicator {
    /// Joins the NCCL world on GPU `ordinal`. `mpi`: MPI's world when an MPI launcher started
    /// the job (rank, size and the unique id come from it), else the launcher's variables in
    /// `env` (and `NCCL_COMM_ID` or `MASTER_ADDR:MASTER_PORT`).
    pub fn init(
        env: &LaunchEnv,
        ordinal: usize,
        #[cfg(feature = "mpi")] mpi: Option<super::mpi::MpiCommunicator>,
    ) -> Result<Self> {
        let gpus = CudaContext::device_count().map_err(|e| {
            Error::invalid(format!(
                "the NCCL backend needs a CUDA GPU, but the CUDA driver reports none ({e}); run on the CPU with FERROTUNE_DEVICE=cpu"
            ))
        })?;
        if ordinal >= gpus.max(0) as usize {
            return Err(Error::invalid(format!(
                "the NCCL backend puts this rank on cuda:{ordinal} (its local rank, or FERROTUNE_DEVICE), but this node has {gpus} GPU(s): start at most {gpus} ranks per node"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::invalid(format!("cannot open CUDA device {ordinal}: {e}")))?;
        cuda("binding the device", ctx.bind_to_thread())?;
        let stream = ctx.per_thread_stream();

        #[cfg(feature = "mpi")]
        let from_mpi = mpi.as_ref().map(|m| (m.rank(), m.size()));
        #[cfg(not(feature = "mpi"))]
        let from_mpi: Option<(usize, usize)> = None;
        let (rank, size, hint) = match from_mpi {
            Some((rank, size)) => (rank, size, String::new()),
            None => {
                let (rank, size) = backend::rank_and_size(env)?;
                let set = std::env::var("NCCL_COMM_ID").ok();
                let hint = match backend::id_source(env, size, set.as_deref())? {
                    IdSource::CommId { value, derived } => {
                        if derived {
                            // Read by ncclGetUniqueId and ncclCommInitRank below; dist::init
                            // runs first thing in main, before any other thread exists.
                            std::env::set_var("NCCL_COMM_ID", &value);
                        }
                        format!(
                            " (NCCL_COMM_ID={value}: rank 0 listens there, so the port must be free on rank 0's host and reachable from every rank)"
                        )
                    }
                    IdSource::Private => String::new(),
                };
                (rank, size, hint)
            }
        };
        #[cfg(feature = "mpi")]
        let id = match mpi.as_ref() {
            Some(mpi) => id_over_mpi(mpi, rank)?,
            None => own_id()?,
        };
        #[cfg(not(feature = "mpi"))]
        let id = own_id()?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // Safety: `comm` is a valid out-pointer; the device is bound to this thread.
        let r = unsafe { nccl::comm_init_rank(&mut comm, size as i32, id, rank as i32) };
        check(&format!("init of rank {rank} of {size}"), r)
            .map_err(|e| Error::invalid(format!("{e}{hint}")))?;
        // Ranks that disagree on the world size form no communicator: rank 0's bootstrap root
        // rejects the mismatch (the ranks then wait until the launcher ends them). The size
        // against the launcher's is checked by dist::init (and MPI's, before this).
        Ok(NcclCommunicator {
            comm,
            rank,
            size,
            ordinal,
            ctx,
            stream,
            lock: Mutex::new(()),
            #[cfg(feature = "mpi")]
            mpi,
        })
    }

    fn guard(&self) -> Result<MutexGuard<'_, ()>> {
        // A poisoned lock only means a panic elsewhere; the handle itself is still valid.
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        cuda("binding the device", self.ctx.bind_to_thread())?;
        Ok(guard)
    }

    /// `ncclAllReduce` of a host buffer, through a device copy of it.
    fn staged_all_reduce<T>(
        &self,
        buf: &mut [T],
        dtype: sys::ncclDataType_t,
        op: ReduceOp,
    ) -> Result<()>
    where
        T: cudarc::driver::DeviceRepr,
    {
        if buf.is_empty() {
            return Ok(());
        }
        let _guard = self.guard()?;
        let mut dev = self
            .stream
            .clone_htod(&*buf)
            .map_err(|e| Error::invalid(format!("CUDA copy to the device failed: {e}")))?;
        {
            let (ptr, _written) = dev.device_ptr_mut(&self.stream);
            // Safety: `ptr` addresses `buf.len()` elements of `dtype` on this communicator's
            // device; in place (send == receive) is allowed by NCCL.
            let r = unsafe {
                nccl::all_reduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    buf.len(),
                    dtype,
                    nccl_op(op),
                    self.comm,
                    self.stream.cu_stream() as sys::cudaStream_t,
                )
            };
            check("all-reduce", r)?;
        }
        cuda("copy to the host", self.stream.memcpy_dtoh(&dev, buf))?;
        cuda("stream synchronize", self.stream.synchronize())
    }

    /// `ncclAllGather` of `count` elements per rank from `send` (a device buffer) into a new
    /// host vector of `size * count` elements, in rank order.
    fn staged_all_gather<T>(&self, send: &[T], dtype: sys::ncclDataType_t) -> Result<Vec<T>>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        let count = send.len();
        let dev_send = self
            .stream
            .clone_htod(send)
            .map_err(|e| Error::invalid(format!("CUDA copy to the device failed: {e}")))?;
        let mut dev_recv = self
            .stream
            .alloc_zeros::<T>(count * self.size)
            .map_err(|e| Error::invalid(format!("CUDA allocation failed: {e}")))?;
        {
            let (src, _read) = dev_send.device_ptr(&self.stream);
            let (dst, _written) = dev_recv.device_ptr_mut(&self.stream);
            // Safety: `src` holds `count` elements and `dst` `size * count`, both on this
            // communicator's device.
            let r = unsafe {
                nccl::all_gather(
                    src as *const c_void,
                    dst as *mut c_void,
                    count,
                    dtype,
                    self.comm,
                    self.stream.cu_stream() as sys::cudaStream_t,
                )
            };
            check("all-gather", r)?;
        }
        let out = self
            .stream
            .clone_dtoh(&dev_recv)
            .map_err(|e| Error::invalid(format!("CUDA copy to the host failed: {e}")))?;
        cuda("stream synchronize", self.stream.synchronize())?;
        Ok(out)
    }
}

/// The in-place sum of a flat f32 CUDA tensor, run by candle with the tensor's storage locked
/// for writing.
struct SumInPlace<'a> {
    comm: &'a NcclCommunicator,
}

impl candle_core::InplaceOp1 for SumInPlace<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        _storage: &mut candle_core::CpuStorage,
        _layout: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("the NCCL all-reduce takes CUDA tensors, not CPU ones")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce takes a contiguous tensor");
        };
        let stream = storage.device.cuda_stream();
        let ordinal = stream.context().ordinal();
        if ordinal != self.comm.ordinal {
            candle_core::bail!(
                "gradients on cuda:{ordinal}, but this rank's NCCL communicator is on cuda:{} (FERROTUNE_DEVICE and the local rank disagree)",
                self.comm.ordinal
            );
        }
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        let mut view = slice.slice_mut(start..end);
        let (ptr, _written) = view.device_ptr_mut(&stream);
        // Safety: `ptr` addresses `end - start` f32 values on the communicator's device, and
        // the collective is queued on the stream that produced them.
        let r = unsafe {
            nccl::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                end - start,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm.comm,
                stream.cu_stream() as sys::cudaStream_t,
            )
        };
        r.map(|_| ()).map_err(|e| {
            candle_core::Error::Msg(format!(
                "NCCL all-reduce of {} gradient values failed: {}",
                end - start,
                describe(e.0)
            ))
        })
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            return mpi.all_reduce_f32(buf, op);
        }
        self.staged_all_reduce(buf, sys::ncclDataType_t::ncclFloat32, op)
    }

    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            return mpi.all_reduce_f64(buf, op);
        }
        self.staged_all_reduce(buf, sys::ncclDataType_t::ncclFloat64, op)
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            return mpi.all_gather_bytes(bytes);
        }
        let _guard = self.guard()?;
        // NCCL gathers equal counts: first every rank's length, then every payload padded to
        // the longest.
        let lengths =
            self.staged_all_gather(&[bytes.len() as u64], sys::ncclDataType_t::ncclUint64)?;
        let longest = lengths.iter().copied().max().unwrap_or(0) as usize;
        if longest == 0 {
            return Ok(vec![Vec::new(); self.size]);
        }
        let mut padded = bytes.to_vec();
        padded.resize(longest, 0);
        let all = self.staged_all_gather(&padded, sys::ncclDataType_t::ncclUint8)?;
        Ok(lengths
            .iter()
            .enumerate()
            .map(|(r, &n)| all[r * longest..r * longest + n as usize].to_vec())
            .collect())
    }

    fn abort(&self, code: i32) -> ! {
        // No lock: abort is what unblocks a rank stuck inside a collective (a panic hook may
        // run while the lock is held).
        // Safety: `comm` is valid until here, and nothing uses it after.
        let _ = unsafe { nccl::comm_abort(self.comm) };
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            mpi.abort(code);
        }
        std::process::exit(code)
    }

    fn reduces_on(&self, device: &Device) -> bool {
        device.is_cuda()
    }

    fn all_reduce_tensor_sum(&self, flat: &Tensor) -> Result<()> {
        if flat.dtype() != DType::F32 || flat.rank() != 1 {
            return Err(Error::invalid(format!(
                "the NCCL gradient all-reduce takes a flat f32 tensor, got {:?} of shape {:?}",
                flat.dtype(),
                flat.dims()
            )));
        }
        if flat.elem_count() == 0 {
            return Ok(());
        }
        let _guard = self.guard()?;
        flat.inplace_op1(&SumInPlace { comm: self })?;
        Ok(())
    }

    fn runs_alone(&self) -> bool {
        true
    }
}
