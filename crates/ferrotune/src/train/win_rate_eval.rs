//! `--calculate-win-rate`: every validation of `ferrotune sft|dpo|genrm` also judges the policy
//! being trained against the model training started from, and adds `win_rate` and `win_rate_se`
//! to the eval metrics row (metrics.jsonl and TensorBoard; CONTRACTS "Metrics", "Win rate").
//!
//! - **Judge**: `win_rate_judge` (`--win-rate-judge`), the specs of `ferrotune winrate --judge`:
//!   `rm:DIR`, `genrm:DIR` (Direct p(Yes), genrm-critiques layout), `openai-reward:URL#MODEL`,
//!   `openai-judge:URL#MODEL` (API key from `OPENAI_API_KEY`; replies cached in
//!   `RUN_DIR/win_rate_judge_cache.jsonl`, so the reference side is paid for once). It is built at
//!   start-up: without one, `--calculate-win-rate` is a configuration error.
//! - **Prompts**: the first `win_rate_prompts` (default 16) eval rows that hold a prompt, as
//!   `eval::generation_prompt` reads it (a chat's messages before its last assistant message, a
//!   preference row's prompt, a qa row's question). GenRM: its D_correct eval rows' `inputs`
//!   (problem → solution, the policy's task), or when there are none the verification rows'
//!   `inputs`, as raw text. A prompt that leaves no room for a whole answer in the context
//!   (prompt + `win_rate_max_new_tokens` ≥ `max_position_embeddings`) is dropped (warned).
//! - **Answers**: greedy, at most `win_rate_max_new_tokens` (default 64) tokens, stopping at the
//!   tokenizer's end-of-sequence ids, through `infer::generate`. The starting model (`model`, also
//!   when resuming) answers once, at the first validation (it is loaded for that, then dropped);
//!   its answers are cached for the rest of the run. The policy answers at every validation.
//! - **Metrics**: `eval::win_rate` of the judged outcomes (ties count ½; se as CONTRACTS says).
//!   Sanity validation (before step 1) does not judge. A judge that fails for good (a remote one
//!   after its bounded retries) is warned about and that validation's row goes without the two
//!   keys; training continues.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use candle_core::{DType, Device};

use super::config::{Objective, TrainConfig};
use crate::data::{DataRow, Encoder, Example, PromptInput};
use crate::error::{Error, Result};
use crate::eval::{
    api_key_from_env, build_judge, generation_prompt, judge_all, win_rate, Judge, JudgeOptions,
    JudgeSpec, Judgement, Outcome, PairInput, WinRate,
};
use crate::infer::{generate, GenerateOptions, Prompt, SamplingParams};
use crate::io::Tokenizer;
use crate::model::Decoder;

/// The default `--win-rate-prompts`.
pub const DEFAULT_PROMPTS: usize = 16;
/// The default `--win-rate-max-new-tokens`.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 64;

/// Checks the win-rate settings of a config (called by `TrainConfig::validate`).
pub fn check_config(config: &TrainConfig) -> Result<()> {
    if !config.calculate_win_rate {
        return Ok(());
    }
    if !matches!(
        config.objective,
        Objective::Sft | Objective::Dpo | Objective::Genrm
    ) {
        return Err(Error::invalid(format!(
            "config: calculate_win_rate applies to sft, dpo and genrm, not {}",
            config.objective.name()
        )));
    }
    let spec = config.win_rate_judge.as_deref().ok_or_else(|| {
        Error::invalid(
            "config: calculate_win_rate needs a judge: --win-rate-judge SPEC (`rm:DIR`, `genrm:DIR`, `openai-reward:URL#MODEL` or `openai-judge:URL#MODEL`)",
        )
    })?;
    spec.parse::<JudgeSpec>()?;
    if config.win_rate_prompts == 0 || config.win_rate_max_new_tokens == 0 {
        return Err(Error::invalid(
            "config: win_rate_prompts and win_rate_max_new_tokens must be ≥ 1",
        ));
    }
    Ok(())
}

