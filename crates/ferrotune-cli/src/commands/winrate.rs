//! `ferrotune winrate`: the win rate of a model against a reference under a judge (CONTRACTS
//! "Win rate").
//!
//! Each side's answers are generated from `--prompts` (`--model`, `--reference`, with the
//! sampling flags and `--seed`; both sides use the same seeds) or read from a file of `generate`
//! rows (`--answers`, `--reference-answers`; sample 0 of each prompt row is judged). Generated
//! answers are saved next to the report (`STEM.model_answers.jsonl`,
//! `STEM.reference_answers.jsonl`) as they are made. Without `--prompts`, both answer files must
//! cover the same prompt indices and the judge sees each row's `prompt` text as the question.
//!
//! Writes report.json (`--out`) and report.md beside it. If the judge fails for good (bounded
//! retries), the judged records so far go to `STEM.partial.json` and the command fails naming
//! it; a rerun with the answer files and the same `--cache` pays only for what is left.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use candle_core::DType;
use ferrotune::data::PromptInput;
use ferrotune::eval::{
    api_key_from_env, build_judge, judge_all, prompt_text, read_answers, AnswerRow,
    GenrmJudgeOptions, JudgeOptions, JudgeSpec, PairInput, Record, Report, RetryPolicy,
    DEFAULT_TIE_EPSILON,
};
use ferrotune::infer::verify::{Format, Mode};

use super::generate::{generate_rows, prepare_prompts, progress_bar, read_prompts, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    /// The model evaluated (generates its answers unless --answers is given).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The reference model (generates its answers unless --reference-answers is given).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Prompts: `prompts`, `chat` or `qa` rows (needed to generate).
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long)]
    schema: Option<String>,
    /// `rm:DIR`, `genrm:DIR`, `openai-reward:URL#MODEL` or `openai-judge:URL#MODEL`.
    #[arg(long)]
    judge: String,
    /// report.json; report.md is written beside it.
    #[arg(long)]
    out: PathBuf,
    /// Pre-generated answers of the model (`ferrotune generate` rows).
    #[arg(long)]
    answers: Option<PathBuf>,
    /// Pre-generated answers of the reference.
    #[arg(long)]
    reference_answers: Option<PathBuf>,
    /// Real-valued judges: scores this close are a tie.
    #[arg(long, default_value_t = DEFAULT_TIE_EPSILON)]
    tie_epsilon: f64,
    /// Environment variable holding the judge's API key (default: OPENAI_API_KEY, if set).
    #[arg(long)]
    judge_api_key_env: Option<String>,
    /// Remote judges: requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Remote judges: reply cache (JSONL). Default: STEM.judge_cache.jsonl beside the report.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Remote judges: no reply cache.
    #[arg(long, conflicts_with = "cache")]
    no_cache: bool,
    /// Remote judges: retries of a failed request (exponential backoff from 0.5 s).
    #[arg(long, default_value_t = 4)]
    judge_retries: usize,
    /// Remote judges: seconds one request may take.
    #[arg(long, default_value_t = 120)]
    judge_timeout: u64,
    /// Local judges: sequences scored per forward pass.
    #[arg(long, default_value_t = 8)]
    judge_batch_size: usize,
    /// `genrm:` judges: direct (p(Yes) after the verdict question, one pass) or cot (the mean
    /// p(Yes) of --genrm-k sampled rationales).
    #[arg(long, default_value = "direct")]
    genrm_mode: String,
    /// `genrm:` judges: the verifier's input layout, critiques (genrm-critiques) or terse.
    #[arg(long, default_value = "critiques")]
    genrm_format: String,
    /// `genrm:` judges in cot mode: rationales per answer.
    #[arg(long, default_value_t = 8)]
    genrm_k: usize,
    /// `genrm:` judges in cot mode: longest rationale, in tokens.
    #[arg(long, default_value_t = 256)]
    genrm_max_new_tokens: usize,
    /// Print the summary (report.json without `records`) as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// One side's answers, aligned with the prompts.
struct Answers {
    texts: Vec<String>,
    tokens: Vec<usize>,
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    out.with_file_name(format!("{stem}.{suffix}"))
}

/// Sample 0 (or the first row) of each prompt index.
fn first_samples(path: &Path) -> anyhow::Result<BTreeMap<usize, AnswerRow>> {
    let mut by_index: BTreeMap<usize, AnswerRow> = BTreeMap::new();
    for row in read_answers(path)? {
        match by_index.get(&row.index) {
            Some(have) if have.sample_index <= row.sample_index => {}
            _ => {
                by_index.insert(row.index, row);
            }
        }
    }
    anyhow::ensure!(!by_index.is_empty(), "{}: no answer rows", path.display());
    Ok(by_index)
}

