//! Exact match and token F1 as in the official SQuAD v1.1 evaluation script, and the HotpotQA F1 rule.
//!
//! Normalisation (`normalize_answer`): lowercase (Unicode, like Python's `str.lower`), delete the
//! ASCII punctuation of Python's `string.punctuation`, replace every `\b(a|an|the)\b` with a space,
//! then fold white space (Python `str.split`) into single spaces.

use crate::text::{py_is_word, py_split};

/// SQuAD v1.1 `normalize_answer`.
///
/// ```
/// assert_eq!(lora_metrics::squad::normalize_answer("The  Cat's hat!"), "cats hat");
/// ```
pub fn normalize_answer(s: &str) -> String {
    let lowered = s.to_lowercase();
    let no_punc: Vec<char> = lowered.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    let mut out = String::with_capacity(no_punc.len());
    let n = no_punc.len();
    let mut i = 0;
    while i < n {
        let c = no_punc[i];
        let at_boundary = i == 0 || !py_is_word(no_punc[i - 1]);
        if at_boundary && (c == 'a' || c == 't') {
            let mut matched = 0usize;
            // Alternation order of the reference regex: a | an | the.
            for art in ["a", "an", "the"] {
                let len = art.len();
                if i + len <= n
                    && art.chars().zip(&no_punc[i..i + len]).all(|(x, &y)| x == y)
                    && (i + len == n || !py_is_word(no_punc[i + len]))
                {
                    matched = len;
                    break;
                }
            }
            if matched > 0 {
                out.push(' ');
                i += matched;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    py_split(&out).collect::<Vec<_>>().join(" ")
}

/// SQuAD exact match of one prediction against one ground truth (1.0 or 0.0).
pub fn exact_match(prediction: &str, ground_truth: &str) -> f64 {
    if normalize_answer(prediction) == normalize_answer(ground_truth) {
        1.0
    } else {
        0.0
    }
}

fn token_f1(pred_norm: &str, gold_norm: &str) -> f64 {
    let p: Vec<&str> = py_split(pred_norm).collect();
    let g: Vec<&str> = py_split(gold_norm).collect();
    let mut pc = p.clone();
    let mut gc = g.clone();
    pc.sort_unstable();
    gc.sort_unstable();
    let (mut i, mut j, mut same) = (0usize, 0usize, 0usize);
    while i < pc.len() && j < gc.len() {
        match pc[i].cmp(gc[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                same += 1;
                i += 1;
                j += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = 1.0 * same as f64 / p.len() as f64;
    let recall = 1.0 * same as f64 / g.len() as f64;
    (2.0 * precision * recall) / (precision + recall)
}

/// SQuAD v1.1 token F1 of one prediction against one ground truth.
///
/// ```
/// let f = lora_metrics::squad::f1("the cat sat", "a cat");
/// assert!((f - 2.0 / 3.0).abs() < 1e-12);
/// ```
pub fn f1(prediction: &str, ground_truth: &str) -> f64 {
    token_f1(&normalize_answer(prediction), &normalize_answer(ground_truth))
}

/// HotpotQA token F1: as [`f1`], but if either normalised side is `yes`, `no` or `noanswer` and the
/// two normalised strings differ, the score is 0.
///
/// ```
/// assert_eq!(lora_metrics::squad::hotpot_f1("yes", "yes indeed"), 0.0);
/// ```
pub fn hotpot_f1(prediction: &str, ground_truth: &str) -> f64 {
    let p = normalize_answer(prediction);
    let g = normalize_answer(ground_truth);
    let special = |s: &str| matches!(s, "yes" | "no" | "noanswer");
    if (special(&p) || special(&g)) && p != g {
        return 0.0;
    }
    token_f1(&p, &g)
}

/// Maximum of `metric(prediction, gt)` over the ground truths (`metric_max_over_ground_truths`);
/// 0.0 for an empty list.
pub fn max_over_ground_truths(metric: fn(&str, &str) -> f64, prediction: &str, ground_truths: &[String]) -> f64 {
    ground_truths.iter().map(|g| metric(prediction, g)).fold(f64::NEG_INFINITY, f64::max).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn articles_and_punctuation() {
        assert_eq!(normalize_answer("An apple, a day: THE end."), "apple day end");
        assert_eq!(normalize_answer("theater and an"), "theater and");
        assert_eq!(normalize_answer("the-end"), "theend");
        assert_eq!(normalize_answer("!!!"), "");
        assert_eq!(exact_match("The Beatles", "beatles"), 1.0);
        assert_eq!(f1("", ""), 0.0);
    }
}
