//! The worker that owns the model: one OS thread, fed through a channel.
//!
//! **Continuous batching.** Generation requests share one running batch and one KV cache. Between
//! decode steps the worker takes every request that is waiting and joins it to the batch in the
//! next forward pass: that pass is as wide as the longest joining prompt; each joining row holds
//! its prompt (left padded), each running row holds its one next token in the last slot with
//! padding before it, so every row's next-token logits come out of the same last slot. Padding
//! is masked out of attention and does not advance a row's positions, so a sequence decodes the
//! same whether it runs alone or joins a busy batch (up to float rounding of different shapes).
//! New rows come from a "template" row the batch carries while two rows or more run: it has
//! never seen a real token, so copying it gives an empty row whatever the cache's length. A lone
//! row runs without it (a second row would double its cost: matrix-vector products become
//! matrix-matrix ones), so the first request to join a lone row rebuilds the cache: the lone row
//! feeds its whole sequence again in the same pass as the newcomers' prompts. The `n` samples of
//! one request compute the prompt once and fork its cache. Finished rows leave the batch at once.
//! Joining pads the running rows' caches: a join into a cache that is mostly padding rebuilds it
//! from the rows' sequences (one prefill pass), and a batch whose cache has grown past
//! `max_slots` stops taking new rows until it drains (no request waits longer than the running
//! ones take).
//!
//! **Reward models.** Scoring requests that are waiting are scored together in one call.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use ferrotune::infer::generate::FinishReason;
use ferrotune::infer::reward::reward_scores;
use ferrotune::infer::sampler::{sample, sample_rng, SamplingParams};
use ferrotune::io::Tokenizer;
use ferrotune::model::{Decoder, KvCache, LogitsAt};
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot};

/// What a generation request streams back, per choice.
#[derive(Debug, Clone)]
pub enum GenEvent {
    /// More text of choice `choice`.
    Delta { choice: usize, text: String },
    /// Choice `choice` finished; `completion_tokens` counts every generated token (an end token
    /// included).
    Done {
        choice: usize,
        finish_reason: FinishReason,
        completion_tokens: usize,
    },
    /// The model failed; the request is over.
    Error(String),
}

pub struct GenJob {
    pub prompt: Vec<u32>,
    /// Samples of this prompt (choices).
    pub n: usize,
    pub params: SamplingParams,
    /// Choice i samples from the stream seeded by (seed, 0, i).
    pub seed: u64,
    pub events: mpsc::UnboundedSender<GenEvent>,
}

pub struct ScoreJob {
    pub sequences: Vec<Vec<u32>>,
    pub reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

pub enum Job {
    Generate(GenJob),
    Score(ScoreJob),
}

pub struct EngineConfig {
    /// Most rows (samples) decoded at once.
    pub max_batch_size: usize,
    /// A running batch takes new rows only while its cache holds fewer slots than this.
    pub max_slots: usize,
    pub stop_ids: Vec<u32>,
    pub pad_id: u32,
}

/// Requests accepted and not yet finished (for the server's queue limit).
pub type InFlight = Arc<AtomicUsize>;

/// Counters of the worker (served at `GET /stats`).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Forward passes of generation.
    pub steps: AtomicUsize,
    /// Requests that joined a batch that was already running.
    pub joins: AtomicUsize,
    /// Most rows decoded in one forward pass.
    pub max_rows: AtomicUsize,
    /// Tokens generated.
    pub tokens: AtomicUsize,
    /// Scoring passes and sequences scored (reward models).
    pub score_calls: AtomicUsize,
    pub sequences_scored: AtomicUsize,
}

impl EngineStats {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "steps": self.steps.load(Ordering::Relaxed),
            "joins": self.joins.load(Ordering::Relaxed),
            "max_rows": self.max_rows.load(Ordering::Relaxed),
            "tokens": self.tokens.load(Ordering::Relaxed),
            "score_calls": self.score_calls.load(Ordering::Relaxed),
            "sequences_scored": self.sequences_scored.load(Ordering::Relaxed),
        })
    }
}

