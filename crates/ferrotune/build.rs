//! With the `mpi` feature: compiles src/dist/mpi_in_place.c (hands `MPI_IN_PLACE` to Rust) with
//! the MPI compiler wrapper that build-probe-mpi finds, as the mpi crate builds its own shim.
//! With the `cuda` feature: compiles cuda/kernels.cu to PTX with nvcc (model/cuda_ops.rs loads it).
//! Without either: nothing (the default build needs no MPI, no CUDA and no C compiler).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "mpi")]
    mpi_shim();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda_ptx();
    }
}

/// `nvcc --ptx` of cuda/kernels.cu for `CUDA_COMPUTE_CAP` (as candle-kernels reads it; default
/// 90, the H100 and H200: PTX for 90 does not load on older cards, so set it for those), with
/// nvcc from `CUDA_ROOT`/`CUDA_PATH` or the PATH.
fn cuda_ptx() {
    use std::path::PathBuf;
    println!("cargo:rerun-if-changed=cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let nvcc = ["CUDA_ROOT", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin/nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.ptx");
    let status = std::process::Command::new(&nvcc)
        // No fused multiply-adds: the AdamW update then rounds as the CPU's and candle's do.
        .args(["--ptx", "-O3", "-std=c++17", "-fmad=false"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("cuda/kernels.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "the `cuda` feature needs nvcc ({}): {e}; scripts/gpu/build.sh sets it up",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on cuda/kernels.cu");
}

#[cfg(feature = "mpi")]
fn mpi_shim() {
    println!("cargo:rerun-if-changed=src/dist/mpi_in_place.c");
    let lib = build_probe_mpi::probe().unwrap_or_else(|errors| {
        let reasons: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        panic!(
            "the `mpi` feature needs an MPI implementation (e.g. apt-get install libopenmpi-dev openmpi-bin libclang-dev): {}",
            reasons.join("; ")
        )
    });
    let mut build = cc::Build::new();
    build.file("src/dist/mpi_in_place.c");
    match lib.mpicc {
        Some(mpicc) => {
            build.compiler(mpicc);
        }
        None => {
            for dir in &lib.include_paths {
                build.include(dir);
            }
        }
    }
    build.compile("ferrotune_mpi_in_place");
}
