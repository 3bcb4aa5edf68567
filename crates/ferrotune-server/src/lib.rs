//! An OpenAI-compatible HTTP server for one ferrotune model (`ferrotune serve`).
//!
//! Routes:
//! - `POST /v1/chat/completions` — the chat template renders `messages` (with the generation
//!   prompt); `stream: true` answers with server-sent events, one `chat.completion.chunk` per
//!   piece of text, ending with `data: [DONE]`. When the model is a reward model
//!   (`*ForSequenceClassification`), the conversation must end with an assistant message and the
//!   answer's content is `reward:<float>` (NVIDIA's Nemotron reward API style), computed on
//!   exactly the tokens `ferrotune::eval::reward_input` gives, as reward-model training does.
//! - `POST /v1/completions` — raw text (encoded with the tokenizer's special tokens) or token ids.
//! - `GET /v1/models` — the one served model.
//! - `GET /health` (`ok`) and `GET /stats` (the worker's counters), not OpenAI routes.
//!
//! Safety: binds 127.0.0.1 unless told otherwise; with an API key every route needs
//! `Authorization: Bearer KEY` (401 otherwise); bodies over `max_body_bytes` are refused (413);
//! `max_tokens` above `max_tokens_limit` is a 400; malformed JSON, unknown fields and bad values
//! are 400s with an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`; a full
//! queue is a 503. No input makes the server panic.
//!
//! One worker thread owns the model and batches requests continuously (see `engine.rs`).

pub mod api;
pub mod engine;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_core::{DType, Device};
use ferrotune::data::{pad_id, Encoder, Message, PromptInput};
use ferrotune::infer::generate::FinishReason;
use ferrotune::infer::sampler::SamplingParams;
use ferrotune::io::Tokenizer;
use ferrotune::model::Head;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use api::{parse_body, ApiError, ChatRequest, CompletionRequest, PromptField, Sampling};
use engine::{Engine, EngineConfig, EngineStats, GenEvent, GenJob, Job, ScoreJob};

/// Settings of `ferrotune serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub host: String,
    /// 0 picks a free port (see [`RunningServer::addr`]).
    pub port: u16,
    /// When set, every request needs `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    /// The largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// `max_tokens` when a request gives none (capped by the limit).
    pub default_max_tokens: usize,
    /// The largest request body, in bytes.
    pub max_body_bytes: usize,
    /// The name `/v1/models` lists and requests must use (default: the model directory's name).
    pub served_model_name: Option<String>,
    /// Most sequences decoded (or scored) at once.
    pub max_batch_size: usize,
    /// Most requests accepted and not finished; more get 503.
    pub max_queue: usize,
    /// Most choices (`n`) per request.
    pub max_n: usize,
    pub device: Device,
    /// Compute precision; bf16 on the CPU keeps f32 weights and runs every linear through the
    /// bf16 GEMM (`ferrotune::io::load_model_for`).
    pub dtype: DType,
}

impl ServeConfig {
    pub fn new(model: impl Into<PathBuf>) -> ServeConfig {
        ServeConfig {
            model: model.into(),
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            max_tokens_limit: 4096,
            default_max_tokens: 256,
            max_body_bytes: 4 << 20,
            served_model_name: None,
            max_batch_size: 32,
            max_queue: 1024,
            max_n: 16,
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

struct AppState {
    model_name: String,
    created: u64,
    api_key: Option<String>,
    encoder: Encoder<'static>,
    is_reward_model: bool,
    context: usize,
    vocab: usize,
    max_tokens_limit: usize,
    default_max_tokens: usize,
    max_queue: usize,
    max_n: usize,
    in_flight: Arc<AtomicUsize>,
    stats: Arc<EngineStats>,
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
    next_id: AtomicU64,
}

impl AppState {
    fn submit(&self, job: Job) -> Result<(), ApiError> {
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "overloaded",
                format!(
                    "the server has {} requests in progress; retry later",
                    self.max_queue
                ),
            ));
        }
        let sent = self
            .jobs
            .lock()
            .map(|tx| tx.send(job).is_ok())
            .unwrap_or(false);
        if !sent {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::internal("the model worker has stopped"));
        }
        Ok(())
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        format!("{prefix}-{:x}{n:06x}", self.created)
    }
}

