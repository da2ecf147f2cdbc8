//! BLEU exactly as `sacrebleu` 2.x (`BLEU()` defaults: 13a tokenizer, mixed case, `exp` smoothing,
//! max order 4, closest reference length), corpus level with several reference streams and
//! sentence level with effective order (`sacrebleu.sentence_bleu`).

use crate::grams::{DistinctRefs, Key, MaxCounts, Packing, Pad, Vocab};
use crate::text::{py_isspace, py_rstrip};
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
    let mut t = Tokens13a::default();
    t.tokenize(line);
    t.iter().map(str::to_string).collect()
}

/// The tokens of one line after the 13a tokenizer, as byte ranges of the line (after the line-level
/// replacements): the regex passes only insert spaces, so every token is a substring of it.
#[derive(Default)]
pub(crate) struct Tokens13a {
    text: String,
    spans: Vec<(usize, usize)>,
}

/// Tokenizes the segment `b[start..end]` (see [`Tokens13a::tokenize`]), which has `active` bytes
/// `.`, `,` or `-`, appending the byte ranges of its tokens.
fn segment(b: &[u8], start: usize, end: usize, active: u32, spans: &mut Vec<(usize, usize)>) {
    let (s, e) = (start, end);
    if active == 0 {
        // No pattern can match.
        spans.push((s, e));
    } else if active == 1 && end - start >= 2 && matches!(b[end - 1], b'.' | b',') {
        // `x.` or `x,` (`x` without `.`, `,`, `-`): the second pass splits the final `.` off when
        // `x` ends in a non-digit, else the third one does (it is followed by a space).
        spans.push((s, e - 1));
        spans.push((e - 1, e));
    } else {
        let mut p = Pipe { h2: EMPTY, h3: EMPTY, h4: EMPTY, open: false, spans };
        p.p2(INSERTED);
        for (i, &c) in b[start..end].iter().enumerate() {
            p.p2(u64::from(c) | ((start + i) as u64) << 8);
        }
        p.p2(INSERTED);
        p.finish();
    }
}

/// Byte classes for the 13a tokenizer: Python white space (ASCII).
const SPACE: u8 = 1;
/// The class of the first regex pass, `[\{-\~\[-\` -\&\(-\+\:-\@\/]`, without the space.
const PUNCT: u8 = 2;
/// A byte some later pass can act on: `.`, `,` or `-`.
const ACTIVE: u8 = 4;
/// A byte the line-level replacements act on: `<`, `\n` or `&`.
const RAW: u8 = 8;

const BYTE_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        let mut k = 0;
        if matches!(b, b'\t'..=b'\r' | b'\x1c'..=b' ') {
            k |= SPACE;
        }
        if matches!(b, b'{'..=b'~' | b'['..=b'`' | b'!'..=b'&' | b'('..=b'+' | b':'..=b'@' | b'/') {
            k |= PUNCT;
        }
        if matches!(b, b'.' | b',' | b'-') {
            k |= ACTIVE;
        }
        if matches!(b, b'<' | b'\n' | b'&') {
            k |= RAW;
        }
        t[c] = k;
        c += 1;
    }
    t
};

/// A byte held back by one stage of [`Pipe`] while it waits for the next byte (none: `EMPTY`).
const EMPTY: u64 = u64::MAX;

/// A space inserted by a pass (segments themselves never contain white space).
const INSERTED: u64 = b' ' as u64;

/// The last three regex passes of sacrebleu's `TokenizerRegexp`, fused into one pass over the bytes
/// of a segment.
///
/// Each pass is `re.sub` of a pattern that matches exactly two characters, scanned left to right
/// without overlaps: a stage holds one byte back until it sees the next, and either emits the
/// substitution for the pair or emits the held byte and holds the new one. Stage `p2` feeds `p3`,
/// which feeds `p4`, which feeds the white-space splitter, so every pass sees exactly the output of
/// the one before, as in Python. Working on bytes instead of characters gives the same result:
/// every pattern needs an ASCII byte at a fixed side of the pair, the spaces go in at character
/// boundaries, and `[^0-9]` against one byte of a multi-byte character is as true as against the
/// character. A value is `byte | position << 8`, so the splitter can record where tokens start
/// and end in the line.
struct Pipe<'o> {
    h2: u64,
    h3: u64,
    h4: u64,
    open: bool,
    spans: &'o mut Vec<(usize, usize)>,
}

