//! `ferrotune bench train|decode`: times the real code paths on random token ids (after
//! warm-up) and prints one JSON object. The comparison with PyTorch lives in scripts/bench/.
//! Under a launcher (`mpirun -np N ferrotune bench train …`) the batch is the global one, shared
//! out across the ranks as in training, and rank 0 prints; `bench allreduce` times the gradient
//! all-reduce alone for a model shape (docs/DISTRIBUTED.md).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use ferrotune::data::{TokenizedPair, TokenizedSequence};
use ferrotune::infer::sampler::argmax_rows;
use ferrotune::io::checkpoint::parse_dtype;
use ferrotune::model::{matmul_parameters, num_parameters, KvCache, LogitsAt};
use ferrotune::train::config::{Objective, TrainConfig};
use ferrotune::train::trainer::{time_steps_with_phases, Examples};
use rand::{Rng, SeedableRng};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Optimizer steps (forward + backward + AdamW) of SFT or DPO.
    Train(TrainArgs),
    /// Greedy batched decoding with the KV cache.
    Decode(DecodeArgs),
    /// The gradient all-reduce of a model shape alone (run it under mpirun -np N).
    Allreduce(AllreduceArgs),
    /// GFLOP/s of the bf16 GEMM (f32 accumulation) against the f32 one, on the linear-layer
    /// products of the benchmark models (a kernel check, not a user command).
    #[command(hide = true)]
    Gemm(GemmArgs),
}

#[derive(clap::Args)]
pub struct GemmArgs {
    /// Products as `MxNxK:layout`, comma separated; layout `fwd` (y = x·wᵀ), `dx` (dy·w) or
    /// `dw` (dyᵀ·x). Default: the 5M model at 8×256 tokens and Qwen2.5-0.5B at 512 tokens.
    #[arg(long)]
    shapes: Option<String>,
    /// Seconds to time each product for (after one warm-up call).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

#[derive(clap::Args)]
pub struct AllreduceArgs {
    /// A model's config.json: the gradients have its parameters' shapes (f32).
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Values per bucket (one collective each).
    #[arg(long, default_value_t = ferrotune::dist::DEFAULT_BUCKET_ELEMENTS)]
    bucket_elements: usize,
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
    /// Micro-batch parts side by side on the CPU (the trainer's `--cpu-parts`).
    #[arg(long, default_value_t = 1)]
    cpu_parts: usize,
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
        Command::Allreduce(a) => allreduce(a),
        Command::Gemm(a) => gemm(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let device = super::device()?;
    let model = ferrotune::io::load_model(&a.model, DType::F32, &device)?;
    let vocab = model.decoder.config().vocab_size;
    let params = num_parameters(model.decoder.config());
    let matmul_params = matmul_parameters(model.decoder.config());
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
        cpu_parts: a.cpu_parts,
        lr: Some(1e-5),
        ..Default::default()
    };
    let times =
        time_steps_with_phases(&config, model.decoder, &examples, a.warmup, a.steps.max(1))?;
    let sequences = if objective == Objective::Dpo {
        2 * a.batch_size
    } else {
        a.batch_size
    };
    let world = ferrotune::dist::world();
    if !world.is_main() {
        return Ok(());
    }
    let step = median(times.iter().map(|t| t.seconds).collect());
    super::print_json(&serde_json::json!({
        "objective": a.objective,
        "tokens_per_s": (sequences * a.seq_len) as f64 / step,
        "step_seconds_median": step,
        "ranks": world.size(),
        "backend": world.comm().backend(),
        "allreduce_seconds_median": median(times.iter().map(|t| t.allreduce_seconds).collect()),
        "forward_backward_seconds_median":
            median(times.iter().map(|t| t.grads_ready_seconds).collect()),
        "optimizer_seconds_median": median(times.iter().map(|t| t.optimizer_seconds()).collect()),
        "peak_rss_mb": peak_rss_mb(),
        "threads": threads(),
        "dtype": a.precision,
        "cpu_parts": a.cpu_parts,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "num_parameters": params,
        "matmul_parameters": matmul_params,
    }));
    Ok(())
}

/// Sums f32 gradients shaped like the model's parameters, on the model's device, across the
/// ranks `repeats` times (after one warm-up) through the trainer's bucketed path; prints the median seconds and the bus
/// bandwidth (a ring all-reduce moves 2(N−1)/N of the buffer through each rank).
fn allreduce(a: AllreduceArgs) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    let text = std::fs::read_to_string(&a.config)?;
    let config =
        ferrotune::model::ModelConfig::from_value(serde_json::from_str(&text)?, &a.config)?;
    let world = ferrotune::dist::world();
    // The model's device: CUDA gradients go through the backend's device path (NCCL).
    let device = super::device()?;
    let value = (world.rank() + 1) as f32;
    let mut grads = BTreeMap::new();
    for spec in ferrotune::model::parameter_specs(&config) {
        let n: usize = spec.shape.iter().product();
        grads.insert(
            spec.name,
            Tensor::from_vec(vec![value; n], spec.shape, &device)?,
        );
    }
    let elements: usize = grads.values().map(|t| t.elem_count()).sum();
    let mut times = Vec::new();
    for i in 0..=a.repeats.max(1) {
        device.synchronize()?;
        let started = Instant::now();
        ferrotune::dist::all_reduce_gradients(world.comm(), &mut grads, a.bucket_elements)?;
        // A device collective returns once queued: time it to its end.
        device.synchronize()?;
        if i > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    // One all-reduce makes every value N(N+1)/2 (the sum of rank + 1); each later one
    // multiplies it by N.
    let ranks = world.size() as f32;
    let first: f32 = grads
        .values()
        .next()
        .map_or(Ok(0.0), |t| t.flatten_all()?.get(0)?.to_scalar::<f32>())?;
    if world.size() > 1 || world.comm().runs_alone() {
        let want = ranks * (ranks + 1.0) / 2.0 * ranks.powi(a.repeats.max(1) as i32);
        anyhow::ensure!(
            (first - want).abs() <= 1e-3 * want.abs(),
            "all-reduce sum {first}, expected {want}"
        );
    }
    if !world.is_main() {
        return Ok(());
    }
    let seconds = median(times);
    let bytes = elements as f64 * 4.0;
    let n = world.size() as f64;
    super::print_json(&serde_json::json!({
        "ranks": world.size(),
        "backend": world.comm().backend(),
        "device": format!("{:?}", device.location()),
        "parameters": elements,
        "gradient_bytes": bytes,
        "buckets": ferrotune::dist::buckets::plan_buckets(
            &grads.values().map(|t| t.elem_count()).collect::<Vec<_>>(),
            a.bucket_elements,
        )
        .len(),
        "allreduce_seconds_median": seconds,
        "bus_gb_per_s": 2.0 * (n - 1.0) / n * bytes / seconds / 1e9,
        "peak_rss_mb": peak_rss_mb(),
    }));
    Ok(())
}

fn decode(a: DecodeArgs) -> anyhow::Result<()> {
    let device = super::device()?;
    let dtype = parse_dtype(&a.precision)?;
    let model = ferrotune::io::load_model_for(&a.model, dtype, &device)?;
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
            // As `generate` picks greedy tokens: on a GPU only the ids are read back.
            let next = argmax_rows(&logits)?;
            let input = Tensor::from_vec(next, (a.batch_size, 1), &device)?;
            logits = decoder.forward_step(&input, None, &mut cache, LogitsAt::Last)?;
        }
        Ok((prefill, started.elapsed().as_secs_f64()))
    };
    run_once(4)?; // warm-up
    let (prefill, decode) = run_once(a.new_tokens)?;
    if !ferrotune::dist::world().is_main() {
        return Ok(()); // under a launcher every rank decodes alone; rank 0 reports its own
    }
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

