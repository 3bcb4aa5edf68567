//! GenRM verification (Zhang et al. 2024): the score of a solution is p(Yes) read from the
//! verifier's next-token distribution after "Is the answer correct (Yes/No)?".
//!
//! - Direct: the inputs already end with the question; one forward pass.
//! - CoT: K rationales are sampled after the inputs (the prompt's cache is computed once and
//!   forked), each ends at the question (appended when the rationale runs out of tokens
//!   first), and p(Yes) is read after it; the score is the mean over the K rationales.
//! - Adaptive K: rationales come in batches of `k_step` from `k_min` up to `k_max`; after each
//!   batch the population variance of all p values so far is compared with τ and sampling stops
//!   below it. Sample streams are seeded by (seed, item, sample index), so an adaptive run uses
//!   a prefix of the rationales a fixed K = k_max run would use.
//!
//! p(Yes) is normalised over the two answers by default, `P(Yes) / (P(Yes) + P(No))`, reading
//! the first token of " Yes" and of " No" (leading space, as in genrm-critiques); `raw_p_yes`
//! gives the unnormalised probability instead.
//!
//! In a multi-process job each round's generation groups and reads are dealt out across the
//! ranks (dist::shard) and gathered on every rank, so every rank follows the same adaptive
//! rounds and the verdicts equal the single-process ones bit for bit.

use super::generate::{generate_sharded, FinishReason, GenerateOptions, Prompt};
use super::sampler::{probabilities, SamplingParams};
use crate::error::{Error, Result};
use crate::io::Tokenizer;
use crate::model::Decoder;

/// The question whose answer is the verdict.
pub const VERDICT_QUESTION: &str = "Is the answer correct (Yes/No)?";
/// What a CoT rationale that runs out of tokens gets appended before reading the verdict.
pub const APPENDED_QUESTION: &str = "\nVerification: Is the answer correct (Yes/No)?";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Cot,
}

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub mode: Mode,
    pub k_min: usize,
    pub k_step: usize,
    pub k_max: usize,
    pub var_threshold: f64,
    /// Sampling of the rationales (max_new_tokens bounds a rationale).
    pub params: SamplingParams,
    pub seed: u64,
    pub raw_p_yes: bool,
    /// Rationales decoded together.
    pub batch_size: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            mode: Mode::Cot,
            k_min: 8,
            k_step: 8,
            k_max: 32,
            var_threshold: 0.05,
            params: SamplingParams {
                temperature: 1.0,
                max_new_tokens: 256,
                ..Default::default()
            },
            seed: 0,
            raw_p_yes: false,
            batch_size: 32,
        }
    }
}

/// How a (question, solution) pair is laid out for the verifier; it must match training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The genrm-critiques release: its instruction header, `Q: …\nA: Let's think step by
    /// step.\n…`, then the verification cue.
    Critiques,
    /// The quickstart world's compact `Q: …\nA: …\n` layout (see `synth`).
    Terse,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "critiques" => Ok(Format::Critiques),
            "terse" => Ok(Format::Terse),
            other => Err(Error::invalid(format!(
                "unknown verifier format `{other}` (critiques or terse)"
            ))),
        }
    }
}

/// The instruction header of the genrm-critiques rows (their exact text, so that a verifier
/// trained on that release sees what it was trained on).
pub const CRITIQUES_HEADER: &str = "Solve the math problems and provide step-by-step solutions, ending with \"The answer is [Insert Final Answer Here]\".\nWhen asked \"Verification: Is the answer correct (Yes/No)?\", respond with \" Yes\" or \" No\" based on the answer's correctness.\nWhen asked \"Verification: Let's verify step by step.\", verify every step of the solution and conclude with \"Verification: Is the answer correct (Yes/No)?\" followed by \" Yes\" or \" No\".\n\n";
/// The CoT cue that ends verifier inputs.
pub const COT_CUE: &str = "Verification: Let's verify step by step.\n";
/// The Direct cue that ends verifier inputs.
pub const DIRECT_CUE: &str = "Verification: Is the answer correct (Yes/No)?";

/// Verifier input text for a (question, solution) pair.
pub fn format_inputs(question: &str, solution: &str, mode: Mode, format: Format) -> String {
    match format {
        Format::Critiques => {
            let cue = if mode == Mode::Cot {
                COT_CUE
            } else {
                DIRECT_CUE
            };
            format!(
                "{CRITIQUES_HEADER}Q: {question}\nA: Let's think step by step.\n{}\n{cue}",
                solution.trim_end()
            )
        }
        Format::Terse => match mode {
            Mode::Cot => crate::synth::critique::verify_inputs(question, solution),
            Mode::Direct => crate::synth::critique::direct_inputs(question, solution),
        },
    }
}

