//! Task loaders: the data sets in `data/` (E2E NLG, HotpotQA closed-book, GSM8K, SciTLDR) and generic JSONL,
//! each with its prompt template and the metric it is judged by.
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use lora_metrics::Metric;

/// One example (prompt, answer, references): the workspace's one sample type.
pub use lora_common::Sample;

/// The supported tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// E2E NLG data-to-text (CSV `mr,ref`; references grouped by MR). Judged by BLEU (and ROUGE-L).
    E2e,
    /// HotpotQA closed-book QA (JSON array of `{question, answer}` or JSONL). Judged by EM / F1.
    Hotpotqa,
    /// GSM8K (`{question, answer}` with `#### N`). Judged by accuracy.
    Gsm8k,
    /// SciTLDR (`{source: [sentences], target: [tldrs]}`). Judged by ROUGE.
    Scitldr,
    /// Generic JSONL with `prompt` and `answer` (and optional `references`).
    Jsonl,
}

impl FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "e2e" | "e2e_nlg" => Task::E2e,
            "hotpotqa" => Task::Hotpotqa,
            "gsm8k" => Task::Gsm8k,
            "scitldr" => Task::Scitldr,
            "jsonl" => Task::Jsonl,
            _ => return Err(Error::Usage(format!("unknown task `{s}` (e2e, hotpotqa, gsm8k, scitldr, jsonl)"))),
        })
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Task::E2e => "e2e",
            Task::Hotpotqa => "hotpotqa",
            Task::Gsm8k => "gsm8k",
            Task::Scitldr => "scitldr",
            Task::Jsonl => "jsonl",
        })
    }
}

impl Task {
    /// The metric the task is judged by when one number is needed.
    pub fn primary_metric(self) -> Metric {
        match self {
            Task::E2e => Metric::Bleu,
            Task::Hotpotqa => Metric::F1,
            Task::Gsm8k => Metric::Gsm8kFlexible,
            Task::Scitldr => Metric::Rouge1,
            Task::Jsonl => Metric::RougeL,
        }
    }

    /// Every metric reported for the task.
    pub fn metrics(self) -> Vec<Metric> {
        match self {
            Task::E2e => vec![Metric::Bleu, Metric::RougeL],
            Task::Hotpotqa => vec![Metric::Em, Metric::F1],
            Task::Gsm8k => vec![Metric::Gsm8kStrict, Metric::Gsm8kFlexible],
            Task::Scitldr => vec![Metric::Rouge1, Metric::Rouge2, Metric::RougeL],
            Task::Jsonl => vec![Metric::RougeL],
        }
    }

    /// Loads the task's file.
    pub fn load(self, path: &Path) -> Result<Vec<Sample>> {
        let text = read_text(path)?;
        if text.trim().is_empty() {
            return Err(Error::Data { path: path.to_path_buf(), line: 0, message: "the file holds no samples".into() });
        }
        let bad = |line: usize, message: String| Error::Data { path: path.to_path_buf(), line, message };
        let samples = match self {
            Task::E2e => load_e2e(&text, &bad)?,
            Task::Hotpotqa => {
                #[derive(Deserialize)]
                struct Row {
                    question: String,
                    answer: String,
                }
                let rows: Vec<(usize, Row)> = if text.trim_start().starts_with('[') {
                    serde_json::from_str::<Vec<Row>>(&text)
                        .map_err(|e| bad(e.line(), e.to_string()))?
                        .into_iter()
                        .enumerate()
                        .map(|(i, r)| (i + 1, r))
                        .collect()
                } else {
                    jsonl_rows(&text, &bad)?
                };
                rows.into_iter()
                    .map(|(_, r)| Sample {
                        prompt: format!("Answer the question with a short phrase.\nQuestion: {}", r.question.trim()),
                        references: vec![r.answer.clone()],
                        answer: r.answer,
                    })
                    .collect()
            }
            Task::Gsm8k => {
                #[derive(Deserialize)]
                struct Row {
                    question: String,
                    answer: String,
                }
                jsonl_rows::<Row>(&text, &bad)?
                    .into_iter()
                    .map(|(line, r)| {
                        if !r.answer.contains("####") {
                            return Err(bad(line, "GSM8K answer has no `#### N` line".into()));
                        }
                        let answer = strip_calculator(&r.answer);
                        Ok(Sample {
                            prompt: format!(
                                "Solve the problem step by step and end with `#### <number>`.\n{}",
                                r.question.trim()
                            ),
                            references: vec![r.answer],
                            answer,
                        })
                    })
                    .collect::<Result<_>>()?
            }
            Task::Scitldr => {
                #[derive(Deserialize)]
                struct Row {
                    source: Vec<String>,
                    target: Vec<String>,
                }
                jsonl_rows::<Row>(&text, &bad)?
                    .into_iter()
                    .map(|(line, r)| {
                        let answer =
                            r.target.first().cloned().ok_or_else(|| bad(line, "SciTLDR row has no target".into()))?;
                        Ok(Sample {
                            prompt: format!("Write a one-sentence TL;DR of this abstract.\n{}", r.source.join(" ")),
                            answer,
                            references: r.target,
                        })
                    })
                    .collect::<Result<_>>()?
            }
            Task::Jsonl => {
                #[derive(Deserialize)]
                struct Row {
                    prompt: String,
                    answer: String,
                    #[serde(default)]
                    references: Vec<String>,
                }
                jsonl_rows::<Row>(&text, &bad)?
                    .into_iter()
                    .map(|(_, r)| Sample {
                        references: if r.references.is_empty() { vec![r.answer.clone()] } else { r.references },
                        prompt: r.prompt,
                        answer: r.answer,
                    })
                    .collect()
            }
        };
        if samples.is_empty() {
            return Err(Error::Data { path: path.to_path_buf(), line: 0, message: "no samples".into() });
        }
        Ok(samples)
    }
}

