//! Generated answers as JSONL rows (CONTRACTS "Generation and verification"): one row per
//! sample, `index` (the prompt row), `sample_index`, `prompt` (the text fed to the model),
//! `completion`, `num_tokens` (generated tokens, the end-of-sequence token included) and
//! `finish_reason` (`stop` or `length`).

use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::{Example, Message, PromptInput};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerRow {
    pub index: usize,
    pub sample_index: usize,
    pub prompt: String,
    pub completion: String,
    pub num_tokens: usize,
    pub finish_reason: String,
}

/// Reads answer rows; a row that is not JSON or lacks a field is an error naming the file, the
/// line and the field. Blank lines are skipped.
pub fn read_answers(path: &Path) -> Result<Vec<AnswerRow>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line)
            .map_err(|e| Error::row(path, line_no, "", format!("invalid JSON: {e}")))?;
        let field = |name: &str| -> Result<&Value> {
            value
                .get(name)
                .filter(|v| !v.is_null())
                .ok_or_else(|| Error::row(path, line_no, name, "missing"))
        };
        let count = |name: &str| -> Result<usize> {
            field(name)?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::row(path, line_no, name, "expected a non-negative integer"))
        };
        let text = |name: &str| -> Result<String> {
            field(name)?
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| Error::row(path, line_no, name, "expected a string"))
        };
        rows.push(AnswerRow {
            index: count("index")?,
            sample_index: match value.get("sample_index") {
                None | Some(Value::Null) => 0,
                Some(_) => count("sample_index")?,
            },
            prompt: text("prompt")?,
            completion: text("completion")?,
            num_tokens: count("num_tokens")?,
            finish_reason: match value.get("finish_reason") {
                None | Some(Value::Null) => String::new(),
                Some(_) => text("finish_reason")?,
            },
        });
    }
    Ok(rows)
}

/// The prompt a row asks a model to continue: a prompts row as is; a chat's messages before its
/// final assistant message; a qa or solution row's question; a preference row's prompt. `None`
/// for rows that hold no prompt (genrm, text).
pub fn generation_prompt(example: &Example) -> Option<PromptInput> {
    match example {
        Example::Prompt(p) => Some(p.clone()),
        Example::Chat { messages } => {
            let mut m: Vec<Message> = messages.clone();
            if m.last().is_some_and(|x| x.role == "assistant") {
                m.pop();
            }
            (!m.is_empty()).then_some(PromptInput::Messages(m))
        }
        Example::Qa { question, .. } | Example::Solution { question, .. } => {
            Some(PromptInput::Messages(vec![Message::user(question.clone())]))
        }
        Example::Preference { prompt, .. } => Some(PromptInput::Messages(prompt.clone())),
        Example::Genrm { .. } | Example::Text { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_bad_rows_name_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let row = AnswerRow {
            index: 0,
            sample_index: 0,
            prompt: "p".into(),
            completion: "c".into(),
            num_tokens: 3,
            finish_reason: "stop".into(),
        };
        std::fs::write(
            &path,
            format!(
                "{}\n\n{{\"index\": 1, \"prompt\": \"q\", \"completion\": \"d\", \"num_tokens\": 2}}\n",
                serde_json::to_string(&row).unwrap()
            ),
        )
        .unwrap();
        let rows = read_answers(&path).unwrap();
        assert_eq!(rows[0], row);
        assert_eq!((rows[1].index, rows[1].sample_index), (1, 0));
        std::fs::write(
            &path,
            "{\"index\": 0, \"prompt\": \"p\", \"num_tokens\": 1}\n",
        )
        .unwrap();
        let err = read_answers(&path).unwrap_err().to_string();
        assert!(
            err.contains("a.jsonl:1: field `completion`: missing"),
            "{err}"
        );
        std::fs::write(&path, "{\"index\": -1}\n").unwrap();
        let err = read_answers(&path).unwrap_err().to_string();
        assert!(err.contains("field `index`"), "{err}");
    }

    #[test]
    fn prompts_of_each_schema() {
        let chat = Example::Chat {
            messages: vec![Message::user("u"), Message::assistant("a")],
        };
        assert_eq!(
            generation_prompt(&chat),
            Some(PromptInput::Messages(vec![Message::user("u")]))
        );
        let qa = Example::Qa {
            question: "q".into(),
            answer: "a".into(),
        };
        assert_eq!(
            generation_prompt(&qa),
            Some(PromptInput::Messages(vec![Message::user("q")]))
        );
        assert_eq!(generation_prompt(&Example::Text { text: "t".into() }), None);
    }
}
