//! SVG plots of probe curves: probability vs layer, one line per mask, 95% CI bands; and [`style`], the figure
//! style every plot of the workspace shares.
use std::path::Path;

pub mod style;

use style::{Frame, Glyph, LegendEntry, Stroke};

use crate::error::{ProbeError, Result};
use crate::result::{write_atomic, ProbeResult};

/// Which curve a plot shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlotMetric {
    /// Probability of the answer token (with CI bands).
    #[default]
    GtProb,
    /// Max probability (with CI bands).
    MaxProb,
}

impl ProbeResult {
    /// Renders the answer-token probability vs layer as SVG (see [`ProbeResult::plot_svg_metric`]).
    pub fn render_svg(&self, metric: PlotMetric) -> Result<String> {
        let mut svg = String::new();
        self.draw(&mut svg, metric, &[]).map_err(|message| ProbeError::InvalidArgument(format!("plot: {message}")))?;
        Ok(svg)
    }

    /// Writes the answer-token probability vs layer to `path` as SVG with vertical marks `(label, boundary)`:
    /// a boundary `b` (LoRA on blocks `0..=b`) is drawn at point `b + 1`, the state after block `b`.
    pub fn plot_svg_marked(&self, path: impl AsRef<Path>, marks: &[(String, usize)]) -> Result<()> {
        let path = path.as_ref();
        let mut svg = String::new();
        self.draw(&mut svg, PlotMetric::GtProb, marks)
            .map_err(|message| ProbeError::Plot { path: path.to_path_buf(), message })?;
        write_atomic(path, svg.as_bytes())
    }

    /// Writes the answer-token probability vs layer (one line per mask, 95% CI bands) to `path` as SVG, atomically.
    pub fn plot_svg(&self, path: impl AsRef<Path>) -> Result<()> {
        self.plot_svg_metric(path, PlotMetric::GtProb)
    }

    /// Writes the chosen metric vs layer (one line per mask, 95% CI bands) to `path` as SVG, atomically.
    pub fn plot_svg_metric(&self, path: impl AsRef<Path>, metric: PlotMetric) -> Result<()> {
        let path = path.as_ref();
        let mut svg = String::new();
        self.draw(&mut svg, metric, &[]).map_err(|message| ProbeError::Plot { path: path.to_path_buf(), message })?;
        write_atomic(path, svg.as_bytes())
    }

    fn draw(&self, svg: &mut String, metric: PlotMetric, marks: &[(String, usize)]) -> std::result::Result<(), String> {
        struct Line<'a> {
            mask: &'a str,
            mean: &'a [f64],
            low: &'a [f64],
            high: &'a [f64],
        }
        let lines: Vec<Line<'_>> = self
            .curves
            .iter()
            .map(|c| match metric {
                PlotMetric::GtProb => {
                    Line { mask: &c.mask, mean: &c.gt_prob, low: &c.gt_prob_ci_low, high: &c.gt_prob_ci_high }
                }
                PlotMetric::MaxProb => {
                    Line { mask: &c.mask, mean: &c.max_prob, low: &c.max_prob_ci_low, high: &c.max_prob_ci_high }
                }
            })
            .collect();
        let y_max = lines
            .iter()
            .flat_map(|l| l.mean.iter().chain(l.high.iter()))
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let y_max = if y_max > 0.0 { (y_max * 1.08).min(1.0) } else { 1.0 };
        let (what, y_desc) = match metric {
            PlotMetric::GtProb => ("Answer-token probability", "P(answer token), mean over the first k tokens"),
            PlotMetric::MaxProb => ("Largest token probability", "max P, mean over the first k positions"),
        };
        let mut frame = Frame::integer_x(
            format!(
                "{what} by layer ({}, k = {}, {} samples; shaded: 95% bootstrap CI)",
                self.mode, self.k, self.num_samples
            ),
            "i = hidden state after i blocks (0 = embeddings); a boundary b is drawn at i = b + 1".into(),
            y_desc.into(),
            0,
            self.num_layers.max(1) as i64,
            0.0,
        );
        frame.y_range = 0.0..y_max;
        let mut legend: Vec<LegendEntry> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| LegendEntry::new(mask_label(l.mask), Glyph::Band(style::series_color(i))))
            .collect();
        legend.extend(
            marks.iter().enumerate().map(|(j, (label, _))| {
                LegendEntry::new(label.clone(), Glyph::Line(Stroke::mark(style::mark_color(j))))
            }),
        );
        *svg = style::render_figure(&frame, &legend, |chart| {
            for (i, l) in lines.iter().enumerate() {
                let color = style::series_color(i);
                let xs: Vec<usize> = (0..l.mean.len()).collect();
                // Every layer has a value: the CI is a band (when the CI has one value per layer).
                if style::is_dense(&xs) && l.low.len() == l.mean.len() && l.high.len() == l.mean.len() {
                    let band: Vec<(f64, [f64; 2])> =
                        l.low.iter().zip(l.high).enumerate().map(|(p, (&lo, &hi))| (p as f64, [lo, hi])).collect();
                    style::draw_band(chart, &band, color)?;
                }
                let points = l.mean.iter().enumerate().map(|(p, &v)| (p as f64, v)).collect();
                style::draw_line(chart, points, Stroke::series(color))?;
            }
            for (j, (_, b)) in marks.iter().enumerate() {
                style::draw_vline(chart, (*b + 1) as f64, Stroke::mark(style::mark_color(j)))?;
            }
            Ok(())
        })?;
        Ok(())
    }
}

