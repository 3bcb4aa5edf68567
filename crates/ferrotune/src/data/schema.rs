//! Dataset schemas: which fields a row has and what they mean, parsed into a typed [`Example`].
//! Nothing here tokenizes; `tokenize.rs` turns examples into token ids and targets.
//!
//! Detection looks at the first row's fields in this order (CONTRACTS "Datasets"); `--schema`
//! overrides it:
//!
//! | schema       | fields                                                                    |
//! |--------------|---------------------------------------------------------------------------|
//! | `genrm`      | `inputs`, `targets` (strings; genrm-critiques)                            |
//! | `preference` | `chosen`, `rejected`, optional `prompt` (ultrafeedback_binarized, TRL)    |
//! | `chat`       | `messages: [{role, content}]` (smol-smoltalk)                             |
//! | `qa`         | `question`, `answer` (GSM8K)                                              |
//! | `solution`   | `question`, `model_output`, `correctness`; or `question`, `solution`, optional `label` |
//! | `prompts`    | `prompt` (a string or a message list); `messages` when the schema is forced |
//! | `text`       | `text`                                                                    |
//!
//! Preference rows come in two shapes. When `chosen` / `rejected` are message lists with more
//! than one message (ultrafeedback_binarized), the prompt is every message before the final one,
//! which must be an assistant message, and both lists must share that prefix exactly; a `prompt`
//! field is then ignored (H4 repeats the first user turn there). Otherwise `chosen` / `rejected`
//! are the answer alone — a string, or a one-message list (TRL's explicit-prompt form) — and the
//! prompt is `prompt`: a string (one user message) or a message list.
//!
//! A row that lacks its schema's fields, has a field of the wrong type, an empty message list or
//! a message without a string `role` / `content` is a bad row: an [`Error::Row`] naming the
//! file, line and field. Extra fields are ignored.
//!
//! [`Error::Row`]: crate::error::Error::Row

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::reader::{kind_of, RawRow, Source};
use crate::error::{Error, Result};

/// The dataset schemas, in detection order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schema {
    Genrm,
    Preference,
    Chat,
    Qa,
    Solution,
    Prompts,
    Text,
}

impl Schema {
    pub const ALL: [Schema; 7] = [
        Schema::Genrm,
        Schema::Preference,
        Schema::Chat,
        Schema::Qa,
        Schema::Solution,
        Schema::Prompts,
        Schema::Text,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Schema::Genrm => "genrm",
            Schema::Preference => "preference",
            Schema::Chat => "chat",
            Schema::Qa => "qa",
            Schema::Solution => "solution",
            Schema::Prompts => "prompts",
            Schema::Text => "text",
        }
    }

    /// The first schema (in detection order) whose fields the row has, if any.
    pub fn detect(row: &Value) -> Option<Schema> {
        let has = |k: &str| row.get(k).is_some();
        Schema::ALL.into_iter().find(|schema| match schema {
            Schema::Genrm => has("inputs") && has("targets"),
            Schema::Preference => has("chosen") && has("rejected"),
            Schema::Chat => has("messages"),
            Schema::Qa => has("question") && has("answer"),
            Schema::Solution => {
                has("question") && (has("model_output") && has("correctness") || has("solution"))
            }
            Schema::Prompts => has("prompt"),
            Schema::Text => has("text"),
        })
    }
}

