//! `ferrotune data prepare-genrm`: the genrm-critiques release layout (and our own synthetic
//! rows) → the two training files of `ferrotune genrm`.
//!
//! ## Input
//! `--path` is a file or a folder, searched recursively (hidden entries skipped, files sorted by
//! path). Readable: `.jsonl`, `.json`, `.parquet`, `.jsonl.gz` (the release's `data_collection`
//! shards) and `.zip` (the release's batches: every member that is not a folder, hidden or
//! `__MACOSX` is read as JSONL, or as a JSON list when it starts with `[`). Each file (or zip
//! member) is typed by its first row (CONTRACTS "Datasets"):
//!
//! - **genrm rows** (`inputs`, `targets`; the `cot_*`/`critiques_*` and `rm_*` files, and
//!   `ferrotune data synth`'s `genrm_verify.jsonl` / `genrm_correct.jsonl`):
//!   - `inputs` ending with `Verification: Let's verify step by step.\n` → a CoT verification
//!     row; ending with `Verification: Is the answer correct (Yes/No)?` → a direct row. The label
//!     is the ` Yes` / ` No` that ends `targets`; a verification row whose targets end with
//!     neither is a bad row.
//!   - `inputs` ending with neither cue and `targets` with no verdict (synth's
//!     `genrm_correct.jsonl`: `Q: {q}\nA: ` → a correct solution) → a D_correct row as given.
//! - **solution rows** (`question`, `model_output`, `correctness` — the release's
//!   `data_collection` files — or `question`, `solution`, `label`): laid out with `--format`
//!   (`critiques`: the release's instruction header and `Q: …\nA: Let's think step by step.\n…`,
//!   as `infer::verify::format_inputs`; `terse`: the synthetic world's `Q: …\nA: …`). Each row
//!   gives a direct row (targets ` Yes` / ` No` from the label) and, when it carries a
//!   `verifier_output` critique, a CoT row: the critique up to its last
//!   `Verification: Is the answer correct (Yes/No)?`, then that question and the verdict. The
//!   release calls these critiques unfiltered; as in the paper, only those whose verdict agrees
//!   with `correctness` are kept (the others are skipped and counted). A row without a label is
//!   a bad row.
//! - Files of any other schema (chat, qa, preference, text — e.g. the rest of a synth world, whose
//!   `test.jsonl` must not leak into training) are ignored and listed in the manifest.
//!
//! `--mode cot|direct` keeps only that kind of verification row (default: both).
//!
//! ## D_correct
//! Every correct solution met becomes a D_correct row `{inputs: <problem prompt>, targets:
//! <solution>}` in the verifier's own layout: the verification inputs up to where the solution
//! starts (after `\nA: `, and after `Let's think step by step.\n` when it follows), the solution
//! being the text from there to the cue. So a release row gives `<header>Q: …\nA: Let's think
//! step by step.\n` → solution, a synth row `Q: …\nA: ` → solution (exactly synth's own
//! `genrm_correct.jsonl` layout). Duplicates (the same solution met in several files) are kept
//! once.
//!
//! ## Output (`--out DIR`)
//! - `verify.jsonl` — D_verify, genrm rows: `inputs`, `targets`, `label` (1/0), `mode`
//!   (`cot`/`direct`), `source` (`file:line` under `--path`), and `question_id` /
//!   `model_output_id` when the input row had them. Exact duplicates are dropped.
//! - `correct.jsonl` — D_correct, genrm rows `inputs`, `targets`, `source` (absent when no
//!   correct solution was found).
//! - `manifest.json` — counts: rows read per file, verification rows (cot / direct, correct /
//!   incorrect), D_correct rows by origin, skipped rows by reason, ignored files.
//!
//! Rows are shuffled with `--seed` (so `--train-percentile` and the held-out split draw a mix of
//! files), or kept in file order with `--no-shuffle`. The folder is directly usable:
//! `ferrotune genrm --data DIR` reads `DIR/verify.jsonl` with `DIR/correct.jsonl` as
//! `--correct-data` (see [`prepared_files`]); the two files can also be passed by name.
//!
//! ## Bad input
//! A row that is not a JSON object, lacks its schema's fields or has no usable label is an
//! [`Error::Row`] naming the file (a zip member as `archive.zip/member`), the line and the field;
//! it stops the run, or with `skip_bad_rows` is skipped and counted. An unreadable file or a
//! corrupt archive always stops it.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::reader::{file_rows, kind_of, object_row, JsonlRows, RawRow, Source, ROW_FIELD};
use super::schema::{parse_row, Example, Schema};
use crate::error::{Error, Result};
use crate::infer::verify::{
    format_inputs, label_of_targets, Format, Mode, COT_CUE, CRITIQUES_HEADER, DIRECT_CUE,
};

/// The manifest's `format`: marks a folder written by [`prepare_genrm`].
pub const MANIFEST_FORMAT: &str = "ferrotune-genrm-prepared";
pub const VERIFY_FILE: &str = "verify.jsonl";
pub const CORRECT_FILE: &str = "correct.jsonl";
pub const MANIFEST_FILE: &str = "manifest.json";
/// How many skipped rows the manifest names.
const MAX_EXAMPLES: usize = 10;
/// The verdict question that ends a CoT rationale.
const VERDICT_LINE: &str = "Verification: Is the answer correct (Yes/No)?";

/// Which verification rows to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeFilter {
    All,
    Cot,
    Direct,
}

impl ModeFilter {
    fn keeps(self, mode: Mode) -> bool {
        matches!(
            (self, mode),
            (ModeFilter::All, _)
                | (ModeFilter::Cot, Mode::Cot)
                | (ModeFilter::Direct, Mode::Direct)
        )
    }
}

