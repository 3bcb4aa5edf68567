//! Win rate of a model against a reference (CONTRACTS "Win rate").
//!
//! Per prompt the outcome scores s = 1 (win), ½ (tie) or 0 (loss); `win_rate` is the mean of s
//! and `se = sqrt(mean((s − win_rate)²) / n)`, which is `sqrt(p(1−p)/n)` when there are no ties.
//! A real-valued judge (reward model, verifier, reward API) gives a tie when the two scores are
//! within `tie_epsilon` of each other; a pairwise judge gives a win or a loss only when its two
//! verdicts (both answer orders) agree.

use serde::{Deserialize, Serialize};

/// The default `--tie-epsilon`: scores closer than this are a tie.
pub const DEFAULT_TIE_EPSILON: f64 = 1e-6;

/// The result of one prompt, from the model's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Win,
    Tie,
    Loss,
}

impl Outcome {
    /// s: 1 for a win, ½ for a tie, 0 for a loss.
    pub fn value(self) -> f64 {
        match self {
            Outcome::Win => 1.0,
            Outcome::Tie => 0.5,
            Outcome::Loss => 0.0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Win => "win",
            Outcome::Tie => "tie",
            Outcome::Loss => "loss",
        }
    }

    /// The outcome of two real-valued scores: a tie when `|model − reference| ≤ tie_epsilon`.
    pub fn from_scores(model: f64, reference: f64, tie_epsilon: f64) -> Outcome {
        let delta = model - reference;
        if delta.is_nan() || delta.abs() <= tie_epsilon {
            Outcome::Tie
        } else if delta > 0.0 {
            Outcome::Win
        } else {
            Outcome::Loss
        }
    }
}

/// Counts, win rate and its standard error over a list of outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WinRate {
    pub n: usize,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    /// Mean of s (ties count ½); NaN when `n` is 0.
    pub win_rate: f64,
    /// `sqrt(mean((s − win_rate)²) / n)`; NaN when `n` is 0.
    pub se: f64,
}

/// The win rate and standard error of `outcomes` (CONTRACTS "Win rate").
pub fn win_rate(outcomes: &[Outcome]) -> WinRate {
    let n = outcomes.len();
    let count = |o: Outcome| outcomes.iter().filter(|&&x| x == o).count();
    let (wins, ties, losses) = (
        count(Outcome::Win),
        count(Outcome::Tie),
        count(Outcome::Loss),
    );
    if n == 0 {
        return WinRate {
            n,
            wins,
            ties,
            losses,
            win_rate: f64::NAN,
            se: f64::NAN,
        };
    }
    let nf = n as f64;
    let p = outcomes.iter().map(|o| o.value()).sum::<f64>() / nf;
    let variance = outcomes
        .iter()
        .map(|o| (o.value() - p).powi(2))
        .sum::<f64>()
        / nf;
    WinRate {
        n,
        wins,
        ties,
        losses,
        win_rate: p,
        se: (variance / nf).sqrt(),
    }
}

/// One judged prompt, as report.json's `records` carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub prompt: String,
    pub model_answer: String,
    pub reference_answer: String,
    /// The judge's score of the model's answer: the reward, p(Yes), or for a pairwise judge the
    /// share of its two verdicts (both orders) that chose it (0, ½ or 1).
    pub model_score: f64,
    pub reference_score: f64,
    pub outcome: Outcome,
}

/// report.json (CONTRACTS "Win rate"): the key names and order are the contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub n: usize,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub win_rate: f64,
    pub se: f64,
    /// The judge spec, e.g. `rm:runs/rm` or `openai-judge:https://host/v1#model`.
    pub judge: String,
    /// Mean generated tokens per answer of each side (end-of-sequence token included).
    pub mean_tokens_model: f64,
    pub mean_tokens_reference: f64,
    pub records: Vec<Record>,
}

impl Report {
    /// The report of judged records; `tokens_*` are the generated token counts of the answers
    /// the records hold (same order).
    pub fn new(
        judge: impl Into<String>,
        records: Vec<Record>,
        tokens_model: &[usize],
        tokens_reference: &[usize],
    ) -> Report {
        let outcomes: Vec<Outcome> = records.iter().map(|r| r.outcome).collect();
        let w = win_rate(&outcomes);
        Report {
            n: w.n,
            wins: w.wins,
            ties: w.ties,
            losses: w.losses,
            win_rate: w.win_rate,
            se: w.se,
            judge: judge.into(),
            mean_tokens_model: mean(tokens_model),
            mean_tokens_reference: mean(tokens_reference),
            records,
        }
    }

