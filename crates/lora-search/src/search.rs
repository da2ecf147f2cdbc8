//! Automated boundary search: strategies, selection rule and report.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;
use serde::Serialize;

use crate::race::{decide, fit, Decision, THREAT_SHARE};
use crate::rng::{mix, Rng};
use crate::scorer::{Memo, Scorer};
use crate::stats::{mean, paired_bootstrap_ci, variance};
use crate::SearchError;

/// How candidates are explored. The default is [`Strategy::Halving`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Every boundary in `[lo, hi]` on every sample: `hi - lo + 1` full evaluations (+1 for
    /// the full-LoRA reference when it lies outside the range).
    Exhaustive,
    /// A grid with stride `s` (default `max(2, round(√K))` for `K` candidates) on all
    /// samples, then repeated refinement: with `t = ⌈t/2⌉` starting from `s` down to 1,
    /// evaluate `c ± t` and `best ± t` around the current choice `c` and the current best.
    CoarseToFine,
    /// Adaptive successive halving (the default), within a budget of full validation
    /// evaluations (default 3): full LoRA on every sample, every candidate screened on
    /// `min_samples` samples, then the sample count of one candidate at a time is multiplied
    /// by η (default 2) — always the one whose comparison the selection rule currently rests
    /// on least firmly (a boundary below the choice that might be tied, the choice itself, or
    /// a candidate that might beat the best by more than ε); candidates that are clearly out
    /// stay on their few samples. Budget for completing the choice on every sample is kept
    /// back throughout; the completed choice and full LoRA are the finalists. Estimates come
    /// from an additive fit (boundary effect + per-sample difficulty) of all scores so far.
    #[default]
    Halving,
    /// Rank every candidate by a cheap proxy scorer on all samples; the short list holds the
    /// proxy's plateau edges — the smallest boundary keeping all but `proxy_margin` (10%) of
    /// the proxy's rise, and the smallest not significantly below the proxy's best (paired
    /// differences) — up to `shortlist` (default 2) boundaries, evaluated with the real
    /// scorer together with the full-LoRA reference: at most `shortlist + 1` full evaluations.
    ProxyFirst,
}

impl Strategy {
    /// The CLI name (`exhaustive`, `coarse-to-fine`, `halving`, `proxy-first`).
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Exhaustive => "exhaustive",
            Strategy::CoarseToFine => "coarse-to-fine",
            Strategy::Halving => "halving",
            Strategy::ProxyFirst => "proxy-first",
        }
    }

    /// All strategies, in CLI order.
    pub const ALL: [Strategy; 4] =
        [Strategy::Exhaustive, Strategy::CoarseToFine, Strategy::Halving, Strategy::ProxyFirst];
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = SearchError;

    /// Parses `exhaustive|coarse-to-fine|halving|proxy-first` (ASCII case-insensitive).
    ///
    /// ```
    /// use lora_search::Strategy;
    /// # fn main() -> Result<(), lora_search::SearchError> {
    /// assert_eq!("coarse-to-fine".parse::<Strategy>()?, Strategy::CoarseToFine);
    /// assert!("greedy".parse::<Strategy>().is_err());
    /// # Ok(())
    /// # }
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| SearchError::UnknownStrategy(s.to_string()))
    }
}

/// When two candidates count as tied (ties go to the smaller boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TieRule {
    /// `b` ties the best when `mean(b) ≥ mean(best) − ε` (the default).
    #[default]
    Epsilon,
    /// `b` ties the best when the upper end of the paired-bootstrap 95% CI of
    /// `mean(b) − mean(best)` is `≥ −ε` (the best is not significantly better by more than ε).
    BootstrapCi,
}

