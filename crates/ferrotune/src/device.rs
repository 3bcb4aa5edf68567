//! Which device ferrotune computes on.
//!
//! With the `cuda` feature: the GPU of this process's local rank (0 outside a launcher; under
//! `LOCAL_RANK`, `OMPI_COMM_WORLD_LOCAL_RANK`, … each rank of a node takes its own GPU), else the
//! CPU. `FERROTUNE_DEVICE` overrides it: `cpu`, `cuda` (the local rank's GPU) or `cuda:N`, so one
//! CUDA binary can also run the CPU path (the GPU check compares the two on the same fixtures).

use candle_core::{DType, Device, Tensor};

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

/// The variable that turns ferrotune's own CUDA kernels (cuda/kernels.cu) off: `0` runs the
/// composed candle ops in place of all of them (a fallback, and the baseline the GPU check
/// compares); a comma-separated list of [`Kernels`] names, each with a leading `-`
/// (`-embedding,-attention`), turns off only those, so a GPU check can find the one that
/// disagrees and keep the rest. Unset, or `1`: all on.
pub const CUDA_KERNELS_VAR: &str = "FERROTUNE_CUDA_KERNELS";

/// A test aid: `1` sends f32 work on the CPU down the GPU paths too (their ops' CPU forwards
/// mirror the kernels), so a CPU run checks how those paths wire the model together, gradients
/// included (tests/cli/training.rs). f32 only, and slower; not for real runs.
pub const GPU_PATHS_ON_CPU_VAR: &str = "FERROTUNE_GPU_PATHS_ON_CPU";

/// The groups of ferrotune's own CUDA kernels, each a place where the model takes them instead
/// of candle's composed ops; [`CUDA_KERNELS_VAR`] turns them off by these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// The attention softmax of the composed attention (`softmax`).
    Softmax,
    /// Training attention that keeps no [B, H, T, S] tensor, in causal blocks (`attention`; its
    /// softmax is the `softmax` group's kernel).
    Attention,
    /// The next-token log-probability (`logprob`).
    Logprob,
    /// RMSNorm (`rms_norm`).
    RmsNorm,
    /// SwiGLU (`swiglu`).
    Swiglu,
    /// The rotary embedding (`rope`).
    Rope,
    /// The in-place AdamW update (`adamw`).
    Adamw,
    /// Greedy decoding's argmax (`argmax`).
    Argmax,
    /// The embedding lookup's backward (`embedding`).
    Embedding,
    /// A decoding step's joint q/k/v product and one-kernel attention softmax (`decode`).
    Decode,
}

impl Kernels {
    pub const ALL: [Kernels; 10] = [
        Kernels::Softmax,
        Kernels::Attention,
        Kernels::Logprob,
        Kernels::RmsNorm,
        Kernels::Swiglu,
        Kernels::Rope,
        Kernels::Adamw,
        Kernels::Argmax,
        Kernels::Embedding,
        Kernels::Decode,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Softmax => "softmax",
            Kernels::Attention => "attention",
            Kernels::Logprob => "logprob",
            Kernels::RmsNorm => "rms_norm",
            Kernels::Swiglu => "swiglu",
            Kernels::Rope => "rope",
            Kernels::Adamw => "adamw",
            Kernels::Argmax => "argmax",
            Kernels::Embedding => "embedding",
            Kernels::Decode => "decode",
        }
    }
}

/// The kernel groups a [`CUDA_KERNELS_VAR`] value leaves on, or what is wrong with it.
pub fn kernels_on(value: Option<&str>) -> Result<Vec<Kernels>> {
    let value = value.map(str::trim).unwrap_or("");
    match value {
        "" | "1" => return Ok(Kernels::ALL.to_vec()),
        "0" => return Ok(Vec::new()),
        _ => {}
    }
    let mut on = Kernels::ALL.to_vec();
    for item in value.split(',').map(str::trim) {
        let known = item
            .strip_prefix('-')
            .and_then(|name| Kernels::ALL.into_iter().find(|k| k.name() == name));
        let Some(off) = known else {
            let names: Vec<&str> = Kernels::ALL.iter().map(|k| k.name()).collect();
            return Err(Error::invalid(format!(
                "{CUDA_KERNELS_VAR}={value}: `{item}` is not `-NAME` with NAME one of {}; \
                 use 0 (all off), 1 (all on) or a list such as -embedding,-attention",
                names.join(", ")
            )));
        };
        on.retain(|&k| k != off);
    }
    Ok(on)
}

