//! The one training loop. It dispatches on the objective for the loss of a micro-batch and
//! for evaluation; everything else (accumulation, clipping, AdamW, schedule, logging,
//! checkpoints, resume) is shared.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::checkpoint::{load_checkpoint_state, save_checkpoint, TrainerState};
use super::config::{Objective, TrainConfig};
use super::metrics::MetricsWriter;
use super::optimizer::{clip_grad_norm, global_grad_norm, AdamW};
use super::schedule::lr_multiplier;
use crate::data::{TokenizedPair, TokenizedSequence};
use crate::error::{Error, Result};
use crate::io::checkpoint::parse_dtype;
use crate::io::save_model;
use crate::model::decoder::gather_last_token;
use crate::model::fused::head_logprobs_with_sink;
use crate::model::grad_sink::GradSink;
use crate::model::{parameter_specs, Decoder, ModelConfig};
use crate::objectives::dpo::{dpo_loss, DpoParams};
use crate::objectives::reward::bradley_terry_loss;

/// The examples of one split, tokenized.
#[derive(Clone)]
pub enum Examples {
    Sequences(Vec<TokenizedSequence>),
    /// Pairs, with the reference log-probs (chosen, rejected) once computed (DPO).
    Pairs(Vec<TokenizedPair>),
    /// GenRM: verification sequences (D_verify) and correct solutions (D_correct), indexed as
    /// one list (verify first).
    Genrm {
        verify: Vec<TokenizedSequence>,
        correct: Vec<TokenizedSequence>,
    },
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Sequences(s) => s.len(),
            Examples::Pairs(p) => p.len(),
            Examples::Genrm { verify, correct } => verify.len() + correct.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn length(&self, i: usize) -> usize {
        match self {
            Examples::Sequences(s) => s[i].input_ids.len(),
            Examples::Pairs(p) => p[i]
                .chosen
                .input_ids
                .len()
                .max(p[i].rejected.input_ids.len()),
            Examples::Genrm { .. } => self.genrm_row(i).0.input_ids.len(),
        }
    }

    /// Row i of a GenRM set and whether it is a verification row.
    fn genrm_row(&self, i: usize) -> (&TokenizedSequence, bool) {
        match self {
            Examples::Genrm { verify, .. } if i < verify.len() => (&verify[i], true),
            Examples::Genrm { verify, correct } => (&correct[i - verify.len()], false),
            _ => unreachable!("genrm_row on a non-GenRM set"),
        }
    }

    /// Target tokens of the verify and the correct rows among `batches` (GenRM normalises
    /// each term over its own targets in the whole step).
    fn genrm_counts(&self, batches: &[Vec<usize>]) -> [f64; 2] {
        let mut counts = [0f64; 2];
        for &i in batches.iter().flatten() {
            let (row, is_verify) = self.genrm_row(i);
            counts[usize::from(!is_verify)] += row.targets.iter().filter(|&&t| t).count() as f64;
        }
        counts
    }
}

/// What a run needs besides its config: the tokenized splits, where the tokenizer files are
/// (copied into every saved model) and the pad id.
pub struct TrainInputs {
    pub train: Examples,
    pub eval: Examples,
    pub tokenizer_dir: PathBuf,
    pub pad_id: u32,
    /// First tokens of " Yes" / " No", for GenRM validation.
    pub verdict_ids: Option<(u32, u32)>,
    /// End-of-sequence ids of the tokenizer.
    pub stop_ids: Vec<u32>,
    /// `--calculate-win-rate`: the eval prompts judged at each validation (`win_rate_eval.rs`).
    pub win_rate_prompts: Vec<crate::data::PromptInput>,
}

pub struct RunSummary {
    pub run_dir: PathBuf,
    pub final_dir: Option<PathBuf>,
    pub steps: usize,
    /// (step, loss) of every train log row.
    pub train_losses: Vec<(usize, f64)>,
    /// The last evaluation's metrics.
    pub eval_metrics: Vec<(String, f64)>,
}

/// Padded tensors of a micro-batch: [N, T] ids, attention mask and target mask.
struct Padded {
    input_ids: Tensor,
    attention_mask: Tensor,
    targets: Tensor,
    lengths: Vec<usize>,
    real_tokens: usize,
}

fn pad(seqs: &[&TokenizedSequence], pad_id: u32, device: &Device) -> Result<Padded> {
    let t = seqs
        .iter()
        .map(|s| s.input_ids.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let n = seqs.len();
    let mut ids = Vec::with_capacity(n * t);
    let mut mask = Vec::with_capacity(n * t);
    let mut targets = Vec::with_capacity(n * t);
    for s in seqs {
        let len = s.input_ids.len();
        ids.extend_from_slice(&s.input_ids);
        ids.extend(std::iter::repeat_n(pad_id, t - len));
        mask.extend(std::iter::repeat_n(1u32, len));
        mask.extend(std::iter::repeat_n(0u32, t - len));
        targets.extend(s.targets.iter().map(|&b| if b { 1f32 } else { 0.0 }));
        targets.extend(std::iter::repeat_n(0f32, t - len));
    }
    Ok(Padded {
        input_ids: Tensor::from_vec(ids, (n, t), device)?,
        attention_mask: Tensor::from_vec(mask, (n, t), device)?,
        targets: Tensor::from_vec(targets, (n, t), device)?,
        lengths: seqs.iter().map(|s| s.input_ids.len()).collect(),
        real_tokens: seqs.iter().map(|s| s.input_ids.len()).sum(),
    })
}

/// Target log-probs of a padded batch straight from the final hidden states (the fused,
/// chunked head: the `[tokens, vocab]` logits never exist whole): `logp` [B, T] with 0 at
/// unscored positions, the hidden states (for reads of a few rows' logits) and how many
/// scored tokens are their distribution's argmax.
struct Scored {
    hidden: Tensor,
    logp: Tensor,
    hits: usize,
}

fn scored_logprobs(decoder: &Decoder, p: &Padded, rows: &[&TokenizedSequence]) -> Result<Scored> {
    let hidden = decoder.forward_hidden(&p.input_ids, Some(&p.attention_mask))?;
    let ids: Vec<Vec<u32>> = rows.iter().map(|s| s.input_ids.clone()).collect();
    let scored: Vec<Vec<bool>> = rows.iter().map(|s| s.targets.clone()).collect();
    let (logp, hits) = head_logprobs_with_sink(
        &hidden,
        decoder.head_weight(),
        &ids,
        &scored,
        decoder.bf16_linears(),
        decoder.grad_sink(),
    )?;
    Ok(Scored { hidden, logp, hits })
}

/// Micro-batches of one epoch, from one shuffle of the rows with (seed, epoch). With
/// `group_by_length`, indices are sorted by length within chunks of 50 batches (little padding)
/// and the batch order is shuffled again; otherwise each batch is a run of the shuffled order,
/// so every batch is a random mix of the data (transformers' default).
fn plan_epoch(
    examples: &Examples,
    batch_size: usize,
    group_by_length: bool,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(epoch as u64 + 1)),
    );
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut rng);
    if !group_by_length {
        return order.chunks(batch_size).map(|c| c.to_vec()).collect();
    }
    let mut batches = Vec::new();
    for chunk in order.chunks(batch_size * 50) {
        let mut chunk = chunk.to_vec();
        chunk.sort_by_key(|&i| examples.length(i));
        batches.extend(chunk.chunks(batch_size).map(|c| c.to_vec()));
    }
    batches.shuffle(&mut rng);
    batches
}

