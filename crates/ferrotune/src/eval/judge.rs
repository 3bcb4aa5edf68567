//! Judges of a model's answer against a reference answer.
//!
//! Specs (`--judge`):
//! - `rm:DIR` — our Bradley–Terry reward model (`*ForSequenceClassification`); each answer is
//!   scored as the conversation `prompt + [assistant: answer]`, tokenized exactly as reward-model
//!   training tokenizes a preference side ([`reward_input`]).
//! - `genrm:DIR` — our GenRM verifier: the answer's p(Yes) (`infer::verify`), the prompt as the
//!   question and the answer as the solution, laid out as `--genrm-format` says; Direct mode
//!   (one forward pass) by default, or CoT with a fixed number of rationales.
//! - `openai-reward:URL#MODEL` — an OpenAI-compatible reward endpoint that answers a chat
//!   `[…prompt, assistant: answer]` with the content `reward:<float>` (Nemotron reward style;
//!   `ferrotune serve` does this for reward models).
//! - `openai-judge:URL#MODEL` — an OpenAI-compatible chat model asked [`PAIRWISE_PROMPT`] in both
//!   answer orders.
//!
//! Real-valued judges give a tie when the two scores are within the tie epsilon; the pairwise
//! judge gives a win or a loss only when both orders agree (see `winrate.rs`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device};
use serde_json::json;

use super::remote::{parse_reward, ChatClient, ResponseCache, RetryPolicy};
use super::winrate::{Outcome, DEFAULT_TIE_EPSILON};
use crate::data::{pad_id, Encoder, Message};
use crate::error::{Error, Result};
use crate::infer::reward::reward_scores;
use crate::infer::verify::{format_inputs, verify_items, Format, Mode, VerifyOptions};
use crate::infer::SamplingParams;
use crate::io::LoadedModel;
use crate::model::Head;

/// A parsed `--judge` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JudgeSpec {
    Rm(PathBuf),
    Genrm(PathBuf),
    OpenAiReward { base_url: String, model: String },
    OpenAiJudge { base_url: String, model: String },
}

const SPEC_FORMS: &str =
    "`rm:DIR`, `genrm:DIR`, `openai-reward:URL#MODEL` or `openai-judge:URL#MODEL`";

impl FromStr for JudgeSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<JudgeSpec> {
        let bad =
            |why: String| Error::invalid(format!("judge `{s}`: {why}; expected {SPEC_FORMS}"));
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("no judge kind".into()))?;
        let remote = |rest: &str| -> Result<(String, String)> {
            let (url, model) = rest
                .rsplit_once('#')
                .ok_or_else(|| bad("the model is missing (URL#MODEL)".into()))?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad(format!(
                    "the URL `{url}` must start with http:// or https://"
                )));
            }
            if url.len() <= "https://".len() || model.trim().is_empty() {
                return Err(bad("the URL or the model is empty".into()));
            }
            Ok((url.trim_end_matches('/').to_string(), model.to_string()))
        };
        let dir = |rest: &str| -> Result<PathBuf> {
            if rest.is_empty() {
                return Err(bad("the model directory is empty".into()));
            }
            Ok(PathBuf::from(rest))
        };
        Ok(match kind {
            "rm" => JudgeSpec::Rm(dir(rest)?),
            "genrm" => JudgeSpec::Genrm(dir(rest)?),
            "openai-reward" => {
                let (base_url, model) = remote(rest)?;
                JudgeSpec::OpenAiReward { base_url, model }
            }
            "openai-judge" => {
                let (base_url, model) = remote(rest)?;
                JudgeSpec::OpenAiJudge { base_url, model }
            }
            other => return Err(bad(format!("unknown judge kind `{other}`"))),
        })
    }
}

impl fmt::Display for JudgeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JudgeSpec::Rm(dir) => write!(f, "rm:{}", dir.display()),
            JudgeSpec::Genrm(dir) => write!(f, "genrm:{}", dir.display()),
            JudgeSpec::OpenAiReward { base_url, model } => {
                write!(f, "openai-reward:{base_url}#{model}")
            }
            JudgeSpec::OpenAiJudge { base_url, model } => {
                write!(f, "openai-judge:{base_url}#{model}")
            }
        }
    }
}

