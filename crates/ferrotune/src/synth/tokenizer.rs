//! Training the world's tokenizer with the `tokenizers` crate: byte-level BPE (any text
//! round-trips), every digit its own pre-token (so a number is always one token per digit, as
//! Qwen2 does), ChatML special tokens and chat template, written as an HF tokenizer directory
//! (`tokenizer.json`, `tokenizer_config.json`) that [`crate::io::Tokenizer::from_dir`] and
//! transformers load.

use std::collections::HashSet;
use std::path::Path;

use serde_json::{json, Map, Value};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// The special tokens, ids 0, 1, 2 of the trained vocabulary.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// End of turn (the eos of chat training and generation).
pub const EOS_TOKEN: &str = "<|im_end|>";
pub const PAD_TOKEN: &str = "<|endoftext|>";
/// A plain ChatML template, with no default system turn: Qwen2.5's adds ~11 tokens of "You are
/// a helpful assistant." to every row, a quarter of a quickstart chat, for nothing the tiny
/// model can use.
pub const CHAT_TEMPLATE: &str = "{%- for message in messages %}\n    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";
/// The default vocabulary size: the 256 bytes, 3 special tokens and up to 125 merges.
pub const DEFAULT_VOCAB_SIZE: usize = 384;
/// Written as tokenizer_config.json's `model_max_length`.
pub const MODEL_MAX_LENGTH: usize = 1024;

fn tk_error(out_dir: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::file(out_dir, format!("{what}: {e}"))
}

/// The verdict words: each must be one token, so that p(Yes) and p(No) are read at different
/// first tokens (CONTRACTS "Generation and verification").
pub const VERDICT_WORDS: [&str; 2] = [" Yes", " No"];
/// Merges the verdict words need (`Ġ`+`Y`, `ĠY`+`e`, `ĠYe`+`s`, `Ġ`+`N`, `ĠN`+`o` at most).
const VERDICT_MERGES: usize = 5;

