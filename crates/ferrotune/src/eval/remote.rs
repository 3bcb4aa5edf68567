//! OpenAI-compatible judges over HTTP: `POST {URL}/chat/completions`.
//!
//! - The API key is sent as `Authorization: Bearer KEY` when one is given (from
//!   `OPENAI_API_KEY`, or the variable `--judge-api-key-env` names).
//! - Transient failures (no connection, timeouts, HTTP 408, 429 and 5xx) are retried with
//!   exponential backoff (`initial_backoff · 2^attempt`, at most `max_backoff`, or the server's
//!   `Retry-After` when longer), at most `max_retries` times; then the call fails with the last
//!   error. Other HTTP errors (401, 404, 400…) fail at once: asking again cannot help.
//! - Replies are cached on disk ([`ResponseCache`], JSONL keyed by a SHA-256 of the request) so a
//!   rerun does not pay for the same request twice. The key covers the endpoint, the request body
//!   and a tag (the pairwise judge's retry of an unreadable verdict uses tag 1, so it is cached
//!   apart from the first ask); the API key is not part of it.
//!
//! The calls are blocking; concurrency comes from the caller's threads (see `judge.rs`).

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::data::Message;
use crate::error::{Error, Result};

/// How failed requests are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so at most `max_retries + 1` requests).
    pub max_retries: usize,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0-based).
    pub fn backoff(&self, retry: usize) -> Duration {
        let factor = 1u32.checked_shl(retry.min(20) as u32).unwrap_or(u32::MAX);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Replies already paid for, kept in a JSONL file: one `{"key": …, "content": …}` per line.
/// A damaged line (e.g. cut by a crash mid-write) is skipped with a warning.
pub struct ResponseCache {
    path: PathBuf,
    entries: Mutex<HashMap<String, String>>,
    file: Mutex<std::fs::File>,
}

impl ResponseCache {
    /// Opens (or creates) the cache file and reads the entries it holds.
    pub fn open(path: &Path) -> Result<ResponseCache> {
        let mut entries = HashMap::new();
        if path.exists() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|e| Error::io(path, e))?;
                if line.trim().is_empty() {
                    continue;
                }
                let parsed: Option<(String, String)> =
                    serde_json::from_str::<Value>(&line).ok().and_then(|v| {
                        Some((
                            v.get("key")?.as_str()?.to_string(),
                            v.get("content")?.as_str()?.to_string(),
                        ))
                    });
                match parsed {
                    Some((k, c)) => {
                        entries.insert(k, c);
                    }
                    None => {
                        tracing::warn!("{}:{}: not a cache entry; skipped", path.display(), i + 1)
                    }
                }
            }
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(ResponseCache {
            path: path.to_path_buf(),
            entries: Mutex::new(entries),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.entries.lock().expect("cache lock").get(key).cloned()
    }

    /// Records a reply, in memory and on disk (one line, flushed).
    pub fn put(&self, key: &str, content: &str) -> Result<()> {
        let line = json!({"key": key, "content": content}).to_string() + "\n";
        {
            let mut file = self.file.lock().expect("cache lock");
            file.write_all(line.as_bytes())
                .and_then(|_| file.flush())
                .map_err(|e| Error::io(&self.path, e))?;
        }
        self.entries
            .lock()
            .expect("cache lock")
            .insert(key.to_string(), content.to_string());
        Ok(())
    }
}

/// The cache key of a request: SHA-256 (hex) of the endpoint, the tag and the body.
pub fn cache_key(endpoint: &str, body: &Value, tag: u32) -> String {
    let mut hasher = Sha256::new();
    hasher.update(endpoint.as_bytes());
    hasher.update(b"\n");
    hasher.update(tag.to_string().as_bytes());
    hasher.update(b"\n");
    hasher.update(body.to_string().as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why one attempt failed, and whether another attempt may succeed.
struct AttemptError {
    message: String,
    retryable: bool,
    retry_after: Option<Duration>,
}

/// A blocking client of one OpenAI-compatible chat endpoint and model.
pub struct ChatClient {
    agent: ureq::Agent,
    endpoint: String,
    model: String,
    api_key: Option<String>,
    retry: RetryPolicy,
}

impl ChatClient {
    /// `base_url` is the API base (ending in `/v1`); requests go to `{base_url}/chat/completions`.
    pub fn new(
        base_url: &str,
        model: &str,
        api_key: Option<String>,
        timeout: Duration,
        retry: RetryPolicy,
    ) -> ChatClient {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build();
        ChatClient {
            agent: config.into(),
            endpoint: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            model: model.to_string(),
            api_key,
            retry,
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The request body: the model, the messages, then `extra`'s fields.
    pub fn body(&self, messages: &[Message], extra: &Value) -> Value {
        let mut body = json!({"model": self.model, "messages": messages});
        if let (Some(map), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                map.insert(k.clone(), v.clone());
            }
        }
        body
    }

    /// Asks for a chat completion and returns what `parse` makes of the first choice's
    /// content. A reply is cached (under `tag`) only once `parse` accepts it; a reply `parse`
    /// rejects is an error at once (the server answered, but not in the expected form).
    pub fn complete<T>(
        &self,
        messages: &[Message],
        extra: &Value,
        tag: u32,
        cache: Option<&ResponseCache>,
        parse: impl Fn(&str) -> std::result::Result<T, String>,
    ) -> Result<T> {
        let body = self.body(messages, extra);
        let key = cache_key(&self.endpoint, &body, tag);
        if let Some(content) = cache.and_then(|c| c.get(&key)) {
            if let Ok(v) = parse(&content) {
                return Ok(v);
            }
        }
        let content = self.send_with_retries(&body)?;
        let value = parse(&content).map_err(|e| {
            Error::invalid(format!(
                "judge {} (model `{}`): {e}",
                self.endpoint, self.model
            ))
        })?;
        if let Some(cache) = cache {
            cache.put(&key, &content)?;
        }
        Ok(value)
    }

    fn send_with_retries(&self, body: &Value) -> Result<String> {
        let text = body.to_string();
        let mut retry = 0;
        loop {
            match self.attempt(&text) {
                Ok(content) => return Ok(content),
                Err(e) if e.retryable && retry < self.retry.max_retries => {
                    let wait = self.retry.backoff(retry).max(
                        e.retry_after
                            .unwrap_or_default()
                            .min(self.retry.max_backoff),
                    );
                    tracing::warn!(
                        "judge {}: {}; retry {}/{} in {:.1}s",
                        self.endpoint,
                        e.message,
                        retry + 1,
                        self.retry.max_retries,
                        wait.as_secs_f64()
                    );
                    std::thread::sleep(wait);
                    retry += 1;
                }
                Err(e) => {
                    let attempts = retry + 1;
                    return Err(Error::invalid(if e.retryable {
                        format!(
                            "judge {} (model `{}`) failed after {attempts} attempt{}: {}",
                            self.endpoint,
                            self.model,
                            if attempts == 1 { "" } else { "s" },
                            e.message
                        )
                    } else {
                        format!(
                            "judge {} (model `{}`): {}",
                            self.endpoint, self.model, e.message
                        )
                    }));
                }
            }
        }
    }

    fn attempt(&self, body: &str) -> std::result::Result<String, AttemptError> {
        let mut request = self
            .agent
            .post(&self.endpoint)
            .header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = request.send(body).map_err(|e| AttemptError {
            message: e.to_string(),
            retryable: true,
            retry_after: None,
        })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| AttemptError {
                message: format!("reading the reply: {e}"),
                retryable: true,
                retry_after: None,
            })?;
        if !(200..300).contains(&status) {
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| excerpt(&text));
            return Err(AttemptError {
                message: format!("HTTP {status}: {detail}"),
                retryable: status == 408 || status == 429 || status >= 500,
                retry_after,
            });
        }
        let value: Value = serde_json::from_str(&text).map_err(|e| AttemptError {
            message: format!("the reply is not JSON ({e}): {}", excerpt(&text)),
            retryable: false,
            retry_after: None,
        })?;
        value["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| AttemptError {
                message: format!(
                    "the reply has no choices[0].message.content: {}",
                    excerpt(&text)
                ),
                retryable: false,
                retry_after: None,
            })
    }
}

fn excerpt(text: &str) -> String {
    let mut s: String = text.chars().take(300).collect();
    if text.chars().count() > 300 {
        s.push('…');
    }
    s
}

/// Reads a reward reply, `reward:<float>` (as NVIDIA's Nemotron reward models answer);
/// whitespace around the parts is allowed.
pub fn parse_reward(content: &str) -> std::result::Result<f64, String> {
    let text = content.trim();
    let rest = text
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case("reward:"))
        .map(|_| &text[7..])
        .ok_or_else(|| {
            format!(
                "expected a reply `reward:<float>`, got {:?}",
                excerpt(content)
            )
        })?;
    rest.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| {
            format!(
                "expected a reply `reward:<float>`, got {:?}",
                excerpt(content)
            )
        })
}