/// Parses a range `"LO-HI"` (inclusive), as the CLI's `--range` takes it.
///
/// ```
/// # fn main() -> Result<(), lora_search::SearchError> {
/// assert_eq!(lora_search::parse_range("4-20")?, (4, 20));
/// assert!(lora_search::parse_range("20").is_err());
/// # Ok(())
/// # }
/// ```
pub fn parse_range(s: &str) -> Result<(usize, usize), SearchError> {
    let bad = || SearchError::BadRange(s.to_string());
    let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
    let lo = a.trim().parse::<usize>().map_err(|_| bad())?;
    let hi = b.trim().parse::<usize>().map_err(|_| bad())?;
    if lo > hi {
        return Err(SearchError::EmptyRange { lo, hi });
    }
    Ok((lo, hi))
}

/// One evaluated candidate boundary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// Keep-through boundary `b`.
    pub boundary: usize,
    /// Mean score over the samples it was evaluated on (higher is better).
    pub score: f64,
    /// Paired-bootstrap 95% CI of `mean(b) − mean(full LoRA)` over those samples.
    pub ci: [f64; 2],
    /// LoRA parameters kept by keep-through(`b`), in percent of full LoRA.
    pub lora_params_kept: f64,
    /// Real scorer sample-evaluations spent on this boundary.
    pub scorer_calls: usize,
    /// Number of samples its score is based on.
    pub samples: usize,
    /// Whether it was evaluated on every sample; the selection rule is applied to the
    /// finalists (see [`SearchReport::boundary`] for the one exception).
    pub finalist: bool,
}

/// A candidate's proxy score (strategy `proxy-first` only).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyScore {
    /// Keep-through boundary `b`.
    pub boundary: usize,
    /// Mean proxy score over all samples.
    pub score: f64,
    /// Whether its proxy scores are statistically indistinguishable from the proxy's best
    /// (paired differences: `mean + z·SE ≥ 0`).
    pub indistinguishable: bool,
    /// Whether it made the short list evaluated with the real scorer (the smallest
    /// `shortlist` indistinguishable boundaries).
    pub shortlisted: bool,
}

/// The outcome of [`BoundarySearch::run`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchReport {
    /// The selected boundary (keep-through `b`). Normally a finalist; with
    /// [`Strategy::Halving`], when the completed choice failed its full-sample check so that
    /// the finalists would fall back to full LoRA and the budget could not complete the next
    /// candidate, the smaller boundary the racing statistics choose is reported instead (its
    /// candidate entry then has `finalist: false`).
    pub boundary: usize,
    /// The strategy that ran.
    pub strategy: Strategy,
    /// Real scorer sample-evaluations spent (memoised: each `(boundary, sample)` once).
    pub scorer_calls: usize,
    /// `scorer_calls / n_samples`: cost in full validation evaluations.
    pub full_evaluations: f64,
    /// Proxy scorer sample-evaluations spent (0 unless `proxy-first`).
    pub proxy_calls: usize,
    /// Size of the validation set.
    pub n_samples: usize,
    /// Number of decoder blocks `L`; full LoRA is boundary `L − 1`.
    pub num_layers: usize,
    /// Searched range `[lo, hi]` (inclusive).
    pub range: [usize; 2],
    /// Seed used for sample order and bootstrap.
    pub seed: u64,
    /// Tie tolerance ε.
    pub epsilon: f64,
    /// Tie rule used by the selection.
    pub tie_rule: TieRule,
    /// The finalist with the best mean score (before the tie rule moves to smaller boundaries).
    pub best: usize,
    /// The full-LoRA reference (boundary `L − 1`), always evaluated on every sample.
    pub reference: Candidate,
    /// Every in-range boundary that was evaluated on at least one sample, ascending.
    pub candidates: Vec<Candidate>,
    /// Proxy means of every candidate (`proxy-first` only; omitted from JSON when empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub proxy_ranking: Vec<ProxyScore>,
}

impl SearchReport {
    /// The evaluated candidate with boundary `b`, if any.
    pub fn candidate(&self, b: usize) -> Option<&Candidate> {
        self.candidates.iter().find(|c| c.boundary == b)
    }
}

