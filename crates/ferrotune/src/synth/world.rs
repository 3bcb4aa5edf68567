//! Problems of the task world: chains of arithmetic operations evaluated left to right, their
//! difficulty knobs, their two surfaces (terse `3+5-2+4=?` and GSM8K-style words) and the
//! parser that reads a question back (the critic needs it).
//!
//! A problem is a start value and `ops` steps `(op, operand)`; every intermediate result stays
//! in `0..=max_value`. Operands are drawn from `1..=max_operand` (`2..=max_operand` for `*`,
//! so no step is a no-op multiplication) and the start from `1..=max_operand`. Generation
//! picks, at each step, an operator uniformly among those that have at least one operand
//! keeping the value in range, then an operand uniformly among those; a chain that gets stuck
//! (only possible with `*` alone) is redrawn.

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One arithmetic operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "+")]
    Add,
    #[serde(rename = "-")]
    Sub,
    #[serde(rename = "*")]
    Mul,
}

impl Op {
    pub fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
        }
    }

    pub fn from_symbol(c: char) -> Option<Op> {
        match c {
            '+' => Some(Op::Add),
            '-' => Some(Op::Sub),
            '*' | 'x' | '×' => Some(Op::Mul),
            _ => None,
        }
    }

    /// `a op b`, `None` on overflow.
    pub fn apply(self, a: i64, b: i64) -> Option<i64> {
        match self {
            Op::Add => a.checked_add(b),
            Op::Sub => a.checked_sub(b),
            Op::Mul => a.checked_mul(b),
        }
    }

    /// Parses an operator set such as `+-` or `+-*` (duplicates ignored, order kept sorted).
    pub fn parse_set(s: &str) -> Result<Vec<Op>> {
        let mut ops = Vec::new();
        for c in s.chars().filter(|c| !c.is_whitespace() && *c != ',') {
            let op = Op::from_symbol(c).ok_or_else(|| {
                Error::invalid(format!("unknown operator `{c}` in `{s}`; use + - *"))
            })?;
            if !ops.contains(&op) {
                ops.push(op);
            }
        }
        if ops.is_empty() {
            return Err(Error::invalid("the operator set is empty"));
        }
        ops.sort();
        Ok(ops)
    }

    pub fn set_string(ops: &[Op]) -> String {
        ops.iter().map(|o| o.symbol()).collect()
    }
}

/// The difficulty knobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difficulty {
    /// Fewest operations in a problem (at least 1).
    pub min_ops: usize,
    /// Most operations in a problem.
    pub max_ops: usize,
    /// Largest operand (and start value).
    pub max_operand: i64,
    /// Every intermediate result stays in `0..=max_value`.
    pub max_value: i64,
    /// Operators drawn from.
    pub ops: Vec<Op>,
}

impl Difficulty {
    /// 2–4 operations on one-digit operands, `+-`: the probe's fast-learning level.
    pub fn easy() -> Self {
        Difficulty {
            min_ops: 2,
            max_ops: 4,
            max_operand: 9,
            max_value: 99,
            ops: vec![Op::Add, Op::Sub],
        }
    }
    /// 3–6 operations, operands up to 19, values up to 99, `+-`.
    pub fn medium() -> Self {
        Difficulty {
            min_ops: 3,
            max_ops: 6,
            max_operand: 19,
            max_value: 99,
            ops: vec![Op::Add, Op::Sub],
        }
    }
    /// 2–4 operations, operands up to 49, values up to 199, `+-` (the probe's slow level).
    pub fn hard() -> Self {
        Difficulty {
            min_ops: 2,
            max_ops: 4,
            max_operand: 49,
            max_value: 199,
            ops: vec![Op::Add, Op::Sub],
        }
    }

