//! Public API behaviour: JSONL input, reports, errors.

use lora_metrics::{parse_pairs_jsonl, score_report, MetricGroup, MetricsError};

#[test]
fn jsonl_rows_and_errors_name_the_line() {
    let text = "{\"prediction\":\"the cat\",\"references\":[\"a cat\",\"dog\"]}\n\n{\"prediction\":\"#### 3\",\"references\":[\"#### 3\"]}\n";
    let p = parse_pairs_jsonl(text, "pairs.jsonl").unwrap();
    assert_eq!(p.predictions, ["the cat", "#### 3"]);
    assert_eq!(p.references[0], ["a cat", "dog"]);

    let bad = "{\"prediction\":\"x\",\"references\":[\"y\"]}\n{\"prediction\":\"x\",\"references\":[]}\n";
    match parse_pairs_jsonl(bad, "bad.jsonl") {
        Err(MetricsError::Jsonl { path, line, .. }) => {
            assert_eq!((path.as_str(), line), ("bad.jsonl", 2))
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(parse_pairs_jsonl("{\"prediction\":1}\n", "t"), Err(MetricsError::Jsonl { line: 1, .. })));
    assert!(parse_pairs_jsonl("\n", "t").is_err());
}

#[test]
fn reports_serialize_with_named_scores() {
    let p = vec!["the cat sat on the mat today".to_string(), "a dog ran".to_string()];
    let r = vec![vec!["the cat sat on a mat".to_string()], vec!["the dog ran".to_string(), "dogs ran".to_string()]];
    let rouge = score_report(MetricGroup::Rouge, &p, &r).unwrap();
    let keys: Vec<&str> = rouge.scores.keys().map(String::as_str).collect();
    assert_eq!(keys, ["rouge1", "rouge2", "rougeL", "rougeLsum"]);
    let bleu = score_report(MetricGroup::Bleu, &p, &r).unwrap();
    assert_eq!(bleu.signature.as_deref(), Some("nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"));
    let json = serde_json::to_value(&bleu).unwrap();
    assert_eq!(json["metric"], "bleu");
    assert_eq!(json["bleu"]["sys_len"], 10);
    assert!(json["scores"]["bleu"].as_f64().unwrap() > 0.0);
    let chrf = score_report(MetricGroup::ChrfPlusPlus, &p, &r).unwrap();
    assert!(chrf.signature.unwrap().contains("nw:2"));
    let em = serde_json::to_value(score_report(MetricGroup::Em, &p, &r).unwrap()).unwrap();
    assert_eq!(em["scores"]["em"], 0.5);
    assert!(em.get("signature").is_none());
}