/// Trains a byte-level BPE of at most `vocab_size` tokens (special tokens included) on
/// `texts` and writes `tokenizer.json` and `tokenizer_config.json` into `out_dir`.
///
/// The verdict words ` Yes` and ` No` are given as many extra occurrences as there are texts,
/// so their merges come first and each is one token whatever the corpus (checked after
/// training; an error if not).
pub fn train_tokenizer(
    texts: impl Iterator<Item = String>,
    vocab_size: usize,
    out_dir: &Path,
) -> Result<()> {
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let minimum = alphabet.len() + SPECIAL_TOKENS.len() + VERDICT_MERGES;
    if vocab_size < minimum {
        return Err(Error::invalid(format!(
            "vocab_size {vocab_size} is below the byte alphabet, special tokens and verdict words ({minimum})"
        )));
    }
    let mut texts: Vec<String> = texts.collect();
    let boost = VERDICT_WORDS.concat();
    texts.extend(std::iter::repeat_n(boost, texts.len().max(1)));
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]))));
    tokenizer.with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(
        false, false, true,
    ))));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(alphabet)
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| tk_error(out_dir, "tokenizer training failed", e))?;

    for word in VERDICT_WORDS {
        let ids = tokenizer
            .encode(word, false)
            .map_err(|e| tk_error(out_dir, "encode failed", e))?;
        if ids.len() != 1 {
            return Err(Error::invalid(format!(
                "the trained tokenizer splits {word:?} into {} tokens",
                ids.len()
            )));
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let path = out_dir.join("tokenizer.json");
    tokenizer
        .save(&path, true)
        .map_err(|e| tk_error(&path, "cannot write", e))?;

    let mut decoder = Map::new();
    for token in SPECIAL_TOKENS {
        let id = tokenizer
            .token_to_id(token)
            .ok_or_else(|| Error::file(&path, format!("{token} missing")))?;
        decoder.insert(
            id.to_string(),
            json!({"content": token, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}),
        );
    }
    let config = json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": Value::Object(decoder),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": null,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": null
    });
    let path = out_dir.join("tokenizer_config.json");
    let mut text = serde_json::to_string_pretty(&config).expect("serialisable");
    text.push('\n');
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Encoder, Message};
    use crate::io::Tokenizer;
    use crate::synth::files::{build_world, WorldConfig};
    use crate::synth::world::Wording;

    #[test]
    fn trained_tokenizer_loads_round_trips_and_splits_digits() {
        for wording in [Wording::Terse, Wording::Words] {
            let world = build_world(
                &WorldConfig {
                    seed: 4,
                    wording,
                    n_test: 50,
                    ..WorldConfig::default()
                }
                .with_size(200),
            )
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            train_tokenizer(world.texts(), DEFAULT_VOCAB_SIZE, dir.path()).unwrap();
            let tok = Tokenizer::from_dir(dir.path(), None).unwrap();
            assert!(
                tok.vocab_size() <= DEFAULT_VOCAB_SIZE,
                "{}",
                tok.vocab_size()
            );
            assert!(
                tok.vocab_size() > 300,
                "few merges learned: {}",
                tok.vocab_size()
            );
            assert_eq!(tok.eos_token.as_deref(), Some(EOS_TOKEN));
            assert_eq!(tok.pad_token.as_deref(), Some(PAD_TOKEN));
            for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
                assert_eq!(tok.token_to_id(s), Some(i as u32));
                assert_eq!(tok.encode(s, false).unwrap(), vec![i as u32]);
            }
            for text in world.texts().chain(["héllo wörld ✓ 🙂\t\n".to_string()]) {
                let ids = tok.encode(&text, false).unwrap();
                assert_eq!(tok.decode(&ids, false).unwrap(), text);
            }
            // Every digit is its own token, wherever it stands.
            for text in ["1234567890", " 42", "x99+100=199 #### 199", "A: 7*8=56"] {
                let ids = tok.encode(text, false).unwrap();
                let digits = text.chars().filter(char::is_ascii_digit).count();
                let digit_tokens = ids
                    .iter()
                    .filter(|&&id| {
                        let piece = tok.decode(&[id], false).unwrap();
                        assert!(
                            !piece.chars().any(|c| c.is_ascii_digit()) || piece.len() == 1,
                            "{text:?}: token {piece:?} mixes a digit with more"
                        );
                        piece.len() == 1 && piece.chars().all(|c| c.is_ascii_digit())
                    })
                    .count();
                assert_eq!(digit_tokens, digits, "{text:?}");
            }
            // The verdicts begin with different tokens.
            let yes = tok.encode(" Yes", false).unwrap();
            let no = tok.encode(" No", false).unwrap();
            assert_eq!((yes.len(), no.len()), (1, 1));
            assert_ne!(yes[0], no[0]);
            let verdict = tok.encode("(Yes/No)? Yes", false).unwrap();
            assert_eq!(verdict.last(), yes.last());
            // The chat template renders ChatML and the encoder masks through it.
            let rendered = tok
                .apply_chat_template(&json!([{"role": "user", "content": "1+2=?"}]), true)
                .unwrap();
            assert_eq!(
                rendered,
                "<|im_start|>user\n1+2=?<|im_end|>\n<|im_start|>assistant\n"
            );
            let encoder = Encoder::new(&tok).unwrap();
            let seq = encoder
                .chat(&[Message::user("1+2=?"), Message::assistant("1+2=3 #### 3")])
                .unwrap();
            let target_ids: Vec<u32> = seq.target_ids();
            assert_eq!(
                tok.decode(&target_ids, false).unwrap(),
                "1+2=3 #### 3<|im_end|>"
            );
        }
    }

    #[test]
    fn training_is_deterministic() {
        let world = build_world(
            &WorldConfig {
                seed: 9,
                n_test: 20,
                ..WorldConfig::default()
            }
            .with_size(100),
        )
        .unwrap();
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        train_tokenizer(world.texts(), 320, a.path()).unwrap();
        train_tokenizer(world.texts(), 320, b.path()).unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap(),
                "{f}"
            );
        }
        assert!(train_tokenizer(world.texts(), 100, a.path()).is_err());
        train_tokenizer(world.texts(), 264, a.path()).unwrap();
    }
}
