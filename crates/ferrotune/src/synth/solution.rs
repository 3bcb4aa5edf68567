//! Written solutions: the correct one of a problem and corrupted ones that look like a
//! policy's slips, plus their two surfaces.
//!
//! Terse: `3+5=8 8-2=6 6+4=10 #### 10`. Words: `3 + 5 = 8. 8 - 2 = 6. 6 + 4 = 10. #### 10`.
//!
//! Corruptions (each deterministic given the rng), chosen with weights 2:1:1:
//! - [`Corruption::Arithmetic`]: step k's result is off by a small amount (±1, ±2, ±3, or ±10 as
//!   a carry slip); later steps are computed correctly from the wrong value, so the error
//!   propagates to the answer.
//! - [`Corruption::Copy`]: step k starts from a value other than the previous result (for step 1,
//!   other than the question's first number), computed correctly from there on.
//! - [`Corruption::Answer`]: every step is right but the number after `####` is not the last
//!   result (off by a small amount, or the previous step's result).
//!
//! Every corruption changes the final answer, and no value is negative (the parser reads digits).

use rand::rngs::StdRng;
use rand::Rng;

use super::world::{Op, Problem, Wording};

/// One written step `a op b = c` (not necessarily true).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub a: i64,
    pub op: Op,
    pub b: i64,
    pub c: i64,
}

/// A written solution: its steps and the number after `####`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Solution {
    pub steps: Vec<Step>,
    pub answer: i64,
}

/// How a corrupted solution went wrong. Steps are 1-based, as the critic names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    Arithmetic { step: usize, delta: i64 },
    Copy { step: usize, delta: i64 },
    Answer { written: i64 },
}

impl Corruption {
    /// The first wrong step (1-based), `None` when only the answer is wrong.
    pub fn first_wrong_step(&self) -> Option<usize> {
        match *self {
            Corruption::Arithmetic { step, .. } | Corruption::Copy { step, .. } => Some(step),
            Corruption::Answer { .. } => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Corruption::Arithmetic { .. } => "arithmetic",
            Corruption::Copy { .. } => "copy",
            Corruption::Answer { .. } => "answer",
        }
    }
}

impl Solution {
    /// The correct solution of `problem`.
    pub fn correct(problem: &Problem) -> Solution {
        let values = problem.values();
        let steps = problem
            .steps
            .iter()
            .enumerate()
            .map(|(i, &(op, b))| Step {
                a: values[i],
                op,
                b,
                c: values[i + 1],
            })
            .collect();
        Solution {
            steps,
            answer: problem.answer(),
        }
    }

    /// A wrong solution of `problem` and how it is wrong.
    pub fn corrupted(problem: &Problem, rng: &mut StdRng) -> (Solution, Corruption) {
        let correct = Solution::correct(problem);
        let n = problem.steps.len();
        let kind = rng.random_range(0..4);
        if kind < 3 {
            let step = rng.random_range(0..n);
            let delta = small_delta(rng);
            let copy = kind == 2;
            // A positive shift keeps every later value non-negative; a negative one may not.
            for d in [delta, delta.abs()] {
                if let Some(s) = propagate(problem, step, d, copy) {
                    let corruption = if copy {
                        Corruption::Copy {
                            step: step + 1,
                            delta: d,
                        }
                    } else {
                        Corruption::Arithmetic {
                            step: step + 1,
                            delta: d,
                        }
                    };
                    return (s, corruption);
                }
            }
        }
        let last = correct.answer;
        let previous = correct.steps.last().map_or(last, |s| s.a);
        let written = if rng.random_range(0..3) == 0 && previous != last {
            previous
        } else {
            let d = small_delta(rng);
            if last + d >= 0 {
                last + d
            } else {
                last - d
            }
        };
        (
            Solution {
                answer: written,
                ..correct
            },
            Corruption::Answer { written },
        )
    }

