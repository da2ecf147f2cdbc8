//! Clipped n-gram counting on sorted, packed n-gram keys (used by BLEU and chrF).
//!
//! A text is a sequence of nonzero integer units (characters, or word ids). The key of position `i`
//! packs the units `i..i + UNITS` into an integer (`u64` or `u128`), first unit in the highest
//! bits, and units past the end of the text as padding (see [`Pad`]). Numeric order of the keys is then lexicographic order of the unit
//! sequences, so after sorting, the occurrences of every n-gram (every order `n <= UNITS` at once)
//! are contiguous, and two neighbouring keys share an `n`-gram exactly when their common prefix is at
//! least `n` units long. A merge of two sorted key arrays therefore yields, in one pass and without
//! hashing, the count of every n-gram on both sides. Keys are exact (no hashing), so the counts are
//! exact.
//!
//! References that repeat across rows (SciTLDR scores every sentence of an abstract against the same
//! TLDRs) are prepared once: [`DistinctRefs`] stores each distinct reference string once.

use crate::text::FxMap;

/// The unit that fills a key past the end of its text.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Pad {
    /// 0: the key ends where the text ends (shorter n-grams sort first).
    Zero,
    /// All ones in the unit (never a real unit): used for the second text of
    /// [`Packing::clipped_matches`], so that no padded n-gram of one text equals one of the other.
    Ones,
}

/// An unsigned integer that holds packed keys.
pub(crate) trait Key: Copy + Ord + Default + Send + Sync + std::fmt::Debug {
    /// Width in bits.
    const WIDTH: u32;
    /// `x` as a key (the low bits).
    fn from_u32(x: u32) -> Self;
    /// `self << n | x << shift`.
    fn shift_in(self, n: u32, x: Self, shift: u32) -> Self;
    /// `(self ^ other).leading_zeros()`.
    fn xor_leading_zeros(self, other: Self) -> u32;
}

macro_rules! impl_key {
    ($t:ty) => {
        impl Key for $t {
            const WIDTH: u32 = <$t>::BITS;
            #[inline]
            fn from_u32(x: u32) -> Self {
                <$t>::from(x)
            }
            #[inline]
            fn shift_in(self, n: u32, x: Self, shift: u32) -> Self {
                (self << n) | (x << shift)
            }
            #[inline]
            fn xor_leading_zeros(self, other: Self) -> u32 {
                (self ^ other).leading_zeros()
            }
        }
    };
}

impl_key!(u64);
impl_key!(u128);

/// Packed keys of `UNITS` units of `BITS` bits each in a `K` (`BITS * UNITS <= K::WIDTH`,
/// `UNITS <= 8`). Real units are nonzero and at most [`Packing::ABSENT`].
pub(crate) struct Packing<K, const BITS: u32, const UNITS: usize>(std::marker::PhantomData<K>);

impl<K: Key, const BITS: u32, const UNITS: usize> Packing<K, BITS, UNITS> {
    /// Unused low bits of a key.
    const SHIFT: u32 = {
        assert!(BITS > 0 && BITS <= 32 && UNITS > 0 && UNITS <= 8 && BITS * UNITS as u32 <= K::WIDTH);
        K::WIDTH - BITS * UNITS as u32
    };

    /// A unit for a word or character that no reference has: it never equals an id given to a
    /// reference unit (those stay below it), nor the padding of [`Pad::Ones`] (all ones), so the
    /// n-grams that contain it never match.
    pub(crate) const ABSENT: u32 = (u32::MAX >> (32 - BITS)) - 1;

    /// Bits per lane when the counts of all orders share one `u64` (lane `n` for order `n + 1`).
    const LANE: u32 = 64 / UNITS as u32;

    /// 1 in every lane.
    const LANE_ONES: u64 = {
        let mut x = 0u64;
        let mut n = 0;
        while n < UNITS {
            x |= 1 << (Self::LANE * n as u32);
            n += 1;
        }
        x
    };

    /// The high bit of every lane.
    const LANE_HIGH: u64 = Self::LANE_ONES << (Self::LANE - 1);

