//! `ferrotune pretrain|sft|dpo|rm|genrm`: the training commands. Flags mirror the seed study's
//! scripts; each one overrides the same key of `--config FILE.toml`, and `--set key=value`
//! reaches every config key. The resolved config is saved as `RUN_DIR/config.toml`.

use std::path::PathBuf;

use ferrotune::train::config::{parse_set, Objective, TrainConfig};

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// TOML config; flags given on the command line override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Starting model (HF directory).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data: a .jsonl/.json/.parquet file or a folder of them.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Evaluation data; without it a seeded held-out split of --data.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Run directory (default runs/NAME).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Run name.
    #[arg(long)]
    name: Option<String>,
    /// Dataset schema (default: detected from the first row).
    #[arg(long)]
    schema: Option<String>,
    #[arg(long)]
    max_epochs: Option<i64>,
    #[arg(long)]
    max_steps: Option<i64>,
    /// Sequences (pairs for dpo/rm) per micro-batch.
    #[arg(long)]
    batch_size: Option<i64>,
    #[arg(long)]
    eval_batch_size: Option<i64>,
    #[arg(long)]
    accumulate_grad_batches: Option<i64>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    /// linear, cosine or constant (after warm-up).
    #[arg(long)]
    lr_scheduler: Option<String>,
    #[arg(long)]
    warmup_steps: Option<i64>,
    #[arg(long)]
    warmup_ratio: Option<f64>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    seed: Option<i64>,
    /// f32, bf16 or f16 compute (master weights stay f32).
    #[arg(long)]
    precision: Option<String>,
    /// CPU: run each micro-batch as this many parts side by side (faster for small models;
    /// float summation order differs from whole batches). Default 1.
    #[arg(long)]
    cpu_parts: Option<i64>,
    #[arg(long)]
    max_length: Option<i64>,
    /// right, left or drop.
    #[arg(long)]
    truncation: Option<String>,
    #[arg(long)]
    train_percentile: Option<f64>,
    #[arg(long)]
    test_percentile: Option<f64>,
    /// Evaluate on the training rows (shows that the loop can overfit).
    #[arg(long)]
    sanity_train: bool,
    #[arg(long)]
    train_dataset_length: Option<i64>,
    #[arg(long)]
    test_dataset_length: Option<i64>,
    #[arg(long)]
    dataset_random_sample: bool,
    /// Batch rows of similar length together (less padding, less mixed batches).
    #[arg(long)]
    group_by_length: bool,
    /// Validate every N optimizer steps.
    #[arg(long)]
    val_check_interval: Option<i64>,
    #[arg(long)]
    check_val_every_n_epoch: Option<i64>,
    #[arg(long)]
    num_sanity_val_steps: Option<i64>,
    /// Validate the model on the whole eval set, write one eval row, no training.
    #[arg(long)]
    eval_only: bool,
    #[arg(long)]
    log_every_n_steps: Option<i64>,
    /// Save a checkpoint every N optimizer steps.
    #[arg(long)]
    checkpoint_frequency: Option<i64>,
    #[arg(long)]
    ckpt_to_keep: Option<i64>,
    #[arg(long)]
    resume_from_checkpoint: Option<PathBuf>,
    /// Skip (and count) malformed rows instead of stopping.
    #[arg(long)]
    skip_bad_rows: bool,
    /// DPO β.
    #[arg(long)]
    beta: Option<f64>,
    /// cDPO label smoothing ε.
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// sigmoid or ipo.
    #[arg(long)]
    loss_type: Option<String>,
    /// DPO reference model (default: the starting model).
    #[arg(long)]
    ref_model: Option<PathBuf>,
    /// SFT eval: rows whose greedy generation is scored by normalised edit distance (0 = off).
    #[arg(long)]
    eval_generate: Option<i64>,
    /// GenRM: weight λ of the correct-solution term (L = L_verify + λ·L_correct).
    #[arg(long)]
    lambda: Option<f64>,
    /// GenRM: D_correct, correct solutions (genrm `inputs`/`targets`, chat or qa rows). A
    /// `data prepare-genrm` folder as --data brings its own.
    #[arg(long)]
    correct_data: Option<PathBuf>,
    /// sft/dpo/genrm: each validation also judges the policy against the starting model
    /// (win_rate, win_rate_se in the eval metrics); needs --win-rate-judge.
    #[arg(long)]
    calculate_win_rate: bool,
    /// The win-rate judge: rm:DIR, genrm:DIR, openai-reward:URL#MODEL or openai-judge:URL#MODEL.
    #[arg(long)]
    win_rate_judge: Option<String>,
    /// Prompts judged: the first N eval rows' (default 16).
    #[arg(long)]
    win_rate_prompts: Option<i64>,
    /// Longest greedy answer of either side, in tokens (default 64).
    #[arg(long)]
    win_rate_max_new_tokens: Option<i64>,
    /// Any config key: --set key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the run summary as one JSON object.
    #[arg(long)]
    json: bool,
}

fn put<V: Into<toml::Value>>(t: &mut toml::Table, key: &str, v: Option<V>) {
    if let Some(v) = v {
        t.insert(key.to_string(), v.into());
    }
}

