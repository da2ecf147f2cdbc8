//! The Porter stemmer exactly as NLTK's `PorterStemmer()` in its default `NLTK_EXTENSIONS` mode,
//! which is what `rouge-score` 0.1.2 instantiates (`nltk.stem.porter.PorterStemmer()`).
//!
//! It works on lowercase ASCII bytes, which is all the ROUGE tokenizer ever produces.

fn flags(w: &[u8]) -> Vec<bool> {
    let mut f: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let cons = match c {
            b'a' | b'e' | b'i' | b'o' | b'u' => false,
            b'y' => i == 0 || !f[i - 1],
            _ => true,
        };
        f.push(cons);
    }
    f
}

fn is_cons(w: &[u8], i: usize) -> bool {
    flags(&w[..=i])[i]
}

fn measure(w: &[u8]) -> usize {
    let f = flags(w);
    f.windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(w: &[u8]) -> bool {
    flags(w).iter().any(|&c| !c)
}

fn ends_double_consonant(w: &[u8]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_cons(w, n - 1)
}

fn ends_cvc(w: &[u8]) -> bool {
    let n = w.len();
    if n >= 3 {
        let f = flags(w);
        if f[n - 3] && !f[n - 2] && f[n - 1] && !matches!(w[n - 1], b'w' | b'x' | b'y') {
            return true;
        }
    }
    if n == 2 {
        let f = flags(w);
        return !f[0] && f[1];
    }
    false
}

fn cat(stem: &[u8], rep: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(stem.len() + rep.len());
    v.extend_from_slice(stem);
    v.extend_from_slice(rep);
    v
}

type Cond = fn(&[u8]) -> bool;

fn m_gt0(s: &[u8]) -> bool {
    measure(s) > 0
}

fn m_gt1(s: &[u8]) -> bool {
    measure(s) > 1
}

/// NLTK `_apply_rule_list` for plain suffix rules: the first rule whose suffix matches decides.
fn apply_rules(word: Vec<u8>, rules: &[(&[u8], &[u8], Cond)]) -> Vec<u8> {
    for &(suffix, rep, cond) in rules {
        if word.ends_with(suffix) {
            let stem = &word[..word.len() - suffix.len()];
            return if cond(stem) { cat(stem, rep) } else { word };
        }
    }
    word
}

fn step1a(word: Vec<u8>) -> Vec<u8> {
    if word.ends_with(b"ies") && word.len() == 4 {
        return cat(&word[..1], b"ie");
    }
    let always: Cond = |_| true;
    apply_rules(word, &[(b"sses", b"ss", always), (b"ies", b"i", always), (b"ss", b"ss", always), (b"s", b"", always)])
}

fn step1b(word: Vec<u8>) -> Vec<u8> {
    if word.ends_with(b"ied") {
        let stem = &word[..word.len() - 3];
        return if word.len() == 4 { cat(stem, b"ie") } else { cat(stem, b"i") };
    }
    if word.ends_with(b"eed") {
        let stem = &word[..word.len() - 3];
        return if measure(stem) > 0 { cat(stem, b"ee") } else { word };
    }
    let mut inter: Option<&[u8]> = None;
    for suffix in [&b"ed"[..], &b"ing"[..]] {
        if word.ends_with(suffix) {
            let s = &word[..word.len() - suffix.len()];
            if contains_vowel(s) {
                inter = Some(s);
                break;
            }
        }
    }
    let Some(s) = inter else {
        return word;
    };
    for (suffix, rep) in [(&b"at"[..], &b"ate"[..]), (b"bl", b"ble"), (b"iz", b"ize")] {
        if s.ends_with(suffix) {
            return cat(&s[..s.len() - suffix.len()], rep);
        }
    }
    if ends_double_consonant(s) {
        let last = s[s.len() - 1];
        return if matches!(last, b'l' | b's' | b'z') { s.to_vec() } else { s[..s.len() - 1].to_vec() };
    }
    if measure(s) == 1 && ends_cvc(s) {
        cat(s, b"e")
    } else {
        s.to_vec()
    }
}

fn step1c(word: Vec<u8>) -> Vec<u8> {
    if word.ends_with(b"y") {
        let stem = &word[..word.len() - 1];
        if stem.len() > 1 && is_cons(stem, stem.len() - 1) {
            return cat(stem, b"i");
        }
    }
    word
}

fn step2(word: Vec<u8>) -> Vec<u8> {
    if word.ends_with(b"alli") && m_gt0(&word[..word.len() - 4]) {
        return step2(cat(&word[..word.len() - 4], b"al"));
    }
    let rules: [(&[u8], &[u8], Cond); 21] = [
        (b"ational", b"ate", m_gt0),
        (b"tional", b"tion", m_gt0),
        (b"enci", b"ence", m_gt0),
        (b"anci", b"ance", m_gt0),
        (b"izer", b"ize", m_gt0),
        (b"bli", b"ble", m_gt0),
        (b"alli", b"al", m_gt0),
        (b"entli", b"ent", m_gt0),
        (b"eli", b"e", m_gt0),
        (b"ousli", b"ous", m_gt0),
        (b"ization", b"ize", m_gt0),
        (b"ation", b"ate", m_gt0),
        (b"ator", b"ate", m_gt0),
        (b"alism", b"al", m_gt0),
        (b"iveness", b"ive", m_gt0),
        (b"fulness", b"ful", m_gt0),
        (b"ousness", b"ous", m_gt0),
        (b"aliti", b"al", m_gt0),
        (b"iviti", b"ive", m_gt0),
        (b"biliti", b"ble", m_gt0),
        (b"fulli", b"ful", m_gt0),
    ];
    for &(suffix, rep, cond) in &rules {
        if word.ends_with(suffix) {
            let stem = &word[..word.len() - suffix.len()];
            return if cond(stem) { cat(stem, rep) } else { word };
        }
    }
    // NLTK's "logi" rule tests the measure of the word minus "ogi" (that is, stem + "l").
    if word.ends_with(b"logi") {
        let stem = &word[..word.len() - 4];
        return if m_gt0(&word[..word.len() - 3]) { cat(stem, b"log") } else { word };
    }
    word
}

fn step3(word: Vec<u8>) -> Vec<u8> {
    apply_rules(
        word,
        &[
            (b"icate", b"ic", m_gt0),
            (b"ative", b"", m_gt0),
            (b"alize", b"al", m_gt0),
            (b"iciti", b"ic", m_gt0),
            (b"ical", b"ic", m_gt0),
            (b"ful", b"", m_gt0),
            (b"ness", b"", m_gt0),
        ],
    )
}

fn step4(word: Vec<u8>) -> Vec<u8> {
    let ion: Cond = |s| measure(s) > 1 && matches!(s.last(), Some(b's' | b't'));
    apply_rules(
        word,
        &[
            (b"al", b"", m_gt1),
            (b"ance", b"", m_gt1),
            (b"ence", b"", m_gt1),
            (b"er", b"", m_gt1),
            (b"ic", b"", m_gt1),
            (b"able", b"", m_gt1),
            (b"ible", b"", m_gt1),
            (b"ant", b"", m_gt1),
            (b"ement", b"", m_gt1),
            (b"ment", b"", m_gt1),
            (b"ent", b"", m_gt1),
            (b"ion", b"", ion),
            (b"ou", b"", m_gt1),
            (b"ism", b"", m_gt1),
            (b"ate", b"", m_gt1),
            (b"iti", b"", m_gt1),
            (b"ous", b"", m_gt1),
            (b"ive", b"", m_gt1),
            (b"ize", b"", m_gt1),
        ],
    )
}

fn step5a(word: Vec<u8>) -> Vec<u8> {
    if word.ends_with(b"e") {
        let stem = &word[..word.len() - 1];
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    word
}

fn step5b(word: Vec<u8>) -> Vec<u8> {
    if word.ends_with(b"ll") && measure(&word[..word.len() - 1]) > 1 {
        return word[..word.len() - 1].to_vec();
    }
    word
}

/// Stems one lowercase ASCII word like NLTK's `PorterStemmer().stem(word)` (NLTK_EXTENSIONS mode).
///
/// Non-ASCII input is returned unchanged (the ROUGE tokenizer never produces any).
///
/// ```
/// use lora_metrics::porter::stem;
/// assert_eq!(stem("running"), "run");
/// assert_eq!(stem("dying"), "die");
/// assert_eq!(stem("generalization"), "gener");
/// ```
pub fn stem(word: &str) -> String {
    if !word.is_ascii() {
        return word.to_string();
    }
    let lower = word.to_ascii_lowercase();
    let pooled = match lower.as_str() {
        "sky" | "skies" => Some("sky"),
        "dying" => Some("die"),
        "lying" => Some("lie"),
        "tying" => Some("tie"),
        "news" => Some("news"),
        "innings" | "inning" => Some("inning"),
        "outings" | "outing" => Some("outing"),
        "cannings" | "canning" => Some("canning"),
        "howe" => Some("howe"),
        "proceed" => Some("proceed"),
        "exceed" => Some("exceed"),
        "succeed" => Some("succeed"),
        _ => None,
    };
    if let Some(p) = pooled {
        return p.to_string();
    }
    if word.len() <= 2 {
        return lower;
    }
    let mut w = lower.into_bytes();
    w = step1a(w);
    w = step1b(w);
    w = step1c(w);
    w = step2(w);
    w = step3(w);
    w = step4(w);
    w = step5a(w);
    w = step5b(w);
    // The steps only ever splice ASCII slices, so this is always valid UTF-8.
    String::from_utf8_lossy(&w).into_owned()
}

#[cfg(test)]
mod tests {
    use super::stem;

    #[test]
    fn paper_examples() {
        for (w, s) in [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("cats", "cat"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("hopping", "hop"),
            ("falling", "fall"),
            ("filing", "file"),
            ("happy", "happi"),
            ("relational", "relat"),
            ("controll", "control"),
            ("enjoy", "enjoy"),
        ] {
            assert_eq!(stem(w), s, "{w}");
        }
    }
}
