//! Examples to token ids and loss targets, through the model's chat template, exactly as
//! CONTRACTS "Masks and losses" says. `targets[i]` means token i is a loss target, predicted
//! from the tokens before it (so token 0 never is).
//!
//! - **Chat / SFT** ([`Encoder::chat`]): the full render is tokenized once, without adding
//!   special tokens (templates write them). For each assistant message i the target span is
//!   `render(messages[..=i])` after `render(messages[..i], add_generation_prompt=true)`: its
//!   content and the end-of-turn token that closes it (`<|im_end|>`). Tokens are mapped to the
//!   span by their byte offsets (a token that straddles the span's start counts, as in
//!   transformers' `return_assistant_tokens_mask`); trailing whitespace-only tokens of the span
//!   (the `\n` after `<|im_end|>`) are not targets. Both renders must be prefixes of the full
//!   render; a template that renders earlier turns differently once later turns follow (Qwen3
//!   drops earlier reasoning) cannot be masked this way and gives an error.
//! - **Preference** ([`Encoder::pair`]): the prompt is `render(prompt, add_generation_prompt=true)`
//!   tokenized once; each answer is the rest of `render(prompt + [answer])`, tokenized on its own
//!   and appended, so no BPE merge crosses the seam and the system prompt is not repeated.
//!   Targets follow the same rule.
//! - **GenRM** ([`Encoder::genrm`]): `encode(inputs)` (with the tokenizer's own special tokens,
//!   e.g. a BOS) + `encode(targets)` + eos, tokenized separately; every token of `targets` and
//!   the eos are targets (the eos teaches the verifier to stop after Yes/No).
//! - **Text** ([`Encoder::text`]): `encode(text)` (with special tokens) + eos, every token a
//!   target but the first; `pack.rs` packs documents for pretraining.
//! - **QA / solution** rows train as the chat `[user: question, assistant: answer]`.
//!
//! [`tokenize_sequences`] and [`tokenize_pairs`] do a whole dataset: they apply `--max-length`
//! and `--truncation` (see `truncate.rs`), and warn about, count and drop rows left with no
//! target token (they would train nothing).

use std::sync::OnceLock;

use serde::Serialize;

use super::dataset::BadRows;
use super::schema::{DataRow, Example, Message, PromptInput, Schema};
use super::truncate::{truncate_pair, truncate_sequence, Truncated, Truncation};
use crate::error::{Error, Result};
use crate::io::Tokenizer;

/// Token ids and which of them are loss targets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenizedSequence {
    pub input_ids: Vec<u32>,
    pub targets: Vec<bool>,
}

impl TokenizedSequence {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    pub fn num_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t).count()
    }
    /// The ids of the target tokens, in order.
    pub fn target_ids(&self) -> Vec<u32> {
        self.input_ids
            .iter()
            .zip(&self.targets)
            .filter(|(_, &t)| t)
            .map(|(&id, _)| id)
            .collect()
    }
    /// Appends `ids`, all targets or none.
    pub fn push(&mut self, ids: &[u32], target: bool) {
        self.input_ids.extend_from_slice(ids);
        self.targets.extend(std::iter::repeat_n(target, ids.len()));
    }
}

/// A preference pair: both sequences start with the same `prompt_len` prompt tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    pub chosen: TokenizedSequence,
    pub rejected: TokenizedSequence,
    pub prompt_len: usize,
}

impl TokenizedPair {
    /// The longer of the two sequences.
    pub fn max_len(&self) -> usize {
        self.chosen.len().max(self.rejected.len())
    }
}

/// Turns examples into token ids and targets with one model's tokenizer and chat template.
///
/// It holds its own copies of the `tokenizers` tokenizer with truncation and padding switched
/// off (a `tokenizer.json` may set them, and they would silently cut rows), one of them also
/// without its post-processor: with `add_special_tokens=false` a post-processor adds no ids but
/// may trim whitespace out of the offsets (`ByteLevel` with `trim_offsets`), which would hide
/// whitespace tokens from the span mapping.
pub struct Encoder<'t> {
    tokenizer: &'t Tokenizer,
    plain: tokenizers::Tokenizer,
    with_specials: OnceLock<tokenizers::Tokenizer>,
}