#[inline]
fn byte(v: u64) -> u8 {
    v as u8
}

impl Pipe<'_> {
    /// `([^0-9])([\.,])` -> `\1 \2 `.
    #[inline]
    fn p2(&mut self, v: u64) {
        let h = std::mem::replace(&mut self.h2, v);
        if h == EMPTY {
            return;
        }
        if matches!(byte(v), b'.' | b',') && !byte(h).is_ascii_digit() {
            self.h2 = EMPTY;
            self.p3(h);
            self.p3(INSERTED);
            self.p3(v);
            self.p3(INSERTED);
        } else {
            self.p3(h);
        }
    }

    /// `([\.,])([^0-9])` -> ` \1 \2`.
    #[inline]
    fn p3(&mut self, v: u64) {
        let h = std::mem::replace(&mut self.h3, v);
        if h == EMPTY {
            return;
        }
        if matches!(byte(h), b'.' | b',') && !byte(v).is_ascii_digit() {
            self.h3 = EMPTY;
            self.p4(INSERTED);
            self.p4(h);
            self.p4(INSERTED);
            self.p4(v);
        } else {
            self.p4(h);
        }
    }

    /// `([0-9])(-)` -> `\1 \2 `.
    #[inline]
    fn p4(&mut self, v: u64) {
        let h = std::mem::replace(&mut self.h4, v);
        if h == EMPTY {
            return;
        }
        if byte(v) == b'-' && byte(h).is_ascii_digit() {
            self.h4 = EMPTY;
            self.split(h);
            self.split(INSERTED);
            self.split(v);
            self.split(INSERTED);
        } else {
            self.split(h);
        }
    }

    /// Python `str.split()`: a token ends at an inserted space. The bytes of a token are
    /// consecutive in the line (the passes only insert spaces).
    #[inline]
    fn split(&mut self, v: u64) {
        if byte(v) == b' ' {
            self.open = false;
            return;
        }
        let at = (v >> 8) as usize;
        match self.spans.last_mut() {
            Some(last) if self.open => last.1 = at + 1,
            _ => {
                self.open = true;
                self.spans.push((at, at + 1));
            }
        }
    }

    /// Flushes the held bytes at the end of the text (each pass finishes before the next one does).
    fn finish(mut self) {
        if self.h2 != EMPTY {
            let v = std::mem::replace(&mut self.h2, EMPTY);
            self.p3(v);
        }
        if self.h3 != EMPTY {
            let v = std::mem::replace(&mut self.h3, EMPTY);
            self.p4(v);
        }
        if self.h4 != EMPTY {
            let v = std::mem::replace(&mut self.h4, EMPTY);
            self.split(v);
        }
        self.split(INSERTED);
    }
}

impl Tokens13a {
    /// Tokenizes `line` (replacing the previous tokens).
    ///
    /// sacrebleu tokenizes `f' {line} '` with four regex passes. The first one puts spaces around
    /// every character of its class, so afterwards the text is a sequence of segments (runs without
    /// white space or class characters) between white space and single class characters. The later
    /// passes never act across such a boundary: each of their patterns needs a `.`, `,`, digit or
    /// `-` at the side where the boundary character would be, and white space and class characters
    /// are none of these. So a class character is a token by itself, and each segment is tokenized
    /// on its own as ` {segment} `. A segment without `.`, `,` or `-` (no later pattern matches in
    /// it) is one token as it stands.
    pub(crate) fn tokenize(&mut self, line: &str) {
        self.text.clear();
        self.text.push_str(line);
        self.spans.reserve(line.len() / 2 + 2);
        if !self.split(true) {
            let mut s = line.replace("<skipped>", "");
            if s.contains('\n') {
                s = s.replace("-\n", "").replace('\n', " ");
            }
            if s.contains('&') {
                s = s.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
            }
            self.text = s;
            self.split(false);
        }
    }

