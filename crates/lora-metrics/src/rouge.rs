//! ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum exactly as Google's `rouge-score` 0.1.2
//! (`RougeScorer([...], use_stemmer=True)`).
//!
//! Tokenizer (`rouge_score/tokenize.py`): Python `str.lower()`, every run of characters outside
//! `[a-z0-9]` becomes a space, split on white space, tokens longer than 3 characters go through NLTK's
//! Porter stemmer ([`crate::porter`]), empty tokens are dropped. ROUGE-Lsum splits both texts on
//! `"\n"` (empty lines dropped) and uses the summary-level union LCS with the de-duplicating hit
//! counts of `_summary_level_lcs`.

use crate::porter;
use crate::text::FxMap;
use serde::Serialize;
use std::cell::RefCell;

/// Precision, recall and F-measure of one ROUGE type (rouge-score's `Score`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Score {
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// F-measure (`2PR / (P + R)`, or 0).
    pub fmeasure: f64,
}

impl Score {
    fn new(precision: f64, recall: f64) -> Self {
        let fmeasure = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        Score { precision, recall, fmeasure }
    }
}

/// The four ROUGE types for one (target, prediction) pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct RougeScores {
    /// ROUGE-1.
    pub rouge1: Score,
    /// ROUGE-2.
    pub rouge2: Score,
    /// ROUGE-L (whole-text LCS).
    pub rouge_l: Score,
    /// ROUGE-Lsum (summary-level LCS over newline-separated sentences).
    pub rouge_lsum: Score,
}

/// rouge-score's tokenizer. With `stem`, tokens longer than 3 characters are Porter-stemmed.
///
/// ```
/// let t = lora_metrics::rouge::tokenize("The Cats were RUNNING, fast!", true);
/// assert_eq!(t, ["the", "cat", "were", "run", "fast"]);
/// ```
pub fn tokenize(text: &str, stem: bool) -> Vec<String> {
    let mut out = Vec::new();
    for_each_raw_token(text, |tok| {
        if stem && tok.len() > 3 {
            out.push(porter::stem(tok));
        } else {
            out.push(tok.to_string());
        }
    });
    out
}

/// Calls `f` on every raw (unstemmed) token of `text`.
fn for_each_raw_token(text: &str, mut f: impl FnMut(&str)) {
    let mut cur = String::new();
    let push = |c: char, cur: &mut String, f: &mut dyn FnMut(&str)| {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            cur.push(c);
        } else if !cur.is_empty() {
            f(cur);
            cur.clear();
        }
    };
    for c in text.chars() {
        if c.is_ascii() {
            push(c.to_ascii_lowercase(), &mut cur, &mut f);
        } else {
            for l in c.to_lowercase() {
                push(l, &mut cur, &mut f);
            }
        }
    }
    if !cur.is_empty() {
        f(&cur);
    }
}

/// A tokenized text: stemmed token ids and, per token, its line (for ROUGE-Lsum).
struct Tokens {
    ids: Vec<u32>,
    /// Token ids grouped by non-empty line.
    sents: Vec<Vec<u32>>,
}

thread_local! {
    /// Raw token -> Porter stem, shared by all rows a thread scores (bounded; cleared when full).
    static STEMS: RefCell<FxMap<Box<str>, Box<str>>> = RefCell::new(FxMap::default());
}

/// Calls `f` with the stem of `raw` (tokens of at most 3 characters are not stemmed).
fn with_stem<R>(raw: &str, f: impl FnOnce(&str) -> R) -> R {
    if raw.len() <= 3 {
        return f(raw);
    }
    STEMS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(s) = cache.get(raw) {
            return f(s);
        }
        if cache.len() >= 1 << 18 {
            cache.clear();
        }
        let s = porter::stem(raw).into_boxed_str();
        let r = f(&s);
        cache.insert(raw.into(), s);
        r
    })
}

/// Per-row interner of stemmed tokens.
#[derive(Default)]
struct Vocab {
    ids: FxMap<String, u32>,
}

impl Vocab {
    fn id_of(&mut self, raw: &str) -> u32 {
        let ids = &mut self.ids;
        with_stem(raw, |s| match ids.get(s) {
            Some(&id) => id,
            None => {
                let id = ids.len() as u32;
                ids.insert(s.to_string(), id);
                id
            }
        })
    }

    fn tokens(&mut self, text: &str) -> Tokens {
        let mut ids = Vec::new();
        let mut sents = Vec::new();
        for line in text.split('\n') {
            if line.is_empty() {
                continue;
            }
            let mut s = Vec::new();
            for_each_raw_token(line, |t| s.push(self.id_of(t)));
            ids.extend_from_slice(&s);
            sents.push(s);
        }
        Tokens { ids, sents }
    }
}

fn ngram_counts(ids: &[u32], n: usize) -> Vec<(u64, u32)> {
    let keys: Vec<u64> = if n == 1 {
        ids.iter().map(|&x| u64::from(x)).collect()
    } else {
        ids.windows(2).map(|w| (u64::from(w[0]) << 32) | u64::from(w[1])).collect()
    };
    crate::text::count_sorted(keys)
}

fn score_ngrams(target: &[u32], pred: &[u32], n: usize) -> Score {
    let t = ngram_counts(target, n);
    let p = ngram_counts(pred, n);
    let inter = crate::text::intersect_count(&t, &p) as f64;
    let tc = crate::text::total_count(&t).max(1) as f64;
    let pc = crate::text::total_count(&p).max(1) as f64;
    Score::new(inter / pc, inter / tc)
}