impl std::fmt::Display for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Schema {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Schema::ALL
            .into_iter()
            .find(|schema| schema.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Schema::ALL.iter().map(|s| s.name()).collect();
                Error::invalid(format!(
                    "unknown schema `{s}`; expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// One chat message. Only `role` and `content` are kept (other keys are dropped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
}

/// What a generation prompt is: messages for the chat template, or raw text for a base model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    Messages(Vec<Message>),
    Text(String),
}

impl PromptInput {
    /// The prompt as chat messages (raw text becomes one user message).
    pub fn to_messages(&self) -> Vec<Message> {
        match self {
            PromptInput::Messages(m) => m.clone(),
            PromptInput::Text(t) => vec![Message::user(t.clone())],
        }
    }
}

/// One row, typed by its schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// A conversation; every assistant message is a training target in SFT.
    Chat { messages: Vec<Message> },
    /// A prompt (at least one message) and two answers, each a single final message.
    Preference {
        prompt: Vec<Message>,
        chosen: Message,
        rejected: Message,
    },
    /// A GenRM verification example: `inputs` is the context, every token of `targets` is trained.
    Genrm { inputs: String, targets: String },
    /// A question and its worked answer (GSM8K's answer ends with `#### N`).
    Qa { question: String, answer: String },
    /// A candidate solution to a question and whether it is correct, when known.
    Solution {
        question: String,
        solution: String,
        label: Option<bool>,
    },
    /// A prompt to generate from.
    Prompt(PromptInput),
    /// Plain text for language modelling.
    Text { text: String },
}

impl Example {
    pub fn schema(&self) -> Schema {
        match self {
            Example::Chat { .. } => Schema::Chat,
            Example::Preference { .. } => Schema::Preference,
            Example::Genrm { .. } => Schema::Genrm,
            Example::Qa { .. } => Schema::Qa,
            Example::Solution { .. } => Schema::Solution,
            Example::Prompt(_) => Schema::Prompts,
            Example::Text { .. } => Schema::Text,
        }
    }

    /// The conversation an SFT step trains on, for the schemas that are one: chat as is;
    /// qa and solution as `[user: question, assistant: answer]`; preference as prompt + chosen
    /// (SFT on the preferred answer). `None` for genrm, prompts and text, which are not chats.
    pub fn sft_messages(&self) -> Option<Vec<Message>> {
        match self {
            Example::Chat { messages } => Some(messages.clone()),
            Example::Qa { question, answer } => Some(vec![
                Message::user(question.clone()),
                Message::assistant(answer.clone()),
            ]),
            Example::Solution {
                question, solution, ..
            } => Some(vec![
                Message::user(question.clone()),
                Message::assistant(solution.clone()),
            ]),
            Example::Preference { prompt, chosen, .. } => {
                let mut messages = prompt.clone();
                messages.push(chosen.clone());
                Some(messages)
            }
            Example::Genrm { .. } | Example::Prompt(_) | Example::Text { .. } => None,
        }
    }
}

/// A parsed row and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct DataRow {
    pub example: Example,
    pub source: Source,
}

struct Fields<'a> {
    object: &'a Map<String, Value>,
    source: &'a Source,
}

impl<'a> Fields<'a> {
    fn error(&self, field: &str, message: impl Into<String>) -> Error {
        self.source.error(field, message)
    }