/// Configuration of a boundary search (builder style).
///
/// ```
/// use lora_search::{BoundarySearch, FnScorer, Strategy};
/// # fn main() -> Result<(), lora_search::SearchError> {
/// // 12 layers; quality jumps once LoRA is kept through block 5.
/// let mut scorer = FnScorer::new(|b, i| Ok(if b >= 5 { 0.8 } else { 0.3 } + (i % 3) as f64 * 0.01));
/// let report = BoundarySearch::new(12).strategy(Strategy::Exhaustive).seed(7).run(&mut scorer, 40)?;
/// assert_eq!(report.boundary, 5);
/// assert_eq!(report.scorer_calls, 12 * 40);
///
/// // The default strategy reaches the same boundary within 3 full evaluations.
/// let report = BoundarySearch::new(12).seed(7).run(&mut scorer, 40)?;
/// assert_eq!((report.strategy, report.boundary), (Strategy::Halving, 5));
/// assert!(report.full_evaluations <= 3.0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BoundarySearch {
    num_layers: usize,
    range: Option<(usize, usize)>,
    strategy: Strategy,
    seed: u64,
    epsilon: f64,
    tie_rule: TieRule,
    bootstrap_resamples: usize,
    param_counts: Option<Vec<f64>>,
    stride: Option<usize>,
    eta: usize,
    budget: f64,
    min_samples: usize,
    shortlist: usize,
    z: f64,
    proxy_margin: f64,
}

/// Default tie tolerance ε (scores are assumed to be on a 0–1 scale).
pub const DEFAULT_EPSILON: f64 = 0.01;
/// Default number of bootstrap resamples.
pub const DEFAULT_RESAMPLES: usize = 1000;
/// Default budget of the halving strategy, in full validation evaluations.
pub const DEFAULT_BUDGET: f64 = 3.0;
/// Default practical margin of [`Strategy::ProxyFirst`]: a boundary keeping 90% of the proxy's
/// rise counts as on the proxy's plateau.
pub const DEFAULT_PROXY_MARGIN: f64 = 0.1;

impl BoundarySearch {
    /// A search over a model with `num_layers` decoder blocks; the range defaults to all
    /// boundaries `0..=num_layers − 1`, the strategy to [`Strategy::Halving`], the seed to 0,
    /// ε to [`DEFAULT_EPSILON`], the tie rule to [`TieRule::Epsilon`], resamples to
    /// [`DEFAULT_RESAMPLES`], parameter counts to uniform.
    pub fn new(num_layers: usize) -> Self {
        BoundarySearch {
            num_layers,
            range: None,
            strategy: Strategy::default(),
            seed: 0,
            epsilon: DEFAULT_EPSILON,
            tie_rule: TieRule::default(),
            bootstrap_resamples: DEFAULT_RESAMPLES,
            param_counts: None,
            stride: None,
            eta: 2,
            budget: DEFAULT_BUDGET,
            min_samples: 2,
            shortlist: 2,
            z: 2.0,
            proxy_margin: DEFAULT_PROXY_MARGIN,
        }
    }

    /// Restricts the candidates to boundaries `lo..=hi`.
    pub fn range(mut self, lo: usize, hi: usize) -> Self {
        self.range = Some((lo, hi));
        self
    }

    /// Selects the strategy.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Seeds the sample order and the bootstrap.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Tie tolerance ε ≥ 0 (in score units).
    pub fn epsilon(mut self, epsilon: f64) -> Self {
        self.epsilon = epsilon;
        self
    }

    /// Tie rule of the final selection.
    pub fn tie_rule(mut self, rule: TieRule) -> Self {
        self.tie_rule = rule;
        self
    }

    /// Number of bootstrap resamples (≥ 1).
    pub fn bootstrap_resamples(mut self, n: usize) -> Self {
        self.bootstrap_resamples = n;
        self
    }

    /// LoRA parameter count of each block (`num_layers` non-negative values), for
    /// `lora_params_kept`; uniform by default.
    pub fn param_counts(mut self, counts: Vec<f64>) -> Self {
        self.param_counts = Some(counts);
        self
    }