fn path(p: &Option<PathBuf>) -> Option<String> {
    p.as_ref().map(|p| p.to_string_lossy().to_string())
}

impl Args {
    pub fn resolve(&self, objective: Objective) -> anyhow::Result<TrainConfig> {
        let mut t = toml::Table::new();
        t.insert("objective".into(), objective.name().into());
        put(&mut t, "model", path(&self.model));
        put(&mut t, "data", path(&self.data));
        put(&mut t, "eval_data", path(&self.eval_data));
        put(&mut t, "output_dir", path(&self.output_dir));
        put(&mut t, "name", self.name.clone());
        put(&mut t, "schema", self.schema.clone());
        put(&mut t, "max_epochs", self.max_epochs);
        put(&mut t, "max_steps", self.max_steps);
        put(&mut t, "batch_size", self.batch_size);
        put(&mut t, "eval_batch_size", self.eval_batch_size);
        put(
            &mut t,
            "accumulate_grad_batches",
            self.accumulate_grad_batches,
        );
        put(&mut t, "lr", self.lr);
        put(&mut t, "weight_decay", self.weight_decay);
        put(&mut t, "lr_scheduler", self.lr_scheduler.clone());
        put(&mut t, "warmup_steps", self.warmup_steps);
        put(&mut t, "warmup_ratio", self.warmup_ratio);
        put(&mut t, "max_grad_norm", self.max_grad_norm);
        put(&mut t, "seed", self.seed);
        put(&mut t, "precision", self.precision.clone());
        put(&mut t, "cpu_parts", self.cpu_parts);
        put(&mut t, "max_length", self.max_length);
        put(&mut t, "truncation", self.truncation.clone());
        put(&mut t, "train_percentile", self.train_percentile);
        put(&mut t, "test_percentile", self.test_percentile);
        put(&mut t, "sanity_train", self.sanity_train.then_some(true));
        put(&mut t, "train_dataset_length", self.train_dataset_length);
        put(&mut t, "test_dataset_length", self.test_dataset_length);
        put(
            &mut t,
            "dataset_random_sample",
            self.dataset_random_sample.then_some(true),
        );
        put(
            &mut t,
            "group_by_length",
            self.group_by_length.then_some(true),
        );
        put(&mut t, "val_check_interval", self.val_check_interval);
        put(
            &mut t,
            "check_val_every_n_epoch",
            self.check_val_every_n_epoch,
        );
        put(&mut t, "num_sanity_val_steps", self.num_sanity_val_steps);
        put(&mut t, "eval_only", self.eval_only.then_some(true));
        put(&mut t, "log_every_n_steps", self.log_every_n_steps);
        put(&mut t, "checkpoint_frequency", self.checkpoint_frequency);
        put(&mut t, "ckpt_to_keep", self.ckpt_to_keep);
        put(
            &mut t,
            "resume_from_checkpoint",
            path(&self.resume_from_checkpoint),
        );
        put(&mut t, "skip_bad_rows", self.skip_bad_rows.then_some(true));
        put(&mut t, "beta", self.beta);
        put(&mut t, "label_smoothing", self.label_smoothing);
        put(&mut t, "loss_type", self.loss_type.clone());
        put(&mut t, "ref_model", path(&self.ref_model));
        put(&mut t, "eval_generate", self.eval_generate);
        put(&mut t, "lambda", self.lambda);
        put(&mut t, "correct_data", path(&self.correct_data));
        put(
            &mut t,
            "calculate_win_rate",
            self.calculate_win_rate.then_some(true),
        );
        put(&mut t, "win_rate_judge", self.win_rate_judge.clone());
        put(&mut t, "win_rate_prompts", self.win_rate_prompts);
        put(
            &mut t,
            "win_rate_max_new_tokens",
            self.win_rate_max_new_tokens,
        );
        let mut overrides = vec![t];
        for s in &self.set {
            overrides.push(parse_set(s)?);
        }
        // The subcommand decides the objective, whatever the file says.
        let mut objective_table = toml::Table::new();
        objective_table.insert("objective".into(), objective.name().into());
        overrides.push(objective_table);
        Ok(TrainConfig::resolve(self.config.as_deref(), &overrides)?)
    }
}

pub fn run(args: Args, objective: Objective) -> anyhow::Result<()> {
    let config = args.resolve(objective)?;
    let inputs = ferrotune::train::prepare::prepare(&config)?;
    let summary = ferrotune::train::run(&config, inputs)?;
    if !ferrotune::dist::world().is_main() {
        return Ok(()); // rank 0 reports for the whole job
    }
    let report = serde_json::json!({
        "run_dir": summary.run_dir,
        "final_dir": summary.final_dir,
        "steps": summary.steps,
        "first_train_loss": summary.train_losses.first().map(|x| x.1),
        "last_train_loss": summary.train_losses.last().map(|x| x.1),
        "eval": summary.eval_metrics.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<String, serde_json::Value>>(),
    });
    if args.json {
        super::print_json(&report);
    } else {
        eprintln!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
