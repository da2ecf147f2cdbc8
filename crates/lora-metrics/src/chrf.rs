//! chrF and chrF++ exactly as `sacrebleu` 2.x `CHRF(char_order=6, word_order=0|2, beta=2)`:
//! character n-grams over the text with all (Python) white space removed, word n-grams (chrF++)
//! over `_remove_punctuation` words, per-row best reference by F-score, corpus statistics summed
//! before the final F-score.

use crate::text::{clipped_matches, py_split, Interner, NgramIds};
use rayon::prelude::*;
use serde::Serialize;

const CHAR_ORDER: usize = 6;
const BETA: f64 = 2.0;

/// A chrF / chrF++ result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChrfScore {
    /// Score on the 0-100 scale.
    pub score: f64,
    /// Character n-gram order (6).
    pub char_order: usize,
    /// Word n-gram order (0 for chrF, 2 for chrF++).
    pub word_order: usize,
    /// sacrebleu-style signature, e.g. `nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0`.
    pub signature: String,
}

/// sacrebleu `CHRF._remove_punctuation`.
fn remove_punctuation(sent: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for w in py_split(sent) {
        let mut cs = w.char_indices();
        let first = cs.next();
        let last = w.char_indices().next_back();
        match (first, last) {
            (Some((_, f)), Some((li, l))) if li > 0 => {
                if l.is_ascii_punctuation() {
                    out.push(&w[..li]);
                    out.push(&w[li..]);
                } else if f.is_ascii_punctuation() {
                    let cut = f.len_utf8();
                    out.push(&w[..cut]);
                    out.push(&w[cut..]);
                } else {
                    out.push(w);
                }
            }
            _ => out.push(w),
        }
    }
    out
}

/// Ids of the character n-grams (orders 1..=6, white space removed) followed by the word n-grams
/// (orders 1..=`word_order`) of one text. With `assign` false (references), n-grams the
/// hypothesis does not have get [`NgramIds::ABSENT`].
fn all_grams<'a>(
    text: &'a str,
    word_order: usize,
    ng: &mut NgramIds,
    words: &mut Interner<'a>,
    assign: bool,
) -> Vec<Vec<u32>> {
    let grams = |ng: &mut NgramIds, units: &[u32], space: u32, order: usize| {
        if assign {
            ng.ids(units, space, order)
        } else {
            ng.lookup(units, space, order)
        }
    };
    let chars: Vec<u32> = py_split(text).flat_map(str::chars).map(u32::from).collect();
    let mut g = grams(ng, &chars, 0, CHAR_ORDER);
    if word_order > 0 {
        let ids: Vec<u32> = remove_punctuation(text).into_iter().map(|w| words.id(w)).collect();
        g.extend(grams(ng, &ids, 1, word_order));
    }
    g
}

/// sacrebleu `CHRF._compute_f_score` (no eps smoothing).
fn f_score(stats: &[u64]) -> f64 {
    let eps = 1e-16;
    let factor = BETA * BETA;
    let (mut avg_prec, mut avg_rec) = (0.0f64, 0.0f64);
    let mut eff = 0usize;
    for s in stats.chunks_exact(3) {
        let (n_hyp, n_ref, n_match) = (s[0], s[1], s[2]);
        let prec = if n_hyp > 0 { n_match as f64 / n_hyp as f64 } else { eps };
        let rec = if n_ref > 0 { n_match as f64 / n_ref as f64 } else { eps };
        if n_hyp > 0 && n_ref > 0 {
            avg_prec += prec;
            avg_rec += rec;
            eff += 1;
        }
    }
    if eff == 0 {
        avg_prec = 0.0;
        avg_rec = 0.0;
    } else {
        avg_prec /= eff as f64;
        avg_rec /= eff as f64;
    }
    if avg_prec + avg_rec != 0.0 {
        let mut score = (1.0 + factor) * avg_prec * avg_rec;
        score /= (factor * avg_prec) + avg_rec;
        100.0 * score
    } else {
        0.0
    }
}

