//! chrF and chrF++ exactly as `sacrebleu` 2.x `CHRF(char_order=6, word_order=0|2, beta=2)`:
//! character n-grams over the text with all (Python) white space removed, word n-grams (chrF++)
//! over `_remove_punctuation` words, per-row best reference by F-score, corpus statistics summed
//! before the final F-score.

use crate::grams::{DistinctRefs, Key, Packing, Pad, Vocab};
use crate::text::{py_isspace, py_split, FxMap};
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

/// sacrebleu `CHRF._remove_punctuation`: calls `f` with each resulting word.
fn for_each_word<'a>(sent: &'a str, mut f: impl FnMut(&'a str)) {
    for w in py_split(sent) {
        let mut cs = w.char_indices();
        let first = cs.next();
        let last = cs.next_back();
        match (first, last) {
            (Some((_, c0)), Some((li, cl))) => {
                if cl.is_ascii_punctuation() {
                    f(&w[..li]);
                    f(&w[li..]);
                } else if c0.is_ascii_punctuation() {
                    let cut = c0.len_utf8();
                    f(&w[..cut]);
                    f(&w[cut..]);
                } else {
                    f(w);
                }
            }
            _ => f(w),
        }
    }
}

/// sacrebleu `CHRF._remove_punctuation`.
fn remove_punctuation(sent: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for_each_word(sent, |w| out.push(w));
    out
}

/// The implementation for any word order, kept for word orders above [`PACKED_WORD_ORDER`]: n-gram
/// ids from hash tables, per row.
mod generic {
    use super::*;
    use crate::text::{clipped_matches, Interner, NgramIds};

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