    /// A short human-readable summary (report.md): the numbers, then a table of the records.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        s.push_str("# Win rate\n\n");
        s.push_str(&format!("Judge: `{}`\n\n", self.judge));
        s.push_str("| n | wins | ties | losses | win rate | se | mean tokens (model) | mean tokens (reference) |\n");
        s.push_str("|---|---|---|---|---|---|---|---|\n");
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.4} | {:.4} | {:.1} | {:.1} |\n\n",
            self.n,
            self.wins,
            self.ties,
            self.losses,
            self.win_rate,
            self.se,
            self.mean_tokens_model,
            self.mean_tokens_reference
        ));
        s.push_str("Ties count ½; se = sqrt(mean((s − win_rate)²) / n).\n\n");
        s.push_str("| # | outcome | model score | reference score | prompt | model answer | reference answer |\n");
        s.push_str("|---|---|---|---|---|---|---|\n");
        for (i, r) in self.records.iter().enumerate() {
            s.push_str(&format!(
                "| {i} | {} | {:.4} | {:.4} | {} | {} | {} |\n",
                r.outcome.as_str(),
                r.model_score,
                r.reference_score,
                cell(&r.prompt),
                cell(&r.model_answer),
                cell(&r.reference_answer)
            ));
        }
        s
    }
}

fn mean(values: &[usize]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().sum::<usize>() as f64 / values.len() as f64
}

/// A table cell: one line, pipes escaped, at most 80 characters.
fn cell(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let mut out: String = one_line.chars().take(80).collect();
    if one_line.chars().count() > 80 {
        out.push('…');
    }
    out.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn win_rate_without_ties_is_the_binomial_standard_error() {
        // 3 wins, 1 loss: p = 0.75, se = sqrt(0.75 * 0.25 / 4).
        let w = win_rate(&[Win, Loss, Win, Win]);
        assert_eq!((w.n, w.wins, w.ties, w.losses), (4, 3, 0, 1));
        assert!(close(w.win_rate, 0.75));
        assert!(close(w.se, (0.75f64 * 0.25 / 4.0).sqrt()));
    }

    #[test]
    fn ties_count_half_and_shrink_the_spread() {
        // s = [1, 0.5, 0.5, 0]: p = 0.5; deviations² = [0.25, 0, 0, 0.25], mean 0.125;
        // se = sqrt(0.125 / 4) = sqrt(1/32).
        let w = win_rate(&[Win, Tie, Tie, Loss]);
        assert_eq!((w.wins, w.ties, w.losses), (1, 2, 1));
        assert!(close(w.win_rate, 0.5));
        assert!(close(w.se, (1.0f64 / 32.0).sqrt()));
        // s = [1, 1, 0.5]: p = 5/6; deviations² = [1/36, 1/36, 1/9], mean = 1/18;
        // se = sqrt(1/54).
        let w = win_rate(&[Win, Win, Tie]);
        assert!(close(w.win_rate, 5.0 / 6.0));
        assert!(close(w.se, (1.0f64 / 54.0).sqrt()));
        // All ties: p = ½ exactly, no spread.
        let w = win_rate(&[Tie, Tie]);
        assert!(close(w.win_rate, 0.5) && close(w.se, 0.0));
    }

    #[test]
    fn empty_and_unanimous_lists() {
        let w = win_rate(&[]);
        assert_eq!(w.n, 0);
        assert!(w.win_rate.is_nan() && w.se.is_nan());
        let w = win_rate(&[Loss, Loss, Loss]);
        assert!(close(w.win_rate, 0.0) && close(w.se, 0.0));
    }

    #[test]
    fn scores_within_epsilon_tie() {
        assert_eq!(Outcome::from_scores(1.0, 0.5, 1e-6), Win);
        assert_eq!(Outcome::from_scores(0.5, 1.0, 1e-6), Loss);
        assert_eq!(Outcome::from_scores(1.0, 1.0 + 1e-7, 1e-6), Tie);
        assert_eq!(Outcome::from_scores(1.0, 1.0 + 1e-7, 0.0), Loss);
        assert_eq!(Outcome::from_scores(2.0, 1.0, 1.0), Tie);
        assert_eq!(Outcome::from_scores(f64::NAN, 1.0, 1e-6), Tie);
    }

    #[test]
    fn report_serialises_the_contract_keys_in_order() {
        let record = Record {
            prompt: "p".into(),
            model_answer: "a".into(),
            reference_answer: "b".into(),
            model_score: 1.5,
            reference_score: -0.5,
            outcome: Win,
        };
        let mut loss = record.clone();
        loss.outcome = Loss;
        let report = Report::new("rm:x", vec![record, loss], &[3, 5], &[2, 2]);
        let value = serde_json::to_value(&report).unwrap();
        let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "n",
                "wins",
                "ties",
                "losses",
                "win_rate",
                "se",
                "judge",
                "mean_tokens_model",
                "mean_tokens_reference",
                "records"
            ]
        );
        assert_eq!(value["mean_tokens_model"], 4.0);
        assert_eq!(value["mean_tokens_reference"], 2.0);
        assert_eq!(value["win_rate"], 0.5);
        let r = &value["records"][0];
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "prompt",
                "model_answer",
                "reference_answer",
                "model_score",
                "reference_score",
                "outcome"
            ]
        );
        assert_eq!(r["outcome"], "win");
        assert_eq!(value["records"][1]["outcome"], "loss");
        let md = report.to_markdown();
        assert!(md.contains("| 2 | 1 | 0 | 1 | 0.5000 |"), "{md}");
    }
}