    /// Lane-wise minimum of two lane vectors whose lanes are below `2^(LANE - 1)`.
    #[inline]
    fn lane_min(a: u64, b: u64) -> u64 {
        // The high bit of a lane of `(b | HIGH) - a` is set iff b >= a; no lane borrows.
        let ge = (((b | Self::LANE_HIGH) - a) & Self::LANE_HIGH) >> (Self::LANE - 1);
        let a_is_min = (ge << Self::LANE).wrapping_sub(ge);
        (a & a_is_min) | (b & !a_is_min)
    }

    /// Appends the key of every position of `units` to `out` (one key per unit).
    pub(crate) fn push_keys(units: &[u32], pad: Pad, out: &mut Vec<K>) {
        let pad = match pad {
            Pad::Zero => 0,
            Pad::Ones => u32::MAX >> (32 - BITS),
        };
        out.reserve(units.len());
        let mut k = K::default();
        for i in 0..units.len() + UNITS - 1 {
            let u = units.get(i).copied().unwrap_or(pad);
            debug_assert!(u64::from(u) < (1u64 << BITS));
            k = k.shift_in(BITS, K::from_u32(u), Self::SHIFT);
            if i + 1 >= UNITS {
                out.push(k);
            }
        }
    }

    /// Sorted keys of `units`.
    pub(crate) fn sorted_keys(units: &[u32], pad: Pad) -> Vec<K> {
        let mut out = Vec::with_capacity(units.len());
        Self::push_keys(units, pad, &mut out);
        out.sort_unstable();
        out
    }

    /// Number of leading units two keys share (`UNITS` when they are equal).
    #[inline]
    fn lcp(a: K, b: K) -> usize {
        (a.xor_leading_zeros(b) / BITS).min(UNITS as u32) as usize
    }

    /// For every order `n` in `1..=UNITS`: the number of `n`-grams the two texts share with
    /// clipping, `sum over n-grams g of min(count_a(g), count_b(g))`. `a` and `b` are sorted keys,
    /// `a` padded with [`Pad::Zero`] and `b` with [`Pad::Ones`].
    ///
    /// One merge of the two arrays: in merged order, the occurrences of an `n`-gram are
    /// consecutive, and a new `n`-gram starts wherever a key shares fewer than `n` units with the one
    /// before. Each side keeps a count per order for the current n-gram, and when an n-gram ends,
    /// `min` of the two counts is added. Every key counts for all orders: the n-grams that run
    /// past the end of a text are padded differently on the two sides, so they never meet an
    /// n-gram of the other text, and add `min(1, 0)`.
    pub(crate) fn clipped_matches(a: &[K], b: &[K]) -> [u32; UNITS] {
        let limit = 1usize << (Self::LANE - 1);
        if a.len() < limit && b.len() < limit {
            Self::merge_lanes(a, b, |&k| k, |_| Self::LANE_ONES)
        } else {
            Self::merge_wide(a, b, |&k| k, |_| [1; UNITS])
        }
    }

    /// BLEU's clipped counts: for every order `n` in `1..=UNITS`, the sum over the `n`-grams `g` of
    /// the hypothesis of `min(count in the hypothesis, max over the references of the count)`.
    /// `hyp` holds sorted keys padded with [`Pad::Zero`]; `refs` comes from
    /// [`Packing::union_max`] (or [`Packing::group_counts`] for one reference).
    pub(crate) fn clipped_by_max(hyp: &[K], refs: &MaxCounts<K, UNITS>) -> [u32; UNITS] {
        let limit = 1usize << (Self::LANE - 1);
        if hyp.len() < limit && refs.below(limit as u32) {
            let pack = |w: &[u32; UNITS]| {
                w.iter().enumerate().fold(0u64, |x, (n, &c)| x | u64::from(c) << (Self::LANE * n as u32))
            };
            Self::merge_lanes(hyp, &refs.keys, |(k, _)| *k, |(_, w)| pack(w))
        } else {
            Self::merge_wide(hyp, &refs.keys, |(k, _)| *k, |(_, w)| *w)
        }
    }

