//! The programmatic verifier: reads any candidate text against the question and writes the
//! step-by-step rationale a GenRM-CoT verifier is trained to produce, and the GenRM row texts.
//!
//! ## The check (why it is not the "redo the step" check)
//! Redoing `37+45=` next to a candidate that wrote `37+45=82` lets the model copy `82` (the
//! PyTorch probe's verifier did, and said "ok" to wrong steps). Here each step is checked
//! backwards on the candidate's own result: step k of the question is `op b`, the candidate's
//! result of step k is `c`, and the line computes the inverse `c ∘⁻¹ b = v` (`c-b` for `+`,
//! `c+b` for `-`, `c/b` for `*`, with a remainder `q r m` when it does not divide), then compares
//! `v` with the value step k had to start from: the question's first number for step 1, the
//! candidate's result of step k-1 (the first number of the previous check line) after that.
//! The expression `c-b=` never appears in the candidate, so it cannot be copied, and one line
//! catches arithmetic slips, copy slips (a step starting from the wrong value), a wrong
//! operator or operand and a skipped step. A step whose result is right but whose written
//! operation is not the question's gets a second line naming it. The rationale stops at the
//! first wrong step and names it.
//!
//! ## Rationale format (terse questions; words questions use `Step k: c - b = v vs p: pairs ok.`)
//! ```text
//! 1: 8-5=3 vs 3: 33 ok
//! 2: 7+2=9 vs 8: 98 no
//! Step 2 is wrong.
//! ```
//! Each check line ends with its value set against the value it must equal, digit by digit
//! (see [`compare`]): `v vs p: pairs`, then `ok` when every pair is a doubled digit.
//! Other lines: `k: missing no` (the chain stops early), `k: unreadable no`, `k: extra no`
//! (more steps than the question), `k: 9-2 is not 8-2 no`, then `answer 10 vs 10: 11 00 ok` /
//! `answer 11 vs 10: 11 10 no` + `The final answer is wrong.`, `answer missing no`, `answer unreadable no`,
//! `extra text no`. A candidate with no readable step and no readable answer gets
//! `The solution cannot be read.`; a question that is not one of the world's,
//! `The question cannot be read.` The verdict is appended by [`verify_targets`].
//!
//! ## GenRM rows (the genrm-critiques layout without its instruction header, to save tokens)
//! - CoT verify: inputs `Q: {question}\nA: {candidate}\nVerification: Let's verify step by step.\n`,
//!   targets `{rationale}\nVerification: Is the answer correct (Yes/No)? Yes` (or ` No`).
//! - Direct: inputs `Q: {question}\nA: {candidate}\nVerification: Is the answer correct (Yes/No)?`,
//!   targets ` Yes` / ` No`.
//! - D_correct: inputs `Q: {question}\nA: `, targets a correct solution.

use super::solution::Step;
use super::world::{parse_question, skip_spaces, take_number, Op, Problem, Wording};

/// The verdict question, as the verifier reads it (CONTRACTS "Generation and verification").
pub const VERDICT_LINE: &str = "Verification: Is the answer correct (Yes/No)?";
/// What a CoT verify input ends with.
pub const VERIFY_PROMPT: &str = "Verification: Let's verify step by step.\n";

/// A rationale and whether the candidate is correct (every step right, the chain complete
/// and the answer equal to the last result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Critique {
    pub rationale: String,
    pub correct: bool,
}

impl Critique {
    /// ` Yes` or ` No`, with the leading space.
    pub fn verdict(&self) -> &'static str {
        if self.correct {
            " Yes"
        } else {
            " No"
        }
    }
}

/// The number after `####` in a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerField {
    Missing,
    Unreadable,
    Value(i64),
}

/// What could be read of a candidate: its steps up to the first that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCandidate {
    pub steps: Vec<Step>,
    /// Text that is not a step came before the answer (after `steps`).
    pub unreadable_step: bool,
    pub answer: AnswerField,
    /// Text other than whitespace or a full stop after the answer.
    pub trailing: bool,
}

fn is_separator(c: char) -> bool {
    c.is_whitespace() || c == '.' || c == ','
}

