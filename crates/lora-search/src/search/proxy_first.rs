//! [`Strategy::ProxyFirst`]: rank the candidates by a cheap proxy (every `s`-th boundary first, then the
//! boundaries next to the plateau's edges and the best, `proxy_grid` and `refinements`), find the proxy's
//! plateau (`plateau`, `Plan`) and evaluate its edges, or bisect between them, with the real scorer.
//!
//! [`Strategy::ProxyFirst`]: super::Strategy::ProxyFirst

use std::collections::BTreeSet;

use super::table::{best_of, Ctx, Table};
use super::{BoundarySearch, ProxyScore};
use crate::scorer::{Memo, Scorer};
use crate::stats::{mean, variance};
use crate::SearchError;

impl BoundarySearch {
    pub(super) fn proxy_first(
        &self,
        ctx: &Ctx<'_>,
        proxy: &mut dyn Scorer,
        table: &mut Table<'_>,
    ) -> Result<(Vec<ProxyScore>, usize), SearchError> {
        let mut ptable = Table::new(Memo::new(proxy, table.n), table.n);
        // Only in-range boundaries are ranked; an out-of-range reference is not selectable.
        let candidates = ctx.hi - ctx.lo + 1;
        let stride = self.proxy_stride.unwrap_or_else(|| default_proxy_stride(candidates));
        let mut pool = proxy_grid(ctx.lo, ctx.hi, stride);
        let mut ask: Vec<usize> = pool.iter().copied().collect();
        let (scored, tied, plan) = loop {
            ptable.memo.prepare(&ask, ctx.order)?;
            for &b in &ask {
                ptable.eval(b, ctx.order)?;
            }
            let list: Vec<usize> = pool.iter().copied().collect();
            let scored = ptable.scores_on(&list, ctx.order);
            let (tied, plan) = plateau(&scored, self.z, self.proxy_margin, self.shortlist, candidates);
            ask = refinements(&scored, &plan, &pool, ctx.lo, ctx.hi);
            if ask.is_empty() {
                break (scored, tied, plan);
            }
            pool.extend(&ask);
        };
        table.eval(ctx.reference, ctx.order)?;
        let list = match plan {
            Plan::Evaluate(list) => {
                for &b in &list {
                    table.eval(b, ctx.order)?;
                }
                list
            }
            Plan::Bisect { lo, hi } => {
                // The metric's edge lies somewhere between the proxy's two edges: bisect for the smallest
                // boundary whose real score ties the best real score so far (ε rule), `shortlist` evaluations.
                let mut best = mean(&table.scores(ctx.reference, ctx.order));
                let (mut lo, mut hi) = (lo, hi);
                let mut list = Vec::with_capacity(self.shortlist);
                // k evaluations resolve 2^k − 1 candidates; a wider bracket cannot be resolved, so its lower end
                // (the smallest boundary the proxy considers) is tried first.
                let resolvable = u32::try_from(self.shortlist)
                    .ok()
                    .and_then(|k| 1usize.checked_shl(k))
                    .map_or(usize::MAX, |v| v - 1);
                let mut lower_first = hi - lo + 1 > resolvable;
                while list.len() < self.shortlist && lo <= hi {
                    let mid = if std::mem::take(&mut lower_first) { lo } else { lo + (hi - lo) / 2 };
                    table.eval(mid, ctx.order)?;
                    list.push(mid);
                    let m = mean(&table.scores(mid, ctx.order));
                    best = best.max(m);
                    if m >= best - self.epsilon {
                        if mid == 0 {
                            break;
                        }
                        hi = mid - 1;
                    } else {
                        lo = mid + 1;
                    }
                }
                list.sort_unstable();
                list
            }
        };
        let ranking = scored
            .iter()
            .zip(&tied)
            .map(|((b, s), &t)| ProxyScore {
                boundary: *b,
                score: mean(s),
                indistinguishable: t,
                shortlisted: list.contains(b),
            })
            .collect();
        Ok((ranking, ptable.memo.sample_evals()))
    }
}

/// The proxy's stride over `k` candidates when none is set: `max(1, round(√k / 2))` (3 for `k = 30`, 2 for 18,
/// every boundary up to 6). Boundary `b`'s proxy costs the `L − 1 − b` blocks above it, so every third boundary
/// costs about a third of all of them; the refinements add the boundaries next to the edges.
pub(crate) fn default_proxy_stride(k: usize) -> usize {
    (((k as f64).sqrt() / 2.0).round() as usize).max(1)
}

/// The boundaries the proxy scores first: `hi`, `hi − s`, `hi − 2s`, … down to `lo`, and `lo`.
fn proxy_grid(lo: usize, hi: usize, s: usize) -> BTreeSet<usize> {
    let mut grid: BTreeSet<usize> = (lo..=hi).rev().step_by(s.max(1)).collect();
    grid.insert(lo);
    grid
}

