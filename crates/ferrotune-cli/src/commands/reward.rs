//! `ferrotune reward`: scores rows with a Bradley–Terry reward model. Prints JSONL on stdout:
//! `{"score": …}` per row, or for preference rows `{"score_chosen", "score_rejected"}`; the
//! pairwise accuracy of preference data goes to stderr (and `--summary FILE` as JSON).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use ferrotune::data::{
    load_dataset, pad_id, tokenize_pairs, Encoder, Example, LoadOptions, Schema, TokenizeOptions,
};
use ferrotune::infer::reward::reward_scores;

#[derive(clap::Args)]
pub struct Args {
    /// Reward model directory (Qwen2/LlamaForSequenceClassification).
    #[arg(long)]
    model: PathBuf,
    /// Rows to score: preference pairs, chats, qa or text.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    schema: Option<String>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Also write the JSONL rows here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Longest sequence scored (default: the model's context); longer ones are cut at the end.
    #[arg(long)]
    max_length: Option<usize>,
    /// Write the summary (rows, pairwise accuracy) as JSON here.
    #[arg(long)]
    summary: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = super::device()?;
    let model = ferrotune::io::load_model(&args.model, DType::F32, &device)?;
    let tokenizer = model.tokenizer()?;
    let encoder = Encoder::new(tokenizer)?;
    let schema = args
        .schema
        .as_deref()
        .map(str::parse::<Schema>)
        .transpose()?;
    let data = load_dataset(
        &args.data,
        &LoadOptions {
            schema,
            ..Default::default()
        },
    )?;
    let pad = pad_id(tokenizer)?;
    let max_length = args
        .max_length
        .unwrap_or(model.decoder.config().max_position_embeddings);
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let mut summary = serde_json::json!({"rows": data.rows.len()});
    if data.schema == Schema::Preference {
        let (pairs, _) = tokenize_pairs(
            &encoder,
            &data.rows,
            &TokenizeOptions {
                max_length: Some(max_length),
                ..Default::default()
            },
        )?;
        let mut seqs = Vec::with_capacity(pairs.len() * 2);
        for p in &pairs {
            seqs.push(p.chosen.input_ids.clone());
            seqs.push(p.rejected.input_ids.clone());
        }
        let scores = reward_scores(&model.decoder, &seqs, pad, args.batch_size)?;
        let mut correct = 0usize;
        for pair in scores.chunks(2) {
            if pair[0] > pair[1] {
                correct += 1;
            }
            rows.push(serde_json::json!({"score_chosen": pair[0], "score_rejected": pair[1]}));
        }
        let accuracy = correct as f64 / pairs.len().max(1) as f64;
        summary["pairwise_accuracy"] = accuracy.into();
        summary["pairs"] = pairs.len().into();
    } else {
        let mut seqs = Vec::with_capacity(data.rows.len());
        for row in &data.rows {
            let ids = match &row.example {
                Example::Text { text } => encoder.encode(text, false)?,
                Example::Prompt(p) => encoder.prompt(p)?,
                other => {
                    encoder
                        .sequence(other)
                        .with_context(|| row.source.to_string())?
                        .input_ids
                }
            };
            seqs.push(ids.into_iter().take(max_length).collect());
        }
        for s in reward_scores(&model.decoder, &seqs, pad, args.batch_size)? {
            rows.push(serde_json::json!({"score": s}));
        }
    }
    let mut text = String::new();
    for r in &rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::io::stdout().lock().write_all(text.as_bytes())?;
    if let Some(out) = &args.out {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    eprintln!("{summary}");
    if let Some(path) = &args.summary {
        std::fs::write(path, summary.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