/// The prompts a run judges: the first `win_rate_prompts` of the eval rows that hold one (see
/// the module docs; GenRM prefers its D_correct eval rows). Empty without `calculate_win_rate`.
pub fn prompts(
    config: &TrainConfig,
    eval_rows: &[DataRow],
    correct_eval_rows: &[DataRow],
) -> Vec<PromptInput> {
    if !config.calculate_win_rate {
        return Vec::new();
    }
    let rows = if config.objective == Objective::Genrm && !correct_eval_rows.is_empty() {
        correct_eval_rows
    } else {
        eval_rows
    };
    rows.iter()
        .filter_map(|row| match &row.example {
            Example::Genrm { inputs, .. } => Some(PromptInput::Text(inputs.clone())),
            other => generation_prompt(other),
        })
        .take(config.win_rate_prompts)
        .collect()
}

/// `win_rate` and `win_rate_se` of judged pairs: `eval::win_rate` of their outcomes.
pub fn win_rate_metrics(judgements: &[Judgement]) -> (WinRate, Vec<(String, f64)>) {
    let outcomes: Vec<Outcome> = judgements.iter().map(|j| j.outcome).collect();
    let w = win_rate(&outcomes);
    let metrics = vec![
        ("win_rate".to_string(), w.win_rate),
        ("win_rate_se".to_string(), w.se),
    ];
    (w, metrics)
}

/// Judges each prompt's two answers; the first error stops it (what was judged is dropped).
pub fn judge_answers(
    judge: &dyn Judge,
    prompts: &[PromptInput],
    model_answers: &[String],
    reference_answers: &[String],
) -> Result<Vec<Judgement>> {
    let pairs: Vec<PairInput> = prompts
        .iter()
        .zip(model_answers.iter().zip(reference_answers))
        .map(|(p, (m, r))| PairInput {
            prompt: p.to_messages(),
            model_answer: m.clone(),
            reference_answer: r.clone(),
        })
        .collect();
    let run = judge_all(judge, &pairs, &|_| {});
    if let Some(error) = run.error {
        return Err(error);
    }
    Ok(run.judgements.into_iter().flatten().collect())
}

/// The win-rate evaluation of one run: the judge, the encoded prompts and, after the first
/// validation, the starting model's answers.
pub struct WinRateEval {
    judge: Box<dyn Judge>,
    prompts: Vec<PromptInput>,
    prompt_ids: Vec<Vec<u32>>,
    tokenizer: Tokenizer,
    max_new_tokens: usize,
    batch_size: usize,
    seed: u64,
    start_model: PathBuf,
    dtype: DType,
    device: Device,
    reference: Mutex<Option<Vec<String>>>,
}

