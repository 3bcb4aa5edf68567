//! Data parallelism across processes: the world (rank, size, rank on the node), the
//! communicator that all-reduces and gathers, gradient buckets, and who does which share of the
//! work. The training loop and the inference commands only ask "all-reduce these buffers" and
//! "which of these batches are mine"; everything launcher- and backend-specific stays here.
//!
//! A process belongs to one world for its whole life. `init` (called once by the binary, before
//! any work) picks the backend (`dist::backend`): NCCL for a launched CUDA run of a
//! `--features nccl` build, MPI when an MPI launcher started a `--features mpi` build; otherwise,
//! and in library code that never calls `init` (tests), the world is this process alone, so
//! every collective is the identity and the single-process behaviour is unchanged.
//!
//! Failure: an error in any rank ends the whole job (`WorldGuard::fail` aborts the communicator:
//! `ncclCommAbort` and/or `MPI_Abort`, and a panic does too), so no rank waits forever in a
//! collective; a rank that dies outright is reaped by the launcher (mpirun kills the others when
//! one exits abnormally; Slurm with `--kill-on-bad-exit`; torchrun stops the group when a worker
//! fails). See docs/DISTRIBUTED.md.

pub mod backend;
pub mod buckets;
pub mod communicator;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod shard;
pub mod world;

use std::sync::OnceLock;

pub use buckets::{all_reduce_gradients, DEFAULT_BUCKET_ELEMENTS};
pub use communicator::{Communicator, ReduceOp, SingleProcess};
pub use shard::{all_map, share_of};
pub use world::LaunchEnv;

use crate::error::{Error, Result};

/// This process's place in the job.
pub struct World {
    comm: Box<dyn Communicator>,
    local_rank: usize,
}

impl World {
    fn single(local_rank: usize) -> Self {
        World {
            comm: Box::new(SingleProcess),
            local_rank,
        }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Rank among the processes of this node (the GPU index of a multi-GPU node).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Rank 0: the one process that writes logs, metrics, checkpoints and outputs.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// `[rank R/N] ` in a multi-process world (prefix of a non-main rank's log lines), else empty.
    pub fn log_prefix(&self) -> String {
        if self.size() > 1 {
            format!("[rank {}/{}] ", self.rank(), self.size())
        } else {
            String::new()
        }
    }
}

static WORLD: OnceLock<World> = OnceLock::new();

/// The world of this process: the one `init` joined, or this process alone.
pub fn world() -> &'static World {
    WORLD.get_or_init(|| World::single(0))
}

/// Keeps MPI initialised while it lives and finalises it when dropped (the end of `main`).
pub struct WorldGuard {
    #[cfg(feature = "mpi")]
    _universe: Option<::mpi::environment::Universe>,
}

impl WorldGuard {
    /// Ends the job after an error in this process: the communicator's abort in a
    /// multi-process world (`MPI_Abort`, or `ncclCommAbort` then exit: every rank exits, none
    /// waits in a collective for this one), else an ordinary exit.
    pub fn fail(self, code: i32) -> ! {
        let world = world();
        if world.size() > 1 {
            world.comm().abort(code);
        }
        // A world of one under a launcher finalises MPI first (mpirun reports a process that
        // exits without MPI_Finalize as a failure of its own).
        #[cfg(feature = "mpi")]
        drop(self);
        std::process::exit(code)
    }
}