/// The position of the verdict token (the last target that is " Yes" or " No").
fn verdict_position(row: &TokenizedSequence, yes: u32, no: u32) -> Option<usize> {
    (1..row.input_ids.len())
        .rev()
        .find(|&i| row.targets[i] && (row.input_ids[i] == yes || row.input_ids[i] == no))
}

/// Per-objective forward results for one micro-batch: a differentiable loss SUM (the caller
/// divides by the step's count) and metric sums.
struct MicroResult {
    loss_sum: Tensor,
    /// Targets (tokens for SFT, pairs for DPO/RM) in this micro-batch.
    count: f64,
    metric_sums: Vec<(&'static str, f64)>,
    real_tokens: usize,
    /// GenRM validation: (p(Yes), label) of each verify row.
    verdicts: Vec<(f64, bool)>,
}

/// One evaluation batch's sums, as they travel between ranks.
#[derive(serde::Serialize, serde::Deserialize)]
struct EvalBatch {
    loss: f64,
    count: f64,
    metric_sums: Vec<(String, f64)>,
    verdicts: Vec<(f64, bool)>,
}

struct Runner<'a> {
    config: &'a TrainConfig,
    objective: Objective,
    device: Device,
    pad_id: u32,
    /// The first tokens of " Yes" and " No" (GenRM validation reads p(Yes) there).
    verdict_ids: Option<(u32, u32)>,
    /// End-of-sequence ids (greedy generations for `edit_distance` stop there).
    stop_ids: Vec<u32>,
    dpo: DpoParams,
    /// Reference log-probs per pair (chosen, rejected), by split.
    reference: BTreeMap<&'static str, Vec<(f32, f32)>>,
    /// `--calculate-win-rate`: the policy against the starting model at each validation.
    win_rate: Option<super::win_rate_eval::WinRateEval>,
}

impl<'a> Runner<'a> {
    /// A runner of `config`'s objective on `device` with DPO reference log-probs `reference`:
    /// padding id 0, no GenRM verdict ids, no stop ids, no win-rate evaluation (what a step
    /// needs; `run` sets the rest).
    fn new(
        config: &'a TrainConfig,
        device: Device,
        reference: BTreeMap<&'static str, Vec<(f32, f32)>>,
    ) -> Self {
        Runner {
            config,
            objective: config.objective,
            device,
            pad_id: 0,
            verdict_ids: None,
            stop_ids: Vec::new(),
            dpo: DpoParams {
                beta: config.beta,
                label_smoothing: config.label_smoothing,
                loss_type: config.loss_type,
            },
            reference,
            win_rate: None,
        }
    }

    fn count(&self, examples: &Examples, batch: &[usize]) -> f64 {
        match examples {
            Examples::Sequences(s) => batch
                .iter()
                .map(|&i| s[i].targets.iter().filter(|&&t| t).count() as f64)
                .sum(),
            Examples::Pairs(_) => batch.len() as f64,
            // GenRM micro-batches return losses already normalised per term (see `step_count`).
            Examples::Genrm { .. } => 0.0,
        }
    }

    /// `genrm_counts`: the step's (or eval set's) target tokens of the verify and correct rows.
    fn micro(
        &self,
        decoder: &Decoder,
        examples: &Examples,
        batch: &[usize],
        split: &'static str,
        genrm_counts: [f64; 2],
    ) -> Result<MicroResult> {
        match examples {
            Examples::Genrm { .. } => {
                let rows: Vec<(&TokenizedSequence, bool)> =
                    batch.iter().map(|&i| examples.genrm_row(i)).collect();
                let seqs: Vec<&TokenizedSequence> = rows.iter().map(|r| r.0).collect();
                let p = pad(&seqs, self.pad_id, &self.device)?;
                let Scored { hidden, logp, .. } = scored_logprobs(decoder, &p, &seqs)?;
                // L = mean_tok(verify) + λ·mean_tok(correct): each row's targets weighted by
                // 1/N_verify or λ/N_correct of the whole step.
                let lambda = self.config.lambda;
                let row_weight: Vec<f32> = rows
                    .iter()
                    .map(|(_, v)| if *v { 1.0 / genrm_counts[0].max(1.0) } else { lambda / genrm_counts[1].max(1.0) } as f32)
                    .collect();
                let row_weight = Tensor::new(row_weight.as_slice(), &self.device)?.unsqueeze(1)?;
                let weights = p.targets.broadcast_mul(&row_weight)?;
                let loss = (&logp * &weights)?.sum_all()?.neg()?;
                // Per-term sums for the metrics (detached).
                let logp_host = logp.detach().to_vec2::<f32>()?;
                let mut nll = [0f64; 2];
                let mut scored = Vec::new();
                for (r, (row, is_verify)) in rows.iter().enumerate() {
                    for (t, &target) in row.targets.iter().enumerate() {
                        if target {
                            nll[usize::from(!is_verify)] -= logp_host[r][t] as f64;
                        }
                    }
                    if let (true, Some((yes, no))) = (*is_verify, self.verdict_ids) {
                        if let Some(pos) = verdict_position(row, yes, no) {
                            let label = row.input_ids[pos] == yes;
                            let state = hidden.get(r)?.narrow(0, pos - 1, 1)?.detach();
                            let next =
                                crate::model::ops::linear(&state, decoder.head_weight(), None)?
                                    .squeeze(0)?
                                    .to_dtype(DType::F32)?
                                    .to_vec1::<f32>()?;
                            scored
                                .push((crate::infer::verify::p_yes(&next, yes, no, false), label));
                        }
                    }
                }
                Ok(MicroResult {
                    loss_sum: loss,
                    count: 1.0,
                    metric_sums: vec![
                        ("loss_verify", nll[0] / genrm_counts[0].max(1.0)),
                        ("loss_correct", nll[1] / genrm_counts[1].max(1.0)),
                    ],
                    real_tokens: p.real_tokens,
                    verdicts: scored,
                })
            }
            Examples::Sequences(seqs) => {
                let rows: Vec<&TokenizedSequence> = batch.iter().map(|&i| &seqs[i]).collect();
                let p = pad(&rows, self.pad_id, &self.device)?;
                let scored = scored_logprobs(decoder, &p, &rows)?;
                // As `objectives::sft::token_loss_sums`: Σ −log p over the target tokens.
                let num_targets: usize = rows
                    .iter()
                    .map(|s| s.targets.iter().filter(|&&t| t).count())
                    .sum();
                Ok(MicroResult {
                    loss_sum: scored.logp.sum_all()?.neg()?,
                    count: num_targets as f64,
                    metric_sums: vec![("token_accuracy", scored.hits as f64)],
                    real_tokens: p.real_tokens,
                    verdicts: Vec::new(),
                })
            }
            Examples::Pairs(pairs) => {
                // Chosen rows first, then rejected: one forward over 2B rows (TRL's
                // concatenated forward).
                let rows: Vec<&TokenizedSequence> = batch
                    .iter()
                    .map(|&i| &pairs[i].chosen)
                    .chain(batch.iter().map(|&i| &pairs[i].rejected))
                    .collect();
                let p = pad(&rows, self.pad_id, &self.device)?;
                let b = batch.len();
                match self.objective {
                    Objective::Rm => {
                        let hidden =
                            decoder.forward_hidden(&p.input_ids, Some(&p.attention_mask))?;
                        let last = gather_last_token(&hidden, &p.lengths)?;
                        let scores = crate::model::ops::linear(&last, decoder.head_weight(), None)?
                            .squeeze(1)?;
                        let chosen = scores.narrow(0, 0, b)?;
                        let rejected = scores.narrow(0, b, b)?;
                        let losses = bradley_terry_loss(&chosen, &rejected)?;
                        let margin = (&chosen - &rejected)?.detach();
                        let correct = margin
                            .gt(0f64)?
                            .to_dtype(DType::F32)?
                            .sum_all()?
                            .to_scalar::<f32>()? as f64;
                        let margin_sum = margin.sum_all()?.to_scalar::<f32>()? as f64;
                        Ok(MicroResult {
                            loss_sum: losses.sum_all()?,
                            count: b as f64,
                            metric_sums: vec![("accuracy", correct), ("margin", margin_sum)],
                            real_tokens: p.real_tokens,
                            verdicts: Vec::new(),
                        })
                    }
                    _ => {
                        let logps = scored_logprobs(decoder, &p, &rows)?.logp.sum(1)?;
                        let reference = &self.reference[split];
                        let ref_c: Vec<f32> = batch.iter().map(|&i| reference[i].0).collect();
                        let ref_r: Vec<f32> = batch.iter().map(|&i| reference[i].1).collect();
                        let counts: Vec<f32> = rows
                            .iter()
                            .map(|s| s.targets.iter().filter(|&&t| t).count().max(1) as f32)
                            .collect();
                        let counts = Tensor::new(counts.as_slice(), &self.device)?;
                        let chosen = logps.narrow(0, 0, b)?;
                        let rejected = logps.narrow(0, b, b)?;
                        let out = dpo_loss(
                            &chosen,
                            &rejected,
                            &Tensor::new(ref_c.as_slice(), &self.device)?,
                            &Tensor::new(ref_r.as_slice(), &self.device)?,
                            Some((&counts.narrow(0, 0, b)?, &counts.narrow(0, b, b)?)),
                            self.dpo,
                        )?;
                        let sum = |t: &Tensor| -> Result<f64> {
                            Ok(t.sum_all()?.to_scalar::<f32>()? as f64)
                        };
                        let margins = (&out.chosen_rewards - &out.rejected_rewards)?;
                        let accuracies = margins.gt(0f64)?.to_dtype(DType::F32)?;
                        Ok(MicroResult {
                            loss_sum: out.losses.sum_all()?,
                            count: b as f64,
                            metric_sums: vec![
                                ("rewards/chosen", sum(&out.chosen_rewards)?),
                                ("rewards/rejected", sum(&out.rejected_rewards)?),
                                ("rewards/accuracies", sum(&accuracies)?),
                                ("rewards/margins", sum(&margins)?),
                                ("logps/chosen", sum(&chosen.detach())?),
                                ("logps/rejected", sum(&rejected.detach())?),
                            ],
                            real_tokens: p.real_tokens,
                            verdicts: Vec::new(),
                        })
                    }
                }
            }
        }
    }

