//! GenRM training rows from the policy's own samples.
//!
//! A verifier scores the policy's candidates at best-of-N time, so it is trained on them too (the
//! seed study's recipe; the PyTorch probe found verifiers trained only on synthetic corruptions
//! did not transfer): sample the DPO policy on training questions, critique every sample with
//! the world's programmatic checker (`synth::critique`), and keep the incorrect samples and as
//! many correct ones, so both verdicts are equally frequent.

use std::path::Path;

use ferrotune::data::{load_dataset, Encoder, Example, LoadOptions};
use ferrotune::infer::{generate, GenerateOptions, Prompt, SamplingParams};
use ferrotune::io::load_model;
use serde_json::json;

use super::chat_prompt;

/// What [`write_policy_rows`] wrote.
pub struct PolicyRows {
    pub correct: usize,
    pub incorrect: usize,
    pub tokens: usize,
}

/// Samples `per_question` answers from `policy` for the first `questions` user turns of
/// `sft_file`, critiques them and appends the balanced GenRM rows, after every row of
/// `synthetic_file`, to `out`.
pub fn write_policy_rows(
    policy: &Path,
    sft_file: &Path,
    synthetic_file: &Path,
    questions: usize,
    per_question: usize,
    seed: u64,
    out: &Path,
) -> anyhow::Result<PolicyRows> {
    let model = load_model(policy, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let tokenizer = model.tokenizer()?;
    let encoder = Encoder::new(tokenizer)?;
    let sft = load_dataset(sft_file, &LoadOptions::default())?;
    let asked: Vec<String> = sft
        .rows
        .iter()
        .filter_map(|r| match &r.example {
            Example::Chat { messages } => messages
                .iter()
                .find(|m| m.role == "user")
                .map(|m| m.content.clone()),
            _ => None,
        })
        .take(questions)
        .collect();
    let prompts: Vec<Prompt> = asked
        .iter()
        .enumerate()
        .map(|(i, q)| {
            Ok(Prompt {
                ids: chat_prompt(&encoder, q)?,
                item: i as u64,
                n: per_question,
                first_sample: 0,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let options = GenerateOptions {
        params: SamplingParams {
            temperature: 1.0,
            max_new_tokens: 96,
            ..Default::default()
        },
        // Not the best-of-N seed: these samples are training data, not the evaluated ones.
        seed: seed ^ 0x5EED_0F70_11C7,
        stop_ids: tokenizer.stop_token_ids.clone(),
        batch_size: 128,
        tokenizer: None,
        capture_after_stop: None,
    };
    let completions = generate(&model.decoder, &prompts, &options)?;
    let mut correct = Vec::new();
    let mut incorrect = Vec::new();
    let mut tokens = 0;
    for c in &completions {
        tokens += c.ids.len();
        let question = &asked[c.prompt];
        // Unreadable candidates are kept: the verifier must reject them too.
        let candidate = tokenizer.decode(&c.ids, true)?.trim().to_string();
        let critique = ferrotune::synth::critique::critique(question, &candidate);
        let row = json!({
            "inputs": ferrotune::synth::critique::verify_inputs(question, &candidate),
            "targets": ferrotune::synth::critique::verify_targets(&critique),
            "kind": "policy",
        });
        if critique.correct {
            correct.push(row);
        } else {
            incorrect.push(row);
        }
    }
    correct.truncate(incorrect.len());
    let mut text = std::fs::read_to_string(synthetic_file)?;
    if !text.ends_with('\n') && !text.is_empty() {
        text.push('\n');
    }
    // Interleave so every batch sees both verdicts.
    for i in 0..correct.len().max(incorrect.len()) {
        for rows in [&incorrect, &correct] {
            if let Some(r) = rows.get(i) {
                text.push_str(&r.to_string());
                text.push('\n');
            }
        }
    }
    ferrotune::io::checkpoint::write_atomic(out, text.as_bytes())?;
    Ok(PolicyRows {
        correct: correct.len(),
        incorrect: incorrect.len(),
        tokens,
    })
}