impl<'t> Encoder<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Result<Self> {
        let mut plain = tokenizer.inner().clone();
        plain
            .with_truncation(None)
            .map_err(|e| Error::invalid(format!("tokenizer: {e}")))?;
        plain.with_padding(None);
        plain.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        Ok(Encoder {
            tokenizer,
            plain,
            with_specials: OnceLock::new(),
        })
    }

    pub fn tokenizer(&self) -> &'t Tokenizer {
        self.tokenizer
    }

    fn encode_error(&self, e: impl std::fmt::Display) -> Error {
        Error::invalid(format!(
            "tokenizer {}: encode failed: {e}",
            self.tokenizer.dir.display()
        ))
    }

    /// Token ids of `text`; with `add_special_tokens` the tokenizer's post-processor adds its
    /// special tokens (a Llama BOS), as `tokenizer(text)` does in transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let tokenizer = if add_special_tokens {
            self.with_specials.get_or_init(|| {
                let mut t = self.tokenizer.inner().clone();
                // Both calls only clear settings; they cannot fail without a truncation.
                let _ = t.with_truncation(None);
                t.with_padding(None);
                t
            })
        } else {
            &self.plain
        };
        let encoding = tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| self.encode_error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids and byte offsets of `text`, no special tokens added.
    fn encode_with_offsets(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.plain
            .encode(text, false)
            .map_err(|e| self.encode_error(e))
    }

    fn eos_id(&self) -> Result<u32> {
        self.tokenizer.eos_token_id.ok_or_else(|| {
            Error::file(
                &self.tokenizer.dir,
                "the tokenizer has no eos token (tokenizer_config.json `eos_token`)",
            )
        })
    }

    /// The chat template's render of `messages`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let value = serde_json::to_value(messages).expect("messages serialise");
        self.tokenizer
            .apply_chat_template(&value, add_generation_prompt)
    }

    /// The prompt ids a generation starts from: messages rendered with the generation prompt,
    /// or raw text encoded with the tokenizer's special tokens.
    pub fn prompt(&self, prompt: &PromptInput) -> Result<Vec<u32>> {
        match prompt {
            PromptInput::Messages(messages) => self.encode(&self.render(messages, true)?, false),
            PromptInput::Text(text) => self.encode(text, true),
        }
    }

    /// A conversation with every assistant message's span as targets (see the module docs).
    pub fn chat(&self, messages: &[Message]) -> Result<TokenizedSequence> {
        let full = self.render(messages, false)?;
        let encoding = self.encode_with_offsets(&full)?;
        let (ids, offsets) = (encoding.get_ids(), encoding.get_offsets());
        let mut targets = vec![false; ids.len()];
        for (i, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) {
                return Err(Error::invalid(format!(
                    "message {i}: the chat template's render of the messages before it with the generation prompt is not a prefix of the render through it, so its target tokens cannot be found (render before: {:?})",
                    tail(&before)
                )));
            }
            if !full.starts_with(&through) {
                return Err(Error::invalid(format!(
                    "message {i}: the chat template renders the conversation up to this message differently once later messages follow (e.g. it drops earlier reasoning), so its target tokens cannot be found by prefix rendering"
                )));
            }
            let span = before.len()..through.len();
            let mut in_span: Vec<usize> = (0..ids.len())
                .filter(|&k| {
                    let (start, end) = offsets[k];
                    if start == end {
                        span.contains(&start)
                    } else {
                        start < span.end && end > span.start
                    }
                })
                .collect();
            self.drop_trailing_whitespace(&full, ids, offsets, &mut in_span)?;
            for k in in_span {
                targets[k] = true;
            }
        }
        if let Some(first) = targets.first_mut() {
            *first = false;
        }
        Ok(TokenizedSequence {
            input_ids: ids.to_vec(),
            targets,
        })
    }

    /// Removes whitespace-only tokens from the end of `tokens` (indices into `ids`).
    fn drop_trailing_whitespace(
        &self,
        text: &str,
        ids: &[u32],
        offsets: &[(usize, usize)],
        tokens: &mut Vec<usize>,
    ) -> Result<()> {
        while let Some(&k) = tokens.last() {
            let (start, end) = offsets[k];
            let whitespace = if start < end {
                text.get(start..end).is_some_and(|s| s.trim().is_empty())
            } else {
                self.plain
                    .decode(&ids[k..=k], false)
                    .map_err(|e| self.encode_error(e))?
                    .trim()
                    .is_empty()
            };
            if !whitespace {
                break;
            }
            tokens.pop();
        }
        Ok(())
    }

    /// A preference pair (see the module docs).
    pub fn pair(
        &self,
        prompt: &[Message],
        chosen: &Message,
        rejected: &Message,
    ) -> Result<TokenizedPair> {
        let prompt_text = self.render(prompt, true)?;
        let prompt_ids = self.encode(&prompt_text, false)?;
        let mut sides = Vec::with_capacity(2);
        for (name, answer) in [("chosen", chosen), ("rejected", rejected)] {
            let mut messages = prompt.to_vec();
            messages.push(answer.clone());
            let full = self.render(&messages, false)?;
            let completion = full.strip_prefix(&prompt_text).ok_or_else(|| {
                Error::invalid(format!(
                    "{name}: the chat template's render of the prompt with the generation prompt is not a prefix of the render with the answer (render of prompt ends {:?})",
                    tail(&prompt_text)
                ))
            })?;
            let encoding = self.encode_with_offsets(completion)?;
            let (ids, offsets) = (encoding.get_ids(), encoding.get_offsets());
            let mut kept: Vec<usize> = (0..ids.len()).collect();
            self.drop_trailing_whitespace(completion, ids, offsets, &mut kept)?;
            let mut sequence = TokenizedSequence::default();
            sequence.push(&prompt_ids, false);
            sequence.push(ids, false);
            for k in kept {
                sequence.targets[prompt_ids.len() + k] = true;
            }
            if let Some(first) = sequence.targets.first_mut() {
                *first = false;
            }
            sides.push(sequence);
        }
        let rejected = sides.pop().expect("two sides");
        let chosen = sides.pop().expect("two sides");
        Ok(TokenizedPair {
            chosen,
            rejected,
            prompt_len: prompt_ids.len(),
        })
    }

    /// A GenRM row: inputs as context, every token of `targets` and an eos as targets.
    pub fn genrm(&self, inputs: &str, targets: &str) -> Result<TokenizedSequence> {
        let mut sequence = TokenizedSequence::default();
        sequence.push(&self.encode(inputs, true)?, false);
        sequence.push(&self.encode(targets, false)?, true);
        sequence.push(&[self.eos_id()?], true);
        if let Some(first) = sequence.targets.first_mut() {
            *first = false;
        }
        Ok(sequence)
    }

    /// A plain-text document: its tokens and an eos, all targets but the first.
    pub fn text(&self, text: &str) -> Result<TokenizedSequence> {
        let mut sequence = TokenizedSequence::default();
        sequence.push(&self.encode(text, true)?, true);
        sequence.push(&[self.eos_id()?], true);
        sequence.targets[0] = false;
        Ok(sequence)
    }

    /// The sequence a single-sequence objective (SFT, GenRM, pretraining) trains on for this
    /// example; an error for prompts, which have no answer.
    pub fn sequence(&self, example: &Example) -> Result<TokenizedSequence> {
        match example {
            Example::Genrm { inputs, targets } => self.genrm(inputs, targets),
            Example::Text { text } => self.text(text),
            Example::Prompt(_) => Err(Error::invalid(
                "a prompts row has no answer to train on (use it for generation)",
            )),
            other => self.chat(&other.sft_messages().expect("chat-like schemas")),
        }
    }
}

fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(60);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The field a tokenization error of a row is reported against.
fn field_of(schema: Schema) -> &'static str {
    match schema {
        Schema::Genrm => "targets",
        Schema::Preference => "chosen",
        Schema::Chat => "messages",
        Schema::Qa => "answer",
        Schema::Solution => "solution",
        Schema::Prompts => "prompt",
        Schema::Text => "text",
    }
}

#[derive(Debug, Clone, Default)]
pub struct TokenizeOptions {
    /// Longest sequence kept (tokens); `None` keeps every length.
    pub max_length: Option<usize>,
    pub truncation: Truncation,
    /// Skip and count rows the template or tokenizer rejects instead of stopping.
    pub skip_bad_rows: bool,
}

/// What tokenizing a dataset did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TokenizeStats {
    /// Rows in.
    pub rows: usize,
    /// Rows out.
    pub kept: usize,
    /// Rows cut to `max_length` (kept).
    pub truncated: usize,
    /// Rows dropped for length (`--truncation drop`).
    pub dropped: usize,
    /// Rows dropped because no token was a target (after truncation).
    pub no_target_rows: usize,
    /// Rows the template or tokenizer rejected (only with `skip_bad_rows`).
    pub bad_rows: BadRows,
}

const MAX_NO_TARGET_WARNINGS: usize = 5;

