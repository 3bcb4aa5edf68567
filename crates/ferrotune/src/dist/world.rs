//! Finding the world: which launcher started this process, its rank, the world size and its
//! rank on the node, and the check that the world MPI reports is the one the launcher meant.
//!
//! Launchers and what they set:
//! - `mpirun`/`mpiexec` (OpenMPI): `OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_RANK`,
//!   `OMPI_COMM_WORLD_LOCAL_RANK`; MPICH/Intel MPI (hydra): `PMI_SIZE`, `PMI_RANK`,
//!   `MPI_LOCALRANKID`.
//! - Slurm `srun --mpi=pmix`: `SLURM_PROCID`, `SLURM_NTASKS` (`SLURM_STEP_NUM_TASKS`),
//!   `SLURM_LOCALID`, `PMIX_RANK`.
//! - torchrun and its conventions (Kubernetes operators, Ray): `RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.
//!
//! The CPU collectives run over MPI, so a multi-process CPU world needs an MPI launcher (and a
//! build with `--features mpi`); the GPU collectives (`--features nccl`) also form a world from
//! the torchrun variables alone (`dist::backend`). A world size the launcher announces but MPI does not see (every
//! process rank 0 of 1: a binary linked against another MPI than the launcher's, or `srun`
//! without `--mpi=pmix`) is an error, never N independent runs writing the same files.

use crate::error::{Error, Result};

/// How this process was started, read from the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchEnv {
    /// The world size the launcher announces, and the variable that says so.
    pub expected_size: Option<(usize, &'static str)>,
    /// The rank on this node the launcher announces.
    pub local_rank: Option<usize>,
    /// The global rank the launcher announces (`RANK`, `OMPI_COMM_WORLD_RANK`, `PMI_RANK`,
    /// `SLURM_PROCID`): what NCCL needs when no MPI tells it.
    pub rank: Option<usize>,
    /// `MASTER_ADDR` and `MASTER_PORT` (torchrun conventions), when both are set.
    pub master: Option<(String, u16)>,
    /// An MPI launcher (mpirun, hydra, srun with PMI/PMIx) started this process.
    pub mpi_launcher: bool,
}

/// Variables an MPI launcher sets in every process it starts.
const MPI_LAUNCHER_VARS: [&str; 5] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMI_RANK",
    "PMIX_RANK",
    "MV2_COMM_WORLD_SIZE",
];

