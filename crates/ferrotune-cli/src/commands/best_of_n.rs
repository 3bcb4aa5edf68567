//! `ferrotune best-of-n`: N policy samples per problem, picked by a GenRM verifier with fixed
//! and adaptive K. `--json` prints the report (CONTRACTS keys plus weighted vote and pass@N).
//! Under a launcher the sampling and verification are shared out across the ranks
//! (`infer::best_of_n`) and rank 0 prints the report.

use std::path::PathBuf;

use candle_core::DType;
use ferrotune::data::{extract_answer, load_dataset, Example, LoadOptions};
use ferrotune::infer::best_of_n::{best_of_n, BestOfNOptions};
use ferrotune::infer::verify::{Format, Mode, VerifyOptions};
use ferrotune::infer::SamplingParams;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    policy: PathBuf,
    #[arg(long)]
    verifier: PathBuf,
    /// qa rows (`question`, `answer` ending in `#### N`).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 32)]
    n: usize,
    #[arg(long, default_value = "cot")]
    mode: String,
    #[arg(long, default_value = "critiques")]
    format: String,
    #[arg(long, default_value_t = 8)]
    k_min: usize,
    #[arg(long, default_value_t = 8)]
    k_step: usize,
    /// Fixed K, and the most adaptive K may reach.
    #[arg(long, default_value_t = 32)]
    k_max: usize,
    #[arg(long, default_value_t = 0.05)]
    var_threshold: f64,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 256)]
    verifier_max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    verifier_temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Only the first N problems.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = super::device()?;
    let policy = ferrotune::io::load_model(&args.policy, DType::F32, &device)?;
    let verifier = ferrotune::io::load_model(&args.verifier, DType::F32, &device)?;
    let data = load_dataset(&args.data, &LoadOptions::default())?;
    let mut problems = Vec::new();
    for row in data.rows.iter().take(args.limit.unwrap_or(usize::MAX)) {
        let Example::Qa { question, answer } = &row.example else {
            anyhow::bail!("{}: best-of-n needs qa rows (question, answer)", row.source);
        };
        let reference = extract_answer(answer).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: field `answer` has no final answer (#### N)",
                row.source
            )
        })?;
        problems.push((question.clone(), reference));
    }
    let mode = if args.mode == "direct" {
        Mode::Direct
    } else {
        Mode::Cot
    };
    let options = BestOfNOptions {
        n: args.n,
        policy_params: SamplingParams {
            temperature: args.temperature,
            max_new_tokens: args.max_new_tokens,
            ..Default::default()
        },
        seed: args.seed,
        batch_size: args.batch_size,
        verify: VerifyOptions {
            mode,
            k_min: args.k_min,
            k_step: args.k_step,
            k_max: args.k_max,
            var_threshold: args.var_threshold,
            params: SamplingParams {
                temperature: args.verifier_temperature,
                max_new_tokens: args.verifier_max_new_tokens,
                ..Default::default()
            },
            seed: args.seed,
            raw_p_yes: false,
            batch_size: args.batch_size,
        },
        format: args.format.parse::<Format>()?,
    };
    let report = best_of_n(
        &policy.decoder,
        policy.tokenizer()?,
        &verifier.decoder,
        verifier.tokenizer()?,
        &problems,
        &options,
    )?;
    if !ferrotune::dist::world().is_main() {
        return Ok(());
    }
    let json = serde_json::to_value(&report)?;
    if args.json {
        super::print_json(&json);
    } else {
        eprintln!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(())
}