impl std::str::FromStr for ModeFilter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(ModeFilter::All),
            "cot" => Ok(ModeFilter::Cot),
            "direct" => Ok(ModeFilter::Direct),
            other => Err(Error::invalid(format!(
                "unknown mode `{other}` (all, cot or direct)"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub modes: ModeFilter,
    /// Layout of the rows built from (question, solution) pairs.
    pub format: Format,
    pub skip_bad_rows: bool,
    /// Shuffle both outputs with `seed` (otherwise file order).
    pub shuffle: bool,
    pub seed: u64,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            modes: ModeFilter::All,
            format: Format::Critiques,
            skip_bad_rows: false,
            shuffle: true,
            seed: 0,
        }
    }
}

/// Counts of one input file (or zip member).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FileStats {
    pub file: String,
    pub schema: String,
    /// Rows read (bad rows included).
    pub rows: usize,
    pub verify_rows: usize,
    pub cot: usize,
    pub direct: usize,
    pub correct: usize,
    pub incorrect: usize,
    /// D_correct rows this file contributed (before de-duplication).
    pub correct_solutions: usize,
    /// Verification rows left out by `--mode`.
    pub filtered_by_mode: usize,
    pub skipped: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VerifyCounts {
    pub rows: usize,
    pub cot: usize,
    pub direct: usize,
    pub correct: usize,
    pub incorrect: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CorrectCounts {
    /// Rows written to correct.jsonl.
    pub rows: usize,
    /// Taken from correct verification rows (genrm inputs).
    pub from_verify_rows: usize,
    /// Taken from correct solution rows (question, solution).
    pub from_solution_rows: usize,
    /// Given as D_correct rows (synth's genrm_correct.jsonl).
    pub given: usize,
    /// Correct verification rows whose solution could not be found in `inputs` (no `Q: … A: `).
    pub not_extracted: usize,
    pub duplicates: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Skipped {
    pub rows: usize,
    pub reasons: BTreeMap<String, usize>,
    /// The first few, as `file:line: reason`.
    pub examples: Vec<String>,
}

impl Skipped {
    fn record(&mut self, reason: &str, example: String) {
        self.rows += 1;
        *self.reasons.entry(reason.to_string()).or_default() += 1;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(example);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IgnoredFile {
    pub file: String,
    pub reason: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Manifest {
    pub format: String,
    pub source: PathBuf,
    pub mode: ModeFilter,
    /// Layout of rows built from (question, solution) pairs: `critiques` or `terse`.
    pub solution_format: String,
    pub shuffled: bool,
    pub seed: u64,
    pub verify_file: String,
    /// None when no correct solution was found.
    pub correct_file: Option<String>,
    pub verify: VerifyCounts,
    pub correct: CorrectCounts,
    pub files: Vec<FileStats>,
    pub ignored_files: Vec<IgnoredFile>,
    pub skipped: Skipped,
}

/// The training files of a folder written by [`prepare_genrm`] (its manifest names them), or
/// `None` when `path` is not such a folder: `(verify.jsonl, Some(correct.jsonl))`.
pub fn prepared_files(path: &Path) -> Option<(PathBuf, Option<PathBuf>)> {
    if !path.is_dir() {
        return None;
    }
    let manifest = crate::error::read_json(&path.join(MANIFEST_FILE)).ok()?;
    if manifest.get("format")?.as_str()? != MANIFEST_FORMAT {
        return None;
    }
    let verify = path.join(manifest.get("verify_file")?.as_str()?);
    let correct = manifest
        .get("correct_file")
        .and_then(Value::as_str)
        .map(|f| path.join(f));
    Some((verify, correct))
}

/// The D_correct prompt of a question in `format`'s layout.
pub fn correct_prompt(question: &str, format: Format) -> String {
    match format {
        Format::Critiques => {
            format!("{CRITIQUES_HEADER}Q: {question}\nA: Let's think step by step.\n")
        }
        Format::Terse => crate::synth::critique::correct_inputs(question),
    }
}

/// Splits verification inputs without their cue into the problem prompt (through `\nA: ` and a
/// following `Let's think step by step.\n`) and the solution (trailing whitespace dropped).
/// `None` when there is no `Q: …\nA: ` or the solution is empty.
pub fn split_solution(body: &str) -> Option<(&str, &str)> {
    let q = if body.starts_with("Q: ") {
        0
    } else {
        body.rfind("\nQ: ")? + 1
    };
    let a = q + body[q..].find("\nA: ")? + "\nA: ".len();
    let step = "Let's think step by step.\n";
    let start = if body[a..].starts_with(step) {
        a + step.len()
    } else {
        a
    };
    let solution = body[start..].trim_end();
    (!solution.is_empty()).then_some((&body[..start], solution))
}

/// The CoT targets made of a raw critique (the release's `verifier_output`) whose final verdict
/// must be `label`: the critique through its last verdict question, then ` Yes` / ` No`. The
/// reason it cannot be used otherwise.
pub fn critique_targets(critique: &str, label: bool) -> std::result::Result<String, &'static str> {
    let at = critique
        .rfind(VERDICT_LINE)
        .ok_or("critique has no final verdict question")?;
    let after = critique[at + VERDICT_LINE.len()..]
        .trim_start_matches(|c: char| c.is_whitespace() || c == '*');
    let verdict = if after.starts_with("Yes") {
        true
    } else if after.starts_with("No") {
        false
    } else {
        return Err("critique's final verdict is neither Yes nor No");
    };
    if verdict != label {
        return Err("critique's verdict disagrees with the label");
    }
    let mut body = critique[..at].trim_end();
    // An opening `**` left alone on the last line (`**Verification: … Yes**`).
    if let Some(nl) = body.rfind('\n') {
        if body[nl + 1..].chars().all(|c| c == '*') {
            body = body[..nl].trim_end();
        }
    } else if body.chars().all(|c| c == '*') {
        body = "";
    }
    let answer = if label { " Yes" } else { " No" };
    Ok(if body.is_empty() {
        format!("{VERDICT_LINE}{answer}")
    } else {
        format!("{body}\n\n{VERDICT_LINE}{answer}")
    })
}

fn digest(a: &str, b: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((a.len() as u64).to_le_bytes());
    h.update(a.as_bytes());
    h.update(b.as_bytes());
    h.finalize().into()
}

/// What a row turned into.
enum Origin {
    Verify,
    Solution,
    Given,
}

struct Builder<'a> {
    root: PathBuf,
    single_file: bool,
    options: &'a PrepareOptions,
    verify: Vec<Value>,
    verify_seen: HashSet<[u8; 32]>,
    correct: Vec<Value>,
    correct_seen: HashSet<[u8; 32]>,
    verify_counts: VerifyCounts,
    correct_counts: CorrectCounts,
    files: Vec<FileStats>,
    ignored: Vec<IgnoredFile>,
    skipped: Skipped,
}

impl Builder<'_> {
    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .ok()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(path)
            .display()
            .to_string()
    }

    fn source_text(&self, source: &Source) -> String {
        format!("{}:{}", self.relative(&source.path), source.line)
    }

    /// A file that holds no verification data: listed, or an error when it was the one input.
    fn ignore(&mut self, path: &Path, reason: String) -> Result<()> {
        if self.single_file {
            return Err(Error::file(path, reason));
        }
        tracing::info!("ignoring {}: {reason}", path.display());
        self.ignored.push(IgnoredFile {
            file: self.relative(path),
            reason,
        });
        Ok(())
    }

    /// The bad-row policy: a row error is skipped and counted with `skip_bad_rows`, else returned.
    fn bad(&mut self, error: Error, stats: &mut FileStats) -> Result<()> {
        match &error {
            Error::Row { .. } if self.options.skip_bad_rows => {
                tracing::warn!("skipping bad row: {error}");
                stats.skipped += 1;
                self.skipped.record("bad row", error.to_string());
                Ok(())
            }
            _ => Err(error),
        }
    }

    fn skip(&mut self, source: &Source, reason: &str, stats: &mut FileStats) {
        stats.skipped += 1;
        let example = format!("{}: {reason}", self.source_text(source));
        self.skipped.record(reason, example);
    }

    /// Reads one file or member's rows; `path` names it in the manifest.
    fn process(&mut self, path: &Path, rows: impl Iterator<Item = Result<RawRow>>) -> Result<()> {
        let mut stats = FileStats {
            file: self.relative(path),
            ..Default::default()
        };
        let mut schema = None;
        for row in rows {
            let row = match row {
                Ok(row) => row,
                Err(e) => {
                    stats.rows += usize::from(matches!(e, Error::Row { .. }));
                    self.bad(e, &mut stats)?;
                    continue;
                }
            };
            let s = match schema {
                Some(s) => s,
                None => match Schema::detect(&row.value) {
                    Some(s @ (Schema::Genrm | Schema::Solution)) => {
                        stats.schema = s.name().to_string();
                        schema = Some(s);
                        s
                    }
                    Some(other) => {
                        return self.ignore(
                            path,
                            format!(
                                "`{other}` rows are not verification data (genrm or solution rows)"
                            ),
                        )
                    }
                    None => {
                        let fields: Vec<&String> = row
                            .value
                            .as_object()
                            .map(|o| o.keys().collect())
                            .unwrap_or_default();
                        return self.ignore(
                            path,
                            format!("no schema fits the first row's fields {fields:?}"),
                        );
                    }
                },
            };
            stats.rows += 1;
            if let Err(e) = self.row(&row, s, &mut stats) {
                self.bad(e, &mut stats)?;
            }
        }
        if schema.is_none() && stats.rows == 0 {
            return self.ignore(path, "no rows".to_string());
        }
        self.files.push(stats);
        Ok(())
    }

    fn row(&mut self, row: &RawRow, schema: Schema, stats: &mut FileStats) -> Result<()> {
        let parsed = parse_row(row, schema)?;
        match parsed.example {
            Example::Genrm { inputs, targets } => self.genrm_row(row, inputs, targets, stats),
            Example::Solution {
                question,
                solution,
                label,
            } => self.solution_row(row, &question, &solution, label, stats),
            _ => Err(row
                .source
                .error(ROW_FIELD, "expected a genrm or solution row")),
        }
    }

    fn genrm_row(
        &mut self,
        row: &RawRow,
        inputs: String,
        targets: String,
        stats: &mut FileStats,
    ) -> Result<()> {
        let cue = [(Mode::Cot, COT_CUE), (Mode::Direct, DIRECT_CUE)]
            .into_iter()
            .find(|(_, cue)| inputs.ends_with(cue));
        let label = label_of_targets(&targets);
        match (cue, label) {
            (None, None) => {
                self.add_correct(&inputs, &targets, &row.source, Origin::Given, stats);
                Ok(())
            }
            (None, Some(_)) => Err(row.source.error(
                "inputs",
                format!(
                    "`targets` ends with a verdict, but `inputs` ends with neither the CoT cue {COT_CUE:?} nor the direct cue {DIRECT_CUE:?}"
                ),
            )),
            (Some(_), None) => Err(row.source.error(
                "targets",
                "a verification row's targets must end with the verdict ` Yes` or ` No`",
            )),
            (Some((mode, cue)), Some(label)) => {
                if label {
                    match split_solution(&inputs[..inputs.len() - cue.len()]) {
                        Some((prompt, solution)) => {
                            self.add_correct(prompt, solution, &row.source, Origin::Verify, stats)
                        }
                        None => self.correct_counts.not_extracted += 1,
                    }
                }
                self.add_verify(row, inputs, targets, mode, label, stats);
                Ok(())
            }
        }
    }

    fn solution_row(
        &mut self,
        row: &RawRow,
        question: &str,
        solution: &str,
        label: Option<bool>,
        stats: &mut FileStats,
    ) -> Result<()> {
        let label = label.ok_or_else(|| {
            row.source.error(
                "label",
                "missing: a solution row needs its correctness (`correctness` or `label`) to become verification data",
            )
        })?;
        let format = self.options.format;
        let critique = match row.value.get("verifier_output") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(other) => {
                return Err(row.source.error(
                    "verifier_output",
                    format!("expected a string, found {}", kind_of(other)),
                ));
            }
        };
        if label {
            let prompt = correct_prompt(question, format);
            self.add_correct(
                &prompt,
                solution.trim_end(),
                &row.source,
                Origin::Solution,
                stats,
            );
        }
        let verdict = if label { " Yes" } else { " No" };
        self.add_verify(
            row,
            format_inputs(question, solution, Mode::Direct, format),
            verdict.to_string(),
            Mode::Direct,
            label,
            stats,
        );
        match critique.map(|c| critique_targets(c, label)) {
            Some(Ok(targets)) => self.add_verify(
                row,
                format_inputs(question, solution, Mode::Cot, format),
                targets,
                Mode::Cot,
                label,
                stats,
            ),
            Some(Err(reason)) if self.options.modes.keeps(Mode::Cot) => {
                self.skip(&row.source, reason, stats)
            }
            None if self.options.modes == ModeFilter::Cot => self.skip(
                &row.source,
                "no `verifier_output` critique for a CoT row",
                stats,
            ),
            _ => {}
        }
        Ok(())
    }

    fn add_verify(
        &mut self,
        row: &RawRow,
        inputs: String,
        targets: String,
        mode: Mode,
        label: bool,
        stats: &mut FileStats,
    ) {
        if !self.options.modes.keeps(mode) {
            stats.filtered_by_mode += 1;
            return;
        }
        if !self.verify_seen.insert(digest(&inputs, &targets)) {
            self.skip(&row.source, "duplicate verification row", stats);
            return;
        }
        let mut out = Map::new();
        out.insert("inputs".into(), inputs.into());
        out.insert("targets".into(), targets.into());
        out.insert("label".into(), u8::from(label).into());
        out.insert(
            "mode".into(),
            if mode == Mode::Cot { "cot" } else { "direct" }.into(),
        );
        out.insert("source".into(), self.source_text(&row.source).into());
        for key in ["question_id", "model_output_id"] {
            if let Some(v) = row.value.get(key).filter(|v| !v.is_null()) {
                out.insert(key.into(), v.clone());
            }
        }
        self.verify.push(Value::Object(out));
        let (counts, mode_count) = (&mut self.verify_counts, mode == Mode::Cot);
        counts.rows += 1;
        stats.verify_rows += 1;
        if mode_count {
            counts.cot += 1;
            stats.cot += 1;
        } else {
            counts.direct += 1;
            stats.direct += 1;
        }
        if label {
            counts.correct += 1;
            stats.correct += 1;
        } else {
            counts.incorrect += 1;
            stats.incorrect += 1;
        }
    }

    fn add_correct(
        &mut self,
        prompt: &str,
        solution: &str,
        source: &Source,
        origin: Origin,
        stats: &mut FileStats,
    ) {
        stats.correct_solutions += 1;
        if !self.correct_seen.insert(digest(prompt, solution)) {
            self.correct_counts.duplicates += 1;
            return;
        }
        match origin {
            Origin::Verify => self.correct_counts.from_verify_rows += 1,
            Origin::Solution => self.correct_counts.from_solution_rows += 1,
            Origin::Given => self.correct_counts.given += 1,
        }
        self.correct.push(json!({
            "inputs": prompt,
            "targets": solution,
            "source": self.source_text(source),
        }));
    }
}

