//! Batched generation over the external KV cache.
//!
//! Prompts of different lengths share a batch (left padded in the prefill, so every row's
//! next token lands in the same cache slot). The K samples of one prompt compute the prompt's
//! cache once and fork it (prefix sharing). Finished rows are dropped from the batch at once,
//! so they stop costing compute. Each sample draws from its own generator seeded by (seed,
//! item, sample index): the same seed gives the same text whatever batch it lands in.
//!
//! `generate_sharded` deals the same groups out across the ranks of a multi-process job
//! (dist::shard), so every group is computed exactly as one process computes it and the gathered
//! completions equal the single-process ones bit for bit (the logits of a row do depend, in their
//! last bits, on the batch it shares).

use candle_core::Tensor;

use super::sampler::{sample, sample_rng, SamplingParams};
use crate::error::{Error, Result};
use crate::io::Tokenizer;
use crate::model::{Decoder, KvCache, LogitsAt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// The item index that seeds its sample streams.
    pub item: u64,
    /// Number of samples to draw.
    pub n: usize,
    /// Index of the first sample: samples `first_sample..first_sample + n` are drawn, each from
    /// its own (seed, item, index) stream, so a later batch continues an earlier one.
    pub first_sample: usize,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Completion {
    /// Position of the prompt in the request list.
    pub prompt: usize,
    pub sample_index: usize,
    /// Generated ids, without the prompt; the stop token is included when one ended it.
    pub ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// The stop string that ended it, when one did (the text should be cut before it).
    pub stop_string: Option<String>,
    /// With `GenerateOptions::capture_after_stop`: the next-token probabilities (T = 1) of
    /// those ids right after the stop string.
    pub captured: Option<Vec<f64>>,
}

pub struct GenerateOptions<'a> {
    pub params: SamplingParams,
    pub seed: u64,
    /// Token ids that end a sequence (e.g. the tokenizer's eos and end-of-turn ids).
    pub stop_ids: Vec<u32>,
    /// Rows (prompts × samples) per batch.
    pub batch_size: usize,
    /// Needed for stop strings.
    pub tokenizer: Option<&'a Tokenizer>,
    /// When a stop string ends a row, run one more step for it and record the next-token
    /// probabilities of these ids (a GenRM rationale ending at its verdict question gets
    /// p(Yes)/p(No) this way, without a second pass over the whole text).
    pub capture_after_stop: Option<Vec<u32>>,
}

/// Generates `n` samples for each prompt. Completions come back in (prompt, sample) order.
pub fn generate(
    decoder: &Decoder,
    prompts: &[Prompt],
    options: &GenerateOptions,
) -> Result<Vec<Completion>> {
    let max_positions = decoder.config().max_position_embeddings;
    for (i, p) in prompts.iter().enumerate() {
        if p.ids.is_empty() {
            return Err(Error::invalid(format!(
                "prompt {i} is empty: there is no token to continue from"
            )));
        }
        if p.ids.len() >= max_positions {
            return Err(Error::invalid(format!(
                "prompt {i} has {} tokens; the model's context is {max_positions}",
                p.ids.len()
            )));
        }
    }
    let mut out = Vec::new();
    for group in groups(prompts, options.batch_size) {
        let start = group.start;
        out.extend(generate_group(decoder, &prompts[group], start, options)?);
    }
    Ok(out)
}

