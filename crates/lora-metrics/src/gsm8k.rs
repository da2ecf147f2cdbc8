//! GSM8K answer checking.
//!
//! * `strict`: the official OpenAI `grade-school-math` rule: the first match of
//!   `#### (\-?[0-9\.\,]+)` in each text, commas removed, compared as strings (a prediction without
//!   a match is wrong).
//! * `flexible`: the last match of lm-evaluation-harness's flexible pattern
//!   `(-?[$0-9.,]{2,})|(-?[0-9]+)` in the prediction, with `,` and `$` removed and one trailing `.`
//!   removed, compared with the gold answer normalised the same way.
//!
//! The gold answer of a reference is its `#### N`; a reference that is just a number (for example
//! `"1,234"`) is accepted as its own gold answer. Several references: correct if any matches.

fn is_num_char(b: u8) -> bool {
    b.is_ascii_digit() || b == b'.' || b == b','
}

/// The official `extract_answer`: the first `#### N` answer with commas removed, or `None`.
///
/// ```
/// assert_eq!(lora_metrics::gsm8k::extract_strict("so 3+4=7\n#### 1,007"), Some("1007".to_string()));
/// assert_eq!(lora_metrics::gsm8k::extract_strict("The answer is 7"), None);
/// ```
pub fn extract_strict(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut from = 0;
    while let Some(off) = text[from..].find("#### ") {
        let start = from + off + 5;
        let mut j = start;
        if j < b.len() && b[j] == b'-' && j + 1 < b.len() && is_num_char(b[j + 1]) {
            j += 1;
        }
        let digits_from = j;
        while j < b.len() && is_num_char(b[j]) {
            j += 1;
        }
        if j > digits_from {
            return Some(text[start..j].replace(',', ""));
        }
        from = from + off + 1;
    }
    None
}

/// The last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` (lm-evaluation-harness `flexible-extract`), raw.
pub fn extract_last_number(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    let class = |c: u8| c == b'$' || is_num_char(c);
    let run = |mut j: usize, f: &dyn Fn(u8) -> bool| {
        while j < b.len() && f(b[j]) {
            j += 1;
        }
        j
    };
    let mut last = None;
    let mut i = 0;
    while i < b.len() {
        let mut found = None;
        // Alternative 1, with then without the optional '-'.
        for s in [i + usize::from(b[i] == b'-'), i] {
            if s == i && b[i] == b'-' {
                // Without the '-', the class would have to start at '-', which it cannot.
                continue;
            }
            let e = run(s, &class);
            if e - s >= 2 {
                found = Some(e);
                break;
            }
        }
        if found.is_none() {
            // Alternative 2.
            let s = i + usize::from(b[i] == b'-');
            let e = run(s, &|c: u8| c.is_ascii_digit());
            if e > s {
                found = Some(e);
            }
        }
        match found {
            Some(e) => {
                last = Some(&text[i..e]);
                i = e;
            }
            None => i += 1,
        }
    }
    last
}

/// Flexible normalisation: remove `,` and `$`, then one trailing `.`.
pub fn normalize_flexible(s: &str) -> String {
    let t: String = s.trim().chars().filter(|&c| c != ',' && c != '$').collect();
    match t.strip_suffix('.') {
        Some(u) => u.to_string(),
        None => t,
    }
}

fn is_bare_number(s: &str) -> bool {
    let t = s.strip_prefix('-').unwrap_or(s);
    !t.is_empty() && t.bytes().all(is_num_char)
}

/// Gold answer of one reference (strict form: commas removed), or `None`.
pub fn gold_answer(reference: &str) -> Option<String> {
    extract_strict(reference).or_else(|| {
        let t = reference.trim();
        is_bare_number(t).then(|| t.replace(',', ""))
    })
}

/// Strict correctness (1.0 / 0.0) against already extracted gold answers.
pub fn strict_correct(prediction: &str, golds: &[String]) -> f64 {
    match extract_strict(prediction) {
        Some(p) if golds.contains(&p) => 1.0,
        _ => 0.0,
    }
}

/// Flexible correctness (1.0 / 0.0) against already extracted gold answers.
pub fn flexible_correct(prediction: &str, golds: &[String]) -> f64 {
    match extract_last_number(prediction) {
        Some(p) => {
            let p = normalize_flexible(p);
            if golds.iter().any(|g| normalize_flexible(g) == p) {
                1.0
            } else {
                0.0
            }
        }
        None => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flexible_extraction() {
        assert_eq!(extract_last_number("I have 3 apples and $1,200.50."), Some("$1,200.50."));
        assert_eq!(extract_last_number("x -5 y"), Some("-5"));
        assert_eq!(extract_last_number("a-"), None);
        assert_eq!(normalize_flexible("$1,200.50."), "1200.50");
        assert_eq!(flexible_correct("so the total is 18.", &["18".into()]), 1.0);
        assert_eq!(strict_correct("#### -3", &["-3".into()]), 1.0);
        assert_eq!(gold_answer("1,234"), Some("1234".into()));
        assert_eq!(gold_answer("about ten"), None);
    }
}
