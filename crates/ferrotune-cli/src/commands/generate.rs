//! `ferrotune generate`: batched sampling from a prompts file into JSONL rows (CONTRACTS
//! "Generation and verification"): `index` (prompt row), `sample_index`, `prompt` (the text fed
//! to the model), `completion`, `num_tokens` (generated tokens, an end token included) and
//! `finish_reason` (`stop` or `length`). Rows are written as each batch finishes, so an
//! interrupted run keeps what it generated. A progress bar and the tokens/s go to stderr.
//!
//! Under a launcher (`mpirun -np N`), the batches are dealt out across the ranks (batch j on
//! rank j mod N, each computed exactly as one process computes it) and rank 0 writes every row
//! in order: the file equals the single-process one with the same seed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use ferrotune::data::{load_dataset, Encoder, LoadOptions, PromptInput, Schema};
use ferrotune::eval::{generation_prompt, AnswerRow};
use ferrotune::infer::{
    generate, Completion, FinishReason, GenerateOptions, Prompt, SamplingParams,
};
use ferrotune::io::{LoadedModel, Tokenizer};

/// Sampling flags shared by `generate` and `winrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most tokens generated per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 samples greedily.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample i of prompt row r draws from the stream seeded by (seed, r, i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rows (prompts × samples) decoded at once.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Stop strings (the completion is cut before them); repeat the flag for several.
    #[arg(long = "stop", num_args = 1)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> anyhow::Result<SamplingParams> {
        anyhow::ensure!(
            self.max_new_tokens > 0,
            "--max-new-tokens must be at least 1"
        );
        anyhow::ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "--temperature must be ≥ 0"
        );
        anyhow::ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "--top-p must be in (0, 1]"
        );
        anyhow::ensure!(
            self.stop.iter().all(|s| !s.is_empty()),
            "--stop strings must not be empty"
        );
        Ok(SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_new_tokens: self.max_new_tokens,
            stop_strings: self.stop.clone(),
        })
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (causal LM).
    #[arg(long)]
    model: PathBuf,
    /// Prompts: `prompts` (`prompt` text or messages), `chat` (messages; a final assistant turn
    /// is dropped) or `qa` (`question`) rows, JSONL/JSON/parquet.
    #[arg(long)]
    prompts: PathBuf,
    #[arg(long)]
    schema: Option<String>,
    /// Output JSONL, one row per sample.
    #[arg(long)]
    out: PathBuf,
    /// Compute precision: f32, or bf16 (on the CPU: f32 weights, every linear through the bf16
    /// GEMM with weight panels packed once; about 2.6× the f32 decode rate at batch 8).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// A prompt ready for generation: its row, the text fed to the model and its ids.
pub struct PreparedPrompt {
    pub row: usize,
    pub text: String,
    pub ids: Vec<u32>,
}

/// Reads a prompts file into prompt inputs, one per row, naming the row of any that has none.
pub fn read_prompts(
    path: &Path,
    schema: Option<&str>,
) -> anyhow::Result<Vec<(PromptInput, String)>> {
    let schema = schema.map(str::parse::<Schema>).transpose()?;
    let data = load_dataset(
        path,
        &LoadOptions {
            schema,
            ..Default::default()
        },
    )?;
    anyhow::ensure!(!data.rows.is_empty(), "{}: no prompt rows", path.display());
    data.rows
        .iter()
        .map(|row| {
            let input = generation_prompt(&row.example).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: a `{}` row holds no prompt (use prompts, chat or qa rows)",
                    row.source,
                    row.example.schema().name()
                )
            })?;
            Ok((input, row.source.to_string()))
        })
        .collect()
}

/// Encodes prompts for one model, rejecting empty ones and ones that leave no room in the
/// context, with the row that holds them.
pub fn prepare_prompts(
    tokenizer: &Tokenizer,
    context: usize,
    prompts: &[(PromptInput, String)],
) -> anyhow::Result<Vec<PreparedPrompt>> {
    let encoder = Encoder::new(tokenizer)?;
    prompts
        .iter()
        .enumerate()
        .map(|(row, (input, source))| {
            let text = match input {
                PromptInput::Messages(m) => encoder.render(m, true),
                PromptInput::Text(t) => Ok(t.clone()),
            }
            .with_context(|| source.clone())?;
            let ids = encoder.prompt(input).with_context(|| source.clone())?;
            anyhow::ensure!(
                !ids.is_empty(),
                "{source}: the prompt is empty: there is no token to continue from"
            );
            anyhow::ensure!(
                ids.len() < context,
                "{source}: the prompt is {} tokens; the model's context is {context} (at least one token must be left to generate)",
                ids.len()
            );
            Ok(PreparedPrompt {
                row,
                text,
                ids,
            })
        })
        .collect()
}