    /// Metrics over a whole split: token metrics weighted by target tokens, pair metrics
    /// averaged over pairs. `limit` caps the number of batches (sanity validation).
    fn evaluate(
        &self,
        decoder: &Decoder,
        examples: &Examples,
        split: &'static str,
        limit: Option<usize>,
    ) -> Result<Vec<(String, f64)>> {
        let batch_size = self
            .config
            .eval_batch_size
            .unwrap_or(self.config.batch_size);
        let mut batches = plan_epoch(examples, batch_size, true, self.config.seed, 0);
        batches.truncate(limit.unwrap_or(usize::MAX));
        let genrm = matches!(examples, Examples::Genrm { .. });
        let genrm_counts = if genrm {
            examples.genrm_counts(&batches)
        } else {
            [0.0; 2]
        };
        // Batch j runs on rank j mod N and every rank gets every batch's sums in batch order,
        // so the metrics equal a single process's bit for bit (dist::shard).
        let results = crate::dist::all_map(batches.len(), |j| {
            let r = self.micro(decoder, examples, &batches[j], split, genrm_counts)?;
            Ok(EvalBatch {
                loss: r.loss_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                count: r.count,
                metric_sums: r
                    .metric_sums
                    .iter()
                    .map(|(n, v)| (n.to_string(), *v))
                    .collect(),
                verdicts: r.verdicts,
            })
        })?;
        let mut loss = 0f64;
        let mut count = 0f64;
        let mut sums: Vec<(String, f64)> = Vec::new();
        let mut verdicts = Vec::new();
        for r in results {
            loss += r.loss;
            count += r.count;
            verdicts.extend(r.verdicts);
            if sums.is_empty() {
                sums = r
                    .metric_sums
                    .iter()
                    .map(|(n, _)| (n.clone(), 0.0))
                    .collect();
            }
            for (acc, (_, v)) in sums.iter_mut().zip(&r.metric_sums) {
                acc.1 += v;
            }
        }
        // GenRM losses and metric sums are normalised inside `micro` already.
        let count = if genrm { 1.0 } else { count.max(1.0) };
        let mean_loss = loss / count;
        let mut out = vec![("loss".to_string(), mean_loss)];
        if matches!(self.objective, Objective::Sft | Objective::Pretrain) {
            out.push(("perplexity".to_string(), mean_loss.exp()));
            if let (Examples::Sequences(seqs), true) =
                (examples, limit.is_none() && self.config.eval_generate > 0)
            {
                out.push((
                    "edit_distance".to_string(),
                    self.edit_distance(decoder, seqs)?,
                ));
            }
        }
        out.extend(sums.into_iter().map(|(n, v)| (n, v / count)));
        if genrm {
            // The verifier score metric: mean p(Yes) (teacher-forced rationale) on correct and
            // on incorrect solutions, and the AUC separating them.
            let mean = |label: bool| {
                let v: Vec<f64> = verdicts
                    .iter()
                    .filter(|s| s.1 == label)
                    .map(|s| s.0)
                    .collect();
                if v.is_empty() {
                    f64::NAN
                } else {
                    v.iter().sum::<f64>() / v.len() as f64
                }
            };
            out.push(("verifier_score_correct".to_string(), mean(true)));
            out.push(("verifier_score_incorrect".to_string(), mean(false)));
            out.push((
                "verifier_auc".to_string(),
                crate::infer::verify::auc(&verdicts).unwrap_or(f64::NAN),
            ));
        }
        if let (Some(win_rate), None) = (&self.win_rate, limit) {
            out.extend(win_rate.evaluate(decoder)?);
        }
        Ok(out)
    }
}

impl Runner<'_> {
    /// Mean normalised Levenshtein distance between the greedy continuation of each row's
    /// prompt (the tokens before its first target) and its reference (the target tokens), on the
    /// first `eval_generate` rows: 0 is a perfect copy, 1 shares nothing.
    fn edit_distance(&self, decoder: &Decoder, seqs: &[TokenizedSequence]) -> Result<f64> {
        use crate::infer::{GenerateOptions, Prompt, SamplingParams};
        let mut prompts = Vec::new();
        let mut references = Vec::new();
        for s in seqs.iter().take(self.config.eval_generate) {
            let Some(first) = s.targets.iter().position(|&t| t) else {
                continue;
            };
            if first == 0 {
                continue;
            }
            let reference: Vec<u32> = s.input_ids[first..]
                .iter()
                .zip(&s.targets[first..])
                .filter(|(_, &t)| t)
                .map(|(&i, _)| i)
                .collect();
            prompts.push(Prompt {
                ids: s.input_ids[..first].to_vec(),
                item: prompts.len() as u64,
                n: 1,
                first_sample: 0,
            });
            references.push(reference);
        }
        if prompts.is_empty() {
            return Ok(f64::NAN);
        }
        let longest = references.iter().map(|r| r.len()).max().unwrap_or(1);
        let options = GenerateOptions {
            params: SamplingParams::greedy(longest + 8),
            seed: self.config.seed,
            stop_ids: self.stop_ids.clone(),
            batch_size: 32,
            tokenizer: None,
            capture_after_stop: None,
        };
        let completions = crate::infer::generate::generate_sharded(decoder, &prompts, &options)?;
        let total: f64 = completions
            .iter()
            .map(|c| normalized_edit_distance(&c.ids, &references[c.prompt]))
            .sum();
        Ok(total / completions.len() as f64)
    }
}