struct Row {
    events: mpsc::UnboundedSender<GenEvent>,
    params: Arc<SamplingParams>,
    choice: usize,
    rng: StdRng,
    prompt: Arc<Vec<u32>>,
    /// Generated ids so far.
    ids: Vec<u32>,
    /// Bytes of the decoded text already sent.
    sent: usize,
    /// The request this row belongs to finishes when its last row does.
    job_rows_left: Arc<AtomicUsize>,
}

struct Batch {
    /// The running rows, then the template row when `template`.
    cache: KvCache,
    rows: Vec<Row>,
    /// Whether the cache's last row is the template (kept while two rows or more run).
    template: bool,
}

/// How a forward pass is laid out.
#[derive(Clone, Copy)]
struct Plan {
    /// Build the cache anew (a lone row has no template to make new rows from).
    rebuild: bool,
    /// Carry a template row after the others.
    template: bool,
}

pub struct Engine {
    decoder: Decoder,
    tokenizer: &'static Tokenizer,
    config: EngineConfig,
    in_flight: InFlight,
    stats: Arc<EngineStats>,
}

impl Engine {
    pub fn new(
        decoder: Decoder,
        tokenizer: &'static Tokenizer,
        config: EngineConfig,
        in_flight: InFlight,
        stats: Arc<EngineStats>,
    ) -> Engine {
        Engine {
            decoder,
            tokenizer,
            config,
            in_flight,
            stats,
        }
    }