fn lcs_len(a: &[u32], b: &[u32]) -> usize {
    if a.is_empty() || b.is_empty() {
        return 0;
    }
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for &x in a {
        for (j, &y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn score_lcs(target: &[u32], pred: &[u32]) -> Score {
    if target.is_empty() || pred.is_empty() {
        return Score::default();
    }
    let l = lcs_len(target, pred) as f64;
    Score::new(l / pred.len() as f64, l / target.len() as f64)
}

/// Indices into `r` of one LCS, read out exactly like rouge-score's `_backtrack_norec`.
fn lcs_indices(r: &[u32], c: &[u32], out: &mut Vec<usize>) {
    let (m, n) = (r.len(), c.len());
    let w = n + 1;
    let mut t = vec![0u32; (m + 1) * w];
    for i in 1..=m {
        for j in 1..=n {
            t[i * w + j] = if r[i - 1] == c[j - 1] {
                t[(i - 1) * w + j - 1] + 1
            } else {
                t[(i - 1) * w + j].max(t[i * w + j - 1])
            };
        }
    }
    let (mut i, mut j) = (m, n);
    while i > 0 && j > 0 {
        if r[i - 1] == c[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i * w + j - 1] > t[(i - 1) * w + j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
}

fn score_lsum(target: &[Vec<u32>], pred: &[Vec<u32>], vocab: usize) -> Score {
    if target.is_empty() || pred.is_empty() {
        return Score::default();
    }
    let m: usize = target.iter().map(Vec::len).sum();
    let n: usize = pred.iter().map(Vec::len).sum();
    if m == 0 || n == 0 {
        return Score::default();
    }
    let mut cnt_r = vec![0i64; vocab];
    let mut cnt_c = vec![0i64; vocab];
    for &t in target.iter().flatten() {
        cnt_r[t as usize] += 1;
    }
    for &t in pred.iter().flatten() {
        cnt_c[t as usize] += 1;
    }
    let mut hits = 0usize;
    let mut idx = Vec::new();
    for r in target {
        idx.clear();
        for c in pred {
            lcs_indices(r, c, &mut idx);
        }
        idx.sort_unstable();
        idx.dedup();
        for &i in &idx {
            let t = r[i] as usize;
            if cnt_c[t] > 0 && cnt_r[t] > 0 {
                hits += 1;
                cnt_c[t] -= 1;
                cnt_r[t] -= 1;
            }
        }
    }
    Score::new(hits as f64 / n as f64, hits as f64 / m as f64)
}

fn score_tokens(t: &Tokens, p: &Tokens, vocab: usize) -> RougeScores {
    RougeScores {
        rouge1: score_ngrams(&t.ids, &p.ids, 1),
        rouge2: score_ngrams(&t.ids, &p.ids, 2),
        rouge_l: score_lcs(&t.ids, &p.ids),
        rouge_lsum: score_lsum(&t.sents, &p.sents, vocab),
    }
}

/// `RougeScorer(['rouge1','rouge2','rougeL','rougeLsum'], use_stemmer=True).score(target, prediction)`.
///
/// ```
/// let s = lora_metrics::rouge::score("the cat sat on the mat", "the cat sat");
/// assert_eq!(s.rouge1.precision, 1.0);
/// assert_eq!(s.rouge1.recall, 0.5);
/// ```
pub fn score(target: &str, prediction: &str) -> RougeScores {
    let mut v = Vocab::default();
    let t = v.tokens(target);
    let p = v.tokens(prediction);
    score_tokens(&t, &p, v.ids.len())
}

/// `RougeScorer(...).score_multi(targets, prediction)`: per ROUGE type, the score against the target
/// with the highest F-measure (the first one on ties). All zeros for an empty target list.
pub fn score_multi(targets: &[String], prediction: &str) -> RougeScores {
    let mut v = Vocab::default();
    let p = v.tokens(prediction);
    let ts: Vec<Tokens> = targets.iter().map(|t| v.tokens(t)).collect();
    let vocab = v.ids.len();
    let mut best: Option<RougeScores> = None;
    for t in &ts {
        let s = score_tokens(t, &p, vocab);
        best = Some(match best {
            None => s,
            Some(b) => RougeScores {
                rouge1: pick(b.rouge1, s.rouge1),
                rouge2: pick(b.rouge2, s.rouge2),
                rouge_l: pick(b.rouge_l, s.rouge_l),
                rouge_lsum: pick(b.rouge_lsum, s.rouge_lsum),
            },
        });
    }
    best.unwrap_or_default()
}

/// numpy `argmax` semantics: keep the earlier one unless the new one is strictly better.
fn pick(old: Score, new: Score) -> Score {
    if new.fmeasure > old.fmeasure {
        new
    } else {
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_unicode_and_digits() {
        assert_eq!(tokenize("Café 2,000 İstanbul", false), ["caf", "2", "000", "i", "stanbul"]);
        assert!(tokenize("!!! ...", true).is_empty());
    }

    #[test]
    fn lsum_multiline() {
        let s = score("a b c\nd e", "a b\nc d e");
        assert!(s.rouge_lsum.fmeasure > 0.0);
        assert_eq!(score("", "x").rouge_lsum, Score::default());
    }
}