/// Levenshtein distance of two token sequences divided by the longer length.
pub fn normalized_edit_distance(a: &[u32], b: &[u32]) -> f64 {
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 0.0;
    }
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            current[j + 1] = (previous[j] + usize::from(x != y))
                .min(previous[j + 1] + 1)
                .min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()] as f64 / longest as f64
}

/// Turns a causal-LM config into the matching `*ForSequenceClassification` with one label
/// (a Bradley–Terry reward head), as transformers' `AutoModelForSequenceClassification` would.
pub fn reward_model_config(config: &ModelConfig, pad_id: u32) -> Result<ModelConfig> {
    let mut raw = config.raw.clone();
    let arch = config
        .architecture
        .replace("ForCausalLM", "ForSequenceClassification");
    raw["architectures"] = serde_json::json!([arch]);
    raw["num_labels"] = 1.into();
    raw["id2label"] = serde_json::json!({"0": "LABEL_0"});
    raw["label2id"] = serde_json::json!({"LABEL_0": 0});
    raw["pad_token_id"] = pad_id.into();
    ModelConfig::from_value(raw, Path::new("config.json"))
}

fn load_start(config: &TrainConfig, dir: &Path, pad_id: u32, device: &Device) -> Result<Decoder> {
    let model_config = crate::io::model_dir::load_config(dir)?;
    if config.objective != Objective::Rm
        || model_config.head == crate::model::Head::SequenceClassification
    {
        return Ok(crate::io::load_model(dir, DType::F32, device)?.decoder);
    }
    // A reward model starts from a causal LM: its lm_head is dropped and a fresh score head
    // (N(0, initializer_range²), seeded) is added, as AutoModelForSequenceClassification does.
    let mut tensors = crate::io::checkpoint::load_tensors(dir, DType::F32, device)?;
    let rm_config = reward_model_config(&model_config, pad_id)?;
    let std = model_config
        .raw
        .get("initializer_range")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.02) as f32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let data = crate::model::init::normal_samples(&mut rng, model_config.hidden_size, std);
    tensors.insert(
        "score.weight".into(),
        Tensor::from_vec(data, (1, model_config.hidden_size), device)?,
    );
    tensors.remove("lm_head.weight");
    Decoder::new(rm_config, tensors, dir)
}

/// Reference log-probs of every pair under the reference model, computed once before training
/// and cached in the run directory (the reference model is then dropped from memory).
fn reference_logprobs(
    config: &TrainConfig,
    inputs: &TrainInputs,
    run_dir: &Path,
    device: &Device,
) -> Result<BTreeMap<&'static str, Vec<(f32, f32)>>> {
    let cache_path = run_dir.join("reference_logps.json");
    let counts = (inputs.train.len(), inputs.eval.len());
    let mut cached_splits = None;
    if cache_path.exists() {
        let cached = crate::error::read_json(&cache_path)?;
        let get = |k: &str| -> Option<Vec<(f32, f32)>> {
            serde_json::from_value(cached.get(k)?.clone()).ok()
        };
        if let (Some(train), Some(eval)) = (get("train"), get("eval")) {
            if (train.len(), eval.len()) == counts {
                cached_splits = Some((train, eval));
            }
        }
    }
    // Every rank must take the same branch (the computation below is collective): the cache
    // is used only when every rank found it.
    if crate::dist::agree(u64::from(cached_splits.is_some()))? {
        if let Some((train, eval)) = cached_splits {
            tracing::info!(
                "reusing cached reference log-probs from {}",
                cache_path.display()
            );
            return Ok(BTreeMap::from([("train", train), ("eval", eval)]));
        }
    }
    let ref_dir = config
        .ref_model
        .clone()
        .unwrap_or_else(|| config.model.clone());
    tracing::info!("computing reference log-probs with {}", ref_dir.display());
    let reference = crate::io::load_model(&ref_dir, DType::F32, device)?.decoder;
    let mut out = BTreeMap::new();
    for (split, examples) in [("train", &inputs.train), ("eval", &inputs.eval)] {
        let Examples::Pairs(pairs) = examples else {
            return Err(Error::invalid("DPO needs preference pairs"));
        };
        let mut logps = vec![(0f32, 0f32); pairs.len()];
        let batch_size = config.eval_batch_size.unwrap_or(config.batch_size);
        let indices: Vec<usize> = (0..pairs.len()).collect();
        let batches: Vec<&[usize]> = indices.chunks(batch_size).collect();
        // Batches dealt out across ranks, results gathered in order (dist::shard).
        let per_batch = crate::dist::all_map(batches.len(), |b| {
            let batch = batches[b];
            let rows: Vec<&TokenizedSequence> = batch
                .iter()
                .map(|&i| &pairs[i].chosen)
                .chain(batch.iter().map(|&i| &pairs[i].rejected))
                .collect();
            let p = pad(&rows, inputs.pad_id, device)?;
            Ok(scored_logprobs(&reference, &p, &rows)?
                .logp
                .sum(1)?
                .to_vec1::<f32>()?)
        })?;
        for (batch, lp) in batches.iter().zip(per_batch) {
            for (j, &i) in batch.iter().enumerate() {
                logps[i] = (lp[j], lp[batch.len() + j]);
            }
        }
        out.insert(split, logps);
    }
    if crate::dist::world().is_main() {
        let json = serde_json::json!({"reference_model": ref_dir, "train": out["train"], "eval": out["eval"]});
        crate::io::checkpoint::write_atomic(&cache_path, json.to_string().as_bytes())?;
    }
    Ok(out)
}

/// The decoder a training step runs: the f32 master weights `vars`, cast to `dtype` inside
/// the graph (gradients flow back to the f32 variables). bf16 on the CPU is autocast instead:
/// the weights stay f32 and the linear layers compute in bf16 with f32 accumulation.
pub fn compute_decoder(
    config: &ModelConfig,
    vars: &BTreeMap<String, Var>,
    dtype: DType,
) -> Result<Decoder> {
    compute_weights(vars, dtype)?.decoder(config)
}

/// The weights of [`compute_decoder`]: cast once, shared by every decoder of a step.
struct ComputeWeights {
    params: BTreeMap<String, Tensor>,
    /// bf16 autocast on the CPU (f32 weights, bf16 products).
    autocast: bool,
}

impl ComputeWeights {
    fn decoder(&self, config: &ModelConfig) -> Result<Decoder> {
        Ok(Decoder::from_params(config.clone(), self.params.clone())?
            .with_bf16_linears(self.autocast))
    }
}

fn compute_weights(vars: &BTreeMap<String, Var>, dtype: DType) -> Result<ComputeWeights> {
    // candle's CPU matmul has no bf16 kernel; ours (bf16_linear) accumulates in f32.
    let autocast = dtype == DType::BF16 && vars.values().all(|v| v.device().is_cpu());
    let mut params = BTreeMap::new();
    for (name, var) in vars {
        // The cast is part of the graph, so gradients reach the f32 master weights.
        let t = if dtype == DType::F32 || autocast {
            var.as_tensor().clone()
        } else {
            var.as_tensor().to_dtype(dtype)?
        };
        params.insert(name.clone(), t);
    }
    Ok(ComputeWeights { params, autocast })
}

