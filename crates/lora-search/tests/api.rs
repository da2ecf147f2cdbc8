//! Error cases, JSON shape, parameter accounting and memoisation.

use lora_search::synthetic::{Profile, SyntheticScorer};
use lora_search::{BoundarySearch, FnScorer, Memo, Scorer, SearchError, Strategy};

fn step(l: usize) -> SyntheticScorer {
    SyntheticScorer::new(Profile::Step { at: l / 2, low: 0.2, high: 0.9 }.means(l), 0.05, 0.05, 1)
}

#[test]
fn empty_samples_and_ranges_are_errors_for_every_strategy() {
    for st in Strategy::ALL {
        let s = BoundarySearch::new(8).strategy(st);
        let mut sc = step(8);
        let mut px = step(8);
        assert_eq!(s.run_with_proxy(&mut px, &mut sc, 0), Err(SearchError::EmptySamples));
        assert_eq!(
            s.clone().range(5, 2).run_with_proxy(&mut px, &mut sc, 10),
            Err(SearchError::EmptyRange { lo: 5, hi: 2 })
        );
        assert_eq!(
            s.clone().range(2, 8).run_with_proxy(&mut px, &mut sc, 10),
            Err(SearchError::RangeOutOfBounds { lo: 2, hi: 8, num_layers: 8 })
        );
        assert_eq!(
            BoundarySearch::new(0).strategy(st).run_with_proxy(&mut px, &mut sc, 10),
            Err(SearchError::ZeroLayers)
        );
    }
    let mut sc = step(8);
    assert_eq!(BoundarySearch::new(8).strategy(Strategy::ProxyFirst).run(&mut sc, 10), Err(SearchError::MissingProxy));
}

#[test]
fn bad_configuration_is_an_error() {
    let mut sc = step(8);
    let base = BoundarySearch::new(8);
    let cases = [
        base.clone().epsilon(-1.0),
        base.clone().epsilon(f64::NAN),
        base.clone().bootstrap_resamples(0),
        base.clone().stride(0),
        base.clone().eta(1),
        base.clone().budget(0.5),
        base.clone().min_samples(0),
        base.clone().shortlist(0),
        base.clone().proxy_stride(0),
        base.clone().z(-1.0),
        base.clone().param_counts(vec![1.0; 8].into_iter().map(|_| -1.0).collect()),
    ];
    for c in cases {
        assert!(matches!(c.run(&mut sc, 10), Err(SearchError::InvalidConfig { .. })), "{c:?}");
    }
    assert_eq!(
        base.clone().param_counts(vec![1.0; 3]).run(&mut sc, 10),
        Err(SearchError::ParamCountLength { expected: 8, got: 3 })
    );
    assert_eq!(base.param_counts(vec![0.0; 8]).run(&mut sc, 10), Err(SearchError::ZeroParams));
}

#[test]
fn scorer_failures_propagate() {
    let mut short = FnScorer::new(|b, _| {
        if b == 3 {
            Err(SearchError::Scorer { boundary: b, message: "model exploded".into() })
        } else {
            Ok(1.0)
        }
    });
    let r = BoundarySearch::new(6).strategy(Strategy::Exhaustive).run(&mut short, 4);
    assert!(matches!(r, Err(SearchError::Scorer { boundary: 3, .. })));
    let mut nan = FnScorer::new(|_, _| Ok(f64::INFINITY));
    let r = BoundarySearch::new(6).run(&mut nan, 4);
    assert!(matches!(r, Err(SearchError::NonFiniteScore { .. })));
    struct Wrong;
    impl Scorer for Wrong {
        fn score(&mut self, _: usize, _: &[usize]) -> Result<Vec<f64>, SearchError> {
            Ok(vec![])
        }
    }
    let r = BoundarySearch::new(6).run(&mut Wrong, 4);
    assert!(matches!(r, Err(SearchError::ScoreCount { got: 0, .. })));
}

