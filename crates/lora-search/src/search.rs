//! Automated boundary search: strategies, selection rule and report.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;
use serde::Serialize;

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
    /// Successive halving over samples (the default): all candidates start on a small
    /// seeded subset; each round keeps `⌈k/η⌉` of them (η = 2 by default) and grows the
    /// subset, until one candidate remains on all samples; it and the full-LoRA reference
    /// are the finalists. The subset schedule is sized to a budget of
    /// full-validation-evaluation equivalents (default 3).
    #[default]
    Halving,
    /// Rank every candidate by a cheap proxy scorer on all samples, then evaluate only a
    /// short list (default 2, plus the full-LoRA reference) with the real scorer.
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
    /// assert_eq!("coarse-to-fine".parse::<Strategy>().unwrap(), Strategy::CoarseToFine);
    /// assert!("greedy".parse::<Strategy>().is_err());
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
/// assert_eq!(lora_search::parse_range("4-20").unwrap(), (4, 20));
/// assert!(lora_search::parse_range("20").is_err());
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
    /// Whether it was evaluated on every sample and hence eligible for selection.
    pub finalist: bool,
}

/// A candidate's proxy score (strategy `proxy-first` only).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyScore {
    /// Keep-through boundary `b`.
    pub boundary: usize,
    /// Mean proxy score over all samples.
    pub score: f64,
    /// Whether it made the short list evaluated with the real scorer.
    pub shortlisted: bool,
}

/// The outcome of [`BoundarySearch::run`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchReport {
    /// The selected boundary (keep-through `b`).
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
///
/// // 12 layers; quality jumps once LoRA is kept through block 5.
/// let mut scorer = FnScorer::new(|b, i| Ok(if b >= 5 { 0.8 } else { 0.3 } + (i % 3) as f64 * 0.01));
/// let report = BoundarySearch::new(12)
///     .strategy(Strategy::Exhaustive)
///     .seed(7)
///     .run(&mut scorer, 40)
///     .unwrap();
/// assert_eq!(report.boundary, 5);
/// assert_eq!(report.scorer_calls, 12 * 40);
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
}