/// A server running on a background thread; dropping it stops it.
pub struct RunningServer {
    addr: SocketAddr,
    model_name: String,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl RunningServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API base, e.g. `http://127.0.0.1:8000/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Stops accepting connections, lets open requests finish, and waits.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop()
    }

    /// Waits until the server stops by itself (it does not, short of an error).
    pub fn wait(mut self) -> anyhow::Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Loads the model, binds, and serves on a background thread until [`RunningServer::shutdown`].
pub fn start(config: ServeConfig) -> anyhow::Result<RunningServer> {
    let (state, engine, jobs_rx) = load(&config)?;
    let model_name = state.model_name.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((
            config.host.as_str(),
            config.port,
        )))
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let worker = std::thread::Builder::new()
        .name("ferrotune-model".into())
        .spawn(move || engine.run(jobs_rx))?;
    let app = router(state, config.max_body_bytes);
    let thread = std::thread::Builder::new()
        .name("ferrotune-http".into())
        .spawn(move || -> anyhow::Result<()> {
            runtime.block_on(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = shutdown_rx.await;
                    })
                    .await
            })?;
            // The router (and with it the job sender) is gone: the worker ends.
            drop(runtime);
            let _ = worker.join();
            Ok(())
        })?;
    Ok(RunningServer {
        addr,
        model_name,
        shutdown: Some(shutdown_tx),
        thread: Some(thread),
    })
}

/// `ferrotune serve`: serves until Ctrl-C (or SIGTERM), printing the address on stderr as
/// `listening on http://ADDR/v1 (model NAME)`.
pub fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let server = start(config)?;
    eprintln!(
        "listening on {} (model {})",
        server.base_url(),
        server.model_name()
    );
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    signals.block_on(async {
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await?;
        anyhow::Ok(())
    })?;
    eprintln!("shutting down");
    server.shutdown()
}

fn load(
    config: &ServeConfig,
) -> anyhow::Result<(Arc<AppState>, Engine, std::sync::mpsc::Receiver<Job>)> {
    let model = ferrotune::io::load_model_for(&config.model, config.dtype, &config.device)
        .with_context(|| format!("loading {}", config.model.display()))?;
    let tokenizer = model.tokenizer.ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the model directory has no tokenizer",
            config.model.display()
        )
    })?;
    // The tokenizer lives as long as the process: the encoder borrows it.
    let tokenizer: &'static Tokenizer = Box::leak(Box::new(tokenizer));
    let encoder = Encoder::new(tokenizer)?;
    let decoder = model.decoder;
    let is_reward_model = decoder.config().head == Head::SequenceClassification;
    let context = decoder.config().max_position_embeddings;
    let vocab = decoder.config().vocab_size;
    let name = config.served_model_name.clone().unwrap_or_else(|| {
        config
            .model
            .canonicalize()
            .unwrap_or_else(|_| config.model.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let in_flight = Arc::new(AtomicUsize::new(0));
    let stats = Arc::new(EngineStats::default());
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
    let engine = Engine::new(
        decoder,
        tokenizer,
        EngineConfig {
            max_batch_size: config.max_batch_size.max(1),
            max_slots: (2 * context).min(8192).max(context),
            stop_ids: tokenizer.stop_token_ids.clone(),
            pad_id: pad_id(tokenizer).unwrap_or(0),
        },
        in_flight.clone(),
        stats.clone(),
    );
    let state = Arc::new(AppState {
        model_name: name,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        api_key: config.api_key.clone().filter(|k| !k.is_empty()),
        encoder,
        is_reward_model,
        context,
        vocab,
        max_tokens_limit: config.max_tokens_limit.max(1),
        default_max_tokens: config
            .default_max_tokens
            .clamp(1, config.max_tokens_limit.max(1)),
        max_queue: config.max_queue.max(1),
        max_n: config.max_n.max(1),
        in_flight,
        stats,
        jobs: std::sync::Mutex::new(jobs_tx),
        next_id: AtomicU64::new(0),
    });
    Ok((state, engine, jobs_rx))
}

fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/stats", get(stats))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "no such route",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Compares without an early exit, so the time taken does not tell how much of a key matched.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= (x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match given {
        Some(g) if same_secret(g.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "incorrect API key provided",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing API key: send `Authorization: Bearer KEY`",
        )),
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "invalid_request_error",
                "request_too_large",
                "the request body is larger than this server accepts",
            )
        } else {
            ApiError::new(
                status,
                "invalid_request_error",
                "invalid_body",
                r.body_text(),
            )
        }
    })
}

