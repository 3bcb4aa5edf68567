//! The MPI collectives under a real launcher (`--features mpi`): in-place all-reduce sums for
//! odd sizes and chunk boundaries (a lowered per-call limit stands in for the 2 GiB one),
//! gradient buckets, the byte all-gather and the sharded maps.
//!
//! `cargo test -p ferrotune --features mpi --test mpi` runs this binary, which starts itself
//! again under `mpirun -np 2` (rank-dependent data, so a sum that forgot a rank fails). Set
//! `FERROTUNE_MPI_TEST_BIG=1` to also all-reduce a buffer of more than 2^31 bytes at the
//! default limit (about 2.2 GB per rank; not in CI).

use std::collections::BTreeMap;
use std::process::Command;

use candle_core::{Device, Tensor};
use ferrotune::dist::mpi::MpiCommunicator;
use ferrotune::dist::{all_reduce_gradients, world, Communicator, ReduceOp};

const RANKS: usize = 2;

fn main() {
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_none() && std::env::var_os("PMI_SIZE").is_none()
    {
        launch();
        return;
    }
    let guard = ferrotune::dist::init().expect("join the MPI world");
    let world = world();
    assert_eq!(world.size(), RANKS, "started by mpirun -np {RANKS}");
    let rank = world.rank();
    all_reduce_sums_odd_sizes_in_place(world.comm(), rank);
    chunked_all_reduce_crosses_chunk_boundaries(rank);
    gradients_are_summed_in_buckets(rank);
    all_gather_keeps_rank_order(world.comm(), rank);
    sharded_maps_return_every_result_in_order(rank);
    if std::env::var_os("FERROTUNE_MPI_TEST_BIG").is_some() {
        more_than_two_gib_in_chunks(world.comm(), rank);
    }
    if rank == 0 {
        println!("mpi collectives: all checks passed on {RANKS} ranks");
    }
    drop(guard);
}

/// Runs this binary under `mpirun -np 2` and fails if any rank failed.
fn launch() {
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("mpirun")
        .args([
            "-np",
            &RANKS.to_string(),
            "--bind-to",
            "none",
            "--oversubscribe",
        ])
        .arg(exe)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .status()
        .expect("mpirun (apt-get install openmpi-bin) to run");
    assert!(status.success(), "a rank failed: {status}");
}

/// Element i of rank r's buffer: distinct per rank, exact in f32.
fn value(rank: usize, i: usize) -> f32 {
    (rank * 1000 + i % 997) as f32 + 0.25
}

fn expected_sum(i: usize) -> f32 {
    (0..RANKS).map(|r| value(r, i)).sum()
}

fn all_reduce_sums_odd_sizes_in_place(comm: &dyn Communicator, rank: usize) {
    for len in [0, 1, 2, 7, 1023] {
        let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
        comm.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
        let want: Vec<f32> = (0..len).map(expected_sum).collect();
        assert_eq!(buf, want, "f32 sum of {len}");
        let mut buf: Vec<f64> = (0..len).map(|i| value(rank, i) as f64).collect();
        comm.all_reduce_f64(&mut buf, ReduceOp::Max).unwrap();
        let want: Vec<f64> = (0..len).map(|i| value(RANKS - 1, i) as f64).collect();
        assert_eq!(buf, want, "f64 max of {len}");
    }
}

fn chunked_all_reduce_crosses_chunk_boundaries(rank: usize) {
    // 3 f32 (12 bytes) per MPI call: 10 elements go in 4 calls, the last one short.
    for max_bytes in [4, 12, 13, 40] {
        let mut comm = MpiCommunicator::world();
        comm.max_bytes_per_call = max_bytes;
        for len in [1, 3, 10, 11] {
            let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
            comm.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
            let want: Vec<f32> = (0..len).map(expected_sum).collect();
            assert_eq!(buf, want, "{len} elements at {max_bytes} bytes per call");
            let mut buf: Vec<f64> = (0..len).map(|i| value(rank, i) as f64).collect();
            comm.all_reduce_f64(&mut buf, ReduceOp::Sum).unwrap();
            let want: Vec<f64> = (0..len).map(|i| expected_sum(i) as f64).collect();
            assert_eq!(
                buf, want,
                "f64, {len} elements at {max_bytes} bytes per call"
            );
        }
    }
}

fn gradients_are_summed_in_buckets(rank: usize) {
    let device = Device::Cpu;
    let mut comm = MpiCommunicator::world();
    comm.max_bytes_per_call = 16; // and chunked below a bucket
    let sizes = [("a", 3usize), ("b", 4), ("c", 5), ("d", 11), ("e", 1)];
    let mut grads = BTreeMap::new();
    let mut offset = 0;
    for (name, n) in sizes {
        let v: Vec<f32> = (offset..offset + n).map(|i| value(rank, i)).collect();
        grads.insert(name.to_string(), Tensor::from_vec(v, n, &device).unwrap());
        offset += n;
    }
    // Buckets of at most 8 values: [a b] [c] [d] [e].
    all_reduce_gradients(&comm, &mut grads, 8).unwrap();
    let mut offset = 0;
    for (name, n) in sizes {
        let got: Vec<f32> = grads[name].to_vec1().unwrap();
        let want: Vec<f32> = (offset..offset + n).map(expected_sum).collect();
        assert_eq!(got, want, "gradient {name}");
        offset += n;
    }
}

fn all_gather_keeps_rank_order(comm: &dyn Communicator, rank: usize) {
    // Rank 0 sends nothing, rank r sends r copies of r.
    let mine = vec![rank as u8; rank];
    let all = comm.all_gather_bytes(&mine).unwrap();
    let want: Vec<Vec<u8>> = (0..RANKS).map(|r| vec![r as u8; r]).collect();
    assert_eq!(all, want);
}

fn sharded_maps_return_every_result_in_order(rank: usize) {
    for count in [0, 1, 2, 5] {
        let mut computed_here = Vec::new();
        let got = ferrotune::dist::all_map(count, |j| {
            computed_here.push(j);
            Ok((j, format!("batch {j}"), f64::NAN))
        })
        .unwrap();
        assert!(computed_here.iter().all(|j| j % RANKS == rank));
        assert_eq!(got.len(), count);
        for (j, (index, text, nan)) in got.into_iter().enumerate() {
            assert_eq!((index, text), (j, format!("batch {j}")));
            assert!(nan.is_nan(), "NaN crosses ranks intact");
        }
        let mut seen = Vec::new();
        ferrotune::dist::shard::for_each_in_waves(
            count,
            |j| Ok(j * 10),
            |j, v| {
                seen.push((j, v));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, (0..count).map(|j| (j, j * 10)).collect::<Vec<_>>());
    }
}

fn more_than_two_gib_in_chunks(comm: &dyn Communicator, rank: usize) {
    let len = (1usize << 29) + 12_345; // 4 bytes each: 2^31 + 49380 bytes
    let mut buf = vec![(rank + 1) as f32; len];
    buf[len - 1] = rank as f32 * 2.0;
    let started = std::time::Instant::now();
    comm.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let ranks_sum: f32 = (1..=RANKS).map(|r| r as f32).sum();
    assert!(buf[..len - 1].iter().all(|&x| x == ranks_sum));
    assert_eq!(
        buf[len - 1],
        (0..RANKS).map(|r| r as f32 * 2.0).sum::<f32>()
    );
    if rank == 0 {
        println!(
            "all-reduce of {:.2} GB per rank in {seconds:.2} s",
            (len * 4) as f64 / 1e9
        );
    }
}