    /// Grid stride of [`Strategy::CoarseToFine`] (≥ 1); default `max(2, round(√K))`.
    pub fn stride(mut self, stride: usize) -> Self {
        self.stride = Some(stride);
        self
    }

    /// Growth factor η ≥ 2 of [`Strategy::Halving`]: a candidate that needs more evidence
    /// has its sample count multiplied by η (default 2).
    pub fn eta(mut self, eta: usize) -> Self {
        self.eta = eta;
        self
    }

    /// Budget of [`Strategy::Halving`] in full validation evaluations (≥ 1, default 3). It
    /// holds whenever screening fits: `n + K·1 + (n − 1) ≤ budget·n` for `K` non-reference
    /// candidates (for `L = 30`, budget 3: `n ≥ 28`); smaller validation sets report the real
    /// cost.
    pub fn budget(mut self, budget: f64) -> Self {
        self.budget = budget;
        self
    }

    /// Samples every candidate is first screened on by [`Strategy::Halving`] (≥ 1, default
    /// 2; lowered to 1 when the budget requires it).
    pub fn min_samples(mut self, n: usize) -> Self {
        self.min_samples = n;
        self
    }

    /// Short-list length of [`Strategy::ProxyFirst`] (≥ 1, default 2): at most this many
    /// boundaries on the proxy's plateau (its edges first, then the smallest others) are
    /// evaluated with the real scorer, plus the full-LoRA reference.
    pub fn shortlist(mut self, k: usize) -> Self {
        self.shortlist = k;
        self
    }

    /// Confidence `z` (in standard errors, ≥ 0, default 2): [`Strategy::Halving`] accepts its
    /// choice as tied once it lies `z` standard errors above the tie level;
    /// [`Strategy::ProxyFirst`] counts a boundary as not significantly below the proxy's best
    /// while its mean paired difference is within `z` standard errors of 0 (`z + √(2 ln K)`
    /// when the proxy shows no clear rise).
    pub fn z(mut self, z: f64) -> Self {
        self.z = z;
        self
    }

    /// Practical margin ρ of [`Strategy::ProxyFirst`] (`0 ≤ ρ < 1`, default
    /// [`DEFAULT_PROXY_MARGIN`]): where the proxy rises clearly, a boundary whose proxy mean is
    /// within `ρ · rise` of the best counts as on the plateau (`rise` = best − worst candidate).
    pub fn proxy_margin(mut self, rho: f64) -> Self {
        self.proxy_margin = rho;
        self
    }

    /// Runs the search with one scorer. [`Strategy::ProxyFirst`] needs
    /// [`BoundarySearch::run_with_proxy`] and fails here with [`SearchError::MissingProxy`].
    pub fn run<S: Scorer>(&self, scorer: &mut S, n_samples: usize) -> Result<SearchReport, SearchError> {
        let mut real: &mut dyn Scorer = scorer;
        self.run_inner(None, &mut real, n_samples)
    }

    /// Runs the search with a cheap `proxy` scorer and the real `scorer`. Only
    /// [`Strategy::ProxyFirst`] consults the proxy; other strategies ignore it.
    pub fn run_with_proxy<P: Scorer, S: Scorer>(
        &self,
        proxy: &mut P,
        scorer: &mut S,
        n_samples: usize,
    ) -> Result<SearchReport, SearchError> {
        let mut p: &mut dyn Scorer = proxy;
        let mut real: &mut dyn Scorer = scorer;
        self.run_inner(Some(&mut p), &mut real, n_samples)
    }

    /// The validated range `(lo, hi)`.
    fn checked_range(&self) -> Result<(usize, usize), SearchError> {
        let (lo, hi) = self.range.unwrap_or((0, self.num_layers.saturating_sub(1)));
        if lo > hi {
            return Err(SearchError::EmptyRange { lo, hi });
        }
        if hi >= self.num_layers {
            return Err(SearchError::RangeOutOfBounds { lo, hi, num_layers: self.num_layers });
        }
        Ok((lo, hi))
    }