/// GSM8K answers carry calculator annotations `<<48/2=24>>`; the training target drops them.
fn strip_calculator(answer: &str) -> String {
    let mut out = String::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(start) = rest.find("<<") {
        out.push_str(&rest[..start]);
        match rest[start..].find(">>") {
            Some(end) => rest = &rest[start + end + 2..],
            None => {
                rest = &rest[start..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Reads a UTF-8 text data file, naming the line of an invalid byte.
pub fn read_text(path: &Path) -> Result<String> {
    Ok(lora_common::text::read_text_file(path)?)
}

fn jsonl_rows<T: serde::de::DeserializeOwned>(
    text: &str,
    bad: &dyn Fn(usize, String) -> Error,
) -> Result<Vec<(usize, T)>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map(|r| (i + 1, r)).map_err(|e| bad(i + 1, e.to_string())))
        .collect()
}

/// Minimal RFC 4180 CSV parsing (quoted fields, doubled quotes, newlines inside quotes).
/// CSV rows with their 1-based starting line, or (line, message) of the first error.
type CsvRows = std::result::Result<Vec<(usize, Vec<String>)>, (usize, String)>;

fn parse_csv(text: &str) -> CsvRows {
    let mut rows = Vec::new();
    let mut field = String::new();
    let mut row = Vec::new();
    let mut in_quotes = false;
    let mut line = 1;
    let mut row_line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (in_quotes, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => in_quotes = false,
            (false, '"') if field.is_empty() => in_quotes = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push((row_line, std::mem::take(&mut row)));
                line += 1;
                row_line = line;
            }
            (_, c) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
        }
    }
    if in_quotes {
        return Err((row_line, "unterminated quoted field".into()));
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push((row_line, row));
    }
    Ok(rows)
}

fn load_e2e(text: &str, bad: &dyn Fn(usize, String) -> Error) -> Result<Vec<Sample>> {
    let rows = parse_csv(text).map_err(|(l, m)| bad(l, m))?;
    let mut iter = rows.into_iter();
    let header = iter.next().ok_or_else(|| bad(1, "empty CSV".into()))?.1;
    let col =
        |name: &str| header.iter().position(|h| h.trim() == name).ok_or_else(|| bad(1, format!("no `{name}` column")));
    let (mr_col, ref_col) = (col("mr")?, col("ref")?);
    let mut order: Vec<String> = Vec::new();
    let mut refs: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
    for (line, row) in iter {
        let (Some(mr), Some(r)) = (row.get(mr_col), row.get(ref_col)) else {
            return Err(bad(line, format!("expected {} columns, found {}", header.len(), row.len())));
        };
        let e = refs.entry(mr.clone()).or_insert_with(|| {
            order.push(mr.clone());
            Vec::new()
        });
        e.push(r.clone());
    }
    Ok(order
        .into_iter()
        .map(|mr| {
            let references = refs.remove(&mr).unwrap_or_default();
            Sample {
                prompt: format!("Describe this restaurant in one or two sentences from its attributes.\n{mr}"),
                answer: references.first().cloned().unwrap_or_default(),
                references,
            }
        })
        .collect())
}

/// A seeded shuffle-and-split into disjoint parts of the given sizes (the rest is dropped).
pub fn split(samples: &[Sample], sizes: &[usize], seed: u64) -> Result<Vec<Vec<Sample>>> {
    let need = sizes.iter().try_fold(0usize, |a, &n| a.checked_add(n)).filter(|&n| n <= samples.len());
    if need.is_none() {
        let asked = sizes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" + ");
        return Err(Error::Usage(format!("split needs {asked} samples, only {} available", samples.len())));
    }
    let mut idx: Vec<usize> = (0..samples.len()).collect();
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    for i in (1..idx.len()).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let j = ((state >> 33) % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    let mut out = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for &n in sizes {
        out.push(idx[at..at + n].iter().map(|&i| samples[i].clone()).collect());
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_quotes_and_grouping() {
        let text = "mr,ref\n\"name[A], food[B]\",\"It is \"\"good\"\".\"\n\"name[A], food[B]\",Second.\nx,y\n";
        let bad = |l: usize, m: String| Error::Data { path: "t.csv".into(), line: l, message: m };
        let s = load_e2e(text, &bad).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].references, vec!["It is \"good\".".to_string(), "Second.".to_string()]);
        assert!(s[0].prompt.ends_with("name[A], food[B]"));
    }

    #[test]
    fn calculator_annotations_are_removed() {
        assert_eq!(strip_calculator("48/2 = <<48/2=24>>24\n#### 24"), "48/2 = 24\n#### 24");
    }

    #[test]
    fn split_is_disjoint_and_seeded() {
        let s: Vec<Sample> =
            (0..10).map(|i| Sample { prompt: i.to_string(), answer: String::new(), references: vec![] }).collect();
        let a = split(&s, &[3, 3], 7).unwrap();
        let b = split(&s, &[3, 3], 7).unwrap();
        assert_eq!(a, b);
        assert!(a[0].iter().all(|x| !a[1].contains(x)));
        assert!(split(&s, &[6, 6], 7).is_err());
        // Sizes whose sum overflows are refused, not wrapped into a small sum.
        let err = split(&s, &[usize::MAX, 2], 7).unwrap_err().to_string();
        assert!(err.contains(&format!("{} + 2", usize::MAX)), "{err}");
    }
}
