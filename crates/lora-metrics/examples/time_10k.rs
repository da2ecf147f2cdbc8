//! One timed run of each corpus metric on the 10k SciTLDR benchmark pairs (the pairs of
//! `benches/metrics.rs` and `scripts/fixtures/metrics/time_reference.py`), printing wall time and
//! process CPU time. `cargo run --release -p lora-metrics --example time_10k`.

use lora_metrics::{corpus_score, score_report, Metric, MetricGroup};
use std::path::PathBuf;
use std::time::Instant;

fn pairs() -> Option<(Vec<String>, Vec<Vec<String>>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/scitldr");
    let (mut preds, mut refs) = (Vec::new(), Vec::new());
    for split in ["test", "dev", "train"] {
        let text = std::fs::read_to_string(dir.join(format!("{split}.jsonl"))).ok()?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let targets: Vec<String> = serde_json::from_value(v["target"].clone()).ok()?;
            for s in v["source"].as_array()? {
                if preds.len() == 10_000 {
                    return Some((preds, refs));
                }
                preds.push(s.as_str()?.to_string());
                refs.push(targets.clone());
            }
        }
    }
    Some((preds, refs))
}

/// Process CPU time (user + system) in seconds, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let Some((preds, refs)) = pairs() else {
        eprintln!("../shared/data/scitldr not found");
        return;
    };
    // `ONLY=bleu` (for example) restricts the run to one metric.
    let only = std::env::var("ONLY").ok();
    let run = |name: &str, f: &dyn Fn() -> f64| {
        if only.as_deref().is_some_and(|o| o != name) {
            return;
        }
        let (t, c) = (Instant::now(), cpu_seconds());
        let v = f();
        println!(
            "{name:<22} wall {:>8.3} s  cpu {:>7.2} s  score {v:.12}",
            t.elapsed().as_secs_f64(),
            cpu_seconds() - c
        );
    };
    run("rouge_4types_stemmer", &|| {
        score_report(MetricGroup::Rouge, &preds, &refs).map(|r| r.scores["rouge1"]).unwrap_or(f64::NAN)
    });
    for m in [Metric::Bleu, Metric::Chrf, Metric::ChrfPlusPlus] {
        run(m.name(), &|| corpus_score(m, &preds, &refs).unwrap_or(f64::NAN));
    }
}
