//! The score-vs-boundary plot (the paper's Fig. 4): a task score for `keep_through(b)` against `b`, with a 95%
//! band, reference lines for full LoRA and the base model, and the chosen boundaries marked.
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};

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
#[derive(Debug, Clone, Default)]
pub struct BoundaryPlot {
    /// Title.
    pub title: String,
    /// Y-axis label.
    pub y_label: String,
    /// Number of decoder blocks (the x axis runs `0..L-1`).
    pub num_layers: usize,
    /// The points, any order.
    pub points: Vec<BoundaryPoint>,
    /// Horizontal reference lines `(label, value)`, e.g. full LoRA and base.
    pub references: Vec<(String, f64)>,
    /// Vertical marks `(label, boundary)`, e.g. the manual and searched boundaries.
    pub marks: Vec<(String, usize)>,
}

const BLUE: RGBColor = RGBColor(31, 119, 180);
const LINES: [RGBColor; 4] =
    [RGBColor(44, 160, 44), RGBColor(127, 127, 127), RGBColor(214, 39, 40), RGBColor(148, 103, 189)];

impl BoundaryPlot {
    /// Renders the plot as an SVG document.
    pub fn render(&self) -> Result<String> {
        let mut svg = String::new();
        self.draw(&mut svg).map_err(|m| Error::Usage(format!("plot `{}`: {m}", self.title)))?;
        Ok(svg)
    }

    /// Writes the plot to `path` as SVG, atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let svg = self.render()?;
        crate::pipeline::write_text(path, &svg)
    }

    fn draw(&self, svg: &mut String) -> std::result::Result<(), String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
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
        let x_max = self.num_layers.saturating_sub(1).max(1) as f64;
        let root = SVGBackend::with_string(svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..x_max + 0.5, (lo - pad)..(hi + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("boundary b (LoRA kept on blocks 0..=b)")
            .y_desc(self.y_label.as_str())
            .x_labels(self.num_layers.clamp(2, 16))
            .draw()
            .map_err(|e| err(&e))?;
        let banded: Vec<(f64, [f64; 2])> = pts.iter().filter_map(|p| p.band.map(|b| (p.boundary as f64, b))).collect();
        if banded.len() >= 2 {
            let mut poly: Vec<(f64, f64)> = banded.iter().map(|(x, b)| (*x, b[0])).collect();
            poly.extend(banded.iter().rev().map(|(x, b)| (*x, b[1])));
            chart.draw_series(std::iter::once(Polygon::new(poly, BLUE.mix(0.18)))).map_err(|e| err(&e))?;
        }
        for (x, b) in &banded {
            chart
                .draw_series(std::iter::once(PathElement::new(vec![(*x, b[0]), (*x, b[1])], BLUE.mix(0.6))))
                .map_err(|e| err(&e))?;
        }
        chart
            .draw_series(LineSeries::new(pts.iter().map(|p| (p.boundary as f64, p.value)), BLUE.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("keep_through(b)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new((p.boundary as f64, p.value), 3, BLUE.filled())))
            .map_err(|e| err(&e))?;
        let lines = self
            .references
            .iter()
            .map(|(l, v)| (l, *v, true))
            .chain(self.marks.iter().map(|(l, b)| (l, *b as f64, false)));
        for (i, (label, v, horizontal)) in lines.enumerate() {
            let color = LINES[i % LINES.len()];
            let path = if horizontal { vec![(-0.5, v), (x_max + 0.5, v)] } else { vec![(v, lo - pad), (v, hi + pad)] };
            chart
                .draw_series(std::iter::once(PathElement::new(path, color.stroke_width(1))))
                .map_err(|e| err(&e))?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_points_bands_references_and_marks() {
        let plot = BoundaryPlot {
            title: "BLEU vs boundary".into(),
            y_label: "BLEU".into(),
            num_layers: 30,
            points: (0..30)
                .step_by(5)
                .map(|b| BoundaryPoint { boundary: b, value: b as f64, band: Some([b as f64 - 1.0, b as f64 + 1.0]) })
                .collect(),
            references: vec![("full LoRA".into(), 29.0), ("base".into(), 2.0)],
            marks: vec![("searched b = 20".into(), 20)],
        };
        let svg = plot.render().unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("BLEU vs boundary"));
        for label in ["keep_through(b)", "full LoRA", "base", "searched b = 20"] {
            assert!(svg.contains(label), "legend lacks {label}");
        }
        assert_eq!(svg.matches("<circle").count(), 6, "one marker per point");
        let empty = BoundaryPlot { title: "x".into(), ..Default::default() };
        assert!(empty.render().is_err(), "nothing to plot is an error");
    }
}
