//! Adaptive successive halving ([`Strategy::Halving`]): screening, racing and completing the choice.
//!
//! [`Strategy::Halving`]: super::Strategy::Halving

use std::collections::BTreeMap;

use super::table::{budget_limit, screening_samples, Ctx, Table};
use super::BoundarySearch;
use crate::race::{decide, fit, Decision, THREAT_SHARE};
use crate::SearchError;

impl BoundarySearch {
    /// Adaptive successive halving (see [`Strategy::Halving`]). Returns the boundary the
    /// racing statistics choose when the finalists alone would fall back to full LoRA.
    ///
    /// [`Strategy::Halving`]: super::Strategy::Halving
    pub(super) fn halving(&self, ctx: &Ctx<'_>, table: &mut Table<'_>) -> Result<Option<usize>, SearchError> {
        let n = table.n;
        let limit = budget_limit(self.budget, n);
        table.eval(ctx.reference, ctx.order)?;
        let others: Vec<usize> = (ctx.lo..=ctx.hi).filter(|&b| b != ctx.reference).collect();
        if others.is_empty() {
            return Ok(None);
        }
        let m0 = screening_samples(others.len(), n, limit, self.min_samples);
        // Validation sets too small for the budget: the screening alone exceeds it.
        let over_budget = n.saturating_add(others.len().saturating_mul(m0)).saturating_add(n - m0) > limit;
        let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
        if ctx.in_range(ctx.reference) {
            seen.insert(ctx.reference, n);
        }
        for &b in &others {
            table.eval(b, &ctx.order[..m0])?;
            seen.insert(b, m0);
        }
        let (mut spent_top, mut spent_choice) = (0usize, 0usize);
        while let Some(d) = self.race_decision(ctx, table, &seen) {
            let spent = table.memo.sample_evals();
            let m_of = |b: usize| seen.get(&b).copied().unwrap_or(n).min(n);
            // Comparisons of the top get at most THREAT_SHARE of what the choice's get, but go
            // first while under that share; when one kind has nothing open, the other runs.
            let top_turn = spent_top as f64 <= THREAT_SHARE * spent_choice as f64;
            let top_link = d.violation.or(d.threat).map(|l| (l, true));
            let choice_link = d.scan.map(|l| (l, false));
            let next = if top_turn { top_link.or(choice_link) } else { choice_link.or(top_link) };
            let next = next.or(d.choice_link.map(|l| (l, false))).or(d.polish.map(|l| (l, false)));
            let Some(((grow, _), for_top)) = next else {
                break;
            };
            let cur = m_of(grow);
            let want = cur.saturating_mul(self.eta).max(cur + 1).min(n);
            // Budget kept back to complete the choice; growing the choice draws on it.
            let reserve = n - m_of(d.choice);
            let room = if spent + reserve > limit {
                0
            } else if grow == d.choice {
                want - cur
            } else {
                limit - spent - reserve
            };
            let to = want.min(cur + room);
            if to > cur {
                table.eval(grow, &ctx.order[..to])?;
                seen.insert(grow, to);
                if for_top {
                    spent_top += to - cur;
                } else {
                    spent_choice += to - cur;
                }
            } else if reserve > 0 && spent + reserve <= limit {
                table.eval(d.choice, ctx.order)?;
                seen.insert(d.choice, n);
            } else {
                break;
            }
        }
        // The choice becomes a finalist. If the last steps moved it to a candidate the budget
        // cannot complete, the choice among affordable candidates is completed instead; if
        // nothing is affordable (validation sets too small for the budget), the plain choice
        // is completed and the report shows the real cost.
        let room = limit.saturating_sub(table.memo.sample_evals());
        let affordable: BTreeMap<usize, usize> =
            seen.iter().filter(|(_, &m)| n - m.min(n) <= room).map(|(&b, &m)| (b, m)).collect();
        let plain = self.race_decision(ctx, table, &seen).map(|d| d.choice);
        let complete = match plain {
            Some(c) if over_budget || affordable.contains_key(&c) => Some(c),
            _ => self.race_decision(ctx, table, &affordable).map(|d| d.choice).or(plain),
        };
        if let Some(b) = complete.or(others.first().copied()) {
            table.eval(b, ctx.order)?;
            seen.insert(b, n);
        }
        // A completed choice can fail its full-sample check, and the budget may not cover
        // the next one: the racing statistics' choice is then reported (see `report`).
        Ok(match plain {
            Some(c) if seen.get(&c).is_some_and(|&m| m < n) => Some(c),
            _ => self.race_decision(ctx, table, &seen).map(|d| d.choice),
        })
    }

    /// The racing decision on the candidates in `seen` (boundary → samples evaluated); the
    /// reference always enters the fit as its anchor.
    fn race_decision(&self, ctx: &Ctx<'_>, table: &Table<'_>, seen: &BTreeMap<usize, usize>) -> Option<Decision> {
        let mut data: Vec<(usize, Vec<f64>)> = seen
            .iter()
            .filter(|(b, _)| ctx.in_range(**b) && **b != ctx.reference)
            .map(|(&b, &m)| (b, table.scores(b, &ctx.order[..m.min(ctx.order.len())])))
            .collect();
        data.push((ctx.reference, table.scores(ctx.reference, ctx.order)));
        let mut all = fit(&data, ctx.reference);
        all.retain(|a| ctx.in_range(a.boundary));
        all.sort_by_key(|a| a.boundary);
        decide(&all, self.epsilon, table.n, self.z)
    }
}
