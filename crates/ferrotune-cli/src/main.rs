//! The `ferrotune` command line: one file per subcommand under `commands/`. Results for machines
//! go to stdout (one JSON object with `--json`); logs go to stderr.

mod commands;
mod rank_log;

/// mimalloc keeps freed tensor buffers for reuse; glibc's malloc returns every large block to
/// the OS (mmap/munmap), so each op paid page faults and page zeroing on fresh memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's default still hands freed arena memory back to the OS after a second
/// (`purge_delay`, decommitting it), and a training step reallocates the same large buffers
/// every step: each came back as fresh pages the kernel had to fault in and zero (a quarter of
/// a tiny-model step's time in `clear_page_erms`). Keep freed memory for reuse instead; peak
/// resident memory is unchanged. `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn keep_freed_memory() {
    // mimalloc v3's option index of `purge_delay` (mi_option_purge_delay in mimalloc.h).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is thread-safe and valid at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

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

impl Command {
    /// Commands that share their work across the ranks of a multi-process job
    /// (docs/DISTRIBUTED.md); the others would only repeat it and race on their outputs.
    fn runs_data_parallel(&self) -> bool {
        matches!(
            self,
            Command::Pretrain(_)
                | Command::Sft(_)
                | Command::Dpo(_)
                | Command::Rm(_)
                | Command::Genrm(_)
                | Command::Generate(_)
                | Command::Verify(_)
                | Command::BestOfN(_)
                | Command::Bench(_)
        )
    }
}

/// candle's CPU backend runs elementwise ops on its own spin-waiting thread pool
/// (`CANDLE_NUM_THREADS`, default: all cores) and matrix products on rayon's
/// (`RAYON_NUM_THREADS`). On a small machine the two pools spin against each other, and any other
/// load makes one thread wait on a descheduled one. Measured on 2 cores with another job running,
/// the quickstart's SFT step ran 3x faster and the 5M benchmark model's step 1.8x faster with
/// elementwise ops on the calling thread alone; on an idle machine the two settings tie (5M step
/// 2,171-2,328 vs 2,010-2,359 tok/s). Matrix products keep every core. `CANDLE_NUM_THREADS` in
/// the environment still wins.
fn single_threaded_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any thread exists: nothing else reads the environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() {
    keep_freed_memory();
    single_threaded_elementwise();
    // Join the job's world first (MPI under mpirun/srun with `--features mpi`, else a world
    // of one): the log setup and every command depend on the rank.
    let world_guard = match ferrotune::dist::init() {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let world = ferrotune::dist::world();
    rank_log::init(world);
    if world.size() > 1 || world.comm().runs_alone() {
        tracing::info!(
            "distributed: {} backend, rank {} of {}, local rank {}",
            world.comm().backend(),
            world.rank(),
            world.size(),
            world.local_rank()
        );
    }
    let cli = Cli::parse();
    if world.size() > 1 && !cli.command.runs_data_parallel() {
        eprintln!(
            "{}error: this command runs as one process; under mpirun/srun only pretrain, sft, dpo, rm, genrm, generate, verify, best-of-n and bench share their work",
            world.log_prefix()
        );
        world_guard.fail(2);
    }
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
        // One write for the whole line: stderr is unbuffered, so `eprintln!` writes the prefix
        // and the message separately, and under MPI the launcher's abort banner can land
        // between them.
        let line = format!("{}error: {e:#}\n", world.log_prefix());
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        // In a multi-process job this aborts every rank (none waits for this one).
        world_guard.fail(1);
    }
}
