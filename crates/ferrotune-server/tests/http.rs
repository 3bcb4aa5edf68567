//! The server over real HTTP on 127.0.0.1 (ephemeral ports), with the tiny fixture models.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use ferrotune::data::{pad_id, Encoder, Message};
use ferrotune::infer::reward::reward_scores;
use ferrotune_server::{start, RunningServer, ServeConfig};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny() -> PathBuf {
    fixtures().join("qwen2-tiny")
}

/// A tiny reward model: qwen2-tiny's body with a fixed score head.
fn tiny_reward_model(out: &Path) {
    let src = tiny();
    let config = ferrotune::io::model_dir::load_config(&src).unwrap();
    let tok = ferrotune::io::load_model(&src, DType::F32, &Device::Cpu)
        .unwrap()
        .tokenizer
        .unwrap();
    let rm_config =
        ferrotune::train::trainer::reward_model_config(&config, pad_id(&tok).unwrap()).unwrap();
    let mut tensors =
        ferrotune::io::checkpoint::load_tensors(&src, DType::F32, &Device::Cpu).unwrap();
    tensors.remove("lm_head.weight");
    let h = config.hidden_size;
    let w: Vec<f32> = (0..h).map(|i| ((i as f32) * 0.7).sin() * 0.5).collect();
    tensors.insert(
        "score.weight".into(),
        Tensor::from_vec(w, (1, h), &Device::Cpu).unwrap(),
    );
    let decoder = ferrotune::model::Decoder::from_params(rm_config, tensors).unwrap();
    ferrotune::io::save_model(&decoder, Some(&src), out, DType::F32).unwrap();
}

