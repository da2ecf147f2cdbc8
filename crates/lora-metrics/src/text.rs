//! Small text helpers that reproduce Python `str` semantics.

/// Python's `str.isspace()` for one code point (`str.split()` / `str.strip()` use this set).
///
/// It differs from Rust's `char::is_whitespace` by including U+001C..U+001F.
#[inline]
pub(crate) fn py_isspace(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n'
            | '\u{0B}'
            | '\u{0C}'
            | '\r'
            | '\u{1C}'..='\u{1F}'
            | ' '
            | '\u{85}'
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

/// Python's `s.split()` (no argument): split on runs of whitespace, no empty pieces.
pub(crate) fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_isspace).filter(|t| !t.is_empty())
}

/// Python's `s.rstrip()` (no argument).
pub(crate) fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(py_isspace)
}

/// Python's `\w` for `str` patterns, approximated as alphanumeric or underscore.
///
/// Python uses `str.isalnum()` (general categories L*, N*); Rust's `is_alphanumeric` also admits the
/// few combining marks with the Other_Alphabetic property. The difference only matters for an
/// article (`a`, `an`, `the`) written directly against such a mark.
#[inline]
pub(crate) fn py_is_word(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// FxHash (the rustc hasher): fast, non-cryptographic, deterministic. Keys here are never
/// attacker-chosen at scale, and a bad distribution only costs speed, never correctness.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const FX_K: u64 = 0xf135_7aea_2e62_a9c5;

impl FxHasher {
    #[inline]
    fn add(&mut self, x: u64) {
        self.hash = (self.hash.wrapping_add(x)).wrapping_mul(FX_K);
    }
}

impl std::hash::Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            self.add(u64::from_le_bytes(a));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut a = [0u8; 8];
            a[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(a) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash.rotate_left(26)
    }
}

/// A `HashMap` with [`FxHasher`].
pub(crate) type FxMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// Assigns dense ids to n-grams of `u32` units: the id of an n-gram is looked up from the id of its
/// (n-1)-gram prefix and its last unit, so equal n-grams (of one order) get equal ids.
#[derive(Default)]
pub(crate) struct NgramIds {
    map: FxMap<u64, u32>,
}

impl NgramIds {
    #[inline]
    fn get(&mut self, key: u64) -> u32 {
        let next = self.map.len() as u32;
        *self.map.entry(key).or_insert(next)
    }

    /// Ids of all 1..=`max_order`-grams of `units`; `space` separates unit alphabets (for example
    /// characters and words) that must never share ids.
    pub(crate) fn ids(&mut self, units: &[u32], space: u32, max_order: usize) -> Vec<Vec<u32>> {
        let mut out: Vec<Vec<u32>> = Vec::with_capacity(max_order);
        let tag = u64::from(u32::MAX - space) << 32;
        out.push(units.iter().map(|&u| self.get(tag | u64::from(u))).collect());
        for n in 2..=max_order {
            let prev = &out[n - 2];
            let cur: Vec<u32> = if units.len() >= n {
                (0..=units.len() - n)
                    .map(|i| self.get((u64::from(prev[i]) << 32) | u64::from(units[i + n - 1])))
                    .collect()
            } else {
                Vec::new()
            };
            out.push(cur);
        }
        out
    }

