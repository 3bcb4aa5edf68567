//! `ferrotune data synth`: writes the built-in task world (`ferrotune::synth`) into a folder —
//! pretraining text, SFT chats, preference and RM pairs, GenRM verify/correct rows, held-out
//! QA and `world.json` — optionally with a tokenizer trained on it (`DIR/tokenizer`), and
//! prints one JSON summary on stdout.

use std::path::PathBuf;

use ferrotune::synth::{
    build_world, train_tokenizer, Difficulty, Op, Wording, WorldConfig, DEFAULT_VOCAB_SIZE,
};

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Output folder (created if needed).
    #[arg(long, alias = "output-dir")]
    out: PathBuf,
    /// The world's seed: the same seed writes byte-identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rows of each training file (SFT, preference, RM, GenRM verify, GenRM correct); twice as
    /// many pretraining rows. Default: 10000 SFT, 2000 preference and RM, 4000 GenRM, 20000
    /// pretraining.
    #[arg(long)]
    n: Option<usize>,
    #[arg(long)]
    n_pretrain: Option<usize>,
    #[arg(long)]
    n_sft: Option<usize>,
    #[arg(long)]
    n_preference: Option<usize>,
    #[arg(long)]
    n_rm: Option<usize>,
    #[arg(long)]
    n_genrm: Option<usize>,
    /// Held-out problems in test.jsonl (disjoint from every training file).
    #[arg(long, default_value_t = 200)]
    n_test: usize,
    /// easy (2–4 ops, operands ≤ 9, values ≤ 99), medium (3–6 ops, operands ≤ 19, values ≤ 99)
    /// or hard (2–4 ops, operands ≤ 49, values ≤ 199); all `+-`. The knobs below override it.
    #[arg(long, default_value = "medium")]
    difficulty: String,
    #[arg(long)]
    min_ops: Option<usize>,
    #[arg(long)]
    max_ops: Option<usize>,
    #[arg(long)]
    max_operand: Option<i64>,
    /// Every intermediate result stays in 0..=max-value.
    #[arg(long)]
    max_value: Option<i64>,
    /// Operators, e.g. `+-` or `+-*`.
    #[arg(long)]
    ops: Option<String>,
    /// terse (`3+5-2=?` → `3+5=8 8-2=6 #### 6`) or words (GSM8K-style sentences).
    #[arg(long, default_value = "terse")]
    wording: String,
    /// Also train a tokenizer on the world's texts into OUT/tokenizer.
    #[arg(long)]
    tokenizer: bool,
    /// The tokenizer's vocabulary size (bytes, special tokens and merges).
    #[arg(long, default_value_t = DEFAULT_VOCAB_SIZE)]
    vocab_size: usize,
    /// Accepted for uniformity: the summary is always one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

impl SynthArgs {
    /// The world these arguments describe.
    pub fn config(&self) -> anyhow::Result<WorldConfig> {
        let mut difficulty = Difficulty::preset(&self.difficulty)?;
        if let Some(v) = self.min_ops {
            difficulty.min_ops = v;
        }
        if let Some(v) = self.max_ops {
            difficulty.max_ops = v;
        }
        if let Some(v) = self.max_operand {
            difficulty.max_operand = v;
        }
        if let Some(v) = self.max_value {
            difficulty.max_value = v;
        }
        if let Some(ops) = &self.ops {
            difficulty.ops = Op::parse_set(ops)?;
        }
        difficulty.validate()?;
        let mut config = WorldConfig {
            seed: self.seed,
            difficulty,
            wording: self.wording.parse::<Wording>()?,
            n_test: self.n_test,
            ..WorldConfig::default()
        };
        if let Some(n) = self.n {
            config = config.with_size(n);
        }
        let sizes = [
            (self.n_pretrain, &mut config.n_pretrain),
            (self.n_sft, &mut config.n_sft),
            (self.n_preference, &mut config.n_preference),
            (self.n_rm, &mut config.n_rm),
            (self.n_genrm, &mut config.n_genrm),
        ];
        for (arg, field) in sizes {
            if let Some(v) = arg {
                *field = v;
            }
        }
        Ok(config)
    }
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let world = build_world(&config)?;
    let summary = world.write(&args.out)?;
    tracing::info!("wrote the world into {}", args.out.display());
    let mut value = serde_json::to_value(&summary)?;
    if args.tokenizer {
        let dir = args.out.join("tokenizer");
        train_tokenizer(world.texts(), args.vocab_size, &dir)?;
        let tokenizer = ferrotune::io::Tokenizer::from_dir(&dir, None)?;
        value["tokenizer"] = serde_json::json!({
            "dir": dir,
            "vocab_size": tokenizer.vocab_size(),
        });
    }
    super::print_json(&value);
    Ok(())
}
