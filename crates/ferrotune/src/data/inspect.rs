//! `ferrotune data inspect`: what a dataset path holds — schema, row count, bad rows, files —
//! and, given a tokenizer, how long its rows are in tokens. Rows are streamed and only their
//! lengths are kept, so a large dataset can be inspected.
//!
//! Token lengths are those the training objective for the schema would see, before truncation:
//! chat / qa / solution as an SFT chat, preference as the longer of chosen and rejected
//! (prompt included), genrm as inputs + targets + eos, text as one unpacked document + eos,
//! prompts as the rendered generation prompt. `truncated` counts rows longer than `max_length`;
//! `no_target_rows` counts rows that would train nothing (no assistant turn).

use std::path::Path;

use serde::Serialize;

use super::dataset::{BadRows, ExampleRows, LoadOptions};
use super::schema::{Example, Schema};
use super::tokenize::Encoder;
use crate::error::{Error, Result};
use crate::io::Tokenizer;

#[derive(Default)]
pub struct InspectOptions<'a> {
    pub load: LoadOptions,
    /// Measure token lengths with this tokenizer and its chat template.
    pub tokenizer: Option<&'a Tokenizer>,
    /// The length above which a row counts as `truncated`.
    pub max_length: Option<usize>,
}

/// Token-length statistics (nearest-rank percentiles).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthStats {
    pub min: usize,
    pub mean: f64,
    pub p50: usize,
    pub p95: usize,
    pub max: usize,
}

impl LengthStats {
    pub fn from_lengths(mut lengths: Vec<usize>) -> Option<Self> {
        if lengths.is_empty() {
            return None;
        }
        lengths.sort_unstable();
        let n = lengths.len();
        let rank = |p: f64| lengths[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(LengthStats {
            min: lengths[0],
            mean: lengths.iter().sum::<usize>() as f64 / n as f64,
            p50: rank(50.0),
            p95: rank(95.0),
            max: lengths[n - 1],
        })
    }
}

/// The report `ferrotune data inspect` prints as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub schema: Schema,
    pub rows: usize,
    pub bad_rows: usize,
    pub bad_row_locations: Vec<String>,
    pub files: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<LengthStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_target_rows: Option<usize>,
}

/// Length in tokens of one example and whether it has targets (`None` for prompts).
fn measure(encoder: &Encoder, example: &Example) -> Result<(usize, Option<bool>)> {
    match example {
        Example::Preference {
            prompt,
            chosen,
            rejected,
        } => {
            let pair = encoder.pair(prompt, chosen, rejected)?;
            let has = pair.chosen.num_targets() > 0 && pair.rejected.num_targets() > 0;
            Ok((pair.max_len(), Some(has)))
        }
        Example::Prompt(prompt) => Ok((encoder.prompt(prompt)?.len(), None)),
        other => {
            let sequence = encoder.sequence(other)?;
            Ok((sequence.len(), Some(sequence.num_targets() > 0)))
        }
    }
}

/// Reads (and with a tokenizer, tokenizes) every row of a dataset path.
pub fn inspect(path: &Path, options: &InspectOptions) -> Result<InspectReport> {
    let skip = options.load.skip_bad_rows;
    let (mut examples, files) = ExampleRows::open(path, &options.load)?;
    let mut bad = BadRows::default();
    let schema = examples
        .schema(|e| bad.handle(e, skip))?
        .ok_or_else(|| Error::file(path, "dataset has no rows"))?;
    let encoder = options.tokenizer.map(Encoder::new).transpose()?;
    let mut rows = 0;
    let mut lengths = Vec::new();
    let mut no_target_rows = 0;
    for row in examples {
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                bad.handle(e, skip)?;
                continue;
            }
        };
        if let Some(encoder) = &encoder {
            match measure(encoder, &row.example) {
                Ok((length, has_targets)) => {
                    lengths.push(length);
                    if has_targets == Some(false) {
                        no_target_rows += 1;
                    }
                }
                Err(e) => {
                    bad.handle(row.source.error("(row)", e.to_string()), skip)?;
                    continue;
                }
            }
        }
        rows += 1;
    }
    let truncated = options
        .max_length
        .filter(|_| encoder.is_some())
        .map(|max| lengths.iter().filter(|&&l| l > max).count());
    Ok(InspectReport {
        schema,
        rows,
        bad_rows: bad.count,
        bad_row_locations: bad.locations,
        files: files.iter().map(|f| f.display().to_string()).collect(),
        tokens: LengthStats::from_lengths(lengths),
        max_length: options.max_length.filter(|_| encoder.is_some()),
        truncated,
        no_target_rows: encoder.as_ref().map(|_| no_target_rows),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let stats = LengthStats::from_lengths((1..=100).rev().collect()).unwrap();
        assert_eq!(
            (stats.min, stats.p50, stats.p95, stats.max),
            (1, 50, 95, 100)
        );
        assert_eq!(stats.mean, 50.5);
        let one = LengthStats::from_lengths(vec![7]).unwrap();
        assert_eq!((one.p50, one.p95), (7, 7));
        assert!(LengthStats::from_lengths(vec![]).is_none());
    }
}