impl LaunchEnv {
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As `from_env`, over the given variables only (tests).
    #[cfg(test)]
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        let map: std::collections::HashMap<&str, &str> = pairs.iter().copied().collect();
        Self::from_lookup(|k| map.get(k).map(|v| v.to_string())).unwrap()
    }

    /// As `from_env`, over any lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let number = |name: &'static str| -> Result<Option<usize>> {
            match get(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    Error::invalid(format!("{name}={v} is not a non-negative integer"))
                }),
            }
        };
        // The launcher's own size wins over generic variables: WORLD_SIZE (torchrun-style,
        // often set by hand or by an operator), then mpirun's, hydra's, and Slurm's (only in a
        // task that srun started: an allocation's batch shell also carries SLURM_NTASKS).
        let mut expected_size = None;
        for name in ["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"] {
            if let Some(n) = number(name)? {
                expected_size = Some((n, name));
                break;
            }
        }
        if expected_size.is_none()
            && get("SLURM_PROCID").is_some()
            && get("SLURM_STEP_ID").is_some()
        {
            for name in ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"] {
                if let Some(n) = number(name)? {
                    expected_size = Some((n, name));
                    break;
                }
            }
        }
        let mut local_rank = None;
        for name in [
            "LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
            "SLURM_LOCALID",
        ] {
            if let Some(n) = number(name)? {
                local_rank = Some(n);
                break;
            }
        }
        let mut rank = None;
        for name in ["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"] {
            if let Some(n) = number(name)? {
                rank = Some(n);
                break;
            }
        }
        if rank.is_none() && get("SLURM_STEP_ID").is_some() {
            rank = number("SLURM_PROCID")?;
        }
        let master = match (get("MASTER_ADDR"), get("MASTER_PORT")) {
            (Some(addr), Some(port)) if !addr.trim().is_empty() && !port.trim().is_empty() => {
                let port = port.trim().parse::<u16>().map_err(|_| {
                    Error::invalid(format!("MASTER_PORT={port} is not a port number"))
                })?;
                Some((addr.trim().to_string(), port))
            }
            _ => None,
        };
        Ok(LaunchEnv {
            expected_size,
            local_rank,
            rank,
            master,
            mpi_launcher: MPI_LAUNCHER_VARS.iter().any(|k| get(k).is_some()),
        })
    }

    /// Whether this process should initialise MPI: an MPI launcher started it. (Processes
    /// started by anything else, e.g. torchrun-style `WORLD_SIZE=4`, would each be an MPI world
    /// of one; `check_size` turns that into an error.)
    pub fn wants_mpi(&self) -> bool {
        self.mpi_launcher
    }

    /// Checks the world size MPI (or the absence of it) reports against the launcher's.
    pub fn check_size(&self, size: usize, backend: &str) -> Result<()> {
        let Some((expected, name)) = self.expected_size else {
            return Ok(());
        };
        if expected == size || expected == 0 {
            return Ok(());
        }
        let why = if size == 1 && backend == "single" {
            if cfg!(feature = "mpi") {
                "this process was not started by an MPI launcher: the CPU collectives run over MPI, so start the job with mpirun, mpiexec or srun --mpi=pmix (docs/DISTRIBUTED.md)"
            } else {
                "this binary was built without the `mpi` feature (cargo build --release --features mpi), so every process would train alone"
            }
        } else if size == 1 {
            "every process is rank 0 of 1: the launcher and the MPI library linked into this binary do not talk (a PMI/PMIx mismatch: e.g. OpenMPI's mpirun with an MPICH build, or srun without --mpi=pmix)"
        } else {
            "the launcher and MPI disagree on the number of processes"
        };
        Err(Error::invalid(format!(
            "{name}={expected}, but the {backend} world has {size} process{}: {why}",
            if size == 1 { "" } else { "es" }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> LaunchEnv {
        LaunchEnv::from_pairs(pairs)
    }

    #[test]
    fn launchers_are_recognised() {
        let plain = env(&[]);
        assert_eq!(plain, LaunchEnv::default());
        assert!(!plain.wants_mpi());
        assert!(plain.check_size(1, "single").is_ok());

        let mpirun = env(&[
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ]);
        assert_eq!(mpirun.expected_size, Some((2, "OMPI_COMM_WORLD_SIZE")));
        assert_eq!(mpirun.local_rank, Some(1));
        assert!(mpirun.wants_mpi());
        assert!(mpirun.check_size(2, "mpi").is_ok());

        // A Slurm allocation's shell carries SLURM_NTASKS but is one process: no check.
        let batch_shell = env(&[("SLURM_NTASKS", "4"), ("SLURM_JOB_ID", "7")]);
        assert_eq!(batch_shell.expected_size, None);
        let srun = env(&[
            ("SLURM_NTASKS", "4"),
            ("SLURM_PROCID", "3"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_LOCALID", "1"),
            ("PMIX_RANK", "3"),
        ]);
        assert_eq!(srun.expected_size, Some((4, "SLURM_NTASKS")));
        assert_eq!(srun.local_rank, Some(1));
        assert!(srun.wants_mpi());

        assert_eq!(srun.rank, Some(3));
        assert_eq!(mpirun.rank, Some(1));

        let torchrun = env(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")]);
        assert_eq!(torchrun.rank, Some(0));
        assert_eq!(torchrun.master, None);
        assert!(!torchrun.wants_mpi());
        assert!(torchrun.check_size(1, "single").is_ok());
        assert!(LaunchEnv::from_lookup(|k| (k == "WORLD_SIZE").then(|| "x".into())).is_err());

        let master = env(&[("MASTER_ADDR", "node1"), ("MASTER_PORT", "29500")]);
        assert_eq!(master.master, Some(("node1".to_string(), 29500)));
        // One of the two alone is no address; a port that is not one is an error.
        assert_eq!(env(&[("MASTER_ADDR", "node1")]).master, None);
        assert!(LaunchEnv::from_lookup(|k| match k {
            "MASTER_ADDR" => Some("h".into()),
            "MASTER_PORT" => Some("70000".into()),
            _ => None,
        })
        .is_err());
    }

    #[test]
    fn a_world_that_disagrees_with_the_launcher_is_an_error() {
        // PMI failure: mpirun announced 2, MPI sees one process of one.
        let err = env(&[("OMPI_COMM_WORLD_SIZE", "2")])
            .check_size(1, "mpi")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("OMPI_COMM_WORLD_SIZE=2") && err.contains("rank 0 of 1"),
            "{err}"
        );
        // torchrun-style variables without an MPI launcher.
        let torchrun = env(&[("RANK", "1"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h")]);
        assert!(!torchrun.wants_mpi());
        let err = torchrun.check_size(1, "single").unwrap_err().to_string();
        assert!(err.contains("WORLD_SIZE=4"), "{err}");
        let err = env(&[
            ("SLURM_NTASKS", "3"),
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_ID", "1"),
        ])
        .check_size(2, "mpi")
        .unwrap_err()
        .to_string();
        assert!(err.contains("disagree"), "{err}");
    }
}