/// Master weights, optimizer and the objective's step: what one optimizer step needs. Shared
/// by `run` and the benchmark command, so the benchmark times the real step.
pub struct StepEngine<'a> {
    runner: Runner<'a>,
    model_config: ModelConfig,
    vars: BTreeMap<String, Var>,
    decays: BTreeMap<String, bool>,
    optimizer: AdamW,
    dtype: DType,
}

/// What one optimizer step did.
pub struct StepOutput {
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Objective metrics averaged over the step's targets or pairs.
    pub metrics: Vec<(&'static str, f64)>,
    /// Real (non-pad) tokens processed.
    pub tokens: usize,
    pub samples: usize,
    /// Seconds spent summing gradients and metrics across ranks (0 in a world of one).
    pub allreduce_seconds: f64,
    /// Seconds from the start of the step until the gradient norm was read back: forward,
    /// backward and the all-reduce (on a GPU the read waits for all of them); the clipping and
    /// the optimizer update come after.
    pub grads_ready_seconds: f64,
}

/// What one part of a micro-batch contributes to the step.
struct PartGrads {
    loss: f64,
    grads: BTreeMap<String, Tensor>,
    metric_sums: Vec<(&'static str, f64)>,
    tokens: usize,
}

impl<'a> StepEngine<'a> {
    fn new(runner: Runner<'a>, decoder: Decoder, dtype: DType) -> Result<Self> {
        let config = runner.config;
        let model_config = decoder.config().clone();
        let vars: BTreeMap<String, Var> = decoder
            .params()
            .iter()
            .map(|(n, t)| Ok((n.clone(), Var::from_tensor(&t.to_dtype(DType::F32)?)?)))
            .collect::<Result<_>>()?;
        let decays = parameter_specs(&model_config)
            .into_iter()
            .map(|s| (s.name, s.kind.decays()))
            .collect();
        let optimizer = AdamW::new(
            config.adam_beta1,
            config.adam_beta2,
            config.adam_epsilon,
            config.weight_decay,
        );
        Ok(StepEngine {
            runner,
            model_config,
            vars,
            decays,
            optimizer,
            dtype,
        })
    }

    /// The model over the current master weights, computing in `dtype`.
    pub fn decoder(&self, dtype: DType) -> Result<Decoder> {
        compute_decoder(&self.model_config, &self.vars, dtype)
    }

    /// Forward + backward over `micro_batches` (loss normalised over all of them), global-norm
    /// clipping and one AdamW update at `lr`. A non-finite loss or gradient is an error and
    /// leaves the weights untouched.
    pub fn step(
        &mut self,
        examples: &Examples,
        micro_batches: &[Vec<usize>],
        lr: f64,
    ) -> Result<StepOutput> {
        crate::pool::on_pool(|| self.step_here(examples, micro_batches, lr))
    }

