//! The world's dataset files, in the real schemas (CONTRACTS "Datasets"), one JSON object a line:
//!
//! | file                 | schema       | rows                                                        |
//! |----------------------|--------------|-------------------------------------------------------------|
//! | `pretrain.jsonl`     | `text`       | per 10 rows: 5 solved problems `Q: {q}\nA: {solution}`, 3 critic rows (verify inputs + targets: a correct, a corrupted, then alternating), 2 fact lines (8 forward/inverse facts, `37+5=42 42-5=37`) |
//! | `sft.jsonl`          | `chat`       | `messages`: user = question, assistant = correct solution   |
//! | `preference.jsonl`   | `preference` | `prompt` (string), `chosen` / `rejected` = [user, assistant] (ultrafeedback_binarized); rejected is a corrupted solution |
//! | `rm.jsonl`           | `preference` | the same layout, other problems (the reward model's pairs)  |
//! | `genrm_verify.jsonl` | `genrm`      | `inputs` / `targets` (critique.rs), even rows correct, odd rows corrupted; `kind` says which corruption |
//! | `genrm_correct.jsonl`| `genrm`      | `inputs` = `Q: {q}\nA: `, `targets` = a correct solution (D_correct) |
//! | `test.jsonl`         | `qa`         | `question`, `answer` (the solution, ending `#### N`)        |
//! | `world.json`         | —            | the [`WorldSummary`]: config, row counts, files             |
//!
//! Every file draws from its own seeded stream, so changing one size does not change another
//! file. Test problems are drawn first and are distinct; every training problem is redrawn
//! until its operand/operator sequence ([`Problem::key`]) is not a test problem's.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::critique::{correct_inputs, critique_problem, verify_inputs, verify_targets};
use super::solution::Solution;
use super::world::{question_text, Difficulty, Op, Problem, Wording};
use crate::error::{Error, Result};

/// Everything that decides a world.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldConfig {
    pub seed: u64,
    pub difficulty: Difficulty,
    pub wording: Wording,
    pub n_pretrain: usize,
    pub n_sft: usize,
    pub n_preference: usize,
    pub n_rm: usize,
    pub n_genrm: usize,
    pub n_test: usize,
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            seed: 0,
            difficulty: Difficulty::default(),
            wording: Wording::Terse,
            n_pretrain: 20_000,
            n_sft: 10_000,
            n_preference: 2_000,
            n_rm: 2_000,
            n_genrm: 4_000,
            n_test: 200,
        }
    }
}

impl WorldConfig {
    /// Every training file sized from one number: `n` rows of SFT, preference, RM, GenRM
    /// verify and GenRM correct, `2n` pretraining rows.
    pub fn with_size(mut self, n: usize) -> Self {
        self.n_pretrain = 2 * n;
        self.n_sft = n;
        self.n_preference = n;
        self.n_rm = n;
        self.n_genrm = n;
        self
    }
}

/// What `write_world` wrote (also `world.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorldSummary {
    pub dir: PathBuf,
    pub config: WorldConfig,
    /// Rows per file name.
    pub rows: BTreeMap<String, usize>,
    /// GenRM verify rows whose candidate is correct / incorrect.
    pub genrm_correct_candidates: usize,
    pub genrm_incorrect_candidates: usize,
    /// Distinct problems (by key) across the training files, and in the test file.
    pub distinct_train_problems: usize,
    pub distinct_test_problems: usize,
}

/// One file's rows, in memory.
#[derive(Debug, Clone)]
pub struct WorldFile {
    pub name: &'static str,
    pub rows: Vec<Value>,
}

/// A whole world, in memory.
#[derive(Debug, Clone)]
pub struct World {
    pub config: WorldConfig,
    pub files: Vec<WorldFile>,
    genrm_correct_candidates: usize,
    distinct_train_problems: usize,
}

/// The file names, in writing order.
pub const FILES: [&str; 7] = [
    "pretrain.jsonl",
    "sft.jsonl",
    "preference.jsonl",
    "rm.jsonl",
    "genrm_verify.jsonl",
    "genrm_correct.jsonl",
    "test.jsonl",
];

/// A seed for stream `stream` of world seed `seed` (splitmix64 of both).
fn stream_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Drawer<'a> {
    rng: StdRng,
    config: &'a WorldConfig,
    test_keys: &'a HashSet<String>,
    seen: &'a mut HashSet<String>,
}