    fn get(&self, field: &str) -> Result<&'a Value> {
        match self.object.get(field) {
            Some(Value::Null) | None => Err(self.error(field, "missing")),
            Some(v) => Ok(v),
        }
    }

    fn optional(&self, field: &str) -> Option<&'a Value> {
        self.object.get(field).filter(|v| !v.is_null())
    }

    fn string(&self, field: &str) -> Result<String> {
        let value = self.get(field)?;
        string_value(value).ok_or_else(|| {
            self.error(
                field,
                format!("expected a string, found {}", kind_of(value)),
            )
        })
    }

    fn messages(&self, field: &str, value: &Value) -> Result<Vec<Message>> {
        let list = value.as_array().ok_or_else(|| {
            self.error(
                field,
                format!("expected a list of messages, found {}", kind_of(value)),
            )
        })?;
        if list.is_empty() {
            return Err(self.error(field, "empty message list"));
        }
        list.iter()
            .enumerate()
            .map(|(i, m)| {
                let at = |key: &str| format!("{field}[{i}].{key}");
                let object = m.as_object().ok_or_else(|| {
                    self.error(
                        &format!("{field}[{i}]"),
                        format!("expected a message object, found {}", kind_of(m)),
                    )
                })?;
                let text = |key: &str| -> Result<String> {
                    match object.get(key) {
                        None | Some(Value::Null) => Err(self.error(&at(key), "missing")),
                        Some(Value::String(s)) => Ok(s.clone()),
                        Some(other) => Err(self.error(
                            &at(key),
                            format!("expected a string, found {}", kind_of(other)),
                        )),
                    }
                };
                let role = text("role")?;
                if role.is_empty() {
                    return Err(self.error(&at("role"), "empty role"));
                }
                Ok(Message {
                    role,
                    content: text("content")?,
                })
            })
            .collect()
    }

    /// A string or a 0/1 integer or a boolean, as a label.
    fn label(&self, field: &str, value: &Value) -> Result<bool> {
        match value {
            Value::Bool(b) => Ok(*b),
            Value::Number(n) if n.as_f64() == Some(1.0) => Ok(true),
            Value::Number(n) if n.as_f64() == Some(0.0) => Ok(false),
            Value::String(s) if matches!(s.to_ascii_lowercase().as_str(), "true" | "yes" | "1") => {
                Ok(true)
            }
            Value::String(s) if matches!(s.to_ascii_lowercase().as_str(), "false" | "no" | "0") => {
                Ok(false)
            }
            other => Err(self.error(field, format!("expected a boolean or 0/1, found {other}"))),
        }
    }
}

/// Strings only; numbers are not silently turned into text.
fn string_value(value: &Value) -> Option<String> {
    value.as_str().map(str::to_string)
}

/// Parses a raw row under `schema`; a row that does not fit is a bad-row error.
pub fn parse_row(row: &RawRow, schema: Schema) -> Result<DataRow> {
    let object = row
        .value
        .as_object()
        .ok_or_else(|| row.source.error("(row)", "expected a JSON object"))?;
    let f = Fields {
        object,
        source: &row.source,
    };
    let example = match schema {
        Schema::Genrm => {
            let inputs = f.string("inputs")?;
            let targets = f.string("targets")?;
            if targets.is_empty() {
                return Err(f.error("targets", "empty"));
            }
            Example::Genrm { inputs, targets }
        }
        Schema::Preference => parse_preference(&f)?,
        Schema::Chat => Example::Chat {
            messages: f.messages("messages", f.get("messages")?)?,
        },
        Schema::Qa => Example::Qa {
            question: f.string("question")?,
            answer: f.string("answer")?,
        },
        Schema::Solution => {
            let question = f.string("question")?;
            if f.optional("model_output").is_some() || f.optional("solution").is_none() {
                let solution = f.string("model_output")?;
                let label = f.label("correctness", f.get("correctness")?)?;
                Example::Solution {
                    question,
                    solution,
                    label: Some(label),
                }
            } else {
                let solution = f.string("solution")?;
                let label = match f.optional("label") {
                    Some(v) => Some(f.label("label", v)?),
                    None => None,
                };
                Example::Solution {
                    question,
                    solution,
                    label,
                }
            }
        }
        Schema::Prompts => match (f.optional("prompt"), f.optional("messages")) {
            (Some(Value::String(s)), _) => Example::Prompt(PromptInput::Text(s.clone())),
            (Some(v @ Value::Array(_)), _) => {
                Example::Prompt(PromptInput::Messages(f.messages("prompt", v)?))
            }
            (Some(v), _) => {
                return Err(f.error(
                    "prompt",
                    format!("expected a string or a message list, found {}", kind_of(v)),
                ))
            }
            (None, Some(v)) => Example::Prompt(PromptInput::Messages(f.messages("messages", v)?)),
            (None, None) => return Err(f.error("prompt", "missing")),
        },
        Schema::Text => Example::Text {
            text: f.string("text")?,
        },
    };
    Ok(DataRow {
        example,
        source: row.source.clone(),
    })
}

