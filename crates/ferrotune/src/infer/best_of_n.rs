//! Best-of-N with a GenRM verifier: sample N solutions per problem from the policy, score each
//! distinct candidate with the verifier, and report accuracy of the first sample, the majority
//! answer, the verifier's argmax and its weighted vote (sum of scores per distinct final
//! answer, as the GenRM paper reports), with fixed K and adaptive K, and the tokens spent.
//!
//! Adaptive K is evaluated on the same rationale streams as fixed K (each stream is seeded by
//! (seed, candidate, sample index)), so its verdict is the prefix of the fixed-K p values at
//! which the stopping rule fires — exactly what an adaptive run samples, at no extra cost.
//!
//! In a multi-process job the policy's generation groups and the verifier's batches are dealt
//! out across the ranks and gathered on every rank (dist::shard): the report equals the
//! single-process one.

use std::collections::HashMap;

use serde::Serialize;

use super::generate::{generate_sharded, GenerateOptions, Prompt};
use super::sampler::SamplingParams;
use super::verify::{auc, format_inputs, verify_items, Format, Mode, Verdict, VerifyOptions};
use crate::data::{extract_answer, Encoder, Message};
use crate::error::Result;
use crate::io::Tokenizer;
use crate::model::Decoder;

pub struct BestOfNOptions {
    pub n: usize,
    pub policy_params: SamplingParams,
    pub seed: u64,
    pub batch_size: usize,
    /// Fixed K is `verify.k_max`; adaptive uses `k_min`, `k_step`, `var_threshold`.
    pub verify: VerifyOptions,
    pub format: Format,
}