    /// Tokenizes `self.text` as it is. With `check_raw`, returns false (the tokens are then
    /// incomplete) if the text has a byte of the line-level replacements (`<`, `\n`, `&`).
    fn split(&mut self, check_raw: bool) -> bool {
        self.spans.clear();
        let b = self.text.as_bytes();
        let (mut start, mut active, mut seen, mut high) = (0usize, 0u32, 0u8, 0u8);
        for (i, &c) in b.iter().enumerate() {
            let k = BYTE_CLASS[usize::from(c)];
            seen |= k;
            high |= c;
            if k & (SPACE | PUNCT) != 0 {
                if i > start {
                    if active == 0 {
                        // No pattern can match.
                        self.spans.push((start, i));
                    } else {
                        segment(b, start, i, active, &mut self.spans);
                    }
                }
                if k & PUNCT != 0 {
                    self.spans.push((i, i + 1));
                }
                (start, active) = (i + 1, 0);
            } else {
                active += u32::from(k & ACTIVE != 0);
            }
        }
        if check_raw && seen & RAW != 0 {
            return false;
        }
        if b.len() > start {
            segment(b, start, b.len(), active, &mut self.spans);
        }
        if high >= 0x80 {
            self.split_unicode_space();
        }
        true
    }

    /// Splits the tokens further at non-ASCII Python white space (U+0085, U+00A0, U+3000, ...).
    fn split_unicode_space(&mut self) {
        let text = self.text.as_str();
        let old = std::mem::take(&mut self.spans);
        for (s, e) in old {
            let tok = text.get(s..e).unwrap_or_default();
            let mut start = None;
            for (k, c) in tok.char_indices() {
                if py_isspace(c) {
                    if let Some(b) = start.take() {
                        self.spans.push((s + b, s + k));
                    }
                } else if start.is_none() {
                    start = Some(k);
                }
            }
            if let Some(b) = start {
                self.spans.push((s + b, e));
            }
        }
    }

    /// The tokens.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        // Tokens start and end next to ASCII bytes or at the ends of the line: character boundaries.
        self.spans.iter().map(|&(s, e)| self.text.get(s..e).unwrap_or_default())
    }

    /// Number of tokens.
    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }
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

/// A distinct list of references, prepared once: the maximum n-gram counts over them, and their
/// lengths in tokens.
struct RefList<K> {
    max_counts: MaxCounts<K, MAX_ORDER>,
    lens: Vec<u64>,
}

/// Per-thread buffers for the hypothesis side of a row.
#[derive(Default)]
struct Scratch<K> {
    tokens: Tokens13a,
    ids: Vec<u32>,
    keys: Vec<K>,
}

/// Statistics of every row against its references (all of them; sacrebleu drops only `None`).
///
/// Each distinct reference is tokenized and counted once, and the counts of each distinct list of
/// references are merged into maximum counts once (sacrebleu does that per row). The token
/// ids come from a vocabulary of the reference tokens; hypothesis tokens outside it cannot match
/// and get [`Packing::ABSENT`]. Token 4-grams are packed into a `u64` (16-bit ids) when the
/// vocabulary is small enough, else into a `u128`.
fn corpus_stats(predictions: &[String], references: &DistinctRefs<'_>) -> Vec<Stats> {
    let tokens: Vec<Tokens13a> = references
        .texts
        .par_iter()
        .map(|r| {
            let mut t = Tokens13a::default();
            t.tokenize(py_rstrip(r));
            t
        })
        .collect();
    let mut vocab = Vocab::default();
    let ids: Vec<Vec<u32>> = tokens.iter().map(|t| t.iter().map(|w| vocab.intern(w)).collect()).collect();
    if vocab.len() < Packing::<u64, 16, MAX_ORDER>::ABSENT as usize {
        stats_with::<u64, 16>(predictions, references, &ids, &vocab)
    } else {
        stats_with::<u128, 32>(predictions, references, &ids, &vocab)
    }
}

/// [`corpus_stats`] with token 4-grams packed into a `K`, `BITS` bits per token id.
fn stats_with<K: Key, const BITS: u32>(
    predictions: &[String],
    references: &DistinctRefs<'_>,
    ids: &[Vec<u32>],
    vocab: &Vocab<'_>,
) -> Vec<Stats> {
    type P<K, const BITS: u32> = Packing<K, BITS, MAX_ORDER>;
    let counts: Vec<MaxCounts<K, MAX_ORDER>> =
        ids.par_iter().map(|ids| P::<K, BITS>::group_counts(&P::<K, BITS>::sorted_keys(ids, Pad::Ones))).collect();
    let (list_of_row, lists) = references.lists();
    let lists: Vec<RefList<K>> = lists
        .par_iter()
        .map(|members| {
            let parts: Vec<&MaxCounts<K, MAX_ORDER>> = members.iter().map(|&m| &counts[m as usize]).collect();
            RefList {
                max_counts: match parts.as_slice() {
                    [one] => (*one).clone(),
                    _ => P::<K, BITS>::union_max(&parts),
                },
                lens: members.iter().map(|&m| ids[m as usize].len() as u64).collect(),
            }
        })
        .collect();
    predictions
        .par_iter()
        .zip(list_of_row.par_iter())
        .map_init(Scratch::default, |s, (hyp, &l)| row_stats::<K, BITS>(s, hyp, &lists[l as usize], vocab))
        .collect()
}