    fn step_here(
        &mut self,
        examples: &Examples,
        micro_batches: &[Vec<usize>],
        lr: f64,
    ) -> Result<StepOutput> {
        let started = Instant::now();
        let genrm_counts = match examples {
            Examples::Genrm { .. } => examples.genrm_counts(micro_batches),
            _ => [0.0; 2],
        };
        // GenRM's micro losses come normalised per term; the others are sums over the step.
        let step_count: f64 = micro_batches
            .iter()
            .map(|b| self.runner.count(examples, b))
            .sum::<f64>()
            .max(1.0);
        // The weights in the compute dtype, cast once for every part of every micro-batch.
        let weights = compute_weights(&self.vars, self.dtype)?;
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_value = 0f64;
        let mut metric_sums: Vec<(&'static str, f64)> = Vec::new();
        let mut tokens = 0usize;
        let mut samples = 0usize;
        // `micro_batches` are the step's global batches (the same on every rank, so the counts
        // above are global); this rank computes its share of each, and the sums of the shares'
        // gradients and metrics across ranks are exactly what one process computes.
        let world = crate::dist::world();
        for batch in micro_batches {
            samples += batch.len();
            let share = crate::dist::share_of(batch, world.rank(), world.size());
            if share.is_empty() {
                continue;
            }
            let parts = self.local_parts(&share);
            let run = |p: &Vec<usize>| self.part(&weights, examples, p, step_count, genrm_counts);
            let results: Vec<Result<PartGrads>> =
                if parts.len() > 1 && rayon::current_num_threads() > 1 {
                    use rayon::prelude::*;
                    parts.par_iter().map(run).collect()
                } else {
                    parts.iter().map(run).collect()
                };
            // Summed in part order, whatever order the threads finished in.
            for part in results {
                let part = part?;
                loss_value += part.loss;
                for (name, g) in part.grads {
                    let sum = match grads.remove(&name) {
                        Some(acc) => (acc + g)?,
                        None => g,
                    };
                    grads.insert(name, sum);
                }
                if metric_sums.is_empty() {
                    metric_sums = part.metric_sums.iter().map(|(n, _)| (*n, 0.0)).collect();
                }
                for (acc, (_, v)) in metric_sums.iter_mut().zip(&part.metric_sums) {
                    acc.1 += v;
                }
                tokens += part.tokens;
            }
        }
        let mut allreduce_seconds = 0.0;
        // NCCL reduces even in a world of one (Communicator::runs_alone), so a one-GPU run under
        // the launcher variables times the same path as N GPUs.
        if world.size() > 1 || world.comm().runs_alone() {
            // On a GPU the backward pass may still be queued: wait for it, so the time below is
            // the collective's alone; the reduction itself ends in a wait for the same reason.
            self.runner.device.synchronize()?;
            let started = Instant::now();
            self.all_reduce(&mut grads, &mut loss_value, &mut tokens, &mut metric_sums)?;
            self.runner.device.synchronize()?;
            allreduce_seconds = started.elapsed().as_secs_f64();
        }
        let grad_norm = global_grad_norm(&grads)?;
        let grads_ready_seconds = started.elapsed().as_secs_f64();
        if !loss_value.is_finite() || !grad_norm.is_finite() {
            return Err(Error::invalid(format!(
                "non-finite loss ({loss_value}) or gradient norm ({grad_norm}) at step {}",
                self.optimizer.step + 1
            )));
        }
        clip_grad_norm(&mut grads, grad_norm, self.runner.config.max_grad_norm)?;
        let decays = &self.decays;
        self.optimizer.update(&self.vars, &grads, lr, |n| {
            decays.get(n).copied().unwrap_or(false)
        })?;
        Ok(StepOutput {
            loss: loss_value,
            grad_norm,
            metrics: metric_sums
                .into_iter()
                .map(|(n, v)| (n, v / step_count))
                .collect(),
            tokens,
            samples,
            allreduce_seconds,
            grads_ready_seconds,
        })
    }

    /// How this rank splits its share of a micro-batch: `cpu_parts` parts on the CPU (rows
    /// dealt out in turn, as ranks share a global batch) that run side by side on rayon's
    /// threads. For a small model a step is many small ops, and two half-batches on two threads
    /// lose far less time to each op's thread hand-offs than one batch whose every op is split
    /// over both. The split does not depend on the thread count (one thread runs the parts in
    /// turn), so a seed gives the same bits on any machine; the parts' sums differ from one
    /// pass's only in float summation order.
    fn local_parts(&self, share: &[usize]) -> Vec<Vec<usize>> {
        let n = self.runner.config.cpu_parts.min(share.len());
        if n > 1 && self.runner.device.is_cpu() {
            (0..n).map(|p| crate::dist::share_of(share, p, n)).collect()
        } else {
            vec![share.to_vec()]
        }
    }

    /// Forward and backward of one part of a micro-batch: its loss (normalised over the step),
    /// every parameter's gradient and its metric sums. Each part has its own decoder and
    /// gradient sink, so parts can run at once.
    fn part(
        &self,
        weights: &ComputeWeights,
        examples: &Examples,
        rows: &[usize],
        step_count: f64,
        genrm_counts: [f64; 2],
    ) -> Result<PartGrads> {
        // The embedding's and head's gradients are summed in place here, not in candle's store
        // (at Qwen2.5-0.5B that store's copies of the tied 545 MB embedding set the step's peak).
        let sink = GradSink::new();
        let decoder = weights
            .decoder(&self.model_config)?
            .with_grad_sink(sink.clone());
        let r = self
            .runner
            .micro(&decoder, examples, rows, "train", genrm_counts)?;
        let loss = (r.loss_sum / step_count)?;
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = loss.backward()?;
        let mut grads = BTreeMap::new();
        for (name, var) in &self.vars {
            let stored = match store.get(var.as_tensor()) {
                Some(g) => Some(g.to_dtype(DType::F32)?),
                None => None,
            };
            let g = match (stored, sink.take(var.as_tensor())) {
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            };
            if let Some(g) = g {
                grads.insert(name.clone(), g);
            }
        }
        if !sink.is_empty() {
            // Only parameters' gradients go to the sink, and all were just taken.
            return Err(Error::invalid(format!(
                "internal: {} gradients of non-parameters left in the gradient sink",
                sink.len()
            )));
        }
        Ok(PartGrads {
            loss: loss_value,
            grads,
            metric_sums: r.metric_sums,
            tokens: r.real_tokens,
        })
    }

    /// Sums this rank's gradients, loss, tokens and metric sums with the other ranks'. A rank
    /// whose share of the step was empty (a global batch smaller than the world) holds no
    /// gradients and no metric names: it adds zeros. A parameter no rank has a gradient for
    /// stays without one, as in a single process.
    fn all_reduce(
        &self,
        grads: &mut BTreeMap<String, Tensor>,
        loss: &mut f64,
        tokens: &mut usize,
        metric_sums: &mut Vec<(&'static str, f64)>,
    ) -> Result<()> {
        use crate::dist::ReduceOp;
        let comm = crate::dist::world().comm();
        let mut width = [metric_sums.len() as f64];
        comm.all_reduce_f64(&mut width, ReduceOp::Max)?;
        metric_sums.resize(width[0] as usize, ("", 0.0));
        let names: Vec<&String> = self.vars.keys().collect();
        let mut scalars = vec![*loss, *tokens as f64];
        scalars.extend(
            names
                .iter()
                .map(|n| f64::from(u8::from(grads.contains_key(*n)))),
        );
        scalars.extend(metric_sums.iter().map(|m| m.1));
        comm.all_reduce_f64(&mut scalars, ReduceOp::Sum)?;
        *loss = scalars[0];
        *tokens = scalars[1] as usize;
        for (name, present) in names.iter().zip(&scalars[2..]) {
            if *present > 0.0 && !grads.contains_key(*name) {
                let var = &self.vars[*name];
                grads.insert((*name).clone(), var.as_tensor().zeros_like()?);
            }
        }
        for (m, v) in metric_sums.iter_mut().zip(&scalars[2 + names.len()..]) {
            m.1 = *v;
        }
        crate::dist::all_reduce_gradients(comm, grads, crate::dist::DEFAULT_BUCKET_ELEMENTS)
    }
}

/// Times `steps` optimizer steps (after `warmup` untimed ones) of `config.objective` on the
/// first `config.batch_size` examples; returns each step's seconds. DPO uses zero reference
/// log-probs (the reference pass is not part of a step).
pub fn time_steps(
    config: &TrainConfig,
    decoder: Decoder,
    examples: &Examples,
    warmup: usize,
    steps: usize,
) -> Result<Vec<f64>> {
    Ok(
        time_steps_with_phases(config, decoder, examples, warmup, steps)?
            .into_iter()
            .map(|t| t.seconds)
            .collect(),
    )
}

/// Where one timed step's seconds went.
#[derive(Debug, Clone, Copy)]
pub struct StepTiming {
    /// The whole step, until the device has finished its last update.
    pub seconds: f64,
    /// The cross-rank all-reduce inside it.
    pub allreduce_seconds: f64,
    /// Forward, backward and all-reduce: until the gradients' norm was read back.
    pub grads_ready_seconds: f64,
}

impl StepTiming {
    /// Gradient clipping and the optimizer update.
    pub fn optimizer_seconds(&self) -> f64 {
        self.seconds - self.grads_ready_seconds
    }
}

/// As `time_steps`, with each step's phases. Under a launcher every rank times its share of the
/// same global batch. On a GPU the step's end waits for the queued update, so a step's seconds
/// are its own, not partly the next one's.
pub fn time_steps_with_phases(
    config: &TrainConfig,
    decoder: Decoder,
    examples: &Examples,
    warmup: usize,
    steps: usize,
) -> Result<Vec<StepTiming>> {
    let device = decoder.device().clone();
    let dtype = parse_dtype(&config.precision)?;
    let reference = BTreeMap::from([("train", vec![(0f32, 0f32); examples.len()])]);
    let runner = Runner::new(config, device.clone(), reference);
    let mut engine = StepEngine::new(runner, decoder, dtype)?;
    engine.optimizer.init_moments(&engine.vars)?;
    let batch: Vec<usize> = (0..config.batch_size.min(examples.len())).collect();
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        device.synchronize()?;
        let started = Instant::now();
        let out = engine.step(examples, std::slice::from_ref(&batch), 1e-5)?;
        device.synchronize()?;
        if i >= warmup {
            times.push(StepTiming {
                seconds: started.elapsed().as_secs_f64(),
                allreduce_seconds: out.allreduce_seconds,
                grads_ready_seconds: out.grads_ready_seconds,
            });
        }
    }
    Ok(times)
}

fn log_eval(
    metrics: &mut MetricsWriter,
    step: usize,
    epoch: usize,
    eval: &[(String, f64)],
) -> Result<()> {
    let refs: Vec<(&str, f64)> = eval.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    metrics.log(step, "eval", epoch, &refs)
}

/// Runs training (or evaluation only) as configured.
///
/// Under a launcher (dist), every rank runs this with the same config and data: each computes
/// its share of every global batch, and rank 0 alone writes the run directory.
pub fn run(config: &TrainConfig, inputs: TrainInputs) -> Result<RunSummary> {
    let world = crate::dist::world();
    let run_dir = config.run_dir();
    if !crate::dist::agree(run_fingerprint(config, &inputs))? {
        return Err(Error::invalid(format!(
            "{}the ranks disagree on the run: every rank must get the same config, flags and data",
            world.log_prefix()
        )));
    }
    if world.is_main() {
        std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
        crate::io::checkpoint::write_atomic(
            &run_dir.join("config.toml"),
            config.to_toml().as_bytes(),
        )?;
    }
    let device = crate::device::select()?;
    let dtype = parse_dtype(&config.precision)?;
    if inputs.train.is_empty() && !config.eval_only {
        return Err(Error::invalid(
            "no training examples left after selection and truncation",
        ));
    }

    let resume = config.resume_from_checkpoint.clone();
    let start_dir = resume.clone().unwrap_or_else(|| config.model.clone());
    let decoder = load_start(config, &start_dir, inputs.pad_id, &device)?;
    let reference = if config.objective == Objective::Dpo {
        reference_logprobs(config, &inputs, &run_dir, &device)?
    } else {
        BTreeMap::new()
    };
    let runner = Runner {
        pad_id: inputs.pad_id,
        verdict_ids: inputs.verdict_ids,
        stop_ids: inputs.stop_ids.clone(),
        win_rate: super::win_rate_eval::WinRateEval::new(
            config,
            &inputs.win_rate_prompts,
            &device,
        )?,
        ..Runner::new(config, device.clone(), reference)
    };

    if config.eval_only {
        let mut metrics = MetricsWriter::open(&run_dir, None)?;
        let eval = runner.evaluate(&decoder, &inputs.eval, "eval", None)?;
        log_eval(&mut metrics, 0, 0, &eval)?;
        return Ok(RunSummary {
            run_dir,
            final_dir: None,
            steps: 0,
            train_losses: vec![],
            eval_metrics: eval,
        });
    }

    let mut engine = StepEngine::new(runner, decoder, dtype)?;
    let mut state = TrainerState {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        samples_seen: 0,
        seed: config.seed,
        objective: config.objective.name().into(),
        batch_size: Some(config.batch_size),
        accumulate_grad_batches: Some(config.accumulate_grad_batches),
        world_size: Some(world.size()),
    };
    if let Some(dir) = &resume {
        state = load_checkpoint_state(dir, &mut engine.optimizer, &device)?;
        if state.objective != config.objective.name() {
            return Err(Error::file(
                dir,
                format!(
                    "checkpoint is from a `{}` run, not `{}`",
                    state.objective,
                    config.objective.name()
                ),
            ));
        }
        // The data cursor counts global batches: it carries over to any world size, but only
        // with the same global batch (the epoch plans depend on it).
        for (name, saved, now) in [
            ("--batch-size", state.batch_size, config.batch_size),
            (
                "--accumulate-grad-batches",
                state.accumulate_grad_batches,
                config.accumulate_grad_batches,
            ),
        ] {
            if saved.is_some_and(|saved| saved != now) {
                return Err(Error::file(
                    dir,
                    format!(
                        "the checkpoint's data cursor counts global batches of {name} {}; resume with the same {name} (the world size may change), not {now}",
                        saved.unwrap_or_default()
                    ),
                ));
            }
        }
        state.batch_size = Some(config.batch_size);
        state.accumulate_grad_batches = Some(config.accumulate_grad_batches);
        state.world_size = Some(world.size());
        tracing::info!("resumed from {} at step {}", dir.display(), state.step);
    }
    // After the resume, so a resumed run never holds zero moments beside the loaded ones.
    engine.optimizer.init_moments(&engine.vars)?;
    let mut metrics = MetricsWriter::open(&run_dir, resume.as_ref().map(|_| state.step))?;

    let micro_per_step = config.accumulate_grad_batches;
    let batches_per_epoch = plan_epoch(
        &inputs.train,
        config.batch_size,
        config.group_by_length,
        config.seed,
        0,
    )
    .len();
    let total_steps = config
        .max_steps
        .unwrap_or((batches_per_epoch * config.max_epochs).div_ceil(micro_per_step))
        .max(1);
    let warmup = if config.warmup_steps > 0 {
        config.warmup_steps
    } else {
        (config.warmup_ratio * total_steps as f64).ceil() as usize
    };
    let lr_peak = config.learning_rate();

    if state.step == 0 && config.num_sanity_val_steps > 0 && !inputs.eval.is_empty() {
        let d = engine.decoder(dtype)?;
        let sanity =
            engine
                .runner
                .evaluate(&d, &inputs.eval, "eval", Some(config.num_sanity_val_steps))?;
        tracing::info!("sanity validation: {sanity:?}");
    }

    let progress = indicatif::ProgressBar::new(total_steps as u64);
    if !world.is_main() {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    progress.set_position(state.step as u64);

    let mut plan = plan_epoch(
        &inputs.train,
        config.batch_size,
        config.group_by_length,
        config.seed,
        state.epoch,
    );
    let mut train_losses = Vec::new();
    let mut eval_metrics = Vec::new();
    let mut evaluated_at = None;
    let mut last_checkpoint: Option<PathBuf> = None;
    while state.step < total_steps {
        let started = Instant::now();
        // Gather this step's micro-batches, crossing into the next epoch when one ends.
        let mut micro_batches = Vec::with_capacity(micro_per_step);
        while micro_batches.len() < micro_per_step {
            if state.batch_in_epoch >= plan.len() {
                state.epoch += 1;
                state.batch_in_epoch = 0;
                plan = plan_epoch(
                    &inputs.train,
                    config.batch_size,
                    config.group_by_length,
                    config.seed,
                    state.epoch,
                );
            }
            micro_batches.push(plan[state.batch_in_epoch].clone());
            state.batch_in_epoch += 1;
        }
        let lr = lr_peak * lr_multiplier(config.lr_scheduler, state.step, warmup, total_steps);
        let out = engine
            .step(&inputs.train, &micro_batches, lr)
            .map_err(|e| {
                let kept = last_checkpoint
                    .as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string());
                Error::invalid(format!("{e}; last good checkpoint: {kept}"))
            })?;
        state.samples_seen += out.samples;
        state.step += 1;
        let seconds = started.elapsed().as_secs_f64();
        let tokens_per_s = out.tokens as f64 / seconds;
        train_losses.push((state.step, out.loss));
        progress.set_position(state.step as u64);
        progress.set_message(format!("loss {:.4} · {tokens_per_s:.0} tok/s", out.loss));
        if state.step.is_multiple_of(config.log_every_n_steps.max(1)) || state.step == total_steps {
            let mut row: Vec<(&str, f64)> = vec![
                ("loss", out.loss),
                ("learning_rate", lr),
                ("grad_norm", out.grad_norm),
                ("tokens_per_s", tokens_per_s),
            ];
            if !matches!(config.objective, Objective::Sft | Objective::Pretrain) {
                row.extend(out.metrics.iter().copied());
            }
            metrics.log(state.step, "train", state.epoch, &row)?;
        }
        let epoch_boundary = state.batch_in_epoch >= plan.len();
        let by_steps = config
            .val_check_interval
            .is_some_and(|n| n > 0 && state.step.is_multiple_of(n));
        let by_epoch = epoch_boundary
            && config
                .check_val_every_n_epoch
                .is_some_and(|n| n > 0 && (state.epoch + 1).is_multiple_of(n));
        if (by_steps || by_epoch) && !inputs.eval.is_empty() {
            let d = engine.decoder(dtype)?;
            eval_metrics = engine.runner.evaluate(&d, &inputs.eval, "eval", None)?;
            log_eval(&mut metrics, state.step, state.epoch, &eval_metrics)?;
            evaluated_at = Some(state.step);
        }
        if config
            .checkpoint_frequency
            .is_some_and(|n| n > 0 && state.step.is_multiple_of(n))
        {
            last_checkpoint = Some(if world.is_main() {
                let d = engine.decoder(DType::F32)?;
                save_checkpoint(
                    &run_dir,
                    &d,
                    &inputs.tokenizer_dir,
                    &engine.optimizer,
                    &state,
                    config.ckpt_to_keep,
                )?
            } else {
                super::checkpoint::checkpoint_dir(&run_dir, state.step)
            });
        }
    }
    progress.finish_and_clear();
    let final_decoder = engine.decoder(DType::F32)?;
    if evaluated_at != Some(state.step) && !inputs.eval.is_empty() {
        eval_metrics = engine
            .runner
            .evaluate(&final_decoder, &inputs.eval, "eval", None)?;
        log_eval(&mut metrics, state.step, state.epoch, &eval_metrics)?;
    }
    let final_dir = run_dir.join("final");
    if world.is_main() {
        save_model(
            &final_decoder,
            Some(&inputs.tokenizer_dir),
            &final_dir,
            DType::F32,
        )?;
    }
    Ok(RunSummary {
        run_dir,
        final_dir: Some(final_dir),
        steps: state.step,
        train_losses,
        eval_metrics,
    })
}

/// What every rank of one run must agree on: the resolved config and the tokenized data's
/// shape (52 bits of a SHA-256).
fn run_fingerprint(config: &TrainConfig, inputs: &TrainInputs) -> u64 {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(config.to_toml().as_bytes());
    for examples in [&inputs.train, &inputs.eval] {
        hash.update((examples.len() as u64).to_le_bytes());
        for i in 0..examples.len() {
            hash.update((examples.length(i) as u64).to_le_bytes());
        }
    }
    let digest = hash.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::{normalized_edit_distance, plan_epoch, Examples};
    use crate::data::TokenizedSequence;

    mod parts {
        use std::collections::BTreeMap;
        use std::path::Path;

        use candle_core::{DType, Device, Tensor};

        use super::super::{Examples, Runner, StepEngine, TrainConfig};
        use crate::data::TokenizedSequence;
        use crate::model::test_tensors::max_abs_diff;
        use crate::model::{init::random_params, Decoder, ModelConfig};

        fn config() -> ModelConfig {
            let raw = serde_json::json!({
                "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 97,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "tie_word_embeddings": true
            });
            ModelConfig::from_value(raw, Path::new("test")).unwrap()
        }

        /// Six SFT rows of different lengths, targets on their second half.
        fn rows() -> Examples {
            Examples::Sequences(
                (0..6)
                    .map(|r| {
                        let n = 9 + 3 * r;
                        TokenizedSequence {
                            input_ids: (0..n).map(|i| ((i * 7 + r * 13) % 97) as u32).collect(),
                            targets: (0..n).map(|i| i >= n / 2).collect(),
                        }
                    })
                    .collect(),
            )
        }

        fn engine(config: &TrainConfig) -> StepEngine<'_> {
            let model = config_decoder();
            let runner = Runner::new(config, Device::Cpu, BTreeMap::new());
            StepEngine::new(runner, model, DType::F32).unwrap()
        }

        fn config_decoder() -> Decoder {
            let c = config();
            let params = random_params(&c, 5, DType::F32, &Device::Cpu).unwrap();
            Decoder::from_params(c, params).unwrap()
        }

        fn weights(e: &StepEngine) -> Vec<(String, Vec<u32>)> {
            e.vars
                .iter()
                .map(|(n, v)| {
                    let bits = v
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    (n.clone(), bits.into_iter().map(f32::to_bits).collect())
                })
                .collect()
        }

        /// With `cpu_parts = 2` each micro-batch runs in two parts; the split, and so every
        /// bit of the step, is the same whether one thread or two run it. The default runs
        /// whole batches.
        #[test]
        fn a_step_gives_the_same_bits_on_one_thread_and_on_two() {
            let config = TrainConfig {
                cpu_parts: 2,
                ..Default::default()
            };
            let examples = rows();
            let batch = vec![(0..6).collect::<Vec<usize>>()];
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let default = TrainConfig::default();
                    assert_eq!(engine(&default).local_parts(&batch[0]).len(), 1);
                    let mut e = engine(&config);
                    assert_eq!(e.local_parts(&batch[0]).len(), 2);
                    let out = e.step(&examples, &batch, 1e-3).unwrap();
                    (out.loss.to_bits(), out.grad_norm.to_bits(), weights(&e))
                })
            };
            assert!(run(1) == run(2));
        }

