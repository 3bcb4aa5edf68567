//! Batches: which sequences go together (length-bucketed, seeded) and their right-padded host
//! form. Tensors are the training loop's business; this file stays on the host.
//!
//! Bucketing (as in TRL/transformers' `group_by_length` "megabatches"): the indices are shuffled
//! with the seed, cut into chunks of [`BUCKET_CHUNK_BATCHES`] × batch size, each chunk is sorted
//! by length (longest first) and cut into batches, and the order of all batches is shuffled
//! with the seed. Sequences of similar length share a batch (little padding) while the data
//! order stays random. The last batch may be smaller. Pass a different seed per epoch
//! (e.g. `seed + epoch`) for a new order each epoch.
//!
//! A batch of B preference pairs is 2B rows: the B chosen sequences first, then the B rejected
//! ones in the same order (row i and row B + i are one pair), as TRL's `concatenated_forward`.

use super::select::{permutation, seeded_rng, shuffle};
use super::tokenize::{TokenizedPair, TokenizedSequence};
use crate::error::{Error, Result};
use crate::io::Tokenizer;

/// Chunk size of the length sort, in batches.
pub const BUCKET_CHUNK_BATCHES: usize = 50;

/// Stream id of the batch-order shuffle (the index shuffle uses the plain seed).
const BATCH_ORDER_STREAM: u64 = 0x0062_6174_6368;

/// A right-padded batch on the host. `attention_mask` is 1 on real tokens; `targets` is false
/// on padding; `lengths` are the unpadded lengths.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PaddedBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
    pub targets: Vec<Vec<bool>>,
    pub lengths: Vec<usize>,
}

impl PaddedBatch {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// The padded length (the longest row).
    pub fn width(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }
    /// Target tokens in the batch (what a token-mean loss divides by).
    pub fn num_targets(&self) -> usize {
        self.targets.iter().flatten().filter(|&&t| t).count()
    }
}

/// The padding id: the tokenizer's pad token, else its eos (TRL's fallback).
pub fn pad_id(tokenizer: &Tokenizer) -> Result<u32> {
    tokenizer
        .pad_token_id
        .or(tokenizer.eos_token_id)
        .ok_or_else(|| {
            Error::file(
                &tokenizer.dir,
                "the tokenizer has neither a pad nor an eos token",
            )
        })
}

/// Right-pads sequences to the longest with `pad_id`.
pub fn pad_sequences<'a>(
    sequences: impl IntoIterator<Item = &'a TokenizedSequence>,
    pad_id: u32,
) -> PaddedBatch {
    let sequences: Vec<&TokenizedSequence> = sequences.into_iter().collect();
    let width = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut batch = PaddedBatch::default();
    for s in sequences {
        let pad = width - s.len();
        let mut ids = s.input_ids.clone();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        let mut mask = vec![1u32; s.len()];
        mask.extend(std::iter::repeat_n(0, pad));
        let mut targets = s.targets.clone();
        targets.extend(std::iter::repeat_n(false, pad));
        batch.input_ids.push(ids);
        batch.attention_mask.push(mask);
        batch.targets.push(targets);
        batch.lengths.push(s.len());
    }
    batch
}

/// A batch of pairs as 2B rows: chosen sequences first, then rejected (see the module docs).
pub fn pad_pairs<'a>(
    pairs: impl IntoIterator<Item = &'a TokenizedPair>,
    pad_id: u32,
) -> PaddedBatch {
    let pairs: Vec<&TokenizedPair> = pairs.into_iter().collect();
    pad_sequences(
        pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected)),
        pad_id,
    )
}

