//! `ferrotune data inspect`: reads a dataset (file or folder) the way training would and prints
//! one JSON object — schema, rows, bad rows, files and, with `--model`, token-length statistics
//! under that model's tokenizer and chat template. The work is `ferrotune::data::inspect`.
//!
//! `ferrotune data prepare-genrm --path DIR --out DIR`: the genrm-critiques release layout (or
//! synth rows) → `verify.jsonl`, `correct.jsonl`, `manifest.json`; the work is
//! `ferrotune::data::genrm_prepare`.

use std::path::{Path, PathBuf};

use ferrotune::data::{inspect, InspectOptions, LoadOptions, Schema};
use ferrotune::io::Tokenizer;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Validate a dataset and describe it as one JSON object.
    Inspect(InspectArgs),
    /// Write the built-in task world (and optionally its tokenizer) into a folder.
    Synth(super::synth::SynthArgs),
    /// Turn the genrm-critiques release (zips, .jsonl.gz or JSONL) or synth rows into the
    /// training files of `ferrotune genrm`: verify.jsonl (D_verify), correct.jsonl (D_correct)
    /// and manifest.json.
    PrepareGenrm(PrepareGenrmArgs),
}

#[derive(clap::Args)]
pub struct PrepareGenrmArgs {
    /// A file or a folder (searched recursively): .jsonl, .json, .parquet, .jsonl.gz, .zip.
    #[arg(long)]
    path: PathBuf,
    /// Output folder; `ferrotune genrm --data OUT` then trains on it.
    #[arg(long)]
    out: PathBuf,
    /// Verification rows to keep: all, cot or direct.
    #[arg(long, default_value = "all")]
    mode: String,
    /// Layout of rows built from (question, solution) rows: critiques (the release's header and
    /// `Q: …\nA: Let's think step by step.`) or terse (the synthetic world's `Q: …\nA: …`).
    #[arg(long, default_value = "critiques")]
    format: String,
    /// Skip and count bad rows instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Seed of the shuffle of both output files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep file order instead of shuffling.
    #[arg(long)]
    no_shuffle: bool,
    /// Print the manifest as one JSON object on stdout.
    #[arg(long)]
    json: bool,
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
        Command::PrepareGenrm(args) => run_prepare_genrm(args),
    }
}

fn run_prepare_genrm(args: PrepareGenrmArgs) -> anyhow::Result<()> {
    use ferrotune::data::genrm_prepare::{prepare_genrm, ModeFilter, PrepareOptions};
    let options = PrepareOptions {
        modes: args.mode.parse::<ModeFilter>()?,
        format: args.format.parse::<ferrotune::infer::verify::Format>()?,
        skip_bad_rows: args.skip_bad_rows,
        shuffle: !args.no_shuffle,
        seed: args.seed,
    };
    let manifest = prepare_genrm(&args.path, &args.out, &options)?;
    eprintln!(
        "{} verification rows ({} cot, {} direct; {} correct, {} incorrect), {} correct solutions, rows skipped: {}, files ignored: {} → {}",
        manifest.verify.rows,
        manifest.verify.cot,
        manifest.verify.direct,
        manifest.verify.correct,
        manifest.verify.incorrect,
        manifest.correct.rows,
        manifest.skipped.rows,
        manifest.ignored_files.len(),
        args.out.display()
    );
    if args.json {
        super::print_json(&serde_json::to_value(&manifest)?);
    }
    Ok(())
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
