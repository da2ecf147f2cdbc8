//! The report's figures beyond the probe curves, all in the shared style of [`lora_probe::plot::style`]:
//! [`BoundaryPlot`], a score against the boundary `b` (the paper's Fig. 4, the search and the proxy), and
//! [`DepthComparisonPlot`], probe curves of several reports on a normalised depth axis.
use std::path::{Path, PathBuf};

use lora_probe::plot::style::{self, Frame, Glyph, LegendEntry, Stroke};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::pipeline::PipelineReport;

/// One boundary's score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BoundaryPoint {
    /// The boundary `b` (LoRA kept on blocks `0..=b`).
    pub boundary: usize,
    /// The score.
    pub value: f64,
    /// A 95% interval around it, when known.
    pub band: Option<[f64; 2]>,
}

/// What a score-vs-boundary plot shows.
///
/// The intervals are a filled band when the points cover every boundary of their range, error bars otherwise
/// (a polygon through a few scattered boundaries would suggest values nobody measured).
#[derive(Debug, Clone, Default)]
pub struct BoundaryPlot {
    /// Title.
    pub title: String,
    /// Y-axis label.
    pub y_label: String,
    /// Legend text of the points (default: `score of LoRA on blocks 0–b`).
    pub series_label: String,
    /// Number of decoder blocks (the x axis runs `0..L-1`).
    pub num_layers: usize,
    /// The points, any order.
    pub points: Vec<BoundaryPoint>,
    /// Horizontal reference lines `(label, value)`, e.g. full LoRA and base.
    pub references: Vec<(String, f64)>,
    /// Vertical marks `(label, boundary)`, e.g. the curve rule's and the searched boundary.
    pub marks: Vec<(String, usize)>,
}

impl BoundaryPlot {
    /// Renders the plot as an SVG document.
    pub fn render(&self) -> Result<String> {
        self.draw().map_err(|m| Error::Usage(format!("plot `{}`: {m}", self.title)))
    }

    /// Writes the plot to `path` as SVG, atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let svg = self.draw().map_err(|m| Error::Usage(format!("{}: plot `{}`: {m}", path.display(), self.title)))?;
        crate::pipeline::write_text(path, &svg)
    }

    /// Whether the intervals are drawn as a band: every point has one and the boundaries leave no gap.
    pub fn uses_band(&self) -> bool {
        let xs: Vec<usize> = self.points.iter().map(|p| p.boundary).collect();
        self.points.len() >= 2 && self.points.iter().all(|p| p.band.is_some()) && style::is_dense(&xs)
    }

    fn draw(&self) -> std::result::Result<String, String> {
        let mut pts = self.points.clone();
        pts.sort_by_key(|p| p.boundary);
        let values = pts
            .iter()
            .flat_map(|p| std::iter::once(p.value).chain(p.band.into_iter().flatten()))
            .chain(self.references.iter().map(|r| r.1))
            .filter(|v| v.is_finite());
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        if !lo.is_finite() {
            return Err("no finite values to plot".into());
        }
        let pad = ((hi - lo) * 0.08).max(1e-6);
        let last = self.num_layers.saturating_sub(1).max(1) as i64;
        let mut frame = Frame::integer_x(
            self.title.clone(),
            "boundary b (LoRA kept on blocks 0–b, removed above)".into(),
            self.y_label.clone(),
            0,
            last,
            0.5,
        );
        frame.y_range = (lo - pad)..(hi + pad);
        let color = style::series_color(0);
        let band = self.uses_band();
        let has_ci = pts.iter().any(|p| p.band.is_some());
        let series_label = if self.series_label.is_empty() {
            "score of LoRA on blocks 0–b".to_string()
        } else {
            self.series_label.clone()
        };
        let glyph = match (band, has_ci) {
            (true, _) => Glyph::Band(color),
            (false, true) => Glyph::ErrorBar(color),
            (false, false) => Glyph::Points(color),
        };
        let mut legend = vec![LegendEntry::new(series_label, glyph)];
        legend.extend(
            self.references.iter().enumerate().map(|(i, (l, _))| {
                LegendEntry::new(l.clone(), Glyph::Line(Stroke::reference(style::reference_color(i))))
            }),
        );
        legend.extend(
            self.marks
                .iter()
                .enumerate()
                .map(|(j, (l, _))| LegendEntry::new(l.clone(), Glyph::Line(Stroke::mark(style::mark_color(j))))),
        );
        let cis: Vec<(f64, [f64; 2])> = pts.iter().filter_map(|p| p.band.map(|b| (p.boundary as f64, b))).collect();
        let xy: Vec<(f64, f64)> = pts.iter().map(|p| (p.boundary as f64, p.value)).collect();
        style::render_figure(&frame, &legend, |chart| {
            if band {
                style::draw_band(chart, &cis, color)?;
            } else {
                style::draw_error_bars(chart, &cis, color)?;
            }
            for (i, (_, v)) in self.references.iter().enumerate() {
                style::draw_hline(chart, *v, Stroke::reference(style::reference_color(i)))?;
            }
            for (j, (_, b)) in self.marks.iter().enumerate() {
                style::draw_vline(chart, *b as f64, Stroke::mark(style::mark_color(j)))?;
            }
            // A thin line through sparse points only guides the eye; a dense series is a curve.
            let width = if band || pts.len() > 12 { 2 } else { 1 };
            style::draw_line(chart, xy.clone(), Stroke { width, ..Stroke::series(color) })?;
            style::draw_markers(chart, &xy, color)
        })
    }
}