fn server(model: &Path, configure: impl FnOnce(&mut ServeConfig)) -> RunningServer {
    let mut config = ServeConfig::new(model);
    config.port = 0;
    config.served_model_name = Some("tiny".into());
    config.max_tokens_limit = 64;
    config.max_body_bytes = 64 * 1024;
    configure(&mut config);
    start(config).unwrap()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn post(s: &RunningServer, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
    let mut r = agent()
        .post(&format!("{}{path}", s.base_url()))
        .header("Content-Type", "application/json");
    if let Some(k) = key {
        r = r.header("Authorization", &format!("Bearer {k}"));
    }
    let mut resp = r.send(body).unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

fn get(s: &RunningServer, path: &str, key: Option<&str>) -> (u16, String) {
    let mut r = agent().get(&format!("{}{path}", s.base_url()));
    if let Some(k) = key {
        r = r.header("Authorization", &format!("Bearer {k}"));
    }
    let mut resp = r.call().unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Checks an OpenAI-style error body and returns its message.
fn error_message(status: u16, text: &str, want_status: u16) -> String {
    assert_eq!(status, want_status, "{text}");
    let v = json_of(text);
    let e = &v["error"];
    assert!(e["message"].is_string(), "{text}");
    assert!(e["type"].is_string(), "{text}");
    assert!(e.get("code").is_some(), "{text}");
    e["message"].as_str().unwrap().to_string()
}

/// The JSON payloads of an SSE body, checking the framing; the last event must be `[DONE]`.
fn sse_events(text: &str) -> Vec<Value> {
    let events: Vec<&str> = text
        .split("\n\n")
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    assert!(!events.is_empty(), "{text:?}");
    for e in &events {
        assert!(e.starts_with("data: "), "event {e:?} in {text:?}");
    }
    assert_eq!(*events.last().unwrap(), "data: [DONE]", "{text:?}");
    events[..events.len() - 1]
        .iter()
        .map(|e| json_of(&e["data: ".len()..]))
        .collect()
}

fn chat_body(content: &str, extra: Value) -> String {
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string()
}

#[test]
fn models_list_and_bearer_auth() {
    let s = server(&tiny(), |c| c.api_key = Some("sekret".into()));
    let (st, body) = get(&s, "/models", None);
    assert!(error_message(st, &body, 401).contains("missing API key"));
    let (st, body) = get(&s, "/models", Some("wrong"));
    error_message(st, &body, 401);
    let (st, body) = post(
        &s,
        "/chat/completions",
        &chat_body("hi", json!({})),
        Some("sekre"),
    );
    error_message(st, &body, 401);
    let (st, body) = get(&s, "/models", Some("sekret"));
    assert_eq!(st, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(v["data"][0]["object"], "model");
    let (st, body) = post(
        &s,
        "/chat/completions",
        &chat_body("hi", json!({"max_tokens": 3})),
        Some("sekret"),
    );
    assert_eq!(st, 200, "{body}");
    s.shutdown().unwrap();
}

#[test]
fn bad_requests_are_openai_style_400s_and_the_server_lives_on() {
    let s = server(&tiny(), |_| {});
    let chat = "/chat/completions";
    for (body, want) in [
        ("{not json", "not valid JSON"),
        ("", "empty"),
        ("[]", "JSON object"),
        (
            r#"{"model": "tiny", "messages": [], "bogus": 1}"#,
            "unknown field `bogus`",
        ),
        (r#"{"model": "tiny"}"#, "missing field `messages`"),
        (r#"{"model": "tiny", "messages": []}"#, "must not be empty"),
        (
            r#"{"model": "tiny", "messages": [{"role": "user"}]}"#,
            "content",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": 5}]}"#,
            "invalid request",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 65}"#,
            "limit of 64",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}"#,
            "at least 1",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}"#,
            "temperature",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}"#,
            "n must be",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": true}"#,
            "logprobs",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}"#,
            "invalid request",
        ),
    ] {
        let (st, text) = post(&s, chat, body, None);
        let m = error_message(st, &text, 400);
        assert!(m.contains(want), "{body}: {m}");
    }
    // Wrong model: 404 model_not_found.
    let (st, text) = post(
        &s,
        chat,
        r#"{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}"#,
        None,
    );
    assert!(error_message(st, &text, 404).contains("`tiny`"));
    assert_eq!(json_of(&text)["error"]["code"], "model_not_found");
    // Body over the limit: 413 with the same error shape.
    let big = chat_body(&"x".repeat(70 * 1024), json!({}));
    let (st, text) = post(&s, chat, &big, None);
    error_message(st, &text, 413);
    // Completions: empty prompt, prompt longer than the context (256), token ids out of range.
    let (st, text) = post(
        &s,
        "/completions",
        r#"{"model": "tiny", "prompt": ""}"#,
        None,
    );
    assert!(error_message(st, &text, 400).contains("empty"));
    let long = json!({"model": "tiny", "prompt": "hello world ".repeat(200)}).to_string();
    let (st, text) = post(&s, "/completions", &long, None);
    error_message(st, &text, 400);
    assert_eq!(json_of(&text)["error"]["code"], "context_length_exceeded");
    let (st, text) = post(
        &s,
        "/completions",
        r#"{"model": "tiny", "prompt": [1, 99999]}"#,
        None,
    );
    assert!(error_message(st, &text, 400).contains("vocabulary"));
    let (st, text) = post(
        &s,
        "/completions",
        r#"{"model": "tiny", "prompt": "a", "echo": true}"#,
        None,
    );
    assert!(error_message(st, &text, 400).contains("echo"));
    // Unknown route and wrong method.
    let (st, text) = get(&s, "/nope", None);
    error_message(st, &text, 404);
    let (st, text) = get(&s, chat, None);
    error_message(st, &text, 405);
    // Still serving.
    let (st, text) = post(&s, chat, &chat_body("hi", json!({"max_tokens": 4})), None);
    assert_eq!(st, 200, "{text}");
}

#[test]
fn chat_streaming_sends_the_same_text_as_a_plain_answer() {
    let s = server(&tiny(), |_| {});
    let extra = json!({"max_tokens": 24, "temperature": 0.8, "seed": 11});
    let (st, text) = post(
        &s,
        "/chat/completions",
        &chat_body("Tell me a story", extra.clone()),
        None,
    );
    assert_eq!(st, 200, "{text}");
    let plain = json_of(&text);
    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(plain["choices"][0]["message"]["role"], "assistant");
    let content = plain["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let reason = plain["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason == "stop" || reason == "length");
    let usage = &plain["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 24);

    let mut streamed = extra.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (st, text) = post(
        &s,
        "/chat/completions",
        &chat_body("Tell me a story", streamed),
        None,
    );
    assert_eq!(st, 200, "{text}");
    let events = sse_events(&text);
    let mut joined = String::new();
    let mut finish = None;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["object"], "chat.completion.chunk", "{e}");
        assert_eq!(e["id"], events[0]["id"]);
        if let Some(c) = e["choices"].as_array().unwrap().first() {
            if i == 0 {
                assert_eq!(c["delta"]["role"], "assistant");
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                joined.push_str(t);
            }
            if let Some(r) = c["finish_reason"].as_str() {
                finish = Some(r.to_string());
            }
        }
    }
    assert_eq!(joined, content);
    assert_eq!(finish.as_deref(), Some(reason.as_str()));
    let last = events.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], *usage);
}

