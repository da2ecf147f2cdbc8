//! Task metrics that reproduce their reference implementations exactly, and fast.
//!
//! | metric name | matches |
//! |---|---|
//! | `em`, `f1` | official SQuAD v1.1 `evaluate-v1.1.py` (max over references) |
//! | `hotpot-f1` | official HotpotQA `hotpot_evaluate_v1.py` F1 (yes/no/noanswer rule), max over references |
//! | `rouge1`, `rouge2`, `rougeL`, `rougeLsum` | Google `rouge-score` 0.1.2, stemmer on, `score_multi` F-measure, mean over rows |
//! | `bleu` | `sacrebleu` 2.x `corpus_bleu` (13a, exp smoothing), reference stream `i` = `i`-th reference of each row |
//! | `chrf`, `chrf++` | `sacrebleu` 2.x `corpus_chrf` with `word_order` 0 / 2 |
//! | `gsm8k-strict`, `gsm8k-flexible` | official `#### N` rule / lm-eval flexible extraction ([`gsm8k`]) |
//!
//! Inputs are `&[String]` predictions and `&[Vec<String>]` references (one non-empty list per
//! prediction). Per-row work runs in parallel with rayon.
//!
//! ```
//! use lora_metrics::{corpus_score, item_scores, Metric};
//! let preds = vec!["The cat sat.".to_string(), "#### 42".to_string()];
//! let refs = vec![vec!["the cat sat".to_string()], vec!["a dog".to_string()]];
//! let em = corpus_score(Metric::from_name("em")?, &preds, &refs)?;
//! assert_eq!(em, 0.5);
//! let f1 = item_scores(Metric::F1, &preds, &refs)?;
//! assert_eq!(f1, vec![1.0, 0.0]);
//! # Ok::<(), lora_metrics::MetricsError>(())
//! ```

#![warn(missing_docs)]

pub mod bleu;
pub mod bootstrap;
pub mod chrf;
mod error;
mod grams;
pub mod gsm8k;
mod jsonl;
pub mod porter;
pub mod rouge;
pub mod squad;
mod text;

pub use bootstrap::{paired_bootstrap, BootstrapResult};
pub use error::{MetricsError, Result};
pub use jsonl::{parse_pairs_jsonl, read_pairs_jsonl, score_jsonl, Pairs};

use error::validate;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;

/// A metric that yields one number for a corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// SQuAD exact match (fraction).
    Em,
    /// SQuAD token F1 (fraction).
    F1,
    /// HotpotQA token F1 (fraction): SQuAD F1 plus the yes/no/noanswer rule.
    HotpotF1,
    /// ROUGE-1 F-measure (fraction).
    Rouge1,
    /// ROUGE-2 F-measure (fraction).
    Rouge2,
    /// ROUGE-L F-measure (fraction).
    RougeL,
    /// ROUGE-Lsum F-measure (fraction).
    RougeLsum,
    /// sacrebleu corpus BLEU (0-100).
    Bleu,
    /// sacrebleu corpus chrF (0-100).
    Chrf,
    /// sacrebleu corpus chrF++ (0-100).
    ChrfPlusPlus,
    /// GSM8K strict accuracy (fraction).
    Gsm8kStrict,
    /// GSM8K flexible accuracy (fraction).
    Gsm8kFlexible,
}

impl Metric {
    /// Every metric, in documentation order.
    pub const ALL: [Metric; 12] = [
        Metric::Em,
        Metric::F1,
        Metric::HotpotF1,
        Metric::Rouge1,
        Metric::Rouge2,
        Metric::RougeL,
        Metric::RougeLsum,
        Metric::Bleu,
        Metric::Chrf,
        Metric::ChrfPlusPlus,
        Metric::Gsm8kStrict,
        Metric::Gsm8kFlexible,
    ];

