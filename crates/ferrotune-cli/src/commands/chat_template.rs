//! `ferrotune chat-template`: prints a chat render exactly as transformers would produce it
//! (no newline added), for checking templates and debugging loss masks.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use ferrotune::io::Tokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// Model (or tokenizer) directory holding the chat template.
    #[arg(long)]
    model: PathBuf,
    /// JSON file with a list of {"role", "content"} messages.
    #[arg(long)]
    messages: PathBuf,
    /// Append the assistant header, as when prompting the model to answer.
    #[arg(long)]
    add_generation_prompt: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = args.model.join("config.json");
    let config_json = if config.exists() {
        Some(ferrotune::error::read_json(&config)?)
    } else {
        None
    };
    let tokenizer = Tokenizer::from_dir(&args.model, config_json.as_ref())?;
    let text = std::fs::read_to_string(&args.messages)
        .with_context(|| format!("reading {}", args.messages.display()))?;
    let messages: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", args.messages.display()))?;
    if !messages.is_array() {
        anyhow::bail!(
            "{}: expected a JSON list of messages",
            args.messages.display()
        );
    }
    let rendered = tokenizer.apply_chat_template(&messages, args.add_generation_prompt)?;
    let mut out = std::io::stdout().lock();
    out.write_all(rendered.as_bytes())?;
    out.flush()?;
    Ok(())
}