fn aligned(path: &Path, rows: &BTreeMap<usize, AnswerRow>, n: usize) -> anyhow::Result<Answers> {
    if let Some((&extra, _)) = rows.range(n..).next() {
        anyhow::bail!(
            "{}: has an answer for prompt index {extra}, but there are only {n} prompts",
            path.display()
        );
    }
    let mut texts = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        let row = rows
            .get(&i)
            .ok_or_else(|| anyhow::anyhow!("{}: no answer for prompt index {i}", path.display()))?;
        texts.push(row.completion.clone());
        tokens.push(row.num_tokens);
    }
    Ok(Answers { texts, tokens })
}

/// Generates one answer per prompt with `model_dir`, saving the rows to `save` as they come.
fn generate_side(
    model_dir: &Path,
    prompts: &[(PromptInput, String)],
    sampling: &SamplingArgs,
    save: &Path,
    what: &str,
) -> anyhow::Result<Answers> {
    let device = super::device()?;
    let model = ferrotune::io::load_model(model_dir, DType::F32, &device)
        .with_context(|| format!("loading the {what} {}", model_dir.display()))?;
    let tokenizer = model.tokenizer()?;
    let context = model.decoder.config().max_position_embeddings;
    let prepared = prepare_prompts(tokenizer, context, prompts)
        .with_context(|| format!("the {what}'s prompts"))?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(save).with_context(|| format!("creating {}", save.display()))?,
    );
    let bar = progress_bar(prepared.len() as u64, &format!("generating ({what})"));
    let mut texts = vec![String::new(); prepared.len()];
    let mut tokens = vec![0usize; prepared.len()];
    generate_rows(&model, &prepared, 1, sampling, |rows| {
        bar.inc(rows.len() as u64);
        for r in rows {
            serde_json::to_writer(&mut out, &r)?;
            out.write_all(b"\n")?;
            texts[r.index] = r.completion;
            tokens[r.index] = r.num_tokens;
        }
        out.flush()?;
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(Answers { texts, tokens })
}

fn write_report(path: &Path, report: &Report) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Everything that can be checked before the (slow) generation is checked first.
    let spec: JudgeSpec = args.judge.parse()?;
    anyhow::ensure!(
        args.tie_epsilon >= 0.0,
        "--tie-epsilon must be ≥ 0 (got {})",
        args.tie_epsilon
    );
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    args.sampling.params()?;
    anyhow::ensure!(
        args.answers.is_some() || args.model.is_some(),
        "give --model (to generate its answers) or --answers"
    );
    anyhow::ensure!(
        args.reference_answers.is_some() || args.reference.is_some(),
        "give --reference (to generate its answers) or --reference-answers"
    );
    let needs_generation = args.answers.is_none() || args.reference_answers.is_none();
    anyhow::ensure!(
        !needs_generation || args.prompts.is_some(),
        "--prompts is needed to generate answers"
    );
    let remote = matches!(
        spec,
        JudgeSpec::OpenAiReward { .. } | JudgeSpec::OpenAiJudge { .. }
    );
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let cache = match (&args.cache, args.no_cache, remote) {
        (_, true, _) | (_, _, false) => None,
        (Some(c), false, true) => Some(c.clone()),
        (None, false, true) => Some(sibling(&args.out, "judge_cache.jsonl")),
    };
    let options = JudgeOptions {
        tie_epsilon: args.tie_epsilon,
        device: super::device()?,
        batch_size: args.judge_batch_size.max(1),
        api_key: if remote {
            api_key_from_env(args.judge_api_key_env.as_deref())?
        } else {
            None
        },
        concurrency: args.concurrency,
        retry: RetryPolicy {
            max_retries: args.judge_retries,
            ..Default::default()
        },
        timeout: Duration::from_secs(args.judge_timeout.max(1)),
        cache,
        genrm: GenrmJudgeOptions {
            mode: match args.genrm_mode.as_str() {
                "direct" => Mode::Direct,
                "cot" => Mode::Cot,
                other => anyhow::bail!("--genrm-mode `{other}`: expected direct or cot"),
            },
            format: args.genrm_format.parse::<Format>()?,
            k: args.genrm_k.max(1),
            max_new_tokens: args.genrm_max_new_tokens.max(1),
            seed: args.sampling.seed,
            ..Default::default()
        },
    };
    let judge = build_judge(&spec, &options)?;

    // Prompts: from --prompts, else the model's answer rows.
    let model_rows = args.answers.as_deref().map(first_samples).transpose()?;
    let reference_rows = args
        .reference_answers
        .as_deref()
        .map(first_samples)
        .transpose()?;
    let prompts: Vec<(PromptInput, String)> = match &args.prompts {
        Some(path) => read_prompts(path, args.schema.as_deref())?,
        None => {
            // Both sides come from files here.
            let m = model_rows.as_ref().expect("checked above");
            let r = reference_rows.as_ref().expect("checked above");
            let mi: Vec<&usize> = m.keys().collect();
            let ri: Vec<&usize> = r.keys().collect();
            anyhow::ensure!(
                mi == ri,
                "--answers and --reference-answers cover different prompt indices; give --prompts, or answer files of the same prompts"
            );
            anyhow::ensure!(
                mi.iter().enumerate().all(|(k, &&i)| k == i),
                "the answer files' prompt indices are not 0..{}; give --prompts",
                mi.len()
            );
            m.values()
                .map(|row| {
                    (
                        PromptInput::Text(row.prompt.clone()),
                        format!("prompt index {}", row.index),
                    )
                })
                .collect()
        }
    };
    let n = prompts.len();
    let model = match (&model_rows, &args.model) {
        (Some(rows), _) => aligned(args.answers.as_deref().expect("rows"), rows, n)?,
        (None, Some(dir)) => generate_side(
            dir,
            &prompts,
            &args.sampling,
            &sibling(&args.out, "model_answers.jsonl"),
            "model",
        )?,
        (None, None) => unreachable!("checked above"),
    };
    let reference = match (&reference_rows, &args.reference) {
        (Some(rows), _) => aligned(args.reference_answers.as_deref().expect("rows"), rows, n)?,
        (None, Some(dir)) => generate_side(
            dir,
            &prompts,
            &args.sampling,
            &sibling(&args.out, "reference_answers.jsonl"),
            "reference",
        )?,
        (None, None) => unreachable!("checked above"),
    };

    let pairs: Vec<PairInput> = (0..n)
        .map(|i| PairInput {
            prompt: prompts[i].0.to_messages(),
            model_answer: model.texts[i].clone(),
            reference_answer: reference.texts[i].clone(),
        })
        .collect();
    let bar = progress_bar(n as u64, "judging");
    let run = judge_all(judge.as_ref(), &pairs, &|k| bar.inc(k as u64));
    bar.finish_and_clear();

    let mut records = Vec::new();
    let mut tokens_model = Vec::new();
    let mut tokens_reference = Vec::new();
    for (i, j) in run.judgements.iter().enumerate() {
        if let Some(j) = j {
            records.push(Record {
                prompt: prompt_text(&pairs[i].prompt),
                model_answer: pairs[i].model_answer.clone(),
                reference_answer: pairs[i].reference_answer.clone(),
                model_score: j.model_score,
                reference_score: j.reference_score,
                outcome: j.outcome,
            });
            tokens_model.push(model.tokens[i]);
            tokens_reference.push(reference.tokens[i]);
        }
    }
    let report = Report::new(judge.spec(), records, &tokens_model, &tokens_reference);
    if let Some(error) = run.error {
        let partial = sibling(&args.out, "partial.json");
        write_report(&partial, &report)?;
        let mut kept = vec![format!(
            "the {} judged records are in {}",
            report.n,
            partial.display()
        )];
        for (flag, file) in [
            (
                args.answers.is_none(),
                sibling(&args.out, "model_answers.jsonl"),
            ),
            (
                args.reference_answers.is_none(),
                sibling(&args.out, "reference_answers.jsonl"),
            ),
        ] {
            if flag {
                kept.push(format!("answers in {}", file.display()));
            }
        }
        anyhow::bail!(
            "judging stopped after {} of {n} prompts: {error}\n{}",
            report.n,
            kept.join("; ")
        );
    }
    write_report(&args.out, &report)?;
    let md = args.out.with_extension("md");
    std::fs::write(&md, report.to_markdown())
        .with_context(|| format!("writing {}", md.display()))?;
    eprintln!(
        "win rate {:.4} ± {:.4} over {} prompts ({} wins, {} ties, {} losses; judge {}) → {}",
        report.win_rate,
        report.se,
        report.n,
        report.wins,
        report.ties,
        report.losses,
        report.judge,
        args.out.display()
    );
    if args.json {
        let mut summary = serde_json::to_value(&report)?;
        if let Some(o) = summary.as_object_mut() {
            o.remove("records");
        }
        super::print_json(&summary);
    }
    Ok(())
}
