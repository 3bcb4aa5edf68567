//! `ferrotune init-model`: a randomly initialised HF model directory from a config.json and a
//! tokenizer, for tests, benchmarks and the quickstart.

use std::path::PathBuf;

use ferrotune::io::checkpoint::parse_dtype;
use ferrotune::io::{save_model, Tokenizer};
use ferrotune::model::init::random_params;
use ferrotune::model::{num_parameters, Decoder, ModelConfig};

#[derive(clap::Args)]
pub struct Args {
    /// An HF config.json describing the architecture.
    #[arg(long)]
    config: PathBuf,
    /// Directory with tokenizer.json (and tokenizer_config.json) to copy in.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dtype of the saved weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dtype = parse_dtype(&args.dtype)?;
    let config = ModelConfig::from_file(&args.config)?;
    let tokenizer = Tokenizer::from_dir(&args.tokenizer, Some(&config.raw))?;
    if tokenizer.id_bound() > config.vocab_size {
        anyhow::bail!(
            "{}: vocab_size {} is smaller than the tokenizer in {} (ids up to {})",
            args.config.display(),
            config.vocab_size,
            args.tokenizer.display(),
            tokenizer.id_bound() - 1
        );
    }
    let device = candle_core::Device::Cpu;
    let params = random_params(&config, args.seed, candle_core::DType::F32, &device)?;
    let count = num_parameters(&config);
    let decoder = Decoder::from_params(config, params)?;
    save_model(&decoder, Some(&args.tokenizer), &args.out, dtype)?;
    tracing::info!(
        "wrote {} ({count} parameters, seed {})",
        args.out.display(),
        args.seed
    );
    Ok(())
}