#[derive(Debug, Clone, Serialize)]
pub struct KReport {
    pub k: f64,
    pub accuracy: f64,
    pub weighted_vote_accuracy: f64,
    pub verifier_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BestOfNReport {
    pub n: usize,
    pub problems: usize,
    pub first_sample_accuracy: f64,
    pub majority_vote_accuracy: f64,
    pub pass_at_n: f64,
    pub fixed: KReport,
    pub adaptive: KReport,
    pub policy_tokens: usize,
    /// AUC of the fixed-K score separating correct from incorrect distinct candidates.
    pub verifier_auc: Option<f64>,
    /// Distinct candidates verified (out of problems × n samples).
    pub distinct_candidates: usize,
    /// Per problem: (accuracy-relevant) details for plots and debugging.
    #[serde(skip)]
    pub per_problem: Vec<ProblemResult>,
}

/// One problem's distinct candidates with their fixed-K verdicts (for compute/accuracy curves).
#[derive(Debug, Clone)]
pub struct ProblemResult {
    pub candidates: Vec<Candidate>,
}

#[derive(Debug, Clone)]
pub struct Candidate {
    pub text: String,
    pub answer: Option<f64>,
    pub correct: bool,
    /// How many of the N samples were this text.
    pub count: usize,
    /// Index of its first sample (argmax ties go to the earliest sample).
    pub first_sample: usize,
    pub verdict: Verdict,
}

impl ProblemResult {
    /// Whether picking by `score` (argmax over samples, or summed score per answer) is right.
    pub fn picks_correctly(&self, score: impl Fn(&Candidate) -> f64, weighted_vote: bool) -> bool {
        if weighted_vote {
            let votes: Vec<(Option<f64>, f64)> = self
                .candidates
                .iter()
                .map(|c| (c.answer, score(c) * c.count as f64))
                .collect();
            let winner = vote(&votes);
            self.candidates.iter().any(|c| {
                c.correct
                    && winner
                        .is_some_and(|w| c.answer.is_some_and(|a| crate::data::answers_match(a, w)))
            })
        } else {
            let best = self.candidates.iter().max_by(|a, b| {
                score(a)
                    .total_cmp(&score(b))
                    .then(b.first_sample.cmp(&a.first_sample))
            });
            best.is_some_and(|c| c.correct)
        }
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.collect();
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn same(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| crate::data::answers_match(a, b))
}

/// The most common answer (first seen wins ties), or the answer with the largest summed score.
fn vote(answers: &[(Option<f64>, f64)]) -> Option<f64> {
    let mut totals: Vec<(f64, f64, usize)> = Vec::new();
    for (i, (a, w)) in answers.iter().enumerate() {
        let Some(a) = a else { continue };
        match totals
            .iter_mut()
            .find(|t| crate::data::answers_match(t.0, *a))
        {
            Some(t) => t.1 += w,
            None => totals.push((*a, *w, i)),
        }
    }
    totals
        .into_iter()
        .max_by(|x, y| x.1.total_cmp(&y.1).then(y.2.cmp(&x.2)))
        .map(|t| t.0)
}

/// Runs best-of-N on (question, reference answer) problems.
pub fn best_of_n(
    policy: &Decoder,
    policy_tokenizer: &Tokenizer,
    verifier: &Decoder,
    verifier_tokenizer: &Tokenizer,
    problems: &[(String, f64)],
    options: &BestOfNOptions,
) -> Result<BestOfNReport> {
    let encoder = Encoder::new(policy_tokenizer)?;
    let prompts: Vec<Prompt> = problems
        .iter()
        .enumerate()
        .map(|(i, (q, _))| {
            let ids = if policy_tokenizer.chat_template.is_some() {
                encoder.encode(&encoder.render(&[Message::user(q.clone())], true)?, false)?
            } else {
                encoder.encode(q, true)?
            };
            Ok(Prompt {
                ids,
                item: i as u64,
                n: options.n,
                first_sample: 0,
            })
        })
        .collect::<Result<_>>()?;
    let completions = generate_sharded(
        policy,
        &prompts,
        &GenerateOptions {
            params: options.policy_params.clone(),
            seed: options.seed,
            stop_ids: policy_tokenizer.stop_token_ids.clone(),
            batch_size: options.batch_size,
            tokenizer: Some(policy_tokenizer),
            capture_after_stop: None,
        },
    )?;
    let policy_tokens: usize = completions.iter().map(|c| c.ids.len()).sum();
    let mut samples: Vec<Vec<String>> = vec![Vec::new(); problems.len()];
    for c in &completions {
        samples[c.prompt].push(policy_tokenizer.decode(&c.ids, true)?.trim().to_string());
    }
    // Verify each distinct candidate once, fixed K = k_max.
    let mut distinct: Vec<(usize, String)> = Vec::new();
    let mut index: HashMap<(usize, String), usize> = HashMap::new();
    for (p, texts) in samples.iter().enumerate() {
        for t in texts {
            index.entry((p, t.clone())).or_insert_with(|| {
                distinct.push((p, t.clone()));
                distinct.len() - 1
            });
        }
    }
    let inputs: Vec<String> = distinct
        .iter()
        .map(|(p, t)| format_inputs(&problems[*p].0, t, options.verify.mode, options.format))
        .collect();
    let seeds: Vec<u64> = (0..distinct.len() as u64).collect();
    let fixed_options = VerifyOptions {
        k_min: options.verify.k_max,
        ..options.verify.clone()
    };
    let fixed = verify_items(
        verifier,
        verifier_tokenizer,
        &inputs,
        &seeds,
        &fixed_options,
    )?;
    let adaptive: Vec<Verdict> = fixed
        .iter()
        .map(|v| {
            if options.verify.mode == Mode::Direct {
                v.clone()
            } else {
                v.adaptive_prefix(
                    options.verify.k_min,
                    options.verify.k_step,
                    options.verify.var_threshold,
                )
            }
        })
        .collect();

    let mut first = Vec::new();
    let mut majority = Vec::new();
    let mut pass = Vec::new();
    let mut argmax = [Vec::new(), Vec::new()];
    let mut weighted = [Vec::new(), Vec::new()];
    let mut per_problem = Vec::new();
    let mut scored = Vec::new();
    for (p, (_, reference)) in problems.iter().enumerate() {
        let answers: Vec<Option<f64>> = samples[p].iter().map(|t| extract_answer(t)).collect();
        first.push(same(answers[0], *reference));
        majority.push(same(
            vote(&answers.iter().map(|a| (*a, 1.0)).collect::<Vec<_>>()),
            *reference,
        ));
        pass.push(answers.iter().any(|a| same(*a, *reference)));
        let mut candidates = Vec::new();
        for (which, verdicts) in [&fixed, &adaptive].into_iter().enumerate() {
            let scores: Vec<f64> = samples[p]
                .iter()
                .map(|t| verdicts[index[&(p, t.clone())]].score)
                .collect();
            // Argmax over samples (ties: the first sample).
            let best = (0..scores.len()).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
            argmax[which].push(same(answers[best], *reference));
            let weighted_answers: Vec<(Option<f64>, f64)> =
                answers.iter().copied().zip(scores).collect();
            weighted[which].push(same(vote(&weighted_answers), *reference));
        }
        for (d, (dp, text)) in distinct.iter().enumerate() {
            if *dp == p {
                let answer = extract_answer(text);
                let correct = same(answer, *reference);
                scored.push((fixed[d].score, correct));
                candidates.push(Candidate {
                    text: text.clone(),
                    answer,
                    correct,
                    count: samples[p].iter().filter(|t| *t == text).count(),
                    first_sample: samples[p].iter().position(|t| t == text).unwrap_or(0),
                    verdict: fixed[d].clone(),
                });
            }
        }
        per_problem.push(ProblemResult { candidates });
    }
    let rate = |v: &[bool]| mean(v.iter().map(|&b| if b { 1.0 } else { 0.0 }));
    let k_report = |which: usize, verdicts: &[Verdict]| KReport {
        k: mean(verdicts.iter().map(|v| v.k as f64)),
        accuracy: rate(&argmax[which]),
        weighted_vote_accuracy: rate(&weighted[which]),
        verifier_tokens: verdicts.iter().map(|v| v.tokens).sum(),
    };
    Ok(BestOfNReport {
        n: options.n,
        problems: problems.len(),
        first_sample_accuracy: rate(&first),
        majority_vote_accuracy: rate(&majority),
        pass_at_n: rate(&pass),
        fixed: k_report(0, &fixed),
        adaptive: k_report(1, &adaptive),
        policy_tokens,
        verifier_auc: auc(&scored),
        distinct_candidates: distinct.len(),
        per_problem,
    })
}
