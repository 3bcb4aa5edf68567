//! The model configuration, read from an HF `config.json`.
//!
//! Two layouts exist in the wild and both are accepted: the classic one (top-level `rope_theta`,
//! `rope_scaling`, `torch_dtype`) and the transformers-5 one (`rope_parameters`, `dtype`). The
//! original JSON is kept so that saving writes back every key we do not interpret.

use std::path::Path;

use serde_json::Value;

use crate::error::{read_json, Error, Result};

/// The head on top of the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// `*ForCausalLM`: a vocabulary projection (`lm_head`, possibly tied to the embedding).
    CausalLm,
    /// `*ForSequenceClassification`: a `score` projection to `num_labels` read at the last
    /// non-pad token (our Bradley–Terry reward models use `num_labels = 1`).
    SequenceClassification,
}

/// Which decoder family: they differ only in where biases sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Qwen2: bias on q/k/v projections.
    Qwen2,
    /// Llama: biases controlled by `attention_bias` / `mlp_bias` (both false in released models).
    Llama,
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: String,
    pub model_type: String,
    pub family: Family,
    pub head: Head,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub num_labels: usize,
    /// The dtype the checkpoint declares (`torch_dtype` or `dtype`), e.g. "bfloat16".
    pub declared_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` may be a single id or a list in HF configs.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The JSON as read, so that `save` keeps keys we do not model.
    pub raw: Value,
}

fn get_usize(raw: &Value, key: &str, path: &Path) -> Result<Option<usize>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
            Error::file(
                path,
                format!("`{key}` must be a non-negative integer, got {v}"),
            )
        }),
    }
}

fn require_usize(raw: &Value, key: &str, path: &Path) -> Result<usize> {
    get_usize(raw, key, path)?
        .ok_or_else(|| Error::file(path, format!("missing required key `{key}`")))
}

fn get_f64(raw: &Value, key: &str, path: &Path) -> Result<Option<f64>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::file(path, format!("`{key}` must be a number, got {v}"))),
    }
}

fn get_bool(raw: &Value, key: &str, path: &Path) -> Result<Option<bool>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| Error::file(path, format!("`{key}` must be true or false, got {v}"))),
    }
}

/// `eos_token_id` and friends: an integer, a list of integers, or null.
pub(crate) fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw = read_json(path)?;
        Self::from_value(raw, path)
    }

    /// Interprets a parsed `config.json`; `path` is only used to name the file in errors.
    pub fn from_value(raw: Value, path: &Path) -> Result<Self> {
        if !raw.is_object() {
            return Err(Error::file(path, "config.json must hold a JSON object"));
        }
        let architecture = match raw.get("architectures").and_then(|a| a.as_array()) {
            Some(list) if !list.is_empty() => list[0]
                .as_str()
                .ok_or_else(|| Error::file(path, "`architectures` must list strings"))?
                .to_string(),
            _ => {
                return Err(Error::file(
                    path,
                    "missing `architectures` (e.g. [\"Qwen2ForCausalLM\"])",
                ))
            }
        };
        let (family, head) = match architecture.as_str() {
            "Qwen2ForCausalLM" => (Family::Qwen2, Head::CausalLm),
            "LlamaForCausalLM" => (Family::Llama, Head::CausalLm),
            "Qwen2ForSequenceClassification" => (Family::Qwen2, Head::SequenceClassification),
            "LlamaForSequenceClassification" => (Family::Llama, Head::SequenceClassification),
            other => {
                return Err(Error::file(
                    path,
                    format!(
                        "unsupported architecture `{other}`; supported: Qwen2ForCausalLM, LlamaForCausalLM, \
                         Qwen2ForSequenceClassification, LlamaForSequenceClassification"
                    ),
                ))
            }
        };
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or(match family {
                Family::Qwen2 => "qwen2",
                Family::Llama => "llama",
            })
            .to_string();
        if let Some(act) = raw.get("hidden_act").and_then(|v| v.as_str()) {
            if act != "silu" {
                return Err(Error::file(
                    path,
                    format!("hidden_act `{act}` is not supported (only `silu`)"),
                ));
            }
        }
        if get_bool(&raw, "use_sliding_window", path)?.unwrap_or(false) {
            return Err(Error::file(
                path,
                "use_sliding_window = true is not supported",
            ));
        }

        let vocab_size = require_usize(&raw, "vocab_size", path)?;
        let hidden_size = require_usize(&raw, "hidden_size", path)?;
        let intermediate_size = require_usize(&raw, "intermediate_size", path)?;
        let num_hidden_layers = require_usize(&raw, "num_hidden_layers", path)?;
        let num_attention_heads = require_usize(&raw, "num_attention_heads", path)?;
        let num_key_value_heads =
            get_usize(&raw, "num_key_value_heads", path)?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(Error::file(
                path,
                format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of \
                     num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        let head_dim = match get_usize(&raw, "head_dim", path)? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(Error::file(
                        path,
                        "hidden_size is not divisible by num_attention_heads",
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::file(
                path,
                format!("head_dim {head_dim} must be even for rotary embeddings"),
            ));
        }
        let max_position_embeddings =
            get_usize(&raw, "max_position_embeddings", path)?.unwrap_or(2048);
        let rms_norm_eps = get_f64(&raw, "rms_norm_eps", path)?.unwrap_or(1e-6);
        let (rope_theta, rope_scaling) = parse_rope(&raw, path)?;

        let declared_dtype = raw
            .get("dtype")
            .or_else(|| raw.get("torch_dtype"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let num_labels = match head {
            Head::CausalLm => 0,
            Head::SequenceClassification => get_usize(&raw, "num_labels", path)?
                .or_else(|| {
                    raw.get("id2label")
                        .and_then(|m| m.as_object())
                        .map(|m| m.len())
                })
                .unwrap_or(2),
        };

        Ok(ModelConfig {
            architecture,
            model_type,
            family,
            head,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: get_bool(&raw, "tie_word_embeddings", path)?.unwrap_or(false),
            attention_bias: match family {
                Family::Qwen2 => true,
                Family::Llama => get_bool(&raw, "attention_bias", path)?.unwrap_or(false),
            },
            mlp_bias: get_bool(&raw, "mlp_bias", path)?.unwrap_or(false),
            num_labels,
            declared_dtype,
            bos_token_id: token_ids(raw.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(raw.get("eos_token_id")),
            pad_token_id: token_ids(raw.get("pad_token_id")).first().copied(),
            raw,
        })
    }

    pub fn num_key_value_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The JSON to write next to saved weights: the original keys, with the dtype updated in the
    /// form the file came in (transformers 5 reads both `dtype` and `torch_dtype`).
    pub fn to_json(&self, saved_dtype: &str) -> Value {
        let mut raw = self.raw.clone();
        if let Some(obj) = raw.as_object_mut() {
            if obj.contains_key("dtype") || !obj.contains_key("torch_dtype") {
                obj.insert("dtype".into(), Value::String(saved_dtype.into()));
            }
            if obj.contains_key("torch_dtype") {
                obj.insert("torch_dtype".into(), Value::String(saved_dtype.into()));
            }
        }
        raw
    }
}

/// Reads `rope_theta` and the scaling rule from either layout. An unknown scaling type is an
/// error: silently ignoring it would give a model that loads but computes the wrong thing.
fn parse_rope(raw: &Value, path: &Path) -> Result<(f64, RopeScaling)> {
    let params = raw.get("rope_parameters").filter(|v| !v.is_null());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(|v| v.as_f64())
        .or(get_f64(raw, "rope_theta", path)?)
        .unwrap_or(10000.0);
    // transformers 5 keeps `rope_type` inside `rope_parameters`; the classic form uses a separate
    // `rope_scaling` object whose type key is `rope_type` or (older) `type`.
    let scaling = match (params, raw.get("rope_scaling").filter(|v| !v.is_null())) {
        (Some(p), _) if p.get("rope_type").is_some() || p.get("type").is_some() => Some(p),
        (_, Some(s)) => Some(s),
        _ => None,
    };
    let Some(scaling) = scaling else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let number = |key: &str| -> Result<f64> {
        scaling.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
            Error::file(
                path,
                format!("rope scaling `{kind}` needs a numeric `{key}`"),
            )
        })
    };
    let rule = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: number("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        },
        other => {
            return Err(Error::file(
                path,
                format!(
                "rope scaling type `{other}` is not supported (supported: default, linear, llama3)"
            ),
            ))
        }
    };
    Ok((theta, rule))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5
        })
    }

    #[test]
    fn classic_and_v5_rope_forms_agree() {
        let mut classic = base();
        classic["rope_theta"] = json!(500000.0);
        classic["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = base();
        v5["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let a = ModelConfig::from_value(classic, Path::new("a.json")).unwrap();
        let b = ModelConfig::from_value(v5, Path::new("b.json")).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_theta, b.rope_theta);
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { .. }));
    }

    #[test]
    fn v5_default_rope_parameters_only_set_theta() {
        let mut v5 = base();
        v5["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1234.0});
        let c = ModelConfig::from_value(v5, Path::new("c.json")).unwrap();
        assert_eq!(c.rope_theta, 1234.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn unknown_rope_type_is_rejected_by_name() {
        let mut c = base();
        c["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        let err = ModelConfig::from_value(c, Path::new("m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m/config.json") && err.contains("yarn"),
            "{err}"
        );
    }

    #[test]
    fn unknown_architecture_is_rejected_by_name() {
        let mut c = base();
        c["architectures"] = json!(["GPT2LMHeadModel"]);
        let err = ModelConfig::from_value(c, Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("GPT2LMHeadModel") && err.contains("x/config.json"),
            "{err}"
        );
    }

    #[test]
    fn eos_token_id_may_be_a_list() {
        let mut c = base();
        c["eos_token_id"] = json!([5, 7]);
        let c = ModelConfig::from_value(c, Path::new("c.json")).unwrap();
        assert_eq!(c.eos_token_ids, vec![5, 7]);
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.num_key_value_groups(), 2);
    }
}