/// Switches genrm `inputs` between the CoT and the Direct cue, as `mode` asks.
pub fn with_cue(inputs: &str, mode: Mode) -> String {
    match mode {
        Mode::Cot if inputs.ends_with(DIRECT_CUE) => {
            format!("{}{COT_CUE}", &inputs[..inputs.len() - DIRECT_CUE.len()])
        }
        Mode::Direct if inputs.ends_with(COT_CUE) => {
            format!("{}{DIRECT_CUE}", &inputs[..inputs.len() - COT_CUE.len()])
        }
        _ => inputs.to_string(),
    }
}

/// The Yes/No label that ends genrm `targets`, if any.
pub fn label_of_targets(targets: &str) -> Option<bool> {
    let t = targets.trim_end().trim_end_matches('.');
    if t.ends_with("Yes") {
        Some(true)
    } else if t.ends_with("No") {
        Some(false)
    } else {
        None
    }
}

/// One verified item.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    /// Mean p(Yes) over the rationales.
    pub score: f64,
    /// Rationales used.
    pub k: usize,
    /// Population variance of the p values.
    pub variance: f64,
    pub p_yes: Vec<f64>,
    /// Rationale tokens sampled for this item (0 for Direct).
    #[serde(skip)]
    pub tokens: usize,
    /// Tokens of each rationale, in sample order.
    #[serde(skip)]
    pub rationale_tokens: Vec<usize>,
}

impl Verdict {
    /// The verdict an adaptive run (batches of `k_step` from `k_min`, stop below τ) would
    /// reach from the same rationale streams: a prefix of these p values.
    pub fn adaptive_prefix(&self, k_min: usize, k_step: usize, var_threshold: f64) -> Verdict {
        let mut k = k_min.min(self.p_yes.len());
        while !should_stop(&self.p_yes[..k], self.p_yes.len(), var_threshold) {
            k = (k + k_step).min(self.p_yes.len());
        }
        let p = self.p_yes[..k].to_vec();
        let rationale_tokens: Vec<usize> = self.rationale_tokens.iter().take(k).copied().collect();
        Verdict {
            score: p.iter().sum::<f64>() / k.max(1) as f64,
            k,
            variance: population_variance(&p),
            tokens: rationale_tokens.iter().sum(),
            rationale_tokens,
            p_yes: p,
        }
    }
}

/// The verdict token ids: the first token of " Yes" and of " No".
pub fn verdict_ids(tokenizer: &Tokenizer) -> Result<(u32, u32)> {
    let first = |s: &str| -> Result<u32> {
        tokenizer
            .encode(s, false)?
            .first()
            .copied()
            .ok_or_else(|| Error::invalid(format!("the tokenizer encodes {s:?} to nothing")))
    };
    let (yes, no) = (first(" Yes")?, first(" No")?);
    if yes == no {
        return Err(Error::invalid(
            "\" Yes\" and \" No\" start with the same token: p(Yes) cannot be read",
        ));
    }
    Ok((yes, no))
}

/// p(Yes) from next-token logits.
pub fn p_yes(logits: &[f32], yes: u32, no: u32, raw: bool) -> f64 {
    let p = probabilities(logits, 1.0);
    let (y, n) = (p[yes as usize], p[no as usize]);
    if raw {
        y
    } else if y + n > 0.0 {
        y / (y + n)
    } else {
        0.5
    }
}

/// Population variance (divide by k).
pub fn population_variance(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64
}

/// The adaptive stopping rule: after a batch, stop when the variance of all p values so far is
/// below τ, or when k_max is reached.
pub fn should_stop(p_values: &[f64], k_max: usize, var_threshold: f64) -> bool {
    p_values.len() >= k_max || population_variance(p_values) < var_threshold
}

