//! `ferrotune inspect`: what a model directory holds, without loading its weights.

use std::path::PathBuf;

use ferrotune::io::model_dir::load_config;
use ferrotune::io::Tokenizer;
use ferrotune::model::num_parameters;

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory.
    #[arg(long)]
    model: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = load_config(&args.model)?;
    let tokenizer = if args.model.join("tokenizer.json").exists() {
        Some(Tokenizer::from_dir(&args.model, Some(&config.raw))?)
    } else {
        None
    };
    let dtype = ferrotune::io::checkpoint::stored_dtype(&args.model)?;
    let report = serde_json::json!({
        "architecture": config.architecture,
        "model_type": config.model_type,
        "num_parameters": num_parameters(&config),
        "dtype": dtype,
        "vocab_size": config.vocab_size,
        "tokenizer_vocab_size": tokenizer.as_ref().map(|t| t.vocab_size()),
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "tie_word_embeddings": config.tie_word_embeddings,
        "has_chat_template": tokenizer.as_ref().is_some_and(|t| t.chat_template.is_some()),
        "eos_token": tokenizer.as_ref().and_then(|t| t.eos_token.clone()),
        "pad_token": tokenizer.as_ref().and_then(|t| t.pad_token.clone()),
    });
    if args.json {
        super::print_json(&report);
    } else {
        for (k, v) in report.as_object().expect("object") {
            println!("{k:22} {v}");
        }
    }
    Ok(())
}