    /// The metric's name (`em`, `f1`, `hotpot-f1`, `rouge1`, `rouge2`, `rougeL`, `rougeLsum`, `bleu`,
    /// `chrf`, `chrf++`, `gsm8k-strict`, `gsm8k-flexible`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Em => "em",
            Metric::F1 => "f1",
            Metric::HotpotF1 => "hotpot-f1",
            Metric::Rouge1 => "rouge1",
            Metric::Rouge2 => "rouge2",
            Metric::RougeL => "rougeL",
            Metric::RougeLsum => "rougeLsum",
            Metric::Bleu => "bleu",
            Metric::Chrf => "chrf",
            Metric::ChrfPlusPlus => "chrf++",
            Metric::Gsm8kStrict => "gsm8k-strict",
            Metric::Gsm8kFlexible => "gsm8k-flexible",
        }
    }

    /// Parses a metric name (exactly as [`Metric::name`] spells it).
    ///
    /// ```
    /// # fn main() -> Result<(), lora_metrics::MetricsError> {
    /// use lora_metrics::Metric;
    /// assert_eq!(Metric::from_name("rougeLsum")?, Metric::RougeLsum);
    /// assert!(Metric::from_name("rouge").is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_name(name: &str) -> Result<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == name).ok_or_else(|| MetricsError::UnknownMetric {
            name: name.to_string(),
            expected: Metric::ALL.map(Metric::name).join(", "),
        })
    }

    /// The best possible score: 100 for BLEU, chrF and chrF++ (sacrebleu's scale), 1 for the others.
    ///
    /// ```
    /// use lora_metrics::Metric;
    /// assert_eq!(Metric::Bleu.max_score(), 100.0);
    /// assert_eq!(Metric::RougeL.max_score(), 1.0);
    /// ```
    pub fn max_score(self) -> f64 {
        if matches!(self, Metric::Bleu | Metric::Chrf | Metric::ChrfPlusPlus) {
            100.0
        } else {
            1.0
        }
    }

    /// Whether the corpus score is the mean of [`item_scores`] (false for BLEU and chrF, whose corpus
    /// score pools n-gram statistics).
    pub fn is_mean_of_items(self) -> bool {
        !matches!(self, Metric::Bleu | Metric::Chrf | Metric::ChrfPlusPlus)
    }
}

impl std::str::FromStr for MetricGroup {
    type Err = MetricsError;

    fn from_str(s: &str) -> Result<MetricGroup> {
        MetricGroup::from_name(s)
    }
}

impl std::str::FromStr for Metric {
    type Err = MetricsError;

