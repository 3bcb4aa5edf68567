//! The OpenAI request bodies the server accepts, and OpenAI-style errors.
//!
//! Bodies are parsed strictly: a field that is neither an OpenAI field nor a listed extension is
//! a 400 (`unknown field …`), so a typo does not pass silently. OpenAI fields the server cannot
//! honour are accepted only at their neutral value (e.g. `presence_penalty: 0`, `logprobs:
//! false`) and otherwise rejected with a 400 that names them.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error answered as `{"error": {"message", "type", "code"}}` (OpenAI's shape; `param` too).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            code,
            param: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    /// 400 naming the offending parameter.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        let mut e = ApiError::invalid("invalid_value", message);
        e.param = Some(param.to_string());
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Message content: a string, or a list of parts of which only `{"type": "text", "text": …}` is
/// supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

impl Content {
    pub fn to_text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(s) => Ok(s.clone()),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => out.push_str(t),
                        _ => {
                            return Err(ApiError::param(
                                "messages",
                                format!(
                                    "unsupported content part {p}: only text parts are supported"
                                ),
                            ))
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: Content,
    /// Accepted and ignored (OpenAI's participant name).
    #[serde(default)]
    pub name: Option<String>,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extension (vLLM's): keep the k most likely tokens; 0 or -1 = all.
    pub top_k: Option<i64>,
    pub n: Option<usize>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
    pub response_format: Option<Value>,
    // serde cannot flatten with deny_unknown_fields, so the sampling fields are repeated.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub n: Option<usize>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub user: Option<String>,
}

/// `prompt`: text, texts, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub echo: Option<bool>,
    pub logprobs: Option<Value>,
    pub best_of: Option<usize>,
    pub suffix: Option<String>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub n: Option<usize>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub user: Option<String>,
}

impl ChatRequest {
    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            n: self.n,
            stop: self.stop.clone(),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            user: self.user.clone(),
        }
    }

    /// Rejects the OpenAI options this server does not implement (at non-neutral values).
    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.logprobs == Some(true) || self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(ApiError::param(
                "logprobs",
                "logprobs are not supported by this server",
            ));
        }
        if let Some(format) = &self.response_format {
            if format.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::param(
                    "response_format",
                    "only response_format {\"type\": \"text\"} is supported",
                ));
            }
        }
        Ok(())
    }
}

impl CompletionRequest {
    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            n: self.n,
            stop: self.stop.clone(),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            user: self.user.clone(),
        }
    }

    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::param(
                "echo",
                "echo is not supported by this server",
            ));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && v != &json!(0))
        {
            return Err(ApiError::param(
                "logprobs",
                "logprobs are not supported by this server",
            ));
        }
        if self.best_of.is_some_and(|b| b > 1) {
            return Err(ApiError::param(
                "best_of",
                "best_of > 1 is not supported by this server",
            ));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::param(
                "suffix",
                "suffix is not supported by this server",
            ));
        }
        Ok(())
    }
}

/// Parses a JSON body into `T`, turning every failure into a 400 with serde's message (which
/// names the unknown field or the wrong type and where).
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::invalid(
            "invalid_json",
            "the request body is empty; expected a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "invalid_json",
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::invalid("invalid_request", format!("invalid request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_bad_json_are_400s() {
        let e =
            parse_body::<ChatRequest>(br#"{"model": "m", "messages": [], "foo": 1}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("unknown field `foo`"), "{}", e.message);
        let e = parse_body::<ChatRequest>(b"{not json").unwrap_err();
        assert_eq!(e.code, "invalid_json");
        let e = parse_body::<ChatRequest>(b"[1]").unwrap_err();
        assert!(e.message.contains("JSON object"));
        let e = parse_body::<ChatRequest>(b"").unwrap_err();
        assert!(e.message.contains("empty"));
        let e = parse_body::<ChatRequest>(
            br#"{"model": "m", "messages": [{"role": "user", "content": "x", "x": 1}]}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("unknown field `x`"), "{}", e.message);
        let ok = parse_body::<ChatRequest>(
            br#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "stop": "x", "stream": true}"#,
        )
        .unwrap();
        assert_eq!(ok.messages[0].content.to_text().unwrap(), "ab");
        assert!(ok.stream);
        let body = e.body();
        assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string());
    }

    #[test]
    fn completion_prompts_of_every_shape() {
        for (body, want) in [
            (r#"{"model": "m", "prompt": "a"}"#, "Text"),
            (r#"{"model": "m", "prompt": ["a", "b"]}"#, "Texts"),
            (r#"{"model": "m", "prompt": [1, 2]}"#, "Tokens"),
            (r#"{"model": "m", "prompt": [[1], [2, 3]]}"#, "TokenLists"),
        ] {
            let r: CompletionRequest = parse_body(body.as_bytes()).unwrap();
            assert!(format!("{:?}", r.prompt).starts_with(want), "{body}");
        }
    }
}
