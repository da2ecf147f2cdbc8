//! The 10k SciTLDR benchmark pairs give the same corpus scores as the Python references
//! (`scripts/fixtures/metrics/time_reference.py` records them). Skipped when `../shared/data` is
//! absent.

use lora_metrics::{corpus_score, item_scores, score_report, Metric, MetricGroup};
use serde_json::Value;
use std::path::PathBuf;

fn pairs() -> Option<(Vec<String>, Vec<Vec<String>>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/scitldr");
    let (mut preds, mut refs) = (Vec::new(), Vec::new());
    for split in ["test", "dev", "train"] {
        let text = std::fs::read_to_string(dir.join(format!("{split}.jsonl"))).ok()?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).ok()?;
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

#[test]
fn scitldr10k_matches_python() {
    let Some((preds, refs)) = pairs() else {
        eprintln!("../shared/data/scitldr missing: skipped");
        return;
    };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scitldr10k_expected.json");
    let want: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let s = &want["scores"];
    let rep = score_report(MetricGroup::Rouge, &preds, &refs).unwrap();
    for key in ["rouge1", "rouge2", "rougeL", "rougeLsum"] {
        let (g, w) = (rep.scores[key], s[key].as_f64().unwrap());
        assert!((g - w).abs() < 1e-9, "{key}: {g} vs {w}");
    }
    for (m, key) in [(Metric::Bleu, "bleu"), (Metric::Chrf, "chrf"), (Metric::ChrfPlusPlus, "chrf++")] {
        let (g, w) = (corpus_score(m, &preds, &refs).unwrap(), s[key].as_f64().unwrap());
        assert!((g - w).abs() < 1e-9, "{key}: {g} vs {w}");
    }
    let sb = item_scores(Metric::Bleu, &preds, &refs).unwrap();
    let mean = sb.iter().sum::<f64>() / sb.len() as f64;
    let w = s["sentence_bleu_mean"].as_f64().unwrap();
    // Python's sum() and this sum may round differently.
    assert!((mean - w).abs() < 1e-6, "sentence bleu mean: {mean} vs {w}");
}
