//! Which collective library forms the world, and how NCCL finds its peers: decisions over the
//! launch environment only, kept apart from the libraries so they are tested without MPI, NCCL
//! or a GPU.
//!
//! The backend: NCCL when the binary has it (`--features nccl`), a launcher started the process
//! and the model goes to a CUDA device; MPI when an MPI launcher started a `--features mpi`
//! binary; else the process alone. `FERROTUNE_DIST_BACKEND=mpi|nccl` overrides the choice (`mpi`
//! keeps a CUDA run's collectives on the host, e.g. to compare the two).
//!
//! NCCL's bootstrap needs one 128-byte unique id shared by every rank. With MPI up, rank 0 makes
//! it and MPI carries it. Without MPI (torchrun conventions), every rank makes "the same" id from
//! `NCCL_COMM_ID=<host>:<port>`: with that variable set, `ncclGetUniqueId` only encodes the
//! address (and a fixed magic) instead of opening a socket, and `ncclCommInitRank` on rank 0
//! listens there (NCCL's src/bootstrap.cc and src/init.cc). An `NCCL_COMM_ID` the user set wins;
//! otherwise it is derived from `MASTER_ADDR:MASTER_PORT`.

use super::world::LaunchEnv;
use crate::error::{Error, Result};

/// The variable that overrides the backend choice.
pub const BACKEND_VAR: &str = "FERROTUNE_DIST_BACKEND";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// This process alone: every collective is the identity.
    Single,
    /// MPI over the host (CPU runs, or a CUDA run told `FERROTUNE_DIST_BACKEND=mpi`).
    Mpi,
    /// NCCL on the GPU, with MPI beside it when an MPI launcher started the job.
    Nccl,
}

/// What the binary was built with and where the model goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub mpi: bool,
    pub nccl: bool,
    /// The model's device is a CUDA GPU (`device::Choice::Cuda`).
    pub gpu: bool,
}

impl Capabilities {
    /// This binary's features; `gpu` from the device choice.
    pub fn of_this_build(gpu: bool) -> Self {
        Capabilities {
            mpi: cfg!(feature = "mpi"),
            nccl: cfg!(feature = "nccl"),
            gpu,
        }
    }
}

/// The backend for a process started as `env` describes; `requested` is `FERROTUNE_DIST_BACKEND`.
pub fn choose(env: &LaunchEnv, requested: Option<&str>, can: Capabilities) -> Result<Backend> {
    let requested = requested.map(|r| r.trim().to_ascii_lowercase());
    match requested.as_deref() {
        None | Some("") | Some("auto") => {
            // A process nobody launched stays alone even in an NCCL build: one GPU needs no
            // communicator (and no NCCL_COMM_ID port).
            let launched = env.mpi_launcher || env.expected_size.is_some();
            if can.nccl && can.gpu && launched {
                Ok(Backend::Nccl)
            } else if can.mpi && env.wants_mpi() {
                Ok(Backend::Mpi)
            } else {
                Ok(Backend::Single)
            }
        }
        Some("nccl") => {
            if !can.nccl {
                return Err(Error::invalid(format!(
                    "{BACKEND_VAR}=nccl, but this binary was built without the `nccl` feature (FERROTUNE_GPU_FEATURES=cuda,nccl scripts/gpu/build.sh)"
                )));
            }
            if !can.gpu {
                return Err(Error::invalid(format!(
                    "{BACKEND_VAR}=nccl needs the model on a CUDA device, but FERROTUNE_DEVICE puts it on the CPU"
                )));
            }
            Ok(Backend::Nccl)
        }
        Some("mpi") => {
            if !can.mpi {
                return Err(Error::invalid(format!(
                    "{BACKEND_VAR}=mpi, but this binary was built without the `mpi` feature"
                )));
            }
            // Without an MPI launcher there is no MPI world to join: alone, and the size check
            // reports a launcher that announced more processes.
            Ok(if env.wants_mpi() {
                Backend::Mpi
            } else {
                Backend::Single
            })
        }
        Some(other) => Err(Error::invalid(format!(
            "{BACKEND_VAR}={other}: expected auto, mpi or nccl"
        ))),
    }
}

/// Where a rank without MPI gets the NCCL unique id from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSource {
    /// `NCCL_COMM_ID` (`derived`: set by ferrotune from `MASTER_ADDR:MASTER_PORT`, so it must be
    /// exported before `ncclGetUniqueId`).
    CommId { value: String, derived: bool },
    /// A world of one without an address: the rank makes a private id (NCCL picks a port).
    Private,
}

/// The id source of a rank that has no MPI; `comm_id` is `NCCL_COMM_ID` as set.
pub fn id_source(env: &LaunchEnv, size: usize, comm_id: Option<&str>) -> Result<IdSource> {
    if let Some(value) = comm_id.map(str::trim).filter(|v| !v.is_empty()) {
        return Ok(IdSource::CommId {
            value: value.to_string(),
            derived: false,
        });
    }
    if let Some((addr, port)) = &env.master {
        return Ok(IdSource::CommId {
            value: comm_id_of(addr, *port),
            derived: true,
        });
    }
    if size == 1 {
        return Ok(IdSource::Private);
    }
    Err(Error::invalid(format!(
        "the NCCL backend without MPI finds its {size} ranks through MASTER_ADDR and MASTER_PORT (or NCCL_COMM_ID=host:port): set them, or start the job with mpirun/srun and a build with --features mpi,nccl"
    )))
}