    /// The n-gram counts of one text for [`Packing::clipped_by_max`]: its sorted keys (padded with
    /// [`Pad::Ones`]), where the last key of every `n`-gram carries the count of that n-gram for
    /// order `n` (the other keys carry 0 for that order). Keys that carry nothing are left out.
    pub(crate) fn group_counts(sorted: &[K]) -> MaxCounts<K, UNITS> {
        Self::regroup(sorted.iter().map(|&k| (k, [1; UNITS])), |x, y| x + y)
    }

    /// The maximum counts over several texts, in the form of [`Packing::group_counts`]: the last key
    /// of every `n`-gram carries, for order `n`, the largest count of that n-gram in any of them.
    pub(crate) fn union_max(parts: &[&MaxCounts<K, UNITS>]) -> MaxCounts<K, UNITS> {
        let mut merged: Vec<(K, [u32; UNITS])> = Vec::new();
        let mut tmp = Vec::new();
        for part in parts {
            tmp.clear();
            tmp.reserve(merged.len() + part.keys.len());
            let (a, b) = (&merged, &part.keys);
            let (mut i, mut j) = (0, 0);
            while i < a.len() && j < b.len() {
                if a[i].0 <= b[j].0 {
                    tmp.push(a[i]);
                    i += 1;
                } else {
                    tmp.push(b[j]);
                    j += 1;
                }
            }
            tmp.extend_from_slice(&a[i..]);
            tmp.extend_from_slice(&b[j..]);
            std::mem::swap(&mut merged, &mut tmp);
        }
        // Every n-gram of a part is whole inside the same n-gram of the union, and its count sits on
        // one of its keys, so the largest value on the union n-gram's keys is the maximum count.
        Self::regroup(merged.into_iter(), u32::max)
    }

    /// Sorted keys with values per order, combined per n-gram with `combine`: the result has, for
    /// every order `n`, the combined values of each n-gram on its last key, and drops the keys that
    /// carry nothing.
    fn regroup(items: impl Iterator<Item = (K, [u32; UNITS])>, combine: fn(u32, u32) -> u32) -> MaxCounts<K, UNITS> {
        let mut keys: Vec<(K, [u32; UNITS])> = Vec::with_capacity(items.size_hint().0);
        let mut run = [0u32; UNITS];
        let mut prev = K::default();
        for (k, w) in items {
            let shared = Self::lcp(prev, k);
            if let Some(last) = keys.last_mut() {
                for (w, r) in last.1[shared..].iter_mut().zip(&mut run[shared..]) {
                    *w = std::mem::take(r);
                }
            }
            for (r, &x) in run.iter_mut().zip(&w) {
                *r = combine(*r, x);
            }
            keys.push((k, [0; UNITS]));
            prev = k;
        }
        if let Some(last) = keys.last_mut() {
            last.1 = run;
        }
        keys.retain(|(_, w)| w.iter().any(|&c| c > 0));
        let max = keys.iter().flat_map(|(_, w)| w.iter().copied()).max().unwrap_or(0);
        MaxCounts { keys, max }
    }