fn row_stats<K: Key, const BITS: u32>(s: &mut Scratch<K>, hyp: &str, refs: &RefList<K>, vocab: &Vocab<'_>) -> Stats {
    type P<K, const BITS: u32> = Packing<K, BITS, MAX_ORDER>;
    s.tokens.tokenize(py_rstrip(hyp));
    s.ids.clear();
    s.ids.extend(s.tokens.iter().map(|w| vocab.get(w).unwrap_or(P::<K, BITS>::ABSENT)));
    s.keys.clear();
    P::<K, BITS>::push_keys(&s.ids, Pad::Zero, &mut s.keys);
    s.keys.sort_unstable();
    let correct = P::<K, BITS>::clipped_by_max(&s.keys, &refs.max_counts);
    let hyp_len = s.tokens.len() as u64;
    let mut st: Stats = [0; 2 + 2 * MAX_ORDER];
    st[0] = hyp_len;
    st[1] = closest_ref_len(hyp_len, &refs.lens);
    for n in 0..MAX_ORDER {
        st[2 + n] = u64::from(correct[n]);
        st[2 + MAX_ORDER + n] = hyp_len.saturating_sub(n as u64);
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
/// # fn main() -> Result<(), lora_metrics::MetricsError> {
/// let p = vec!["the cat sat on the mat".to_string()];
/// let r = vec![vec!["the cat sat on the mat".to_string()]];
/// let b = lora_metrics::bleu::corpus_bleu(&p, &r)?;
/// assert!((b.score - 100.0).abs() < 1e-9);
/// # Ok(())
/// # }
/// ```
pub fn corpus_bleu(predictions: &[String], references: &[Vec<String>]) -> crate::Result<BleuScore> {
    crate::error::validate(predictions, references)?;
    let stats = corpus_stats(predictions, &DistinctRefs::new(references.iter().map(Vec::as_slice)));
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
    let st = corpus_stats(std::slice::from_ref(&prediction.to_string()), &DistinctRefs::new([references]))[0];
    let sig = format!("nrefs:{}|case:mixed|eff:yes|tok:13a|smooth:exp|version:{SACREBLEU_VERSION}", references.len());
    compute_bleu(&st, true, sig)
}

/// Sentence-level BLEU of every row (0-100), in parallel.
pub fn sentence_bleu_scores(predictions: &[String], references: &[Vec<String>]) -> crate::Result<Vec<f64>> {
    crate::error::validate(predictions, references)?;
    let stats = corpus_stats(predictions, &DistinctRefs::new(references.iter().map(Vec::as_slice)));
    Ok(stats.par_iter().map(|st| compute_bleu(st, true, String::new()).score).collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::text::py_split;
    use std::collections::HashMap;

    /// The 13a-tokenized line before the final white-space folding (split it with Python semantics).
    fn old_tokenized_13a(line: &str) -> String {
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

    /// Segment statistics by brute force over explicit token n-grams (the oracle for `corpus_stats`).
    fn brute_stats(hyp: &str, refs: &[String]) -> Stats {
        let toks =
            |s: &str| -> Vec<String> { py_split(&old_tokenized_13a(py_rstrip(s))).map(str::to_string).collect() };
        let counts = |t: &[String], n: usize| {
            let mut m: HashMap<Vec<String>, u64> = HashMap::new();
            for w in t.windows(n) {
                *m.entry(w.to_vec()).or_default() += 1;
            }
            m
        };
        let h = toks(hyp);
        let rs: Vec<Vec<String>> = refs.iter().map(|r| toks(r)).collect();
        let mut st: Stats = [0; 2 + 2 * MAX_ORDER];
        st[0] = h.len() as u64;
        st[1] = closest_ref_len(h.len() as u64, &rs.iter().map(|r| r.len() as u64).collect::<Vec<_>>());
        for n in 1..=MAX_ORDER {
            let mut max_ref: HashMap<Vec<String>, u64> = HashMap::new();
            for r in &rs {
                for (g, c) in counts(r, n) {
                    let m = max_ref.entry(g).or_default();
                    *m = (*m).max(c);
                }
            }
            let hc = counts(&h, n);
            st[1 + n] = hc.iter().map(|(g, &c)| c.min(max_ref.get(g).copied().unwrap_or(0))).sum();
            st[1 + MAX_ORDER + n] = hc.values().sum();
        }
        st
    }

    /// Random text built from pieces that exercise every rule of the 13a tokenizer.
    pub(crate) fn random_text(next: &mut impl FnMut(u64) -> u64) -> String {
        const PIECES: [&str; 40] = [
            "a",
            "Bc",
            "1",
            "0",
            ".",
            ",",
            "-",
            " ",
            "  ",
            "\n",
            "-\n",
            "&",
            "amp;",
            "&quot;",
            "&lt;",
            "&gt;",
            "<",
            "<skipped>",
            "$",
            "(",
            ")",
            "'",
            "é",
            "\u{a0}",
            "\u{3000}",
            "\u{1c}",
            "\t",
            "–",
            "x.y",
            "3.5",
            "..",
            "İ",
            "/",
            "_",
            "~",
            "@",
            "\"",
            "\u{7}",
            "\u{85}",
            "\r",
        ];
        (0..next(14)).map(|_| PIECES[next(PIECES.len() as u64) as usize]).collect()
    }

    pub(crate) fn lcg(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut x = seed;
        move |m| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % m
        }
    }

    #[test]
    fn tokenizer_regex_order() {
        assert_eq!(tokenize_13a("a..,b").join(" "), "a . . , b");
        assert_eq!(tokenize_13a("1,000.5 2-3 x-y").join(" "), "1,000.5 2 - 3 x-y");
        assert_eq!(tokenize_13a("&amp;lt; <skipped>ok").join(" "), "< ok");
        // Checked against sacrebleu 2.6.0's `Tokenizer13a`.
        assert_eq!(
            tokenize_13a("1.. 5.,., a\u{a0}b.\u{3000}c"),
            ["1", ".", ".", "5", ".", ",", ".", ",", "a", "b", ".", "c"]
        );
        assert!(tokenize_13a("").is_empty());
    }

    #[test]
    fn fused_tokenizer_matches_the_pass_by_pass_one() {
        let mut next = lcg(1);
        for _ in 0..50_000 {
            let t = random_text(&mut next);
            let old = old_tokenized_13a(&t);
            let want: Vec<&str> = py_split(&old).collect();
            assert_eq!(tokenize_13a(&t), want, "{t:?}");
        }
    }

    #[test]
    fn stats_match_brute_force() {
        let mut next = lcg(2);
        for _ in 0..3_000 {
            let n_rows = 1 + next(4) as usize;
            let mut preds = Vec::new();
            let mut refs = Vec::new();
            for _ in 0..n_rows {
                preds.push(random_text(&mut next));
                // Few distinct references, so that rows share them.
                let k = 1 + next(3) as usize;
                refs.push(
                    (0..k).map(|_| format!("a {}", ["x", "1.5 a", "b a", ""][next(4) as usize])).collect::<Vec<_>>(),
                );
                if next(2) == 0 {
                    refs.last_mut().unwrap().push(random_text(&mut next));
                }
            }
            let got = corpus_stats(&preds, &DistinctRefs::new(refs.iter().map(Vec::as_slice)));
            for (i, st) in got.iter().enumerate() {
                assert_eq!(*st, brute_stats(&preds[i], &refs[i]), "{:?} {:?}", preds[i], refs[i]);
            }
        }
    }

    #[test]
    fn large_vocabularies_take_wide_keys() {
        let big: String = (0..70_000).map(|i| format!("w{i} ")).collect();
        let preds = ["w1 w2 w3 w4 zz w69999".to_string(), "w5 w6, w7".to_string()];
        let refs = [vec![big.clone()], vec!["w5 w6 w7.".to_string(), big]];
        let got = corpus_stats(&preds, &DistinctRefs::new(refs.iter().map(Vec::as_slice)));
        for i in 0..2 {
            assert_eq!(got[i], brute_stats(&preds[i], &refs[i]));
        }
    }

    #[test]
    fn closest_len_ties_prefer_shorter() {
        assert_eq!(closest_ref_len(5, &[7, 3]), 3);
        assert_eq!(closest_ref_len(5, &[6, 4]), 4);
    }
}