/// Settings of the judges (each uses the ones that apply to it).
#[derive(Debug, Clone)]
pub struct JudgeOptions {
    /// Real-valued judges: scores within this distance are a tie.
    pub tie_epsilon: f64,
    /// Local judges: device and sequences per forward pass.
    pub device: Device,
    pub batch_size: usize,
    /// Remote judges: the API key (none: no Authorization header).
    pub api_key: Option<String>,
    /// Remote judges: requests in flight at once.
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// Remote judges: limit of one HTTP request, connection to last byte.
    pub timeout: Duration,
    /// Remote judges: the on-disk reply cache.
    pub cache: Option<PathBuf>,
    /// `genrm:` judges.
    pub genrm: GenrmJudgeOptions,
}

/// How a `genrm:` judge verifies an answer.
#[derive(Debug, Clone)]
pub struct GenrmJudgeOptions {
    pub mode: Mode,
    /// The input layout the verifier was trained on.
    pub format: Format,
    /// CoT: rationales per answer (a fixed K; the score is their mean p(Yes)).
    pub k: usize,
    /// CoT: longest rationale, in tokens.
    pub max_new_tokens: usize,
    /// CoT: rationale sampling temperature.
    pub temperature: f64,
    pub seed: u64,
    /// Unnormalised P(Yes) instead of P(Yes)/(P(Yes)+P(No)).
    pub raw_p_yes: bool,
}

impl Default for GenrmJudgeOptions {
    fn default() -> Self {
        GenrmJudgeOptions {
            mode: Mode::Direct,
            format: Format::Critiques,
            k: 8,
            max_new_tokens: 256,
            temperature: 1.0,
            seed: 0,
            raw_p_yes: false,
        }
    }
}

impl Default for JudgeOptions {
    fn default() -> Self {
        JudgeOptions {
            tie_epsilon: DEFAULT_TIE_EPSILON,
            device: Device::Cpu,
            batch_size: 8,
            api_key: None,
            concurrency: 4,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(120),
            cache: None,
            genrm: GenrmJudgeOptions::default(),
        }
    }
}

/// The API key of remote judges: the variable `env_name` when given (an error when it is not
/// set), else `OPENAI_API_KEY` when set, else none.
pub fn api_key_from_env(env_name: Option<&str>) -> Result<Option<String>> {
    match env_name {
        Some(name) => match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Some(v)),
            _ => Err(Error::invalid(format!(
                "--judge-api-key-env names `{name}`, but that environment variable is not set"
            ))),
        },
        None => Ok(std::env::var("OPENAI_API_KEY")
            .ok()
            .filter(|v| !v.is_empty())),
    }
}

/// One prompt and the two answers to compare.
#[derive(Debug, Clone)]
pub struct PairInput {
    /// The prompt as chat messages (a raw-text prompt is one user message).
    pub prompt: Vec<Message>,
    pub model_answer: String,
    pub reference_answer: String,
}

/// A judge's decision on one pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    pub model_score: f64,
    pub reference_score: f64,
    pub outcome: Outcome,
}

/// Decides pairs. `judge` is called with chunks of at most [`Judge::chunk_size`] pairs from up to
/// [`Judge::workers`] threads at once.
pub trait Judge: Send + Sync {
    /// The spec it was built from (report.json's `judge`).
    fn spec(&self) -> String;
    /// Threads that may call `judge` at once.
    fn workers(&self) -> usize {
        1
    }
    /// Pairs per call.
    fn chunk_size(&self) -> usize {
        1
    }
    /// One judgement per pair, in order.
    fn judge(&self, pairs: &[PairInput]) -> Result<Vec<Judgement>>;
}

/// Scores single answers, higher is better: a reward model, a verifier, a reward API.
pub trait Scorer: Send + Sync {
    fn score(&self, items: &[(&[Message], &str)]) -> Result<Vec<f64>>;
}

/// A real-valued judge from a [`Scorer`]: both answers scored, a tie within `tie_epsilon`.
pub struct PointwiseJudge<S: Scorer> {
    pub scorer: S,
    pub spec: String,
    pub tie_epsilon: f64,
    pub workers: usize,
    pub chunk_size: usize,
}