/// A probe mask's legend text: `all` is full LoRA, `none` the base model, a block list says where LoRA is kept.
pub fn mask_label(mask: &str) -> String {
    match mask {
        "all" => "full LoRA (all blocks)".into(),
        "none" => "base (no LoRA)".into(),
        m if m.chars().all(|c| c.is_ascii_digit() || c == '-' || c == ',') => {
            format!("LoRA on blocks {}", m.replace('-', "–").replace(',', ", "))
        }
        m => format!("LoRA: {m}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ProbeMode;
    use crate::result::MaskCurve;

    fn curve(mask: &str, n: usize) -> MaskCurve {
        let p: Vec<f64> = (0..n).map(|i| i as f64 / n as f64).collect();
        MaskCurve {
            mask: mask.into(),
            gt_prob: p.clone(),
            max_prob: p.clone(),
            gt_rank: vec![1.0; n],
            entropy: vec![1.0; n],
            gt_prob_ci_low: p.iter().map(|v| v * 0.9).collect(),
            gt_prob_ci_high: p.iter().map(|v| v * 1.1).collect(),
            max_prob_ci_low: p.clone(),
            max_prob_ci_high: p,
            gt_prob_per_position: Vec::new(),
            max_prob_per_position: Vec::new(),
            position_counts: Vec::new(),
            per_sample: Default::default(),
        }
    }

    fn result(layers: usize) -> ProbeResult {
        ProbeResult {
            num_layers: layers,
            k: 4,
            mode: ProbeMode::Teacher,
            num_samples: 8,
            bootstrap_resamples: 100,
            seed: 0,
            curves: vec![curve("all", layers + 1), curve("none", layers + 1), curve("0-14", layers + 1)],
            differences: Vec::new(),
        }
    }

    /// The texts of the x tick labels: `<text>` elements whose `y` is the lowest tick row (below the plot area).
    fn texts(svg: &str) -> Vec<(f64, String)> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let y: f64 = t.split("y=\"").nth(1)?.split('"').next()?.parse().ok()?;
                let body = t.split('>').nth(1)?.split('<').next()?.trim().to_string();
                Some((y, body))
            })
            .collect()
    }

    #[test]
    fn probe_plot_has_integer_ticks_bands_and_explained_marks() {
        let r = result(30);
        let marks = vec![("searched boundary b = 16 (LoRA on blocks 0–16)".to_string(), 16)];
        let mut svg = String::new();
        r.draw(&mut svg, PlotMetric::GtProb, &marks).unwrap();
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polygon").count(), 3, "one CI band per dense curve");
        for label in ["full LoRA (all blocks)", "base (no LoRA)", "LoRA on blocks 0–14", &marks[0].0, "b + 1"] {
            assert!(svg.contains(label), "missing {label}");
        }
        // The x tick labels: the row of texts just under the plot area holds 0, 2, …, 30.
        let ticks: Vec<String> = {
            let all = texts(&svg);
            let row = all.iter().filter(|(_, s)| s == "30").map(|(y, _)| *y).fold(f64::NAN, f64::max);
            all.into_iter().filter(|(y, _)| (*y - row).abs() < 0.5).map(|(_, s)| s).collect()
        };
        assert_eq!(ticks, (0..=30).step_by(2).map(|i| i.to_string()).collect::<Vec<_>>());
    }

    #[test]
    fn mask_labels_say_where_lora_is() {
        assert_eq!(mask_label("15-29"), "LoRA on blocks 15–29");
        assert_eq!(mask_label("0-9,20-29"), "LoRA on blocks 0–9, 20–29");
        assert_eq!(mask_label("0-14@attn"), "LoRA: 0-14@attn");
    }
}
