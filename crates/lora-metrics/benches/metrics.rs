//! Criterion benchmark of the corpus metrics on 10k (prediction, references) pairs built from
//! SciTLDR (`../shared/data/scitldr`: every abstract sentence of test, dev, then train, scored against
//! the paper's TLDR targets), or on synthetic text when the data is absent.
//! `scripts/fixtures/metrics/time_reference.py` times the Python references on the same pairs.

use criterion::{criterion_group, criterion_main, Criterion};
use lora_metrics::{corpus_score, score_report, Metric, MetricGroup};
use std::hint::black_box;
use std::path::PathBuf;

const N: usize = 10_000;

fn scitldr_pairs() -> Option<(Vec<String>, Vec<Vec<String>>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/scitldr");
    let (mut preds, mut refs) = (Vec::new(), Vec::new());
    for split in ["test", "dev", "train"] {
        let text = std::fs::read_to_string(dir.join(format!("{split}.jsonl"))).ok()?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let targets: Vec<String> = serde_json::from_value(v["target"].clone()).ok()?;
            for s in v["source"].as_array()? {
                if preds.len() == N {
                    return Some((preds, refs));
                }
                preds.push(s.as_str()?.to_string());
                refs.push(targets.clone());
            }
        }
    }
    Some((preds, refs))
}

fn synthetic_pairs() -> (Vec<String>, Vec<Vec<String>>) {
    let words = [
        "we",
        "propose",
        "a",
        "novel",
        "method",
        "for",
        "training",
        "deep",
        "neural",
        "networks",
        "that",
        "improves",
        "generalization",
        "and",
        "robustness",
        "on",
        "benchmark",
        "datasets",
        "our",
        "results",
        "show",
        "significant",
        "gains",
        "over",
        "strong",
        "baselines",
    ];
    let mut x: u64 = 42;
    let mut next = || {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (x >> 33) as usize
    };
    let mut sent = |n: usize| (0..n).map(|_| words[next() % words.len()]).collect::<Vec<_>>().join(" ") + ".";
    let preds = (0..N).map(|_| sent(25)).collect();
    let refs = (0..N).map(|_| vec![sent(20), sent(20)]).collect();
    (preds, refs)
}

fn bench(c: &mut Criterion) {
    let (preds, refs) = scitldr_pairs().unwrap_or_else(synthetic_pairs);
    let mut g = c.benchmark_group("corpus_10k");
    g.sample_size(10);
    g.bench_function("rouge_4types_stemmer", |b| b.iter(|| black_box(score_report(MetricGroup::Rouge, &preds, &refs))));
    for m in [Metric::Bleu, Metric::Chrf, Metric::ChrfPlusPlus, Metric::Em, Metric::F1] {
        g.bench_function(m.name(), |b| b.iter(|| black_box(corpus_score(m, &preds, &refs))));
    }
    g.bench_function("sentence_bleu", |b| b.iter(|| black_box(lora_metrics::item_scores(Metric::Bleu, &preds, &refs))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