#[test]
fn completions_take_text_token_ids_lists_n_and_stop() {
    let s = server(&tiny(), |_| {});
    let (st, text) = post(
        &s,
        "/completions",
        r#"{"model": "tiny", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}"#,
        None,
    );
    assert_eq!(st, 200, "{text}");
    let v = json_of(&text);
    assert_eq!(v["object"], "text_completion");
    let greedy = v["choices"][0]["text"].as_str().unwrap().to_string();
    // Token ids of the same prompt give the same greedy text.
    let tok = ferrotune::io::load_model(&tiny(), DType::F32, &Device::Cpu)
        .unwrap()
        .tokenizer
        .unwrap();
    let ids = tok.encode("Once upon a time", true).unwrap();
    let body = json!({"model": "tiny", "prompt": ids, "max_tokens": 16, "temperature": 0});
    let (_, text) = post(&s, "/completions", &body.to_string(), None);
    assert_eq!(
        json_of(&text)["choices"][0]["text"].as_str().unwrap(),
        greedy
    );
    // Two prompts × n = 2: four choices, indexed prompt-major.
    let body =
        json!({"model": "tiny", "prompt": ["a b", "c d"], "n": 2, "max_tokens": 5, "seed": 3});
    let (st, text) = post(&s, "/completions", &body.to_string(), None);
    assert_eq!(st, 200, "{text}");
    let choices = json_of(&text)["choices"].as_array().unwrap().clone();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    // A stop string cuts the text before it, with finish_reason "stop".
    let chars: Vec<char> = greedy.chars().collect();
    if chars.len() >= 6 {
        let stop: String = chars[3..5].iter().collect();
        if !stop.trim().is_empty() {
            let body = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "stop": [stop]});
            let (_, text) = post(&s, "/completions", &body.to_string(), None);
            let v = json_of(&text);
            let cut = v["choices"][0]["text"].as_str().unwrap();
            assert_eq!(cut, &greedy[..greedy.find(&stop).unwrap()]);
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
        }
    }
    // Streamed completions end with [DONE].
    let body = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "stream": true});
    let (_, text) = post(&s, "/completions", &body.to_string(), None);
    let events = sse_events(&text);
    let joined: String = events
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(joined, greedy);
}

#[test]
fn concurrent_requests_are_batched_and_answer_as_alone() {
    let s = server(&tiny(), |c| c.max_batch_size = 8);
    let bodies: Vec<String> = (0..6)
        .map(|i| {
            json!({
                "model": "tiny",
                "prompt": format!("prompt number {i} {}", "x ".repeat(i * 3)),
                "max_tokens": 6 + 3 * i,
                "temperature": 0.7,
                "seed": i,
                "n": 1 + i % 2,
            })
            .to_string()
        })
        .collect();
    let alone: Vec<Value> = bodies
        .iter()
        .map(|b| json_of(&post(&s, "/completions", b, None).1))
        .collect();
    let together: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| scope.spawn(|| json_of(&post(&s, "/completions", b, None).1)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, t) in alone.iter().zip(&together) {
        assert_eq!(a["choices"], t["choices"], "alone {a}\ntogether {t}");
        assert_eq!(a["usage"], t["usage"]);
    }
}

#[test]
fn a_client_that_leaves_mid_stream_does_not_hurt_others() {
    let s = server(&tiny(), |_| {});
    {
        let body = chat_body("go", json!({"max_tokens": 64, "stream": true}));
        let mut resp = agent()
            .post(&format!("{}/chat/completions", s.base_url()))
            .header("Content-Type", "application/json")
            .send(body.as_str())
            .unwrap();
        let mut first = [0u8; 16];
        use std::io::Read;
        let _ = resp.body_mut().as_reader().read(&mut first).unwrap();
        // Dropped here: the connection closes mid-stream.
    }
    let (st, text) = post(
        &s,
        "/chat/completions",
        &chat_body("hi", json!({"max_tokens": 5})),
        None,
    );
    assert_eq!(st, 200, "{text}");
}

