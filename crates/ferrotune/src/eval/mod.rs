//! Evaluation: win rates of a model against a reference under a judge (CONTRACTS "Win rate").
//!
//! - `winrate` — outcomes, win rate and standard error, report.json / report.md
//! - `judge`   — judge specs (`rm:`, `genrm:`, `openai-reward:`, `openai-judge:`), the [`Judge`]
//!   trait, the pairwise prompt, and [`judge_all`] (concurrency, partial results on error)
//! - `remote`  — the OpenAI-compatible HTTP client: API key, retries with backoff, reply cache
//! - `answers` — generate's JSONL rows (`index`, `sample_index`, `prompt`, `completion`,
//!   `num_tokens`, `finish_reason`), written by `ferrotune generate`, read by `winrate --answers`

pub mod answers;
pub mod judge;
pub mod remote;
pub mod winrate;

pub use answers::{generation_prompt, read_answers, AnswerRow};
pub use judge::{
    api_key_from_env, build_judge, judge_all, prompt_text, reward_input, GenrmJudgeOptions, Judge,
    JudgeOptions, JudgeRun, JudgeSpec, Judgement, PairInput, Scorer, PAIRWISE_PROMPT,
};
pub use remote::{ChatClient, ResponseCache, RetryPolicy};
pub use winrate::{win_rate, Outcome, Record, Report, WinRate, DEFAULT_TIE_EPSILON};
