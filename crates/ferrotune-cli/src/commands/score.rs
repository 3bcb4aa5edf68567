//! `ferrotune score`: the log-probability of every token of a text given the tokens before it.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Tensor;
use ferrotune::io::checkpoint::parse_dtype;
use ferrotune::io::load_model_for;
use ferrotune::model::ops::log_softmax_last_dim;

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The text to score; its whole content, byte for byte.
    #[arg(long)]
    text_file: PathBuf,
    /// Add the tokenizer's special tokens (e.g. BOS) when encoding.
    #[arg(long)]
    add_special_tokens: bool,
    /// Compute precision: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Print one JSON object {"ids": [...], "logprobs": [null, ...]}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = super::device()?;
    let dtype = parse_dtype(&args.precision)?;
    let model = load_model_for(&args.model, dtype, &device)?;
    let tokenizer = model.tokenizer()?;
    let text = std::fs::read_to_string(&args.text_file)
        .with_context(|| format!("reading {}", args.text_file.display()))?;
    let ids = tokenizer.encode(&text, args.add_special_tokens)?;
    let mut logprobs: Vec<Option<f32>> = vec![None; ids.len()];
    if ids.len() > 1 {
        let input = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
        let logits = model.decoder.forward(&input, None)?.squeeze(0)?;
        let logp = log_softmax_last_dim(&logits.to_dtype(candle_core::DType::F32)?)?;
        let targets = Tensor::new(&ids[1..], &device)?.unsqueeze(1)?;
        let picked = logp
            .narrow(0, 0, ids.len() - 1)?
            .gather(&targets, 1)?
            .squeeze(1)?
            .to_vec1::<f32>()?;
        for (i, lp) in picked.into_iter().enumerate() {
            logprobs[i + 1] = Some(lp);
        }
    }
    if args.json {
        super::print_json(&serde_json::json!({"ids": ids, "logprobs": logprobs}));
    } else {
        for (id, lp) in ids.iter().zip(&logprobs) {
            let token = tokenizer.decode(&[*id], false)?;
            match lp {
                Some(lp) => println!("{id}\t{lp:.6}\t{token:?}"),
                None => println!("{id}\t-\t{token:?}"),
            }
        }
    }
    Ok(())
}