/// The unscored boundaries the proxy must score before `plan` stands: every boundary from just above the scored
/// boundary below the plan's lowest edge (the bisection's ends, or the boundaries it evaluates) up to its highest,
/// so that a noisy proxy's edge cannot hide between grid points inside the bracket; and the boundaries between
/// the proxy's best and the scored ones on either side. Empty once all of them are scored: on a proxy whose
/// plateau tests change once along the boundaries, the plan is then the one of scoring every boundary.
fn refinements(scored: &[(usize, Vec<f64>)], plan: &Plan, pool: &BTreeSet<usize>, lo: usize, hi: usize) -> Vec<usize> {
    let means: Vec<(usize, f64)> = scored.iter().map(|(b, s)| (*b, mean(s))).collect();
    let edges: Vec<usize> = match plan {
        Plan::Evaluate(list) => list.clone(),
        Plan::Bisect { lo, hi } => vec![*lo, *hi],
    };
    let below = |e: usize| pool.range(..e).next_back().map_or(lo, |&p| p + 1);
    let above = |e: usize| pool.range(e + 1..).next().map_or(hi, |&n| n - 1);
    let mut out = BTreeSet::new();
    if let (Some(&first), Some(&last)) = (edges.iter().min(), edges.iter().max()) {
        out.extend(below(first)..=last);
    }
    if let Some((b, _)) = best_of(&means) {
        out.extend(below(b)..=above(b));
    }
    out.into_iter().filter(|b| !pool.contains(b)).collect()
}

/// Which real evaluations [`Strategy::ProxyFirst`] makes after ranking by the proxy.
///
/// [`Strategy::ProxyFirst`]: super::Strategy::ProxyFirst
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    /// These boundaries (ascending).
    Evaluate(Vec<usize>),
    /// Bisection for the smallest tied boundary in `lo..=hi`.
    Bisect { lo: usize, hi: usize },
}