impl Drawer<'_> {
    /// A training problem (not a test problem) and its question text.
    fn problem(&mut self) -> Result<(Problem, String)> {
        for _ in 0..10_000 {
            let p = Problem::sample(&mut self.rng, &self.config.difficulty)?;
            let key = p.key();
            if !self.test_keys.contains(&key) {
                let q = question_text(&p, self.config.wording, &mut self.rng);
                self.seen.insert(key);
                return Ok((p, q));
            }
        }
        Err(Error::invalid("every problem this difficulty draws is a test problem; lower n_test or widen the difficulty"))
    }
}

fn chat(q: &str, answer: &str) -> Value {
    json!([{"role": "user", "content": q}, {"role": "assistant", "content": answer}])
}

/// A line of 8 facts, each forward then inverse (`37+5=42 42-5=37`, `6*7=42 42/7=6`), drawn
/// within the difficulty's ranges.
fn fact_line(rng: &mut StdRng, d: &Difficulty) -> String {
    let mut facts = Vec::with_capacity(8);
    while facts.len() < 8 {
        let op = d.ops[rng.random_range(0..d.ops.len())];
        let b = rng.random_range(if op == Op::Mul { 2 } else { 1 }..=d.max_operand.max(2));
        let (lo, hi) = match op {
            Op::Add => (0, d.max_value - b),
            Op::Sub => (b, d.max_value),
            Op::Mul => (0, d.max_value / b),
        };
        if lo > hi {
            continue;
        }
        let a = rng.random_range(lo..=hi);
        let c = op.apply(a, b).expect("small");
        facts.push(match op {
            Op::Add => format!("{a}+{b}={c} {c}-{b}={a}"),
            Op::Sub => format!("{a}-{b}={c} {c}+{b}={a}"),
            Op::Mul => format!("{a}*{b}={c} {c}/{b}={a}"),
        });
    }
    facts.join(" ")
}