/// Rows of a stream that is JSONL, or a JSON list when its first non-blank byte is `[`.
fn stream_rows<R: BufRead + 'static>(
    mut reader: R,
    path: &Path,
) -> Result<Box<dyn Iterator<Item = Result<RawRow>>>> {
    let first = loop {
        let buf = reader.fill_buf().map_err(|e| Error::io(path, e))?;
        if buf.is_empty() {
            break None;
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => break Some(buf[i]),
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    if first != Some(b'[') {
        return Ok(Box::new(JsonlRows::from_reader(reader, path)));
    }
    let mut text = Vec::new();
    reader
        .read_to_end(&mut text)
        .map_err(|e| Error::io(path, e))?;
    let list: Vec<Value> = serde_json::from_slice(&text)
        .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    let path: Arc<Path> = Arc::from(path);
    Ok(Box::new(list.into_iter().enumerate().map(move |(i, v)| {
        object_row(
            v,
            Source {
                path: path.clone(),
                line: i + 1,
            },
        )
    })))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    /// `.jsonl`, `.json`, `.parquet`: the dataset reader.
    Plain,
    JsonlGz,
    Zip,
}

fn kind_of_file(path: &Path) -> Option<InputKind> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.ends_with(".jsonl.gz") || name.ends_with(".json.gz") {
        Some(InputKind::JsonlGz)
    } else if name.ends_with(".zip") {
        Some(InputKind::Zip)
    } else if name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".parquet") {
        Some(InputKind::Plain)
    } else {
        None
    }
}