/// Best-reference statistics `[hyp, ref, match] x orders` of one row.
pub(crate) fn segment_stats(hyp: &str, refs: &[String], word_order: usize) -> Vec<u64> {
    let n = hyp.len() * CHAR_ORDER + 16;
    segment_stats_with(&mut NgramIds::with_capacity(n), hyp, refs, word_order)
}

fn segment_stats_with(ng: &mut NgramIds, hyp: &str, refs: &[String], word_order: usize) -> Vec<u64> {
    let mut words = Interner::default();
    let h = all_grams(hyp, word_order, ng, &mut words, true);
    let rgs: Vec<Vec<Vec<u32>>> = refs.iter().map(|r| all_grams(r, word_order, ng, &mut words, false)).collect();
    let mut scratch = vec![0u32; ng.len()];
    let mut best: Vec<u64> = Vec::new();
    let mut best_f = -1.0;
    for rg in &rgs {
        let mut stats = Vec::with_capacity(3 * h.len());
        for (hg, rg) in h.iter().zip(rg) {
            // sacrebleu counts no hypothesis n-grams for an order the reference lacks.
            let hyp_count = if rg.is_empty() { 0 } else { hg.len() as u64 };
            let m = clipped_matches(hg, rg, &mut scratch);
            stats.extend_from_slice(&[hyp_count, rg.len() as u64, m]);
        }
        let f = f_score(&stats);
        if f > best_f {
            best_f = f;
            best = stats;
        }
    }
    best
}

fn signature(references: &[Vec<String>], word_order: usize) -> String {
    format!(
        "nrefs:{}|case:mixed|eff:yes|nc:{CHAR_ORDER}|nw:{word_order}|space:no|version:{}",
        crate::bleu::nrefs(references),
        crate::bleu::SACREBLEU_VERSION
    )
}

/// `sacrebleu.corpus_chrf(predictions, streams, word_order=word_order)`; `word_order` 0 is chrF,
/// 2 is chrF++.
///
/// ```
/// let p = vec!["a test".to_string()];
/// let r = vec![vec!["a test".to_string()]];
/// let c = lora_metrics::chrf::corpus_chrf(&p, &r, 2).unwrap();
/// assert!((c.score - 100.0).abs() < 1e-9);
/// ```
pub fn corpus_chrf(predictions: &[String], references: &[Vec<String>], word_order: usize) -> crate::Result<ChrfScore> {
    crate::error::validate(predictions, references)?;
    let per: Vec<Vec<u64>> =
        predictions.par_iter().zip(references.par_iter()).map(|(h, r)| segment_stats(h, r, word_order)).collect();
    let mut sum = vec![0u64; 3 * (CHAR_ORDER + word_order)];
    for s in &per {
        for (a, b) in sum.iter_mut().zip(s) {
            *a += b;
        }
    }
    Ok(ChrfScore {
        score: f_score(&sum),
        char_order: CHAR_ORDER,
        word_order,
        signature: signature(references, word_order),
    })
}

/// `sacrebleu.sentence_chrf(prediction, references, word_order=word_order).score`.
pub fn sentence_chrf(prediction: &str, references: &[String], word_order: usize) -> f64 {
    f_score(&segment_stats(prediction, references, word_order))
}

/// Sentence-level chrF(++) of every row (0-100), in parallel.
pub fn sentence_chrf_scores(
    predictions: &[String],
    references: &[Vec<String>],
    word_order: usize,
) -> crate::Result<Vec<f64>> {
    crate::error::validate(predictions, references)?;
    Ok(predictions.par_iter().zip(references.par_iter()).map(|(h, r)| sentence_chrf(h, r, word_order)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punctuation_split() {
        assert_eq!(remove_punctuation("(hi) x. ,y z !"), ["(hi", ")", "x", ".", ",", "y", "z", "!"]);
    }

    #[test]
    fn empty_hypothesis_scores_zero() {
        assert_eq!(sentence_chrf("", &["abc".to_string()], 0), 0.0);
    }
}
