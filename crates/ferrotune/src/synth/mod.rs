//! The built-in task world of `ferrotune quickstart` and `ferrotune data synth`: arithmetic
//! chains with step-by-step solutions, wrong solutions that look like a policy's slips, a
//! programmatic verifier that writes GenRM-CoT rationales, the dataset files in the real
//! schemas, and a small byte-level BPE tokenizer trained on them.
//!
//! - `world`     — problems (`3+5-2+4=?`, evaluated left to right), difficulty knobs, the terse
//!   and the words surfaces, the question parser
//! - `solution`  — correct solutions (`3+5=8 8-2=6 6+4=10 #### 10`) and corruptions
//!   (arithmetic slip, copy slip, wrong final answer)
//! - `critique`  — the critic: reads any candidate, checks each step by its inverse on the
//!   candidate's own result (never a copyable "redo"), stops at the first wrong step; the
//!   GenRM row texts (verify, direct, correct)
//! - `files`     — the world's files (`pretrain`, `sft`, `preference`, `rm`, `genrm_verify`,
//!   `genrm_correct`, `test`, `world.json`), deterministic per seed, test problems held out
//! - `tokenizer` — the world's tokenizer (digits split, ChatML)
//!
//! Why this world: the PyTorch probe (`../shared/notes/quickstart-probe.md`) found terse
//! single-digit chains learn in minutes where wordy problems do not, and that a verifier
//! trained to "redo the step and compare" copies the candidate's value; see `critique`.

pub mod critique;
pub mod files;
pub mod solution;
pub mod tokenizer;
pub mod world;

pub use critique::{
    correct_inputs, critique, critique_problem, direct_inputs, parse_candidate, verify_inputs,
    verify_targets, AnswerField, Critique, ParsedCandidate, VERDICT_LINE, VERIFY_PROMPT,
};
pub use files::{build_world, write_world, World, WorldConfig, WorldFile, WorldSummary, FILES};
pub use solution::{Corruption, Solution, Step};
pub use tokenizer::{train_tokenizer, DEFAULT_VOCAB_SIZE, SPECIAL_TOKENS};
pub use world::{parse_question, question_text, Difficulty, Op, Problem, Wording};