    /// The merge of [`Packing::clipped_matches`] with the counts of all orders in the lanes of one
    /// `u64`: each key of `a` counts 1 in every lane, each entry of `b` its `weight`. No count may
    /// reach `2^(LANE - 1)`.
    #[inline]
    fn merge_lanes<B>(a: &[K], b: &[B], key: impl Fn(&B) -> K, weight: impl Fn(&B) -> u64) -> [u32; UNITS] {
        let (mut acc, mut ca, mut cb) = (0u64, 0u64, 0u64);
        // 0 shares no unit with any key (the first unit of a key is nonzero).
        let mut prev = K::default();
        let (mut i, mut j) = (0usize, 0usize);
        // Closes the n-grams of the orders above `shared` before a key is added.
        let mut close = |shared: usize, ca: &mut u64, cb: &mut u64| {
            let ending = u64::MAX.checked_shl(Self::LANE * shared as u32).unwrap_or(0);
            acc += Self::lane_min(*ca, *cb) & ending;
            *ca &= !ending;
            *cb &= !ending;
        };
        while i < a.len() && j < b.len() {
            let (x, y) = (a[i], key(&b[j]));
            let from_a = x <= y;
            let e = if from_a { x } else { y };
            close(Self::lcp(prev, e), &mut ca, &mut cb);
            if from_a {
                ca += Self::LANE_ONES;
                i += 1;
            } else {
                cb += weight(&b[j]);
                j += 1;
            }
            prev = e;
        }
        // One side is left: its keys only matter while they continue the current n-grams.
        if i < a.len() {
            for &e in &a[i..] {
                let shared = Self::lcp(prev, e);
                if shared == 0 {
                    break;
                }
                close(shared, &mut ca, &mut cb);
                ca += Self::LANE_ONES;
                prev = e;
            }
        } else {
            for y in &b[j..] {
                let e = key(y);
                let shared = Self::lcp(prev, e);
                if shared == 0 {
                    break;
                }
                close(shared, &mut ca, &mut cb);
                cb += weight(y);
                prev = e;
            }
        }
        close(0, &mut ca, &mut cb);
        std::array::from_fn(|n| ((acc >> (Self::LANE * n as u32)) & ((1 << Self::LANE) - 1)) as u32)
    }

    /// [`Packing::merge_lanes`] with one `u32` count per order (any counts).
    fn merge_wide<B>(a: &[K], b: &[B], key: impl Fn(&B) -> K, weight: impl Fn(&B) -> [u32; UNITS]) -> [u32; UNITS] {
        let mut acc = [0u32; UNITS];
        let (mut ca, mut cb) = ([0u32; UNITS], [0u32; UNITS]);
        let mut prev = K::default();
        let (mut i, mut j) = (0usize, 0usize);
        loop {
            let from_a = match (a.get(i), b.get(j)) {
                (Some(&x), Some(y)) => x <= key(y),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let e = if from_a { a[i] } else { key(&b[j]) };
            let shared = Self::lcp(prev, e);
            for n in shared..UNITS {
                acc[n] += ca[n].min(cb[n]);
                ca[n] = 0;
                cb[n] = 0;
            }
            if from_a {
                for c in &mut ca {
                    *c += 1;
                }
                i += 1;
            } else {
                for (c, w) in cb.iter_mut().zip(weight(&b[j])) {
                    *c += w;
                }
                j += 1;
            }
            prev = e;
        }
        for n in 0..UNITS {
            acc[n] += ca[n].min(cb[n]);
        }
        acc
    }
}

/// Sorted keys with a count per order on the last key of each n-gram (see
/// [`Packing::group_counts`]).
#[derive(Clone)]
pub(crate) struct MaxCounts<K, const UNITS: usize> {
    keys: Vec<(K, [u32; UNITS])>,
    /// The largest weight.
    max: u32,
}

impl<K, const UNITS: usize> MaxCounts<K, UNITS> {
    /// Whether every weight is below `limit`.
    fn below(&self, limit: u32) -> bool {
        self.max < limit
    }
}

/// The distinct strings among the references of all rows (each stored once) and, per row, the
/// indices of its references into them.
pub(crate) struct DistinctRefs<'a> {
    /// Distinct reference texts, in order of first appearance.
    pub(crate) texts: Vec<&'a str>,
    index: Vec<u32>,
    offsets: Vec<usize>,
}