/// One report's curve in a [`DepthComparisonPlot`].
#[derive(Debug, Clone, PartialEq)]
pub struct DepthCurve {
    /// The model's name (legend; line style by model).
    pub model: String,
    /// The task's name (legend; colour by task).
    pub task: String,
    /// Decoder blocks `L`; `values` has `L + 1` points, point `i` drawn at `i / L`.
    pub num_layers: usize,
    /// The curve, one value per point `0..=L`.
    pub values: Vec<f64>,
    /// The searched boundary `b`, marked at `(b + 1) / L`.
    pub boundary: Option<usize>,
}

impl DepthCurve {
    /// The curve's legend text, `<model> · <task>`.
    pub fn label(&self) -> String {
        format!("{} · {}", self.model, self.task)
    }

    /// The points `(i / L, value)`.
    pub fn points(&self) -> Vec<(f64, f64)> {
        let l = self.num_layers.max(1) as f64;
        self.values.iter().enumerate().map(|(i, &v)| (i as f64 / l, v)).collect()
    }
}

/// Probe curves of several runs (models, tasks) on a normalised depth axis `i / L`, so that models with different
/// numbers of blocks compare: colour by task, line style (solid, dashed, dotted) by model, each run's searched
/// boundary a point on its curve.
#[derive(Debug, Clone, Default)]
pub struct DepthComparisonPlot {
    /// Title.
    pub title: String,
    /// Y-axis label.
    pub y_label: String,
    /// The curves, drawn in this order.
    pub curves: Vec<DepthCurve>,
}

impl DepthComparisonPlot {
    /// The comparison of `reports` (each with the file it came from, for messages): the probe curve of `mask`
    /// (`all` = full LoRA), divided by its own output-layer value when `relative`. A report without that mask,
    /// or (with `relative`) with a final value that is not a positive number, is a usage error naming its file.
    pub fn from_reports(reports: &[(PathBuf, PipelineReport)], mask: &str, relative: bool) -> Result<Self> {
        let mut curves = Vec::with_capacity(reports.len());
        for (path, r) in reports {
            let curve = r.probe.curve(mask).ok_or_else(|| {
                let have: Vec<&str> = r.probe.curves.iter().map(|c| c.mask.as_str()).collect();
                Error::Usage(format!(
                    "{}: no probe curve for mask `{mask}` (it has {})",
                    path.display(),
                    have.join(", ")
                ))
            })?;
            let mut values = curve.gt_prob.clone();
            if relative {
                let last = values.last().copied().unwrap_or(f64::NAN);
                if !(last.is_finite() && last > 0.0) {
                    return Err(Error::Usage(format!(
                        "{}: output-layer probability {last} of mask `{mask}` cannot scale a relative curve",
                        path.display()
                    )));
                }
                values.iter_mut().for_each(|v| *v /= last);
            }
            curves.push(DepthCurve {
                model: r.model_name(),
                task: r.config.task.to_string(),
                num_layers: r.probe.num_layers,
                values,
                boundary: Some(r.search.boundary),
            });
        }
        let what = lora_probe::plot::mask_label(mask);
        Ok(DepthComparisonPlot {
            title: if relative {
                format!("Answer-token probability relative to the output layer, {what}")
            } else {
                format!("Answer-token probability by normalised depth, {what}")
            },
            y_label: if relative {
                "P(answer token) / P at the output layer".into()
            } else {
                "P(answer token), mean over the first k tokens".into()
            },
            curves,
        })
    }

    /// Renders the plot as an SVG document.
    pub fn render(&self) -> Result<String> {
        self.draw().map_err(|m| Error::Usage(format!("plot `{}`: {m}", self.title)))
    }

