//! Cost and time of the search strategies against exhaustive search on a synthetic
//! scorer with L = 30 layers and 256 validation samples.
//!
//! Besides criterion's timings, the bench prints the scorer cost of each strategy in full
//! validation evaluations and as a ratio to exhaustive search (the number that matters when
//! each evaluation is a model generation pass).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use lora_search::synthetic::{Profile, SyntheticScorer};
use lora_search::{BoundarySearch, SearchReport, Strategy};

const L: usize = 30;
const N: usize = 256;

fn run(strategy: Strategy, seed: u64) -> SearchReport {
    let means = Profile::Ramp { start: 8, end: 18, low: 0.2, high: 0.8 }.means(L);
    let mut real = SyntheticScorer::new(means.clone(), 0.08, 0.1, seed);
    let mut proxy = SyntheticScorer::new(means.iter().map(|m| 2.0 * m - 3.0).collect(), 0.1, 0.2, seed + 1);
    let search = BoundarySearch::new(L).strategy(strategy).epsilon(0.03).seed(seed).bootstrap_resamples(1000);
    match search.run_with_proxy(&mut proxy, &mut real, N) {
        Ok(r) => r,
        Err(e) => panic!("search failed: {e}"),
    }
}

fn bench(c: &mut Criterion) {
    let exhaustive = run(Strategy::Exhaustive, 0);
    eprintln!("L={L}, n={N}, ramp profile; cost in full validation evaluations (ratio to exhaustive):");
    for st in Strategy::ALL {
        let r = run(st, 0);
        eprintln!(
            "  {:15} boundary {:2}  scorer calls {:5}  full evals {:6.2}  ratio {:.3}  proxy calls {}",
            st.name(),
            r.boundary,
            r.scorer_calls,
            r.full_evaluations,
            r.scorer_calls as f64 / exhaustive.scorer_calls as f64,
            r.proxy_calls
        );
    }
    let mut g = c.benchmark_group("search_l30_n256");
    g.sample_size(10);
    for st in Strategy::ALL {
        g.bench_function(st.name(), |b| b.iter(|| black_box(run(st, 0)).boundary));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
