//! Which rows train and which evaluate: the seed study's selection options, deterministic for a
//! seed on every platform.
//!
//! [`select`] takes the training file's rows and, when one was given, the eval file's rows:
//!
//! 1. **Held-out split.** Without eval rows (and without `sanity_train`), a seeded random
//!    [`DEFAULT_EVAL_FRACTION`] of the rows (at least 1, when there are 2 or more rows) is held
//!    out for evaluation, like `Dataset.train_test_split(test_size=0.05, seed=…)`; the rest
//!    train. Both keep the file order.
//! 2. **Random sample.** With `dataset_random_sample`, each split is shuffled with the seed
//!    before taking rows; otherwise rows are taken from the start, in file order.
//! 3. **Percentile.** `train_percentile` / `test_percentile` keep `floor(n · P / 100)` rows of
//!    the split (P in 0–100, floats allowed: `0.1` is 0.1 %), at least 1 when P > 0 and n > 0.
//! 4. **Length cap.** `train_dataset_length` / `test_dataset_length` cap the count after that.
//! 5. **Sanity train.** With `sanity_train`, eval is exactly the selected training rows (to prove
//!    the loop can overfit), whatever eval data was given.
//!
//! Randomness: `StdRng::seed_from_u64` (rand 0.9, ChaCha12) with a Fisher–Yates shuffle drawing
//! `u64`s, so results do not depend on pointer width. The held-out draw, the train sample and
//! the eval sample use distinct streams derived from the one seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Fraction of the rows held out for evaluation when no eval data is given.
pub const DEFAULT_EVAL_FRACTION: f64 = 0.05;

/// The selection options; `Selection::default()` takes everything and holds out 5 % for eval.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Percent (0–100) of the training split's rows to keep.
    pub train_percentile: Option<f64>,
    /// Percent (0–100) of the eval split's rows to keep.
    pub test_percentile: Option<f64>,
    /// At most this many training rows.
    pub train_dataset_length: Option<usize>,
    /// At most this many eval rows.
    pub test_dataset_length: Option<usize>,
    /// Shuffle each split with `seed` before taking rows.
    pub dataset_random_sample: bool,
    /// Evaluate on the training rows.
    pub sanity_train: bool,
    /// Fraction held out when no eval rows are given.
    pub eval_fraction: f64,
    pub seed: u64,
}

impl Default for Selection {
    fn default() -> Self {
        Selection {
            train_percentile: None,
            test_percentile: None,
            train_dataset_length: None,
            test_dataset_length: None,
            dataset_random_sample: false,
            sanity_train: false,
            eval_fraction: DEFAULT_EVAL_FRACTION,
            seed: 0,
        }
    }
}

impl Selection {
    pub fn validate(&self) -> Result<()> {
        for (name, p) in [
            ("train_percentile", self.train_percentile),
            ("test_percentile", self.test_percentile),
        ] {
            if let Some(p) = p {
                if !(0.0..=100.0).contains(&p) {
                    return Err(Error::invalid(format!(
                        "{name} must be between 0 and 100 (a percent), got {p}"
                    )));
                }
            }
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(Error::invalid(format!(
                "eval_fraction must be in [0, 1), got {}",
                self.eval_fraction
            )));
        }
        Ok(())
    }
}

/// Stream ids mixed into the seed, one per random decision.
const HOLD_OUT_STREAM: u64 = 0x686f_6c64;
const TRAIN_STREAM: u64 = 0x7472_6169;
const EVAL_STREAM: u64 = 0x6576_616c;

/// The generator of one random decision: `seed` mixed with a `stream` id.
pub fn seeded_rng(seed: u64, stream: u64) -> StdRng {
    // SplitMix-style mixing so nearby seeds and streams give unrelated generators.
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// A seeded Fisher–Yates shuffle, identical on every platform for a given seed.
pub fn shuffle<T>(items: &mut [T], rng: &mut StdRng) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i as u64) as usize;
        items.swap(i, j);
    }
}

/// The permutation of `0..n` a seed gives (used for sampling and batch order).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, &mut seeded_rng(seed, 0));
    order
}

/// How many rows a percentile keeps: `floor(n · p / 100)`, at least 1 when p > 0 and n > 0.
pub fn percentile_count(n: usize, percentile: f64) -> usize {
    if n == 0 || percentile <= 0.0 {
        return 0;
    }
    // The epsilon keeps 10 % of 30 at 3 despite 30 * 10 / 100 = 2.9999999999999996.
    let count = (n as f64 * percentile / 100.0 + 1e-9).floor() as usize;
    count.clamp(1, n)
}

fn take<T>(
    mut rows: Vec<T>,
    percentile: Option<f64>,
    cap: Option<usize>,
    random: bool,
    seed: u64,
    stream: u64,
) -> Vec<T> {
    if random {
        shuffle(&mut rows, &mut seeded_rng(seed, stream));
    }
    let mut count = percentile.map_or(rows.len(), |p| percentile_count(rows.len(), p));
    if let Some(cap) = cap {
        count = count.min(cap);
    }
    rows.truncate(count);
    rows
}

/// How many rows the held-out split takes from `n`: `ceil(n · fraction)`, at least 1 when
/// n ≥ 2 and fraction > 0, never all of them.
pub fn held_out_count(n: usize, fraction: f64) -> usize {
    if n < 2 || fraction <= 0.0 {
        return 0;
    }
    ((n as f64 * fraction - 1e-9).ceil() as usize).clamp(1, n - 1)
}

