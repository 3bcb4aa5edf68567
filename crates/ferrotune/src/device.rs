//! Which device ferrotune computes on.
//!
//! CUDA 0 when the binary is built with the `cuda` feature and a GPU is present, else the CPU.
//! `FERROTUNE_DEVICE` (`cpu`, `cuda`, `cuda:N`) overrides it, so one CUDA binary can also run
//! the CPU path (the GPU check compares the two on the same fixtures).

use candle_core::Device;

use crate::error::{Error, Result};

/// The device named by `FERROTUNE_DEVICE`, or CUDA 0 if available, or the CPU.
pub fn select() -> Result<Device> {
    match std::env::var("FERROTUNE_DEVICE") {
        Ok(name) if !name.trim().is_empty() => parse(name.trim()),
        _ => Ok(Device::cuda_if_available(0)?),
    }
}

fn parse(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "FERROTUNE_DEVICE must be cpu, cuda or cuda:N, got `{other}`"
                ))
            })?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::invalid(format!(
            "FERROTUNE_DEVICE={name}, but this binary was built without the `cuda` feature"
        )));
    }
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse("gpu").is_err());
        assert!(parse("cuda:x").is_err());
        if !candle_core::utils::cuda_is_available() {
            let err = parse("cuda").unwrap_err().to_string();
            assert!(err.contains("without the `cuda` feature"), "{err}");
        }
    }
}
