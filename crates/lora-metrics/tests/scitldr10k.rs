//! The 10k SciTLDR benchmark pairs give the same corpus scores as the Python references
//! (`scripts/fixtures/metrics/time_reference.py` records them). The pairs come from the committed
//! SciTLDR-A copy in `data/scitldr/` (see its `SOURCE.md`), so the test runs in every clone; a
//! missing or malformed file fails it.

mod common;

use lora_metrics::{corpus_score, item_scores, score_report, Metric, MetricGroup};
use serde_json::Value;

/// Every abstract sentence of test, dev, then train (file order) as a prediction, its row's TLDR
/// targets as the references: the first 10,000 pairs, as `time_reference.py` takes them (all 4,859
/// test and 4,489 dev sentences, then 652 from train).
fn pairs() -> (Vec<String>, Vec<Vec<String>>) {
    let dir = common::workspace_root().join("data/scitldr");
    let (mut preds, mut refs) = (Vec::new(), Vec::new());
    for split in ["test", "dev", "train"] {
        let path = dir.join(format!("{split}.jsonl"));
        let text = common::read(&path);
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let at = || format!("{}:{}", path.display(), i + 1);
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}", at()));
            let targets: Vec<String> =
                serde_json::from_value(v["target"].clone()).unwrap_or_else(|e| panic!("{}: target: {e}", at()));
            let sources = v["source"].as_array().unwrap_or_else(|| panic!("{}: no `source` array", at()));
            for s in sources {
                if preds.len() == 10_000 {
                    return (preds, refs);
                }
                preds.push(s.as_str().unwrap_or_else(|| panic!("{}: non-string source sentence", at())).to_string());
                refs.push(targets.clone());
            }
        }
    }
    panic!("{} gives only {} pairs, 10000 expected", dir.display(), preds.len());
}

#[test]
fn scitldr10k_matches_python() {
    let (preds, refs) = pairs();
    let path = common::fixtures().join("scitldr10k_expected.json");
    let want: Value = serde_json::from_str(&common::read(&path)).unwrap();
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
