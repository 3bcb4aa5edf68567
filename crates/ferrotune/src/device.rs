//! Which device ferrotune computes on.
//!
//! With the `cuda` feature: the GPU of this process's local rank (0 outside a launcher; under
//! `LOCAL_RANK`, `OMPI_COMM_WORLD_LOCAL_RANK`, … each rank of a node takes its own GPU), else the
//! CPU. `FERROTUNE_DEVICE` overrides it: `cpu`, `cuda` (the local rank's GPU) or `cuda:N`, so one
//! CUDA binary can also run the CPU path (the GPU check compares the two on the same fixtures).

use candle_core::Device;

use crate::error::{Error, Result};

/// The variable that overrides the device.
pub const DEVICE_VAR: &str = "FERROTUNE_DEVICE";

/// The device a process will compute on, decided before any device is opened (the distributed
/// layer needs it to pick its backend before the model exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

/// The device named by `FERROTUNE_DEVICE`, or the local rank's GPU, or the CPU.
pub fn select() -> Result<Device> {
    open(this_process(crate::dist::world().local_rank())?)
}

/// This process's `Choice` for a given local rank (read from `FERROTUNE_DEVICE`).
pub fn this_process(local_rank: usize) -> Result<Choice> {
    choice(
        std::env::var(DEVICE_VAR).ok().as_deref(),
        local_rank,
        candle_core::utils::cuda_is_available(),
    )
}

/// The choice `FERROTUNE_DEVICE=value` (or its absence) makes for a process of `local_rank`, in a
/// binary built with (`cuda_built`) or without CUDA.
pub fn choice(value: Option<&str>, local_rank: usize, cuda_built: bool) -> Result<Choice> {
    let name = value.map(str::trim).unwrap_or("");
    let wanted = match name {
        "" if cuda_built => Choice::Cuda(local_rank),
        "" | "cpu" => return Ok(Choice::Cpu),
        "cuda" => Choice::Cuda(local_rank),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Choice::Cuda)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{DEVICE_VAR} must be cpu, cuda or cuda:N, got `{other}`"
                ))
            })?,
    };
    if !cuda_built {
        return Err(Error::invalid(format!(
            "{DEVICE_VAR}={name}, but this binary was built without the `cuda` feature"
        )));
    }
    Ok(wanted)
}

/// Opens a chosen device; a GPU that is not there is a clear error.
pub fn open(choice: Choice) -> Result<Device> {
    match choice {
        Choice::Cpu => Ok(Device::Cpu),
        Choice::Cuda(ordinal) => Device::new_cuda(ordinal).map_err(|e| {
            Error::invalid(format!(
                "cannot open CUDA device {ordinal} ({DEVICE_VAR}, or the local rank, chose it; `nvidia-smi -L` lists this node's GPUs): {e}"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(choice(Some("cpu"), 3, true).unwrap(), Choice::Cpu);
        assert_eq!(choice(None, 3, false).unwrap(), Choice::Cpu);
        // The default and plain `cuda` follow the local rank; `cuda:N` is exact.
        assert_eq!(choice(None, 3, true).unwrap(), Choice::Cuda(3));
        assert_eq!(choice(Some(" "), 0, true).unwrap(), Choice::Cuda(0));
        assert_eq!(choice(Some("cuda"), 2, true).unwrap(), Choice::Cuda(2));
        assert_eq!(choice(Some("cuda:1"), 2, true).unwrap(), Choice::Cuda(1));
        assert!(choice(Some("gpu"), 0, true).is_err());
        assert!(choice(Some("cuda:x"), 0, true).is_err());
        let err = choice(Some("cuda"), 0, false).unwrap_err().to_string();
        assert!(err.contains("without the `cuda` feature"), "{err}");
        assert!(open(Choice::Cpu).unwrap().is_cpu());
    }
}