    /// Writes the plot to `path` as SVG, atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let svg = self.draw().map_err(|m| Error::Usage(format!("{}: plot `{}`: {m}", path.display(), self.title)))?;
        crate::pipeline::write_text(path, &svg)
    }

    /// Each curve's stroke: colour by task, dash by model (in order of first appearance).
    pub fn strokes(&self) -> Vec<Stroke> {
        let mut tasks: Vec<&str> = Vec::new();
        let mut models: Vec<&str> = Vec::new();
        self.curves
            .iter()
            .map(|c| {
                let t = index_of(&mut tasks, &c.task);
                let m = index_of(&mut models, &c.model);
                Stroke { color: style::series_color(t), width: 2, dash: style::Dash::nth(m) }
            })
            .collect()
    }

    fn draw(&self) -> std::result::Result<String, String> {
        if self.curves.is_empty() {
            return Err("no curves to plot".into());
        }
        let hi =
            self.curves.iter().flat_map(|c| c.values.iter().copied()).filter(|v| v.is_finite()).fold(0.0, f64::max);
        let hi = if hi > 0.0 { hi * 1.08 } else { 1.0 };
        let frame = Frame {
            title: self.title.clone(),
            x_desc: "normalised depth i / L (0 = embeddings, 1 = output; boundary b at (b + 1) / L)".into(),
            y_desc: self.y_label.clone(),
            x_range: 0.0..1.0,
            x_ticks: (0..=10).map(|t| t as f64 / 10.0).collect(),
            x_decimals: 1,
            y_range: 0.0..hi,
        };
        let strokes = self.strokes();
        let mut legend: Vec<LegendEntry> =
            self.curves.iter().zip(&strokes).map(|(c, s)| LegendEntry::new(c.label(), Glyph::Line(*s))).collect();
        if self.curves.iter().any(|c| c.boundary.is_some()) {
            legend.push(LegendEntry::new("searched boundary b, at (b + 1) / L", Glyph::Marker(style::INK)));
        }
        style::render_figure(&frame, &legend, |chart| {
            for (c, s) in self.curves.iter().zip(&strokes) {
                style::draw_line(chart, c.points(), *s)?;
            }
            for (c, s) in self.curves.iter().zip(&strokes) {
                if let Some(p) = c.boundary.and_then(|b| c.points().get(b + 1).copied()) {
                    style::draw_markers(chart, &[p], s.color)?;
                }
            }
            Ok(())
        })
    }
}

