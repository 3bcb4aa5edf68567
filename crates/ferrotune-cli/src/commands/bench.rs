//! `ferrotune bench train|decode`: times the real code paths on random token ids (after
//! warm-up) and prints one JSON object. The comparison with PyTorch lives in scripts/bench/.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use ferrotune::data::{TokenizedPair, TokenizedSequence};
use ferrotune::infer::sampler::argmax;
use ferrotune::io::checkpoint::parse_dtype;
use ferrotune::model::{num_parameters, KvCache, LogitsAt};
use ferrotune::train::config::{Objective, TrainConfig};
use ferrotune::train::trainer::{time_steps, Examples};
use rand::{Rng, SeedableRng};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Optimizer steps (forward + backward + AdamW) of SFT or DPO.
    Train(TrainArgs),
    /// Greedy batched decoding with the KV cache.
    Decode(DecodeArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    #[arg(long)]
    model: PathBuf,
    /// Sequences (SFT) or pairs (DPO) per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// sft or dpo.
    #[arg(long, default_value = "sft")]
    objective: String,
    #[arg(long, default_value = "f32")]
    precision: String,
}

#[derive(clap::Args)]
pub struct DecodeArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    #[arg(long, default_value = "f32")]
    precision: String,
}

/// Peak resident set size of this process (VmHWM), in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn random_sequence(rng: &mut impl Rng, vocab: usize, len: usize) -> TokenizedSequence {
    let input_ids: Vec<u32> = (0..len)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    // As torch_anchor.py: the first quarter is prompt (not scored), the rest is target.
    let targets = (0..len).map(|i| i >= len / 4).collect();
    TokenizedSequence { input_ids, targets }
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Train(a) => train(a),
        Command::Decode(a) => decode(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let device = super::device()?;
    let model = ferrotune::io::load_model(&a.model, DType::F32, &device)?;
    let vocab = model.decoder.config().vocab_size;
    let params = num_parameters(model.decoder.config());
    let objective = match a.objective.as_str() {
        "sft" => Objective::Sft,
        "dpo" => Objective::Dpo,
        other => anyhow::bail!("--objective must be sft or dpo, got `{other}`"),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let examples = match objective {
        Objective::Dpo => Examples::Pairs(
            (0..a.batch_size)
                .map(|_| TokenizedPair {
                    chosen: random_sequence(&mut rng, vocab, a.seq_len),
                    rejected: random_sequence(&mut rng, vocab, a.seq_len),
                    prompt_len: a.seq_len / 4,
                })
                .collect(),
        ),
        _ => Examples::Sequences(
            (0..a.batch_size)
                .map(|_| random_sequence(&mut rng, vocab, a.seq_len))
                .collect(),
        ),
    };
    let config = TrainConfig {
        objective,
        model: a.model.clone(),
        batch_size: a.batch_size,
        precision: a.precision.clone(),
        lr: Some(1e-5),
        ..Default::default()
    };
    let times = time_steps(&config, model.decoder, &examples, a.warmup, a.steps.max(1))?;
    let sequences = if objective == Objective::Dpo {
        2 * a.batch_size
    } else {
        a.batch_size
    };
    let step = median(times);
    super::print_json(&serde_json::json!({
        "objective": a.objective,
        "tokens_per_s": (sequences * a.seq_len) as f64 / step,
        "step_seconds_median": step,
        "peak_rss_mb": peak_rss_mb(),
        "threads": threads(),
        "dtype": a.precision,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "num_parameters": params,
    }));
    Ok(())
}

fn decode(a: DecodeArgs) -> anyhow::Result<()> {
    let device = super::device()?;
    let dtype = parse_dtype(&a.precision)?;
    let model = ferrotune::io::load_model(&a.model, dtype, &device)?;
    let decoder = &model.decoder;
    let vocab = decoder.config().vocab_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let prompt: Vec<u32> = (0..a.batch_size * a.prompt_len)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let run_once = |new_tokens: usize| -> anyhow::Result<(f64, f64)> {
        let mut cache = KvCache::new(decoder.config(), a.batch_size);
        let started = Instant::now();
        let input = Tensor::from_vec(prompt.clone(), (a.batch_size, a.prompt_len), &device)?;
        let mut logits = decoder.forward_step(&input, None, &mut cache, LogitsAt::Last)?;
        let prefill = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for _ in 0..new_tokens {
            let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let next: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
            let input = Tensor::from_vec(next, (a.batch_size, 1), &device)?;
            logits = decoder.forward_step(&input, None, &mut cache, LogitsAt::Last)?;
        }
        Ok((prefill, started.elapsed().as_secs_f64()))
    };
    run_once(4)?; // warm-up
    let (prefill, decode) = run_once(a.new_tokens)?;
    super::print_json(&serde_json::json!({
        "tokens_per_s": (a.batch_size * a.new_tokens) as f64 / decode,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "peak_rss_mb": peak_rss_mb(),
        "threads": threads(),
        "dtype": a.precision,
        "batch_size": a.batch_size,
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "num_parameters": num_parameters(decoder.config()),
    }));
    Ok(())
}