fn walk(dir: &Path, skip: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.canonicalize().ok().as_deref() == Some(skip) {
            continue;
        }
        if path.is_dir() {
            walk(&path, skip, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn zip_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(path, format!("cannot read the zip archive: {e}"))
}

impl Builder<'_> {
    fn read_file(&mut self, path: &Path) -> Result<()> {
        match kind_of_file(path) {
            None => self.ignore(
                path,
                "not a data file (.jsonl, .json, .parquet, .jsonl.gz or .zip)".to_string(),
            ),
            Some(InputKind::Plain) => match file_rows(path, None) {
                Ok(rows) => self.process(path, rows),
                // A `.json` that is not a list of rows (e.g. a synth world's world.json).
                Err(Error::File { message, .. }) if !self.single_file => self.ignore(path, message),
                Err(e) => Err(e),
            },
            Some(InputKind::JsonlGz) => {
                let file = File::open(path).map_err(|e| Error::io(path, e))?;
                let reader = BufReader::new(flate2::read::MultiGzDecoder::new(file));
                let rows = stream_rows(reader, path)?;
                self.process(path, rows)
            }
            Some(InputKind::Zip) => {
                let file = File::open(path).map_err(|e| Error::io(path, e))?;
                let mut archive =
                    zip::ZipArchive::new(BufReader::new(file)).map_err(|e| zip_error(path, e))?;
                let was_single = std::mem::replace(&mut self.single_file, false);
                let mut members = 0;
                for i in 0..archive.len() {
                    let member = archive.by_index(i).map_err(|e| zip_error(path, e))?;
                    let name = member.name().map_err(|e| zip_error(path, e))?.to_string();
                    let member_path = path.join(&name);
                    let hidden = name
                        .split('/')
                        .any(|part| part.starts_with('.') || part == "__MACOSX");
                    if member.is_dir() || hidden {
                        continue;
                    }
                    members += 1;
                    let lower = name.to_ascii_lowercase();
                    if lower.ends_with(".parquet")
                        || lower.ends_with(".gz")
                        || lower.ends_with(".zip")
                    {
                        drop(member);
                        self.ignore(
                            &member_path,
                            "only JSONL or JSON members of a zip archive are read".to_string(),
                        )?;
                        continue;
                    }
                    // The member is read to memory: a `ZipFile` borrows the archive.
                    let mut bytes = Vec::new();
                    let mut member = member;
                    member
                        .read_to_end(&mut bytes)
                        .map_err(|e| Error::io(&member_path, e))?;
                    let rows = stream_rows(std::io::Cursor::new(bytes), &member_path)?;
                    self.process(&member_path, rows)?;
                }
                self.single_file = was_single;
                if members == 0 {
                    return self.ignore(path, "the archive holds no files".to_string());
                }
                Ok(())
            }
        }
    }
}

/// Reads `path` (a file or a folder) and writes `verify.jsonl`, `correct.jsonl` and
/// `manifest.json` into `out` (see the module docs). Returns the manifest.
pub fn prepare_genrm(path: &Path, out: &Path, options: &PrepareOptions) -> Result<Manifest> {
    if !path.exists() {
        return Err(Error::file(path, "input path does not exist"));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let out_canonical = out.canonicalize().map_err(|e| Error::io(out, e))?;
    let single_file = !path.is_dir();
    if !single_file && path.canonicalize().ok().as_deref() == Some(&out_canonical) {
        return Err(Error::invalid(format!(
            "--out {} is the input folder; choose another output folder",
            out.display()
        )));
    }
    let files = if single_file {
        vec![path.to_path_buf()]
    } else {
        let mut files = Vec::new();
        walk(path, &out_canonical, &mut files)?;
        files.sort();
        files
    };
    let mut b = Builder {
        root: if single_file {
            path.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            path.to_path_buf()
        },
        single_file,
        options,
        verify: Vec::new(),
        verify_seen: HashSet::new(),
        correct: Vec::new(),
        correct_seen: HashSet::new(),
        verify_counts: VerifyCounts::default(),
        correct_counts: CorrectCounts::default(),
        files: Vec::new(),
        ignored: Vec::new(),
        skipped: Skipped::default(),
    };
    for file in &files {
        b.read_file(file)?;
    }
    if b.verify.is_empty() {
        let ignored: Vec<String> = b
            .ignored
            .iter()
            .map(|i| format!("{} ({})", i.file, i.reason))
            .collect();
        return Err(Error::file(
            path,
            format!(
                "no verification rows (genrm `inputs`/`targets` ending with a verification cue, or labelled solution rows{}){}",
                if options.modes == ModeFilter::All {
                    String::new()
                } else {
                    format!(" of mode {:?}", options.modes)
                },
                if ignored.is_empty() {
                    String::new()
                } else {
                    format!("; ignored: {}", ignored.join("; "))
                }
            ),
        ));
    }
    if options.shuffle {
        let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
        b.verify.shuffle(&mut rng);
        b.correct.shuffle(&mut rng);
    }
    b.correct_counts.rows = b.correct.len();
    let write_rows = |name: &str, rows: &[Value]| -> Result<()> {
        let mut text = String::new();
        for row in rows {
            text.push_str(&serde_json::to_string(row).expect("JSON row"));
            text.push('\n');
        }
        crate::io::checkpoint::write_atomic(&out.join(name), text.as_bytes())
    };
    write_rows(VERIFY_FILE, &b.verify)?;
    let correct_file = if b.correct.is_empty() {
        tracing::warn!(
            "no correct solutions found: no {CORRECT_FILE} (the λ·L_correct term will be empty)"
        );
        let _ = std::fs::remove_file(out.join(CORRECT_FILE));
        None
    } else {
        write_rows(CORRECT_FILE, &b.correct)?;
        Some(CORRECT_FILE.to_string())
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        source: path.to_path_buf(),
        mode: options.modes,
        solution_format: match options.format {
            Format::Critiques => "critiques",
            Format::Terse => "terse",
        }
        .to_string(),
        shuffled: options.shuffle,
        seed: options.seed,
        verify_file: VERIFY_FILE.to_string(),
        correct_file,
        verify: b.verify_counts,
        correct: b.correct_counts,
        files: b.files,
        ignored_files: b.ignored,
        skipped: b.skipped,
    };
    let mut text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    text.push('\n');
    crate::io::checkpoint::write_atomic(&out.join(MANIFEST_FILE), text.as_bytes())?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load_dataset, LoadOptions};
    use std::io::Write;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data/genrm")
    }

    fn read_jsonl(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn unshuffled() -> PrepareOptions {
        PrepareOptions {
            shuffle: false,
            ..Default::default()
        }
    }

    /// Every written row loads as a genrm row, each verify label agrees with its targets, and
    /// D_correct rows carry no verdict.
    fn check_outputs(out: &Path) -> (Vec<Value>, Vec<Value>) {
        for file in [VERIFY_FILE, CORRECT_FILE] {
            let data = load_dataset(&out.join(file), &LoadOptions::default()).unwrap();
            assert_eq!(data.schema, Schema::Genrm, "{file}");
        }
        let verify = read_jsonl(&out.join(VERIFY_FILE));
        for row in &verify {
            let label = label_of_targets(row["targets"].as_str().unwrap()).unwrap();
            assert_eq!(row["label"], u8::from(label), "{row}");
            let inputs = row["inputs"].as_str().unwrap();
            let cue = if row["mode"] == "cot" {
                COT_CUE
            } else {
                DIRECT_CUE
            };
            assert!(inputs.ends_with(cue), "{row}");
        }
        let correct = read_jsonl(&out.join(CORRECT_FILE));
        for row in &correct {
            let inputs = row["inputs"].as_str().unwrap();
            assert!(
                inputs.ends_with("\nA: Let's think step by step.\n") || inputs.ends_with("\nA: "),
                "{row}"
            );
            assert!(!row["targets"].as_str().unwrap().is_empty());
        }
        (verify, correct)
    }

    #[test]
    fn the_release_samples_become_verify_and_correct_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let m = prepare_genrm(&fixtures(), &out, &unshuffled()).unwrap();
        let by_file: BTreeMap<&str, &FileStats> =
            m.files.iter().map(|f| (f.file.as_str(), f)).collect();
        // 4 rows per release file (the first lines of ../shared/data/genrm, unchanged).
        let cot = by_file["cot_correct_val_qidmod5_01.jsonl"];
        assert_eq!(
            (cot.rows, cot.cot, cot.correct, cot.schema.as_str()),
            (4, 4, 4, "genrm")
        );
        let rm = by_file["rm_incorrect_batch00_first100.jsonl"];
        assert_eq!((rm.rows, rm.direct, rm.incorrect), (4, 4, 4));
        let dc = by_file["data_collection_critique_gen_correct_r0s0_300.jsonl"];
        assert_eq!((dc.rows, dc.schema.as_str()), (4, "solution"));
        // Each data_collection row: a direct row, and a CoT row when its critique agrees.
        assert_eq!(dc.direct, 4);
        assert_eq!(dc.cot + dc.skipped, 4);
        assert!(dc.cot >= 1, "{dc:?}");
        assert_eq!(m.verify.rows, m.verify.cot + m.verify.direct);
        assert_eq!(m.verify.rows, m.verify.correct + m.verify.incorrect);
        assert_eq!(
            m.verify.cot,
            4 + 4
                + m.files
                    .iter()
                    .filter(|f| f.schema == "solution")
                    .map(|f| f.cot)
                    .sum::<usize>()
        );
        // The README is listed, not read.
        assert!(m.ignored_files.iter().any(|f| f.file == "README.md"));
        let (verify, correct) = check_outputs(&out);
        assert_eq!(verify.len(), m.verify.rows);
        assert_eq!(correct.len(), m.correct.rows);
        // D_correct: every correct solution of the cot, rm and data_collection files, once.
        for f in m.files.iter().filter(|f| f.schema == "genrm") {
            assert_eq!(f.correct_solutions, f.correct, "{f:?}");
        }
        let met: usize = m.files.iter().map(|f| f.correct_solutions).sum();
        assert_eq!(
            met,
            m.correct.from_verify_rows
                + m.correct.from_solution_rows
                + m.correct.given
                + m.correct.duplicates
        );
        assert_eq!(m.correct.from_solution_rows, 4);
        let first = &correct[0];
        assert!(first["inputs"]
            .as_str()
            .unwrap()
            .starts_with("Solve the math problems"));
        assert!(first["targets"].as_str().unwrap().contains("The answer is"));
        let source = verify[0]["source"].as_str().unwrap();
        assert!(
            source.starts_with("cot_correct_val_qidmod5_01.jsonl:1"),
            "{source}"
        );
        assert!(verify[0].get("question_id").is_some());
        // The manifest on disk is what was returned, and marks the folder for `genrm --data`.
        let on_disk: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(MANIFEST_FILE)).unwrap())
                .unwrap();
        assert_eq!(on_disk, serde_json::to_value(&m).unwrap());
        assert_eq!(
            prepared_files(&out),
            Some((out.join(VERIFY_FILE), Some(out.join(CORRECT_FILE))))
        );
        assert_eq!(prepared_files(&fixtures()), None);
        // --mode direct keeps only direct rows.
        let direct = prepare_genrm(
            &fixtures(),
            &tmp.path().join("direct"),
            &PrepareOptions {
                modes: ModeFilter::Direct,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (direct.verify.cot, direct.verify.direct),
            (0, m.verify.direct)
        );
    }

    /// The full public sample, when this checkout sits beside ../shared.
    #[test]
    fn the_whole_shared_sample_when_present() {
        let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/genrm");
        if !shared.is_dir() {
            eprintln!("skipped: {} is absent", shared.display());
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let m = prepare_genrm(&shared, tmp.path(), &PrepareOptions::default()).unwrap();
        let rows: BTreeMap<&str, usize> =
            m.files.iter().map(|f| (f.file.as_str(), f.rows)).collect();
        assert_eq!(rows["cot_correct_val_qidmod5_01.jsonl"], 49);
        assert_eq!(rows["cot_incorrect_val_qidmod5_01.jsonl"], 58);
        assert_eq!(rows["rm_correct_batch00_first100.jsonl"], 100);
        assert_eq!(
            rows["data_collection_critique_gen_incorrect_r0s0_300.jsonl"],
            300
        );
        // Candidates: 107 CoT and 200 direct release rows, and per data_collection row a direct
        // row and a CoT row from its critique. Each is written, or skipped because its critique
        // disagrees with the label, or because it repeats a row (a data_collection solution
        // laid out by `format_inputs` is byte for byte the rm row of that solution).
        assert_eq!(m.verify.rows + m.skipped.rows, 107 + 200 + 2 * 600, "{m:?}");
        assert!(m.skipped.reasons["duplicate verification row"] > 0);
        // 401 of the 600 critiques end with the verdict question and agree with the label.
        assert_eq!(m.verify.cot, 107 + 401, "{:?}", m.skipped.reasons);
        assert!(m.verify.direct > 790, "{:?}", m.verify);
        assert!(m
            .skipped
            .reasons
            .contains_key("critique's verdict disagrees with the label"));
        check_outputs(tmp.path());
    }

    #[test]
    fn zip_and_gzip_inputs_name_their_members() {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("in");
        std::fs::create_dir_all(&input).unwrap();
        let lines: Vec<String> =
            std::fs::read_to_string(fixtures().join("rm_correct_batch00_first100.jsonl"))
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect();
        let incorrect =
            std::fs::read_to_string(fixtures().join("rm_incorrect_batch00_first100.jsonl"))
                .unwrap();
        // A deflated archive: a JSONL member (under a folder, with a blank line), a JSON-list
        // member, and the clutter macOS adds.
        let zip_path = input.join("rm_batch.zip");
        let mut zw = zip::ZipWriter::new(File::create(&zip_path).unwrap());
        let deflated = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zw.add_directory("batch/", deflated).unwrap();
        zw.start_file("batch/rm_correct.jsonl", deflated).unwrap();
        zw.write_all(format!("{}\n\n{}\n", lines[0], lines[1]).as_bytes())
            .unwrap();
        zw.start_file("rm_incorrect.json", deflated).unwrap();
        let list: Vec<Value> = incorrect
            .lines()
            .take(3)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        zw.write_all(serde_json::to_string(&list).unwrap().as_bytes())
            .unwrap();
        zw.start_file("__MACOSX/._rm_correct.jsonl", deflated)
            .unwrap();
        zw.write_all(b"\x00\x05binary").unwrap();
        zw.finish().unwrap();
        // A gzipped shard, as the release's data_collection files.
        let gz_path = input.join("data_collection_shard_0.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(
            File::create(&gz_path).unwrap(),
            flate2::Compression::default(),
        );
        let dc = std::fs::read_to_string(
            fixtures().join("data_collection_critique_gen_incorrect_r0s0_300.jsonl"),
        )
        .unwrap();
        gz.write_all(dc.lines().take(2).collect::<Vec<_>>().join("\n").as_bytes())
            .unwrap();
        gz.finish().unwrap();

        let out = tmp.path().join("out");
        let m = prepare_genrm(&input, &out, &unshuffled()).unwrap();
        let rows: BTreeMap<&str, (usize, usize)> = m
            .files
            .iter()
            .map(|f| (f.file.as_str(), (f.rows, f.verify_rows)))
            .collect();
        assert_eq!(rows["rm_batch.zip/batch/rm_correct.jsonl"], (2, 2));
        assert_eq!(rows["rm_batch.zip/rm_incorrect.json"], (3, 3));
        assert_eq!(rows["data_collection_shard_0.jsonl.gz"].0, 2);
        assert_eq!(m.verify.correct, 2);
        assert_eq!(m.correct.rows, 2);
        let (verify, _) = check_outputs(&out);
        let sources: Vec<&str> = verify
            .iter()
            .map(|r| r["source"].as_str().unwrap())
            .filter(|s| s.starts_with("rm_batch.zip/batch/"))
            .collect();
        // The blank line is skipped but counted: the second row is on line 3.
        assert_eq!(
            sources,
            [
                "rm_batch.zip/batch/rm_correct.jsonl:1",
                "rm_batch.zip/batch/rm_correct.jsonl:3"
            ]
        );
        // A zip file given alone is read too.
        let alone = prepare_genrm(&zip_path, &tmp.path().join("alone"), &unshuffled()).unwrap();
        assert_eq!(alone.verify.rows, 5);

        // A corrupt archive or member is an error naming it, not a panic.
        let broken = tmp.path().join("broken.zip");
        std::fs::write(&broken, b"PK\x03\x04 this is not a zip").unwrap();
        let err = prepare_genrm(&broken, &tmp.path().join("b"), &unshuffled())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken.zip") && err.contains("zip archive"),
            "{err}"
        );
        // Flipped bytes inside the first member's compressed data: a CRC or inflate error.
        let mut bytes = std::fs::read(&zip_path).unwrap();
        let name = b"batch/rm_correct.jsonl";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 40;
        for b in &mut bytes[at..at + 40] {
            *b ^= 0x5a;
        }
        std::fs::write(&broken, &bytes).unwrap();
        let err = prepare_genrm(&broken, &tmp.path().join("b"), &unshuffled())
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.zip"), "{err}");
    }

    #[test]
    fn bad_rows_name_file_line_and_field_or_are_skipped_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("bad.jsonl");
        std::fs::write(
            &input,
            concat!(
                "{\"inputs\": \"Q: 1+1=?\\nA: 2\\nVerification: Is the answer correct (Yes/No)?\", \"targets\": \" Yes\"}\n",
                "{\"inputs\": \"Q: 1+2=?\\nA: 4\\nVerification: Is the answer correct (Yes/No)?\", \"targets\": \" Maybe\"}\n",
                "{\"inputs\": \"Q: 2+2=?\\nA: 4\\nVerification: Is the answer correct (Yes/No)?\"}\n",
                "{not json\n",
                "[1, 2]\n",
                "{\"inputs\": \"Q: 3+3=?\\nA: 6\\n\", \"targets\": \" Yes\"}\n",
                "{\"inputs\": \"Q: 2+3=?\\nA: 6\\nVerification: Is the answer correct (Yes/No)?\", \"targets\": \" No\"}\n",
            ),
        )
        .unwrap();
        let out = tmp.path().join("out");
        let err = prepare_genrm(&input, &out, &unshuffled())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.jsonl:2: field `targets`"), "{err}");
        let m = prepare_genrm(
            &input,
            &out,
            &PrepareOptions {
                skip_bad_rows: true,
                shuffle: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (m.verify.rows, m.verify.correct, m.verify.incorrect),
            (2, 1, 1)
        );
        assert_eq!(m.skipped.rows, 5);
        assert_eq!(m.skipped.reasons["bad row"], 5);
        let examples = m.skipped.examples.join("\n");
        for expected in [
            "bad.jsonl:2: field `targets`",
            "bad.jsonl:3: field `targets`: missing",
            "bad.jsonl:4: field `(row)`: invalid JSON",
            "bad.jsonl:5: field `(row)`: expected a JSON object",
            "bad.jsonl:6: field `inputs`",
        ] {
            assert!(examples.contains(expected), "{expected}: {examples}");
        }
        assert_eq!(m.files[0].rows, 7);
        // A terse verification row gives the synth D_correct layout.
        let correct = read_jsonl(&out.join(CORRECT_FILE));
        assert_eq!(correct[0]["inputs"], "Q: 1+1=?\nA: ");
        assert_eq!(correct[0]["targets"], "2");

        // Solution rows without a label, and files that hold no verification data.
        let unlabeled = tmp.path().join("unlabeled.jsonl");
        std::fs::write(&unlabeled, "{\"question\": \"q\", \"solution\": \"s\"}\n").unwrap();
        let err = prepare_genrm(&unlabeled, &out, &unshuffled())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unlabeled.jsonl:1: field `label`: missing"),
            "{err}"
        );
        let chat = tmp.path().join("chat.jsonl");
        std::fs::write(
            &chat,
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        )
        .unwrap();
        let err = prepare_genrm(&chat, &out, &unshuffled())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chat.jsonl") && err.contains("`chat` rows"),
            "{err}"
        );
        let err = prepare_genrm(&tmp.path().join("nope"), &out, &unshuffled())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope") && err.contains("does not exist"),
            "{err}"
        );
        let err = prepare_genrm(tmp.path(), tmp.path(), &unshuffled())
            .unwrap_err()
            .to_string();
        assert!(err.contains("input folder"), "{err}");
    }

    #[test]
    fn a_synth_world_gives_its_verify_rows_and_d_correct() {
        let tmp = tempfile::tempdir().unwrap();
        let world = tmp.path().join("world");
        let config = crate::synth::files::WorldConfig {
            seed: 5,
            n_test: 4,
            ..Default::default()
        }
        .with_size(12);
        let summary = crate::synth::files::write_world(&world, &config).unwrap();
        let out = tmp.path().join("out");
        let m = prepare_genrm(
            &world,
            &out,
            &PrepareOptions {
                format: Format::Terse,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(m.verify.rows, 12);
        assert_eq!(m.verify.cot, 12);
        assert_eq!(m.verify.correct, summary.genrm_correct_candidates);
        assert_eq!(m.correct.given, 12);
        assert_eq!(
            m.correct.from_verify_rows + m.correct.duplicates,
            summary.genrm_correct_candidates
        );
        // Only the two genrm files are read; the others (test.jsonl above all) are ignored.
        let read: Vec<&str> = m.files.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(read, ["genrm_correct.jsonl", "genrm_verify.jsonl"]);
        for name in [
            "test.jsonl",
            "sft.jsonl",
            "pretrain.jsonl",
            "preference.jsonl",
            "world.json",
        ] {
            assert!(
                m.ignored_files.iter().any(|f| f.file == name),
                "{name}: {:?}",
                m.ignored_files
            );
        }
        let (_, correct) = check_outputs(&out);
        assert!(correct
            .iter()
            .all(|r| r["inputs"].as_str().unwrap().starts_with("Q: ")));
        // Shuffling is seeded: the same seed gives the same files.
        let again = tmp.path().join("again");
        prepare_genrm(
            &world,
            &again,
            &PrepareOptions {
                format: Format::Terse,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            std::fs::read(out.join(VERIFY_FILE)).unwrap(),
            std::fs::read(again.join(VERIFY_FILE)).unwrap()
        );
    }

    #[test]
    fn critiques_are_cut_at_their_last_verdict() {
        let c = "Step 1 ok.\n\n**Verification: Is the answer correct (Yes/No)? Yes**\n\n**Final Grade: A**";
        assert_eq!(
            critique_targets(c, true).unwrap(),
            "Step 1 ok.\n\nVerification: Is the answer correct (Yes/No)? Yes"
        );
        assert!(critique_targets(c, false).is_err());
        let c = "Fine.\n**Grade:** Verification: Is the answer correct (Yes/No)? **No**";
        assert_eq!(
            critique_targets(c, false).unwrap(),
            "Fine.\n**Grade:**\n\nVerification: Is the answer correct (Yes/No)? No"
        );
        assert_eq!(
            critique_targets("no verdict here", true),
            Err("critique has no final verdict question")
        );
        assert_eq!(
            split_solution("HEADER\n\nQ: q?\nA: Let's think step by step.\nx = 1.\n"),
            Some(("HEADER\n\nQ: q?\nA: Let's think step by step.\n", "x = 1."))
        );
        assert_eq!(
            split_solution("Q: 1+1=?\nA: 2\n"),
            Some(("Q: 1+1=?\nA: ", "2"))
        );
        assert_eq!(split_solution("no question\n"), None);
        assert_eq!(split_solution("Q: q\nA: \n"), None);
    }
}
