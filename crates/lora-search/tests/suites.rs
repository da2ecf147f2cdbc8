//! Synthetic suites with known optima: every strategy against exhaustive search.

use lora_search::synthetic::{expected_boundary, Profile, SyntheticScorer};
use lora_search::{BoundarySearch, SearchReport, Strategy, TieRule};

const L: usize = 30;
const N: usize = 256;

struct Suite {
    name: &'static str,
    profile: Profile,
    noise: f64,
    eps: f64,
}

fn suites() -> Vec<Suite> {
    vec![
        Suite { name: "step", profile: Profile::Step { at: 17, low: 0.3, high: 0.8 }, noise: 0.08, eps: 0.03 },
        Suite { name: "step-early", profile: Profile::Step { at: 4, low: 0.3, high: 0.8 }, noise: 0.08, eps: 0.03 },
        Suite {
            name: "ramp",
            profile: Profile::Ramp { start: 8, end: 18, low: 0.2, high: 0.8 },
            noise: 0.08,
            eps: 0.03,
        },
        Suite {
            name: "noisy-plateau",
            profile: Profile::NoisyPlateau { at: 11, low: 0.3, high: 0.8, wobble: 0.01 },
            noise: 0.15,
            eps: 0.05,
        },
        Suite {
            name: "multi-peak",
            profile: Profile::MultiPeak { base: 0.3, peaks: vec![(8, 0.3, 4), (20, 0.5, 4)] },
            noise: 0.08,
            eps: 0.03,
        },
        Suite { name: "flat", profile: Profile::Flat { level: 0.5 }, noise: 0.08, eps: 0.03 },
    ]
}

/// One search on a suite; `resamples` only affects the reported CIs, not the choice.
fn search_with(s: &Suite, strategy: Strategy, seed: u64, resamples: usize) -> SearchReport {
    let means = s.profile.means(L);
    let mut real = SyntheticScorer::new(means.clone(), s.noise, 0.1, seed);
    // Proxy: an affine, log-probability-like view of the same quality with its own noise.
    let pmeans: Vec<f64> = means.iter().map(|m| -3.0 + 2.0 * m).collect();
    let mut proxy = SyntheticScorer::new(pmeans, 0.1, 0.2, seed ^ 0xABCD);
    let search = BoundarySearch::new(L).strategy(strategy).epsilon(s.eps).seed(seed).bootstrap_resamples(resamples);
    match search.run_with_proxy(&mut proxy, &mut real, N) {
        Ok(r) => r,
        Err(e) => panic!("{} {strategy} seed {seed}: {e}", s.name),
    }
}

fn search(s: &Suite, strategy: Strategy, seed: u64) -> SearchReport {
    search_with(s, strategy, seed, 200)
}

#[test]
fn exhaustive_finds_known_optima() {
    for s in suites() {
        let expected = expected_boundary(&s.profile.means(L), 0, L - 1, s.eps);
        for seed in 0..6 {
            let r = search(&s, Strategy::Exhaustive, seed);
            assert_eq!(Some(r.boundary), expected, "{} seed {seed}", s.name);
            assert_eq!(r.scorer_calls, L * N);
            assert_eq!(r.full_evaluations, L as f64);
            assert_eq!(r.candidates.len(), L);
        }
    }
}

/// Coarse-to-fine and proxy-first agree with exhaustive search on every seed and cost less.
#[test]
fn coarse_to_fine_and_proxy_first_agree_with_exhaustive() {
    for s in suites() {
        for seed in 0..10 {
            let ex = search_with(&s, Strategy::Exhaustive, seed, 1);
            for st in [Strategy::CoarseToFine, Strategy::ProxyFirst] {
                let r = search_with(&s, st, seed, 1);
                assert!(r.scorer_calls < ex.scorer_calls, "{} {st}", s.name);
                assert_eq!(r.boundary, ex.boundary, "{} {st} seed {seed}", s.name);
            }
        }
    }
}