/// One side (`chosen` / `rejected`) of a preference row: its messages, or its string as
/// one assistant message.
fn side(f: &Fields, field: &str) -> Result<Vec<Message>> {
    match f.get(field)? {
        Value::String(s) => Ok(vec![Message::assistant(s.clone())]),
        v @ Value::Array(_) => f.messages(field, v),
        other => Err(f.error(
            field,
            format!(
                "expected a string or a message list, found {}",
                kind_of(other)
            ),
        )),
    }
}

fn parse_preference(f: &Fields) -> Result<Example> {
    let chosen = side(f, "chosen")?;
    let rejected = side(f, "rejected")?;
    for (field, list) in [("chosen", &chosen), ("rejected", &rejected)] {
        let last = list.last().expect("non-empty");
        if last.role != "assistant" {
            return Err(f.error(
                field,
                format!(
                    "the final message must be the assistant's answer, found role `{}`",
                    last.role
                ),
            ));
        }
    }
    let implicit = chosen.len() > 1 || rejected.len() > 1;
    let prompt = if implicit {
        let prompt = &chosen[..chosen.len() - 1];
        if prompt.is_empty() || rejected[..rejected.len() - 1] != *prompt {
            return Err(f.error(
                "rejected",
                "chosen and rejected must share the same messages before the final answer",
            ));
        }
        prompt.to_vec()
    } else {
        match f.get("prompt") {
            Ok(Value::String(s)) => vec![Message::user(s.clone())],
            Ok(v @ Value::Array(_)) => f.messages("prompt", v)?,
            Ok(other) => {
                return Err(f.error(
                    "prompt",
                    format!(
                        "expected a string or a message list, found {}",
                        kind_of(other)
                    ),
                ))
            }
            Err(_) => {
                return Err(f.error(
                    "prompt",
                    "missing: chosen/rejected hold only the answer, so a prompt is needed",
                ))
            }
        }
    };
    Ok(Example::Preference {
        prompt,
        chosen: chosen.last().expect("non-empty").clone(),
        rejected: rejected.last().expect("non-empty").clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;
    use std::sync::Arc;

    fn raw(value: Value) -> RawRow {
        RawRow {
            value,
            source: Source {
                path: Arc::from(Path::new("d.jsonl")),
                line: 7,
            },
        }
    }

    fn parse(value: Value) -> Result<Example> {
        let row = raw(value);
        let schema = Schema::detect(&row.value).expect("schema detected");
        parse_row(&row, schema).map(|r| r.example)
    }

    #[test]
    fn detection_order() {
        let cases = [
            (
                json!({"inputs": "a", "targets": "b", "question": "q"}),
                Schema::Genrm,
            ),
            (
                json!({"prompt": "p", "chosen": "a", "rejected": "b"}),
                Schema::Preference,
            ),
            (json!({"messages": [], "prompt": "p"}), Schema::Chat),
            (
                json!({"question": "q", "answer": "a", "solution": "s"}),
                Schema::Qa,
            ),
            (
                json!({"question": "q", "model_output": "m", "correctness": 1}),
                Schema::Solution,
            ),
            (json!({"question": "q", "solution": "s"}), Schema::Solution),
            (json!({"prompt": "p", "text": "t"}), Schema::Prompts),
            (json!({"text": "t"}), Schema::Text),
        ];
        for (row, schema) in cases {
            assert_eq!(Schema::detect(&row), Some(schema), "{row}");
        }
        assert_eq!(Schema::detect(&json!({"question": "q"})), None);
        assert_eq!("qa".parse::<Schema>().unwrap(), Schema::Qa);
        assert!("sft".parse::<Schema>().is_err());
    }

    #[test]
    fn preference_with_full_conversations_splits_off_the_prompt() {
        let ex = parse(json!({
            "prompt": "hi",
            "chosen": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad"}],
        }))
        .unwrap();
        assert_eq!(
            ex,
            Example::Preference {
                prompt: vec![Message::new("system", "s"), Message::user("hi")],
                chosen: Message::assistant("good"),
                rejected: Message::assistant("bad"),
            }
        );
        let err = parse(json!({
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "bad"}],
        }))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("d.jsonl:7: field `rejected`") && err.contains("share"),
            "{err}"
        );
    }

    #[test]
    fn preference_with_string_answers_uses_the_prompt_field() {
        let ex = parse(json!({"prompt": "hi", "chosen": "good", "rejected": "bad"})).unwrap();
        assert_eq!(
            ex,
            Example::Preference {
                prompt: vec![Message::user("hi")],
                chosen: Message::assistant("good"),
                rejected: Message::assistant("bad"),
            }
        );
        let ex = parse(json!({
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }))
        .unwrap();
        assert!(matches!(ex, Example::Preference { ref prompt, .. } if prompt.len() == 1));
        let err = parse(json!({"chosen": "good", "rejected": "bad"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `prompt`"), "{err}");
    }

    #[test]
    fn bad_rows_name_the_field() {
        let cases = [
            (
                json!({"messages": []}),
                "field `messages`: empty message list",
            ),
            (
                json!({"messages": "hi"}),
                "field `messages`: expected a list of messages",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "field `messages[0].content`: missing",
            ),
            (
                json!({"messages": [{"content": "x"}]}),
                "field `messages[0].role`: missing",
            ),
            (
                json!({"messages": [{"role": "user", "content": 3}]}),
                "field `messages[0].content`: expected a string",
            ),
            (
                json!({"question": "q", "answer": 4}),
                "field `answer`: expected a string, found a number",
            ),
            (
                json!({"inputs": "a", "targets": ""}),
                "field `targets`: empty",
            ),
            (
                json!({"question": "q", "model_output": "m", "correctness": 2}),
                "field `correctness`",
            ),
        ];
        for (row, expected) in cases {
            let err = parse(row.clone()).unwrap_err().to_string();
            assert!(err.starts_with("d.jsonl:7: "), "{err}");
            assert!(err.contains(expected), "{row}: {err}");
        }
        // A forced schema whose fields are absent.
        let err = parse_row(&raw(json!({"text": "t"})), Schema::Chat)
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `messages`: missing"), "{err}");
    }

    #[test]
    fn solution_and_prompt_forms() {
        let ex = parse(json!({"question": "q", "model_output": "m", "correctness": 0})).unwrap();
        assert_eq!(
            ex,
            Example::Solution {
                question: "q".into(),
                solution: "m".into(),
                label: Some(false)
            }
        );
        let ex = parse(json!({"question": "q", "solution": "s"})).unwrap();
        assert_eq!(
            ex,
            Example::Solution {
                question: "q".into(),
                solution: "s".into(),
                label: None
            }
        );
        let ex = parse(json!({"question": "q", "solution": "s", "label": true})).unwrap();
        assert!(matches!(
            ex,
            Example::Solution {
                label: Some(true),
                ..
            }
        ));
        let ex = parse_row(
            &raw(json!({"messages": [{"role": "user", "content": "x"}]})),
            Schema::Prompts,
        )
        .unwrap()
        .example;
        assert_eq!(
            ex,
            Example::Prompt(PromptInput::Messages(vec![Message::user("x")]))
        );
        assert_eq!(
            parse(json!({"prompt": "p"})).unwrap(),
            Example::Prompt(PromptInput::Text("p".into()))
        );
    }

    #[test]
    fn qa_becomes_a_two_turn_chat_for_sft() {
        let ex = parse(json!({"question": "q", "answer": "a"})).unwrap();
        assert_eq!(
            ex.sft_messages().unwrap(),
            vec![Message::user("q"), Message::assistant("a")]
        );
        assert!(parse(json!({"text": "t"}))
            .unwrap()
            .sft_messages()
            .is_none());
    }
}
