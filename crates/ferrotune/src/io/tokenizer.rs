//! The tokenizer of a model directory: `tokenizer.json` through the `tokenizers` crate, the
//! special tokens and the chat template.
//!
//! Where the end-of-sequence token comes from (Qwen2.5 base lists `<|endoftext|>` as eos in
//! config.json and generation_config.json but `<|im_end|>` in tokenizer_config.json):
//! - `eos_token` (the string templates see, and the token that closes a training target) is
//!   `tokenizer_config.json`'s `eos_token`, exactly as transformers' `tokenizer.eos_token`;
//!   only when it is absent do we fall back to generation_config.json, then config.json.
//! - Generation stops on any of: tokenizer_config's eos, generation_config.json's
//!   `eos_token_id` (all of them, it may be a list), config.json's `eos_token_id`. transformers'
//!   `generate` stops on generation_config's list; adding the tokenizer's eos makes a chat model
//!   stop at its end-of-turn even when the base model's config names another token.
//! - `pad_token`: tokenizer_config.json, then generation_config.json / config.json
//!   `pad_token_id`, then the eos token (TRL's fallback for models without a pad token).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::chat_template::{ChatTemplate, TemplateTokens};
use crate::error::{read_json, read_to_string, Error, Result};
use crate::model::config::token_ids;

pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (see the module docs).
    pub stop_token_ids: Vec<u32>,
    pub chat_template: Option<ChatTemplate>,
    pub dir: PathBuf,
}

/// A special token in tokenizer_config.json: a string, or an AddedToken object with `content`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads the tokenizer of a model directory. `config_json` is the model's config.json (for
    /// its eos/pad ids) when there is one.
    pub fn from_dir(dir: &Path, config_json: Option<&Value>) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.exists() {
            return Err(Error::file(dir, "no tokenizer.json in this directory"));
        }
        let inner = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::file(&tokenizer_path, format!("cannot load tokenizer: {e}")))?;
        let config_path = dir.join("tokenizer_config.json");
        let tok_config = if config_path.exists() {
            read_json(&config_path)?
        } else {
            Value::Object(Default::default())
        };
        let gen_path = dir.join("generation_config.json");
        let gen_config = if gen_path.exists() {
            Some(read_json(&gen_path)?)
        } else {
            None
        };

        let template_file = dir.join("chat_template.jinja");
        let template_source = if template_file.exists() {
            Some(read_to_string(&template_file)?)
        } else {
            match tok_config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // Some tokenizers ship several named templates; "default" is the chat one.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        let chat_template = match template_source {
            Some(src) => Some(ChatTemplate::new(src).map_err(|e| {
                let file = if template_file.exists() {
                    &template_file
                } else {
                    &config_path
                };
                Error::file(file, e.to_string())
            })?),
            None => None,
        };

        let id_of = |s: &Option<String>| s.as_deref().and_then(|s| inner.token_to_id(s));
        let token_of = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i));
        let gen_eos = token_ids(gen_config.as_ref().and_then(|g| g.get("eos_token_id")));
        let cfg_eos = token_ids(config_json.and_then(|c| c.get("eos_token_id")));
        let gen_pad = token_ids(gen_config.as_ref().and_then(|g| g.get("pad_token_id")));
        let cfg_pad = token_ids(config_json.and_then(|c| c.get("pad_token_id")));

        let eos_token = token_string(tok_config.get("eos_token"))
            .or_else(|| token_of(gen_eos.first().copied()))
            .or_else(|| token_of(cfg_eos.first().copied()));
        let bos_token = token_string(tok_config.get("bos_token"));
        let unk_token = token_string(tok_config.get("unk_token"));
        let eos_token_id = id_of(&eos_token);
        let pad_token = token_string(tok_config.get("pad_token"))
            .or_else(|| token_of(gen_pad.first().copied()))
            .or_else(|| token_of(cfg_pad.first().copied()))
            .or_else(|| eos_token.clone());
        let pad_token_id = id_of(&pad_token);
        let bos_token_id = id_of(&bos_token);
        let mut stop_token_ids: Vec<u32> = eos_token_id
            .into_iter()
            .chain(gen_eos)
            .chain(cfg_eos)
            .collect();
        let mut seen = std::collections::HashSet::new();
        stop_token_ids.retain(|id| seen.insert(*id));

        Ok(Tokenizer {
            inner,
            bos_token,
            eos_token,
            pad_token,
            unk_token,
            eos_token_id,
            pad_token_id,
            bos_token_id,
            stop_token_ids,
            chat_template,
            dir: dir.to_path_buf(),
        })
    }

    /// Vocabulary size including added tokens (what must fit in the embedding).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The largest token id the tokenizer can produce, plus one.
    pub fn id_bound(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| {
            Error::invalid(format!(
                "tokenizer {}: encode failed: {e}",
                self.dir.display()
            ))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| {
            Error::invalid(format!(
                "tokenizer {}: decode failed: {e}",
                self.dir.display()
            ))
        })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn template_tokens(&self) -> TemplateTokens {
        TemplateTokens {
            bos_token: self.bos_token.clone(),
            eos_token: self.eos_token.clone(),
            pad_token: self.pad_token.clone(),
            unk_token: self.unk_token.clone(),
        }
    }

    /// Renders messages with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::file(
                &self.dir,
                "this tokenizer has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)",
            )
        })?;
        template.render(
            messages,
            add_generation_prompt,
            &self.template_tokens(),
            None,
        )
    }
}
