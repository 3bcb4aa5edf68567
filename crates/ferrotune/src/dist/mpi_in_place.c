/* MPI_IN_PLACE is a macro whose value differs between MPI implementations (OpenMPI: (void *)1,
 * MPICH: (void *)-1); the mpi crate does not export it, so this shim hands it to Rust. Built by
 * crates/ferrotune/build.rs with the MPI compiler wrapper when the `mpi` feature is on. */
#include <mpi.h>

void *ferrotune_mpi_in_place(void) { return MPI_IN_PLACE; }
