//! Who does which share of the work, and how the shares come back together.
//!
//! Training: every rank plans the same global batches; rank r takes positions r, r+N, r+2N, …
//! of each (`share_of`). A batch is sorted by length, so the strided share gives every rank
//! rows of about the same lengths.
//!
//! Inference and evaluation: whole batches are dealt out, batch j to rank j mod N, and the
//! results are gathered back in batch order (`all_map`, `for_each_in_waves`). Each batch is
//! computed exactly as the single process computes it (same rows, same padding), so the
//! gathered output equals the single-process output bit for bit, whatever the world size.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::world;
use crate::error::{Error, Result};

/// The positions of a global batch that `rank` of `size` takes: `rank`, `rank + size`, …
pub fn share_of(batch: &[usize], rank: usize, size: usize) -> Vec<usize> {
    batch
        .iter()
        .skip(rank)
        .step_by(size.max(1))
        .copied()
        .collect()
}

/// The batch indices of `0..count` that `rank` of `size` computes.
pub fn my_batches(count: usize, rank: usize, size: usize) -> impl Iterator<Item = usize> {
    (rank..count).step_by(size.max(1))
}

#[cfg(any(feature = "mpi", feature = "nccl"))]
fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    bincode::serialize(value).map_err(|e| Error::invalid(format!("encoding a shard result: {e}")))
}

#[cfg(any(feature = "mpi", feature = "nccl"))]
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    bincode::deserialize(bytes).map_err(|e| Error::invalid(format!("decoding a shard result: {e}")))
}

#[cfg(not(any(feature = "mpi", feature = "nccl")))]
fn encode<T: Serialize>(_value: &T) -> Result<Vec<u8>> {
    Err(Error::invalid(
        "a multi-process world needs the `mpi` or `nccl` feature",
    ))
}

#[cfg(not(any(feature = "mpi", feature = "nccl")))]
fn decode<T: DeserializeOwned>(_bytes: &[u8]) -> Result<T> {
    Err(Error::invalid(
        "a multi-process world needs the `mpi` or `nccl` feature",
    ))
}

/// Gathers this rank's results (for its batches, in order) from every rank, and puts them back
/// in batch order `0..count`.
fn gather_in_order<T: Serialize + DeserializeOwned>(count: usize, mine: Vec<T>) -> Result<Vec<T>> {
    let world = world();
    let size = world.size();
    let all = world.comm().all_gather_bytes(&encode(&mine)?)?;
    let mut per_rank = Vec::with_capacity(size);
    for (rank, bytes) in all.iter().enumerate() {
        let results: Vec<T> = decode(bytes)?;
        let expected = my_batches(count, rank, size).count();
        if results.len() != expected {
            return Err(Error::invalid(format!(
                "rank {rank} returned {} results for {expected} batches",
                results.len()
            )));
        }
        per_rank.push(results.into_iter());
    }
    Ok((0..count)
        .map(|j| per_rank[j % size].next().expect("counted above"))
        .collect())
}

/// `f(0), …, f(count - 1)` computed across the ranks (batch j on rank j mod N), every result on
/// every rank, in order. In a world of one it is a plain map.
pub fn all_map<T: Serialize + DeserializeOwned>(
    count: usize,
    mut f: impl FnMut(usize) -> Result<T>,
) -> Result<Vec<T>> {
    let world = world();
    if world.size() == 1 {
        return (0..count).map(f).collect();
    }
    let mine = my_batches(count, world.rank(), world.size())
        .map(&mut f)
        .collect::<Result<Vec<T>>>()?;
    gather_in_order(count, mine)
}

/// As `all_map`, but in waves of N batches (one per rank) with `on_result` called, on every rank,
/// for each result of a wave in batch order as soon as the wave is done: a writer on rank 0
/// streams its output and an interrupted job keeps what it finished.
pub fn for_each_in_waves<T: Serialize + DeserializeOwned>(
    count: usize,
    mut f: impl FnMut(usize) -> Result<T>,
    mut on_result: impl FnMut(usize, T) -> Result<()>,
) -> Result<()> {
    let world = world();
    let size = world.size();
    if size == 1 {
        for j in 0..count {
            on_result(j, f(j)?)?;
        }
        return Ok(());
    }
    for wave_start in (0..count).step_by(size) {
        let wave = (count - wave_start).min(size);
        let j = wave_start + world.rank();
        let mine = if j < count { vec![f(j)?] } else { vec![] };
        for (k, result) in gather_in_order(wave, mine)?.into_iter().enumerate() {
            on_result(wave_start + k, result)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_disjoint_and_cover_the_batch() {
        let batch: Vec<usize> = vec![10, 11, 12, 13, 14, 15, 16];
        for size in 1..=9 {
            let mut all: Vec<usize> = (0..size).flat_map(|r| share_of(&batch, r, size)).collect();
            all.sort_unstable();
            assert_eq!(all, batch, "size {size}");
        }
        assert_eq!(share_of(&batch, 1, 3), vec![11, 14]);
        // More ranks than rows: the last ranks get nothing; rank 0 always gets a row.
        assert!(share_of(&[4, 5], 2, 3).is_empty());
        assert_eq!(share_of(&[4, 5], 0, 3), vec![4]);
        assert_eq!(my_batches(7, 1, 3).collect::<Vec<_>>(), vec![1, 4]);
    }

    #[test]
    fn a_world_of_one_maps_in_order() {
        let squares = all_map(5, |j| Ok(j * j)).unwrap();
        assert_eq!(squares, vec![0, 1, 4, 9, 16]);
        let mut seen = Vec::new();
        for_each_in_waves(
            3,
            |j| Ok(j + 1),
            |j, v| {
                seen.push((j, v));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, vec![(0, 1), (1, 2), (2, 3)]);
    }
}