/// `(suite, seed, default strategy's boundary, exhaustive boundary, full evaluations)`.
type Run = (&'static str, u64, usize, usize, f64);

/// The default strategy against exhaustive search, 100 seeds per suite (600 runs): every
/// run costs at most 3 full validation evaluations, and the choices agree.
///
/// Exhaustive search applies the selection rule to 256-sample means, so its own choice is a
/// noisy plug-in decision (the tie margin ε is only about 4 paired standard errors); the
/// default strategy reproduces it from fewer samples on most candidates. It is a
/// statistical procedure and cannot match exhaustive search on every possible seed: over
/// 1000 seeds per suite it agrees on 99.4% of the runs (docs/search.md). On these 600 runs it
/// disagrees twice; the test fails if more than 1% of the runs disagree or any run exceeds
/// the budget.
#[test]
fn default_strategy_agrees_with_exhaustive_within_three_evaluations() {
    let seeds = 100;
    // One thread per suite (the runs are independent and deterministic).
    let per_suite: Vec<Vec<Run>> = std::thread::scope(|scope| {
        let handles: Vec<_> = suites()
            .into_iter()
            .map(|s| {
                scope.spawn(move || {
                    (0..seeds)
                        .map(|seed| {
                            let ex = search_with(&s, Strategy::Exhaustive, seed, 1);
                            let r = search_with(&s, Strategy::default(), seed, 1);
                            assert_eq!(r.scorer_calls as f64 / N as f64, r.full_evaluations);
                            (s.name, seed, r.boundary, ex.boundary, r.full_evaluations)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    let all: Vec<_> = per_suite.into_iter().flatten().collect();
    let runs = all.len();
    for (name, seed, _, _, cost) in &all {
        assert!(*cost <= 3.0, "{name} seed {seed}: {cost} full evaluations");
    }
    let misses: Vec<_> = all.iter().filter(|r| r.2 != r.3).map(|r| (r.0, r.1, r.2, r.3)).collect();
    println!(
        "default strategy: {} of {runs} runs agree with exhaustive; disagreements {misses:?}",
        runs - misses.len()
    );
    assert!(misses.len() * 100 <= runs, "{misses:?}");
}

#[test]
fn restricted_range_is_respected() {
    let s = &suites()[0]; // step at 17
    let means = s.profile.means(L);
    for st in Strategy::ALL {
        for (lo, hi) in [(0, 10), (5, 25), (20, 29), (12, 12)] {
            let mut real = SyntheticScorer::new(means.clone(), s.noise, 0.1, 3);
            let mut proxy = SyntheticScorer::new(means.clone(), s.noise, 0.1, 4);
            let r = BoundarySearch::new(L)
                .strategy(st)
                .range(lo, hi)
                .epsilon(s.eps)
                .bootstrap_resamples(100)
                .run_with_proxy(&mut proxy, &mut real, 128);
            let r = match r {
                Ok(r) => r,
                Err(e) => panic!("{st} {lo}-{hi}: {e}"),
            };
            let want = expected_boundary(&means, lo, hi, s.eps);
            assert_eq!(Some(r.boundary), want, "{st} {lo}-{hi}");
            assert!(r.candidates.iter().all(|c| (lo..=hi).contains(&c.boundary)));
            assert_eq!(r.reference.boundary, L - 1);
            assert_eq!(r.reference.samples, 128);
        }
    }
}

#[test]
fn bootstrap_tie_rule_prefers_smaller_boundary() {
    let s = &suites()[0];
    let means = s.profile.means(L);
    let mut real = SyntheticScorer::new(means, 0.08, 0.1, 11);
    let r = BoundarySearch::new(L)
        .strategy(Strategy::Exhaustive)
        .epsilon(0.0)
        .tie_rule(TieRule::BootstrapCi)
        .bootstrap_resamples(300)
        .run(&mut real, N);
    assert_eq!(r.map(|r| r.boundary), Ok(17));
}

/// Agreement rates and costs over many seeds (slow; run in release with `--ignored
/// --nocapture`; `SEEDS` and `FIRST_SEED` override the defaults 1000 and 0). The figures in
/// docs/search.md come from this test.
#[test]
#[ignore = "slow: run in release with --ignored --nocapture"]
fn agreement_rates_over_many_seeds() {
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (first, seeds) = (env("FIRST_SEED", 0), env("SEEDS", 1000));
    let mut totals = vec![(0usize, 0usize); 3];
    for s in suites() {
        let expected = expected_boundary(&s.profile.means(L), 0, L - 1, s.eps);
        let mut line = format!("{:14}", s.name);
        let ex: Vec<usize> =
            (first..first + seeds).map(|sd| search_with(&s, Strategy::Exhaustive, sd, 1).boundary).collect();
        let ok = ex.iter().filter(|&&b| Some(b) == expected).count();
        line += &format!(" exhaustive=known {ok}/{seeds}");
        for (k, st) in [Strategy::Halving, Strategy::CoarseToFine, Strategy::ProxyFirst].into_iter().enumerate() {
            let (mut agree, mut cost, mut max_cost) = (0, 0.0, 0.0f64);
            for (j, sd) in (first..first + seeds).enumerate() {
                let r = search_with(&s, st, sd, 1);
                agree += usize::from(r.boundary == ex[j]);
                cost += r.full_evaluations;
                max_cost = max_cost.max(r.full_evaluations);
            }
            totals[k].0 += agree;
            totals[k].1 += seeds as usize;
            line += &format!(" | {st}: {agree}/{seeds}, {:.3} (max {max_cost:.3}) full evals", cost / seeds as f64);
        }
        println!("{line}");
    }
    println!("totals (halving, coarse-to-fine, proxy-first): {totals:?}");
}
