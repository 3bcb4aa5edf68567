//! `ferrotune verify`: GenRM scores of solutions, Direct or CoT with adaptive K. One JSONL row
//! per input row (`score`, `k`, `variance`, `p_yes`, and `label` when the row has one); with
//! labels, a summary (`auc`, mean score per label, mean k) on stderr and in `--summary FILE`.
//! Under a launcher the work is shared out across the ranks (`infer::verify`) and rank 0 writes
//! the same rows as one process would.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use ferrotune::data::{load_dataset, Example, LoadOptions, Schema};
use ferrotune::infer::verify::{
    auc, format_inputs, label_of_targets, verify, with_cue, Format, Mode, VerifyOptions,
};
use ferrotune::infer::SamplingParams;

#[derive(clap::Args)]
pub struct Args {
    /// The GenRM verifier (a causal LM directory).
    #[arg(long)]
    model: PathBuf,
    /// genrm rows (`inputs`, `targets`) or solution rows (`question`, `solution`/`model_output`,
    /// label); repeat to verify several files together (e.g. correct and incorrect ones).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    schema: Option<String>,
    /// direct or cot.
    #[arg(long, default_value = "cot")]
    mode: String,
    /// How (question, solution) rows are laid out: critiques (genrm-critiques) or terse.
    #[arg(long, default_value = "critiques")]
    format: String,
    #[arg(long, default_value_t = 8)]
    k_min: usize,
    #[arg(long, default_value_t = 8)]
    k_step: usize,
    #[arg(long, default_value_t = 32)]
    k_max: usize,
    #[arg(long, default_value_t = 0.05)]
    var_threshold: f64,
    /// Longest rationale, in tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Report P(Yes) unnormalised instead of P(Yes)/(P(Yes)+P(No)).
    #[arg(long)]
    raw_p_yes: bool,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Only the first N rows of each file.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long)]
    summary: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = super::device()?;
    let model = ferrotune::io::load_model(&args.model, DType::F32, &device)?;
    let tokenizer = model.tokenizer()?;
    let mode = match args.mode.as_str() {
        "cot" => Mode::Cot,
        "direct" => Mode::Direct,
        other => anyhow::bail!("--mode must be direct or cot, got `{other}`"),
    };
    let format: Format = args.format.parse()?;
    let schema = args
        .schema
        .as_deref()
        .map(str::parse::<Schema>)
        .transpose()?;
    let mut rows = Vec::new();
    for path in &args.data {
        let data = load_dataset(
            path,
            &LoadOptions {
                schema,
                ..Default::default()
            },
        )?;
        rows.extend(data.rows.into_iter().take(args.limit.unwrap_or(usize::MAX)));
    }
    let mut items = Vec::new();
    let mut labels = Vec::new();
    for row in &rows {
        match &row.example {
            Example::Genrm { inputs, targets } => {
                items.push(with_cue(inputs, mode));
                labels.push(label_of_targets(targets));
            }
            Example::Solution {
                question,
                solution,
                label,
            } => {
                items.push(format_inputs(question, solution, mode, format));
                labels.push(*label);
            }
            other => anyhow::bail!(
                "{}: verify needs genrm or solution rows, not `{}`",
                row.source,
                other.schema()
            ),
        }
    }
    let options = VerifyOptions {
        mode,
        k_min: args.k_min,
        k_step: args.k_step,
        k_max: args.k_max,
        var_threshold: args.var_threshold,
        params: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            max_new_tokens: args.max_new_tokens,
            stop_strings: vec![],
        },
        seed: args.seed,
        raw_p_yes: args.raw_p_yes,
        batch_size: args.batch_size,
    };
    let started = std::time::Instant::now();
    let verdicts = verify(&model.decoder, tokenizer, &items, &options)?;
    if !ferrotune::dist::world().is_main() {
        return Ok(()); // rank 0 writes for the whole job
    }
    let mut out = String::new();
    for (v, label) in verdicts.iter().zip(&labels) {
        let mut row = serde_json::to_value(v)?;
        if let Some(l) = label {
            row["label"] = u8::from(*l).into();
        }
        out.push_str(&row.to_string());
        out.push('\n');
    }
    std::fs::write(&args.out, out).with_context(|| format!("writing {}", args.out.display()))?;
    let scored: Vec<(f64, bool)> = verdicts
        .iter()
        .zip(&labels)
        .filter_map(|(v, l)| l.map(|l| (v.score, l)))
        .collect();
    let mean_of = |label: bool| {
        let v: Vec<f64> = scored
            .iter()
            .filter(|s| s.1 == label)
            .map(|s| s.0)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let summary = serde_json::json!({
        "rows": verdicts.len(),
        "labelled": scored.len(),
        "auc": auc(&scored),
        "mean_score_correct": mean_of(true),
        "mean_score_incorrect": mean_of(false),
        "mean_k": verdicts.iter().map(|v| v.k as f64).sum::<f64>() / verdicts.len().max(1) as f64,
        "rationale_tokens": verdicts.iter().map(|v| v.tokens).sum::<usize>(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    eprintln!("{summary}");
    if let Some(path) = &args.summary {
        std::fs::write(path, summary.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