    fn from_str(s: &str) -> Result<Metric> {
        Metric::from_name(s)
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn gsm8k_golds(references: &[Vec<String>]) -> Result<Vec<Vec<String>>> {
    references
        .iter()
        .enumerate()
        .map(|(row, refs)| {
            refs.iter()
                .enumerate()
                .map(|(index, r)| {
                    gsm8k::gold_answer(r).ok_or_else(|| MetricsError::InvalidGsm8kReference {
                        row,
                        index,
                        reference: r.clone(),
                    })
                })
                .collect()
        })
        .collect()
}

fn per_row(predictions: &[String], references: &[Vec<String>], f: impl Fn(&str, &[String]) -> f64 + Sync) -> Vec<f64> {
    predictions.par_iter().zip(references.par_iter()).map(|(p, r)| f(p, r)).collect()
}

fn rouge_rows(predictions: &[String], references: &[Vec<String>]) -> Vec<rouge::RougeScores> {
    predictions.par_iter().zip(references.par_iter()).map(|(p, r)| rouge::score_multi(r, p)).collect()
}

/// Per-row scores: EM/F1/GSM8K in {0, 1} or `[0, 1]`, ROUGE F-measures (best reference), and
/// sentence-level BLEU / chrF / chrF++ (0-100, as `sacrebleu.sentence_bleu` / `sentence_chrf`).
///
/// Errors on empty input, length mismatch, an empty reference list, or (GSM8K) a reference without a
/// gold answer.
pub fn item_scores(metric: Metric, predictions: &[String], references: &[Vec<String>]) -> Result<Vec<f64>> {
    validate(predictions, references)?;
    let max = squad::max_over_ground_truths;
    Ok(match metric {
        Metric::Em => per_row(predictions, references, |p, r| max(squad::exact_match, p, r)),
        Metric::F1 => per_row(predictions, references, |p, r| max(squad::f1, p, r)),
        Metric::HotpotF1 => per_row(predictions, references, |p, r| max(squad::hotpot_f1, p, r)),
        Metric::Rouge1 | Metric::Rouge2 | Metric::RougeL | Metric::RougeLsum => rouge_rows(predictions, references)
            .into_iter()
            .map(|s| match metric {
                Metric::Rouge1 => s.rouge1.fmeasure,
                Metric::Rouge2 => s.rouge2.fmeasure,
                Metric::RougeL => s.rouge_l.fmeasure,
                _ => s.rouge_lsum.fmeasure,
            })
            .collect(),
        Metric::Bleu => bleu::sentence_bleu_scores(predictions, references)?,
        Metric::Chrf => chrf::sentence_chrf_scores(predictions, references, 0)?,
        Metric::ChrfPlusPlus => chrf::sentence_chrf_scores(predictions, references, 2)?,
        Metric::Gsm8kStrict | Metric::Gsm8kFlexible => {
            let golds = gsm8k_golds(references)?;
            let f = if metric == Metric::Gsm8kStrict { gsm8k::strict_correct } else { gsm8k::flexible_correct };
            predictions.par_iter().zip(golds.par_iter()).map(|(p, g)| f(p, g)).collect()
        }
    })
}

/// Selects one F-measure from a row's ROUGE scores.
type RougeField = fn(&rouge::RougeScores) -> f64;

/// Left-to-right mean (the order Python's `for` loop would use).
fn mean(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |a, &x| a + x) / v.len() as f64
}

/// The corpus score of one metric: the mean of [`item_scores`] for EM/F1/ROUGE/GSM8K (fractions),
/// pooled corpus BLEU / chrF / chrF++ for the sacrebleu metrics (0-100).
pub fn corpus_score(metric: Metric, predictions: &[String], references: &[Vec<String>]) -> Result<f64> {
    match metric {
        Metric::Bleu => Ok(bleu::corpus_bleu(predictions, references)?.score),
        Metric::Chrf => Ok(chrf::corpus_chrf(predictions, references, 0)?.score),
        Metric::ChrfPlusPlus => Ok(chrf::corpus_chrf(predictions, references, 2)?.score),
        m => Ok(mean(&item_scores(m, predictions, references)?)),
    }
}

/// The metric groups of `lora-boundary score --metric`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricGroup {
    /// `em`.
    Em,
    /// `f1`.
    F1,
    /// `hotpot-f1`.
    HotpotF1,
    /// `rouge`: the four ROUGE F-measures.
    Rouge,
    /// `bleu`: score, signature and statistics.
    Bleu,
    /// `chrf`.
    Chrf,
    /// `chrf++`.
    ChrfPlusPlus,
    /// `gsm8k-strict`.
    Gsm8kStrict,
    /// `gsm8k-flexible`.
    Gsm8kFlexible,
}

impl MetricGroup {
    /// Every group.
    pub const ALL: [MetricGroup; 9] = [
        MetricGroup::Em,
        MetricGroup::F1,
        MetricGroup::HotpotF1,
        MetricGroup::Rouge,
        MetricGroup::Bleu,
        MetricGroup::Chrf,
        MetricGroup::ChrfPlusPlus,
        MetricGroup::Gsm8kStrict,
        MetricGroup::Gsm8kFlexible,
    ];

    /// The group's CLI name.
    pub fn name(self) -> &'static str {
        match self {
            MetricGroup::Em => "em",
            MetricGroup::F1 => "f1",
            MetricGroup::HotpotF1 => "hotpot-f1",
            MetricGroup::Rouge => "rouge",
            MetricGroup::Bleu => "bleu",
            MetricGroup::Chrf => "chrf",
            MetricGroup::ChrfPlusPlus => "chrf++",
            MetricGroup::Gsm8kStrict => "gsm8k-strict",
            MetricGroup::Gsm8kFlexible => "gsm8k-flexible",
        }
    }

    /// Parses a CLI group name.
    ///
    /// ```
    /// # fn main() -> Result<(), lora_metrics::MetricsError> {
    /// assert_eq!(lora_metrics::MetricGroup::from_name("rouge")?.name(), "rouge");
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_name(name: &str) -> Result<MetricGroup> {
        MetricGroup::ALL.into_iter().find(|g| g.name() == name).ok_or_else(|| MetricsError::UnknownMetric {
            name: name.to_string(),
            expected: MetricGroup::ALL.map(MetricGroup::name).join(", "),
        })
    }
}