/// Area under the ROC curve of scores for positives vs negatives (Mann–Whitney U; ties count
/// ½). `None` when either class is empty.
pub fn auc(scored: &[(f64, bool)]) -> Option<f64> {
    let positives: Vec<f64> = scored.iter().filter(|s| s.1).map(|s| s.0).collect();
    let negatives: Vec<f64> = scored.iter().filter(|s| !s.1).map(|s| s.0).collect();
    if positives.is_empty() || negatives.is_empty() {
        return None;
    }
    let mut wins = 0f64;
    for p in &positives {
        for n in &negatives {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    Some(wins / (positives.len() * negatives.len()) as f64)
}

/// Verifies items given as verifier input texts (each ending with "Let's verify step by
/// step.\n" for CoT, or with the verdict question for Direct). `items[i]` is seeded as item i.
pub fn verify(
    decoder: &Decoder,
    tokenizer: &Tokenizer,
    items: &[String],
    options: &VerifyOptions,
) -> Result<Vec<Verdict>> {
    verify_items(
        decoder,
        tokenizer,
        items,
        &(0..items.len() as u64).collect::<Vec<_>>(),
        options,
    )
}

/// As [`verify`], with explicit item seeds (so a candidate keeps its rationales wherever it
/// appears).
pub fn verify_items(
    decoder: &Decoder,
    tokenizer: &Tokenizer,
    items: &[String],
    seeds: &[u64],
    options: &VerifyOptions,
) -> Result<Vec<Verdict>> {
    let (yes, no) = verdict_ids(tokenizer)?;
    let prompts: Vec<Vec<u32>> = items
        .iter()
        .map(|t| tokenizer.encode(t, false))
        .collect::<Result<_>>()?;
    let max_positions = decoder.config().max_position_embeddings;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::invalid(format!("verify item {i} is empty")));
        }
        if p.len() >= max_positions {
            return Err(Error::invalid(format!(
                "verify item {i} has {} tokens; the verifier's context is {max_positions}",
                p.len()
            )));
        }
    }
    if options.mode == Mode::Direct {
        let p_values = p_yes_of_last_tokens(decoder, &prompts, (yes, no), options)?;
        return Ok(p_values
            .into_iter()
            .map(|p| Verdict {
                score: p,
                k: 1,
                variance: 0.0,
                p_yes: vec![p],
                tokens: 0,
                rationale_tokens: vec![0],
            })
            .collect());
    }
    if options.k_min == 0 || options.k_step == 0 || options.k_max < options.k_min {
        return Err(Error::invalid("need 1 ≤ k_min ≤ k_max and k_step ≥ 1"));
    }
    let question = tokenizer.encode(APPENDED_QUESTION, false)?;
    let mut p_values: Vec<Vec<f64>> = vec![Vec::new(); items.len()];
    let mut tokens: Vec<Vec<usize>> = vec![Vec::new(); items.len()];
    let mut active: Vec<usize> = (0..items.len()).collect();
    let mut params = options.params.clone();
    params.stop_strings = vec![VERDICT_QUESTION.to_string()];
    let gen_options = GenerateOptions {
        params,
        seed: options.seed,
        stop_ids: tokenizer.stop_token_ids.clone(),
        batch_size: options.batch_size,
        tokenizer: Some(tokenizer),
        capture_after_stop: Some(vec![yes, no]),
    };
    while !active.is_empty() {
        let batch: Vec<Prompt> = active
            .iter()
            .map(|&i| {
                let done = p_values[i].len();
                let want = if done == 0 {
                    options.k_min
                } else {
                    options.k_step.min(options.k_max - done)
                };
                Prompt {
                    ids: prompts[i].clone(),
                    item: seeds[i],
                    n: want,
                    first_sample: done,
                }
            })
            .collect();
        let completions = generate_sharded(decoder, &batch, &gen_options)?;
        // A rationale that reached the verdict question carries p(Yes)/p(No) from the step
        // after it; the others are closed with the question and read in one batched pass.
        let mut reads = Vec::new();
        let mut read_rows = Vec::new();
        let mut values: Vec<Option<f64>> = vec![None; completions.len()];
        for (j, c) in completions.iter().enumerate() {
            let item = active[c.prompt];
            tokens[item].push(c.ids.len());
            if let Some(probs) = &c.captured {
                let (y, n) = (probs[0], probs[1]);
                values[j] = Some(if options.raw_p_yes {
                    y
                } else if y + n > 0.0 {
                    y / (y + n)
                } else {
                    0.5
                });
                continue;
            }
            let mut ids = prompts[item].clone();
            let mut rationale = c.ids.clone();
            let reached_question = c.stop_string.is_some();
            if c.finish_reason == FinishReason::Stop && !reached_question {
                rationale.pop(); // the end-of-sequence token
            }
            ids.extend(rationale);
            if !reached_question {
                ids.extend_from_slice(&question);
            }
            ids.truncate(max_positions);
            reads.push(ids);
            read_rows.push(j);
        }
        let read_values = p_yes_of_last_tokens(decoder, &reads, (yes, no), options)?;
        for (&j, p) in read_rows.iter().zip(read_values) {
            values[j] = Some(p);
        }
        for (c, v) in completions.iter().zip(values) {
            p_values[active[c.prompt]].push(v.expect("every rationale was read"));
        }
        active.retain(|&i| !should_stop(&p_values[i], options.k_max, options.var_threshold));
    }
    Ok(p_values
        .into_iter()
        .zip(tokens)
        .map(|(p, rationale_tokens)| Verdict {
            score: p.iter().sum::<f64>() / p.len() as f64,
            k: p.len(),
            variance: population_variance(&p),
            p_yes: p,
            tokens: rationale_tokens.iter().sum(),
            rationale_tokens,
        })
        .collect())
}

