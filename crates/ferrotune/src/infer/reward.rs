//! Scoring sequences with a Bradley–Terry reward model (`*ForSequenceClassification`, one
//! label): the score head read at each sequence's last token, as transformers does for
//! right-padded input (the last non-pad token).

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::decoder::gather_last_token;
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
    let device = decoder.device().clone();
    let mut out = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(batch_size.max(1)) {
        let width = chunk.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(chunk.len() * width);
        let mut mask = Vec::with_capacity(chunk.len() * width);
        for s in chunk {
            if s.is_empty() {
                return Err(Error::invalid("cannot score an empty sequence"));
            }
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(pad_id, width - s.len()));
            mask.extend(std::iter::repeat_n(1u32, s.len()));
            mask.extend(std::iter::repeat_n(0u32, width - s.len()));
        }
        let input = Tensor::from_vec(ids, (chunk.len(), width), &device)?;
        let mask = Tensor::from_vec(mask, (chunk.len(), width), &device)?;
        let hidden = decoder.forward_hidden(&input, Some(&mask))?;
        let lengths: Vec<usize> = chunk.iter().map(|s| s.len()).collect();
        let last = gather_last_token(&hidden, &lengths)?;
        let scores = crate::model::ops::linear(&last, decoder.head_weight(), None)?;
        out.extend(
            scores
                .narrow(1, 0, 1)?
                .squeeze(1)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?,
        );
    }
    Ok(out)
}
