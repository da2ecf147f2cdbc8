//! Reading `{"prediction": str, "references": [str, ...]}` JSON Lines for the `score` command.

use crate::{score_report, MetricGroup, MetricsError, Report, Result};
use serde::Deserialize;
use std::path::Path;

/// Predictions and their reference lists, row-aligned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pairs {
    /// One prediction per row.
    pub predictions: Vec<String>,
    /// One non-empty reference list per row.
    pub references: Vec<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    prediction: String,
    references: Vec<String>,
}

/// Parses JSON Lines text (blank lines are skipped); `label` names the source in errors.
///
/// ```
/// let p = lora_metrics::parse_pairs_jsonl("{\"prediction\":\"a\",\"references\":[\"a\",\"b\"]}\n", "x.jsonl")?;
/// assert_eq!(p.references[0].len(), 2);
/// # Ok::<(), lora_metrics::MetricsError>(())
/// ```
pub fn parse_pairs_jsonl(text: &str, label: &str) -> Result<Pairs> {
    let mut out = Pairs::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| MetricsError::Jsonl { path: label.to_string(), line: i + 1, message };
        let row: Row = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        if row.references.is_empty() {
            return Err(err("\"references\" is empty".to_string()));
        }
        out.predictions.push(row.prediction);
        out.references.push(row.references);
    }
    if out.predictions.is_empty() {
        return Err(MetricsError::Jsonl { path: label.to_string(), line: 0, message: "no rows".to_string() });
    }
    Ok(out)
}

/// Reads a pairs JSON Lines file.
pub fn read_pairs_jsonl(path: &Path) -> Result<Pairs> {
    let label = path.display().to_string();
    let text = lora_common::text::read_text(path).map_err(|e| MetricsError::Jsonl {
        path: label.clone(),
        line: e.line().unwrap_or(0),
        message: e.to_string(),
    })?;
    parse_pairs_jsonl(&text, &label)
}

/// `lora-boundary score --metric GROUP --input PAIRS.jsonl`: reads the file and computes the report.
pub fn score_jsonl(group: MetricGroup, path: &Path) -> Result<Report> {
    let pairs = read_pairs_jsonl(path)?;
    score_report(group, &pairs.predictions, &pairs.references)
}