    /// A preset by name: `easy`, `medium` or `hard`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "easy" => Ok(Self::easy()),
            "medium" => Ok(Self::medium()),
            "hard" => Ok(Self::hard()),
            other => Err(Error::invalid(format!(
                "unknown difficulty `{other}`; expected easy, medium or hard"
            ))),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.min_ops == 0 || self.min_ops > self.max_ops {
            return Err(Error::invalid(format!(
                "need 1 <= min_ops <= max_ops, got {}..={}",
                self.min_ops, self.max_ops
            )));
        }
        if self.max_ops > 64 {
            return Err(Error::invalid("max_ops is at most 64"));
        }
        if self.max_operand < 1 || self.max_operand > 1_000_000 {
            return Err(Error::invalid("max_operand must be in 1..=1000000"));
        }
        if self.max_value < self.max_operand || self.max_value > 1_000_000_000 {
            return Err(Error::invalid(
                "max_value must be in max_operand..=1000000000",
            ));
        }
        if self.ops.is_empty() {
            return Err(Error::invalid("the operator set is empty"));
        }
        if self.ops == [Op::Mul] && self.max_operand < 2 {
            return Err(Error::invalid("`*` alone needs max_operand >= 2"));
        }
        Ok(())
    }
}

impl Default for Difficulty {
    fn default() -> Self {
        Self::medium()
    }
}

/// The surface of questions, solutions and rationales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wording {
    /// `3+5-2+4=?` → `3+5=8 8-2=6 6+4=10 #### 10`.
    #[default]
    Terse,
    /// `Mia has 3 apples. She buys 5 more. ...` → `3 + 5 = 8. 8 - 2 = 6. ... #### 10`.
    Words,
}

impl FromStr for Wording {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "terse" => Ok(Wording::Terse),
            "words" => Ok(Wording::Words),
            other => Err(Error::invalid(format!(
                "unknown wording `{other}`; expected terse or words"
            ))),
        }
    }
}

impl fmt::Display for Wording {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Wording::Terse => "terse",
            Wording::Words => "words",
        })
    }
}

/// A problem: a start value and the steps applied to it left to right.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Problem {
    pub start: i64,
    pub steps: Vec<(Op, i64)>,
}

impl Problem {
    /// The running values: `values()[0]` is the start, `values()[k]` the result of step k
    /// (1-based), the last one the answer.
    pub fn values(&self) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.steps.len() + 1);
        let mut v = self.start;
        out.push(v);
        for &(op, b) in &self.steps {
            v = op.apply(v, b).unwrap_or(i64::MAX);
            out.push(v);
        }
        out
    }

    pub fn answer(&self) -> i64 {
        *self.values().last().expect("non-empty")
    }

    /// The dedupe key: the operand/operator sequence (the wording's names do not count).
    pub fn key(&self) -> String {
        let mut s = self.start.to_string();
        for (op, b) in &self.steps {
            s.push(op.symbol());
            s.push_str(&b.to_string());
        }
        s
    }

    /// Draws a problem of `difficulty`.
    pub fn sample(rng: &mut StdRng, d: &Difficulty) -> Result<Problem> {
        for _ in 0..1000 {
            let n = rng.random_range(d.min_ops..=d.max_ops);
            let start = rng.random_range(1..=d.max_operand);
            let mut v = start;
            let mut steps = Vec::with_capacity(n);
            while steps.len() < n {
                let choices: Vec<(Op, i64, i64)> = d
                    .ops
                    .iter()
                    .filter_map(|&op| {
                        let (lo, hi) = operand_range(op, v, d);
                        (lo <= hi).then_some((op, lo, hi))
                    })
                    .collect();
                if choices.is_empty() {
                    break;
                }
                let (op, lo, hi) = choices[rng.random_range(0..choices.len())];
                let b = rng.random_range(lo..=hi);
                v = op.apply(v, b).expect("in range");
                steps.push((op, b));
            }
            if steps.len() == n {
                return Ok(Problem { start, steps });
            }
        }
        Err(Error::invalid(
            "this difficulty admits no problem (try more operators or a larger max_value)",
        ))
    }
}

