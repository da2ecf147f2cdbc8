//! Cost, agreement and time of the search strategies against exhaustive search on a
//! synthetic scorer with L = 30 layers and 256 validation samples.
//!
//! Besides criterion's timings, the bench prints, for the ramp profile (the hardest suite:
//! the step from boundary 17 to 18 is exactly 2ε), each strategy's scorer cost in full
//! validation evaluations, its ratio to exhaustive search (the number that matters when each
//! evaluation is a model generation pass) and its agreement with exhaustive search over
//! `AGREEMENT_SEEDS` seeds.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use lora_search::synthetic::{Profile, SyntheticScorer};
use lora_search::{BoundarySearch, SearchReport, Strategy};

const L: usize = 30;
const N: usize = 256;
const AGREEMENT_SEEDS: u64 = 50;

fn run(strategy: Strategy, seed: u64, resamples: usize) -> SearchReport {
    let means = Profile::Ramp { start: 8, end: 18, low: 0.2, high: 0.8 }.means(L);
    let mut real = SyntheticScorer::new(means.clone(), 0.08, 0.1, seed);
    let mut proxy = SyntheticScorer::new(means.iter().map(|m| 2.0 * m - 3.0).collect(), 0.1, 0.2, seed + 1);
    let search = BoundarySearch::new(L).strategy(strategy).epsilon(0.03).seed(seed).bootstrap_resamples(resamples);
    match search.run_with_proxy(&mut proxy, &mut real, N) {
        Ok(r) => r,
        Err(e) => panic!("search failed: {e}"),
    }
}

fn bench(c: &mut Criterion) {
    let exhaustive: Vec<SearchReport> = (0..AGREEMENT_SEEDS).map(|s| run(Strategy::Exhaustive, s, 1)).collect();
    eprintln!(
        "L={L}, n={N}, ramp profile, {AGREEMENT_SEEDS} seeds; cost in full validation evaluations \
         (ratio to exhaustive) and agreement with exhaustive:"
    );
    for st in Strategy::ALL {
        let reports: Vec<SearchReport> = (0..AGREEMENT_SEEDS).map(|s| run(st, s, 1)).collect();
        let agree = reports.iter().zip(&exhaustive).filter(|(r, e)| r.boundary == e.boundary).count();
        let calls: usize = reports.iter().map(|r| r.scorer_calls).sum();
        let ex_calls: usize = exhaustive.iter().map(|r| r.scorer_calls).sum();
        let max = reports.iter().map(|r| r.full_evaluations).fold(0.0, f64::max);
        let proxy: usize = reports.iter().map(|r| r.proxy_calls).sum();
        eprintln!(
            "  {:15} full evals {:6.2} (max {:5.2})  ratio {:.3}  agree {agree}/{AGREEMENT_SEEDS}  proxy calls/run {}",
            st.name(),
            calls as f64 / (N as f64 * AGREEMENT_SEEDS as f64),
            max,
            calls as f64 / ex_calls as f64,
            proxy / AGREEMENT_SEEDS as usize
        );
    }
    let mut g = c.benchmark_group("search_l30_n256");
    g.sample_size(10);
    for st in Strategy::ALL {
        g.bench_function(st.name(), |b| b.iter(|| black_box(run(st, 0, 1000)).boundary));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