impl<S: Scorer> Judge for PointwiseJudge<S> {
    fn spec(&self) -> String {
        self.spec.clone()
    }
    fn workers(&self) -> usize {
        self.workers.max(1)
    }
    fn chunk_size(&self) -> usize {
        self.chunk_size.max(1)
    }
    fn judge(&self, pairs: &[PairInput]) -> Result<Vec<Judgement>> {
        let mut items = Vec::with_capacity(pairs.len() * 2);
        for p in pairs {
            items.push((p.prompt.as_slice(), p.model_answer.as_str()));
            items.push((p.prompt.as_slice(), p.reference_answer.as_str()));
        }
        let scores = self.scorer.score(&items)?;
        Ok(scores
            .chunks(2)
            .map(|s| Judgement {
                model_score: s[0],
                reference_score: s[1],
                outcome: Outcome::from_scores(s[0], s[1], self.tie_epsilon),
            })
            .collect())
    }
}

/// The token ids a reward model scores for `answer` to `prompt`: exactly the sequence reward-model
/// training builds for a preference side (`Encoder::pair`): the prompt rendered with the
/// generation prompt and tokenized once, then the rest of `render(prompt + [assistant: answer])`
/// tokenized on its own. `ferrotune serve` uses the same function, so `rm:` and an
/// `openai-reward:` judge pointed at a served reward model agree.
pub fn reward_input(encoder: &Encoder, prompt: &[Message], answer: &str) -> Result<Vec<u32>> {
    let answer = Message::assistant(answer);
    Ok(encoder.pair(prompt, &answer, &answer)?.chosen.input_ids)
}

/// `rm:DIR`: a local Bradley–Terry reward model.
pub struct RewardModelScorer {
    model: LoadedModel,
    batch_size: usize,
}

impl RewardModelScorer {
    pub fn load(dir: &Path, device: &Device, batch_size: usize) -> Result<Self> {
        let model = crate::io::load_model(dir, DType::F32, device)?;
        if model.decoder.config().head != Head::SequenceClassification {
            return Err(Error::invalid(format!(
                "rm:{}: this model is a `{}`, not a reward model (*ForSequenceClassification)",
                dir.display(),
                model.decoder.config().architecture
            )));
        }
        model.tokenizer()?;
        Ok(RewardModelScorer { model, batch_size })
    }
}

impl Scorer for RewardModelScorer {
    fn score(&self, items: &[(&[Message], &str)]) -> Result<Vec<f64>> {
        let tokenizer = self.model.tokenizer()?;
        let encoder = Encoder::new(tokenizer)?;
        let context = self.model.decoder.config().max_position_embeddings;
        let mut sequences = Vec::with_capacity(items.len());
        for (prompt, answer) in items {
            let ids = reward_input(&encoder, prompt, answer)?;
            if ids.len() > context {
                return Err(Error::invalid(format!(
                    "rm:{}: prompt + answer is {} tokens; the reward model's context is {context}",
                    self.model.dir.display(),
                    ids.len()
                )));
            }
            sequences.push(ids);
        }
        let scores = reward_scores(
            &self.model.decoder,
            &sequences,
            pad_id(tokenizer)?,
            self.batch_size,
        )?;
        Ok(scores.into_iter().map(f64::from).collect())
    }
}

/// `genrm:DIR`: a GenRM verifier's p(Yes) that the answer is correct.
pub struct GenrmScorer {
    model: LoadedModel,
    options: GenrmJudgeOptions,
    batch_size: usize,
}

impl GenrmScorer {
    pub fn load(
        dir: &Path,
        device: &Device,
        batch_size: usize,
        options: GenrmJudgeOptions,
    ) -> Result<Self> {
        let model = crate::io::load_model(dir, DType::F32, device)?;
        if model.decoder.config().head != Head::CausalLm {
            return Err(Error::invalid(format!(
                "genrm:{}: this model is a `{}`, not a GenRM verifier (a causal LM)",
                dir.display(),
                model.decoder.config().architecture
            )));
        }
        crate::infer::verify::verdict_ids(model.tokenizer()?)?;
        Ok(GenrmScorer {
            model,
            options,
            batch_size,
        })
    }
}