/// Worker counters (not an OpenAI route): forward passes, joins into running batches, most rows
/// in one pass, tokens generated, requests in progress.
async fn stats(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let mut v = state.stats.to_json();
    v["in_flight"] = state.in_flight.load(Ordering::SeqCst).into();
    Json(v).into_response()
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "ferrotune",
            "max_model_len": state.context,
        }],
    }))
    .into_response()
}

/// The sampling parameters and choice count of a request, checked.
fn sampling_params(
    state: &AppState,
    s: &Sampling,
    max_tokens: Option<usize>,
) -> Result<(SamplingParams, usize, u64), ApiError> {
    let max_new_tokens = max_tokens.unwrap_or(state.default_max_tokens);
    if max_new_tokens == 0 {
        return Err(ApiError::param(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    if max_new_tokens > state.max_tokens_limit {
        return Err(ApiError::param(
            "max_tokens",
            format!(
                "max_tokens is {max_new_tokens}, above this server's limit of {}",
                state.max_tokens_limit
            ),
        ));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::param(
            "temperature",
            "temperature must be between 0 and 2",
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::param("top_p", "top_p must be in (0, 1]"));
    }
    let top_k = match s.top_k.unwrap_or(0) {
        k if k <= 0 => {
            if k < -1 {
                return Err(ApiError::param(
                    "top_k",
                    "top_k must be -1, 0 (all tokens) or positive",
                ));
            }
            0
        }
        k => k as usize,
    };
    let n = s.n.unwrap_or(1);
    if n == 0 || n > state.max_n {
        return Err(ApiError::param(
            "n",
            format!("n must be between 1 and {}", state.max_n),
        ));
    }
    for (name, v) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::param(
                name,
                format!("{name} is not supported by this server (only 0)"),
            ));
        }
    }
    if s.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::param(
            "logit_bias",
            "logit_bias is not supported by this server",
        ));
    }
    let stop_strings = s.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop_strings.len() > 4 {
        return Err(ApiError::param("stop", "at most 4 stop sequences"));
    }
    if stop_strings.iter().any(|s| s.is_empty()) {
        return Err(ApiError::param("stop", "stop sequences must not be empty"));
    }
    let seed = match s.seed {
        Some(seed) => seed as u64,
        None => rand::random::<u64>(),
    };
    Ok((
        SamplingParams {
            temperature,
            top_p,
            top_k,
            max_new_tokens,
            stop_strings,
        },
        n,
        seed,
    ))
}

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model != state.model_name {
        let mut e = ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the model `{model}` does not exist; this server serves `{}`",
                state.model_name
            ),
        );
        e.param = Some("model".into());
        return Err(e);
    }
    Ok(())
}