#[test]
fn a_reward_model_answers_reward_content() {
    let dir = tempfile::tempdir().unwrap();
    let rm = dir.path().join("rm");
    tiny_reward_model(&rm);
    let s = server(&rm, |c| c.served_model_name = Some("rm".into()));
    let conversation = |answer: &str| {
        json!({"model": "rm", "messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": answer},
        ]})
    };
    let loaded = ferrotune::io::load_model(&rm, DType::F32, &Device::Cpu).unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    let encoder = Encoder::new(tok).unwrap();
    let mut rewards = Vec::new();
    for answer in ["4", "It is five, obviously."] {
        let (st, text) = post(
            &s,
            "/chat/completions",
            &conversation(answer).to_string(),
            None,
        );
        assert_eq!(st, 200, "{text}");
        let v = json_of(&text);
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        let reward: f64 = content.strip_prefix("reward:").unwrap().parse().unwrap();
        let ids =
            ferrotune::eval::reward_input(&encoder, &[Message::user("What is 2 + 2?")], answer)
                .unwrap();
        let want = reward_scores(&loaded.decoder, &[ids], pad_id(tok).unwrap(), 1).unwrap()[0];
        assert!((reward - want as f64).abs() < 1e-5, "{reward} vs {want}");
        rewards.push(reward);
    }
    assert_ne!(rewards[0], rewards[1]);
    // Streaming gives the same content in one chunk.
    let mut body = conversation("4");
    body["stream"] = json!(true);
    let (_, text) = post(&s, "/chat/completions", &body.to_string(), None);
    let events = sse_events(&text);
    assert_eq!(
        events[0]["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap(),
        format!("reward:{}", rewards[0])
    );
    // A conversation that does not end with the answer, and the completions route, are 400s.
    let body = json!({"model": "rm", "messages": [{"role": "user", "content": "hi"}]});
    let (st, text) = post(&s, "/chat/completions", &body.to_string(), None);
    assert!(error_message(st, &text, 400).contains("reward model"));
    let (st, text) = post(
        &s,
        "/completions",
        r#"{"model": "rm", "prompt": "hi"}"#,
        None,
    );
    assert!(error_message(st, &text, 400).contains("reward model"));
}

#[test]
fn a_bf16_server_decodes_as_the_bf16_library_path() {
    use ferrotune::infer::generate::{generate, GenerateOptions, Prompt};
    use ferrotune::infer::sampler::SamplingParams;
    let max_tokens = 48;
    let load = |dtype| ferrotune::io::load_model_for(&tiny(), dtype, &Device::Cpu).unwrap();
    let (f32_model, bf16_model) = (load(DType::F32), load(DType::BF16));
    let greedy = |dtype: DType, text: &str| {
        let model = if dtype == DType::BF16 {
            &bf16_model
        } else {
            &f32_model
        };
        let tok = model.tokenizer.as_ref().unwrap();
        let options = GenerateOptions {
            params: SamplingParams {
                temperature: 0.0,
                max_new_tokens: max_tokens,
                ..Default::default()
            },
            seed: 0,
            stop_ids: tok.stop_token_ids.clone(),
            batch_size: 1,
            tokenizer: None,
            capture_after_stop: None,
        };
        let ids = tok.encode(text, true).unwrap();
        let prompt = Prompt {
            ids,
            item: 0,
            n: 1,
            first_sample: 0,
        };
        let mut gen = generate(&model.decoder, &[prompt], &options).unwrap()[0]
            .ids
            .clone();
        if gen.last().is_some_and(|t| options.stop_ids.contains(t)) {
            gen.pop();
        }
        tok.decode(&gen, true).unwrap()
    };
    // A prompt whose greedy text differs between f32 and bf16 autocast, so that the check
    // below tells which model the server loaded.
    let prompt = [
        "Once upon a time",
        "The cat",
        "a b c",
        "Hello there",
        "1 2 3 4",
        "Why",
    ]
    .into_iter()
    .find(|p| greedy(DType::F32, p) != greedy(DType::BF16, p))
    .expect("a prompt whose greedy text differs between f32 and bf16");

    let s = server(&tiny(), |c| c.dtype = DType::BF16);
    let body =
        json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    let (st, text) = post(&s, "/completions", &body.to_string(), None);
    assert_eq!(st, 200, "{text}");
    let served = json_of(&text)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(served, greedy(DType::BF16, prompt));
}