/// A stable seed per verifier input, so an answer gets the same rationales whatever chunk it
/// is judged in (FNV-1a).
fn text_seed(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Scorer for GenrmScorer {
    fn score(&self, items: &[(&[Message], &str)]) -> Result<Vec<f64>> {
        let o = &self.options;
        let inputs: Vec<String> = items
            .iter()
            .map(|(prompt, answer)| format_inputs(&prompt_text(prompt), answer, o.mode, o.format))
            .collect();
        let seeds: Vec<u64> = inputs.iter().map(|t| text_seed(t)).collect();
        let k = o.k.max(1);
        let options = VerifyOptions {
            mode: o.mode,
            k_min: k,
            k_step: k,
            k_max: k,
            var_threshold: 0.0,
            params: SamplingParams {
                temperature: o.temperature,
                max_new_tokens: o.max_new_tokens,
                ..Default::default()
            },
            seed: o.seed,
            raw_p_yes: o.raw_p_yes,
            batch_size: self.batch_size.max(1),
        };
        let verdicts = verify_items(
            &self.model.decoder,
            self.model.tokenizer()?,
            &inputs,
            &seeds,
            &options,
        )
        .map_err(|e| Error::invalid(format!("genrm:{}: {e}", self.model.dir.display())))?;
        Ok(verdicts.into_iter().map(|v| v.score).collect())
    }
}

/// `openai-reward:URL#MODEL`: a chat endpoint that answers `reward:<float>`.
pub struct RemoteRewardScorer {
    client: ChatClient,
    cache: Option<Arc<ResponseCache>>,
}

impl Scorer for RemoteRewardScorer {
    fn score(&self, items: &[(&[Message], &str)]) -> Result<Vec<f64>> {
        items
            .iter()
            .map(|(prompt, answer)| {
                let mut messages = prompt.to_vec();
                messages.push(Message::assistant(*answer));
                self.client.complete(
                    &messages,
                    &json!({}),
                    0,
                    self.cache.as_deref(),
                    parse_reward,
                )
            })
            .collect()
    }
}

/// The pairwise judge's prompt: `{question}`, `{answer_a}` and `{answer_b}` are replaced, and the
/// whole text is sent as one user message. The first standalone `A` or `B` in the reply decides;
/// anything else is asked once more, then counts as no preference.
pub const PAIRWISE_PROMPT: &str = "Which answer responds better to the question? Judge helpfulness, correctness and clarity; ignore the order of the answers and their length.

[Question]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Reply with exactly A or B.";

/// The most tokens the pairwise judge may reply with (the verdict is one letter).
pub const PAIRWISE_MAX_TOKENS: usize = 16;

/// Which answer a verdict prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

/// The first standalone `A` or `B` in a reply (not part of a word: `Answer: B` reads B).
pub fn parse_verdict(reply: &str) -> Option<Side> {
    let chars: Vec<char> = reply.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c != 'A' && c != 'B' {
            continue;
        }
        let before = i.checked_sub(1).map(|j| chars[j]);
        let after = chars.get(i + 1).copied();
        let word = |x: Option<char>| x.is_some_and(|x| x.is_alphanumeric() || x == '_');
        if !word(before) && !word(after) {
            return Some(if c == 'A' { Side::A } else { Side::B });
        }
    }
    None
}

/// The question as text for the pairwise prompt: a lone user message's content, else every
/// message as `role: content`, blank-line separated.
pub fn prompt_text(messages: &[Message]) -> String {
    match messages {
        [only] if only.role == "user" => only.content.clone(),
        _ => messages
            .iter()
            .map(|m| format!("{}: {}", m.role, m.content))
            .collect::<Vec<_>>()
            .join("\n\n"),
    }
}