    fn validate(&self, n_samples: usize) -> Result<(usize, usize, Vec<f64>), SearchError> {
        if self.num_layers == 0 {
            return Err(SearchError::ZeroLayers);
        }
        if n_samples == 0 {
            return Err(SearchError::EmptySamples);
        }
        let (lo, hi) = self.checked_range()?;
        let bad = |name, value: String, why| Err(SearchError::InvalidConfig { name, value, why });
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            return bad("epsilon", self.epsilon.to_string(), "must be finite and >= 0");
        }
        if self.bootstrap_resamples == 0 {
            return bad("bootstrap_resamples", "0".into(), "must be >= 1");
        }
        if self.stride == Some(0) {
            return bad("stride", "0".into(), "must be >= 1");
        }
        if self.eta < 2 {
            return bad("eta", self.eta.to_string(), "must be >= 2");
        }
        if !(self.budget.is_finite() && self.budget >= 1.0) {
            return bad("budget", self.budget.to_string(), "must be finite and >= 1");
        }
        if self.min_samples == 0 {
            return bad("min_samples", "0".into(), "must be >= 1");
        }
        if self.shortlist == 0 {
            return bad("shortlist", "0".into(), "must be >= 1");
        }
        if !(self.z.is_finite() && self.z >= 0.0) {
            return bad("z", self.z.to_string(), "must be finite and >= 0");
        }
        if !(self.proxy_margin.is_finite() && (0.0..1.0).contains(&self.proxy_margin)) {
            return bad("proxy_margin", self.proxy_margin.to_string(), "must be in [0, 1)");
        }
        let counts = match &self.param_counts {
            None => vec![1.0; self.num_layers],
            Some(c) => {
                if c.len() != self.num_layers {
                    return Err(SearchError::ParamCountLength { expected: self.num_layers, got: c.len() });
                }
                if let Some(v) = c.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                    return bad("param_counts", v.to_string(), "must be finite and >= 0");
                }
                c.clone()
            }
        };
        let total: f64 = counts.iter().sum();
        if total <= 0.0 {
            return Err(SearchError::ZeroParams);
        }
        let mut acc = 0.0;
        let kept = counts
            .iter()
            .map(|c| {
                acc += c;
                100.0 * acc / total
            })
            .collect();
        Ok((lo, hi, kept))
    }

    fn run_inner(
        &self,
        proxy: Option<&mut dyn Scorer>,
        scorer: &mut dyn Scorer,
        n: usize,
    ) -> Result<SearchReport, SearchError> {
        let (lo, hi, kept) = self.validate(n)?;
        let reference = self.num_layers - 1;
        let mut order: Vec<usize> = (0..n).collect();
        Rng::new(mix(&[self.seed, 0x005E_A5C4])).shuffle(&mut order);
        let mut table = Table::new(Memo::new(scorer, n), n);
        let ctx = Ctx { lo, hi, reference, order: &order };
        let mut proxy_ranking = Vec::new();
        let mut proxy_calls = 0;
        let mut override_choice: Option<usize> = None;
        match self.strategy {
            Strategy::Exhaustive => {
                table.eval(reference, &order)?;
                for b in lo..=hi {
                    table.eval(b, &order)?;
                }
            }
            Strategy::CoarseToFine => self.coarse_to_fine(&ctx, &mut table)?,
            Strategy::Halving => override_choice = self.halving(&ctx, &mut table)?,
            Strategy::ProxyFirst => {
                let p = proxy.ok_or(SearchError::MissingProxy)?;
                let (ranking, calls) = self.proxy_first(&ctx, p, &mut table)?;
                proxy_ranking = ranking;
                proxy_calls = calls;
            }
        }
        self.report(&ctx, &table, &kept, proxy_ranking, proxy_calls, override_choice)
    }

    fn coarse_to_fine(&self, ctx: &Ctx<'_>, table: &mut Table<'_>) -> Result<(), SearchError> {
        let (lo, hi) = (ctx.lo, ctx.hi);
        let k = hi - lo + 1;
        let s = self.stride.unwrap_or_else(|| ((k as f64).sqrt().round() as usize).max(2));
        table.eval(ctx.reference, ctx.order)?;
        let mut b = lo;
        while b <= hi {
            table.eval(b, ctx.order)?;
            b += s;
        }
        table.eval(hi, ctx.order)?;
        let mut t = s;
        while t > 1 {
            t = t.div_ceil(2);
            let (chosen, best) = self.select_full(ctx, table)?;
            for centre in [chosen, best] {
                for cand in [centre.checked_sub(t), centre.checked_add(t)].into_iter().flatten() {
                    if (lo..=hi).contains(&cand) && !table.is_full(cand) {
                        table.eval(cand, ctx.order)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Adaptive successive halving (see [`Strategy::Halving`]). Returns the boundary the
    /// racing statistics choose when the finalists alone would fall back to full LoRA.
    fn halving(&self, ctx: &Ctx<'_>, table: &mut Table<'_>) -> Result<Option<usize>, SearchError> {
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

    fn proxy_first(
        &self,
        ctx: &Ctx<'_>,
        proxy: &mut dyn Scorer,
        table: &mut Table<'_>,
    ) -> Result<(Vec<ProxyScore>, usize), SearchError> {
        let mut ptable = Table::new(Memo::new(proxy, table.n), table.n);
        // Only in-range boundaries are ranked; an out-of-range reference is not selectable.
        let pool: Vec<usize> = (ctx.lo..=ctx.hi).collect();
        for &b in &pool {
            ptable.eval(b, ctx.order)?;
        }
        let scored = ptable.scores_on(&pool, ctx.order);
        let (tied, plan) = plateau(&scored, self.z, self.proxy_margin, self.shortlist);
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

    /// Selection among the finalists (in-range boundaries evaluated on every sample):
    /// returns `(chosen, best)`.
    fn select_full(&self, ctx: &Ctx<'_>, table: &Table<'_>) -> Result<(usize, usize), SearchError> {
        let finalists: Vec<usize> = (ctx.lo..=ctx.hi).filter(|&b| table.is_full(b)).collect();
        let scored = table.scores_on(&finalists, ctx.order);
        let means: Vec<(usize, f64)> = scored.iter().map(|(b, s)| (*b, mean(s))).collect();
        let best = best_of(&means).ok_or(SearchError::EmptyRange { lo: ctx.lo, hi: ctx.hi })?;
        let best_scores = table.scores(best.0, ctx.order);
        let ties: Vec<bool> = match self.tie_rule {
            TieRule::Epsilon => means.iter().map(|(_, m)| *m >= best.1 - self.epsilon).collect(),
            TieRule::BootstrapCi => scored
                .par_iter()
                .map(|(b, s)| {
                    let ci = paired_bootstrap_ci(
                        s,
                        &best_scores,
                        self.bootstrap_resamples,
                        mix(&[self.seed, 0xB007, *b as u64, best.0 as u64]),
                    );
                    ci[1] >= -self.epsilon
                })
                .collect(),
        };
        let chosen = means.iter().zip(&ties).find(|(_, &t)| t).map_or(best.0, |((b, _), _)| *b);
        Ok((chosen, best.0))
    }

    fn report(
        &self,
        ctx: &Ctx<'_>,
        table: &Table<'_>,
        kept: &[f64],
        proxy_ranking: Vec<ProxyScore>,
        proxy_calls: usize,
        override_choice: Option<usize>,
    ) -> Result<SearchReport, SearchError> {
        let (chosen, best) = self.select_full(ctx, table)?;
        // Halving only: when the finalists fall back to full LoRA but the racing statistics
        // choose a smaller boundary (its completion failed or was unaffordable), report that.
        // The racing statistics' own choice is reported only when it is a finalist (evaluated on every sample):
        // on real runs with one or two samples per screened candidate (sparse metrics like F1), an unverified
        // choice proved unreliable, so a choice the budget could not verify falls back to the finalists' rule.
        let chosen = match override_choice {
            Some(o) if chosen == ctx.reference && o < chosen && ctx.in_range(o) && table.is_full(o) => {
                let (mine, full) = (table.scores(o, ctx.order), table.scores(ctx.reference, ctx.order));
                if mean(&mine) >= mean(&full) - self.epsilon {
                    o
                } else {
                    chosen
                }
            }
            _ => chosen,
        };
        let ref_scores = table.scores(ctx.reference, ctx.order);
        let mut boundaries: Vec<usize> = (ctx.lo..=ctx.hi).filter(|&b| table.count(b) > 0).collect();
        if !boundaries.contains(&ctx.reference) {
            boundaries.push(ctx.reference);
        }
        // Paired data per boundary (sequential: reads the memo), bootstrap in parallel.
        let data: Vec<PairedData> = boundaries
            .iter()
            .map(|&b| {
                let samples = table.samples_of(b, ctx.order);
                (
                    b,
                    table.scores(b, &samples),
                    table.scores(ctx.reference, &samples),
                    table.memo.evals_for(b),
                    table.is_full(b) && ctx.in_range(b),
                )
            })
            .collect();
        let mut cands: Vec<Candidate> = data
            .par_iter()
            .map(|(b, s, r, calls, finalist)| Candidate {
                boundary: *b,
                score: mean(s),
                ci: paired_bootstrap_ci(s, r, self.bootstrap_resamples, mix(&[self.seed, 0xC1, *b as u64])),
                lora_params_kept: kept[*b],
                scorer_calls: *calls,
                samples: s.len(),
                finalist: *finalist,
            })
            .collect();
        cands.sort_by_key(|c| c.boundary);
        let reference = cands.iter().find(|c| c.boundary == ctx.reference).cloned().unwrap_or_else(|| Candidate {
            // ok: the reference is always in `boundaries`; this fallback is never taken.
            boundary: ctx.reference,
            score: mean(&ref_scores),
            ci: [0.0, 0.0],
            lora_params_kept: 100.0,
            scorer_calls: 0,
            samples: ref_scores.len(),
            finalist: false,
        });
        cands.retain(|c| ctx.in_range(c.boundary));
        let calls = table.memo.sample_evals();
        Ok(SearchReport {
            boundary: chosen,
            strategy: self.strategy,
            scorer_calls: calls,
            full_evaluations: calls as f64 / table.n as f64,
            proxy_calls,
            n_samples: table.n,
            num_layers: self.num_layers,
            range: [ctx.lo, ctx.hi],
            seed: self.seed,
            epsilon: self.epsilon,
            tie_rule: self.tie_rule,
            best,
            reference,
            candidates: cands,
            proxy_ranking,
        })
    }
}

/// `(boundary, its scores, reference scores on the same samples, scorer calls, finalist)`.
type PairedData = (usize, Vec<f64>, Vec<f64>, usize, bool);

/// Immutable per-run context.
struct Ctx<'a> {
    lo: usize,
    hi: usize,
    reference: usize,
    order: &'a [usize],
}

impl Ctx<'_> {
    fn in_range(&self, b: usize) -> bool {
        (self.lo..=self.hi).contains(&b)
    }
}

/// Memo plus the record of which samples each boundary has been evaluated on.
struct Table<'a> {
    memo: Memo<&'a mut dyn Scorer>,
    n: usize,
    seen: BTreeMap<usize, (Vec<bool>, usize)>,
}

impl<'a> Table<'a> {
    fn new(memo: Memo<&'a mut dyn Scorer>, n: usize) -> Self {
        Table { memo, n, seen: BTreeMap::new() }
    }

    fn eval(&mut self, b: usize, samples: &[usize]) -> Result<(), SearchError> {
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

    fn count(&self, b: usize) -> usize {
        self.seen.get(&b).map_or(0, |e| e.1)
    }

    fn is_full(&self, b: usize) -> bool {
        self.count(b) == self.n
    }

    /// Samples `b` was evaluated on, in `order`.
    fn samples_of(&self, b: usize, order: &[usize]) -> Vec<usize> {
        match self.seen.get(&b) {
            Some((flags, _)) => order.iter().copied().filter(|&s| flags[s]).collect(),
            None => Vec::new(),
        }
    }

    /// Cached scores of `b` on `samples` (samples not evaluated are skipped).
    fn scores(&self, b: usize, samples: &[usize]) -> Vec<f64> {
        samples.iter().filter_map(|&s| self.memo.cached(b, s)).collect()
    }

    fn scores_on(&self, pool: &[usize], samples: &[usize]) -> Vec<(usize, Vec<f64>)> {
        pool.iter().map(|&b| (b, self.scores(b, samples))).collect()
    }
}

/// The budget in sample evaluations: `⌊budget · n⌋`.
fn budget_limit(budget: f64, n: usize) -> usize {
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
fn best_of(means: &[(usize, f64)]) -> Option<(usize, f64)> {
    let mut best: Option<(usize, f64)> = None;
    for &(b, m) in means {
        best = match best {
            Some((bb, bm)) if bm > m || (bm == m && bb < b) => Some((bb, bm)),
            _ => Some((b, m)),
        };
    }
    best
}

/// Which real evaluations [`Strategy::ProxyFirst`] makes after ranking by the proxy.
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
/// and `se_b` their mean and standard error, and `K` candidates:
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
fn plateau(scored: &[(usize, Vec<f64>)], z: f64, rho: f64, k: usize) -> (Vec<bool>, Plan) {
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
    let allowance = (2.0 * (scored.len().max(1) as f64).ln()).sqrt();
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
        let (flags, plan) = plateau(&scored, 2.0, 0.1, 2);
        assert_eq!(flags, vec![false, true, true, true, false]);
        assert_eq!(plan, Plan::Bisect { lo: 1, hi: 2 });
        // No practical margin: only the statistical edge.
        let (flags, plan) = plateau(&scored, 2.0, 0.0, 2);
        assert_eq!(flags, vec![false, false, true, true, false]);
        assert_eq!(plan, Plan::Bisect { lo: 2, hi: 2 });
        // A flat proxy (differences of the order of their noise): the wide band, smallest first.
        let flat: Vec<(usize, Vec<f64>)> =
            (0..4).map(|b| (b, with(&|i| 0.001 * b as f64 + 0.004 * ((i * 7 + b * 13) % 5) as f64))).collect();
        let (flags, plan) = plateau(&flat, 2.0, 0.1, 2);
        assert_eq!(flags, vec![true; 4]);
        assert_eq!(plan, Plan::Evaluate(vec![0, 1]));
        assert_eq!(plateau(&[], 2.0, 0.1, 2), (Vec::new(), Plan::Evaluate(Vec::new())));
    }

    #[test]
    fn best_of_ties_go_small() {
        assert_eq!(best_of(&[(3, 1.0), (1, 1.0), (2, 0.5)]), Some((1, 1.0)));
        assert_eq!(best_of(&[]), None);
    }

    #[test]
    fn parse_range_and_strategy() {
        assert_eq!(parse_range(" 3 - 7 ").unwrap(), (3, 7));
        assert_eq!(parse_range("7-3"), Err(SearchError::EmptyRange { lo: 7, hi: 3 }));
        assert!(matches!(parse_range("a-b"), Err(SearchError::BadRange(_))));
        for s in Strategy::ALL {
            assert_eq!(s.name().parse::<Strategy>().unwrap(), s);
            assert_eq!(s.to_string(), s.name());
        }
        assert_eq!(Strategy::default(), Strategy::Halving);
    }
}
