//! One run's answers to the paper's questions, as numbers that can stand beside another model family's: where
//! the probe curve rises (as a fraction of depth), where the searched boundary falls, how much LoRA can go at no
//! measurable loss on the test set, and whether the half-drop ablation (the paper's Fig. 2) goes the paper's way.
//!
//! `lora-boundary compare --table` prints [`markdown_table`] of the reports it is given.
//!
//! ```
//! use lora_boundary::summary::{markdown_table, RunSummary};
//! let table = markdown_table(&[] as &[RunSummary]);
//! assert!(table.starts_with("| run |"));
//! ```
use lora_model::LayerMask;
use lora_search::Detection;
use serde::Serialize;

use crate::pipeline::PipelineReport;

/// A curve rule's boundary as a point of the probe curve and as a fraction of depth.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RisePoint {
    /// `steepest rise`, `threshold` or `knee`.
    pub rule: String,
    /// The boundary `b` the rule reads off the full-LoRA curve (`None`: no clear rise).
    pub boundary: Option<usize>,
    /// `(b + 1) / L`: where the rise sits on a 0–1 depth axis.
    pub depth: Option<f64>,
}

/// The output-layer answer probability of the four probed masks (the paper's Fig. 2 at its last point).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OutputProbabilities {
    /// Full LoRA.
    pub full: Option<f64>,
    /// No LoRA.
    pub base: Option<f64>,
    /// LoRA on the bottom half only (`0..=L/2-1`): the top half's LoRA dropped.
    pub top_dropped: Option<f64>,
    /// LoRA on the top half only (`L/2..L`): the bottom half's LoRA dropped.
    pub bottom_dropped: Option<f64>,
}

impl OutputProbabilities {
    /// Whether the paper's Fig. 2 pattern holds: dropping the top half's LoRA keeps the output probability at
    /// least as close to full LoRA as dropping the bottom half's does (`None` without the ablation curves).
    pub fn fig2_pattern_holds(&self) -> Option<bool> {
        let (full, top, bottom) = (self.full?, self.top_dropped?, self.bottom_dropped?);
        Some((full - top).abs() <= (full - bottom).abs())
    }
}

/// One pipeline run, summarised for a cross-model comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// `<model file stem> · <task>`.
    pub label: String,
    /// Decoder blocks `L`.
    pub num_layers: usize,
    /// The curve rules' boundaries on the full-LoRA probe curve.
    pub rise: Vec<RisePoint>,
    /// The searched boundary.
    pub searched: usize,
    /// `(searched + 1) / L`.
    pub searched_depth: f64,
    /// The smallest test-sweep boundary from which every evaluated boundary up to full LoRA shows no measurable
    /// loss (the upper end of its 95% CI of the difference to full LoRA is ≥ 0), with the fraction of LoRA
    /// parameters it keeps; `None` without a sweep.
    pub smallest_safe: Option<(usize, f64)>,
    /// The task's primary metric.
    pub metric: String,
    /// Test score of full LoRA (the primary metric's corpus score, as the report's tables give it).
    pub full_score: Option<f64>,
    /// Test score of the base model (corpus score of the primary metric).
    pub base_score: Option<f64>,
    /// Output-layer probabilities of the probed masks.
    pub output: OutputProbabilities,
}

