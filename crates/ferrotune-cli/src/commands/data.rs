//! `ferrotune data inspect`: reads a dataset (file or folder) the way training would and prints
//! one JSON object — schema, rows, bad rows, files and, with `--model`, token-length statistics
//! under that model's tokenizer and chat template. The work is `ferrotune::data::inspect`.

use std::path::{Path, PathBuf};

use ferrotune::data::{inspect, InspectOptions, LoadOptions, Schema};
use ferrotune::io::Tokenizer;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Validate a dataset and describe it as one JSON object.
    Inspect(InspectArgs),
    /// Write the built-in task world (and optionally its tokenizer) into a folder.
    Synth(super::synth::SynthArgs),
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A .jsonl, .json or .parquet file, or a folder of them (an HF dataset snapshot).
    path: PathBuf,
    /// Force a schema: genrm, preference, chat, qa, solution, prompts or text (default: detected
    /// from the first row).
    #[arg(long)]
    schema: Option<String>,
    /// The split of a folder (file or folder name, e.g. `test`; default `train` when present).
    #[arg(long)]
    split: Option<String>,
    /// Model (or tokenizer) directory: adds token-length statistics under its chat template.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rows longer than this count as `truncated` (default: the model's max_position_embeddings,
    /// else the tokenizer's model_max_length).
    #[arg(long)]
    max_length: Option<usize>,
    /// Skip and count bad rows instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Print the object on one line (it is always exactly one JSON object).
    #[arg(long)]
    json: bool,
}

/// The model's context length: config.json's max_position_embeddings, else a plausible
/// tokenizer_config.json model_max_length (transformers writes 1e30 when unset).
fn default_max_length(
    model: &Path,
    config: Option<&serde_json::Value>,
) -> anyhow::Result<Option<usize>> {
    if let Some(n) = config
        .and_then(|c| c.get("max_position_embeddings"))
        .and_then(serde_json::Value::as_u64)
    {
        return Ok(Some(n as usize));
    }
    let tokenizer_config = model.join("tokenizer_config.json");
    if tokenizer_config.exists() {
        let value = ferrotune::error::read_json(&tokenizer_config)?;
        if let Some(n) = value
            .get("model_max_length")
            .and_then(serde_json::Value::as_f64)
        {
            if (1.0..1e9).contains(&n) {
                return Ok(Some(n as usize));
            }
        }
    }
    Ok(None)
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Inspect(args) => run_inspect(args),
        Command::Synth(args) => super::synth::run(args),
    }
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let schema = args
        .schema
        .as_deref()
        .map(str::parse::<Schema>)
        .transpose()?;
    let (tokenizer, model_max_length) = match &args.model {
        Some(model) => {
            let config_path = model.join("config.json");
            let config = if config_path.exists() {
                Some(ferrotune::error::read_json(&config_path)?)
            } else {
                None
            };
            let tokenizer = Tokenizer::from_dir(model, config.as_ref())?;
            (Some(tokenizer), default_max_length(model, config.as_ref())?)
        }
        None => (None, None),
    };
    let options = InspectOptions {
        load: LoadOptions {
            schema,
            split: args.split.clone(),
            skip_bad_rows: args.skip_bad_rows,
        },
        tokenizer: tokenizer.as_ref(),
        max_length: args.max_length.or(model_max_length),
    };
    let report = inspect(&args.path, &options)?;
    let value = serde_json::to_value(&report)?;
    if args.json {
        super::print_json(&value);
    } else {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}