/// Prompts grouped so that a group's samples fill about one batch: consecutive ranges.
pub fn groups(prompts: &[Prompt], batch_size: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < prompts.len() {
        let mut rows = 0;
        let mut end = start;
        while end < prompts.len() && (end == start || rows + prompts[end].n <= batch_size.max(1)) {
            rows += prompts[end].n;
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// As [`generate`], with the groups dealt out across the ranks of a multi-process job and every
/// completion gathered on every rank, in order: the same output as `generate` in one process.
pub fn generate_sharded(
    decoder: &Decoder,
    prompts: &[Prompt],
    options: &GenerateOptions,
) -> Result<Vec<Completion>> {
    if crate::dist::world().size() == 1 {
        return generate(decoder, prompts, options);
    }
    let groups = groups(prompts, options.batch_size);
    let per_group = crate::dist::all_map(groups.len(), |g| {
        let range = groups[g].clone();
        let mut completions = generate(decoder, &prompts[range.clone()], options)?;
        for c in &mut completions {
            c.prompt += range.start;
        }
        Ok(completions)
    })?;
    Ok(per_group.into_iter().flatten().collect())
}

struct Row {
    prompt: usize,
    sample_index: usize,
    rng: rand::rngs::StdRng,
    ids: Vec<u32>,
    prompt_len: usize,
    /// Ended by this stop string; waiting for one more step to capture the next logits.
    capturing: Option<String>,
}

/// What a decoding step hands the sampler: every row's logits, or (greedy on a GPU) only the
/// chosen ids.
enum Next {
    Logits(Vec<Vec<f32>>),
    Ids(Vec<u32>),
}

fn generate_group(
    decoder: &Decoder,
    prompts: &[Prompt],
    offset: usize,
    options: &GenerateOptions,
) -> Result<Vec<Completion>> {
    let device = decoder.device().clone();
    let max_positions = decoder.config().max_position_embeddings;
    let width = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(prompts.len() * width);
    let mut mask = Vec::with_capacity(prompts.len());
    for p in prompts {
        let pad = width - p.ids.len();
        ids.extend(std::iter::repeat_n(0u32, pad));
        ids.extend_from_slice(&p.ids);
        mask.push([vec![false; pad], vec![true; p.ids.len()]].concat());
    }
    let params = &options.params;
    // Greedy rows need only each row's argmax: on a GPU it is taken there, so the ids cross to
    // the host instead of [rows, vocab] logits (the same first-maximum rule as `sample`).
    let greedy_on_device = crate::device::own_cuda_kernels(&device, crate::device::Kernels::Argmax)
        && params.temperature <= 0.0
        && options.capture_after_stop.is_none();
    let read = |logits: Tensor| -> Result<Next> {
        Ok(if greedy_on_device {
            Next::Ids(super::sampler::argmax_rows(&logits)?)
        } else {
            Next::Logits(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
        })
    };
    let mut cache = KvCache::new(decoder.config(), prompts.len());
    let input = Tensor::from_vec(ids, (prompts.len(), width), &device)?;
    let prompt_next =
        read(decoder.forward_step(&input, Some(&mask), &mut cache, LogitsAt::Last)?)?;

    // Fork each prompt's cache into its samples.
    let mut fork = Vec::new();
    let mut rows = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for s in 0..p.n {
            fork.push(i);
            rows.push(Row {
                prompt: offset + i,
                sample_index: p.first_sample + s,
                rng: sample_rng(options.seed, p.item, (p.first_sample + s) as u64),
                ids: Vec::new(),
                prompt_len: p.ids.len(),
                capturing: None,
            });
        }
    }
    let mut cache = cache.select_rows(&fork)?;
    let mut next = match prompt_next {
        Next::Logits(l) => Next::Logits(fork.iter().map(|&i| l[i].clone()).collect()),
        Next::Ids(ids) => Next::Ids(fork.iter().map(|&i| ids[i]).collect()),
    };
    let mut done: Vec<Completion> = Vec::new();
    // Tokens enough to spell the longest stop string (a token is at least one byte), plus one.
    let stop_window = params
        .stop_strings
        .iter()
        .map(|s| s.len())
        .max()
        .unwrap_or(0)
        + 1;
    loop {
        // Sample one token for every active row and decide who finished.
        let mut keep = Vec::with_capacity(rows.len());
        let mut next_tokens = Vec::with_capacity(rows.len());
        for (r, row) in rows.iter_mut().enumerate() {
            if let Some(stop) = row.capturing.take() {
                let Next::Logits(logits) = &next else {
                    return Err(Error::invalid(
                        "internal: a captured row without its logits",
                    ));
                };
                let probs = super::sampler::probabilities(&logits[r], 1.0);
                let ids = options.capture_after_stop.as_deref().unwrap_or(&[]);
                done.push(Completion {
                    prompt: row.prompt,
                    sample_index: row.sample_index,
                    ids: std::mem::take(&mut row.ids),
                    finish_reason: FinishReason::Stop,
                    stop_string: Some(stop),
                    captured: Some(ids.iter().map(|&i| probs[i as usize]).collect()),
                });
                continue;
            }
            let token = match &next {
                Next::Logits(logits) => sample(&logits[r], params, &mut row.rng),
                Next::Ids(ids) => ids[r],
            };
            row.ids.push(token);
            let mut finish = None;
            let mut stop_string = None;
            if options.stop_ids.contains(&token) {
                finish = Some(FinishReason::Stop);
            } else if !params.stop_strings.is_empty() {
                if let Some(tok) = options.tokenizer {
                    // Only the tail can hold a stop string that this token completed; decoding
                    // the whole completion every step would cost O(length²).
                    let window = row.ids.len().saturating_sub(stop_window);
                    let text = tok.decode(&row.ids[window..], false)?;
                    if let Some(s) = params
                        .stop_strings
                        .iter()
                        .find(|s| text.contains(s.as_str()))
                    {
                        finish = Some(FinishReason::Stop);
                        stop_string = Some(s.clone());
                    }
                }
            }
            if finish.is_none()
                && (row.ids.len() >= params.max_new_tokens
                    || row.prompt_len + row.ids.len() >= max_positions)
            {
                finish = Some(FinishReason::Length);
            }
            let room = row.prompt_len + row.ids.len() < max_positions;
            if let (Some(stop), true, true) =
                (&stop_string, options.capture_after_stop.is_some(), room)
            {
                // Keep the row one more step to read the distribution after the stop string.
                row.capturing = Some(stop.clone());
                keep.push(r);
                next_tokens.push(token);
                continue;
            }
            match finish {
                Some(reason) => done.push(Completion {
                    prompt: row.prompt,
                    sample_index: row.sample_index,
                    ids: std::mem::take(&mut row.ids),
                    finish_reason: reason,
                    stop_string,
                    captured: None,
                }),
                None => {
                    keep.push(r);
                    next_tokens.push(token);
                }
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < rows.len() {
            cache = cache.select_rows(&keep)?;
            let mut kept_rows = Vec::with_capacity(keep.len());
            for (r, row) in rows.into_iter().enumerate() {
                if keep.binary_search(&r).is_ok() {
                    kept_rows.push(row);
                }
            }
            rows = kept_rows;
        }
        let input = Tensor::from_vec(next_tokens, (rows.len(), 1), &device)?;
        next = read(decoder.forward_step(&input, None, &mut cache, LogitsAt::Last)?)?;
    }
    done.sort_by_key(|c| (c.prompt, c.sample_index));
    Ok(done)
}
