//! With the `mpi` feature: compiles src/dist/mpi_in_place.c (hands `MPI_IN_PLACE` to Rust) with
//! the MPI compiler wrapper that build-probe-mpi finds, as the mpi crate builds its own shim.
//! Without it: nothing (the default build needs no MPI and no C compiler).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "mpi")]
    mpi_shim();
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