impl<'a> DistinctRefs<'a> {
    /// Deduplicates the references of `rows`.
    pub(crate) fn new<I: IntoIterator<Item = &'a [String]>>(rows: I) -> Self {
        let mut seen: FxMap<&'a str, u32> = FxMap::default();
        let (mut texts, mut index, mut offsets) = (Vec::new(), Vec::new(), vec![0]);
        for row in rows {
            for r in row {
                let next = texts.len() as u32;
                let id = *seen.entry(r.as_str()).or_insert(next);
                if id == next {
                    texts.push(r.as_str());
                }
                index.push(id);
            }
            offsets.push(index.len());
        }
        DistinctRefs { texts, index, offsets }
    }

    /// Indices (into [`DistinctRefs::texts`]) of the references of row `r`, in their order.
    pub(crate) fn row(&self, r: usize) -> &[u32] {
        &self.index[self.offsets[r]..self.offsets[r + 1]]
    }

    /// The distinct reference lists: for each row the index of its list, and the lists (as
    /// [`DistinctRefs::row`] gives them).
    pub(crate) fn lists(&self) -> (Vec<u32>, Vec<&[u32]>) {
        let mut seen: FxMap<&[u32], u32> = FxMap::default();
        let (mut of_row, mut lists) = (Vec::with_capacity(self.offsets.len() - 1), Vec::new());
        for r in 0..self.offsets.len() - 1 {
            let next = lists.len() as u32;
            let id = *seen.entry(self.row(r)).or_insert(next);
            if id == next {
                lists.push(self.row(r));
            }
            of_row.push(id);
        }
        (of_row, lists)
    }
}

/// Word ids `1..` for the words of the references.
///
/// Words of up to 15 bytes are keyed by their bytes and length packed into a `u128`, so a look-up
/// neither hashes a string nor follows a pointer; longer words are keyed by the string.
#[derive(Default)]
pub(crate) struct Vocab<'a> {
    short: FxMap<u128, u32>,
    long: FxMap<&'a str, u32>,
}

/// `w` packed with its length into a `u128`, if it has at most 15 bytes (exact: distinct words of
/// at most 15 bytes give distinct values). Bytes `0..8` go into the low half, bytes `8..` and the
/// length into the high half.
#[inline]
fn short_key(w: &str) -> Option<u128> {
    let b = w.as_bytes();
    let n = b.len();
    let le64 = |s: &[u8]| s.try_into().map_or(0, u64::from_le_bytes);
    let le32 = |s: &[u8]| s.try_into().map_or(0, u32::from_le_bytes);
    let (lo, hi) = match n {
        0 => (0, 0),
        // Bytes 0, n / 2 and n - 1 are all the bytes.
        1..=3 => (u64::from(b[0]) | u64::from(b[n / 2]) << 8 | u64::from(b[n - 1]) << 16, 0),
        // The last 4 bytes overlap the first 4; keep only bytes 4.. of them.
        4..=7 => (u64::from(le32(&b[..4])) | (u64::from(le32(&b[n - 4..])) >> (8 * (8 - n))) << 32, 0),
        8..=15 => (le64(&b[..8]), le64(&b[n - 8..]).checked_shr(8 * (16 - n as u32)).unwrap_or(0)),
        _ => return None,
    };
    Some(u128::from(lo) | u128::from(hi | (n as u64) << 56) << 64)
}

impl<'a> Vocab<'a> {
    /// Id of `w`, assigning the next one on first sight.
    pub(crate) fn intern(&mut self, w: &'a str) -> u32 {
        let next = self.len() as u32 + 1;
        match short_key(w) {
            Some(k) => *self.short.entry(k).or_insert(next),
            None => *self.long.entry(w).or_insert(next),
        }
    }

    /// Id of `w`, if a reference has it.
    #[inline]
    pub(crate) fn get(&self, w: &str) -> Option<u32> {
        match short_key(w) {
            Some(k) => self.short.get(&k).copied(),
            None => self.long.get(w).copied(),
        }
    }

    /// Number of distinct words (the largest id).
    pub(crate) fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;

    type P = Packing<u128, 21, 6>;

    fn counts(s: &[u32], n: usize) -> HashMap<Vec<u32>, u32> {
        let mut m: HashMap<Vec<u32>, u32> = HashMap::new();
        for w in s.windows(n) {
            *m.entry(w.to_vec()).or_default() += 1;
        }
        m
    }