#[test]
fn report_json_has_the_cli_fields() {
    let mut sc = step(12);
    let r = BoundarySearch::new(12).seed(3).epsilon(0.05).run(&mut sc, 64).unwrap();
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j["boundary"], 6);
    assert_eq!(j["strategy"], "halving");
    assert_eq!(j["scorer_calls"].as_u64().unwrap() as usize, r.scorer_calls);
    let c = &j["candidates"][0];
    for key in ["boundary", "score", "ci", "lora_params_kept"] {
        assert!(!c[key].is_null(), "{key}");
    }
    assert_eq!(c["ci"].as_array().unwrap().len(), 2);
    assert!(j.get("proxy_ranking").is_none());
    // Proxy-first adds the proxy ranking.
    let mut px = step(12);
    let r = BoundarySearch::new(12).strategy(Strategy::ProxyFirst).run_with_proxy(&mut px, &mut sc, 64).unwrap();
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j["strategy"], "proxy-first");
    // The proxy scores every other boundary from the top (stride round(√12 / 2) = 2) and the bottom one, then
    // the step's lower side (6, next to the plateau's edge 7) and the best's upper neighbour (10).
    let ranked: Vec<usize> = r.proxy_ranking.iter().map(|p| p.boundary).collect();
    assert_eq!(ranked, vec![0, 1, 3, 5, 6, 7, 9, 10, 11]);
    assert_eq!(j["proxy_ranking"].as_array().unwrap().len(), 9);
    assert_eq!(r.proxy_calls, 9 * 64);
    // A clear step: both plateau edges sit on it, so one real evaluation besides full LoRA.
    assert_eq!(r.scorer_calls, 2 * 64);
}

#[test]
fn lora_params_kept_follows_counts() {
    let mut sc = step(4);
    let r = BoundarySearch::new(4).strategy(Strategy::Exhaustive).run(&mut sc, 8).unwrap();
    let kept: Vec<f64> = r.candidates.iter().map(|c| c.lora_params_kept).collect();
    assert_eq!(kept, vec![25.0, 50.0, 75.0, 100.0]);
    let r = BoundarySearch::new(4)
        .strategy(Strategy::Exhaustive)
        .param_counts(vec![1.0, 1.0, 2.0, 4.0])
        .run(&mut sc, 8)
        .unwrap();
    let kept: Vec<f64> = r.candidates.iter().map(|c| c.lora_params_kept).collect();
    assert_eq!(kept, vec![12.5, 25.0, 50.0, 100.0]);
    assert_eq!(r.reference.ci, [0.0, 0.0]);
    assert_eq!(r.reference.lora_params_kept, 100.0);
}

#[test]
fn ci_is_of_the_difference_to_full_lora() {
    // Deterministic scores: boundary b scores b/10 on every sample; full LoRA (b=4) 0.4.
    let mut sc = FnScorer::new(|b, _| Ok(b as f64 / 10.0));
    let r = BoundarySearch::new(5).strategy(Strategy::Exhaustive).epsilon(0.0).run(&mut sc, 6).unwrap();
    let c = r.candidate(1).unwrap();
    assert!((c.score - 0.1).abs() < 1e-12);
    assert!((c.ci[0] + 0.3).abs() < 1e-12 && (c.ci[1] + 0.3).abs() < 1e-12);
    assert_eq!(r.boundary, 4);
    assert_eq!(r.best, 4);
    assert_eq!(r.full_evaluations, 5.0);
}

#[test]
fn shared_memo_spans_runs() {
    let mut memo = Memo::new(step(10), 32);
    let s = BoundarySearch::new(10).strategy(Strategy::Exhaustive);
    let a = s.run(&mut memo, 32).unwrap();
    let after_first = memo.sample_evals();
    assert_eq!(after_first, 10 * 32);
    let b = s.clone().strategy(Strategy::CoarseToFine).run(&mut memo, 32).unwrap();
    assert_eq!(memo.sample_evals(), after_first, "second run is served from the shared memo");
    assert_eq!(a.boundary, b.boundary);
}