const DEFAULT_GEMM_SHAPES: &str = "2048x256x256:fwd,2048x688x256:fwd,2048x256x688:fwd,\
2048x256x688:dx,688x256x2048:dw,2048x8192x256:fwd,\
512x4864x896:fwd,512x896x4864:fwd,512x896x4864:dx,4864x896x512:dw,1x4864x896:fwd,32x4864x896:fwd";

/// Times `f` repeatedly for about `seconds`; returns the median seconds per call.
fn time_calls(seconds: f64, mut f: impl FnMut()) -> f64 {
    f();
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 3 || started.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    median(times)
}

fn gemm(a: GemmArgs) -> anyhow::Result<()> {
    use ferrotune::model::bf16_gemm::{matmul, matmul_f32, native_bf16, Operand};
    let threads = candle_core::utils::get_num_threads();
    let shapes = a.shapes.as_deref().unwrap_or(DEFAULT_GEMM_SHAPES);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut rows = Vec::new();
    for spec in shapes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (dims, layout) = spec.split_once(':').unwrap_or((spec, "fwd"));
        let d: Vec<usize> = dims
            .split('x')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("bad shape `{spec}`: {e}"))?;
        anyhow::ensure!(d.len() == 3, "bad shape `{spec}`: expected MxNxK");
        let (m, n, k) = (d[0], d[1], d[2]);
        // Storage as the linear layer's three products see it (see bf16_gemm::Operand).
        let (a_inner, b_inner) = match layout {
            "fwd" => (true, true),
            "dx" => (true, false),
            "dw" => (false, false),
            other => anyhow::bail!("bad layout `{other}` in `{spec}`: fwd, dx or dw"),
        };
        let mut values =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let (a_data, b_data) = (values(m * k), values(n * k));
        let operand = |data, inner, count| {
            if inner {
                Operand::DepthInner { data, ld: k }
            } else {
                Operand::DepthOuter { data, ld: count }
            }
        };
        let (lhs, rhs) = (operand(&a_data, a_inner, m), operand(&b_data, b_inner, n));
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let bf16 = time_calls(a.seconds, || {
            matmul((m, n, k), lhs, rhs, &mut c, false, threads)
        });
        let f32 = time_calls(a.seconds, || {
            matmul_f32((m, n, k), lhs, rhs, &mut c, false, threads)
        });
        rows.push(serde_json::json!({
            "shape": spec,
            "bf16_gflops": flops / bf16 / 1e9,
            "f32_gflops": flops / f32 / 1e9,
            "speedup": f32 / bf16,
        }));
    }
    super::print_json(&serde_json::json!({
        "threads": threads,
        "native_bf16": native_bf16(),
        "products": rows,
    }));
    Ok(())
}