fn check_prompt(state: &AppState, ids: &[u32], what: &str) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Err(ApiError::param(
            what,
            "the prompt is empty: there is no token to continue from",
        ));
    }
    if ids.len() >= state.context {
        return Err(ApiError::invalid(
            "context_length_exceeded",
            format!(
                "the prompt is {} tokens; this model's context is {} tokens (and at least one must be left to generate)",
                ids.len(),
                state.context
            ),
        ));
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat_inner(state, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let request: ChatRequest = parse_body(&body_bytes(body)?)?;
    check_model(&state, &request.model)?;
    request.check_unsupported()?;
    if request.messages.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for m in &request.messages {
        if m.role.is_empty() {
            return Err(ApiError::param("messages", "a message has an empty role"));
        }
        messages.push(Message::new(&m.role, m.content.to_text()?));
    }
    let include_usage = request
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    if state.is_reward_model {
        return reward_chat(&state, messages, request.stream, include_usage).await;
    }
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let (params, n, seed) = sampling_params(&state, &request.sampling(), max_tokens)?;
    let prompt = state
        .encoder
        .prompt(&PromptInput::Messages(messages))
        .map_err(|e| ApiError::param("messages", e.to_string()))?;
    check_prompt(&state, &prompt, "messages")?;
    let prompt_tokens = prompt.len();
    let (tx, rx) = mpsc::unbounded_channel();
    state.submit(Job::Generate(GenJob {
        prompt,
        n,
        params,
        seed,
        events: tx,
    }))?;
    let id = state.new_id("chatcmpl");
    let created = now();
    let model = state.model_name.clone();
    if request.stream {
        let chunk = {
            let (id, model) = (id.clone(), model.clone());
            move |choices: Value, usage: Option<Value>| {
                let mut c = json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices,
                });
                if let Some(u) = usage {
                    c["usage"] = u;
                }
                c
            }
        };
        let first: Vec<Value> = (0..n)
            .map(|i| chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), None))
            .collect();
        let events = event_stream(rx, n, prompt_tokens, include_usage, move |e| match e {
            StreamItem::Delta(i, text) => chunk(
                json!([{"index": i, "delta": {"content": text}, "logprobs": null, "finish_reason": null}]),
                None,
            ),
            StreamItem::Done(i, reason) => chunk(
                json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": reason}]),
                None,
            ),
            StreamItem::Usage(u) => chunk(json!([]), Some(u)),
        });
        return Ok(sse(first, events));
    }
    let (texts, reasons, completion_tokens) = collect(rx, n).await?;
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": texts[i]},
                "logprobs": null,
                "finish_reason": reasons[i],
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