impl RunSummary {
    /// Summarises a report.
    pub fn from_report(r: &PipelineReport) -> Self {
        let l = r.num_layers.max(1);
        let depth = |b: usize| (b + 1) as f64 / l as f64;
        let rise = r
            .detections
            .iter()
            .map(|d| RisePoint {
                rule: match d.method {
                    Detection::SteepestRise { .. } => "steepest rise".to_string(),
                    Detection::Threshold { tau } => format!("threshold τ = {tau}"),
                    Detection::Knee => "knee".to_string(),
                },
                boundary: d.boundary,
                depth: d.boundary.map(depth),
            })
            .collect();
        let full = r.evaluation.iter().find(|e| e.label == "full");
        let base = r.evaluation.iter().find(|e| e.label == "base");
        // Sweep points plus full LoRA itself (b = L − 1, no loss by definition), by boundary.
        let mut points: Vec<(usize, f64, bool)> = r
            .sweep
            .iter()
            .filter_map(|e| Some((e.boundary?, e.lora_params_kept, e.ci_vs_full.is_none_or(|c| c[1] >= 0.0))))
            .collect();
        let smallest_safe = if points.is_empty() {
            None
        } else {
            points.push((r.num_layers.saturating_sub(1), 1.0, true));
            points.sort_by_key(|p| p.0);
            points.dedup_by_key(|p| p.0);
            // Walk down from full LoRA while the boundaries stay safe.
            points.iter().rev().take_while(|p| p.2).last().map(|&(b, kept, _)| (b, kept))
        };
        let half = l / 2;
        let last = |mask: &str| r.probe.curve(mask).and_then(|c| c.gt_prob.last().copied());
        let output = OutputProbabilities {
            full: last("all"),
            base: last("none"),
            top_dropped: half.checked_sub(1).and_then(|h| last(&LayerMask::keep_through(h).to_string())),
            bottom_dropped: last(&LayerMask::from_layers(half..l).to_string()),
        };
        RunSummary {
            label: format!("{} · {}", r.model_name(), r.config.task),
            num_layers: r.num_layers,
            rise,
            searched: r.search.boundary,
            searched_depth: depth(r.search.boundary),
            smallest_safe,
            metric: r.sweep.first().or(full).and_then(|e| e.scores.first()).map_or_else(String::new, |s| s.0.clone()),
            full_score: full.and_then(|e| e.scores.first()).map(|s| s.1),
            base_score: base.and_then(|e| e.scores.first()).map(|s| s.1),
            output,
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.digits$}"))
}

/// A Markdown table of the summaries, one row per run: curve rules' boundaries (and their depth), the searched
/// boundary, the smallest boundary with no measurable test loss (and the LoRA kept there), the test scores of
/// full LoRA and base, and the output-layer probabilities of the Fig. 2 ablation.
pub fn markdown_table(runs: &[RunSummary]) -> String {
    let mut s = String::from(
        "| run | L | curve rules: b (depth (b+1)/L) | searched b (depth) | smallest b with no measurable loss (LoRA kept) \
         | test score full / base | output P: full / top half dropped / bottom half dropped | Fig. 2 pattern |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let rules: Vec<String> = r
            .rise
            .iter()
            .map(|p| match (p.boundary, p.depth) {
                (Some(b), Some(d)) => format!("{} {b} ({d:.2})", p.rule),
                _ => format!("{} —", p.rule),
            })
            .collect();
        let safe = r.smallest_safe.map_or_else(|| "—".to_string(), |(b, kept)| format!("{b} ({:.0} %)", kept * 100.0));
        let o = &r.output;
        let fig2 = match o.fig2_pattern_holds() {
            Some(true) => "holds",
            Some(false) => "does not hold",
            None => "—",
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} ({:.2}) | {} | {} {} / {} | {} / {} / {} | {} |\n",
            r.label,
            r.num_layers,
            rules.join("; "),
            r.searched,
            r.searched_depth,
            safe,
            r.metric,
            opt(r.full_score, 3),
            opt(r.base_score, 3),
            opt(o.full, 3),
            opt(o.top_dropped, 3),
            opt(o.bottom_dropped, 3),
            fig2
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn committed(task: &str) -> PipelineReport {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/results").join(task);
        PipelineReport::load(&root).unwrap()
    }

    /// The numbers docs/results.md quotes for SmolLM2 come out of the committed reports.
    #[test]
    fn summarises_the_committed_smollm2_reports() {
        let e2e = RunSummary::from_report(&committed("e2e"));
        assert_eq!(e2e.num_layers, 30);
        assert_eq!(e2e.label, "SmolLM2-135M-Instruct.Q4_1 · e2e");
        let rules: Vec<Option<usize>> = e2e.rise.iter().map(|p| p.boundary).collect();
        assert_eq!(rules, [Some(29), Some(28), Some(21)], "steepest rise, threshold, knee");
        assert_eq!(e2e.rise[2].depth, Some(22.0 / 30.0));
        assert_eq!(e2e.searched, 29);
        assert!((e2e.full_score.unwrap() - 50.06).abs() < 5e-3, "corpus BLEU of full LoRA, as results.md");
        // Sweep: 14 loses (CI [−11.7, −3.3]), 19 and up do not.
        assert_eq!(e2e.smallest_safe.map(|s| s.0), Some(19));
        assert!((e2e.smallest_safe.unwrap().1 - 20.0 / 30.0).abs() < 1e-9);

        let sci = RunSummary::from_report(&committed("scitldr"));
        // results.md: top half dropped 0.283, bottom half dropped 0.307, full 0.316: Fig. 2 does not hold.
        assert!((sci.output.full.unwrap() - 0.316).abs() < 5e-4);
        assert!((sci.output.top_dropped.unwrap() - 0.283).abs() < 5e-4);
        assert!((sci.output.bottom_dropped.unwrap() - 0.307).abs() < 5e-4);
        assert_eq!(sci.output.fig2_pattern_holds(), Some(false));
        let hq = RunSummary::from_report(&committed("hotpotqa"));
        assert_eq!(hq.output.fig2_pattern_holds(), Some(true), "0.289 vs 0.275 around full 0.285");

        let table = markdown_table(&[e2e, sci]);
        assert_eq!(table.lines().count(), 4, "header, rule, two rows");
        assert!(table.contains("| SmolLM2-135M-Instruct.Q4_1 · e2e | 30 | steepest rise 29 (1.00); threshold τ = 0.5 28 (0.97); knee 21 (0.73) | 29 (1.00) | 19 (67 %) |"), "{table}");
        assert!(table.contains("does not hold"));
    }
}
