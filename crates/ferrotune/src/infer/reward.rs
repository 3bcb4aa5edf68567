//! Scoring sequences with a Bradley–Terry reward model (`*ForSequenceClassification`, one
//! label): the score head read at each sequence's last token, as transformers does for
//! right-padded input (the last non-pad token).

use crate::error::{Error, Result};
use crate::model::{Decoder, Head};

/// Scores of `sequences` (token ids), `batch_size` at a time.
pub fn reward_scores(
    decoder: &Decoder,
    sequences: &[Vec<u32>],
    pad_id: u32,
    batch_size: usize,
) -> Result<Vec<f32>> {
    if decoder.config().head != Head::SequenceClassification {
        return Err(Error::invalid(format!(
            "this model is a `{}`, not a reward model (*ForSequenceClassification)",
            decoder.config().architecture
        )));
    }
    Ok(decoder
        .last_token_outputs(sequences, pad_id, batch_size)?
        .into_iter()
        .map(|scores| scores[0])
        .collect())
}