/// The index of `key` in `seen`, appending it when new.
fn index_of<'a>(seen: &mut Vec<&'a str>, key: &'a str) -> usize {
    seen.iter().position(|s| *s == key).unwrap_or_else(|| {
        seen.push(key);
        seen.len() - 1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plot points `(x, y)` of every `<polyline>`, in pixels.
    fn polylines(svg: &str) -> Vec<(String, Vec<(f64, f64)>)> {
        svg.split("<polyline")
            .skip(1)
            .map(|p| {
                let stroke = p.split("stroke=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("").to_string();
                let pts = p.split("points=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("");
                let xy = pts
                    .split_whitespace()
                    .filter_map(|xy| xy.split_once(',').map(|(x, y)| (x.parse().unwrap(), y.parse().unwrap())))
                    .collect();
                (stroke, xy)
            })
            .collect()
    }

    /// Error-bar caps of colour `stroke`: horizontal two-point lines exactly `2 · CAP_PX` wide.
    fn caps(svg: &str, stroke: &str) -> usize {
        polylines(svg)
            .iter()
            .filter(|(s, p)| {
                s == stroke && p.len() == 2 && p[0].1 == p[1].1 && (p[1].0 - p[0].0).abs() == 2.0 * style::CAP_PX as f64
            })
            .count()
    }

    fn hex(c: plotters::style::RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    fn plot(boundaries: impl Iterator<Item = usize>, band: bool) -> BoundaryPlot {
        BoundaryPlot {
            title: "BLEU vs boundary".into(),
            y_label: "BLEU".into(),
            series_label: "test BLEU (bars: paired 95% CI vs full LoRA)".into(),
            num_layers: 30,
            points: boundaries
                .map(|b| BoundaryPoint {
                    boundary: b,
                    value: b as f64,
                    band: band.then_some([b as f64 - 1.0, b as f64 + 1.0]),
                })
                .collect(),
            references: vec![("full LoRA (all 30 blocks)".into(), 29.0), ("base (no LoRA)".into(), 2.0)],
            marks: vec![
                ("curve rule (steepest rise) b = 29 (LoRA on blocks 0–29)".into(), 29),
                ("searched boundary b = 20 (LoRA on blocks 0–20)".into(), 20),
            ],
        }
    }

    #[test]
    fn sparse_points_get_error_bars_and_no_polygon() {
        let p = plot((0..30).step_by(5), true);
        assert!(!p.uses_band());
        let svg = p.render().unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("BLEU vs boundary"));
        assert_eq!(svg.matches("<polygon").count(), 0, "no band across sparse points");
        assert_eq!(
            caps(&svg, &hex(style::series_color(0))),
            2 * 6 + 2,
            "two caps per bar and point, two in the legend"
        );
        for label in [
            "test BLEU (bars: paired 95% CI vs full LoRA)",
            "full LoRA (all 30 blocks)",
            "base (no LoRA)",
            "curve rule (steepest rise) b = 29 (LoRA on blocks 0–29)",
            "searched boundary b = 20 (LoRA on blocks 0–20)",
        ] {
            assert!(svg.contains(label), "legend lacks {label}");
        }
        assert_eq!(svg.matches("<circle").count(), 6 + 1, "one marker per point, one in the legend");
        let empty = BoundaryPlot { title: "x".into(), ..Default::default() };
        assert!(empty.render().is_err(), "nothing to plot is an error");
    }

    #[test]
    fn dense_points_get_a_band_and_points_without_ci_get_neither() {
        let p = plot(10..20, true);
        assert!(p.uses_band());
        let svg = p.render().unwrap();
        assert_eq!(svg.matches("<polygon").count(), 1, "one band");
        assert_eq!(caps(&svg, &hex(style::series_color(0))), 0, "no error bars with a band");
        let svg = plot(0..30, false).render().unwrap();
        assert_eq!(svg.matches("<polygon").count(), 0);
        assert_eq!(caps(&svg, &hex(style::series_color(0))), 0);
    }

    #[test]
    fn boundary_axis_ticks_are_integers() {
        let svg = plot((0..30).step_by(7), true).render().unwrap();
        let labels: Vec<&str> =
            svg.split("<text").skip(1).filter_map(|t| t.split('>').nth(1)?.split('<').next()).map(str::trim).collect();
        for tick in (0..=28).step_by(2) {
            assert!(labels.contains(&tick.to_string().as_str()), "tick {tick} missing");
        }
        assert!(!labels.iter().any(|l| *l == "2.5" || *l == "2.0"), "no fractional boundary ticks");
    }

    fn depth(model: &str, task: &str, layers: usize, b: usize) -> DepthCurve {
        DepthCurve {
            model: model.into(),
            task: task.into(),
            num_layers: layers,
            values: (0..=layers).map(|i| (i as f64 / layers as f64).powi(3)).collect(),
            boundary: Some(b),
        }
    }

    #[test]
    fn depth_comparison_normalises_depth_and_styles_by_task_and_model() {
        let plot = DepthComparisonPlot {
            title: "cmp".into(),
            y_label: "P".into(),
            curves: vec![
                depth("SmolLM2", "e2e", 30, 16),
                depth("SmolLM2", "gsm8k", 30, 21),
                depth("gemma-3-270m", "e2e", 18, 9),
            ],
        };
        for c in &plot.curves {
            let pts = c.points();
            assert_eq!((pts[0].0, pts[pts.len() - 1].0), (0.0, 1.0), "x runs over [0, 1]");
        }
        let s = plot.strokes();
        assert_eq!(s[0].color, s[2].color, "same task, same colour");
        assert_ne!(s[0].color, s[1].color);
        assert_eq!((s[0].dash, s[1].dash, s[2].dash), (style::Dash::Solid, style::Dash::Solid, style::Dash::Dashed));
        let svg = plot.render().unwrap();
        // Two solid curves are one polyline each, with a point per layer.
        let long: Vec<_> = polylines(&svg).into_iter().filter(|(_, p)| p.len() == 31).collect();
        assert_eq!(long.len(), 2, "one path per solid curve");
        for (_, pts) in &long {
            let xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
            assert!(xs.windows(2).all(|w| w[0] < w[1]));
        }
        assert!(svg.contains("SmolLM2 · e2e") && svg.contains("gemma-3-270m · e2e"));
        assert_eq!(svg.matches("<circle").count(), 3 + 1, "a boundary point per curve and one in the legend");
        for tick in ["0.0", "0.5", "1.0"] {
            assert!(svg.contains(&format!("\n{tick}\n")), "tick {tick}");
        }
    }
}
