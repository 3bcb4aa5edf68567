//! Cutting tokenized rows to `--max-length` (`--truncation drop|left|right`).
//!
//! Sequences: [`Truncation::Right`] (the default, as for completions) keeps the first
//! `max_length` tokens; [`Truncation::Left`] keeps the last ones; [`Truncation::Drop`] drops the
//! row. Pairs follow TRL's DPO rule whichever of left/right is chosen (cutting the end of a prompt
//! or the start of an answer would break the seam between them): the prompt is cut from the left
//! first, keeping at least half of `max_length` (or all of it if shorter), then both completions
//! are cut from the right to what is left. After any cut from the left, the new first token is
//! not a target (nothing precedes it).

use serde::Serialize;

use super::tokenize::{TokenizedPair, TokenizedSequence};
use crate::error::{Error, Result};

/// What to do with a row longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Drop the row.
    Drop,
    /// Cut the beginning.
    Left,
    /// Cut the end.
    #[default]
    Right,
}

impl std::str::FromStr for Truncation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "drop" => Ok(Truncation::Drop),
            "left" => Ok(Truncation::Left),
            "right" => Ok(Truncation::Right),
            _ => Err(Error::invalid(format!(
                "unknown truncation `{s}`; expected drop, left or right"
            ))),
        }
    }
}

/// What truncation did to one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncated {
    Kept,
    Truncated,
    Dropped,
}

/// Cuts a sequence to `max_length` by `policy`. After a left cut the new first token is not a
/// target (nothing precedes it).
pub fn truncate_sequence(
    sequence: &mut TokenizedSequence,
    max_length: usize,
    policy: Truncation,
) -> Truncated {
    let n = sequence.len();
    if n <= max_length {
        return Truncated::Kept;
    }
    match policy {
        Truncation::Drop => return Truncated::Dropped,
        Truncation::Right => {
            sequence.input_ids.truncate(max_length);
            sequence.targets.truncate(max_length);
        }
        Truncation::Left => {
            sequence.input_ids.drain(..n - max_length);
            sequence.targets.drain(..n - max_length);
            if let Some(first) = sequence.targets.first_mut() {
                *first = false;
            }
        }
    }
    Truncated::Truncated
}

/// Cuts a pair to `max_length` (TRL's DPO rule; see the module docs). `Drop` drops it.
pub fn truncate_pair(pair: &mut TokenizedPair, max_length: usize, policy: Truncation) -> Truncated {
    if pair.max_len() <= max_length {
        return Truncated::Kept;
    }
    if policy == Truncation::Drop {
        return Truncated::Dropped;
    }
    let prompt_len = pair.prompt_len;
    let longest_completion = pair.max_len() - prompt_len;
    let keep_prompt = prompt_len.min(
        max_length
            .saturating_sub(longest_completion)
            .max(max_length / 2),
    );
    let cut = prompt_len - keep_prompt;
    for sequence in [&mut pair.chosen, &mut pair.rejected] {
        sequence.input_ids.drain(..cut);
        sequence.targets.drain(..cut);
        sequence.input_ids.truncate(max_length);
        sequence.targets.truncate(max_length);
        if let Some(first) = sequence.targets.first_mut() {
            *first = false;
        }
    }
    pair.prompt_len = keep_prompt;
    Truncated::Truncated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, targets_from: usize) -> TokenizedSequence {
        TokenizedSequence {
            input_ids: (0..n as u32).collect(),
            targets: (0..n).map(|i| i >= targets_from).collect(),
        }
    }

    #[test]
    fn sequence_truncation_policies() {
        let mut s = seq(10, 6);
        assert_eq!(
            truncate_sequence(&mut s, 10, Truncation::Drop),
            Truncated::Kept
        );
        assert_eq!(
            truncate_sequence(&mut s, 8, Truncation::Drop),
            Truncated::Dropped
        );
        assert_eq!(s.len(), 10);

        let mut s = seq(10, 6);
        assert_eq!(
            truncate_sequence(&mut s, 8, Truncation::Right),
            Truncated::Truncated
        );
        assert_eq!(s.input_ids, (0..8).collect::<Vec<u32>>());
        assert_eq!(s.num_targets(), 2);

        let mut s = seq(10, 0);
        assert_eq!(
            truncate_sequence(&mut s, 4, Truncation::Left),
            Truncated::Truncated
        );
        assert_eq!(s.input_ids, [6, 7, 8, 9]);
        assert_eq!(
            s.targets,
            [false, true, true, true],
            "the new first token has no context"
        );
    }

    fn pair(prompt: usize, chosen: usize, rejected: usize) -> TokenizedPair {
        let side = |n: usize, base: u32| {
            let mut s = seq(prompt, usize::MAX);
            s.push(&(base..base + n as u32).collect::<Vec<u32>>(), true);
            s
        };
        TokenizedPair {
            chosen: side(chosen, 100),
            rejected: side(rejected, 200),
            prompt_len: prompt,
        }
    }

    #[test]
    fn pair_truncation_cuts_the_prompt_from_the_left_first() {
        // Prompt 10, completions 4 and 6; max 14: the prompt loses 2 from its start.
        let mut p = pair(10, 4, 6);
        assert_eq!(
            truncate_pair(&mut p, 14, Truncation::Right),
            Truncated::Truncated
        );
        assert_eq!(p.prompt_len, 8);
        assert_eq!(p.chosen.input_ids[..8], [2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(p.rejected.input_ids[..8], p.chosen.input_ids[..8]);
        assert_eq!(p.chosen.len(), 12);
        assert_eq!(p.rejected.len(), 14);
        assert_eq!(p.rejected.num_targets(), 6, "completions untouched");

        // Long completions: the prompt keeps half of max_length, completions are cut from the right.
        let mut p = pair(10, 30, 5);
        assert_eq!(
            truncate_pair(&mut p, 12, Truncation::Left),
            Truncated::Truncated
        );
        assert_eq!(p.prompt_len, 6);
        assert_eq!(
            p.chosen.input_ids,
            [4, 5, 6, 7, 8, 9, 100, 101, 102, 103, 104, 105]
        );
        assert_eq!(p.rejected.len(), 11);

        // A short prompt is kept whole.
        let mut p = pair(3, 30, 5);
        truncate_pair(&mut p, 12, Truncation::Right);
        assert_eq!(p.prompt_len, 3);
        assert_eq!(p.chosen.len(), 12);

        let mut p = pair(10, 4, 6);
        assert_eq!(
            truncate_pair(&mut p, 14, Truncation::Drop),
            Truncated::Dropped
        );
        assert_eq!(truncate_pair(&mut p, 16, Truncation::Drop), Truncated::Kept);
    }

    #[test]
    fn truncation_names() {
        assert_eq!("left".parse::<Truncation>().unwrap(), Truncation::Left);
        assert_eq!(Truncation::default(), Truncation::Right);
        assert!("middle".parse::<Truncation>().is_err());
    }
}
