//! Final answers of math solutions (CONTRACTS "Datasets"): the number after the last `####`
//! (GSM8K's answer lines), else after the last `The answer is` (genrm-critiques' solutions).
//! `$`, `:` and `*` before the number and `,` inside it are dropped, a trailing `.` ends it;
//! answers compare as numbers, so `72`, `72.0` and `$72.00` agree.
//!
//! This lives with the data because the GSM8K `qa` and genrm `solution` schemas need it to
//! label rows; evaluation code uses the same two functions.

/// The marker strings, tried in this order; the last occurrence of the first one present wins.
const MARKERS: [&str; 2] = ["####", "The answer is"];

/// The final numeric answer of a solution, if it has one.
pub fn extract_answer(text: &str) -> Option<f64> {
    let after = MARKERS
        .iter()
        .find_map(|marker| text.rfind(marker).map(|at| &text[at + marker.len()..]))?;
    let line = after.lines().next().unwrap_or("");
    parse_number(line)
}

/// The first number in `text` after skipping spaces and `$ : *`: digits with optional
/// thousands commas, an optional sign and decimal part; a trailing `.` is not part of it.
fn parse_number(text: &str) -> Option<f64> {
    let text = text.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '$' | ':' | '*'));
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    if let Some(&c) = chars.peek() {
        if c == '-' || c == '+' {
            number.push(c);
            chars.next();
            while chars.peek() == Some(&'$') {
                chars.next();
            }
        }
    }
    let mut seen_dot = false;
    while let Some(&c) = chars.peek() {
        match c {
            '0'..='9' => number.push(c),
            ',' => {}
            '.' if !seen_dot => {
                seen_dot = true;
                number.push(c);
            }
            _ => break,
        }
        chars.next();
    }
    // "81." at the end of a sentence: the dot is punctuation.
    let number = number.trim_end_matches('.');
    if !number.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    number.parse::<f64>().ok()
}

/// Whether two answers are the same number (relative tolerance 1e-6, absolute near zero).
pub fn answers_match(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// Whether `solution`'s final answer equals `reference`'s (a solution or a bare number).
pub fn same_answer(solution: &str, reference: &str) -> bool {
    let reference = extract_answer(reference).or_else(|| parse_number(reference));
    match (extract_answer(solution), reference) {
        (Some(a), Some(b)) => answers_match(a, b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_answers() {
        // Lines 1, 2 and 4 of /work/shared/data/gsm8k/train_first500.jsonl.
        let a = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72";
        assert_eq!(extract_answer(a), Some(72.0));
        let a = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10";
        assert_eq!(extract_answer(a), Some(10.0));
        assert_eq!(extract_answer("so 1,000 in all.\n#### 1,000"), Some(1000.0));
        assert_eq!(extract_answer("#### -3.5"), Some(-3.5));
    }

    #[test]
    fn genrm_critiques_answers() {
        // From /work/shared/data/genrm: cot_incorrect_val row 1 and data_collection rows.
        let s = "Fencing costs $3 per foot, so Cole has to pay $3 * 27 = $81 for the fence.\n\nThe answer is $81.\nVerification: Let's verify step by step.\n";
        assert_eq!(extract_answer(s), Some(81.0));
        let s = "Together, they caught 30 + 20 + 40 = 90 fishes. The answer is 90.";
        assert_eq!(extract_answer(s), Some(90.0));
        let s = "the cost per piece of fruit is $36 / 20 = $1.80. The answer is 1.8.";
        assert_eq!(extract_answer(s), Some(1.8));
        assert_eq!(extract_answer("The answer is 1,750 cards."), Some(1750.0));
        assert_eq!(extract_answer("The answer is: **42**"), Some(42.0));
        // `####` wins over `The answer is`, and the last occurrence counts.
        assert_eq!(extract_answer("The answer is 3.\n#### 4"), Some(4.0));
        assert_eq!(
            extract_answer("The answer is 3. No wait, The answer is 5."),
            Some(5.0)
        );
    }

    #[test]
    fn no_answer() {
        assert_eq!(extract_answer("I am not sure."), None);
        assert_eq!(extract_answer("The answer is unknown."), None);
        assert_eq!(extract_answer("#### ."), None);
    }

    #[test]
    fn numeric_comparison() {
        assert!(answers_match(72.0, 72.000_000_01));
        assert!(!answers_match(72.0, 72.1));
        assert!(same_answer("The answer is $80.00.", "80"));
        assert!(same_answer("blah\n#### 8", "The answer is 8."));
        assert!(!same_answer("The answer is 8.", "9"));
        assert!(!same_answer("no answer", "9"));
    }
}
