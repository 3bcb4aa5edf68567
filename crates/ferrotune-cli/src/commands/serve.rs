//! `ferrotune serve`: an OpenAI-compatible HTTP server for one model (see the
//! `ferrotune-server` crate): `POST /v1/chat/completions` (with `stream: true` as server-sent
//! events), `POST /v1/completions`, `GET /v1/models`; a reward model answers chats with
//! `reward:<float>`. Prints `listening on http://ADDR/v1 (model NAME)` on stderr once ready.

use std::path::PathBuf;

use ferrotune_server::ServeConfig;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (causal LM, or a *ForSequenceClassification reward model).
    #[arg(long)]
    model: PathBuf,
    /// Address to bind; the default only accepts connections from this machine.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long)]
    api_key: Option<String>,
    /// The largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 4096)]
    max_tokens_limit: usize,
    /// `max_tokens` of requests that give none (capped by the limit).
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// The largest request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// The model name clients use (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most sequences decoded or scored at once (continuous batching).
    #[arg(long, default_value_t = 32)]
    max_batch_size: usize,
    /// Most requests in progress; more get HTTP 503.
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// Compute precision: f32, or bf16 (on the CPU: f32 weights, every linear through the bf16
    /// GEMM with weight panels packed once, as `generate --precision bf16`).
    #[arg(long, default_value = "f32")]
    precision: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut config = ServeConfig::new(args.model);
    config.host = args.host;
    config.port = args.port;
    config.api_key = args.api_key;
    config.max_tokens_limit = args.max_tokens_limit;
    config.default_max_tokens = args.default_max_tokens;
    config.max_body_bytes = args.max_body_bytes;
    config.served_model_name = args.served_model_name;
    config.max_batch_size = args.max_batch_size;
    config.max_queue = args.max_queue;
    config.device = super::device()?;
    config.dtype = ferrotune::io::checkpoint::parse_dtype(&args.precision)?;
    ferrotune_server::serve(config)
}