/// This process's [`CUDA_KERNELS_VAR`], read once: the groups it leaves on, or what is wrong
/// with it ([`select`] reports that; every group is then off).
fn kernels_setting() -> &'static std::result::Result<Vec<Kernels>, String> {
    static ON: std::sync::OnceLock<std::result::Result<Vec<Kernels>, String>> =
        std::sync::OnceLock::new();
    ON.get_or_init(|| {
        kernels_on(std::env::var(CUDA_KERNELS_VAR).ok().as_deref()).map_err(|e| e.to_string())
    })
}

/// Whether work on `device` goes through ferrotune's own CUDA kernels of `group`: a GPU in a
/// `cuda` build, unless [`CUDA_KERNELS_VAR`] turns them off (or, for tests, the CPU under
/// [`GPU_PATHS_ON_CPU_VAR`]).
pub fn own_cuda_kernels(device: &Device, group: Kernels) -> bool {
    static CPU: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let place = (cfg!(feature = "cuda") && device.is_cuda())
        || (device.is_cpu()
            && *CPU.get_or_init(|| {
                std::env::var(GPU_PATHS_ON_CPU_VAR).is_ok_and(|v| v.trim() == "1")
            }));
    place
        && kernels_setting()
            .as_ref()
            .is_ok_and(|on| on.contains(&group))
}

/// The element types cuda/kernels.cu has kernels for (f32 math over f32 or bf16 storage).
pub fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

/// Whether `t` goes through ferrotune's own CUDA kernels of `group`: its device does
/// ([`own_cuda_kernels`]), the kernels have its type, and it is not empty.
pub fn own_kernels_for(t: &Tensor, group: Kernels) -> bool {
    own_cuda_kernels(t.device(), group) && kernel_dtype(t.dtype()) && t.elem_count() > 0
}

/// The device named by `FERROTUNE_DEVICE`, or the local rank's GPU, or the CPU.
pub fn select() -> Result<Device> {
    if let Err(message) = kernels_setting() {
        return Err(Error::invalid(message.clone()));
    }
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
        Choice::Cuda(ordinal) => {
            let device = Device::new_cuda(ordinal).map_err(|e| {
                Error::invalid(format!(
                    "cannot open CUDA device {ordinal} ({DEVICE_VAR}, or the local rank, chose it; `nvidia-smi -L` lists this node's GPUs): {e}"
                ))
            })?;
            #[cfg(feature = "cuda")]
            keep_freed_memory(&device);
            Ok(device)
        }
    }
}

/// Stops the GPU's stream-ordered allocator from handing freed memory back to the driver.
///
/// candle allocates through cudarc's `cuMemAllocAsync`, from the device's current memory pool
/// (its default pool), whose release threshold is 0: every synchronisation (a loss read back, a gradient norm)
/// trims the pool, and the next step maps its gigabytes of activations afresh. A threshold of
/// "all of it" keeps freed blocks for reuse, as PyTorch's caching allocator does; memory still
/// returns to the driver when the process ends. Best effort: a driver that refuses only costs
/// speed, so it is a warning.
#[cfg(feature = "cuda")]
fn keep_freed_memory(device: &Device) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Ok(cuda) = device.as_cuda_device() else {
        return;
    };
    let dev = cuda.cuda_stream().context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: plain driver calls on a device candle has just opened; `pool` and `threshold`
    // outlive them, and the attribute takes a pointer to a u64 (cuda.h).
    let status = unsafe {
        match sys::cuDeviceGetMemPool(&mut pool, dev) {
            sys::CUresult::CUDA_SUCCESS => sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            ),
            err => err,
        }
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        tracing::warn!("could not raise the CUDA memory pool's release threshold: {status:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_groups_turn_off_by_name() {
        assert_eq!(kernels_on(None).unwrap(), Kernels::ALL);
        assert_eq!(kernels_on(Some(" 1 ")).unwrap(), Kernels::ALL);
        assert!(kernels_on(Some("0")).unwrap().is_empty());
        let on = kernels_on(Some("-embedding, -attention")).unwrap();
        assert_eq!(on.len(), Kernels::ALL.len() - 2);
        assert!(!on.contains(&Kernels::Embedding) && !on.contains(&Kernels::Attention));
        assert!(on.contains(&Kernels::RmsNorm));
        for name in Kernels::ALL.map(Kernels::name) {
            let on = kernels_on(Some(&format!("-{name}"))).unwrap();
            assert_eq!(on.len(), Kernels::ALL.len() - 1, "{name}");
        }
        for bad in ["embedding", "-embeddings", "-embedding,,-rope", "off"] {
            let e = kernels_on(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains(CUDA_KERNELS_VAR) && e.contains("rms_norm"),
                "{bad}: {e}"
            );
        }
    }

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