/// The text of a completion: special tokens skipped, cut before the stop string that ended it.
pub fn completion_text(tokenizer: &Tokenizer, c: &Completion) -> anyhow::Result<String> {
    let mut text = tokenizer.decode(&c.ids, true)?;
    if let Some(stop) = &c.stop_string {
        if let Some(pos) = text.find(stop.as_str()) {
            text.truncate(pos);
        }
    }
    Ok(text)
}

/// Generates `n` samples of every prompt in batches, calling `on_batch` with each batch's answer
/// rows (prompt order, then sample order) as soon as it is done. Returns the tokens generated.
/// In a multi-process job the batches are shared out across the ranks, in waves of one batch per
/// rank, and every rank's `on_batch` sees every batch, in order.
pub fn generate_rows(
    model: &LoadedModel,
    prompts: &[PreparedPrompt],
    n: usize,
    sampling: &SamplingArgs,
    mut on_batch: impl FnMut(Vec<AnswerRow>) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let tokenizer = model.tokenizer()?;
    let params = sampling.params()?;
    let options = GenerateOptions {
        params,
        seed: sampling.seed,
        stop_ids: tokenizer.stop_token_ids.clone(),
        batch_size: sampling.batch_size.max(1),
        tokenizer: Some(tokenizer),
        capture_after_stop: None,
    };
    let per_call = (sampling.batch_size.max(1) / n.max(1)).max(1);
    let mut tokens = 0;
    let chunks: Vec<&[PreparedPrompt]> = prompts.chunks(per_call).collect();
    let batch_rows = |j: usize| -> anyhow::Result<Vec<AnswerRow>> {
        let chunk = chunks[j];
        let batch: Vec<Prompt> = chunk
            .iter()
            .map(|p| Prompt {
                ids: p.ids.clone(),
                item: p.row as u64,
                n,
                first_sample: 0,
            })
            .collect();
        let completions = generate(&model.decoder, &batch, &options)?;
        let mut rows = Vec::with_capacity(completions.len());
        for c in &completions {
            let p = &chunk[c.prompt];
            rows.push(AnswerRow {
                index: p.row,
                sample_index: c.sample_index,
                prompt: p.text.clone(),
                completion: completion_text(tokenizer, c)?,
                num_tokens: c.ids.len(),
                finish_reason: match c.finish_reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                }
                .to_string(),
            });
        }
        Ok(rows)
    };
    // Errors cross the library's dist helpers as its error type; the context stays in the text.
    let to_lib = |e: anyhow::Error| ferrotune::Error::invalid(format!("{e:#}"));
    ferrotune::dist::shard::for_each_in_waves(
        chunks.len(),
        |j| batch_rows(j).map_err(to_lib),
        |_, rows: Vec<AnswerRow>| {
            tokens += rows.iter().map(|r| r.num_tokens).sum::<usize>();
            on_batch(rows).map_err(to_lib)
        },
    )?;
    Ok(tokens)
}

/// A progress bar on stderr (hidden when stderr is not a terminal, and on ranks other than 0).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let target = if ferrotune::dist::world().is_main() {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::hidden()
    };
    let bar = indicatif::ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {bar:30} {pos}/{len} ({eta} left)",
        )
        .expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.n >= 1, "--n must be at least 1");
    args.sampling.params()?;
    let prompts = read_prompts(&args.prompts, args.schema.as_deref())?;
    let device = super::device()?;
    let precision = ferrotune::io::checkpoint::parse_dtype(&args.precision)?;
    let model = ferrotune::io::load_model_for(&args.model, precision, &device)?;
    let tokenizer = model.tokenizer()?;
    let context = model.decoder.config().max_position_embeddings;
    let prepared = prepare_prompts(tokenizer, context, &prompts)?;
    let main = ferrotune::dist::world().is_main();
    if let Some(parent) = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && main)
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Rank 0 alone writes the output.
    let mut out = if main {
        let file = std::fs::File::create(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
        Some(std::io::BufWriter::new(file))
    } else {
        None
    };
    let bar = progress_bar(prepared.len() as u64, "generating");
    let start = Instant::now();
    let mut samples = 0usize;
    let tokens = generate_rows(&model, &prepared, args.n, &args.sampling, |rows| {
        let prompts_done = rows.iter().filter(|r| r.sample_index == 0).count();
        samples += rows.len();
        let Some(out) = out.as_mut() else {
            return Ok(());
        };
        for r in rows {
            serde_json::to_writer(&mut *out, &r)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        bar.inc(prompts_done as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    if !main {
        return Ok(());
    }
    eprintln!(
        "generated {samples} samples of {} prompts: {tokens} tokens in {seconds:.2}s ({:.1} tokens/s) → {}",
        prepared.len(),
        tokens as f64 / seconds.max(1e-9),
        args.out.display()
    );
    Ok(())
}
