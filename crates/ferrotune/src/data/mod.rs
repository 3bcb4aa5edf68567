//! Datasets: read rows from files, type them by schema, choose train/eval rows, tokenize them
//! through the chat template into ids + loss targets, and batch them. Host-side only: no
//! tensors, no model.
//!
//! The pipeline, one file per step:
//! - `reader`   — `.jsonl` / `.json` / `.parquet` / folders (HF snapshots, splits) → [`RawRow`]s
//! - `parquet`  — parquet rows → JSON values (row API, no arrow)
//! - `schema`   — detect the schema, parse rows into [`Example`]s, bad-row errors
//! - `dataset`  — [`load_dataset`]: the above plus the bad-row policy
//! - `answer`   — final numeric answers of math solutions (`####`, `The answer is`)
//! - `select`   — train/eval selection: percentiles, caps, seeded sampling, held-out split
//! - `tokenize` — SFT / preference / GenRM / text sequences and their loss targets
//! - `truncate` — `--max-length` with `--truncation drop|left|right`
//! - `pack`     — text documents packed into fixed-length sequences (pretraining)
//! - `batch`    — length-bucketed seeded batches, right padding
//! - `inspect`  — the `ferrotune data inspect` report
//! - `genrm_prepare` — `ferrotune data prepare-genrm`: the genrm-critiques release → D_verify, D_correct
//!
//! Typical use by a training command:
//! ```text
//! let data = load_dataset(&path, &LoadOptions::default())?;
//! let (train, eval) = select(data.rows, None, &Selection { seed, ..Default::default() })?;
//! let encoder = Encoder::new(tokenizer)?;
//! let (sequences, stats) = tokenize_sequences(&encoder, &train, &TokenizeOptions { max_length: Some(1024), ..Default::default() })?;
//! for batch in sequence_batches(&sequences, 8, pad_id(tokenizer)?, seed + epoch) { /* ... */ }
//! ```

pub mod answer;
pub mod batch;
pub mod dataset;
pub mod genrm_prepare;
pub mod inspect;
pub mod pack;
pub mod parquet;
pub mod reader;
pub mod schema;
pub mod select;
pub mod tokenize;
pub mod truncate;

pub use answer::{answers_match, extract_answer, same_answer};
pub use batch::{
    bucketed_batches, pad_id, pad_pairs, pad_sequences, pair_batches, sequence_batches, PaddedBatch,
};
pub use dataset::{load_dataset, BadRows, Dataset, ExampleRows, LoadOptions};
pub use inspect::{inspect, InspectOptions, InspectReport, LengthStats};
pub use pack::{pack_texts, PackStats, Packer};
pub use reader::{dataset_files, read_rows, RawRow, Rows, Source};
pub use schema::{parse_row, DataRow, Example, Message, PromptInput, Schema};
pub use select::{select, Selection, DEFAULT_EVAL_FRACTION};
pub use tokenize::{
    tokenize_pairs, tokenize_sequences, Encoder, TokenizeOptions, TokenizeStats, TokenizedPair,
    TokenizedSequence,
};
pub use truncate::{truncate_pair, truncate_sequence, Truncated, Truncation};