/// The filled-in [`PAIRWISE_PROMPT`].
pub fn pairwise_prompt(question: &str, answer_a: &str, answer_b: &str) -> String {
    // One pass, so an answer that contains `{answer_b}` is not substituted again.
    let mut out = String::new();
    let mut rest = PAIRWISE_PROMPT;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let (value, len) = if tail.starts_with("{question}") {
            (question, "{question}".len())
        } else if tail.starts_with("{answer_a}") {
            (answer_a, "{answer_a}".len())
        } else if tail.starts_with("{answer_b}") {
            (answer_b, "{answer_b}".len())
        } else {
            ("{", 1)
        };
        out.push_str(value);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// The outcome of the two orders' verdicts: (model first, reference first). A win or a loss only
/// when both prefer the same answer; the scores are the share of verdicts for each side.
pub fn pairwise_judgement(model_first: Option<Side>, reference_first: Option<Side>) -> Judgement {
    let for_model = [
        model_first == Some(Side::A),
        reference_first == Some(Side::B),
    ];
    let for_reference = [
        model_first == Some(Side::B),
        reference_first == Some(Side::A),
    ];
    let model_votes = for_model.iter().filter(|&&v| v).count();
    let reference_votes = for_reference.iter().filter(|&&v| v).count();
    let outcome = if model_votes == 2 {
        Outcome::Win
    } else if reference_votes == 2 {
        Outcome::Loss
    } else {
        Outcome::Tie
    };
    Judgement {
        model_score: model_votes as f64 / 2.0,
        reference_score: reference_votes as f64 / 2.0,
        outcome,
    }
}

/// `openai-judge:URL#MODEL`: a chat model comparing the answers in both orders.
pub struct RemotePairwiseJudge {
    client: ChatClient,
    cache: Option<Arc<ResponseCache>>,
    spec: String,
    workers: usize,
}

impl RemotePairwiseJudge {
    fn verdict(&self, question: &str, a: &str, b: &str) -> Result<Option<Side>> {
        let messages = [Message::user(pairwise_prompt(question, a, b))];
        let extra = json!({"temperature": 0, "max_tokens": PAIRWISE_MAX_TOKENS});
        for tag in 0..2 {
            let v =
                self.client
                    .complete(&messages, &extra, tag, self.cache.as_deref(), |reply| {
                        Ok(parse_verdict(reply))
                    })?;
            if v.is_some() {
                return Ok(v);
            }
        }
        Ok(None)
    }
}

impl Judge for RemotePairwiseJudge {
    fn spec(&self) -> String {
        self.spec.clone()
    }
    fn workers(&self) -> usize {
        self.workers.max(1)
    }
    fn judge(&self, pairs: &[PairInput]) -> Result<Vec<Judgement>> {
        pairs
            .iter()
            .map(|p| {
                let q = prompt_text(&p.prompt);
                let model_first = self.verdict(&q, &p.model_answer, &p.reference_answer)?;
                let reference_first = self.verdict(&q, &p.reference_answer, &p.model_answer)?;
                Ok(pairwise_judgement(model_first, reference_first))
            })
            .collect()
    }
}

/// Builds the judge a spec names (loading a local model, opening the cache).
pub fn build_judge(spec: &JudgeSpec, options: &JudgeOptions) -> Result<Box<dyn Judge>> {
    let name = spec.to_string();
    let cache = options
        .cache
        .as_deref()
        .map(ResponseCache::open)
        .transpose()?
        .map(Arc::new);
    let client = |base_url: &str, model: &str| {
        ChatClient::new(
            base_url,
            model,
            options.api_key.clone(),
            options.timeout,
            options.retry.clone(),
        )
    };
    Ok(match spec {
        JudgeSpec::Rm(dir) => Box::new(PointwiseJudge {
            scorer: RewardModelScorer::load(dir, &options.device, options.batch_size)?,
            spec: name,
            tie_epsilon: options.tie_epsilon,
            workers: 1,
            chunk_size: options.batch_size.max(1) * 4,
        }),
        JudgeSpec::Genrm(dir) => Box::new(PointwiseJudge {
            scorer: GenrmScorer::load(
                dir,
                &options.device,
                options.batch_size,
                options.genrm.clone(),
            )?,
            spec: name,
            tie_epsilon: options.tie_epsilon,
            workers: 1,
            chunk_size: options.batch_size.max(1) * 4,
        }),
        JudgeSpec::OpenAiReward { base_url, model } => Box::new(PointwiseJudge {
            scorer: RemoteRewardScorer {
                client: client(base_url, model),
                cache,
            },
            spec: name,
            tie_epsilon: options.tie_epsilon,
            workers: options.concurrency,
            chunk_size: 1,
        }),
        JudgeSpec::OpenAiJudge { base_url, model } => Box::new(RemotePairwiseJudge {
            client: client(base_url, model),
            cache,
            spec: name,
            workers: options.concurrency,
        }),
    })
}

/// What [`judge_all`] got: a judgement per pair it finished, and the error that stopped it.
pub struct JudgeRun {
    pub judgements: Vec<Option<Judgement>>,
    pub error: Option<Error>,
}

impl JudgeRun {
    pub fn judged(&self) -> usize {
        self.judgements.iter().filter(|j| j.is_some()).count()
    }
}

/// Judges every pair, `judge.workers()` threads at once, in chunks of `judge.chunk_size()`.
/// The first error stops new work; what was judged until then is kept. `progress` is called with
/// the number of pairs just finished.
pub fn judge_all(
    judge: &dyn Judge,
    pairs: &[PairInput],
    progress: &(dyn Fn(usize) + Sync),
) -> JudgeRun {
    let chunk = judge.chunk_size().max(1);
    let chunks: Vec<(usize, &[PairInput])> = pairs
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| (i * chunk, c))
        .collect();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let results = Mutex::new(vec![None; pairs.len()]);
    let error: Mutex<Option<Error>> = Mutex::new(None);
    let workers = judge.workers().max(1).min(chunks.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&(start, chunk)) = chunks.get(i) else {
                    break;
                };
                match judge.judge(chunk) {
                    Ok(js) => {
                        let mut r = results.lock().expect("results lock");
                        for (k, j) in js.into_iter().enumerate() {
                            r[start + k] = Some(j);
                        }
                        drop(r);
                        progress(chunk.len());
                    }
                    Err(e) => {
                        stop.store(true, Ordering::SeqCst);
                        let mut slot = error.lock().expect("error lock");
                        if slot.is_none() {
                            *slot = Some(e);
                        }
                        break;
                    }
                }
            });
        }
    });
    JudgeRun {
        judgements: results.into_inner().expect("results lock"),
        error: error.into_inner().expect("error lock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for s in [
            "rm:runs/rm",
            "genrm:/abs/verifier",
            "openai-reward:http://127.0.0.1:8000/v1#rm",
            "openai-judge:https://integrate.example/v1#nvidia/llama-3.1-nemotron-70b-reward",
        ] {
            let spec: JudgeSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!(
            "openai-reward:http://h:1/v1/#a#b"
                .parse::<JudgeSpec>()
                .unwrap(),
            JudgeSpec::OpenAiReward {
                base_url: "http://h:1/v1/#a".into(),
                model: "b".into()
            }
        );
        assert_eq!(
            "rm:x".parse::<JudgeSpec>().unwrap(),
            JudgeSpec::Rm(PathBuf::from("x"))
        );
    }

    #[test]
    fn bad_specs_say_what_is_expected() {
        for (s, why) in [
            ("gpt4", "no judge kind"),
            ("bleu:x", "unknown judge kind `bleu`"),
            ("rm:", "directory is empty"),
            ("openai-reward:http://h/v1", "model is missing"),
            ("openai-judge:h/v1#m", "must start with http"),
            ("openai-judge:http://h/v1#", "empty"),
        ] {
            let err = s.parse::<JudgeSpec>().unwrap_err().to_string();
            assert!(err.contains(why), "{s}: {err}");
            assert!(err.contains("openai-judge:URL#MODEL"), "{err}");
        }
    }

    #[test]
    fn verdicts_read_the_first_standalone_letter() {
        assert_eq!(parse_verdict("A"), Some(Side::A));
        assert_eq!(parse_verdict(" B.\n"), Some(Side::B));
        assert_eq!(parse_verdict("**B**"), Some(Side::B));
        assert_eq!(parse_verdict("Answer: B"), Some(Side::B));
        assert_eq!(parse_verdict("I pick A, not B"), Some(Side::A));
        assert_eq!(parse_verdict("Both are fine"), None);
        assert_eq!(parse_verdict("ABBA"), None);
        assert_eq!(parse_verdict(""), None);
    }

    #[test]
    fn both_orders_must_agree() {
        use Side::*;
        let j = pairwise_judgement(Some(A), Some(B));
        assert_eq!(
            (j.outcome, j.model_score, j.reference_score),
            (Outcome::Win, 1.0, 0.0)
        );
        let j = pairwise_judgement(Some(B), Some(A));
        assert_eq!(
            (j.outcome, j.model_score, j.reference_score),
            (Outcome::Loss, 0.0, 1.0)
        );
        // Position bias: always "A".
        let j = pairwise_judgement(Some(A), Some(A));
        assert_eq!(
            (j.outcome, j.model_score, j.reference_score),
            (Outcome::Tie, 0.5, 0.5)
        );
        let j = pairwise_judgement(Some(A), None);
        assert_eq!(
            (j.outcome, j.model_score, j.reference_score),
            (Outcome::Tie, 0.5, 0.0)
        );
        let j = pairwise_judgement(None, None);
        assert_eq!(j.outcome, Outcome::Tie);
    }

    #[test]
    fn pairwise_prompt_fills_each_slot_once() {
        let p = pairwise_prompt("Q?", "says {answer_b}", "two");
        assert!(p.contains("[Question]\nQ?\n"));
        assert!(p.contains("[Answer A]\nsays {answer_b}\n"));
        assert!(p.contains("[Answer B]\ntwo\n"));
        assert!(p.ends_with("Reply with exactly A or B."));
        assert_eq!(prompt_text(&[Message::user("hi")]), "hi");
        assert_eq!(
            prompt_text(&[Message::new("system", "s"), Message::user("u")]),
            "system: s\n\nuser: u"
        );
    }

    struct FailAfter(usize, AtomicUsize);
    impl Judge for FailAfter {
        fn spec(&self) -> String {
            "test".into()
        }
        fn workers(&self) -> usize {
            1
        }
        fn judge(&self, pairs: &[PairInput]) -> Result<Vec<Judgement>> {
            if self.1.fetch_add(1, Ordering::SeqCst) >= self.0 {
                return Err(Error::invalid("judge went away"));
            }
            Ok(pairs
                .iter()
                .map(|_| Judgement {
                    model_score: 1.0,
                    reference_score: 0.0,
                    outcome: Outcome::Win,
                })
                .collect())
        }
    }

    #[test]
    fn judge_all_keeps_what_was_judged_before_an_error() {
        let pairs: Vec<PairInput> = (0..5)
            .map(|i| PairInput {
                prompt: vec![Message::user(format!("q{i}"))],
                model_answer: "a".into(),
                reference_answer: "b".into(),
            })
            .collect();
        let done = AtomicUsize::new(0);
        let run = judge_all(&FailAfter(3, AtomicUsize::new(0)), &pairs, &|n| {
            done.fetch_add(n, Ordering::SeqCst);
        });
        assert_eq!(run.judged(), 3);
        assert_eq!(done.load(Ordering::SeqCst), 3);
        assert!(run.judgements[..3].iter().all(|j| j.is_some()));
        assert!(run.error.unwrap().to_string().contains("went away"));
        let run = judge_all(&FailAfter(10, AtomicUsize::new(0)), &pairs, &|_| {});
        assert_eq!(run.judged(), 5);
        assert!(run.error.is_none());
    }

    #[test]
    fn the_remote_pairwise_judge_asks_both_orders_retries_once_and_caches() {
        // Prefers the answer containing "good"; the first ask of each question mentioning
        // "unsure" gets an unreadable reply.
        let f = super::super::remote::fake::serve(|body, _| {
            let prompt = body["messages"][0]["content"].as_str().unwrap().to_string();
            let a = prompt
                .split("[Answer A]\n")
                .nth(1)
                .unwrap()
                .split("\n\n[Answer B]")
                .next()
                .unwrap();
            let verdict = if a.contains("good") { "A" } else { "**B**" };
            (200, verdict.to_string())
        });
        let dir = tempfile::tempdir().unwrap();
        let options = JudgeOptions {
            cache: Some(dir.path().join("cache.jsonl")),
            concurrency: 2,
            ..Default::default()
        };
        let spec: JudgeSpec = format!("openai-judge:{}#judge", f.base_url)
            .parse()
            .unwrap();
        let pair = |q: &str, m: &str, r: &str| PairInput {
            prompt: vec![Message::user(q)],
            model_answer: m.into(),
            reference_answer: r.into(),
        };
        let pairs = vec![
            pair("q1", "a good answer", "a bad answer"),
            pair("q2", "meh", "good stuff"),
            pair("q3", "good", "also good"),
        ];
        let judge = build_judge(&spec, &options).unwrap();
        let run = judge_all(judge.as_ref(), &pairs, &|_| {});
        assert!(run.error.is_none());
        let outcomes: Vec<Outcome> = run.judgements.iter().map(|j| j.unwrap().outcome).collect();
        // q3: both orders say "A" (position bias), a tie.
        assert_eq!(outcomes, [Outcome::Win, Outcome::Loss, Outcome::Tie]);
        assert_eq!(f.requests.lock().unwrap().len(), 6);
        let first = f.requests.lock().unwrap()[0].1.clone();
        assert_eq!(first["max_tokens"], PAIRWISE_MAX_TOKENS);
        assert!(first["messages"][0]["content"]
            .as_str()
            .unwrap()
            .ends_with("Reply with exactly A or B."));
        // A rerun is served from the cache.
        let judge = build_judge(&spec, &options).unwrap();
        let again = judge_all(judge.as_ref(), &pairs, &|_| {});
        assert_eq!(again.judgements, run.judgements);
        assert_eq!(f.requests.lock().unwrap().len(), 6);
    }

    #[test]
    fn an_unreadable_verdict_is_asked_once_more_then_is_no_preference() {
        let f = super::super::remote::fake::serve(|_, k| {
            (
                200,
                if k == 0 {
                    "Hmm.".into()
                } else if k == 1 {
                    "A".into()
                } else {
                    "I cannot say".into()
                },
            )
        });
        let options = JudgeOptions::default();
        let spec: JudgeSpec = format!("openai-judge:{}#judge", f.base_url)
            .parse()
            .unwrap();
        let judge = build_judge(&spec, &options).unwrap();
        let j = judge
            .judge(&[PairInput {
                prompt: vec![Message::user("q")],
                model_answer: "x".into(),
                reference_answer: "y".into(),
            }])
            .unwrap();
        // Model first: "Hmm." then "A" (model). Reference first: two unreadable replies.
        assert_eq!(f.requests.lock().unwrap().len(), 4);
        assert_eq!(
            (j[0].outcome, j[0].model_score, j[0].reference_score),
            (Outcome::Tie, 0.5, 0.0)
        );
    }

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(name)
    }

    #[test]
    fn genrm_judges_read_p_yes_and_name_bad_dirs_and_long_inputs() {
        let spec: JudgeSpec = format!("genrm:{}", fixture("qwen2-tiny").display())
            .parse()
            .unwrap();
        // The tiny model's context (256) is too short for the genrm-critiques header.
        let terse = JudgeOptions {
            genrm: GenrmJudgeOptions {
                format: Format::Terse,
                ..Default::default()
            },
            ..Default::default()
        };
        let judge = build_judge(&spec, &terse).unwrap();
        let pairs: Vec<PairInput> = ["The answer is 4.", "The answer is 5."]
            .iter()
            .map(|a| PairInput {
                prompt: vec![Message::user("What is 2 + 2?")],
                model_answer: a.to_string(),
                reference_answer: "The answer is 4.".into(),
            })
            .collect();
        let js = judge.judge(&pairs).unwrap();
        for j in &js {
            assert!(
                (0.0..=1.0).contains(&j.model_score) && (0.0..=1.0).contains(&j.reference_score)
            );
        }
        // The same answer on both sides: the same p(Yes), a tie.
        assert_eq!(js[0].model_score, js[0].reference_score);
        assert_eq!(js[0].outcome, Outcome::Tie);
        // CoT with a fixed K: reproducible (answers seeded by their text).
        let options = JudgeOptions {
            genrm: GenrmJudgeOptions {
                mode: Mode::Cot,
                format: Format::Terse,
                k: 2,
                max_new_tokens: 8,
                ..Default::default()
            },
            ..Default::default()
        };
        let a = build_judge(&spec, &options).unwrap().judge(&pairs).unwrap();
        let b = build_judge(&spec, &options)
            .unwrap()
            .judge(&pairs[1..])
            .unwrap();
        assert_eq!(a[1], b[0]);
        let err = build_judge(
            &"genrm:/no/such/dir".parse().unwrap(),
            &JudgeOptions::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("/no/such/dir"), "{err}");
        // Inputs longer than the verifier's context are a clear error.
        let long = build_judge(&spec, &JudgeOptions::default())
            .unwrap()
            .judge(&pairs);
        assert!(long.err().unwrap().to_string().contains("context is 256"));
    }
}