    /// Clipped matches by brute force over explicit n-grams.
    fn brute(a: &[u32], b: &[u32], units: usize) -> Vec<u32> {
        brute_max(a, &[b], units)
    }

    /// BLEU's clipped counts (max over the references) by brute force.
    fn brute_max(a: &[u32], refs: &[&[u32]], units: usize) -> Vec<u32> {
        (1..=units)
            .map(|n| {
                let max_ref = |g: &Vec<u32>| refs.iter().map(|r| counts(r, n).get(g).copied().unwrap_or(0)).max();
                counts(a, n).iter().map(|(g, &c)| c.min(max_ref(g).unwrap_or(0))).sum()
            })
            .collect()
    }

    #[test]
    fn keys_and_prefixes() {
        let mut k = Vec::new();
        P::push_keys(&[3, 1, 2], Pad::Zero, &mut k);
        assert_eq!(k.len(), 3);
        assert_eq!(P::lcp(k[0], k[0]), 6);
        let mut k2 = Vec::new();
        P::push_keys(&[3, 1, 5], Pad::Zero, &mut k2);
        assert_eq!(P::lcp(k[0], k2[0]), 2);
        assert!(k[1] < k[2] && k2[0] > k[0]);
        assert!(P::sorted_keys(&[], Pad::Ones).is_empty());
    }