/// A reward model's answer to a chat: `reward:<float>` for the conversation.
async fn reward_chat(
    state: &Arc<AppState>,
    messages: Vec<Message>,
    stream: bool,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let (prompt, answer) = match messages.split_last() {
        Some((last, prompt)) if last.role == "assistant" && !prompt.is_empty() => (prompt.to_vec(), last.content.clone()),
        _ => {
            return Err(ApiError::param(
                "messages",
                "this is a reward model: send the conversation to score, ending with the assistant message (e.g. [user, assistant])",
            ))
        }
    };
    let ids = ferrotune::eval::reward_input(&state.encoder, &prompt, &answer)
        .map_err(|e| ApiError::param("messages", e.to_string()))?;
    if ids.len() > state.context {
        return Err(ApiError::invalid(
            "context_length_exceeded",
            format!(
                "the conversation is {} tokens; this model's context is {} tokens",
                ids.len(),
                state.context
            ),
        ));
    }
    let prompt_tokens = ids.len();
    let (tx, rx) = oneshot::channel();
    state.submit(Job::Score(ScoreJob {
        sequences: vec![ids],
        reply: tx,
    }))?;
    let score = rx
        .await
        .map_err(|_| ApiError::internal("the model worker stopped"))?
        .map_err(|e| ApiError::internal(format!("scoring failed: {e}")))?[0];
    // The f32 score widened exactly to f64, so a client parsing it gets the very number an
    // in-process judge computes.
    let content = format!("reward:{}", f64::from(score));
    let id = state.new_id("chatcmpl");
    let created = now();
    let model = state.model_name.clone();
    if stream {
        let base = |choices: Value| json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices});
        let mut chunks = vec![
            base(
                json!([{"index": 0, "delta": {"role": "assistant", "content": content}, "logprobs": null, "finish_reason": null}]),
            ),
            base(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}])),
        ];
        if include_usage {
            let mut u = base(json!([]));
            u["usage"] = usage(prompt_tokens, 0);
            chunks.push(u);
        }
        return Ok(sse(chunks, stream::empty().boxed()));
    }
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": null, "finish_reason": "stop"}],
        "usage": usage(prompt_tokens, 0),
    }))
    .into_response())
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match completions_inner(state, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let request: CompletionRequest = parse_body(&body_bytes(body)?)?;
    check_model(&state, &request.model)?;
    request.check_unsupported()?;
    if state.is_reward_model {
        return Err(ApiError::invalid(
            "unsupported_endpoint",
            "this is a reward model: use /v1/chat/completions with [user, assistant] messages to get `reward:<float>`",
        ));
    }
    let (params, n, seed) = sampling_params(&state, &request.sampling(), request.max_tokens)?;
    let prompts: Vec<Vec<u32>> = match &request.prompt {
        PromptField::Text(t) => vec![encode_text(&state, t)?],
        PromptField::Texts(ts) => ts
            .iter()
            .map(|t| encode_text(&state, t))
            .collect::<Result<_, _>>()?,
        PromptField::Tokens(ids) => vec![ids.clone()],
        PromptField::TokenLists(lists) => lists.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::param(
            "prompt",
            "prompt must not be an empty list",
        ));
    }
    if prompts.len() * n > state.max_n.max(1) * 4 {
        return Err(ApiError::param(
            "prompt",
            "too many prompts × n in one request",
        ));
    }
    for ids in &prompts {
        check_prompt(&state, ids, "prompt")?;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= state.vocab) {
            return Err(ApiError::param(
                "prompt",
                format!("token id {bad} is outside the vocabulary ({})", state.vocab),
            ));
        }
    }
    let prompt_tokens: usize = prompts.iter().map(|p| p.len()).sum();
    // One engine job per prompt; choice index = prompt index × n + sample.
    let mut receivers = Vec::with_capacity(prompts.len());
    for (p, ids) in prompts.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        state.submit(Job::Generate(GenJob {
            prompt: ids,
            n,
            params: params.clone(),
            seed: seed.wrapping_add(p as u64),
            events: tx,
        }))?;
        receivers.push(rx);
    }
    let total = receivers.len() * n;
    let rx = merge(receivers, n);
    let id = state.new_id("cmpl");
    let created = now();
    let model = state.model_name.clone();
    let include_usage = request
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    if request.stream {
        let chunk = move |choices: Value, usage: Option<Value>| {
            let mut c = json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices});
            if let Some(u) = usage {
                c["usage"] = u;
            }
            c
        };
        let events = event_stream(rx, total, prompt_tokens, include_usage, move |e| match e {
            StreamItem::Delta(i, text) => chunk(
                json!([{"index": i, "text": text, "logprobs": null, "finish_reason": null}]),
                None,
            ),
            StreamItem::Done(i, reason) => chunk(
                json!([{"index": i, "text": "", "logprobs": null, "finish_reason": reason}]),
                None,
            ),
            StreamItem::Usage(u) => chunk(json!([]), Some(u)),
        });
        return Ok(sse(Vec::new(), events));
    }
    let (texts, reasons, completion_tokens) = collect(rx, total).await?;
    let choices: Vec<Value> = (0..total)
        .map(|i| json!({"index": i, "text": texts[i], "logprobs": null, "finish_reason": reasons[i]}))
        .collect();
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

fn encode_text(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    state
        .encoder
        .prompt(&PromptInput::Text(text.to_string()))
        .map_err(|e| ApiError::param("prompt", e.to_string()))
}