/// Builds the world in memory (see the module docs).
pub fn build_world(config: &WorldConfig) -> Result<World> {
    config.difficulty.validate()?;
    let d = &config.difficulty;
    let wording = config.wording;
    let rng = |stream: u64| StdRng::seed_from_u64(stream_seed(config.seed, stream));

    // Held-out problems first, distinct.
    let mut test_rng = rng(1);
    let mut test_keys = HashSet::new();
    let mut test_rows = Vec::with_capacity(config.n_test);
    let mut attempts = 0usize;
    while test_rows.len() < config.n_test {
        attempts += 1;
        if attempts > 1000 * config.n_test + 10_000 {
            return Err(Error::invalid(format!(
                "this difficulty has fewer than {} distinct problems; lower n_test or widen it",
                config.n_test
            )));
        }
        let p = Problem::sample(&mut test_rng, d)?;
        if test_keys.insert(p.key()) {
            let q = question_text(&p, wording, &mut test_rng);
            test_rows.push(json!({"question": q, "answer": Solution::correct(&p).render(wording)}));
        }
    }

    let mut seen = HashSet::new();
    let mut files = Vec::new();
    let drawer = |stream: u64,
                  seen: &mut HashSet<String>,
                  f: &mut dyn FnMut(&mut Drawer, usize) -> Result<Value>,
                  n: usize|
     -> Result<Vec<Value>> {
        let mut drawer = Drawer {
            rng: rng(stream),
            config,
            test_keys: &test_keys,
            seen,
        };
        (0..n).map(|i| f(&mut drawer, i)).collect()
    };

    let pretrain = drawer(
        2,
        &mut seen,
        &mut |dr, i| {
            let slot = i % 10;
            let text = if slot < 5 {
                let (p, q) = dr.problem()?;
                format!(
                    "{}{}",
                    correct_inputs(&q),
                    Solution::correct(&p).render(wording)
                )
            } else if slot < 8 {
                let (p, q) = dr.problem()?;
                let good = slot == 5 || (slot == 7 && (i / 10) % 2 == 0);
                let candidate = if good {
                    Solution::correct(&p)
                } else {
                    Solution::corrupted(&p, &mut dr.rng).0
                }
                .render(wording);
                let c = critique_problem(&p, wording, &candidate);
                format!("{}{}", verify_inputs(&q, &candidate), verify_targets(&c))
            } else {
                fact_line(&mut dr.rng, d)
            };
            Ok(json!({"text": text}))
        },
        config.n_pretrain,
    )?;
    files.push(WorldFile {
        name: "pretrain.jsonl",
        rows: pretrain,
    });

    let sft = drawer(
        3,
        &mut seen,
        &mut |dr, _| {
            let (p, q) = dr.problem()?;
            Ok(json!({"messages": chat(&q, &Solution::correct(&p).render(wording))}))
        },
        config.n_sft,
    )?;
    files.push(WorldFile {
        name: "sft.jsonl",
        rows: sft,
    });

    let pairs = |dr: &mut Drawer, _: usize| -> Result<Value> {
        let (p, q) = dr.problem()?;
        let good = Solution::correct(&p).render(wording);
        let bad = Solution::corrupted(&p, &mut dr.rng).0.render(wording);
        Ok(json!({"prompt": q, "chosen": chat(&q, &good), "rejected": chat(&q, &bad)}))
    };
    let preference = drawer(4, &mut seen, &mut { pairs }, config.n_preference)?;
    files.push(WorldFile {
        name: "preference.jsonl",
        rows: preference,
    });
    let rm = drawer(5, &mut seen, &mut { pairs }, config.n_rm)?;
    files.push(WorldFile {
        name: "rm.jsonl",
        rows: rm,
    });

    let mut genrm_correct_candidates = 0;
    let verify = drawer(
        6,
        &mut seen,
        &mut |dr, i| {
            let (p, q) = dr.problem()?;
            let (candidate, kind) = if i % 2 == 0 {
                (Solution::correct(&p), "correct")
            } else {
                let (s, how) = Solution::corrupted(&p, &mut dr.rng);
                (s, how.kind())
            };
            let candidate = candidate.render(wording);
            let c = critique_problem(&p, wording, &candidate);
            if c.correct {
                genrm_correct_candidates += 1;
            }
            Ok(
                json!({"inputs": verify_inputs(&q, &candidate), "targets": verify_targets(&c), "kind": kind}),
            )
        },
        config.n_genrm,
    )?;
    files.push(WorldFile {
        name: "genrm_verify.jsonl",
        rows: verify,
    });

    let correct = drawer(
        7,
        &mut seen,
        &mut |dr, _| {
            let (p, q) = dr.problem()?;
            Ok(
                json!({"inputs": correct_inputs(&q), "targets": Solution::correct(&p).render(wording)}),
            )
        },
        config.n_genrm,
    )?;
    files.push(WorldFile {
        name: "genrm_correct.jsonl",
        rows: correct,
    });

    files.push(WorldFile {
        name: "test.jsonl",
        rows: test_rows,
    });
    Ok(World {
        config: config.clone(),
        files,
        genrm_correct_candidates,
        distinct_train_problems: seen.len(),
    })
}

impl World {
    pub fn file(&self, name: &str) -> Option<&WorldFile> {
        self.files.iter().find(|f| f.name == name)
    }

    /// The summary `write_world` returns for directory `dir`.
    pub fn summary(&self, dir: &Path) -> WorldSummary {
        let n_verify = self.file("genrm_verify.jsonl").map_or(0, |f| f.rows.len());
        WorldSummary {
            dir: dir.to_path_buf(),
            config: self.config.clone(),
            rows: self
                .files
                .iter()
                .map(|f| (f.name.to_string(), f.rows.len()))
                .collect(),
            genrm_correct_candidates: self.genrm_correct_candidates,
            genrm_incorrect_candidates: n_verify - self.genrm_correct_candidates,
            distinct_train_problems: self.distinct_train_problems,
            distinct_test_problems: self.config.n_test,
        }
    }