    /// Like [`NgramIds::ids`] but only looks ids up, never assigns them: an n-gram not seen before
    /// (in particular one whose (n-1)-gram prefix was not seen) gets [`NgramIds::ABSENT`]. Used for
    /// references, whose n-grams only matter if the hypothesis has them.
    pub(crate) fn lookup(&self, units: &[u32], space: u32, max_order: usize) -> Vec<Vec<u32>> {
        let mut out: Vec<Vec<u32>> = Vec::with_capacity(max_order);
        let tag = u64::from(u32::MAX - space) << 32;
        let find = |key: u64| self.map.get(&key).copied().unwrap_or(Self::ABSENT);
        out.push(units.iter().map(|&u| find(tag | u64::from(u))).collect());
        for n in 2..=max_order {
            let prev = &out[n - 2];
            let cur: Vec<u32> = if units.len() >= n {
                (0..=units.len() - n)
                    .map(|i| match prev[i] {
                        Self::ABSENT => Self::ABSENT,
                        p => find((u64::from(p) << 32) | u64::from(units[i + n - 1])),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            out.push(cur);
        }
        out
    }

    /// Id given by [`NgramIds::lookup`] to n-grams that were never assigned one.
    pub(crate) const ABSENT: u32 = u32::MAX;

    /// A table with room for `n` n-grams (size it for the hypothesis only: references are looked
    /// up, not inserted, which keeps the table small and cache-resident).
    pub(crate) fn with_capacity(n: usize) -> Self {
        NgramIds { map: FxMap::with_capacity_and_hasher(n, Default::default()) }
    }

    /// Number of distinct n-grams seen (one past the largest id).
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// `sum_k min(count_a[k], count_b[k])` for two id lists, using a zeroed scratch array (left zeroed).
/// Ids equal to [`NgramIds::ABSENT`] in `b` are skipped (they cannot occur in `a`).
pub(crate) fn clipped_matches(a: &[u32], b: &[u32], scratch: &mut [u32]) -> u64 {
    for &x in b {
        if x != NgramIds::ABSENT {
            scratch[x as usize] += 1;
        }
    }
    let mut m = 0u64;
    for &x in a {
        let c = &mut scratch[x as usize];
        if *c > 0 {
            *c -= 1;
            m += 1;
        }
    }
    for &x in b {
        if x != NgramIds::ABSENT {
            scratch[x as usize] = 0;
        }
    }
    m
}

/// Interns string tokens into dense `u32` ids (per item; not shared between threads).
#[derive(Default)]
pub(crate) struct Interner<'a> {
    map: FxMap<&'a str, u32>,
}

impl<'a> Interner<'a> {
    /// Id of `tok`, assigning the next one on first sight.
    pub(crate) fn id(&mut self, tok: &'a str) -> u32 {
        let next = self.map.len() as u32;
        *self.map.entry(tok).or_insert(next)
    }
}

/// Sorts `keys` and run-length encodes them into `(key, count)` pairs (a sorted multiset).
pub(crate) fn count_sorted<K: Ord + Copy>(mut keys: Vec<K>) -> Vec<(K, u32)> {
    keys.sort_unstable();
    let mut out: Vec<(K, u32)> = Vec::with_capacity(keys.len());
    for k in keys {
        match out.last_mut() {
            Some((last, c)) if *last == k => *c += 1,
            _ => out.push((k, 1)),
        }
    }
    out
}

/// Sum over keys of `min(a[k], b[k])` for two sorted multisets.
pub(crate) fn intersect_count<K: Ord + Copy>(a: &[(K, u32)], b: &[(K, u32)]) -> u64 {
    let (mut i, mut j, mut n) = (0usize, 0usize, 0u64);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += u64::from(a[i].1.min(b[j].1));
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// Total count of a sorted multiset.
pub(crate) fn total_count<K>(a: &[(K, u32)]) -> u64 {
    a.iter().map(|&(_, c)| u64::from(c)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_split_semantics() {
        let v: Vec<&str> = py_split(" a\u{1c}b\u{3000}c \t").collect();
        assert_eq!(v, ["a", "b", "c"]);
        assert_eq!(py_rstrip("x \u{a0}\n"), "x");
        assert!(py_split("").next().is_none());
    }

    #[test]
    fn multiset_ops() {
        let a = count_sorted(vec![3, 1, 3, 2]);
        assert_eq!(a, vec![(1, 1), (2, 1), (3, 2)]);
        let b = count_sorted(vec![3, 3, 3, 4]);
        assert_eq!(intersect_count(&a, &b), 2);
        assert_eq!(total_count(&b), 4);
    }

    #[test]
    fn ngram_ids_and_clipping() {
        let mut ng = NgramIds::default();
        let a = ng.ids(&[1, 2, 1, 2], 0, 2);
        let b = ng.ids(&[2, 1, 2, 2], 0, 2);
        assert_eq!(a[0][0], b[0][1]);
        assert_eq!(a[1][0], b[1][1]);
        let mut scratch = vec![0u32; ng.len()];
        assert_eq!(clipped_matches(&a[0], &b[0], &mut scratch), 3);
        assert_eq!(clipped_matches(&a[1], &b[1], &mut scratch), 2);
        assert!(scratch.iter().all(|&x| x == 0));
        let c = ng.lookup(&[2, 9, 2, 1], 0, 2);
        assert_eq!(c[0], [a[0][1], NgramIds::ABSENT, a[0][1], a[0][0]]);
        assert_eq!(c[1], [NgramIds::ABSENT, NgramIds::ABSENT, a[1][1]]);
    }
}