    /// Best-reference statistics `[hyp, ref, match] x orders` of one row.
    pub(super) fn segment_stats(hyp: &str, refs: &[String], word_order: usize) -> Vec<u64> {
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

/// The largest word order the packed keys handle; larger ones take [`generic::segment_stats`].
const PACKED_WORD_ORDER: usize = 4;

/// Bits of a character unit when the reference characters get dense ids (`u64` keys).
const NARROW_BITS: u32 = 10;

/// The unit of a hypothesis character that no reference has (it never matches), with dense ids.
const NARROW_ABSENT: u32 = (1 << NARROW_BITS) - 2;

/// Bits of a character unit holding the code point plus one (`u128` keys).
const WIDE_BITS: u32 = 21;

/// How characters become key units.
struct CharCode {
    /// The unit of each ASCII character; 0 for white space, which chrF drops.
    ascii: [u32; 128],
    /// Dense ids: the units of the other characters of the references (else: code point + 1).
    other: Option<FxMap<char, u32>>,
}

impl CharCode {
    /// Dense ids `1..NARROW_ABSENT` for the characters of `texts` if there are few enough of them,
    /// else code points plus one.
    fn new(texts: &[&str]) -> Self {
        let mut ascii = [0u32; 128];
        let mut other = FxMap::default();
        let mut next = 1u32;
        for t in texts {
            for c in t.chars().filter(|&c| !py_isspace(c)) {
                let slot = match ascii.get_mut(c as usize) {
                    Some(slot) => slot,
                    None => other.entry(c).or_insert(0),
                };
                if *slot == 0 {
                    if next == NARROW_ABSENT {
                        return Self::wide();
                    }
                    *slot = next;
                    next += 1;
                }
            }
        }
        for (c, slot) in ascii.iter_mut().enumerate() {
            if *slot == 0 && !py_isspace(char::from(c as u8)) {
                *slot = NARROW_ABSENT;
            }
        }
        CharCode { ascii, other: Some(other) }
    }

    /// Code points plus one.
    fn wide() -> Self {
        let mut ascii = [0u32; 128];
        for (c, slot) in ascii.iter_mut().enumerate() {
            if !py_isspace(char::from(c as u8)) {
                *slot = c as u32 + 1;
            }
        }
        CharCode { ascii, other: None }
    }

    /// Whether the units are dense ids ([`NARROW_BITS`] bits) rather than code points plus one.
    fn is_narrow(&self) -> bool {
        self.other.is_some()
    }

    /// The units of the characters of `text` without (Python) white space.
    fn units(&self, text: &str, out: &mut Vec<u32>) {
        out.clear();
        out.reserve(text.len());
        if text.is_ascii() {
            for b in text.bytes() {
                let u = self.ascii[usize::from(b & 0x7f)];
                if u != 0 {
                    out.push(u);
                }
            }
            return;
        }
        for c in text.chars() {
            let u = match (self.ascii.get(c as usize), &self.other) {
                (Some(&u), _) => u,
                (None, _) if py_isspace(c) => 0,
                (None, Some(other)) => other.get(&c).copied().unwrap_or(NARROW_ABSENT),
                (None, None) => u32::from(c) + 1,
            };
            if u != 0 {
                out.push(u);
            }
        }
    }
}

/// A distinct reference, prepared once: sorted n-gram keys and lengths.
struct RefGrams<KC, KW> {
    chars: Vec<KC>,
    n_chars: u64,
    words: Vec<KW>,
    n_words: u64,
}

/// Per-thread buffers for the hypothesis side of a row.
#[derive(Default)]
struct Scratch<KC, KW> {
    units: Vec<u32>,
    chars: Vec<KC>,
    words: Vec<KW>,
    stats: Vec<u64>,
}

/// Best-reference statistics `[hyp, ref, match] x orders` of every row.
///
/// Each distinct reference is prepared once. Character and word ids come from the references;
/// hypothesis characters and words outside them (which cannot match) get an id of their own. The
/// keys are `u64` when the ids are few enough (10-bit characters, 16-bit words), else `u128`.
fn corpus_stats(predictions: &[String], references: &DistinctRefs<'_>, word_order: usize) -> Vec<Vec<u64>> {
    if word_order > PACKED_WORD_ORDER {
        return predictions
            .par_iter()
            .enumerate()
            .map(|(row, hyp)| {
                let refs: Vec<String> =
                    references.row(row).iter().map(|&r| references.texts[r as usize].to_string()).collect();
                generic::segment_stats(hyp, &refs, word_order)
            })
            .collect();
    }
    let code = CharCode::new(&references.texts);
    let mut vocab = Vocab::default();
    let word_ids: Vec<Vec<u32>> = if word_order > 0 {
        let words: Vec<Vec<&str>> = references.texts.par_iter().map(|t| remove_punctuation(t)).collect();
        words.iter().map(|ws| ws.iter().map(|w| vocab.intern(w)).collect()).collect()
    } else {
        Vec::new()
    };
    let p = Prepared { predictions, references, word_order, code: &code, vocab: &vocab, word_ids: &word_ids };
    let narrow_words = vocab.len() < Packing::<u64, 16, PACKED_WORD_ORDER>::ABSENT as usize;
    match (code.is_narrow(), narrow_words) {
        (true, true) => p.stats::<u64, NARROW_BITS, u64, 16>(),
        (true, false) => p.stats::<u64, NARROW_BITS, u128, 32>(),
        (false, true) => p.stats::<u128, WIDE_BITS, u64, 16>(),
        (false, false) => p.stats::<u128, WIDE_BITS, u128, 32>(),
    }
}

/// The inputs of [`corpus_stats`] once the character code and the word vocabulary are known.
struct Prepared<'p, 'a> {
    predictions: &'p [String],
    references: &'p DistinctRefs<'a>,
    word_order: usize,
    code: &'p CharCode,
    vocab: &'p Vocab<'a>,
    /// Word ids of each distinct reference (empty for chrF).
    word_ids: &'p [Vec<u32>],
}

impl Prepared<'_, '_> {
    /// The statistics with character 6-grams packed into a `KC` (`BC` bits per character) and
    /// word n-grams into a `KW` (`BW` bits per word).
    fn stats<KC: Key, const BC: u32, KW: Key, const BW: u32>(&self) -> Vec<Vec<u64>> {
        let grams: Vec<RefGrams<KC, KW>> = self
            .references
            .texts
            .par_iter()
            .enumerate()
            .map(|(r, t)| {
                let mut units = Vec::new();
                self.code.units(t, &mut units);
                let words = self.word_ids.get(r).map_or(&[][..], Vec::as_slice);
                RefGrams {
                    chars: Packing::<KC, BC, CHAR_ORDER>::sorted_keys(&units, Pad::Ones),
                    n_chars: units.len() as u64,
                    words: Packing::<KW, BW, PACKED_WORD_ORDER>::sorted_keys(words, Pad::Ones),
                    n_words: words.len() as u64,
                }
            })
            .collect();
        self.predictions
            .par_iter()
            .enumerate()
            .map_init(Scratch::default, |s, (row, hyp)| {
                let refs = self.references.row(row).iter().map(|&r| &grams[r as usize]);
                self.row_stats::<KC, BC, KW, BW>(s, hyp, refs)
            })
            .collect()
    }

    fn row_stats<'g, KC: Key + 'g, const BC: u32, KW: Key + 'g, const BW: u32>(
        &self,
        s: &mut Scratch<KC, KW>,
        hyp: &str,
        refs: impl Iterator<Item = &'g RefGrams<KC, KW>>,
    ) -> Vec<u64> {
        type Chars<K, const B: u32> = Packing<K, B, CHAR_ORDER>;
        type Words<K, const B: u32> = Packing<K, B, PACKED_WORD_ORDER>;
        let word_order = self.word_order;
        self.code.units(hyp, &mut s.units);
        let n_chars = s.units.len() as u64;
        s.chars.clear();
        Chars::<KC, BC>::push_keys(&s.units, Pad::Zero, &mut s.chars);
        s.chars.sort_unstable();
        let mut n_words = 0;
        if word_order > 0 {
            s.units.clear();
            for_each_word(hyp, |w| s.units.push(self.vocab.get(w).unwrap_or(Words::<KW, BW>::ABSENT)));
            n_words = s.units.len() as u64;
            s.words.clear();
            Words::<KW, BW>::push_keys(&s.units, Pad::Zero, &mut s.words);
            s.words.sort_unstable();
        }
        // [hyp, ref, match] for one order; sacrebleu counts no hypothesis n-grams for an order the
        // reference lacks.
        let order_stats = |stats: &mut Vec<u64>, n_hyp: u64, n_ref: u64, n: usize, matched: u32| {
            let r = n_ref.saturating_sub(n as u64);
            let h = if r == 0 { 0 } else { n_hyp.saturating_sub(n as u64) };
            stats.extend_from_slice(&[h, r, u64::from(matched)]);
        };
        let mut best: Vec<u64> = Vec::new();
        let mut best_f = -1.0;
        for g in refs {
            s.stats.clear();
            let cm = Chars::<KC, BC>::clipped_matches(&s.chars, &g.chars);
            for (n, &m) in cm.iter().enumerate() {
                order_stats(&mut s.stats, n_chars, g.n_chars, n, m);
            }
            if word_order > 0 {
                let wm = Words::<KW, BW>::clipped_matches(&s.words, &g.words);
                for (n, &m) in wm.iter().enumerate().take(word_order) {
                    order_stats(&mut s.stats, n_words, g.n_words, n, m);
                }
            }
            let f = f_score(&s.stats);
            if f > best_f {
                best_f = f;
                best.clone_from(&s.stats);
            }
        }
        best
    }
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
/// # fn main() -> Result<(), lora_metrics::MetricsError> {
/// let p = vec!["a test".to_string()];
/// let r = vec![vec!["a test".to_string()]];
/// let c = lora_metrics::chrf::corpus_chrf(&p, &r, 2)?;
/// assert!((c.score - 100.0).abs() < 1e-9);
/// # Ok(())
/// # }
/// ```
pub fn corpus_chrf(predictions: &[String], references: &[Vec<String>], word_order: usize) -> crate::Result<ChrfScore> {
    crate::error::validate(predictions, references)?;
    let per = corpus_stats(predictions, &DistinctRefs::new(references.iter().map(Vec::as_slice)), word_order);
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
    let preds = [prediction.to_string()];
    f_score(&corpus_stats(&preds, &DistinctRefs::new([references]), word_order)[0])
}

/// Sentence-level chrF(++) of every row (0-100), in parallel.
pub fn sentence_chrf_scores(
    predictions: &[String],
    references: &[Vec<String>],
    word_order: usize,
) -> crate::Result<Vec<f64>> {
    crate::error::validate(predictions, references)?;
    let per = corpus_stats(predictions, &DistinctRefs::new(references.iter().map(Vec::as_slice)), word_order);
    Ok(per.par_iter().map(|s| f_score(s)).collect())
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

    #[test]
    fn packed_stats_match_the_hash_table_ones() {
        let mut next = crate::bleu::tests::lcg(3);
        for round in 0..4_000 {
            let word_order = round % (PACKED_WORD_ORDER + 1);
            let n_rows = 1 + next(4) as usize;
            let mut preds = Vec::new();
            let mut refs = Vec::new();
            for _ in 0..n_rows {
                preds.push(crate::bleu::tests::random_text(&mut next));
                let k = 1 + next(3) as usize;
                refs.push(
                    (0..k)
                        .map(|_| ["a Bc.", "Bc (a) a", "", "1 a, Bc"][next(4) as usize].to_string())
                        .collect::<Vec<_>>(),
                );
                if next(2) == 0 {
                    refs.last_mut().unwrap().push(crate::bleu::tests::random_text(&mut next));
                }
            }
            let got = corpus_stats(&preds, &DistinctRefs::new(refs.iter().map(Vec::as_slice)), word_order);
            for (i, st) in got.iter().enumerate() {
                let want = generic::segment_stats(&preds[i], &refs[i], word_order);
                assert_eq!(*st, want, "order {word_order}: {:?} {:?}", preds[i], refs[i]);
            }
        }
    }

    #[test]
    fn many_distinct_characters_take_wide_keys() {
        let many: String = (0x4e00u32..0x4e00 + 1100).filter_map(char::from_u32).collect();
        assert!(!CharCode::new(&[many.as_str()]).is_narrow());
        assert!(CharCode::new(&["abc"]).is_narrow());
        let preds = [many.chars().rev().collect::<String>(), "abc \u{4e01}\u{4e02}\u{4e03}".to_string()];
        let refs = [vec![many.clone()], vec![many.clone(), "x".to_string()]];
        for wo in [0, 2] {
            let got = corpus_stats(&preds, &DistinctRefs::new(refs.iter().map(Vec::as_slice)), wo);
            for i in 0..2 {
                assert_eq!(got[i], generic::segment_stats(&preds[i], &refs[i], wo));
            }
        }
    }

    #[test]
    fn large_vocabularies_take_wide_word_keys() {
        let big: String = (0..70_000).map(|i| format!("w{i} ")).collect();
        let preds = ["w1 w2 w3 w4 zz w69999".to_string(), "w5 w6, w7".to_string()];
        let refs = [vec![big.clone()], vec!["w5 w6 w7.".to_string(), big]];
        let got = corpus_stats(&preds, &DistinctRefs::new(refs.iter().map(Vec::as_slice)), 2);
        for i in 0..2 {
            assert_eq!(got[i], generic::segment_stats(&preds[i], &refs[i], 2));
        }
    }

    #[test]
    fn word_orders_above_the_packed_ones_still_work() {
        let p = ["a b c d e f".to_string()];
        let r = [vec!["a b c d e f".to_string()]];
        assert!((corpus_chrf(&p, &r, 6).map(|c| c.score).unwrap_or(0.0) - 100.0).abs() < 1e-9);
    }
}