/// Default tie tolerance ε (scores are assumed to be on a 0–1 scale).
pub const DEFAULT_EPSILON: f64 = 0.01;
/// Default number of bootstrap resamples.
pub const DEFAULT_RESAMPLES: usize = 1000;
/// Default budget of the halving strategy, in full validation evaluations.
pub const DEFAULT_BUDGET: f64 = 3.0;

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

    /// Elimination factor η ≥ 2 of [`Strategy::Halving`]: each round keeps `⌈k/η⌉`
    /// (default 2).
    pub fn eta(mut self, eta: usize) -> Self {
        self.eta = eta;
        self
    }

    /// Budget of [`Strategy::Halving`] in full validation evaluations (≥ 1, default 3).
    pub fn budget(mut self, budget: f64) -> Self {
        self.budget = budget;
        self
    }

    /// Smallest sample subset of a halving round (≥ 1, default 2).
    pub fn min_samples(mut self, n: usize) -> Self {
        self.min_samples = n;
        self
    }

    /// Short-list length of [`Strategy::ProxyFirst`] (≥ 1, default 2; the full-LoRA
    /// reference is evaluated in addition).
    pub fn shortlist(mut self, k: usize) -> Self {
        self.shortlist = k;
        self
    }

    /// Width `z` (in standard errors) of the contention margin used when halving and
    /// proxy-first prune candidates (≥ 0, default 2).
    pub fn z(mut self, z: f64) -> Self {
        self.z = z;
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
        match self.strategy {
            Strategy::Exhaustive => {
                table.eval(reference, &order)?;
                for b in lo..=hi {
                    table.eval(b, &order)?;
                }
            }
            Strategy::CoarseToFine => self.coarse_to_fine(&ctx, &mut table)?,
            Strategy::Halving => self.halving(&ctx, &mut table)?,
            Strategy::ProxyFirst => {
                let p = proxy.ok_or(SearchError::MissingProxy)?;
                let (ranking, calls) = self.proxy_first(&ctx, p, &mut table)?;
                proxy_ranking = ranking;
                proxy_calls = calls;
            }
        }
        self.report(&ctx, &table, &kept, proxy_ranking, proxy_calls)
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

    fn halving(&self, ctx: &Ctx<'_>, table: &mut Table<'_>) -> Result<(), SearchError> {
        let n = table.n;
        let mut survivors: Vec<usize> = (ctx.lo..=ctx.hi).filter(|&b| b != ctx.reference).collect();
        let plan = halving_plan(survivors.len(), n, self.eta, self.budget, self.min_samples);
        if survivors.is_empty() {
            return table.eval(ctx.reference, ctx.order);
        }
        let rounds = plan.samples.len();
        for r in 0..rounds {
            let m = plan.samples[r];
            let prefix = &ctx.order[..m];
            table.eval(ctx.reference, prefix)?;
            for &b in &survivors {
                table.eval(b, prefix)?;
            }
            if r + 1 == rounds {
                break;
            }
            let keep = plan.survivors[r + 1];
            let mut pool: Vec<usize> = survivors.clone();
            if ctx.in_range(ctx.reference) {
                pool.push(ctx.reference);
            }
            let scored = table.scores_on(&pool, prefix);
            survivors = shortlist(&scored, ctx.reference, self.epsilon, self.z, keep);
        }
        Ok(())
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
        // The proxy has its own scale, so ε does not apply; proxy means within z standard
        // errors count as tied, which keeps the low end of a proxy plateau on the list.
        let proxy_tie = self.z * pooled_se(&scored);
        let list = shortlist(&scored, ctx.reference, proxy_tie, self.z, self.shortlist);
        table.eval(ctx.reference, ctx.order)?;
        for &b in &list {
            table.eval(b, ctx.order)?;
        }
        let ranking = scored
            .iter()
            .map(|(b, s)| ProxyScore { boundary: *b, score: mean(s), shortlisted: list.contains(b) })
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
    ) -> Result<SearchReport, SearchError> {
        let (chosen, best) = self.select_full(ctx, table)?;
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

/// The planned schedule of a halving run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HalvingPlan {
    /// Candidates alive in each round (the reference is extra).
    pub survivors: Vec<usize>,
    /// Sample-prefix length of each round.
    pub samples: Vec<usize>,
    /// Planned sample evaluations, including the reference on all samples.
    pub cost: usize,
}

/// Plans successive halving for `k` non-reference candidates on `n` samples.
///
/// Survivors: `k_0 = k`, `k_{r+1} = ⌈k_r / η⌉` until 1 (rounds `0..=R`). Samples:
/// `n_r = clamp(⌈n / g^{R−r}⌉, min(min_samples, n), n)` (made non-decreasing), `n_R = n`.
/// Cost: `n + Σ_r k_r (n_r − n_{r−1})` (the reference is evaluated on every sample; memoised
/// samples are not paid twice). The growth `g ≥ 1` is the smallest (by bisection) whose
/// cost fits `budget · n`; if none fits, the largest useful `g` (first subset at the floor).
pub(crate) fn halving_plan(k: usize, n: usize, eta: usize, budget: f64, min_samples: usize) -> HalvingPlan {
    let mut survivors = vec![k];
    while let Some(&last) = survivors.last() {
        if last <= 1 {
            break;
        }
        survivors.push(last.div_ceil(eta.max(2)));
    }
    let r_max = survivors.len() - 1;
    let schedule = |g: f64| -> Vec<usize> {
        let floor = min_samples.clamp(1, n.max(1));
        let mut prev = 0;
        (0..=r_max)
            .map(|r| {
                let raw = (n as f64 / g.powi((r_max - r) as i32)).ceil() as usize;
                let m = if r == r_max { n } else { raw.clamp(floor, n) };
                let m = m.max(prev);
                prev = m;
                m
            })
            .collect()
    };
    let cost_of = |s: &[usize]| -> usize {
        let mut prev = 0;
        let mut c = n;
        for (kr, &m) in survivors.iter().zip(s) {
            c += kr * (m - prev);
            prev = m;
        }
        c
    };
    let limit = budget * n as f64;
    let g_max = if r_max == 0 { 1.0 } else { (n.max(2) as f64).powf(1.0 / r_max as f64).max(1.0) };
    let g = if cost_of(&schedule(1.0)) as f64 <= limit {
        1.0
    } else if cost_of(&schedule(g_max)) as f64 > limit {
        g_max
    } else {
        let (mut a, mut b) = (1.0, g_max);
        for _ in 0..60 {
            let mid = 0.5 * (a + b);
            if cost_of(&schedule(mid)) as f64 <= limit {
                b = mid;
            } else {
                a = mid;
            }
        }
        b
    };
    let samples = schedule(g);
    let cost = cost_of(&samples);
    HalvingPlan { survivors, samples, cost }
}

/// Pooled standard error of paired differences to the best-scoring entry of `scored`.
///
/// `SE = sqrt(mean_b var(s_b − s_best) / m)` over the `m` common samples; 0 when `m < 2`.
fn pooled_se(scored: &[(usize, Vec<f64>)]) -> f64 {
    let means: Vec<(usize, f64)> = scored.iter().map(|(b, s)| (*b, mean(s))).collect();
    let Some((best, _)) = best_of(&means) else {
        return 0.0;
    };
    let Some((_, bs)) = scored.iter().find(|(b, _)| *b == best) else {
        return 0.0;
    };
    let vars: Vec<f64> = scored
        .iter()
        .filter(|(b, _)| *b != best)
        .filter_map(|(_, s)| {
            let d: Vec<f64> = s.iter().zip(bs).map(|(x, y)| x - y).collect();
            variance(&d)
        })
        .collect();
    if vars.is_empty() {
        return 0.0;
    }
    let m = bs.len().max(1) as f64;
    (mean(&vars) / m).sqrt()
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

/// Keeps `k` of the non-reference candidates of `scored`; the reference, if present,
/// only raises the bar.
///
/// With `s` the pooled SE of paired differences, `K = |scored|` and the multiplicity
/// allowance `a = sqrt(2 ln K) · s` (the expected excess of the largest of `K` noisy means):
/// the debiased top level is `T = max mean − a`; the plug-in choice `ĉ` is the smallest
/// non-reference boundary with `mean ≥ T − ε`; contenders have `mean ≥ max − ε − a − z·s`.
/// Preference order: `ĉ`; the best non-reference candidate when `k ≥ 4`; contenders by
/// distance to `ĉ` (ties to the smaller boundary); the rest by descending mean. Returned
/// ascending.
fn shortlist(scored: &[(usize, Vec<f64>)], reference: usize, epsilon: f64, z: f64, k: usize) -> Vec<usize> {
    let means: Vec<(usize, f64)> = scored.iter().map(|(b, s)| (*b, mean(s))).collect();
    let Some((_, top)) = best_of(&means) else {
        return Vec::new();
    };
    let se = pooled_se(scored);
    let kk = means.len().max(1) as f64;
    let allowance = (2.0 * kk.ln()).max(0.0).sqrt() * se;
    let level = top - allowance;
    let others: Vec<(usize, f64)> = means.iter().copied().filter(|(b, _)| *b != reference).collect();
    let Some(best) = best_of(&others) else {
        return Vec::new();
    };
    let c_hat = others.iter().filter(|(_, m)| *m >= level - epsilon).map(|(b, _)| *b).min().unwrap_or(best.0);
    let bar = top - epsilon - allowance - z * se;
    let mut contention: Vec<usize> = others.iter().filter(|(_, m)| *m >= bar).map(|(b, _)| *b).collect();
    contention.sort_by_key(|&b| (b.abs_diff(c_hat), b));
    let mut rest: Vec<(usize, f64)> = others.iter().copied().filter(|(b, _)| !contention.contains(b)).collect();
    rest.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    let mut order: Vec<usize> = vec![c_hat];
    if k >= 4 {
        order.push(best.0);
    }
    order.extend(contention.iter().copied());
    order.extend(rest.iter().map(|(b, _)| *b));
    let mut out: Vec<usize> = Vec::new();
    for b in order {
        if out.len() == k {
            break;
        }
        if !out.contains(&b) {
            out.push(b);
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_fits_budget_for_30_layers() {
        // The smallest validation set for which the default plan fits 3 full evaluations.
        let first_fit =
            (2..2000).find(|&n| (n..n + 200).all(|m| halving_plan(29, m, 2, 3.0, 2).cost <= 3 * m)).unwrap();
        assert_eq!(first_fit, 206);
        println!("L=30: default plan fits 3 full evaluations for every n >= {first_fit}");
        for n in [206, 256, 500, 1000] {
            let p = halving_plan(29, n, 2, 3.0, 2);
            assert_eq!(p.survivors, vec![29, 15, 8, 4, 2, 1]);
            let p3 = halving_plan(29, n, 3, 3.0, 2);
            assert_eq!(p3.survivors, vec![29, 10, 4, 2, 1]);
            assert!(p3.cost as f64 <= 3.0 * n as f64);
            assert_eq!(*p.samples.last().unwrap(), n);
            assert!(p.cost as f64 <= 3.0 * n as f64, "n={n}: {p:?}");
            assert!(p.samples.windows(2).all(|w| w[0] <= w[1]));
        }
        // Tiny candidate sets: everything on all samples when it fits.
        let p = halving_plan(1, 50, 3, 3.0, 2);
        assert_eq!(p.samples, vec![50]);
        assert_eq!(p.cost, 100);
    }

    #[test]
    fn shortlist_keeps_plug_in_choice_and_neighbours() {
        // Noise-free scores: SE = 0, so the allowance and margin are just epsilon.
        let s = |b: usize, m: f64| (b, vec![m, m]);
        let scored = vec![s(1, 0.1), s(2, 0.5), s(3, 0.79), s(4, 0.8), s(5, 0.78), s(9, 0.81)];
        assert_eq!(shortlist(&scored, 9, 0.05, 2.0, 1), vec![3]);
        assert_eq!(shortlist(&scored, 9, 0.05, 2.0, 2), vec![3, 4]);
        assert_eq!(shortlist(&scored, 9, 0.05, 2.0, 4), vec![2, 3, 4, 5]);
        assert_eq!(shortlist(&scored, 9, 0.0, 2.0, 1), vec![4]);
        assert_eq!(shortlist(&scored, 9, 0.0, 2.0, 0), Vec::<usize>::new());
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
