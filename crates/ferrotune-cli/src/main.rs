//! The `ferrotune` command line: one file per subcommand under `commands/`. Results for machines
//! go to stdout (one JSON object with `--json`); logs go to stderr.

mod commands;

/// mimalloc keeps freed tensor buffers for reuse; glibc's malloc returns every large block to
/// the OS (mmap/munmap), so each op paid page faults and page zeroing on fresh memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use ferrotune::train::Objective;

#[derive(Parser)]
#[command(
    name = "ferrotune",
    version,
    about = "Post-training for small decoder LLMs: SFT, DPO, reward models, GenRM verifiers, sampling."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-token log-probabilities of a text file under a model.
    Score(commands::score::Args),
    /// Render messages with a model's chat template, exactly.
    ChatTemplate(commands::chat_template::Args),
    /// Write a randomly initialised model directory from a config.json and a tokenizer.
    InitModel(commands::init_model::Args),
    /// Describe a model directory: architecture, size, dtype, vocabulary, template.
    Inspect(commands::inspect::Args),
    /// Read, validate and describe datasets.
    #[command(subcommand)]
    Data(commands::data::Command),
    /// Language-model pretraining on plain text (all tokens are targets, packed sequences).
    Pretrain(commands::train::Args),
    /// Supervised fine-tuning on chats (loss on assistant turns only).
    Sft(commands::train::Args),
    /// Direct Preference Optimization on preference pairs.
    Dpo(commands::train::Args),
    /// Train a Bradley–Terry reward model on preference pairs.
    Rm(commands::train::Args),
    /// Train a GenRM-CoT verifier: L = L_SFT(D_verify) + λ·L_SFT(D_correct).
    Genrm(commands::train::Args),
    /// Score solutions with a GenRM verifier (Direct or CoT with adaptive K).
    Verify(commands::verify::Args),
    /// Best-of-N: sample N solutions, pick by verifier score (fixed and adaptive K).
    BestOfN(commands::best_of_n::Args),
    /// The whole pipeline (pretrain → SFT → DPO → GenRM, RM) on the built-in task world.
    Quickstart(commands::quickstart::Args),
    /// Sample completions of a prompts file into JSONL rows.
    Generate(commands::generate::Args),
    /// Win rate of a model against a reference under a judge (report.json + report.md).
    Winrate(commands::winrate::Args),
    /// Serve a model over an OpenAI-compatible HTTP API.
    Serve(commands::serve::Args),
    /// Score rows with a reward model (pairwise accuracy for preference data).
    Reward(commands::reward::Args),
    /// Time the training step or batched decoding on random tokens.
    #[command(subcommand)]
    Bench(commands::bench::Command),
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Score(a) => commands::score::run(a),
        Command::ChatTemplate(a) => commands::chat_template::run(a),
        Command::InitModel(a) => commands::init_model::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Data(c) => commands::data::run(c),
        Command::Pretrain(a) => commands::train::run(a, Objective::Pretrain),
        Command::Sft(a) => commands::train::run(a, Objective::Sft),
        Command::Dpo(a) => commands::train::run(a, Objective::Dpo),
        Command::Rm(a) => commands::train::run(a, Objective::Rm),
        Command::Genrm(a) => commands::train::run(a, Objective::Genrm),
        Command::Verify(a) => commands::verify::run(a),
        Command::BestOfN(a) => commands::best_of_n::run(a),
        Command::Quickstart(a) => commands::quickstart::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Winrate(a) => commands::winrate::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Reward(a) => commands::reward::run(a),
        Command::Bench(c) => commands::bench::run(c),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