/// Joins the world this process was launched into. Call once, first thing in `main`.
pub fn init() -> Result<WorldGuard> {
    let env = LaunchEnv::from_env()?;
    // The model's device decides between NCCL and MPI. Only CPU-or-GPU matters here (the GPU
    // index needs the local rank, which MPI may only know once joined); a FERROTUNE_DEVICE
    // that does not parse counts as the CPU and is reported where the device is opened.
    let gpu = matches!(
        crate::device::this_process(env.local_rank.unwrap_or(0)),
        Ok(crate::device::Choice::Cuda(_))
    );
    let chosen = backend::choose(
        &env,
        std::env::var(backend::BACKEND_VAR).ok().as_deref(),
        backend::Capabilities::of_this_build(gpu),
    )?;

    #[cfg(feature = "mpi")]
    let (universe, mpi_world) = if chosen != backend::Backend::Single && env.wants_mpi() {
        let (universe, _) = ::mpi::initialize_with_threading(::mpi::Threading::Funneled)
            .ok_or_else(|| {
                Error::invalid("MPI was initialised twice (dist::init is called once, in main)")
            })?;
        let comm = mpi::MpiCommunicator::world();
        // Before NCCL too: processes that MPI sees as N worlds of one would otherwise form N
        // NCCL worlds of one and train N copies.
        env.check_size(comm.size(), "mpi")?;
        (Some(universe), Some(comm))
    } else {
        (None, None)
    };
    #[cfg(feature = "mpi")]
    let local_rank = env
        .local_rank
        .unwrap_or_else(|| mpi_world.as_ref().map_or(0, |c| c.node_local_rank()));
    #[cfg(not(feature = "mpi"))]
    let local_rank = env.local_rank.unwrap_or(0);

    let comm: Box<dyn Communicator> = match chosen {
        backend::Backend::Single => {
            env.check_size(1, "single")?;
            Box::new(SingleProcess)
        }
        backend::Backend::Mpi => {
            #[cfg(feature = "mpi")]
            {
                Box::new(mpi_world.ok_or_else(|| {
                    Error::invalid("the MPI backend was chosen without an MPI launcher")
                })?)
            }
            #[cfg(not(feature = "mpi"))]
            return Err(Error::invalid("this binary has no MPI backend"));
        }
        backend::Backend::Nccl => {
            #[cfg(feature = "nccl")]
            {
                let ordinal = match crate::device::this_process(local_rank)? {
                    crate::device::Choice::Cuda(n) => n,
                    crate::device::Choice::Cpu => {
                        return Err(Error::invalid(
                            "the NCCL backend needs the model on a CUDA device",
                        ))
                    }
                };
                let comm = nccl::NcclCommunicator::init(
                    &env,
                    ordinal,
                    #[cfg(feature = "mpi")]
                    mpi_world,
                )?;
                env.check_size(comm.size(), "nccl")?;
                Box::new(comm)
            }
            #[cfg(not(feature = "nccl"))]
            return Err(Error::invalid("this binary has no NCCL backend"));
        }
    };
    let size = comm.size();
    install(World { comm, local_rank })?;
    #[cfg(any(feature = "mpi", feature = "nccl"))]
    if size > 1 {
        abort_on_panic();
    }
    #[cfg(not(any(feature = "mpi", feature = "nccl")))]
    let _ = size;
    Ok(WorldGuard {
        #[cfg(feature = "mpi")]
        _universe: universe,
    })
}

fn install(world: World) -> Result<()> {
    WORLD
        .set(world)
        .map_err(|_| Error::invalid("dist::init was called after the world was already in use"))
}

/// A panic in one rank aborts the job, so the other ranks do not hang in their next collective.
#[cfg(any(feature = "mpi", feature = "nccl"))]
fn abort_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let world = world();
        eprintln!("{}panicked: aborting the job", world.log_prefix());
        world.comm().abort(101);
    }));
}

/// Whether every rank holds the same `value` (e.g. a fingerprint of the run's config and data):
/// ranks that disagree would silently train different things, or deadlock.
pub fn agree(value: u64) -> Result<bool> {
    let world = world();
    if world.size() == 1 {
        return Ok(true);
    }
    // f64 holds integers below 2^53 exactly; max(v) == -max(-v) iff all ranks agree.
    let v = (value & ((1u64 << 52) - 1)) as f64;
    let mut buf = [v, -v];
    world.comm().all_reduce_f64(&mut buf, ReduceOp::Max)?;
    Ok(buf[0] == -buf[1])
}