/// p(Yes) at the last token of each sequence, read in batches of `options.batch_size`; in a
/// multi-process job the batches are dealt out across the ranks (each computed as one process
/// computes it) and the values gathered on every rank, in order.
fn p_yes_of_last_tokens(
    decoder: &Decoder,
    sequences: &[Vec<u32>],
    (yes, no): (u32, u32),
    options: &VerifyOptions,
) -> Result<Vec<f64>> {
    let chunks: Vec<&[Vec<u32>]> = sequences.chunks(options.batch_size.max(1)).collect();
    let per_chunk = crate::dist::all_map(chunks.len(), |c| {
        let logits = decoder.last_token_outputs(chunks[c], 0, options.batch_size)?;
        Ok(logits
            .iter()
            .map(|l| p_yes(l, yes, no, options.raw_p_yes))
            .collect::<Vec<f64>>())
    })?;
    Ok(per_chunk.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopping_rule() {
        // 8 agreeing rationales: variance 0 < τ, stop at k_min.
        assert!(should_stop(&[0.9; 8], 32, 0.05));
        // Split verdicts: variance 0.2025 ≥ τ, go on until k_max.
        let split: Vec<f64> = (0..8)
            .map(|i| if i % 2 == 0 { 0.95 } else { 0.05 })
            .collect();
        assert!((population_variance(&split) - 0.2025).abs() < 1e-12);
        assert!(!should_stop(&split, 32, 0.05));
        let split32: Vec<f64> = (0..32)
            .map(|i| if i % 2 == 0 { 0.95 } else { 0.05 })
            .collect();
        assert!(should_stop(&split32, 32, 0.05));
        // The threshold is strict: variance equal to τ does not stop.
        assert!(!should_stop(&[0.0, 1.0], 32, 0.25));
    }

    #[test]
    fn adaptive_prefix_replays_the_stopping_rule() {
        let confident = Verdict {
            score: 0.9,
            k: 32,
            variance: 0.0,
            p_yes: vec![0.9; 32],
            tokens: 320,
            rationale_tokens: vec![10; 32],
        };
        let a = confident.adaptive_prefix(8, 8, 0.05);
        assert_eq!((a.k, a.tokens), (8, 80));
        let split: Vec<f64> = (0..32)
            .map(|i| if i % 2 == 0 { 0.95 } else { 0.05 })
            .collect();
        let unsure = Verdict {
            score: 0.5,
            k: 32,
            variance: 0.2025,
            p_yes: split,
            tokens: 320,
            rationale_tokens: vec![10; 32],
        };
        assert_eq!(unsure.adaptive_prefix(8, 8, 0.05).k, 32);
    }

    #[test]
    fn cues_and_labels() {
        let cot = format!("Q: 1+1=?\nA: 1+1=2 #### 2\n{COT_CUE}");
        let direct = with_cue(&cot, Mode::Direct);
        assert!(direct.ends_with(DIRECT_CUE));
        assert_eq!(with_cue(&direct, Mode::Cot), cot);
        assert_eq!(
            label_of_targets("...\nVerification: Is the answer correct (Yes/No)? Yes"),
            Some(true)
        );
        assert_eq!(label_of_targets(" No"), Some(false));
        assert_eq!(label_of_targets("maybe"), None);
    }

    #[test]
    fn auc_counts_ties_as_half() {
        let scored = [(0.9, true), (0.4, true), (0.4, false), (0.1, false)];
        // pairs: (0.9>0.4)=1, (0.9>0.1)=1, (0.4=0.4)=0.5, (0.4>0.1)=1 → 3.5/4
        assert_eq!(auc(&scored), Some(0.875));
        assert_eq!(auc(&[(0.5, true)]), None);
    }

    #[test]
    fn p_yes_normalises_over_the_two_answers() {
        let logits = [0.0f32, (3f32).ln(), 0.0, 0.0];
        assert!((p_yes(&logits, 1, 2, false) - 0.75).abs() < 1e-6);
        assert!((p_yes(&logits, 1, 2, true) - 0.5).abs() < 1e-6);
    }
}