/// Reads a candidate in either surface (`3+5=8 8-2=6 #### 6` or `3 + 5 = 8. 8 - 2 = 6. #### 6`).
pub fn parse_candidate(text: &str) -> ParsedCandidate {
    let (body, tail) = match text.find("####") {
        Some(at) => (&text[..at], Some(&text[at + 4..])),
        None => (text, None),
    };
    let mut steps = Vec::new();
    let mut unreadable_step = false;
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek().is_some_and(|&c| is_separator(c)) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        match read_step(&mut chars) {
            Some(step) => steps.push(step),
            None => {
                unreadable_step = true;
                break;
            }
        }
    }
    let (answer, trailing) = match tail {
        None => (AnswerField::Missing, false),
        Some(tail) => {
            // The answer is on the `####` line.
            let mut chars = tail.trim_start_matches([' ', '\t']).chars().peekable();
            match take_number(&mut chars) {
                None => (AnswerField::Unreadable, false),
                Some(n) => {
                    let rest: String = chars.collect();
                    let rest = rest.trim();
                    let rest = rest.strip_suffix('.').unwrap_or(rest).trim();
                    (AnswerField::Value(n), !rest.is_empty())
                }
            }
        }
    };
    ParsedCandidate {
        steps,
        unreadable_step,
        answer,
        trailing,
    }
}

