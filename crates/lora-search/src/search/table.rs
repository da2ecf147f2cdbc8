//! The evaluation cache of one run (`Ctx`, `Table`) and the small helpers the strategies share:
//! the budget in sample evaluations, the screening sample count and the best mean.

use std::collections::BTreeMap;

use crate::scorer::{Memo, Scorer};
use crate::SearchError;

/// Immutable per-run context.
pub(super) struct Ctx<'a> {
    pub(super) lo: usize,
    pub(super) hi: usize,
    pub(super) reference: usize,
    pub(super) order: &'a [usize],
}

impl Ctx<'_> {
    pub(super) fn in_range(&self, b: usize) -> bool {
        (self.lo..=self.hi).contains(&b)
    }
}

/// Memo plus the record of which samples each boundary has been evaluated on.
pub(super) struct Table<'a> {
    pub(super) memo: Memo<&'a mut dyn Scorer>,
    pub(super) n: usize,
    seen: BTreeMap<usize, (Vec<bool>, usize)>,
}

impl<'a> Table<'a> {
    pub(super) fn new(memo: Memo<&'a mut dyn Scorer>, n: usize) -> Self {
        Table { memo, n, seen: BTreeMap::new() }
    }

    pub(super) fn eval(&mut self, b: usize, samples: &[usize]) -> Result<(), SearchError> {
        self.memo.score(b, samples)?;
        let n = self.n;
        let entry = self.seen.entry(b).or_insert_with(|| (vec![false; n], 0));
        for &s in samples {
            if !entry.0[s] {
                entry.0[s] = true;
                entry.1 += 1;
            }
        }
        Ok(())
    }

    pub(super) fn count(&self, b: usize) -> usize {
        self.seen.get(&b).map_or(0, |e| e.1)
    }

    pub(super) fn is_full(&self, b: usize) -> bool {
        self.count(b) == self.n
    }

    /// Samples `b` was evaluated on, in `order`.
    pub(super) fn samples_of(&self, b: usize, order: &[usize]) -> Vec<usize> {
        match self.seen.get(&b) {
            Some((flags, _)) => order.iter().copied().filter(|&s| flags[s]).collect(),
            None => Vec::new(),
        }
    }

    /// Cached scores of `b` on `samples` (samples not evaluated are skipped).
    pub(super) fn scores(&self, b: usize, samples: &[usize]) -> Vec<f64> {
        samples.iter().filter_map(|&s| self.memo.cached(b, s)).collect()
    }

    pub(super) fn scores_on(&self, pool: &[usize], samples: &[usize]) -> Vec<(usize, Vec<f64>)> {
        pool.iter().map(|&b| (b, self.scores(b, samples))).collect()
    }
}

/// The budget in sample evaluations: `⌊budget · n⌋`.
pub(super) fn budget_limit(budget: f64, n: usize) -> usize {
    let v = (budget * n as f64).floor();
    if v.is_finite() && v >= 0.0 {
        v as usize
    } else {
        usize::MAX
    }
}

/// Samples every non-reference candidate is screened on: the largest `m ≤ min_samples` (and
/// `≤ n`) with `n + k·m + (n − m) ≤ limit` (reference, screening, completing one finalist);
/// at least 1 (then the budget may be exceeded, which the report shows).
pub(crate) fn screening_samples(k: usize, n: usize, limit: usize, min_samples: usize) -> usize {
    let top = min_samples.clamp(1, n.max(1));
    (1..=top).rev().find(|&m| n.saturating_add(k.saturating_mul(m)).saturating_add(n - m) <= limit).unwrap_or(1)
}

/// Best mean; ties go to the smaller boundary.
pub(super) fn best_of(means: &[(usize, f64)]) -> Option<(usize, f64)> {
    let mut best: Option<(usize, f64)> = None;
    for &(b, m) in means {
        best = match best {
            Some((bb, bm)) if bm > m || (bm == m && bb < b) => Some((bb, bm)),
            _ => Some((b, m)),
        };
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screening_fits_the_budget() {
        // L = 30 (29 non-reference candidates), budget 3: two samples each from n = 56 on.
        assert_eq!(screening_samples(29, 256, 768, 2), 2);
        assert_eq!(screening_samples(29, 56, 168, 2), 2);
        assert_eq!(screening_samples(29, 55, 165, 2), 1);
        assert_eq!(screening_samples(29, 16, 48, 2), 1, "too small: one sample, over budget");
        assert_eq!(screening_samples(3, 1, 3, 5), 1);
        assert_eq!(budget_limit(3.0, 256), 768);
        assert_eq!(budget_limit(2.5, 3), 7);
    }

    #[test]
    fn best_of_ties_go_small() {
        assert_eq!(best_of(&[(3, 1.0), (1, 1.0), (2, 0.5)]), Some((1, 1.0)));
        assert_eq!(best_of(&[]), None);
    }
}