#[test]
fn single_candidate_range() {
    let mut sc = step(6);
    for st in [Strategy::Exhaustive, Strategy::CoarseToFine, Strategy::Halving] {
        let r = BoundarySearch::new(6).strategy(st).range(5, 5).run(&mut sc, 7).unwrap();
        assert_eq!(r.boundary, 5);
        assert_eq!(r.scorer_calls, 7);
        let r = BoundarySearch::new(6).strategy(st).range(2, 2).run(&mut sc, 7).unwrap();
        assert_eq!(r.boundary, 2);
        assert_eq!(r.scorer_calls, 14);
    }
    let r = BoundarySearch::new(1).run(&mut step(1), 3).unwrap();
    assert_eq!(r.boundary, 0);
}

/// Proxy-first on a small validation set whose per-sample difficulty varies a lot (the
/// quickstart's situation: 16 samples). The proxy plateaus from boundary 22; the short list
/// comes from paired differences to the proxy's best, so the per-sample spread does not
/// widen it to boundaries far below the plateau.
#[test]
fn proxy_shortlist_uses_paired_differences() {
    let l = 30;
    let proxy_means: Vec<f64> = (0..l).map(|b| if b >= 22 { -1.0 } else { -1.0 - 0.02 * (22 - b) as f64 }).collect();
    let mut proxy = SyntheticScorer::new(proxy_means, 0.01, 0.5, 5);
    let mut real = SyntheticScorer::new(Profile::Step { at: 22, low: 0.3, high: 0.8 }.means(l), 0.05, 0.1, 6);
    let r = BoundarySearch::new(l)
        .strategy(Strategy::ProxyFirst)
        .epsilon(0.05)
        .bootstrap_resamples(50)
        .run_with_proxy(&mut proxy, &mut real, 16)
        .unwrap();
    let tied: Vec<usize> = r.proxy_ranking.iter().filter(|p| p.indistinguishable).map(|p| p.boundary).collect();
    let listed: Vec<usize> = r.proxy_ranking.iter().filter(|p| p.shortlisted).map(|p| p.boundary).collect();
    assert!(tied.iter().all(|&b| b >= 20), "{tied:?}");
    assert_eq!(listed, tied.iter().copied().take(2).collect::<Vec<_>>());
    assert!(r.full_evaluations <= 3.0);
    assert_eq!(r.boundary, 22);
    // Each shortlisted boundary is also listed as indistinguishable in the JSON.
    let j = serde_json::to_value(&r).unwrap();
    assert!(j["proxy_ranking"].as_array().unwrap().iter().all(|p| p["indistinguishable"].is_boolean()));
    // Stride 1 scores every boundary with the proxy and makes the same choice.
    let all = BoundarySearch::new(l)
        .strategy(Strategy::ProxyFirst)
        .epsilon(0.05)
        .bootstrap_resamples(50)
        .proxy_stride(1)
        .run_with_proxy(&mut proxy, &mut real, 16)
        .unwrap();
    assert_eq!(all.proxy_ranking.len(), l);
    assert_eq!(all.boundary, r.boundary);
    assert!(r.proxy_ranking.len() < l / 2 + 4, "{} boundaries scored by the proxy", r.proxy_ranking.len());
}