/// Named corpus scores of one metric group (what `score --format json` prints).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The group name (`rouge`, `bleu`, ...).
    pub metric: String,
    /// Number of scored rows.
    pub n_items: usize,
    /// Named corpus scores: `em`, `f1`, `hotpot-f1`, `gsm8k-strict`, `gsm8k-flexible` (fractions);
    /// `rouge1`, `rouge2`, `rougeL`, `rougeLsum` (mean F-measure, fractions); `bleu`, `chrf`,
    /// `chrf++` (0-100).
    pub scores: BTreeMap<String, f64>,
    /// sacrebleu signature (BLEU, chrF, chrF++ only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Full BLEU statistics (BLEU only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bleu: Option<bleu::BleuScore>,
}

/// Computes the report of one metric group.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use lora_metrics::{score_report, MetricGroup};
/// let p = vec!["the cat sat on the mat".to_string()];
/// let r = vec![vec!["the cat sat on a mat".to_string()]];
/// let rep = score_report(MetricGroup::Rouge, &p, &r)?;
/// assert_eq!(rep.scores.len(), 4);
/// println!("{}", serde_json::to_string(&rep)?);
/// # Ok(())
/// # }
/// ```
pub fn score_report(group: MetricGroup, predictions: &[String], references: &[Vec<String>]) -> Result<Report> {
    validate(predictions, references)?;
    let mut scores = BTreeMap::new();
    let mut signature = None;
    let mut bleu_detail = None;
    let single = |m: Metric, scores: &mut BTreeMap<String, f64>| -> Result<()> {
        scores.insert(m.name().to_string(), corpus_score(m, predictions, references)?);
        Ok(())
    };
    match group {
        MetricGroup::Em => single(Metric::Em, &mut scores)?,
        MetricGroup::F1 => single(Metric::F1, &mut scores)?,
        MetricGroup::HotpotF1 => single(Metric::HotpotF1, &mut scores)?,
        MetricGroup::Gsm8kStrict => single(Metric::Gsm8kStrict, &mut scores)?,
        MetricGroup::Gsm8kFlexible => single(Metric::Gsm8kFlexible, &mut scores)?,
        MetricGroup::Rouge => {
            let rows = rouge_rows(predictions, references);
            let pick: [(&str, RougeField); 4] = [
                ("rouge1", |s| s.rouge1.fmeasure),
                ("rouge2", |s| s.rouge2.fmeasure),
                ("rougeL", |s| s.rouge_l.fmeasure),
                ("rougeLsum", |s| s.rouge_lsum.fmeasure),
            ];
            for (name, f) in pick {
                let v: Vec<f64> = rows.iter().map(f).collect();
                scores.insert(name.to_string(), mean(&v));
            }
        }
        MetricGroup::Bleu => {
            let b = bleu::corpus_bleu(predictions, references)?;
            scores.insert("bleu".to_string(), b.score);
            signature = Some(b.signature.clone());
            bleu_detail = Some(b);
        }
        MetricGroup::Chrf | MetricGroup::ChrfPlusPlus => {
            let wo = if group == MetricGroup::Chrf { 0 } else { 2 };
            let c = chrf::corpus_chrf(predictions, references, wo)?;
            scores.insert(group.name().to_string(), c.score);
            signature = Some(c.signature);
        }
    }
    Ok(Report { metric: group.name().to_string(), n_items: predictions.len(), scores, signature, bleu: bleu_detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn names_round_trip() {
        for m in Metric::ALL {
            assert_eq!(Metric::from_name(m.name()).unwrap(), m);
        }
        for g in MetricGroup::ALL {
            assert_eq!(MetricGroup::from_name(g.name()).unwrap(), g);
        }
        assert!(matches!(Metric::from_name("BLEU"), Err(MetricsError::UnknownMetric { .. })));
    }

    #[test]
    fn input_errors() {
        let p = s(&["a", "b"]);
        assert!(matches!(corpus_score(Metric::Em, &[], &[]), Err(MetricsError::EmptyInput)));
        assert!(matches!(
            corpus_score(Metric::Bleu, &p, &[s(&["a"])]),
            Err(MetricsError::LengthMismatch { predictions: 2, references: 1 })
        ));
        assert!(matches!(
            item_scores(Metric::Rouge1, &p, &[s(&["a"]), vec![]]),
            Err(MetricsError::NoReferences { row: 1 })
        ));
        assert!(matches!(
            item_scores(Metric::Gsm8kStrict, &p, &[s(&["#### 1"]), s(&["x"])]),
            Err(MetricsError::InvalidGsm8kReference { row: 1, index: 0, .. })
        ));
    }
}