fn read_step(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<Step> {
    let a = take_number(chars)?;
    skip_spaces(chars);
    let op = Op::from_symbol(chars.next()?)?;
    skip_spaces(chars);
    let b = take_number(chars)?;
    skip_spaces(chars);
    if chars.next()? != '=' {
        return None;
    }
    skip_spaces(chars);
    let c = take_number(chars)?;
    match chars.peek() {
        None => Some(Step { a, op, b, c }),
        Some(&ch) if is_separator(ch) => Some(Step { a, op, b, c }),
        Some(_) => None,
    }
}

/// The inverse check of step `op b` on result `c`: the expression (without the `k:` label),
/// then, when it gives a whole number `v`, its comparison with `prev` ([`compare`]); and
/// whether `v == prev`.
fn inverse(c: i64, op: Op, b: i64, prev: i64, wording: Wording) -> (String, bool) {
    let sp = |s: &str| match wording {
        Wording::Terse => s.to_string(),
        Wording::Words => format!(" {s} "),
    };
    let (sym, value): (&str, Option<i64>) = match op {
        Op::Add => ("-", c.checked_sub(b)),
        Op::Sub => ("+", c.checked_add(b)),
        Op::Mul if b == 0 => {
            // No inverse: redo it forwards (never happens in generated worlds, operands >= 2).
            let v = prev.checked_mul(0).unwrap_or(0);
            let body = format!("{prev}{}0{}{v}", sp("*"), sp("="));
            return (format!("{body}{}", compare(c, v)), c == v);
        }
        Op::Mul => {
            if c % b == 0 {
                ("/", Some(c / b))
            } else {
                let r = match wording {
                    Wording::Terse => format!("{}r{}", c / b, c % b),
                    Wording::Words => format!("{} r {}", c / b, c % b),
                };
                return (format!("{c}{}{b}{}{r}", sp("/"), sp("=")), false);
            }
        }
    };
    match value {
        Some(v) => {
            let body = format!("{c}{}{b}{}{v}", sp(sym), sp("="));
            (format!("{body}{}", compare(v, prev)), v == prev)
        }
        None => (format!("{c}{}{b}{}?", sp(sym), sp("=")), false),
    }
}

/// ` vs {p}: {pairs}`: the value `v` a check reached, set against the value `p` it must
/// equal, digit by digit. Both are left-padded with zeros to one width and each pair is written
/// as the two digits side by side (`v = 10`, `p = 11` → ` vs 11: 11 01`), so the verdict that
/// follows reads "every pair is a doubled digit": a comparison of adjacent tokens. A tiny
/// verifier asked to compare `10 vs 11` directly learned only whether the lengths differ and
/// said `ok` to 88 % of wrong steps; with the pairs, greedy verdicts on 1,600 held-out policy
/// samples went from 51 % to 93 % right (same 600 steps, same rows; K = 8 AUC 0.94).
fn compare(v: i64, p: i64) -> String {
    let (vs, ps) = (v.to_string(), p.to_string());
    let width = vs.len().max(ps.len());
    let (vs, ps) = (format!("{v:0width$}"), format!("{p:0width$}"));
    let pairs: Vec<String> = vs
        .chars()
        .zip(ps.chars())
        .map(|(a, b)| format!("{a}{b}"))
        .collect();
    format!(" vs {p}: {}", pairs.join(" "))
}

struct Writer {
    wording: Wording,
    lines: Vec<String>,
}

impl Writer {
    fn check(&mut self, k: usize, body: &str, ok: bool) {
        let mark = if ok { "ok" } else { "no" };
        self.lines.push(match self.wording {
            Wording::Terse => format!("{k}: {body} {mark}"),
            Wording::Words => format!("Step {k}: {body} {mark}."),
        });
    }

    fn answer(&mut self, body: &str, ok: bool) {
        let mark = if ok { "ok" } else { "no" };
        self.lines.push(match self.wording {
            Wording::Terse => format!("answer {body} {mark}"),
            Wording::Words => format!("Answer {body} {mark}."),
        });
    }

    fn wrong_step(mut self, k: usize) -> Critique {
        self.lines.push(format!("Step {k} is wrong."));
        self.done(false)
    }

    fn done(self, correct: bool) -> Critique {
        Critique {
            rationale: self.lines.join("\n"),
            correct,
        }
    }
}

/// Checks `candidate` against `question` (see the module docs). Never panics.
pub fn critique(question: &str, candidate: &str) -> Critique {
    let Some((problem, wording)) = parse_question(question) else {
        return Critique {
            rationale: "The question cannot be read.".into(),
            correct: false,
        };
    };
    critique_problem(&problem, wording, candidate)
}

/// As [`critique`] for a problem already parsed; `wording` picks the rationale's surface.
pub fn critique_problem(problem: &Problem, wording: Wording, candidate: &str) -> Critique {
    let parsed = parse_candidate(candidate);
    if parsed.steps.is_empty() && !matches!(parsed.answer, AnswerField::Value(_)) {
        return Critique {
            rationale: "The solution cannot be read.".into(),
            correct: false,
        };
    }
    let mut w = Writer {
        wording,
        lines: Vec::new(),
    };
    let mut prev = problem.start;
    for (i, &(op, b)) in problem.steps.iter().enumerate() {
        let k = i + 1;
        let Some(step) = parsed.steps.get(i) else {
            let what = if parsed.unreadable_step {
                "unreadable"
            } else {
                "missing"
            };
            w.check(k, what, false);
            return w.wrong_step(k);
        };
        let (body, ok) = inverse(step.c, op, b, prev, wording);
        w.check(k, &body, ok);
        if !ok {
            return w.wrong_step(k);
        }
        if (step.a, step.op, step.b) != (prev, op, b) {
            let body = match wording {
                Wording::Terse => format!(
                    "{}{}{} is not {prev}{}{b}",
                    step.a,
                    step.op.symbol(),
                    step.b,
                    op.symbol()
                ),
                Wording::Words => {
                    format!(
                        "{} {} {} is not {prev} {} {b}",
                        step.a,
                        step.op.symbol(),
                        step.b,
                        op.symbol()
                    )
                }
            };
            w.check(k, &body, false);
            return w.wrong_step(k);
        }
        prev = step.c;
    }
    let n = problem.steps.len();
    if parsed.steps.len() > n || parsed.unreadable_step {
        w.check(n + 1, "extra", false);
        return w.wrong_step(n + 1);
    }
    match parsed.answer {
        AnswerField::Value(v) if v == prev => w.answer(&format!("{v}{}", compare(v, prev)), true),
        AnswerField::Value(v) => {
            w.answer(&format!("{v}{}", compare(v, prev)), false);
            w.lines.push("The final answer is wrong.".into());
            return w.done(false);
        }
        AnswerField::Missing | AnswerField::Unreadable => {
            let what = if parsed.answer == AnswerField::Missing {
                "missing"
            } else {
                "unreadable"
            };
            w.answer(what, false);
            w.lines.push("The final answer is wrong.".into());
            return w.done(false);
        }
    }
    if parsed.trailing {
        w.lines.push(match wording {
            Wording::Terse => "extra text no".into(),
            Wording::Words => "Extra text no.".into(),
        });
        w.lines.push("The solution has extra text.".into());
        return w.done(false);
    }
    w.done(true)
}

/// CoT verify inputs: `Q: {question}\nA: {candidate}\nVerification: Let's verify step by step.\n`.
pub fn verify_inputs(question: &str, candidate: &str) -> String {
    format!("Q: {question}\nA: {candidate}\n{VERIFY_PROMPT}")
}

/// CoT verify targets: the rationale, then `\nVerification: Is the answer correct (Yes/No)?`
/// and ` Yes` / ` No`.
pub fn verify_targets(critique: &Critique) -> String {
    format!(
        "{}\n{VERDICT_LINE}{}",
        critique.rationale,
        critique.verdict()
    )
}

/// Direct verify inputs (no rationale): ending with the verdict question; targets are
/// [`Critique::verdict`].
pub fn direct_inputs(question: &str, candidate: &str) -> String {
    format!("Q: {question}\nA: {candidate}\n{VERDICT_LINE}")
}

/// D_correct inputs: `Q: {question}\nA: `; the targets are a correct solution.
pub fn correct_inputs(question: &str) -> String {
    format!("Q: {question}\nA: ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::solution::{Corruption, Solution};
    use crate::synth::world::{question_text, Difficulty};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const Q: &str = "3+5-2+4=?";

    #[test]
    fn a_correct_solution_reads_yes() {
        let c = critique(Q, "3+5=8 8-2=6 6+4=10 #### 10");
        assert_eq!(
            c.rationale,
            "1: 8-5=3 vs 3: 33 ok\n2: 6+2=8 vs 8: 88 ok\n3: 10-4=6 vs 6: 66 ok\nanswer 10 vs 10: 11 00 ok"
        );
        assert!(c.correct);
        assert_eq!(
            verify_targets(&c),
            "1: 8-5=3 vs 3: 33 ok\n2: 6+2=8 vs 8: 88 ok\n3: 10-4=6 vs 6: 66 ok\nanswer 10 vs 10: 11 00 ok\nVerification: Is the answer correct (Yes/No)? Yes"
        );
        // Trailing whitespace and a full stop are fine.
        assert!(critique(Q, "3+5=8 8-2=6 6+4=10 #### 10.\n").correct);
    }

    #[test]
    fn slips_are_caught_at_their_step() {
        let cases = [
            // arithmetic slip, propagated
            ("3+5=8 8-2=7 7+4=11 #### 11", "1: 8-5=3 vs 3: 33 ok\n2: 7+2=9 vs 8: 98 no\nStep 2 is wrong."),
            // copy slip: step 2 starts from 9
            ("3+5=8 9-2=7 7+4=11 #### 11", "1: 8-5=3 vs 3: 33 ok\n2: 7+2=9 vs 8: 98 no\nStep 2 is wrong."),
            // copy slip at step 1
            ("4+5=9 9-2=7 7+4=11 #### 11", "1: 9-5=4 vs 3: 43 no\nStep 1 is wrong."),
            // wrong answer
            ("3+5=8 8-2=6 6+4=10 #### 6", "1: 8-5=3 vs 3: 33 ok\n2: 6+2=8 vs 8: 88 ok\n3: 10-4=6 vs 6: 66 ok\nanswer 6 vs 10: 01 60 no\nThe final answer is wrong."),
            // truncated chain
            ("3+5=8 8-2=6 #### 6", "1: 8-5=3 vs 3: 33 ok\n2: 6+2=8 vs 8: 88 ok\n3: missing no\nStep 3 is wrong."),
            ("3+5=8 8-2=", "1: 8-5=3 vs 3: 33 ok\n2: unreadable no\nStep 2 is wrong."),
            ("3+5=8 8-2=6 6+4=10", "1: 8-5=3 vs 3: 33 ok\n2: 6+2=8 vs 8: 88 ok\n3: 10-4=6 vs 6: 66 ok\nanswer missing no\nThe final answer is wrong."),
            ("3+5=8 8-2=6 6+4=10 #### x", "1: 8-5=3 vs 3: 33 ok\n2: 6+2=8 vs 8: 88 ok\n3: 10-4=6 vs 6: 66 ok\nanswer unreadable no\nThe final answer is wrong."),
            ("3+5=8 8-2=6 6+4=10 10+1=11 #### 11", "1: 8-5=3 vs 3: 33 ok\n2: 6+2=8 vs 8: 88 ok\n3: 10-4=6 vs 6: 66 ok\n4: extra no\nStep 4 is wrong."),
            // right value, wrong written operation
            ("3+5=8 9-3=6 6+4=10 #### 10", "1: 8-5=3 vs 3: 33 ok\n2: 6+2=8 vs 8: 88 ok\n2: 9-3 is not 8-2 no\nStep 2 is wrong."),
            // a skipped step
            ("3+5=8 8+4=12 #### 12", "1: 8-5=3 vs 3: 33 ok\n2: 12+2=14 vs 8: 10 48 no\nStep 2 is wrong."),
            ("3+5=8 8-2=6 6+4=10 #### 10 #### 10", "1: 8-5=3 vs 3: 33 ok\n2: 6+2=8 vs 8: 88 ok\n3: 10-4=6 vs 6: 66 ok\nanswer 10 vs 10: 11 00 ok\nextra text no\nThe solution has extra text."),
            ("", "The solution cannot be read."),
            ("hello", "The solution cannot be read."),
            ("#### 10", "1: missing no\nStep 1 is wrong."),
            ("3+5=8 8-02=6 6+4=10 #### 10", "1: 8-5=3 vs 3: 33 ok\n2: unreadable no\nStep 2 is wrong."),
            ("3+5=8 8-2=6 6+4=10 ####\n10", "1: 8-5=3 vs 3: 33 ok\n2: 6+2=8 vs 8: 88 ok\n3: 10-4=6 vs 6: 66 ok\nanswer unreadable no\nThe final answer is wrong."),
        ];
        for (cand, expected) in cases {
            let c = critique(Q, cand);
            assert_eq!(c.rationale, expected, "{cand}");
            assert!(!c.correct, "{cand}");
            assert!(verify_targets(&c).ends_with("(Yes/No)? No"));
        }
        assert_eq!(
            critique("what?", "3+5=8 #### 8").rationale,
            "The question cannot be read."
        );
    }

    #[test]
    fn multiplication_is_checked_by_division() {
        let q = "3*4-2=?";
        assert_eq!(
            critique(q, "3*4=12 12-2=10 #### 10").rationale,
            "1: 12/4=3 vs 3: 33 ok\n2: 10+2=12 vs 12: 11 22 ok\nanswer 10 vs 10: 11 00 ok"
        );
        assert_eq!(
            critique(q, "3*4=13 13-2=11 #### 11").rationale,
            "1: 13/4=3r1 no\nStep 1 is wrong."
        );
        assert_eq!(
            critique(q, "3*4=16 16-2=14 #### 14").rationale,
            "1: 16/4=4 vs 3: 43 no\nStep 1 is wrong."
        );
    }

    #[test]
    fn words_surface() {
        let q =
            "Mia has 3 apples. She buys 5 more. She gives away 2. How many apples does she have?";
        let c = critique(q, "3 + 5 = 8. 8 - 2 = 6. #### 6");
        assert_eq!(
            c.rationale,
            "Step 1: 8 - 5 = 3 vs 3: 33 ok.\nStep 2: 6 + 2 = 8 vs 8: 88 ok.\nAnswer 6 vs 6: 66 ok."
        );
        assert!(c.correct);
        let c = critique(q, "3 + 5 = 8. 8 - 2 = 5. #### 5");
        assert_eq!(
            c.rationale,
            "Step 1: 8 - 5 = 3 vs 3: 33 ok.\nStep 2: 5 + 2 = 7 vs 8: 78 no.\nStep 2 is wrong."
        );
        // Both surfaces of a candidate are read.
        assert!(critique(q, "3+5=8 8-2=6 #### 6").correct);
    }

    #[test]
    fn generated_solutions_get_the_right_verdict() {
        let mut rng = StdRng::seed_from_u64(11);
        for d in [
            Difficulty::easy(),
            Difficulty::hard(),
            Difficulty {
                ops: vec![Op::Add, Op::Sub, Op::Mul],
                ..Difficulty::medium()
            },
        ] {
            for wording in [Wording::Terse, Wording::Words] {
                for _ in 0..300 {
                    let p = Problem::sample(&mut rng, &d).unwrap();
                    let q = question_text(&p, wording, &mut rng);
                    let good = critique(&q, &Solution::correct(&p).render(wording));
                    assert!(good.correct, "{q}\n{}", good.rationale);
                    assert!(!good.rationale.contains(" no"));
                    let (bad, how) = Solution::corrupted(&p, &mut rng);
                    let c = critique(&q, &bad.render(wording));
                    assert!(!c.correct, "{q}\n{}\n{}", bad.render(wording), c.rationale);
                    match how {
                        Corruption::Answer { .. } => {
                            assert!(c.rationale.ends_with("The final answer is wrong."))
                        }
                        _ => {
                            let k = how.first_wrong_step().unwrap();
                            assert!(
                                c.rationale.ends_with(&format!("Step {k} is wrong.")),
                                "{how:?}\n{}",
                                c.rationale
                            );
                            // The steps before it were all accepted.
                            assert_eq!(
                                c.rationale.matches(" ok").count(),
                                k - 1,
                                "{}",
                                c.rationale
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn any_text_is_read_without_panicking() {
        let mut rng = StdRng::seed_from_u64(5);
        let alphabet: Vec<char> = "0123456789+-*=#. \nx?a".chars().collect();
        let p = Problem {
            start: 3,
            steps: vec![(Op::Add, 5), (Op::Sub, 2), (Op::Mul, 4)],
        };
        let q = question_text(&p, Wording::Terse, &mut rng);
        let good = Solution::correct(&p).render(Wording::Terse);
        let mut accepted = 0;
        for i in 0..5000 {
            let text: String = if i % 2 == 0 {
                let len = rng.random_range(0..40);
                (0..len)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect()
            } else {
                // A few random edits of the correct solution.
                let mut chars: Vec<char> = good.chars().collect();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..=chars.len());
                    match rng.random_range(0..3) {
                        0 if at < chars.len() => {
                            chars.remove(at);
                        }
                        1 => chars.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                        _ if at < chars.len() => {
                            chars[at] = alphabet[rng.random_range(0..alphabet.len())]
                        }
                        _ => {}
                    }
                }
                chars.into_iter().collect()
            };
            let c = critique(&q, &text);
            assert!(!c.rationale.is_empty());
            if c.correct {
                accepted += 1;
                // Whatever it accepts has the right answer.
                assert!(crate::data::same_answer(&text, "#### 24"), "{text:?}");
            }
        }
        // Some edits are harmless (e.g. a space), most are not.
        assert!(accepted < 2500, "{accepted}");
        // Huge numbers do not overflow.
        assert!(!critique(&q, "999999999*999999999=1 #### 1").correct);
        assert!(
            !critique(
                "999999999*999999999=?",
                "999999999*999999999=999999999 #### 1"
            )
            .correct
        );
    }

    #[test]
    fn row_formats() {
        assert_eq!(
            verify_inputs(Q, "x"),
            "Q: 3+5-2+4=?\nA: x\nVerification: Let's verify step by step.\n"
        );
        assert_eq!(
            direct_inputs(Q, "x"),
            "Q: 3+5-2+4=?\nA: x\nVerification: Is the answer correct (Yes/No)?"
        );
        assert_eq!(correct_inputs(Q), "Q: 3+5-2+4=?\nA: ");
    }
}