/// Validation sets too small for the budget: every candidate still gets one sample, the
/// report shows the real cost, and nothing panics.
#[test]
fn halving_on_tiny_validation_sets_reports_its_real_cost() {
    for n in [1, 2, 5, 16] {
        let mut sc = SyntheticScorer::new(Profile::Step { at: 20, low: 0.2, high: 0.9 }.means(30), 0.05, 0.1, 2);
        let r = BoundarySearch::new(30).run(&mut sc, n).unwrap();
        assert!(r.boundary < 30);
        assert!(r.full_evaluations > 3.0, "n = {n}: {}", r.full_evaluations);
        assert!(r.candidates.iter().all(|c| c.samples >= 1));
        assert_eq!(r.reference.samples, n);
        if n == 16 {
            assert_eq!(r.scorer_calls, 16 + 29 + 15, "full LoRA, one sample each, the choice completed");
        }
    }
    // From n = 28 on (L = 30) the budget holds; with room to race, the step is found.
    for (n, want) in [(28, None), (64, Some(20)), (128, Some(20))] {
        let mut sc = SyntheticScorer::new(Profile::Step { at: 20, low: 0.2, high: 0.9 }.means(30), 0.05, 0.1, 2);
        let r = BoundarySearch::new(30).epsilon(0.05).run(&mut sc, n).unwrap();
        assert!(r.full_evaluations <= 3.0, "n = {n}: {}", r.full_evaluations);
        if let Some(b) = want {
            assert_eq!(r.boundary, b, "n = {n}");
        }
    }
}

/// Every budget above `2 + (K − 1)/n` (full LoRA, screening, completing the choice) is a hard
/// cap; below it the screening alone exceeds it and the report shows the real cost.
#[test]
fn halving_budget_is_a_hard_cap() {
    for budget in [2.2, 2.5, 3.0, 5.0] {
        let mut sc =
            SyntheticScorer::new(Profile::Ramp { start: 8, end: 18, low: 0.2, high: 0.8 }.means(30), 0.08, 0.1, 9);
        let r = BoundarySearch::new(30).budget(budget).epsilon(0.03).bootstrap_resamples(10).run(&mut sc, 256).unwrap();
        assert!(r.full_evaluations <= budget, "{budget}: {}", r.full_evaluations);
        assert!(r.candidates.iter().any(|c| c.boundary == r.boundary));
    }
    let mut sc = SyntheticScorer::new(Profile::Flat { level: 0.5 }.means(30), 0.08, 0.1, 9);
    let r = BoundarySearch::new(30).budget(1.5).bootstrap_resamples(10).run(&mut sc, 256).unwrap();
    assert_eq!(r.scorer_calls, 256 + 29 + 255, "full LoRA, one screening sample each, the choice completed");
}

/// A real-run shape that once fooled the default strategy: sparse 0/1 item scores (like F1 on closed-book QA),
/// 32 samples, 30 blocks, so screening sees one or two samples per candidate. Whatever it picks must not be
/// clearly worse than full LoRA on the full validation set.
#[test]
fn default_never_reports_a_boundary_clearly_worse_than_full_lora_on_sparse_scores() {
    let l = 30;
    let n = 32;
    // P(item solved) rises from 0.05 (b = 0) to 0.2 (b ≥ 16); full LoRA 0.18.
    let p = |b: usize| if b == l - 1 { 0.18 } else { 0.05 + 0.15 * (b.min(16) as f64 / 16.0) };
    for seed in 0..20u64 {
        let mut sc = FnScorer::new(|b: usize, i: usize| {
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (b as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
                ^ seed;
            let u = (h.wrapping_mul(0x94D0_49BB_1331_11EB) >> 11) as f64 / (1u64 << 53) as f64;
            Ok(if u < p(b) { 1.0 } else { 0.0 })
        });
        let r = BoundarySearch::new(l).seed(seed).run(&mut sc, n).unwrap();
        let chosen = r.candidate(r.boundary).expect("the chosen boundary is reported");
        assert!(
            chosen.score >= r.reference.score - 0.1 || chosen.samples < n,
            "seed {seed}: chose {} scoring {:.3} on all samples vs full {:.3}",
            r.boundary,
            chosen.score,
            r.reference.score
        );
        assert!(chosen.finalist || chosen.score >= r.reference.score - 0.1, "seed {seed}");
    }
}