    #[test]
    fn merge_counts_match_brute_force() {
        let mut x: u64 = 7;
        let mut next = |m: u64| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % m
        };
        for round in 0..500 {
            let alpha = 1 + (round % 4) as u64;
            let mut text = |len: u64| -> Vec<u32> { (0..next(len)).map(|_| 1 + next(alpha) as u32).collect() };
            let (a, b) = (text(30), text(30));
            let refs: Vec<Vec<u32>> = (0..1 + round % 9).map(|_| text(30)).collect();
            let (ka, kb) = (P::sorted_keys(&a, Pad::Zero), P::sorted_keys(&b, Pad::Ones));
            assert_eq!(P::clipped_matches(&ka, &kb).to_vec(), brute(&a, &b, 6), "{a:?} {b:?}");
            let wide = P::merge_wide(&ka, &kb, |&k| k, |_| [1; 6]);
            assert_eq!(wide.to_vec(), brute(&a, &b, 6), "{a:?} {b:?}");
            type Q = Packing<u64, 10, 6>;
            let (qa, qb) = (Q::sorted_keys(&a, Pad::Zero), Q::sorted_keys(&b, Pad::Ones));
            assert_eq!(Q::clipped_matches(&qa, &qb).to_vec(), brute(&a, &b, 6), "{a:?} {b:?}");
            let wide = Q::merge_wide(&qa, &qb, |&k| k, |_| [1; 6]);
            assert_eq!(wide.to_vec(), brute(&a, &b, 6), "{a:?} {b:?}");
            let ref_slices: Vec<&[u32]> = refs.iter().map(Vec::as_slice).collect();
            let want = brute_max(&a, &ref_slices, 6);
            let qr: Vec<Vec<u64>> = refs.iter().map(|r| Q::sorted_keys(r, Pad::Ones)).collect();
            let qr: Vec<&[u64]> = qr.iter().map(Vec::as_slice).collect();
            let parts: Vec<_> = qr.iter().map(|r| Q::group_counts(r)).collect();
            let m = Q::union_max(&parts.iter().collect::<Vec<_>>());
            assert_eq!(Q::clipped_by_max(&qa, &m).to_vec(), want, "{a:?} {refs:?}");
            let wide = Q::merge_wide(&qa, &m.keys, |(k, _)| *k, |(_, w)| *w);
            assert_eq!(wide.to_vec(), want, "{a:?} {refs:?}");
        }
    }

    #[test]
    fn long_texts_take_the_wide_counts_for_bleu() {
        type T = Packing<u64, 16, 4>;
        let a: Vec<u32> = (0..40_000).map(|i| 1 + (i % 3)).collect();
        let b: Vec<u32> = (0..70_000).map(|i| 1 + (i % 2)).collect();
        let c: Vec<u32> = (0..100).map(|i| 1 + (i % 5)).collect();
        let kr = [T::sorted_keys(&b, Pad::Ones), T::sorted_keys(&c, Pad::Ones)];
        let m = T::union_max(&[&T::group_counts(&kr[0]), &T::group_counts(&kr[1])]);
        assert!(!m.below(1 << 15));
        let got = T::clipped_by_max(&T::sorted_keys(&a, Pad::Zero), &m);
        assert_eq!(got.to_vec(), brute_max(&a, &[&b, &c], 4));
    }

    #[test]
    fn long_texts_take_the_wide_counts() {
        let a: Vec<u32> = (0..40_000).map(|i| 1 + (i % 3)).collect();
        let b: Vec<u32> = (0..35_000).map(|i| 1 + (i % 2)).collect();
        let got = P::clipped_matches(&P::sorted_keys(&a, Pad::Zero), &P::sorted_keys(&b, Pad::Ones));
        assert_eq!(got.to_vec(), brute(&a, &b, 6));
        // Just below the lane limit: counts up to 511 per n-gram.
        let a = vec![1u32; (1 << 9) - 1];
        let got = P::clipped_matches(&P::sorted_keys(&a, Pad::Zero), &P::sorted_keys(&a, Pad::Ones));
        assert_eq!(got.to_vec(), brute(&a, &a, 6));
    }

    #[test]
    fn lane_min_is_lane_wise() {
        let pack = |v: [u64; 6]| v.iter().enumerate().fold(0u64, |x, (n, &l)| x | l << (10 * n));
        let (a, b) = ([0, 1, 5, 511, 7, 0], [3, 1, 2, 0, 511, 0]);
        assert_eq!(P::lane_min(pack(a), pack(b)), pack([0, 1, 2, 0, 7, 0]));
        assert_eq!(Packing::<u128, 32, 4>::LANE, 16);
    }

    #[test]
    fn short_keys_are_exact() {
        let words: Vec<String> = (0..=16)
            .flat_map(|n| {
                let base: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
                (0..n.max(1)).map(move |at| {
                    let mut w = base.clone();
                    if let Some(c) = w.get_mut(at) {
                        *c = b'Z';
                    }
                    String::from_utf8(w).unwrap_or_default()
                })
            })
            .chain(["\0", "\0\0", "a\0", "\0a", "é", "ééééééé", "éééééééé"].map(String::from))
            .collect();
        let mut seen = std::collections::HashMap::new();
        for w in &words {
            match short_key(w) {
                Some(k) => assert_eq!(*seen.entry(k).or_insert(w.as_str()), w.as_str(), "{w:?}"),
                None => assert!(w.len() > 15),
            }
        }
    }

    #[test]
    fn distinct_refs_and_vocab() {
        let rows = [vec!["x".to_string(), "y".to_string()], vec!["y".to_string()]];
        let d = DistinctRefs::new(rows.iter().map(Vec::as_slice));
        assert_eq!(d.texts, ["x", "y"]);
        assert_eq!((d.row(0), d.row(1)), (&[0, 1][..], &[1][..]));
        let rows2 = [vec!["x".to_string()], vec!["y".to_string()], vec!["x".to_string()]];
        let d2 = DistinctRefs::new(rows2.iter().map(Vec::as_slice));
        assert_eq!(d2.lists(), (vec![0, 1, 0], vec![&[0][..], &[1][..]]));
        let mut v = Vocab::default();
        let long = "a-word-of-more-than-15-bytes";
        assert_eq!((v.intern("a"), v.intern("b"), v.intern(long), v.intern("a")), (1, 2, 3, 1));
        assert_eq!((v.get("b"), v.get("c"), v.get(long), v.get("a\0")), (Some(2), None, Some(3), None));
        assert_eq!((v.len(), v.get(&long[..15]), v.get(&long[..16])), (3, None, None));
        assert_eq!(Packing::<u64, 16, 4>::ABSENT, 0xfffe);
    }
}