    /// The solution's text in `wording`.
    pub fn render(&self, wording: Wording) -> String {
        let mut parts: Vec<String> = self
            .steps
            .iter()
            .map(|s| match wording {
                Wording::Terse => format!("{}{}{}={}", s.a, s.op.symbol(), s.b, s.c),
                Wording::Words => format!("{} {} {} = {}.", s.a, s.op.symbol(), s.b, s.c),
            })
            .collect();
        parts.push(format!("#### {}", self.answer));
        parts.join(" ")
    }
}

/// A nonzero slip: ±1 (most often), ±2, ±3 or ±10.
fn small_delta(rng: &mut StdRng) -> i64 {
    const MAGNITUDES: [i64; 7] = [1, 1, 1, 2, 2, 3, 10];
    let m = MAGNITUDES[rng.random_range(0..MAGNITUDES.len())];
    if rng.random_bool(0.5) {
        m
    } else {
        -m
    }
}

/// The solution whose step `at` (0-based) has its result (or, with `copy`, its start) shifted
/// by `delta`, every later step computed correctly from there; `None` if a value would be
/// negative or overflow.
fn propagate(problem: &Problem, at: usize, delta: i64, copy: bool) -> Option<Solution> {
    let mut prev = problem.start;
    let mut steps = Vec::with_capacity(problem.steps.len());
    for (i, &(op, b)) in problem.steps.iter().enumerate() {
        let a = if copy && i == at { prev + delta } else { prev };
        let mut c = op.apply(a, b)?;
        if !copy && i == at {
            c += delta;
        }
        if a < 0 || c < 0 {
            return None;
        }
        steps.push(Step { a, op, b, c });
        prev = c;
    }
    Some(Solution {
        steps,
        answer: prev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::world::Difficulty;
    use rand::SeedableRng;

    #[test]
    fn renders_both_surfaces() {
        let p = Problem {
            start: 3,
            steps: vec![(Op::Add, 5), (Op::Sub, 2), (Op::Add, 4)],
        };
        let s = Solution::correct(&p);
        assert_eq!(s.render(Wording::Terse), "3+5=8 8-2=6 6+4=10 #### 10");
        assert_eq!(
            s.render(Wording::Words),
            "3 + 5 = 8. 8 - 2 = 6. 6 + 4 = 10. #### 10"
        );
    }

    #[test]
    fn corruptions_change_the_answer_and_cover_every_kind() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut kinds = std::collections::BTreeSet::new();
        for d in [
            Difficulty::easy(),
            Difficulty {
                ops: vec![Op::Add, Op::Sub, Op::Mul],
                ..Difficulty::medium()
            },
        ] {
            for _ in 0..500 {
                let p = Problem::sample(&mut rng, &d).unwrap();
                let (s, c) = Solution::corrupted(&p, &mut rng);
                kinds.insert(c.kind());
                assert_ne!(s.answer, p.answer(), "{p:?} {s:?} {c:?}");
                assert!(s.steps.iter().all(|st| st.a >= 0 && st.c >= 0));
                let correct = Solution::correct(&p);
                match c {
                    Corruption::Answer { written } => {
                        assert_eq!(s.steps, correct.steps);
                        assert_eq!(s.answer, written);
                    }
                    _ => {
                        let k = c.first_wrong_step().unwrap() - 1;
                        assert_eq!(s.steps[..k], correct.steps[..k]);
                        assert_ne!(s.steps[k], correct.steps[k]);
                    }
                }
            }
        }
        assert_eq!(kinds.len(), 3, "{kinds:?}");
    }

    #[test]
    fn corruption_is_deterministic() {
        let p = Problem {
            start: 3,
            steps: vec![(Op::Add, 5), (Op::Sub, 2), (Op::Add, 4)],
        };
        let a: Vec<_> = (0..20)
            .map(|i| Solution::corrupted(&p, &mut StdRng::seed_from_u64(i)))
            .collect();
        let b: Vec<_> = (0..20)
            .map(|i| Solution::corrupted(&p, &mut StdRng::seed_from_u64(i)))
            .collect();
        assert_eq!(a, b);
    }
}