/// The operands `op` may take from value `v` so the result stays in `0..=max_value`.
fn operand_range(op: Op, v: i64, d: &Difficulty) -> (i64, i64) {
    match op {
        Op::Add => (1, d.max_operand.min(d.max_value - v)),
        Op::Sub => (1, d.max_operand.min(v)),
        Op::Mul => {
            let hi = if v == 0 {
                d.max_operand
            } else {
                d.max_operand.min(d.max_value / v)
            };
            (2, hi)
        }
    }
}

/// Names (with pronouns) and items of the words surface.
const NAMES: [(&str, &str); 8] = [
    ("Mia", "She"),
    ("Ben", "He"),
    ("Ana", "She"),
    ("Sam", "He"),
    ("Eva", "She"),
    ("Leo", "He"),
    ("Zoe", "She"),
    ("Tom", "He"),
];
const ITEMS: [&str; 6] = ["apples", "marbles", "coins", "stickers", "books", "pens"];
/// Sentence templates per operator; `{p}` is the pronoun, `{n}` the operand. The parser
/// recognises the operator by the words outside `{n}`.
const ADD_TEMPLATES: [&str; 3] = [
    "{p} buys {n} more.",
    "{p} finds {n} more.",
    "{p} gets {n} more.",
];
const SUB_TEMPLATES: [&str; 3] = ["{p} gives away {n}.", "{p} loses {n}.", "{p} sells {n}."];
const MUL_TEMPLATES: [&str; 1] = ["{p} then has {n} times as many."];

/// Writes the question of `problem`. Terse needs no randomness; words draws a name, an item
/// and a template per step from `rng`.
pub fn question_text(problem: &Problem, wording: Wording, rng: &mut StdRng) -> String {
    match wording {
        Wording::Terse => {
            let mut s = problem.start.to_string();
            for (op, b) in &problem.steps {
                s.push(op.symbol());
                s.push_str(&b.to_string());
            }
            s.push_str("=?");
            s
        }
        Wording::Words => {
            let (name, pronoun) = NAMES[rng.random_range(0..NAMES.len())];
            let item = ITEMS[rng.random_range(0..ITEMS.len())];
            let mut s = format!("{name} has {} {item}.", problem.start);
            for (op, b) in &problem.steps {
                let templates: &[&str] = match op {
                    Op::Add => &ADD_TEMPLATES,
                    Op::Sub => &SUB_TEMPLATES,
                    Op::Mul => &MUL_TEMPLATES,
                };
                let t = templates[rng.random_range(0..templates.len())];
                s.push(' ');
                s.push_str(&t.replace("{p}", pronoun).replace("{n}", &b.to_string()));
            }
            let object = if pronoun == "She" { "she" } else { "he" };
            s.push_str(&format!(" How many {item} does {object} have?"));
            s
        }
    }
}

/// Reads a question back into its problem and wording; `None` when it is not one of ours.
pub fn parse_question(question: &str) -> Option<(Problem, Wording)> {
    let q = question.trim();
    if let Some(body) = q.strip_suffix("=?") {
        return parse_terse_chain(body).map(|p| (p, Wording::Terse));
    }
    parse_words(q).map(|p| (p, Wording::Words))
}

fn parse_terse_chain(body: &str) -> Option<Problem> {
    let mut chars = body.trim().chars().peekable();
    let start = take_number(&mut chars)?;
    let mut steps = Vec::new();
    loop {
        skip_spaces(&mut chars);
        let Some(c) = chars.next() else { break };
        let op = Op::from_symbol(c)?;
        skip_spaces(&mut chars);
        steps.push((op, take_number(&mut chars)?));
    }
    (!steps.is_empty()).then_some(Problem { start, steps })
}