/// Forwards the events of several jobs into one channel, renumbering choices (job j's choice c
/// becomes j·n + c).
fn merge(
    receivers: Vec<mpsc::UnboundedReceiver<GenEvent>>,
    n: usize,
) -> mpsc::UnboundedReceiver<GenEvent> {
    if receivers.len() == 1 {
        return receivers.into_iter().next().expect("one");
    }
    let (tx, rx) = mpsc::unbounded_channel();
    for (j, mut r) in receivers.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(e) = r.recv().await {
                let e = match e {
                    GenEvent::Delta { choice, text } => GenEvent::Delta {
                        choice: j * n + choice,
                        text,
                    },
                    GenEvent::Done {
                        choice,
                        finish_reason,
                        completion_tokens,
                    } => GenEvent::Done {
                        choice: j * n + choice,
                        finish_reason,
                        completion_tokens,
                    },
                    other => other,
                };
                if tx.send(e).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Waits for every choice of a non-streamed request.
async fn collect(
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
    n: usize,
) -> Result<(Vec<String>, Vec<&'static str>, usize), ApiError> {
    let mut texts = vec![String::new(); n];
    let mut reasons = vec![""; n];
    let mut tokens = 0;
    let mut done = 0;
    while done < n {
        match rx.recv().await {
            Some(GenEvent::Delta { choice, text }) => texts[choice].push_str(&text),
            Some(GenEvent::Done {
                choice,
                finish_reason,
                completion_tokens,
            }) => {
                reasons[choice] = finish_reason.as_str();
                tokens += completion_tokens;
                done += 1;
            }
            Some(GenEvent::Error(e)) => return Err(ApiError::internal(e)),
            None => {
                return Err(ApiError::internal(
                    "the model worker stopped before finishing",
                ))
            }
        }
    }
    Ok((texts, reasons, tokens))
}

enum StreamItem {
    Delta(usize, String),
    Done(usize, &'static str),
    Usage(Value),
}

/// The chunks of a streamed request, built by `chunk`, ending after every choice is done (and
/// the usage chunk when asked for). An engine error ends the stream with an error event.
fn event_stream(
    rx: mpsc::UnboundedReceiver<GenEvent>,
    n: usize,
    prompt_tokens: usize,
    include_usage: bool,
    chunk: impl Fn(StreamItem) -> Value + Send + 'static,
) -> futures_util::stream::BoxStream<'static, Value> {
    struct S<F> {
        rx: mpsc::UnboundedReceiver<GenEvent>,
        left: usize,
        tokens: usize,
        usage_sent: bool,
        include_usage: bool,
        prompt_tokens: usize,
        chunk: F,
    }
    let s = S {
        rx,
        left: n,
        tokens: 0,
        usage_sent: false,
        include_usage,
        prompt_tokens,
        chunk,
    };
    stream::unfold(s, |mut s| async move {
        if s.left == 0 {
            if s.include_usage && !s.usage_sent {
                s.usage_sent = true;
                let c = (s.chunk)(StreamItem::Usage(usage(s.prompt_tokens, s.tokens)));
                return Some((c, s));
            }
            return None;
        }
        match s.rx.recv().await {
            Some(GenEvent::Delta { choice, text }) => {
                let c = (s.chunk)(StreamItem::Delta(choice, text));
                Some((c, s))
            }
            Some(GenEvent::Done {
                choice,
                finish_reason,
                completion_tokens,
            }) => {
                s.left -= 1;
                s.tokens += completion_tokens;
                let c = (s.chunk)(StreamItem::Done(choice, reason_str(finish_reason)));
                Some((c, s))
            }
            Some(GenEvent::Error(e)) => {
                s.left = 0;
                s.include_usage = false;
                Some((ApiError::internal(e).body(), s))
            }
            None => {
                s.left = 0;
                s.include_usage = false;
                Some((
                    ApiError::internal("the model worker stopped before finishing").body(),
                    s,
                ))
            }
        }
    })
    .boxed()
}

fn reason_str(r: FinishReason) -> &'static str {
    r.as_str()
}

/// An SSE response: `first` chunks, then the stream's, then `data: [DONE]`.
fn sse(first: Vec<Value>, rest: futures_util::stream::BoxStream<'static, Value>) -> Response {
    let events = stream::iter(first)
        .chain(rest)
        .map(|v| Event::default().data(v.to_string()))
        .chain(stream::once(async { Event::default().data("[DONE]") }))
        .map(Ok::<Event, std::convert::Infallible>);
    Sse::new(events).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"abc"));
        assert!(same_secret(b"", b""));
    }
}
