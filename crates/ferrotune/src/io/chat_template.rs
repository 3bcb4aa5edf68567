//! Chat templates rendered the way transformers renders them.
//!
//! transformers compiles templates with Jinja2's sandbox, `trim_blocks` and `lstrip_blocks` on,
//! the loop-controls extension, and the globals `raise_exception` and `strftime_now`; its
//! `tojson` is Python's `json.dumps` (no HTML escaping, `", "`/`": "` separators, non-ASCII
//! kept). Templates call Python string methods (`.strip()`, `.split()`, `.startswith()`…),
//! which minijinja-contrib's pycompat layer provides. Rendering passes `messages`,
//! `add_generation_prompt` and the special tokens, plus any extra variables (e.g. `tools`).

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};

const NAME: &str = "chat_template";

/// The special-token strings a template can refer to.
#[derive(Debug, Clone, Default)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// Python `json.dumps(value, ensure_ascii=False, indent=indent, separators=default,
/// sort_keys=sort_keys)`, as transformers' `tojson` filter calls it.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    python_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn python_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    // With an indent, Python's item separator drops its trailing space (",").
    let (item_sep, newline) = match indent {
        Some(_) => (",", true),
        None => (", ", false),
    };
    let pad = |depth: usize, out: &mut String| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                pad(depth + 1, out);
                python_json(item, indent, sort_keys, depth + 1, out);
            }
            if newline {
                pad(depth, out);
            }
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            let mut entries: Vec<_> = map.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                pad(depth + 1, out);
                out.push_str(&serde_json::to_string(k).expect("string key"));
                out.push_str(": ");
                python_json(item, indent, sort_keys, depth + 1, out);
            }
            if newline {
                pad(depth, out);
            }
            out.push('}');
        }
        J::Number(n) if n.is_f64() => {
            // Python prints floats with repr(): integral floats keep ".0".
            let f = n.as_f64().unwrap_or(0.0);
            if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&n.to_string());
            }
        }
        other => out.push_str(&serde_json::to_string(other).expect("JSON value")),
    }
}

impl ChatTemplate {
    /// Compiles a template; a syntax error is reported with its line.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| Error::Template(format!("cannot compile: {}", describe(&e))))?;
        Ok(ChatTemplate { env, source })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (a JSON list of `{role, content, …}` objects). `extra` adds template
    /// variables (e.g. `tools`, `date_string`, `enable_thinking`); it must be a JSON object.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        tokens: &TemplateTokens,
        extra: Option<&serde_json::Value>,
    ) -> Result<String> {
        let mut ctx = serde_json::Map::new();
        if let Some(serde_json::Value::Object(extra)) = extra {
            ctx.extend(extra.clone());
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        for (key, value) in [
            ("bos_token", &tokens.bos_token),
            ("eos_token", &tokens.eos_token),
            ("pad_token", &tokens.pad_token),
            ("unk_token", &tokens.unk_token),
        ] {
            if let Some(v) = value {
                ctx.entry(key).or_insert_with(|| v.clone().into());
            }
        }
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::Template(describe(&e)))?;
        template
            .render(Value::from_serialize(&ctx))
            .map_err(|e| Error::Template(describe(&e)))
    }
}

/// minijinja's error with its cause chain and template line, in one line.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some() => {
            format!("raised: {}", e.detail().unwrap_or_default())
        }
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        if !msg.contains("line") {
            msg.push_str(&format!(" (template line {line})"));
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, messages: serde_json::Value) -> Result<String> {
        ChatTemplate::new(src)?.render(&messages, false, &TemplateTokens::default(), None)
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let out = render(
            "{{ messages[0] | tojson }}",
            json!([{"role": "user", "content": "a<b & 'c' é", "n": [1, 2.0]}]),
        )
        .unwrap();
        assert_eq!(
            out,
            r#"{"role": "user", "content": "a<b & 'c' é", "n": [1, 2.0]}"#
        );
        let out = render("{{ messages | tojson(indent=2) }}", json!([{"a": 1}])).unwrap();
        assert_eq!(out, "[\n  {\n    \"a\": 1\n  }\n]");
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() {
        let src = "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}\
                   {{ m.content.strip().upper() }}|{% if m.content.startswith(' hi') %}yes{% endif %}{% endfor %}";
        let out = render(
            src,
            json!([{"role": "system", "content": "x"}, {"role": "user", "content": " hi "}]),
        )
        .unwrap();
        assert_eq!(out, "HI|yes");
    }

    #[test]
    fn trim_and_lstrip_blocks_are_on() {
        let src = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let out = render(
            src,
            json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
        )
        .unwrap();
        assert_eq!(out, "a\nb\n");
    }

    #[test]
    fn raise_exception_is_a_clear_error() {
        let err = render(
            "{{ raise_exception('Conversation roles must alternate') }}",
            json!([]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("Conversation roles must alternate"), "{err}");
    }

    #[test]
    fn malformed_template_is_rejected_at_compile() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("chat template: cannot compile"), "{err}");
    }
}