/// `host:port` as NCCL_COMM_ID spells it (an IPv6 literal in brackets).
pub fn comm_id_of(addr: &str, port: u16) -> String {
    if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// Rank and world size of an NCCL rank that has no MPI, from the launcher's variables.
pub fn rank_and_size(env: &LaunchEnv) -> Result<(usize, usize)> {
    let (size, size_var) = env.expected_size.unwrap_or((1, "WORLD_SIZE"));
    if size == 0 {
        return Err(Error::invalid(format!(
            "{size_var}=0: a world has at least one process"
        )));
    }
    let rank = match env.rank {
        Some(r) => r,
        None if size == 1 => 0,
        None => {
            return Err(Error::invalid(format!(
                "{size_var}={size}, but no RANK (or OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID) says which process this is"
            )))
        }
    };
    if rank >= size {
        return Err(Error::invalid(format!(
            "rank {rank} is outside a world of {size_var}={size} processes"
        )));
    }
    Ok((rank, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> LaunchEnv {
        LaunchEnv::from_pairs(pairs)
    }

    const ALL: Capabilities = Capabilities {
        mpi: true,
        nccl: true,
        gpu: true,
    };

    #[test]
    fn nccl_is_chosen_for_launched_gpu_runs_only() {
        let torchrun = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]);
        let mpirun = env(&[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "0")]);
        let plain = env(&[]);
        assert_eq!(choose(&torchrun, None, ALL).unwrap(), Backend::Nccl);
        assert_eq!(choose(&mpirun, None, ALL).unwrap(), Backend::Nccl);
        // One GPU, no launcher: no communicator at all.
        assert_eq!(choose(&plain, None, ALL).unwrap(), Backend::Single);
        // Model on the CPU (FERROTUNE_DEVICE=cpu): MPI under mpirun, alone under torchrun.
        let cpu = Capabilities { gpu: false, ..ALL };
        assert_eq!(choose(&mpirun, None, cpu).unwrap(), Backend::Mpi);
        assert_eq!(choose(&torchrun, None, cpu).unwrap(), Backend::Single);
        // A build without NCCL is the CPU behaviour of before.
        let mpi_only = Capabilities { nccl: false, ..ALL };
        assert_eq!(choose(&mpirun, None, mpi_only).unwrap(), Backend::Mpi);
        assert_eq!(choose(&torchrun, None, mpi_only).unwrap(), Backend::Single);
        // The world of one the GPU check runs: torchrun variables, WORLD_SIZE=1.
        let one = env(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")]);
        assert_eq!(choose(&one, Some("auto"), ALL).unwrap(), Backend::Nccl);
    }

    #[test]
    fn the_override_is_obeyed_or_refused_clearly() {
        let mpirun = env(&[("OMPI_COMM_WORLD_SIZE", "2")]);
        assert_eq!(choose(&mpirun, Some("mpi"), ALL).unwrap(), Backend::Mpi);
        assert_eq!(choose(&mpirun, Some(" NCCL "), ALL).unwrap(), Backend::Nccl);
        assert_eq!(choose(&env(&[]), Some("nccl"), ALL).unwrap(), Backend::Nccl);
        let no_nccl = Capabilities { nccl: false, ..ALL };
        let err = choose(&mpirun, Some("nccl"), no_nccl)
            .unwrap_err()
            .to_string();
        assert!(err.contains("without the `nccl` feature"), "{err}");
        let cpu = Capabilities { gpu: false, ..ALL };
        let err = choose(&mpirun, Some("nccl"), cpu).unwrap_err().to_string();
        assert!(err.contains("CUDA device"), "{err}");
        let no_mpi = Capabilities { mpi: false, ..ALL };
        let err = choose(&mpirun, Some("mpi"), no_mpi)
            .unwrap_err()
            .to_string();
        assert!(err.contains("without the `mpi` feature"), "{err}");
        assert!(choose(&mpirun, Some("gloo"), ALL).is_err());
    }

    #[test]
    fn the_nccl_id_comes_from_nccl_comm_id_or_the_master_address() {
        let torchrun = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.7"),
            ("MASTER_PORT", "29511"),
        ]);
        assert_eq!(
            id_source(&torchrun, 2, None).unwrap(),
            IdSource::CommId {
                value: "10.0.0.7:29511".into(),
                derived: true
            }
        );
        // A user's NCCL_COMM_ID wins (e.g. when a launcher's own store holds MASTER_PORT).
        assert_eq!(
            id_source(&torchrun, 2, Some("10.0.0.7:29600")).unwrap(),
            IdSource::CommId {
                value: "10.0.0.7:29600".into(),
                derived: false
            }
        );
        assert_eq!(id_source(&env(&[]), 1, None).unwrap(), IdSource::Private);
        let err = id_source(&env(&[("WORLD_SIZE", "2")]), 2, Some(" "))
            .unwrap_err()
            .to_string();
        assert!(err.contains("MASTER_ADDR"), "{err}");
        assert_eq!(comm_id_of("fe80::1", 29500), "[fe80::1]:29500");
        assert_eq!(comm_id_of("[fe80::1]", 29500), "[fe80::1]:29500");
        assert_eq!(comm_id_of("node-3", 1), "node-3:1");
    }

    #[test]
    fn rank_and_size_come_from_the_launcher() {
        let torchrun = env(&[("RANK", "3"), ("WORLD_SIZE", "4")]);
        assert_eq!(rank_and_size(&torchrun).unwrap(), (3, 4));
        assert_eq!(rank_and_size(&env(&[])).unwrap(), (0, 1));
        let err = rank_and_size(&env(&[("WORLD_SIZE", "4")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no RANK"), "{err}");
        let err = rank_and_size(&env(&[("RANK", "4"), ("WORLD_SIZE", "4")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside"), "{err}");
        assert!(rank_and_size(&env(&[("WORLD_SIZE", "0")])).is_err());
    }
}