fn parse_words(q: &str) -> Option<Problem> {
    // Sentences end with `.` or `?`; the first states the start, the last asks.
    let sentences: Vec<&str> = q
        .split_inclusive(['.', '?'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let (first, rest) = sentences.split_first()?;
    let (last, middle) = rest.split_last()?;
    if !last.starts_with("How many") || !first.contains(" has ") {
        return None;
    }
    let start = first_number(first)?;
    let mut steps = Vec::new();
    for sentence in middle {
        let n = first_number(sentence)?;
        let op = if sentence.contains(" more") {
            Op::Add
        } else if sentence.contains(" times as many") {
            Op::Mul
        } else if ["gives away", "loses", "sells"]
            .iter()
            .any(|w| sentence.contains(w))
        {
            Op::Sub
        } else {
            return None;
        };
        steps.push((op, n));
    }
    (!steps.is_empty()).then_some(Problem { start, steps })
}

/// At most this many digits in a number we read (so products fit in an i64).
pub(crate) const MAX_DIGITS: usize = 9;

pub(crate) fn skip_spaces(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while chars.peek().is_some_and(|c| *c == ' ') {
        chars.next();
    }
}

/// A run of ASCII digits (1 to MAX_DIGITS of them, no leading zero unless it is `0`) as a number.
pub(crate) fn take_number(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<i64> {
    let mut digits = String::new();
    while let Some(&c) = chars.peek() {
        if !c.is_ascii_digit() {
            break;
        }
        digits.push(c);
        chars.next();
        if digits.len() > MAX_DIGITS {
            return None;
        }
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

fn first_number(s: &str) -> Option<i64> {
    let at = s.find(|c: char| c.is_ascii_digit())?;
    let mut chars = s[at..].chars().peekable();
    take_number(&mut chars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn problems_stay_in_range_and_parse_back() {
        for d in [
            Difficulty::easy(),
            Difficulty::medium(),
            Difficulty::hard(),
            Difficulty {
                ops: vec![Op::Add, Op::Sub, Op::Mul],
                ..Difficulty::easy()
            },
        ] {
            let mut rng = StdRng::seed_from_u64(7);
            for _ in 0..300 {
                let p = Problem::sample(&mut rng, &d).unwrap();
                assert!((d.min_ops..=d.max_ops).contains(&p.steps.len()));
                assert!(
                    p.values().iter().all(|v| (0..=d.max_value).contains(v)),
                    "{p:?}"
                );
                assert!(p.steps.iter().all(|(_, b)| (1..=d.max_operand).contains(b)));
                for wording in [Wording::Terse, Wording::Words] {
                    let q = question_text(&p, wording, &mut rng);
                    assert_eq!(parse_question(&q), Some((p.clone(), wording)), "{q}");
                }
            }
        }
    }

    #[test]
    fn surfaces() {
        let p = Problem {
            start: 3,
            steps: vec![(Op::Add, 5), (Op::Sub, 2), (Op::Mul, 4)],
        };
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(question_text(&p, Wording::Terse, &mut rng), "3+5-2*4=?");
        assert_eq!(p.values(), vec![3, 8, 6, 24]);
        assert_eq!(p.key(), "3+5-2*4");
        let w = question_text(&p, Wording::Words, &mut rng);
        assert!(w.contains(" has 3 ") && w.ends_with(" have?"), "{w}");
        assert_eq!(parse_question("hello"), None);
        assert_eq!(parse_question("3+=?"), None);
        assert_eq!(parse_question("=?"), None);
        assert_eq!(parse_question("12345678901+1=?"), None);
        assert_eq!(parse_question("3+05=?"), None);
        assert!(parse_question("3+0=?").is_some());
    }

    #[test]
    fn knobs_validate() {
        assert!(Difficulty {
            min_ops: 0,
            ..Difficulty::easy()
        }
        .validate()
        .is_err());
        assert!(Difficulty {
            min_ops: 5,
            max_ops: 4,
            ..Difficulty::easy()
        }
        .validate()
        .is_err());
        assert!(Difficulty {
            max_value: 3,
            ..Difficulty::easy()
        }
        .validate()
        .is_err());
        assert!(Difficulty::preset("medium").unwrap().validate().is_ok());
        assert!(Difficulty::preset("extreme").is_err());
        assert_eq!(
            Op::parse_set("*+-+").unwrap(),
            vec![Op::Add, Op::Sub, Op::Mul]
        );
        assert!(Op::parse_set("/").is_err());
    }
}