    /// Every string of every row (contents, not field names): the tokenizer's training texts.
    pub fn texts(&self) -> impl Iterator<Item = String> + '_ {
        fn leaves(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::String(s) => out.push(s.clone()),
                Value::Array(a) => a.iter().for_each(|x| leaves(x, out)),
                Value::Object(o) => o.values().for_each(|x| leaves(x, out)),
                _ => {}
            }
        }
        self.files
            .iter()
            .flat_map(|f| f.rows.iter())
            .flat_map(|row| {
                let mut out = Vec::new();
                leaves(row, &mut out);
                out
            })
    }

    /// Writes every file and `world.json` into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<WorldSummary> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for file in &self.files {
            let path = dir.join(file.name);
            let mut text = String::new();
            for row in &file.rows {
                text.push_str(&serde_json::to_string(row).expect("serialisable"));
                text.push('\n');
            }
            write_file(&path, text.as_bytes())?;
        }
        let summary = self.summary(dir);
        let mut json = serde_json::to_string_pretty(&summary).expect("serialisable");
        json.push('\n');
        write_file(&dir.join("world.json"), json.as_bytes())?;
        Ok(summary)
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))
}

/// Builds the world of `config` and writes its files into `dir`.
pub fn write_world(dir: &Path, config: &WorldConfig) -> Result<WorldSummary> {
    build_world(config)?.write(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load_dataset, Example, LoadOptions, Schema};
    use crate::synth::critique::critique;
    use crate::synth::world::parse_question;

    fn small(seed: u64, wording: Wording) -> WorldConfig {
        WorldConfig {
            seed,
            wording,
            n_test: 50,
            ..WorldConfig::default()
        }
        .with_size(60)
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        write_world(dirs[0].path(), &small(1, Wording::Terse)).unwrap();
        write_world(dirs[1].path(), &small(1, Wording::Terse)).unwrap();
        write_world(dirs[2].path(), &small(2, Wording::Terse)).unwrap();
        for name in FILES {
            let read = |i: usize| std::fs::read(dirs[i].path().join(name)).unwrap();
            assert_eq!(read(0), read(1), "{name}");
            assert_ne!(read(0), read(2), "{name}");
        }
        // world.json differs only by the directory.
        let json = |i: usize| {
            let mut v: Value =
                serde_json::from_slice(&std::fs::read(dirs[i].path().join("world.json")).unwrap())
                    .unwrap();
            v.as_object_mut().unwrap().remove("dir");
            v
        };
        assert_eq!(json(0), json(1));
    }

    /// The question of a training row, whichever file it is in.
    fn question_of(example: &Example) -> Option<String> {
        match example {
            Example::Text { text } => text
                .strip_prefix("Q: ")
                .map(|t| t.lines().next().unwrap().to_string()),
            Example::Chat { messages } => Some(messages[0].content.clone()),
            Example::Preference { prompt, .. } => Some(prompt[0].content.clone()),
            Example::Genrm { inputs, .. } => {
                Some(inputs.strip_prefix("Q: ")?.lines().next()?.to_string())
            }
            Example::Qa { question, .. } => Some(question.clone()),
            _ => None,
        }
    }

    #[test]
    fn files_load_with_their_schemas_and_test_problems_are_held_out() {
        for wording in [Wording::Terse, Wording::Words] {
            let dir = tempfile::tempdir().unwrap();
            let config = small(3, wording);
            let summary = write_world(dir.path(), &config).unwrap();
            let expected = [
                ("pretrain.jsonl", Schema::Text, 120),
                ("sft.jsonl", Schema::Chat, 60),
                ("preference.jsonl", Schema::Preference, 60),
                ("rm.jsonl", Schema::Preference, 60),
                ("genrm_verify.jsonl", Schema::Genrm, 60),
                ("genrm_correct.jsonl", Schema::Genrm, 60),
                ("test.jsonl", Schema::Qa, 50),
            ];
            let mut test_keys = HashSet::new();
            let mut train_keys = HashSet::new();
            for (name, schema, rows) in expected {
                let data = load_dataset(&dir.path().join(name), &LoadOptions::default()).unwrap();
                assert_eq!(data.schema, schema, "{name}");
                assert_eq!(data.len(), rows, "{name}");
                assert_eq!(summary.rows[name], rows);
                for row in &data.rows {
                    let Some(q) = question_of(&row.example) else {
                        continue;
                    };
                    let (p, w) = parse_question(&q).unwrap_or_else(|| panic!("{name}: {q}"));
                    assert_eq!(w, wording);
                    if name == "test.jsonl" {
                        assert!(test_keys.insert(p.key()), "duplicate test problem {q}");
                    } else {
                        train_keys.insert(p.key());
                    }
                }
                // Every qa answer and every chosen/SFT solution is correct, every rejected one is not.
                for row in &data.rows {
                    match &row.example {
                        Example::Qa { question, answer } => {
                            assert!(critique(question, answer).correct)
                        }
                        Example::Chat { messages } => {
                            assert!(critique(&messages[0].content, &messages[1].content).correct)
                        }
                        Example::Preference {
                            prompt,
                            chosen,
                            rejected,
                        } => {
                            assert!(critique(&prompt[0].content, &chosen.content).correct);
                            assert!(!critique(&prompt[0].content, &rejected.content).correct);
                        }
                        _ => {}
                    }
                }
            }
            assert_eq!(test_keys.len(), 50);
            assert!(train_keys.len() > 100, "{}", train_keys.len());
            assert!(test_keys.is_disjoint(&train_keys));
            assert_eq!(summary.genrm_correct_candidates, 30);
            assert_eq!(summary.genrm_incorrect_candidates, 30);
            // GenRM targets end with the verdict matching the candidate's kind.
            let verify = load_dataset(
                &dir.path().join("genrm_verify.jsonl"),
                &LoadOptions::default(),
            )
            .unwrap();
            for (i, row) in verify.rows.iter().enumerate() {
                let Example::Genrm { inputs, targets } = &row.example else {
                    panic!()
                };
                assert!(inputs.ends_with("Verification: Let's verify step by step.\n"));
                let verdict = if i % 2 == 0 {
                    "(Yes/No)? Yes"
                } else {
                    "(Yes/No)? No"
                };
                assert!(targets.ends_with(verdict), "{targets}");
            }
            let world: Value =
                serde_json::from_slice(&std::fs::read(dir.path().join("world.json")).unwrap())
                    .unwrap();
            assert_eq!(world["rows"]["sft.jsonl"], 60);
            assert_eq!(world["config"]["seed"], 3);
        }
    }

    #[test]
    fn held_out_problems_stay_out_of_a_small_problem_space() {
        // About 275 problems: drawn at random, the training files would hit the test set.
        let config = WorldConfig {
            difficulty: Difficulty {
                min_ops: 1,
                max_ops: 2,
                max_operand: 5,
                max_value: 20,
                ops: vec![Op::Add, Op::Sub],
            },
            n_test: 40,
            ..WorldConfig::default()
        }
        .with_size(100);
        let world = build_world(&config).unwrap();
        let mut test_keys = HashSet::new();
        let mut train_keys = HashSet::new();
        for file in &world.files {
            for row in &file.rows {
                let q = match file.name {
                    "test.jsonl" | "preference.jsonl" | "rm.jsonl" => {
                        row.get("question").or(row.get("prompt"))
                    }
                    "sft.jsonl" => Some(&row["messages"][0]["content"]),
                    _ => None,
                };
                let q = match q {
                    Some(q) => q.as_str().unwrap().to_string(),
                    None => {
                        let text = row
                            .get("text")
                            .or(row.get("inputs"))
                            .unwrap()
                            .as_str()
                            .unwrap();
                        let Some(rest) = text.strip_prefix("Q: ") else {
                            continue;
                        };
                        rest.lines().next().unwrap().to_string()
                    }
                };
                let key = parse_question(&q).unwrap().0.key();
                if file.name == "test.jsonl" {
                    test_keys.insert(key);
                } else {
                    train_keys.insert(key);
                }
            }
        }
        assert_eq!(test_keys.len(), 40);
        assert!(train_keys.len() > 150, "{}", train_keys.len());
        assert!(test_keys.is_disjoint(&train_keys));
    }

    #[test]
    fn a_tiny_problem_space_is_an_error_not_a_hang() {
        let config = WorldConfig {
            difficulty: Difficulty {
                min_ops: 1,
                max_ops: 1,
                max_operand: 2,
                max_value: 4,
                ops: vec![Op::Add],
            },
            n_test: 10,
            ..WorldConfig::default()
        }
        .with_size(5);
        let err = build_world(&config).unwrap_err().to_string();
        assert!(err.contains("distinct problems"), "{err}");
        // All 4 problems held out: training cannot draw any.
        let config = WorldConfig {
            n_test: 4,
            ..config
        };
        let err = build_world(&config).unwrap_err().to_string();
        assert!(err.contains("test problem"), "{err}");
    }
}