/// A minimal OpenAI-style chat endpoint for tests: each request's JSON body goes to `reply`,
/// which returns the status and the message content; the `Authorization` headers are recorded.
#[cfg(test)]
pub(crate) mod fake {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};

    /// Each request's `Authorization` header and JSON body, in arrival order.
    pub type Requests = Arc<Mutex<Vec<(Option<String>, Value)>>>;

    pub struct Fake {
        pub base_url: String,
        pub requests: Requests,
    }

    pub fn serve(reply: impl Fn(&Value, usize) -> (u16, String) + Send + 'static) -> Fake {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut length, mut auth) = (0, None);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap_or((&line, ""));
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap(),
                        "authorization" => auth = Some(value.trim().to_string()),
                        _ => {}
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap();
                let k = {
                    let mut r = seen.lock().unwrap();
                    r.push((auth, body.clone()));
                    r.len() - 1
                };
                let (status, content) = reply(&body, k);
                let text = if status == 200 {
                    json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).to_string()
                } else {
                    json!({"error": {"message": content, "type": "x", "code": null}}).to_string()
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        Fake { base_url, requests }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_replies() {
        assert_eq!(parse_reward("reward:-3.25"), Ok(-3.25));
        assert_eq!(parse_reward("  Reward: 1e-2\n"), Ok(0.01));
        assert!(parse_reward("reward:").is_err());
        assert!(parse_reward("score: 1").is_err());
        assert!(parse_reward("reward:nan").is_err());
        assert!(parse_reward("").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            max_retries: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(700),
        };
        let waits: Vec<u128> = (0..5).map(|r| p.backoff(r).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 700, 700]);
        assert_eq!(p.backoff(usize::MAX), Duration::from_millis(700));
    }

    #[test]
    fn cache_keys_depend_on_body_endpoint_and_tag() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let k = cache_key("http://a/v1/chat/completions", &body, 0);
        assert_eq!(k.len(), 64);
        assert_eq!(k, cache_key("http://a/v1/chat/completions", &body, 0));
        assert_ne!(k, cache_key("http://a/v1/chat/completions", &body, 1));
        assert_ne!(k, cache_key("http://b/v1/chat/completions", &body, 0));
        let other = json!({"model": "m", "messages": [{"role": "user", "content": "ho"}]});
        assert_ne!(k, cache_key("http://a/v1/chat/completions", &other, 0));
    }

    #[test]
    fn cache_survives_reopening_and_skips_damaged_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cache.jsonl");
        {
            let cache = ResponseCache::open(&path).unwrap();
            assert!(cache.is_empty());
            cache.put("k1", "reward:1").unwrap();
            cache.put("k2", "A").unwrap();
        }
        // A line cut by a crash.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"key\": \"k3\", \"cont").unwrap();
        drop(f);
        let cache = ResponseCache::open(&path).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("k1").as_deref(), Some("reward:1"));
        assert_eq!(cache.get("k3"), None);
    }

    #[test]
    fn key_header_backoff_on_5xx_and_no_retry_on_4xx() {
        let f = fake::serve(|_, k| match k {
            0 => (500, "boom".into()),
            1 => (200, "reward:2.5".into()),
            _ => (401, "bad key".into()),
        });
        let retry = RetryPolicy {
            max_retries: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        };
        let client = ChatClient::new(
            &f.base_url,
            "m",
            Some("k3y".into()),
            Duration::from_secs(5),
            retry,
        );
        let v = client
            .complete(
                &[Message::user("hi")],
                &json!({"temperature": 0}),
                0,
                None,
                parse_reward,
            )
            .unwrap();
        assert_eq!(v, 2.5);
        let err = client
            .complete(&[Message::user("ho")], &json!({}), 0, None, parse_reward)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HTTP 401: bad key") && !err.contains("attempts"),
            "{err}"
        );
        let requests = f.requests.lock().unwrap();
        assert_eq!(requests.len(), 3, "a 401 is not retried");
        assert!(requests
            .iter()
            .all(|(auth, _)| auth.as_deref() == Some("Bearer k3y")));
        assert_eq!(requests[0].1["model"], "m");
        assert_eq!(requests[0].1["messages"][0]["content"], "hi");
        assert_eq!(requests[0].1["temperature"], 0);
    }

    #[test]
    fn unreachable_endpoint_fails_after_bounded_retries() {
        // Bind then drop a listener: the port is (almost certainly) closed now.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let client = ChatClient::new(
            &format!("http://127.0.0.1:{port}/v1"),
            "m",
            None,
            Duration::from_secs(5),
            RetryPolicy {
                max_retries: 2,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(20),
            },
        );
        let start = std::time::Instant::now();
        let err = client
            .complete(&[Message::user("hi")], &json!({}), 0, None, parse_reward)
            .unwrap_err()
            .to_string();
        assert!(err.contains("failed after 3 attempts"), "{err}");
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