impl TokenizeStats {
    fn no_targets(&mut self, row: &DataRow) {
        self.no_target_rows += 1;
        if self.no_target_rows <= MAX_NO_TARGET_WARNINGS {
            tracing::warn!(
                "{}: no target tokens (no assistant turn, or truncation cut them all): the row trains nothing and is dropped",
                row.source
            );
        }
    }

    fn finish(&self, what: &str) {
        if self.no_target_rows > 0 {
            tracing::warn!(
                "{what}: {} of {} rows had no target tokens and were dropped",
                self.no_target_rows,
                self.rows
            );
        }
        if self.truncated + self.dropped > 0 {
            tracing::info!(
                "{what}: {} rows truncated, {} dropped for length",
                self.truncated,
                self.dropped
            );
        }
    }

    fn bad(&mut self, row: &DataRow, error: Error, skip: bool) -> Result<()> {
        let error = match error {
            e @ Error::Row { .. } => e,
            e => row
                .source
                .error(field_of(row.example.schema()), e.to_string()),
        };
        self.bad_rows.handle(error, skip)
    }
}

/// Tokenizes rows for a single-sequence objective (SFT, GenRM, plain LM without packing),
/// applying truncation and dropping rows without targets. Errors name the row.
pub fn tokenize_sequences(
    encoder: &Encoder,
    rows: &[DataRow],
    options: &TokenizeOptions,
) -> Result<(Vec<TokenizedSequence>, TokenizeStats)> {
    let mut stats = TokenizeStats {
        rows: rows.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut sequence = match encoder.sequence(&row.example) {
            Ok(s) => s,
            Err(e) => {
                stats.bad(row, e, options.skip_bad_rows)?;
                continue;
            }
        };
        if let Some(max_length) = options.max_length {
            match truncate_sequence(&mut sequence, max_length, options.truncation) {
                Truncated::Kept => {}
                Truncated::Truncated => stats.truncated += 1,
                Truncated::Dropped => {
                    stats.dropped += 1;
                    continue;
                }
            }
        }
        if sequence.num_targets() == 0 {
            stats.no_targets(row);
            continue;
        }
        out.push(sequence);
    }
    stats.kept = out.len();
    stats.finish("tokenize");
    Ok((out, stats))
}

/// Tokenizes preference rows into pairs, applying truncation; a pair where either side has no
/// target is dropped and counted.
pub fn tokenize_pairs(
    encoder: &Encoder,
    rows: &[DataRow],
    options: &TokenizeOptions,
) -> Result<(Vec<TokenizedPair>, TokenizeStats)> {
    let mut stats = TokenizeStats {
        rows: rows.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let Example::Preference {
            prompt,
            chosen,
            rejected,
        } = &row.example
        else {
            return Err(row.source.error(
                "(row)",
                format!(
                    "a preference objective needs preference rows, this dataset is `{}`",
                    row.example.schema()
                ),
            ));
        };
        let mut pair = match encoder.pair(prompt, chosen, rejected) {
            Ok(p) => p,
            Err(e) => {
                stats.bad(row, e, options.skip_bad_rows)?;
                continue;
            }
        };
        if let Some(max_length) = options.max_length {
            match truncate_pair(&mut pair, max_length, options.truncation) {
                Truncated::Kept => {}
                Truncated::Truncated => stats.truncated += 1,
                Truncated::Dropped => {
                    stats.dropped += 1;
                    continue;
                }
            }
        }
        if pair.chosen.num_targets() == 0 || pair.rejected.num_targets() == 0 {
            stats.no_targets(row);
            continue;
        }
        out.push(pair);
    }
    stats.kept = out.len();
    stats.finish("tokenize pairs");
    Ok((out, stats))
}