/// Splits rows into (train, eval) by the options; see the module docs for the order of steps.
pub fn select<T: Clone>(
    rows: Vec<T>,
    eval_rows: Option<Vec<T>>,
    selection: &Selection,
) -> Result<(Vec<T>, Vec<T>)> {
    selection.validate()?;
    let (train, eval) = match eval_rows {
        Some(eval) => (rows, eval),
        None if selection.sanity_train => (rows, Vec::new()),
        None => {
            let n = rows.len();
            let held = held_out_count(n, selection.eval_fraction);
            let mut is_eval = vec![false; n];
            for &i in permutation(n, selection.seed ^ HOLD_OUT_STREAM)
                .iter()
                .take(held)
            {
                is_eval[i] = true;
            }
            let mut train = Vec::with_capacity(n - held);
            let mut eval = Vec::with_capacity(held);
            for (row, &e) in rows.into_iter().zip(&is_eval) {
                if e {
                    eval.push(row);
                } else {
                    train.push(row);
                }
            }
            (train, eval)
        }
    };
    let train = take(
        train,
        selection.train_percentile,
        selection.train_dataset_length,
        selection.dataset_random_sample,
        selection.seed,
        TRAIN_STREAM,
    );
    let eval = if selection.sanity_train {
        train.clone()
    } else {
        take(
            eval,
            selection.test_percentile,
            selection.test_dataset_length,
            selection.dataset_random_sample,
            selection.seed,
            EVAL_STREAM,
        )
    };
    Ok((train, eval))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<usize> {
        (0..n).collect()
    }

    #[test]
    fn default_holds_out_five_percent_seeded() {
        let (train, eval) = select(rows(200), None, &Selection::default()).unwrap();
        assert_eq!((train.len(), eval.len()), (190, 10));
        let mut all: Vec<usize> = train.iter().chain(&eval).copied().collect();
        all.sort();
        assert_eq!(all, rows(200), "a partition of the rows");
        assert!(train.windows(2).all(|w| w[0] < w[1]), "file order kept");
        let again = select(rows(200), None, &Selection::default()).unwrap();
        assert_eq!(again, (train.clone(), eval.clone()));
        let other = select(
            rows(200),
            None,
            &Selection {
                seed: 1,
                ..Default::default()
            },
        )
        .unwrap();
        assert_ne!(other.1, eval, "another seed holds out other rows");
        assert_eq!(held_out_count(1, 0.05), 0);
        assert_eq!(held_out_count(3, 0.05), 1);
        assert_eq!(held_out_count(197, 0.05), 10);
    }

    #[test]
    fn percentiles_and_caps() {
        assert_eq!(percentile_count(500, 10.0), 50);
        assert_eq!(percentile_count(500, 0.1), 1); // 0.5 rows: at least one
        assert_eq!(percentile_count(2000, 0.1), 2);
        assert_eq!(percentile_count(30, 10.0), 3);
        assert_eq!(percentile_count(197, 50.0), 98);
        assert_eq!(percentile_count(10, 0.0), 0);
        assert_eq!(percentile_count(10, 100.0), 10);
        let selection = Selection {
            train_percentile: Some(50.0),
            test_percentile: Some(10.0),
            test_dataset_length: Some(3),
            ..Default::default()
        };
        let (train, eval) = select(rows(100), Some(rows(100)), &selection).unwrap();
        assert_eq!(train, rows(50), "in order without random sampling");
        assert_eq!(eval, rows(3));
        let capped = Selection {
            train_dataset_length: Some(7),
            ..Default::default()
        };
        let (train, _) = select(rows(100), Some(vec![]), &capped).unwrap();
        assert_eq!(train.len(), 7);
        assert!(select(
            rows(3),
            None,
            &Selection {
                train_percentile: Some(150.0),
                ..Default::default()
            }
        )
        .is_err());
    }

    #[test]
    fn random_sample_is_seeded() {
        let selection = Selection {
            dataset_random_sample: true,
            train_dataset_length: Some(20),
            seed: 42,
            ..Default::default()
        };
        let (a, _) = select(rows(1000), Some(vec![]), &selection).unwrap();
        let (b, _) = select(rows(1000), Some(vec![]), &selection).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, rows(20));
        let (c, _) = select(
            rows(1000),
            Some(vec![]),
            &Selection {
                seed: 43,
                ..selection
            },
        )
        .unwrap();
        assert_ne!(a, c);
        // Pinned so a change of generator or shuffle (which would change every run's data) is seen.
        assert_eq!(permutation(8, 7), [1, 2, 5, 4, 3, 0, 6, 7]);
        let mut sorted = permutation(50, 3);
        sorted.sort();
        assert_eq!(sorted, rows(50));
    }

    #[test]
    fn sanity_train_evaluates_on_the_training_rows() {
        let selection = Selection {
            sanity_train: true,
            train_dataset_length: Some(10),
            ..Default::default()
        };
        let (train, eval) = select(rows(100), None, &selection).unwrap();
        assert_eq!(train, rows(10));
        assert_eq!(eval, train);
        let (train, eval) = select(rows(100), Some(vec![500, 501]), &selection).unwrap();
        assert_eq!(eval, train);
    }
}
