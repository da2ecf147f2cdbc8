//! Equality with the Python reference implementations on committed fixtures
//! (written by `scripts/fixtures/metrics/make_metrics_fixtures.py`).

use lora_metrics::{bleu, chrf, corpus_score, item_scores, porter, rouge, score_report, Metric, MetricGroup};
use serde_json::Value;

mod common;

const TOL: f64 = 1e-9;

struct Fixture {
    v: Value,
    preds: Vec<String>,
    refs: Vec<Vec<String>>,
}

fn load(name: &str) -> Fixture {
    let text = common::read(&common::fixtures().join(name));
    let v: Value = serde_json::from_str(&text).unwrap();
    let preds = serde_json::from_value(v["predictions"].clone()).unwrap_or_default();
    let refs = serde_json::from_value(v["references"].clone()).unwrap_or_default();
    Fixture { v, preds, refs }
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(what: &str, got: f64, want: f64) {
    assert!((got - want).abs() <= TOL, "{what}: got {got:.17}, want {want:.17} (diff {:e})", got - want);
}

fn close_all(what: &str, got: &[f64], want: &[f64], f: &Fixture) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= TOL,
            "{what} row {i}: got {g:.17}, want {w:.17}\n  pred {:?}\n  refs {:?}",
            f.preds.get(i),
            f.refs.get(i)
        );
    }
}

fn check_text_metrics(f: &Fixture) {
    let name = f.v["name"].as_str().unwrap().to_string();
    let items = &f.v["items"];
    let corpus = &f.v["corpus"];
    // Tokenizers.
    for (i, p) in f.preds.iter().enumerate() {
        let want: Vec<String> = serde_json::from_value(f.v["rouge_tokens"][i].clone()).unwrap();
        assert_eq!(rouge::tokenize(p, true), want, "{name} rouge tokens row {i}: {p:?}");
        let want: Vec<String> = serde_json::from_value(f.v["tok13a"][i].clone()).unwrap();
        assert_eq!(bleu::tokenize_13a(p.trim_end()), want, "{name} 13a tokens row {i}: {p:?}");
    }
    // EM / F1 / HotpotQA F1.
    for (m, key) in [(Metric::Em, "em"), (Metric::F1, "f1"), (Metric::HotpotF1, "hotpot-f1")] {
        let got = item_scores(m, &f.preds, &f.refs).unwrap();
        close_all(&format!("{name} {key}"), &got, &f64s(&items[key]), f);
        close(
            &format!("{name} corpus {key}"),
            corpus_score(m, &f.preds, &f.refs).unwrap(),
            corpus[key].as_f64().unwrap(),
        );
    }
    // ROUGE: precision / recall / F of score_multi and score (first reference).
    for (i, (p, rs)) in f.preds.iter().zip(&f.refs).enumerate() {
        for (key, got) in [("rouge", rouge::score_multi(rs, p)), ("rouge_single", rouge::score(&rs[0], p))] {
            let want = &items[key][i];
            let got = [got.rouge1, got.rouge2, got.rouge_l, got.rouge_lsum];
            for (t, g) in got.iter().enumerate() {
                let w = f64s(&want[t]);
                for (k, gv) in [g.precision, g.recall, g.fmeasure].into_iter().enumerate() {
                    assert!(
                        (gv - w[k]).abs() <= TOL,
                        "{name} {key} row {i} type {t} field {k}: got {gv}, want {}\n  pred {p:?}\n  refs {rs:?}",
                        w[k]
                    );
                }
            }
        }
    }
    let rep = score_report(MetricGroup::Rouge, &f.preds, &f.refs).unwrap();
    for (m, key) in [
        (Metric::Rouge1, "rouge1"),
        (Metric::Rouge2, "rouge2"),
        (Metric::RougeL, "rougeL"),
        (Metric::RougeLsum, "rougeLsum"),
    ] {
        let want = corpus[key].as_f64().unwrap();
        close(&format!("{name} corpus {key}"), corpus_score(m, &f.preds, &f.refs).unwrap(), want);
        close(&format!("{name} report {key}"), rep.scores[key], want);
    }
    // BLEU.
    let b = bleu::corpus_bleu(&f.preds, &f.refs).unwrap();
    let wb = &corpus["bleu"];
    close(&format!("{name} corpus bleu"), b.score, wb["score"].as_f64().unwrap());
    close(&format!("{name} bleu bp"), b.bp, wb["bp"].as_f64().unwrap());
    assert_eq!(b.sys_len, wb["sys_len"].as_u64().unwrap(), "{name} sys_len");
    assert_eq!(b.ref_len, wb["ref_len"].as_u64().unwrap(), "{name} ref_len");
    let counts: Vec<u64> = serde_json::from_value(wb["counts"].clone()).unwrap();
    let totals: Vec<u64> = serde_json::from_value(wb["totals"].clone()).unwrap();
    assert_eq!(b.counts, counts, "{name} bleu counts");
    assert_eq!(b.totals, totals, "{name} bleu totals");
    close_all(&format!("{name} bleu precisions"), &b.precisions, &f64s(&wb["precisions"]), f);
    assert_eq!(b.signature, wb["signature"].as_str().unwrap(), "{name} bleu signature");
    close(&format!("{name} corpus_score bleu"), corpus_score(Metric::Bleu, &f.preds, &f.refs).unwrap(), b.score);
    let got = item_scores(Metric::Bleu, &f.preds, &f.refs).unwrap();
    close_all(&format!("{name} sentence bleu"), &got, &f64s(&items["bleu"]), f);
    // chrF / chrF++.
    for (m, key, wo) in [(Metric::Chrf, "chrf", 0), (Metric::ChrfPlusPlus, "chrf++", 2)] {
        let c = chrf::corpus_chrf(&f.preds, &f.refs, wo).unwrap();
        close(&format!("{name} corpus {key}"), c.score, corpus[key]["score"].as_f64().unwrap());
        assert_eq!(c.signature, corpus[key]["signature"].as_str().unwrap(), "{name} {key} signature");
        let got = item_scores(m, &f.preds, &f.refs).unwrap();
        close_all(&format!("{name} sentence {key}"), &got, &f64s(&items[key]), f);
    }
}

