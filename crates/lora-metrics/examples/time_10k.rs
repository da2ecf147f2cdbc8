//! Timed runs of each corpus metric on the 10k SciTLDR benchmark pairs (the pairs of
//! `benches/metrics.rs` and `scripts/fixtures/metrics/time_reference.py`), printing wall time and
//! process CPU time of the first run and the medians. `cargo run --release -p lora-metrics --example
//! time_10k` (environment: `ONLY=bleu`, `REPS=5`, `UNIQUE_REFS=1`).

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

/// Process CPU time in seconds: the run time of every thread of the process, from
/// `/proc/self/task/*/schedstat` (nanoseconds), or else user + system time from `/proc/self/stat`
/// (clock ticks of 10 ms).
fn cpu_seconds() -> f64 {
    let from_schedstat = || -> Option<f64> {
        let mut ns = 0u64;
        for task in std::fs::read_dir("/proc/self/task").ok()? {
            let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
        }
        (ns > 0).then_some(ns as f64 * 1e-9)
    };
    from_schedstat().unwrap_or_else(|| {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let Some((preds, mut refs)) = pairs() else {
        eprintln!("../shared/data/scitldr not found");
        return;
    };
    // `UNIQUE_REFS=1` appends " u{row}" to every reference, so that no reference repeats across
    // rows (`time_reference.py` does the same with `UNIQUE_REFS=1`).
    if std::env::var("UNIQUE_REFS").is_ok_and(|v| v == "1") {
        for (i, row) in refs.iter_mut().enumerate() {
            for r in row.iter_mut() {
                r.push_str(&format!(" u{i}"));
            }
        }
    }
    // `ONLY=bleu` (for example) restricts the run to one metric; `REPS` (default 5) sets the number
    // of timed runs per metric.
    let only = std::env::var("ONLY").ok();
    let reps = std::env::var("REPS").ok().and_then(|r| r.parse::<usize>().ok()).unwrap_or(5).max(1);
    println!("{} rayon threads, {reps} runs per metric", rayon::current_num_threads());
    let run = |name: &str, f: &dyn Fn() -> f64| {
        if only.as_deref().is_some_and(|o| o != name) {
            return;
        }
        let (mut walls, mut cpus, mut v) = (Vec::new(), Vec::new(), 0.0);
        for _ in 0..reps {
            let (t, c) = (Instant::now(), cpu_seconds());
            v = f();
            walls.push(t.elapsed().as_secs_f64());
            cpus.push(cpu_seconds() - c);
        }
        println!(
            "{name:<22} first: wall {:>7.3} s cpu {:>7.3} s | median: wall {:>7.3} s cpu {:>7.3} s | score {v:.12}",
            walls[0],
            cpus[0],
            median(walls.clone()),
            median(cpus.clone())
        );
    };
    run("rouge_4types_stemmer", &|| {
        score_report(MetricGroup::Rouge, &preds, &refs).map(|r| r.scores["rouge1"]).unwrap_or(f64::NAN)
    });
    for m in [Metric::Bleu, Metric::Chrf, Metric::ChrfPlusPlus] {
        run(m.name(), &|| corpus_score(m, &preds, &refs).unwrap_or(f64::NAN));
    }
}