/// Batches of indices into `lengths`, length-bucketed and seeded (see the module docs).
pub fn bucketed_batches(lengths: &[usize], batch_size: usize, seed: u64) -> Vec<Vec<usize>> {
    assert!(batch_size > 0, "batch size must be positive");
    let order = permutation(lengths.len(), seed);
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(lengths.len().div_ceil(batch_size));
    for chunk in order.chunks(batch_size * BUCKET_CHUNK_BATCHES) {
        let mut chunk = chunk.to_vec();
        // Stable sort: ties keep the shuffled order, so the result depends only on the seed.
        chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(chunk.chunks(batch_size).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, &mut seeded_rng(seed, BATCH_ORDER_STREAM));
    batches
}

/// Sequences grouped into padded batches by [`bucketed_batches`].
pub fn sequence_batches(
    sequences: &[TokenizedSequence],
    batch_size: usize,
    pad_id: u32,
    seed: u64,
) -> Vec<PaddedBatch> {
    let lengths: Vec<usize> = sequences.iter().map(TokenizedSequence::len).collect();
    bucketed_batches(&lengths, batch_size, seed)
        .iter()
        .map(|batch| pad_sequences(batch.iter().map(|&i| &sequences[i]), pad_id))
        .collect()
}

/// Pairs grouped into padded batches of `batch_size` pairs (2 × batch_size rows), bucketed by
/// the longer side.
pub fn pair_batches(
    pairs: &[TokenizedPair],
    batch_size: usize,
    pad_id: u32,
    seed: u64,
) -> Vec<PaddedBatch> {
    let lengths: Vec<usize> = pairs.iter().map(TokenizedPair::max_len).collect();
    bucketed_batches(&lengths, batch_size, seed)
        .iter()
        .map(|batch| pad_pairs(batch.iter().map(|&i| &pairs[i]), pad_id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(ids: &[u32]) -> TokenizedSequence {
        TokenizedSequence {
            input_ids: ids.to_vec(),
            targets: ids.iter().map(|&i| i % 2 == 0).collect(),
        }
    }

    #[test]
    fn right_padding() {
        let batch = pad_sequences([&seq(&[1, 2, 3]), &seq(&[4])], 0);
        assert_eq!(batch.input_ids, [vec![1, 2, 3], vec![4, 0, 0]]);
        assert_eq!(batch.attention_mask, [vec![1, 1, 1], vec![1, 0, 0]]);
        assert_eq!(
            batch.targets,
            [vec![false, true, false], vec![true, false, false]]
        );
        assert_eq!(batch.lengths, [3, 1]);
        assert_eq!((batch.len(), batch.width(), batch.num_targets()), (2, 3, 2));
    }

    #[test]
    fn pairs_are_chosen_rows_then_rejected_rows() {
        let p = |c: &[u32], r: &[u32]| TokenizedPair {
            chosen: seq(c),
            rejected: seq(r),
            prompt_len: 1,
        };
        let pairs = [p(&[1, 10], &[1, 20, 21]), p(&[2, 11], &[2, 22])];
        let batch = pad_pairs(&pairs, 9);
        assert_eq!(
            batch.input_ids,
            [
                vec![1, 10, 9],
                vec![2, 11, 9],
                vec![1, 20, 21],
                vec![2, 22, 9]
            ]
        );
    }

    #[test]
    fn bucketing_is_a_seeded_partition_grouping_similar_lengths() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 7919) % 500 + 1).collect();
        let batches = bucketed_batches(&lengths, 8, 5);
        assert_eq!(
            batches,
            bucketed_batches(&lengths, 8, 5),
            "same seed, same batches"
        );
        assert_ne!(batches, bucketed_batches(&lengths, 8, 6));
        let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(batches.len(), 125);
        // Within a 400-row chunk sorted by length, a batch spans a narrow range of lengths.
        let spread: usize = batches
            .iter()
            .map(|b| {
                let l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
                l.iter().max().unwrap() - l.iter().min().unwrap()
            })
            .sum::<usize>()
            / batches.len();
        assert!(spread < 30, "mean spread {spread}");
        // Batch order is shuffled: not sorted by length across the whole set.
        let firsts: Vec<usize> = batches.iter().map(|b| lengths[b[0]]).collect();
        assert!(firsts.windows(2).any(|w| w[0] < w[1]));
        let padded = sequence_batches(&[seq(&[1]), seq(&[1, 2]), seq(&[1, 2, 3])], 2, 0, 1);
        assert_eq!(padded.iter().map(PaddedBatch::len).sum::<usize>(), 3);
    }
}