#[test]
fn scitldr_dev_matches_references() {
    check_text_metrics(&load("scitldr_dev.json"));
}

#[test]
fn e2e_test_matches_references() {
    check_text_metrics(&load("e2e_test.json"));
}

#[test]
fn hotpot_dev_matches_references() {
    check_text_metrics(&load("hotpot_dev.json"));
}

#[test]
fn gsm8k_test_matches_references() {
    let f = load("gsm8k_test.json");
    check_text_metrics(&f);
    for (m, key) in [(Metric::Gsm8kStrict, "gsm8k-strict"), (Metric::Gsm8kFlexible, "gsm8k-flexible")] {
        let got = item_scores(m, &f.preds, &f.refs).unwrap();
        close_all(key, &got, &f64s(&f.v["items"][key]), &f);
        close(key, corpus_score(m, &f.preds, &f.refs).unwrap(), f.v["corpus"][key].as_f64().unwrap());
    }
}

#[test]
fn edge_cases_match_references() {
    let f = load("edge_cases.json");
    check_text_metrics(&f);
    let rows: Vec<usize> = serde_json::from_value(f.v["gsm8k_rows"].clone()).unwrap();
    let preds: Vec<String> = rows.iter().map(|&i| f.preds[i].clone()).collect();
    let refs: Vec<Vec<String>> = rows.iter().map(|&i| f.refs[i].clone()).collect();
    let sub = Fixture { v: Value::Null, preds, refs };
    for (m, key) in [(Metric::Gsm8kStrict, "gsm8k-strict"), (Metric::Gsm8kFlexible, "gsm8k-flexible")] {
        let got = item_scores(m, &sub.preds, &sub.refs).unwrap();
        close_all(key, &got, &f64s(&f.v["items"][key]), &sub);
    }
}

#[test]
fn porter_stems_match_nltk() {
    let f = load("porter_stems.json");
    let stems = f.v["stems"].as_object().unwrap();
    assert!(stems.len() > 1000);
    let bad: Vec<String> = stems
        .iter()
        .filter(|(w, s)| porter::stem(w) != s.as_str().unwrap())
        .map(|(w, s)| format!("{w}: got {} want {}", porter::stem(w), s))
        .collect();
    assert!(bad.is_empty(), "{} mismatches: {:?}", bad.len(), &bad[..bad.len().min(20)]);
}