impl WinRateEval {
    /// Builds the judge and encodes the prompts; `None` without `calculate_win_rate`.
    pub fn new(
        config: &TrainConfig,
        prompts: &[PromptInput],
        device: &Device,
    ) -> Result<Option<Self>> {
        if !config.calculate_win_rate {
            return Ok(None);
        }
        check_config(config)?;
        let spec: JudgeSpec = config
            .win_rate_judge
            .as_deref()
            .unwrap_or_default()
            .parse()?;
        let model_config = crate::io::model_dir::load_config(&config.model)?;
        let tokenizer = Tokenizer::from_dir(&config.model, Some(&model_config.raw))?;
        let context = model_config.max_position_embeddings;
        let encoder = Encoder::new(&tokenizer)?;
        let mut kept = Vec::new();
        let mut prompt_ids = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let ids = encoder.prompt(p)?;
            // The prompt and a whole answer must fit the context (the judge reads both).
            if ids.is_empty() || ids.len() + config.win_rate_max_new_tokens >= context {
                tracing::warn!(
                    "win rate: eval prompt {i} is {} tokens, with {} new tokens more than the context ({context}); left out",
                    ids.len(),
                    config.win_rate_max_new_tokens
                );
                continue;
            }
            kept.push(p.clone());
            prompt_ids.push(ids);
        }
        if kept.is_empty() {
            return Err(Error::invalid(
                "--calculate-win-rate: no eval row gives a prompt that, with --win-rate-max-new-tokens, fits the model's context (the eval rows need a prompt: chat, preference, qa, genrm)",
            ));
        }
        let remote = matches!(
            spec,
            JudgeSpec::OpenAiReward { .. } | JudgeSpec::OpenAiJudge { .. }
        );
        let batch_size = config.eval_batch_size.unwrap_or(config.batch_size).max(1);
        let options = JudgeOptions {
            device: device.clone(),
            batch_size,
            api_key: if remote {
                api_key_from_env(None)?
            } else {
                None
            },
            timeout: Duration::from_secs(120),
            cache: remote.then(|| config.run_dir().join("win_rate_judge_cache.jsonl")),
            ..Default::default()
        };
        let judge = build_judge(&spec, &options)?;
        tracing::info!(
            "win rate: {} prompts judged by {} at each validation",
            kept.len(),
            judge.spec()
        );
        Ok(Some(WinRateEval {
            judge,
            prompts: kept,
            prompt_ids,
            tokenizer,
            max_new_tokens: config.win_rate_max_new_tokens,
            batch_size,
            seed: config.seed,
            start_model: config.model.clone(),
            dtype: crate::io::checkpoint::parse_dtype(&config.precision)?,
            device: device.clone(),
            reference: Mutex::new(None),
        }))
    }

    /// Greedy answers of `decoder` to every prompt, as text (special tokens skipped).
    fn answers(&self, decoder: &Decoder) -> Result<Vec<String>> {
        let prompts: Vec<Prompt> = self
            .prompt_ids
            .iter()
            .enumerate()
            .map(|(i, ids)| Prompt {
                ids: ids.clone(),
                item: i as u64,
                n: 1,
                first_sample: 0,
            })
            .collect();
        let options = GenerateOptions {
            params: SamplingParams::greedy(self.max_new_tokens),
            seed: self.seed,
            stop_ids: self.tokenizer.stop_token_ids.clone(),
            batch_size: self.batch_size,
            tokenizer: None,
            capture_after_stop: None,
        };
        let mut out = vec![String::new(); prompts.len()];
        for c in generate(decoder, &prompts, &options)? {
            out[c.prompt] = self.tokenizer.decode(&c.ids, true)?;
        }
        Ok(out)
    }

    /// `win_rate`, `win_rate_se` of `policy` against the starting model (see the module docs).
    pub fn evaluate(&self, policy: &Decoder) -> Result<Vec<(String, f64)>> {
        let mut reference = self.reference.lock().expect("win-rate reference lock");
        if reference.is_none() {
            tracing::info!(
                "win rate: the starting model {} answers the {} prompts",
                self.start_model.display(),
                self.prompts.len()
            );
            let start = crate::io::load_model_for(&self.start_model, self.dtype, &self.device)?;
            *reference = Some(self.answers(&start.decoder)?);
        }
        let reference = reference.as_ref().expect("just set");
        let answers = self.answers(policy)?;
        match judge_answers(self.judge.as_ref(), &self.prompts, &answers, reference) {
            Ok(judgements) => {
                let (w, metrics) = win_rate_metrics(&judgements);
                tracing::info!(
                    "win rate vs the starting model: {:.4} ± {:.4} ({} wins, {} ties, {} losses)",
                    w.win_rate,
                    w.se,
                    w.wins,
                    w.ties,
                    w.losses
                );
                Ok(metrics)
            }
            Err(e) => {
                tracing::warn!(
                    "win rate: the judge {} failed, this validation has no win_rate: {e}",
                    self.judge.spec()
                );
                Ok(Vec::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Message;
    use Outcome::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    fn judgement(outcome: Outcome) -> Judgement {
        Judgement {
            model_score: 0.0,
            reference_score: 0.0,
            outcome,
        }
    }

    #[test]
    fn metrics_are_the_win_rate_of_the_outcomes() {
        // s = [1, ½, 0, 1]: p = 0.625; deviations² = [0.140625, 0.015625, 0.390625, 0.140625],
        // mean 0.171875; se = sqrt(0.171875 / 4).
        let js: Vec<Judgement> = [Win, Tie, Loss, Win].into_iter().map(judgement).collect();
        let (w, metrics) = win_rate_metrics(&js);
        assert_eq!((w.n, w.wins, w.ties, w.losses), (4, 2, 1, 1));
        assert_eq!(metrics[0].0, "win_rate");
        assert_eq!(metrics[1].0, "win_rate_se");
        assert!(close(metrics[0].1, 0.625));
        assert!(close(metrics[1].1, (0.171875f64 / 4.0).sqrt()));
        // The same policy as the reference ties everywhere: ½, no spread.
        let (_, m) = win_rate_metrics(&[judgement(Tie), judgement(Tie)]);
        assert!(close(m[0].1, 0.5) && close(m[1].1, 0.0));
    }

    /// Prefers the longer answer; a tie on equal lengths; fails on an empty prompt.
    struct Longer;
    impl Judge for Longer {
        fn spec(&self) -> String {
            "test:longer".into()
        }
        fn judge(&self, pairs: &[PairInput]) -> Result<Vec<Judgement>> {
            pairs
                .iter()
                .map(|p| {
                    if p.prompt[0].content.is_empty() {
                        return Err(Error::invalid("empty prompt"));
                    }
                    let (m, r) = (p.model_answer.len() as f64, p.reference_answer.len() as f64);
                    Ok(Judgement {
                        model_score: m,
                        reference_score: r,
                        outcome: Outcome::from_scores(m, r, 0.0),
                    })
                })
                .collect()
        }
    }

    #[test]
    fn answers_are_judged_pairwise_in_prompt_order() {
        let prompts = vec![
            PromptInput::Text("a".into()),
            PromptInput::Messages(vec![Message::user("b")]),
            PromptInput::Text("c".into()),
        ];
        let model = ["long answer", "x", "same"].map(String::from);
        let reference = ["short", "longer", "four"].map(String::from);
        let js = judge_answers(&Longer, &prompts, &model, &reference).unwrap();
        let outcomes: Vec<Outcome> = js.iter().map(|j| j.outcome).collect();
        assert_eq!(outcomes, [Win, Loss, Tie]);
        let (_, m) = win_rate_metrics(&js);
        assert!(close(m[0].1, 0.5));
        let err = judge_answers(
            &Longer,
            &[PromptInput::Text(String::new())],
            &model[..1],
            &reference[..1],
        )
        .unwrap_err();
        assert!(err.to_string().contains("empty prompt"));
    }

    #[test]
    fn config_needs_a_judge_and_a_generating_objective() {
        let mut config = TrainConfig {
            model: "m".into(),
            data: "d.jsonl".into(),
            calculate_win_rate: true,
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("--win-rate-judge"), "{err}");
        config.win_rate_judge = Some("bogus:x".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("unknown judge kind `bogus`"), "{err}");
        config.win_rate_judge = Some("rm:some/rm".into());
        config.validate().unwrap();
        config.objective = Objective::Rm;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("sft, dpo and genrm"), "{err}");
        config.objective = Objective::Sft;
        config.win_rate_prompts = 0;
        assert!(config.validate().is_err());
    }

    #[test]
    fn prompts_come_from_the_eval_rows_and_genrm_prefers_d_correct() {
        use crate::data::Source;
        use std::path::Path;
        use std::sync::Arc;
        let row = |example: Example| DataRow {
            example,
            source: Source {
                path: Arc::from(Path::new("e.jsonl")),
                line: 1,
            },
        };
        let eval = vec![
            row(Example::Chat {
                messages: vec![Message::user("hi"), Message::assistant("yo")],
            }),
            row(Example::Text {
                text: "no prompt".into(),
            }),
            row(Example::Qa {
                question: "1+1?".into(),
                answer: "2".into(),
            }),
        ];
        let mut config = TrainConfig {
            calculate_win_rate: true,
            win_rate_prompts: 5,
            ..Default::default()
        };
        let p = prompts(&config, &eval, &[]);
        assert_eq!(
            p,
            [
                PromptInput::Messages(vec![Message::user("hi")]),
                PromptInput::Messages(vec![Message::user("1+1?")]),
            ]
        );
        config.win_rate_prompts = 1;
        assert_eq!(prompts(&config, &eval, &[]).len(), 1);
        config.objective = Objective::Genrm;
        let verify = vec![row(Example::Genrm {
            inputs: "Q: v".into(),
            targets: " Yes".into(),
        })];
        let correct = vec![row(Example::Genrm {
            inputs: "Q: c\nA: ".into(),
            targets: "2".into(),
        })];
        assert_eq!(
            prompts(&config, &verify, &correct),
            [PromptInput::Text("Q: c\nA: ".into())]
        );
        assert_eq!(
            prompts(&config, &verify, &[]),
            [PromptInput::Text("Q: v".into())]
        );
        config.calculate_win_rate = false;
        assert!(prompts(&config, &verify, &correct).is_empty());
    }
}
