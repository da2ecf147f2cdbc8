//! BLEU exactly as `sacrebleu` 2.x (`BLEU()` defaults: 13a tokenizer, mixed case, `exp` smoothing,
//! max order 4, closest reference length), corpus level with several reference streams and
//! sentence level with effective order (`sacrebleu.sentence_bleu`).

use crate::text::{py_rstrip, py_split, Interner, NgramIds};
use rayon::prelude::*;
use serde::Serialize;

/// The sacrebleu version whose behaviour (and signature string) this module reproduces.
pub const SACREBLEU_VERSION: &str = "2.6.0";

const MAX_ORDER: usize = 4;

/// Tokenizes one line with sacrebleu's `13a` tokenizer (mteval-v13a), returning the tokens.
///
/// ```
/// let t = lora_metrics::bleu::tokenize_13a("Hello, world! It costs $3.50 (approx).");
/// assert_eq!(t.join(" "), "Hello , world ! It costs $ 3.50 ( approx ) .");
/// ```
pub fn tokenize_13a(line: &str) -> Vec<String> {
    py_split(&tokenized_13a(line)).map(str::to_string).collect()
}

/// The 13a-tokenized line before the final white-space folding (split it with Python semantics).
fn tokenized_13a(line: &str) -> String {
    let mut s = line.to_string();
    if s.contains("<skipped>") {
        s = s.replace("<skipped>", "");
    }
    if s.contains('\n') {
        s = s.replace("-\n", "").replace('\n', " ");
    }
    if s.contains('&') {
        s = s.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    let mut b: Vec<u8> = Vec::with_capacity(s.len() * 2 + 4);
    // ' {line} ' then `([\{-\~\[-\` -\&\(-\+\:-\@\/])` -> ' \1 '
    b.push(b' ');
    for &c in s.as_bytes() {
        if matches!(c, b'{'..=b'~' | b'['..=b'`' | b' '..=b'&' | b'('..=b'+' | b':'..=b'@' | b'/') {
            b.extend_from_slice(&[b' ', c, b' ']);
        } else {
            b.push(c);
        }
    }
    b.extend_from_slice(b"   ");
    let has = |b: &[u8], x: u8| b.contains(&x);
    if has(&b, b'.') || has(&b, b',') {
        // `([^0-9])([\.,])` -> '\1 \2 '
        b = sub2(
            &b,
            |x, y| !x.is_ascii_digit() && matches!(y, b'.' | b','),
            |x, y, o| o.extend_from_slice(&[x, b' ', y, b' ']),
        );
        // `([\.,])([^0-9])` -> ' \1 \2'
        b = sub2(
            &b,
            |x, y| matches!(x, b'.' | b',') && !y.is_ascii_digit(),
            |x, y, o| o.extend_from_slice(&[b' ', x, b' ', y]),
        );
    }
    if has(&b, b'-') {
        // `([0-9])(-)` -> '\1 \2 '
        b = sub2(&b, |x, y| x.is_ascii_digit() && y == b'-', |x, y, o| o.extend_from_slice(&[x, b' ', y, b' ']));
    }
    // Only ASCII bytes are inserted, always next to ASCII bytes, so the bytes stay valid UTF-8.
    match String::from_utf8(b) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

/// Non-overlapping left-to-right substitution of a two-byte pattern (Python `re.sub` semantics for a
/// pattern that always matches exactly two characters, one of which is ASCII).
fn sub2(b: &[u8], m: impl Fn(u8, u8) -> bool, rep: impl Fn(u8, u8, &mut Vec<u8>)) -> Vec<u8> {
    let mut o = Vec::with_capacity(b.len() + b.len() / 4);
    let mut i = 0;
    while i < b.len() {
        if i + 1 < b.len() && m(b[i], b[i + 1]) {
            rep(b[i], b[i + 1], &mut o);
            i += 2;
        } else {
            o.push(b[i]);
            i += 1;
        }
    }
    o
}

/// The BLEU result with its sufficient statistics, as sacrebleu's `BLEUScore`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BleuScore {
    /// BLEU on the 0-100 scale.
    pub score: f64,
    /// Matched n-grams per order 1..=4.
    pub counts: Vec<u64>,
    /// Hypothesis n-grams per order 1..=4.
    pub totals: Vec<u64>,
    /// Smoothed precisions (0-100) per order.
    pub precisions: Vec<f64>,
    /// Brevity penalty.
    pub bp: f64,
    /// Hypothesis length (tokens).
    pub sys_len: u64,
    /// Reference length (closest reference per segment, summed).
    pub ref_len: u64,
    /// sacrebleu-style signature, e.g. `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`.
    pub signature: String,
}

/// Segment statistics `[hyp_len, ref_len, correct_1..4, total_1..4]`.
pub(crate) type Stats = [u64; 2 + 2 * MAX_ORDER];

/// sacrebleu `_get_closest_ref_len`.
fn closest_ref_len(hyp_len: u64, ref_lens: &[u64]) -> u64 {
    let mut best: Option<(u64, u64)> = None;
    for &r in ref_lens {
        let diff = hyp_len.abs_diff(r);
        best = match best {
            None => Some((diff, r)),
            Some((d, l)) if diff < d || (diff == d && r < l) => Some((diff, r)),
            keep => keep,
        };
    }
    best.map_or(0, |(_, l)| l)
}

/// Statistics of one segment against its references (all of them; sacrebleu drops only `None`).
pub(crate) fn segment_stats(hyp: &str, refs: &[String]) -> Stats {
    let n = hyp.len() + 16;
    segment_stats_with(&mut NgramIds::with_capacity(n), hyp, refs)
}

fn segment_stats_with(ng: &mut NgramIds, hyp: &str, refs: &[String]) -> Stats {
    let hyp_s = tokenized_13a(py_rstrip(hyp));
    let ref_s: Vec<String> = refs.iter().map(|r| tokenized_13a(py_rstrip(r))).collect();
    let total_bytes = hyp_s.len() + ref_s.iter().map(String::len).sum::<usize>();
    let mut int = Interner::with_capacity(total_bytes / 4 + 8);
    let hyp_ids: Vec<u32> = py_split(&hyp_s).map(|t| int.id(t)).collect();
    let hyp_grams = ng.ids(&hyp_ids, 0, MAX_ORDER);
    let mut ref_lens = Vec::with_capacity(refs.len());
    let ref_grams: Vec<Vec<Vec<u32>>> = ref_s
        .iter()
        .map(|r| {
            let ids: Vec<u32> = py_split(r).map(|t| int.id(t)).collect();
            ref_lens.push(ids.len() as u64);
            ng.lookup(&ids, 0, MAX_ORDER)
        })
        .collect();
    // Per n-gram, the maximum count over the references.
    let mut max_cnt = vec![0u32; ng.len()];
    let mut tmp = vec![0u32; ng.len()];
    // Reference n-grams absent from the hypothesis cannot be matched and are skipped.
    for g in ref_grams.iter().flatten() {
        let present = || g.iter().filter(|&&x| x != NgramIds::ABSENT).map(|&x| x as usize);
        for x in present() {
            tmp[x] += 1;
        }
        for x in present() {
            max_cnt[x] = max_cnt[x].max(tmp[x]);
        }
        for x in present() {
            tmp[x] = 0;
        }
    }
    let hyp_len = hyp_ids.len() as u64;
    let mut st: Stats = [0; 2 + 2 * MAX_ORDER];
    st[0] = hyp_len;
    st[1] = closest_ref_len(hyp_len, &ref_lens);
    for (k, g) in hyp_grams.iter().enumerate() {
        let mut correct = 0u64;
        for &x in g {
            let c = &mut max_cnt[x as usize];
            if *c > 0 {
                *c -= 1;
                correct += 1;
            }
        }
        st[2 + k] = correct;
        st[2 + MAX_ORDER + k] = g.len() as u64;
    }
    st
}

fn my_log(x: f64) -> f64 {
    if x == 0.0 {
        -9_999_999_999.0
    } else {
        x.ln()
    }
}

/// sacrebleu `BLEU.compute_bleu` with `exp` smoothing.
fn compute_bleu(st: &Stats, effective_order: bool, signature: String) -> BleuScore {
    let (sys_len, ref_len) = (st[0], st[1]);
    let correct = st[2..2 + MAX_ORDER].to_vec();
    let total = st[2 + MAX_ORDER..].to_vec();
    let bp = if sys_len < ref_len {
        if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = vec![0.0f64; MAX_ORDER];
    let mut score = 0.0;
    if correct.iter().any(|&c| c != 0) {
        let mut smooth_mteval = 1.0f64;
        let mut eff_order = MAX_ORDER;
        for n in 1..=MAX_ORDER {
            if total[n - 1] == 0 {
                break;
            }
            if effective_order {
                eff_order = n;
            }
            if correct[n - 1] == 0 {
                smooth_mteval *= 2.0;
                precisions[n - 1] = 100.0 / (smooth_mteval * total[n - 1] as f64);
            } else {
                precisions[n - 1] = 100.0 * correct[n - 1] as f64 / total[n - 1] as f64;
            }
        }
        let s: f64 = precisions[..eff_order].iter().fold(0.0, |a, &p| a + my_log(p));
        score = bp * (s / eff_order as f64).exp();
    }
    BleuScore { score, counts: correct, totals: total, precisions, bp, sys_len, ref_len, signature }
}

/// sacrebleu's `nrefs` value: the common reference count, or `var`.
pub(crate) fn nrefs(references: &[Vec<String>]) -> String {
    let first = references.first().map_or(0, Vec::len);
    if references.iter().all(|r| r.len() == first) {
        first.to_string()
    } else {
        "var".to_string()
    }
}

fn signature(references: &[Vec<String>], eff: bool) -> String {
    format!(
        "nrefs:{}|case:mixed|eff:{}|tok:13a|smooth:exp|version:{SACREBLEU_VERSION}",
        nrefs(references),
        if eff { "yes" } else { "no" }
    )
}

/// `sacrebleu.corpus_bleu(predictions, streams)` where reference stream `i` holds the `i`-th
/// reference of every row (rows with fewer references contribute `None`, which sacrebleu skips).
///
/// ```
/// let p = vec!["the cat sat on the mat".to_string()];
/// let r = vec![vec!["the cat sat on the mat".to_string()]];
/// let b = lora_metrics::bleu::corpus_bleu(&p, &r).unwrap();
/// assert!((b.score - 100.0).abs() < 1e-9);
/// ```
pub fn corpus_bleu(predictions: &[String], references: &[Vec<String>]) -> crate::Result<BleuScore> {
    crate::error::validate(predictions, references)?;
    let stats: Vec<Stats> =
        predictions.par_iter().zip(references.par_iter()).map(|(h, r)| segment_stats(h, r)).collect();
    let mut sum: Stats = [0; 2 + 2 * MAX_ORDER];
    for s in &stats {
        for (a, b) in sum.iter_mut().zip(s) {
            *a += b;
        }
    }
    Ok(compute_bleu(&sum, false, signature(references, false)))
}

/// `sacrebleu.sentence_bleu(prediction, references)` (exp smoothing, effective order).
pub fn sentence_bleu(prediction: &str, references: &[String]) -> BleuScore {
    let st = segment_stats(prediction, references);
    let sig = format!("nrefs:{}|case:mixed|eff:yes|tok:13a|smooth:exp|version:{SACREBLEU_VERSION}", references.len());
    compute_bleu(&st, true, sig)
}

/// Sentence-level BLEU of every row (0-100), in parallel.
pub fn sentence_bleu_scores(predictions: &[String], references: &[Vec<String>]) -> crate::Result<Vec<f64>> {
    crate::error::validate(predictions, references)?;
    Ok(predictions
        .par_iter()
        .zip(references.par_iter())
        .map(|(h, r)| compute_bleu(&segment_stats(h, r), true, String::new()).score)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_regex_order() {
        assert_eq!(tokenize_13a("a..,b").join(" "), "a . . , b");
        assert_eq!(tokenize_13a("1,000.5 2-3 x-y").join(" "), "1,000.5 2 - 3 x-y");
        assert_eq!(tokenize_13a("&amp;lt; <skipped>ok").join(" "), "< ok");
        assert!(tokenize_13a("").is_empty());
    }

    #[test]
    fn closest_len_ties_prefer_shorter() {
        assert_eq!(closest_ref_len(5, &[7, 3]), 3);
        assert_eq!(closest_ref_len(5, &[6, 4]), 4);
    }
}