    /// Serves jobs until every sender is gone.
    pub fn run(mut self, jobs: Receiver<Job>) {
        let mut waiting: VecDeque<GenJob> = VecDeque::new();
        let mut batch: Option<Batch> = None;
        loop {
            let mut scores = Vec::new();
            if batch.is_none() && waiting.is_empty() {
                match jobs.recv() {
                    Ok(job) => self.take(job, &mut waiting, &mut scores),
                    Err(_) => return,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(job) => self.take(job, &mut waiting, &mut scores),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if batch.is_none() && waiting.is_empty() && scores.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            if !scores.is_empty() {
                self.score(scores);
            }
            let joining = self.admit(&mut waiting, batch.as_ref());
            if joining.is_empty() && batch.is_none() {
                continue;
            }
            batch = match self.step(batch.take(), joining) {
                Ok(b) => b,
                Err((rows, e)) => {
                    tracing::error!("generation failed: {e}");
                    for row in rows {
                        let _ = row
                            .events
                            .send(GenEvent::Error(format!("generation failed: {e}")));
                        self.finish_row(&row);
                    }
                    None
                }
            };
        }
    }

    fn take(&self, job: Job, waiting: &mut VecDeque<GenJob>, scores: &mut Vec<ScoreJob>) {
        match job {
            Job::Generate(g) => waiting.push_back(g),
            Job::Score(s) => scores.push(s),
        }
    }

    /// Scores every waiting scoring request in one call.
    fn score(&self, jobs: Vec<ScoreJob>) {
        let all: Vec<Vec<u32>> = jobs
            .iter()
            .flat_map(|j| j.sequences.iter().cloned())
            .collect();
        let result = reward_scores(
            &self.decoder,
            &all,
            self.config.pad_id,
            self.config.max_batch_size.max(1),
        );
        self.stats.score_calls.fetch_add(1, Ordering::Relaxed);
        self.stats
            .sequences_scored
            .fetch_add(all.len(), Ordering::Relaxed);
        let mut offset = 0;
        for job in jobs {
            let k = job.sequences.len();
            let reply = match &result {
                Ok(s) => Ok(s[offset..offset + k].to_vec()),
                Err(e) => Err(e.to_string()),
            };
            offset += k;
            let _ = job.reply.send(reply);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The waiting requests that join the next step (in arrival order).
    fn admit(&self, waiting: &mut VecDeque<GenJob>, batch: Option<&Batch>) -> Vec<GenJob> {
        let running = batch.map_or(0, |b| b.rows.len());
        let slots = batch.map_or(0, |b| b.cache.len());
        let mut joining: Vec<GenJob> = Vec::new();
        let mut rows = running;
        let mut width = 0;
        while let Some(job) = waiting.front() {
            if job.events.is_closed() {
                // The client left before its turn.
                waiting.pop_front();
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let first = rows == 0;
            if !first && rows + job.n > self.config.max_batch_size.max(1) {
                break;
            }
            let new_width = width.max(job.prompt.len());
            if running > 0 && slots + new_width > self.config.max_slots {
                break;
            }
            width = new_width;
            rows += job.n;
            joining.push(waiting.pop_front().expect("front exists"));
        }
        joining
    }

    /// One forward pass (joining rows prefill, running rows decode), then sampling. On error
    /// returns the rows that were running or joining so they can be told.
    fn step(
        &mut self,
        batch: Option<Batch>,
        joining: Vec<GenJob>,
    ) -> Result<Option<Batch>, (Vec<Row>, String)> {
        let (cache, mut rows, had_template) = match batch {
            Some(b) => (Some(b.cache), b.rows, b.template),
            None => (None, Vec::new(), false),
        };
        let running = rows.len();
        let joining_rows: Vec<Vec<Row>> = joining
            .iter()
            .map(|job| {
                let params = Arc::new(job.params.clone());
                let prompt = Arc::new(job.prompt.clone());
                let left = Arc::new(AtomicUsize::new(job.n));
                (0..job.n)
                    .map(|choice| Row {
                        events: job.events.clone(),
                        params: params.clone(),
                        choice,
                        rng: sample_rng(job.seed, 0, choice as u64),
                        prompt: prompt.clone(),
                        ids: Vec::new(),
                        sent: 0,
                        job_rows_left: left.clone(),
                    })
                    .collect()
            })
            .collect();
        let rows_after = running + joining.iter().map(|j| j.n).sum::<usize>();
        // The template row is carried only while the batch has two rows or more: a lone row
        // decodes much faster without a second row beside it (matrix-vector products).
        let template = rows_after >= 2;
        // Joining pads every running row's cache by the joining prompts' width; once padding
        // makes up most of the cache (attention reads all of it, and every row change copies
        // it), the join rebuilds the cache from the rows' sequences instead.
        let longest = rows
            .iter()
            .map(|r| r.prompt.len() + r.ids.len())
            .max()
            .unwrap_or(0);
        let padded = cache
            .as_ref()
            .is_some_and(|c| c.len() > 2 * longest.max(32));
        let plan = Plan {
            rebuild: cache.is_some() && !joining.is_empty() && (!had_template || padded),
            template,
        };
        let (mut cache, mut logits) = match self.forward(cache, &rows, &joining, plan) {
            Ok(x) => x,
            Err(e) => {
                rows.extend(joining_rows.into_iter().flatten());
                return Err((rows, e.to_string()));
            }
        };
        // Fork each joining request's row into its n samples (the template stays last).
        if joining.iter().any(|j| j.n > 1) {
            let mut index: Vec<usize> = (0..running).collect();
            for (j, job) in joining.iter().enumerate() {
                index.extend(std::iter::repeat_n(running + j, job.n));
            }
            if template {
                index.push(running + joining.len());
            }
            match cache.select_rows(&index) {
                Ok(c) => cache = c,
                Err(e) => {
                    rows.extend(joining_rows.into_iter().flatten());
                    return Err((rows, e.to_string()));
                }
            }
            logits = index.iter().map(|&i| logits[i].clone()).collect();
        }
        rows.extend(joining_rows.into_iter().flatten());
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.tokens.fetch_add(rows.len(), Ordering::Relaxed);
        self.stats.max_rows.fetch_max(rows.len(), Ordering::Relaxed);
        if running > 0 {
            self.stats.joins.fetch_add(joining.len(), Ordering::Relaxed);
        }

        // Sample, stream, and drop the rows that finished.
        let total = rows.len();
        let mut keep = Vec::with_capacity(total + 1);
        let mut kept_rows = Vec::with_capacity(total);
        for (r, mut row) in rows.into_iter().enumerate() {
            let token = sample(&logits[r], &row.params, &mut row.rng);
            row.ids.push(token);
            if self.advance(&mut row) {
                self.finish_row(&row);
            } else {
                keep.push(r);
                kept_rows.push(row);
            }
        }
        let template_after = kept_rows.len() >= 2;
        if kept_rows.is_empty() {
            return Ok(None);
        }
        if template_after {
            keep.push(total); // the template (present: the batch had two rows or more)
        }
        if keep.len() < total + usize::from(template) {
            cache = match cache.select_rows(&keep) {
                Ok(c) => c,
                Err(e) => return Err((kept_rows, e.to_string())),
            };
        }
        Ok(Some(Batch {
            cache,
            rows: kept_rows,
            template: template_after,
        }))
    }

    /// Runs the forward pass and returns every row's next-token logits (template last, when
    /// `plan.template`). Running rows feed their last sampled token; joining requests their
    /// prompt. With `plan.rebuild` (a lone running row, which has no template to make new rows
    /// from) the cache is built anew: the running row feeds its whole sequence again.
    fn forward(
        &self,
        cache: Option<KvCache>,
        rows: &[Row],
        joining: &[GenJob],
        plan: Plan,
    ) -> ferrotune::Result<(KvCache, Vec<Vec<f32>>)> {
        let running = rows.len();
        let extra = usize::from(plan.template);
        let b = running + joining.len() + extra;
        let mut cache = match cache {
            Some(_) if plan.rebuild => KvCache::new(self.decoder.config(), b),
            Some(c) if joining.is_empty() => c,
            Some(c) => {
                // Running rows, then a copy of the template per joining request and the template.
                let mut index: Vec<usize> = (0..running).collect();
                index.extend(std::iter::repeat_n(running, joining.len() + extra));
                c.select_rows(&index)?
            }
            None => KvCache::new(self.decoder.config(), b),
        };
        // What each row feeds this pass.
        let mut feeds: Vec<Vec<u32>> = Vec::with_capacity(b);
        for row in rows {
            if plan.rebuild {
                feeds.push([row.prompt.as_slice(), row.ids.as_slice()].concat());
            } else {
                feeds.push(vec![*row
                    .ids
                    .last()
                    .expect("a running row has sampled a token")]);
            }
        }
        for job in joining {
            feeds.push(job.prompt.clone());
        }
        let width = feeds.iter().map(Vec::len).max().unwrap_or(1).max(1);
        if plan.template {
            feeds.push(Vec::new());
        }
        let pad = self.config.pad_id;
        let mut ids = Vec::with_capacity(b * width);
        let mut mask = Vec::with_capacity(b);
        for f in &feeds {
            let p = width - f.len();
            ids.extend(std::iter::repeat_n(pad, p));
            ids.extend_from_slice(f);
            mask.push([vec![false; p], vec![true; f.len()]].concat());
        }
        let input = Tensor::from_vec(ids, (b, width), self.decoder.device())?;
        let logits = self
            .decoder
            .forward_step(&input, Some(&mask), &mut cache, LogitsAt::Last)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        Ok((cache, logits))
    }

    /// After a row sampled a token: streams new text and decides whether it finished (then the
    /// final text and `Done` are sent). A client that went away finishes its rows.
    fn advance(&self, row: &mut Row) -> bool {
        let token = *row.ids.last().expect("sampled");
        let context = self.decoder.config().max_position_embeddings;
        let stopped_by_token = self.config.stop_ids.contains(&token);
        let text_ids = if stopped_by_token {
            &row.ids[..row.ids.len() - 1]
        } else {
            &row.ids[..]
        };
        let text = match self.tokenizer.decode(text_ids, true) {
            Ok(t) => t,
            Err(e) => {
                let _ = row.events.send(GenEvent::Error(e.to_string()));
                return true;
            }
        };
        let mut finish = stopped_by_token.then_some(FinishReason::Stop);
        let mut end = text.len();
        if finish.is_none() {
            if let Some(pos) = row
                .params
                .stop_strings
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| {
                    // Earlier text held back every possible start of a stop string.
                    let from = if text.is_char_boundary(row.sent) {
                        row.sent
                    } else {
                        0
                    };
                    text[from..].find(s.as_str()).map(|p| p + from)
                })
                .min()
            {
                finish = Some(FinishReason::Stop);
                end = pos;
            }
        }
        if finish.is_none()
            && (row.ids.len() >= row.params.max_new_tokens
                || row.prompt.len() + row.ids.len() >= context)
        {
            finish = Some(FinishReason::Length);
        }
        if finish.is_none() {
            // Hold back an incomplete character and a possible start of a stop string.
            if text.ends_with('\u{FFFD}') {
                end = text.len() - '\u{FFFD}'.len_utf8();
            }
            for s in &row.params.stop_strings {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && text[..end].ends_with(&s[..k]) {
                        end = end.min(text[..end].len() - k);
                        break;
                    }
                }
            }
        }
        let mut gone = false;
        if end > row.sent && text.is_char_boundary(end) && text.is_char_boundary(row.sent) {
            gone |= row
                .events
                .send(GenEvent::Delta {
                    choice: row.choice,
                    text: text[row.sent..end].to_string(),
                })
                .is_err();
            row.sent = end;
        }
        if let Some(reason) = finish {
            let _ = row.events.send(GenEvent::Done {
                choice: row.choice,
                finish_reason: reason,
                completion_tokens: row.ids.len(),
            });
            return true;
        }
        gone || row.events.is_closed()
    }

    fn finish_row(&self, row: &Row) {
        if row.job_rows_left.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use ferrotune::infer::{generate, GenerateOptions, Prompt};

    fn load() -> (Decoder, &'static Tokenizer) {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/qwen2-tiny");
        let m = ferrotune::io::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        (m.decoder, Box::leak(Box::new(m.tokenizer.unwrap())))
    }

    fn job(
        tok: &Tokenizer,
        text: &str,
        n: usize,
        temperature: f64,
        max_new_tokens: usize,
        seed: u64,
    ) -> (GenJob, mpsc::UnboundedReceiver<GenEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let job = GenJob {
            prompt: tok.encode(text, true).unwrap(),
            n,
            params: SamplingParams {
                temperature,
                max_new_tokens,
                ..Default::default()
            },
            seed,
            events: tx,
        };
        (job, rx)
    }

    /// Texts and token counts per choice from a finished request's events.
    fn drain(rx: &mut mpsc::UnboundedReceiver<GenEvent>, n: usize) -> Vec<(String, usize)> {
        let mut out = vec![(String::new(), 0); n];
        let mut done = 0;
        while let Ok(e) = rx.try_recv() {
            match e {
                GenEvent::Delta { choice, text } => out[choice].0.push_str(&text),
                GenEvent::Done {
                    choice,
                    completion_tokens,
                    ..
                } => {
                    out[choice].1 = completion_tokens;
                    done += 1;
                }
                GenEvent::Error(e) => panic!("{e}"),
            }
        }
        assert_eq!(done, n, "every choice finished");
        out
    }

    /// What the library's batched `generate` makes of the same request alone.
    fn reference(decoder: &Decoder, tok: &Tokenizer, job: &GenJob) -> Vec<(String, usize)> {
        let options = GenerateOptions {
            params: job.params.clone(),
            seed: job.seed,
            stop_ids: tok.stop_token_ids.clone(),
            batch_size: 64,
            tokenizer: Some(tok),
            capture_after_stop: None,
        };
        let prompt = Prompt {
            ids: job.prompt.clone(),
            item: 0,
            n: job.n,
            first_sample: 0,
        };
        generate(decoder, &[prompt], &options)
            .unwrap()
            .into_iter()
            .map(|c| {
                let text_ids = match c.finish_reason {
                    FinishReason::Stop => &c.ids[..c.ids.len() - 1],
                    FinishReason::Length => &c.ids[..],
                };
                (tok.decode(text_ids, true).unwrap(), c.ids.len())
            })
            .collect()
    }

    #[test]
    fn requests_joining_a_running_batch_decode_as_alone() {
        let (decoder, tok) = load();
        let stats = Arc::new(EngineStats::default());
        let mut engine = Engine::new(
            decoder,
            tok,
            EngineConfig {
                max_batch_size: 16,
                max_slots: 1024,
                stop_ids: tok.stop_token_ids.clone(),
                pad_id: 0,
            },
            Arc::new(AtomicUsize::new(10)),
            stats.clone(),
        );
        let (a, mut ra) = job(tok, "The first request is long", 1, 0.0, 40, 1);
        let (b, mut rb) = job(tok, "b", 3, 0.9, 12, 2);
        let (c, mut rc) = job(
            tok,
            "A third one, with a longer prompt than the others",
            2,
            1.0,
            30,
            3,
        );
        let (d, mut rd) = job(tok, "d d d", 1, 0.0, 25, 4);
        let want: Vec<Vec<(String, usize)>> = [&a, &b, &c, &d]
            .iter()
            .map(|j| reference(&engine.decoder, tok, j))
            .collect();
        // a runs alone for 5 steps; b and c join; d joins 4 steps later.
        let mut batch = engine.step(None, vec![a]).ok().unwrap();
        for _ in 0..4 {
            batch = engine.step(batch, vec![]).ok().unwrap();
        }
        batch = engine.step(batch, vec![b, c]).ok().unwrap();
        for _ in 0..4 {
            batch = engine.step(batch, vec![]).ok().unwrap();
        }
        batch = engine.step(batch, vec![d]).ok().unwrap();
        while batch.is_some() {
            batch = engine.step(batch, vec![]).ok().unwrap();
        }
        assert_eq!(drain(&mut ra, 1), want[0]);
        assert_eq!(drain(&mut rb, 3), want[1]);
        assert_eq!(drain(&mut rc, 2), want[2]);
        assert_eq!(drain(&mut rd, 1), want[3]);
        assert_eq!(stats.joins.load(Ordering::Relaxed), 3);
        assert!(stats.max_rows.load(Ordering::Relaxed) >= 6);
    }

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let (decoder, tok) = load();
        let (free, mut rf) = job(tok, "Once upon a time", 1, 0.0, 30, 0);
        let mut engine = Engine::new(
            decoder,
            tok,
            EngineConfig {
                max_batch_size: 4,
                max_slots: 1024,
                stop_ids: tok.stop_token_ids.clone(),
                pad_id: 0,
            },
            Arc::new(AtomicUsize::new(10)),
            Arc::new(EngineStats::default()),
        );
        let mut batch = engine.step(None, vec![free]).ok().unwrap();
        while batch.is_some() {
            batch = engine.step(batch, vec![]).ok().unwrap();
        }
        let (full, _) = drain(&mut rf, 1).remove(0);
        let chars: Vec<char> = full.chars().collect();
        assert!(chars.len() > 8, "{full:?}");
        // A stop string from the middle of the free text: the answer is the text before it.
        let stop: String = chars[5..8].iter().collect();
        let (mut j, mut rj) = job(tok, "Once upon a time", 1, 0.0, 30, 0);
        j.params.stop_strings = vec![stop.clone()];
        let mut batch = engine.step(None, vec![j]).ok().unwrap();
        while batch.is_some() {
            batch = engine.step(batch, vec![]).ok().unwrap();
        }
        let mut deltas = Vec::new();
        let mut reason = None;
        while let Ok(e) = rj.try_recv() {
            match e {
                GenEvent::Delta { text, .. } => deltas.push(text),
                GenEvent::Done { finish_reason, .. } => reason = Some(finish_reason),
                GenEvent::Error(e) => panic!("{e}"),
            }
        }
        let text: String = deltas.concat();
        assert_eq!(text, &full[..full.find(&stop).unwrap()]);
        assert_eq!(reason, Some(FinishReason::Stop));
        assert!(deltas.iter().all(|d| !d.contains(&stop)));
    }
}