        /// The parts' gradients sum to the whole batch's (float summation order aside), with
        /// the loss normalised over the whole step's targets.
        #[test]
        fn the_parts_sum_to_the_whole_batch() {
            let config = TrainConfig {
                cpu_parts: 2,
                ..Default::default()
            };
            let examples = rows();
            let e = engine(&config);
            let share: Vec<usize> = (0..6).collect();
            let step_count = e.runner.count(&examples, &share);
            let w = super::super::compute_weights(&e.vars, DType::F32).unwrap();
            let whole = e.part(&w, &examples, &share, step_count, [0.0; 2]).unwrap();
            let parts = e.local_parts(&share);
            assert_eq!(parts, vec![vec![0, 2, 4], vec![1, 3, 5]]);
            let a = e
                .part(&w, &examples, &parts[0], step_count, [0.0; 2])
                .unwrap();
            let b = e
                .part(&w, &examples, &parts[1], step_count, [0.0; 2])
                .unwrap();
            assert!((a.loss + b.loss - whole.loss).abs() < 1e-6 * whole.loss.abs());
            assert_eq!(a.tokens + b.tokens, whole.tokens);
            assert_eq!(whole.grads.len(), e.vars.len());
            for (name, g) in &whole.grads {
                let sum: Tensor = (&a.grads[name] + &b.grads[name]).unwrap();
                let diff = max_abs_diff(&sum, g);
                let scale = max_abs_diff(g, &g.zeros_like().unwrap());
                assert!(
                    diff <= 1e-5 * scale + 1e-9,
                    "{name}: {diff} (scale {scale})"
                );
            }
        }
    }

    /// 400 rows of 4 lengths, in blocks of one length (as a file sorted by difficulty is).
    fn rows_of_four_lengths() -> Examples {
        Examples::Sequences(
            (0..400)
                .map(|i| TokenizedSequence {
                    input_ids: vec![1; 10 + 10 * (i / 100)],
                    targets: vec![true; 10 + 10 * (i / 100)],
                })
                .collect(),
        )
    }

    #[test]
    fn default_batches_mix_lengths_and_grouped_batches_do_not() {
        let rows = rows_of_four_lengths();
        let distinct = |b: &Vec<usize>| {
            let mut l: Vec<usize> = b.iter().map(|&i| rows.length(i)).collect();
            l.sort();
            l.dedup();
            l.len()
        };
        let mixed = plan_epoch(&rows, 16, false, 7, 0);
        let grouped = plan_epoch(&rows, 16, true, 7, 0);
        for plan in [&mixed, &grouped] {
            let mut all: Vec<usize> = plan.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(
                all,
                (0..400).collect::<Vec<_>>(),
                "every row once per epoch"
            );
        }
        // A random batch of 16 from 4 equal groups holds one length with odds ~4·4^-16.
        assert!(mixed.iter().all(|b| distinct(b) >= 2));
        // Sorted within chunks of 50 batches: at most one length change per batch.
        assert!(grouped.iter().all(|b| distinct(b) <= 2));
        assert_ne!(
            mixed,
            plan_epoch(&rows, 16, false, 7, 1),
            "reshuffled per epoch"
        );
    }

    #[test]
    fn edit_distance_by_hand() {
        assert_eq!(normalized_edit_distance(&[1, 2, 3], &[1, 2, 3]), 0.0);
        // kitten → sitting: 3 edits over 7.
        let kitten = [10, 8, 19, 19, 4, 13];
        let sitting = [18, 8, 19, 19, 8, 13, 6];
        assert!((normalized_edit_distance(&kitten, &sitting) - 3.0 / 7.0).abs() < 1e-12);
        assert_eq!(normalized_edit_distance(&[], &[5, 6]), 1.0);
        assert_eq!(normalized_edit_distance(&[], &[]), 0.0);
    }
}