/// The proxy's plateau: which entries of `scored` (ascending boundaries) count as on it, and
/// which real evaluations to make (at most `k`).
///
/// With `d_b,i = s_b,i − s_best,i` the per-sample paired differences to the best mean, `m_b`
/// and `se_b` their mean and standard error, and `K` candidates (`candidates`: those of the search range, of
/// which `scored` may hold only some):
///
/// * the **rise** `G = max_b(−m_b)` is *clear* when `G ≥ (z + 2√(2 ln K)) · median_b(se_b)`
///   (the range of `K` equal candidates' means stays below about `2√(2 ln K)` standard errors);
/// * with a clear rise, `b` is on the plateau when it keeps all but `ρ` of the rise,
///   `m_b ≥ −ρ·G`, or is not significantly below the best, `m_b + z·se_b ≥ 0`. The smallest
///   boundary of the first kind is the *practical edge* `p`, of the second the *statistical
///   edge* `s`; the real metric's edge is taken to lie between them, and the plan bisects
///   `min(p, s)..=max(p, s)`;
/// * without one, `b` is on it when `m_b + (z + √(2 ln K))·se_b ≥ 0` (the allowance covers the
///   best's own selection bias as the largest of `K` noisy means), and the plan evaluates the
///   `k` smallest such boundaries.
///
/// Why two edges: a proxy that keeps rising slowly below the metric's step puts the practical
/// edge below the step and the statistical edge on it; a heavy-tailed proxy (log-probabilities
/// of a few hard samples) makes every standard error large, pushing the statistical edge above
/// the step, and the practical edge still reaches it.
fn plateau(scored: &[(usize, Vec<f64>)], z: f64, rho: f64, k: usize, candidates: usize) -> (Vec<bool>, Plan) {
    let means: Vec<(usize, f64)> = scored.iter().map(|(b, s)| (*b, mean(s))).collect();
    let Some((best, _)) = best_of(&means) else {
        return (Vec::new(), Plan::Evaluate(Vec::new()));
    };
    let Some((_, bs)) = scored.iter().find(|(b, _)| *b == best) else {
        return (vec![false; scored.len()], Plan::Evaluate(Vec::new()));
    };
    let stats: Vec<(f64, f64)> = scored
        .iter()
        .map(|(_, s)| {
            let d: Vec<f64> = s.iter().zip(bs).map(|(x, y)| x - y).collect();
            let se = variance(&d).map_or(0.0, |v| (v / d.len() as f64).sqrt());
            (mean(&d), se)
        })
        .collect();
    let allowance = (2.0 * (candidates.max(scored.len()).max(1) as f64).ln()).sqrt();
    let rise = stats.iter().map(|(m, _)| -m).fold(0.0, f64::max);
    let mut ses: Vec<f64> =
        scored.iter().zip(&stats).filter(|((b, _), _)| *b != best).map(|(_, (_, se))| *se).collect();
    ses.sort_by(f64::total_cmp);
    let noise = ses.get(ses.len() / 2).copied().unwrap_or(0.0);
    let clear = rise > 0.0 && rise >= (z + 2.0 * allowance) * noise;
    let boundaries: Vec<usize> = scored.iter().map(|(b, _)| *b).collect();
    if !clear {
        let flags: Vec<bool> = stats.iter().map(|(m, se)| m + (z + allowance) * se >= 0.0).collect();
        let list = boundaries.iter().zip(&flags).filter(|(_, &f)| f).map(|(b, _)| *b).take(k).collect();
        return (flags, Plan::Evaluate(list));
    }
    let practical: Vec<bool> = stats.iter().map(|(m, _)| *m >= -rho * rise).collect();
    let statistical: Vec<bool> = stats.iter().map(|(m, se)| m + z * se >= 0.0).collect();
    let flags: Vec<bool> = practical.iter().zip(&statistical).map(|(p, s)| *p || *s).collect();
    let first = |f: &[bool]| boundaries.iter().zip(f).find(|(_, &x)| x).map_or(best, |(b, _)| *b);
    let (p, s) = (first(&practical), first(&statistical));
    (flags, Plan::Bisect { lo: p.min(s), hi: p.max(s) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_and_its_refinements() {
        let grid = proxy_grid(0, 29, 3);
        assert_eq!(grid.iter().copied().collect::<Vec<_>>(), vec![0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29]);
        assert_eq!(proxy_grid(4, 9, 1).len(), 6);
        assert_eq!(proxy_grid(7, 7, 3).into_iter().collect::<Vec<_>>(), vec![7]);
        assert_eq!(default_proxy_stride(30), 3);
        assert_eq!(default_proxy_stride(18), 2);
        assert_eq!(default_proxy_stride(6), 1);
        // A proxy rising up to 29: the best is the top, the bisection spans 23..=26. Refined: everything from just
        // above 20 (the scored boundary below 23) up to 26, and 27, 28 (between the best and the scored 26).
        let scored: Vec<(usize, Vec<f64>)> = grid.iter().map(|&b| (b, vec![b as f64, b as f64 + 0.5])).collect();
        let plan = Plan::Bisect { lo: 23, hi: 26 };
        assert_eq!(refinements(&scored, &plan, &grid, 0, 29), vec![21, 22, 24, 25, 27, 28]);
        // Once those are scored, nothing is left to add.
        let mut pool = grid.clone();
        pool.extend([21, 22, 24, 25, 27, 28]);
        let scored: Vec<(usize, Vec<f64>)> = pool.iter().map(|&b| (b, vec![b as f64])).collect();
        assert!(refinements(&scored, &plan, &pool, 0, 29).is_empty());
        // A plan that evaluates the smallest flagged boundaries refines below the lowest of them.
        let plan = Plan::Evaluate(vec![2, 5]);
        let scored: Vec<(usize, Vec<f64>)> = grid.iter().map(|&b| (b, vec![1.0])).collect();
        assert_eq!(refinements(&scored, &plan, &grid, 0, 29), vec![1, 3, 4]);
    }

    #[test]
    fn plateau_has_a_practical_and_a_statistical_edge() {
        // A large shared per-sample effect: unpaired spreads overlap, paired ones do not.
        let shared = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let with =
            |off: &dyn Fn(usize) -> f64| -> Vec<f64> { shared.iter().enumerate().map(|(i, s)| s + off(i)).collect() };
        let wob = |o: f64, w: f64| move |i: usize| o + if i.is_multiple_of(2) { w } else { -w };
        // 0: far below, with a heavy tail (one sample above the best): its standard error is large, and the
        // old allowance band (z + √(2 ln K) standard errors) called it indistinguishable.
        let tail = [-5.0, -5.0, -5.0, -5.0, 3.0, -1.0];
        let scored = vec![
            (0, with(&|i| tail[i])),
            (1, with(&wob(-0.25, 0.001))),
            (2, with(&|_| 0.0)),
            (3, with(&wob(-0.01, 0.02))),
            (4, with(&wob(-0.4, 0.001))),
        ];
        // Rise 3 ≫ the typical standard error: clear. Practical edge (within 10 % of the rise): 1;
        // statistical edge (within 2 standard errors): 2 (the best; 3 is within too, 4 is neither).
        let (flags, plan) = plateau(&scored, 2.0, 0.1, 2, 5);
        assert_eq!(flags, vec![false, true, true, true, false]);
        assert_eq!(plan, Plan::Bisect { lo: 1, hi: 2 });
        // No practical margin: only the statistical edge.
        let (flags, plan) = plateau(&scored, 2.0, 0.0, 2, 5);
        assert_eq!(flags, vec![false, false, true, true, false]);
        assert_eq!(plan, Plan::Bisect { lo: 2, hi: 2 });
        // A flat proxy (differences of the order of their noise): the wide band, smallest first.
        let flat: Vec<(usize, Vec<f64>)> =
            (0..4).map(|b| (b, with(&|i| 0.001 * b as f64 + 0.004 * ((i * 7 + b * 13) % 5) as f64))).collect();
        let (flags, plan) = plateau(&flat, 2.0, 0.1, 2, 4);
        assert_eq!(flags, vec![true; 4]);
        assert_eq!(plan, Plan::Evaluate(vec![0, 1]));
        assert_eq!(plateau(&[], 2.0, 0.1, 2, 0), (Vec::new(), Plan::Evaluate(Vec::new())));
    }
}
