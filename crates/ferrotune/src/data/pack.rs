//! Packing plain-text documents into fixed-length sequences for pretraining (CONTRACTS:
//! `pretrain` packs to `--max-length`). Packing is right for the plain language-model
//! objective only: chat and preference rows are never packed.

use serde::Serialize;

use super::schema::{DataRow, Example};
use super::tokenize::{Encoder, TokenizedSequence};
use crate::error::{Error, Result};

/// Packs documents into sequences of exactly `max_length` tokens for plain language modelling
/// (CONTRACTS: `pretrain` packs to `--max-length`), like transformers' `run_clm.py`
/// `group_texts`: documents (each ending in eos) are concatenated in order and cut every
/// `max_length` tokens; a document may span two sequences, and attention is not blocked at
/// document boundaries (the eos separates them). Every token is a target except each
/// sequence's first. The final partial sequence is kept back; [`Packer::finish`] reports it.
#[derive(Debug, Clone)]
pub struct Packer {
    max_length: usize,
    buffer: Vec<u32>,
}

impl Packer {
    pub fn new(max_length: usize) -> Result<Self> {
        if max_length < 2 {
            return Err(Error::invalid("packing needs max_length >= 2"));
        }
        Ok(Packer {
            max_length,
            buffer: Vec::new(),
        })
    }

    /// Adds a document's ids; returns the sequences it completed.
    pub fn push(&mut self, ids: &[u32]) -> Vec<TokenizedSequence> {
        self.buffer.extend_from_slice(ids);
        let full = self.buffer.len() / self.max_length;
        let rest = self.buffer.split_off(full * self.max_length);
        let done = std::mem::replace(&mut self.buffer, rest);
        done.chunks(self.max_length)
            .map(|chunk| {
                let mut targets = vec![true; chunk.len()];
                targets[0] = false;
                TokenizedSequence {
                    input_ids: chunk.to_vec(),
                    targets,
                }
            })
            .collect()
    }

    /// The number of tokens left over (dropped) at the end.
    pub fn finish(self) -> usize {
        self.buffer.len()
    }
}

/// What packing a corpus did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PackStats {
    pub documents: usize,
    pub tokens: usize,
    pub sequences: usize,
    /// Tokens of the last, incomplete sequence, not used.
    pub dropped_tail_tokens: usize,
}

/// Tokenizes text rows ([`Encoder::text`]) and packs them to `max_length` (see [`Packer`]).
pub fn pack_texts(
    encoder: &Encoder,
    rows: &[DataRow],
    max_length: usize,
) -> Result<(Vec<TokenizedSequence>, PackStats)> {
    let mut packer = Packer::new(max_length)?;
    let mut stats = PackStats::default();
    let mut out = Vec::new();
    for row in rows {
        let Example::Text { text } = &row.example else {
            return Err(row.source.error(
                "(row)",
                format!(
                    "packing needs text rows, this dataset is `{}`",
                    row.example.schema()
                ),
            ));
        };
        let sequence = encoder
            .text(text)
            .map_err(|e| row.source.error("text", e.to_string()))?;
        stats.documents += 1;
        stats.tokens += sequence.len();
        out.extend(packer.push(&sequence.input_ids));
    }
    stats.sequences = out.len();
    stats.dropped_tail_tokens = packer.finish();
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packer_cuts_exact_lengths_and_keeps_the_tail_back() {
        let mut packer = Packer::new(4).unwrap();
        assert!(packer.push(&[1, 2, 3]).is_empty());
        let out = packer.push(&[4, 5, 6, 7, 8, 9]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].input_ids, [1, 2, 3, 4]);
        assert_eq!(out[1].input_ids, [5, 6, 7, 8]);
        assert_eq!(out[1].targets, [false, true, true, true]);
        assert_eq!(packer.finish(), 1);
        assert!(Packer::new(1).is_err());
    }
}
