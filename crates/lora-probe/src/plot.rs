//! SVG plots of probe curves: probability vs layer, one line per mask, 95% CI bands.
use std::path::Path;

use plotters::prelude::*;

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

/// Tableau-10 colours, one per mask (cycled).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of a plot: label, means, CI low, CI high.
type Series<'a> = (&'a str, &'a [f64], &'a [f64], &'a [f64]);

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
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let series: Vec<Series<'_>> = self
            .curves
            .iter()
            .map(|c| match metric {
                PlotMetric::GtProb => (c.mask.as_str(), &c.gt_prob[..], &c.gt_prob_ci_low[..], &c.gt_prob_ci_high[..]),
                PlotMetric::MaxProb => {
                    (c.mask.as_str(), &c.max_prob[..], &c.max_prob_ci_low[..], &c.max_prob_ci_high[..])
                }
            })
            .collect();
        let y_max = series
            .iter()
            .flat_map(|s| s.1.iter().chain(s.3.iter()))
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let y_max = if y_max > 0.0 { (y_max * 1.1).min(1.0) } else { 1.0 };
        let x_max = self.num_layers.max(1) as f64;
        let (title, y_desc) = match metric {
            PlotMetric::GtProb => {
                (format!("Answer-token probability by layer ({}, k = {})", self.mode, self.k), "P(answer token)")
            }
            PlotMetric::MaxProb => (format!("Max probability by layer ({}, k = {})", self.mode, self.k), "max P"),
        };
        {
            let root = SVGBackend::with_string(svg, (800, 500)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| err(&e))?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 20))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..x_max, 0f64..y_max)
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_desc("layer (state after i blocks; 0 = embeddings)")
                .y_desc(y_desc)
                .x_labels(self.num_layers.clamp(2, 16) + 1)
                .draw()
                .map_err(|e| err(&e))?;
            for (i, (mask, mean, low, high)) in series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let mut band: Vec<(f64, f64)> = low.iter().enumerate().map(|(p, &v)| (p as f64, v)).collect();
                band.extend(high.iter().enumerate().rev().map(|(p, &v)| (p as f64, v)));
                chart.draw_series(std::iter::once(Polygon::new(band, color.mix(0.18)))).map_err(|e| err(&e))?;
                chart
                    .draw_series(LineSeries::new(
                        mean.iter().enumerate().map(|(p, &v)| (p as f64, v)),
                        color.stroke_width(2),
                    ))
                    .map_err(|e| err(&e))?
                    .label(format!("LoRA: {mask}"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
            for (j, (label, b)) in marks.iter().enumerate() {
                let color = COLORS[(series.len() + j) % COLORS.len()];
                let x = (*b + 1) as f64;
                chart
                    .draw_series(std::iter::once(PathElement::new(vec![(x, 0.0), (x, y_max)], color.stroke_width(1))))
                    .map_err(|e| err(&e))?
                    .label(label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
            root.present().map_err(|e| err(&e))?;
        }
        Ok(())
    }
}
