//! The one figure style of the workspace: every plot (probe curves here; search, proxy, sweep and the depth
//! comparison in `lora-boundary`) is drawn through [`render_figure`] with the palette, fonts, grid and legend
//! defined in this module, so the figures of a report look like one set.
//!
//! Conventions a reader of the figures can rely on:
//! - layers and boundaries are integers, so integer axes get integer ticks only ([`integer_ticks`]), at most
//!   [`MAX_TICKS`] labels with a step of 1, 2 or 5 (times a power of ten);
//! - a filled 95% band is drawn only for a series that has a value at every integer of its range
//!   ([`is_dense`]); sparse series get error bars (a vertical line with short caps) and no polygon;
//! - boundaries are dashed vertical lines in colours of their own ([`mark_color`]), reference levels are thin
//!   dotted grey lines ([`REFERENCE`]), and every line is named in the legend under the plot.
use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Font family of every text.
pub const FONT: &str = "sans-serif";
/// Title size in pixels.
pub const TITLE_PX: f64 = 17.0;
/// Axis-description size in pixels.
pub const AXIS_PX: f64 = 14.0;
/// Tick-label size in pixels.
pub const TICK_PX: f64 = 12.0;
/// Legend text size in pixels.
pub const LEGEND_PX: f64 = 12.0;
/// Figure width in pixels.
pub const WIDTH: u32 = 800;
/// Height of the chart part (title, axes, data); the legend is added below it.
pub const CHART_HEIGHT: u32 = 460;
/// Most x tick labels on an integer axis.
pub const MAX_TICKS: usize = 16;

/// The palette (Okabe–Ito, colour-blind safe, without its yellow): series take colours from the front
/// ([`series_color`]), boundary marks from the back ([`mark_color`]).
pub const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),   // blue
    RGBColor(213, 94, 0),    // vermillion
    RGBColor(0, 158, 115),   // bluish green
    RGBColor(204, 121, 167), // reddish purple
    RGBColor(86, 180, 233),  // sky blue
    RGBColor(230, 159, 0),   // orange
    RGBColor(0, 0, 0),       // black
];
/// Reference levels (full LoRA, base): dark and mid grey, dotted.
pub const REFERENCE: [RGBColor; 2] = [RGBColor(70, 70, 70), RGBColor(150, 150, 150)];
/// Major grid lines.
pub const GRID: RGBColor = RGBColor(228, 228, 228);
/// Axis lines, ticks and text.
pub const INK: RGBColor = RGBColor(30, 30, 30);
/// Opacity of a CI band's fill.
pub const BAND_OPACITY: f64 = 0.18;
/// Half-width of an error bar's caps, pixels.
pub const CAP_PX: i32 = 4;
/// Radius of a point marker, pixels.
pub const MARKER_PX: i32 = 3;

/// Colour of series `i` (cycled).
pub fn series_color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Colour of boundary mark `j` (taken from the back of the palette, so marks differ from the first series).
pub fn mark_color(j: usize) -> RGBColor {
    PALETTE[PALETTE.len() - 1 - j % PALETTE.len()]
}

/// Colour of reference line `i` (cycled greys).
pub fn reference_color(i: usize) -> RGBColor {
    REFERENCE[i % REFERENCE.len()]
}

/// How a line is stroked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dash {
    /// Continuous.
    #[default]
    Solid,
    /// Long dashes (boundary marks; a second model in a comparison).
    Dashed,
    /// Short dots (reference levels; a third model).
    Dotted,
}

impl Dash {
    /// The `i`-th style of the cycle solid, dashed, dotted.
    pub fn nth(i: usize) -> Dash {
        [Dash::Solid, Dash::Dashed, Dash::Dotted][i % 3]
    }
}

/// A line's colour, width and dash.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stroke {
    /// Colour.
    pub color: RGBColor,
    /// Width in pixels.
    pub width: u32,
    /// Dash pattern.
    pub dash: Dash,
}

impl Stroke {
    /// A data series: 2 px, solid.
    pub fn series(color: RGBColor) -> Stroke {
        Stroke { color, width: 2, dash: Dash::Solid }
    }

    /// A boundary mark: 2 px, dashed.
    pub fn mark(color: RGBColor) -> Stroke {
        Stroke { color, width: 2, dash: Dash::Dashed }
    }

    /// A reference level: 1 px, dotted.
    pub fn reference(color: RGBColor) -> Stroke {
        Stroke { color, width: 1, dash: Dash::Dotted }
    }
}

/// What a legend entry shows beside its text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Glyph {
    /// A line.
    Line(Stroke),
    /// A line over a shaded patch (a series with a CI band).
    Band(RGBColor),
    /// A line with a point and an error bar (a sparse series with CIs).
    ErrorBar(RGBColor),
    /// A line with a point marker (a series without CIs).
    Points(RGBColor),
    /// A point marker alone.
    Marker(RGBColor),
}

/// One row of a legend.
#[derive(Debug, Clone, PartialEq)]
pub struct LegendEntry {
    /// The text.
    pub label: String,
    /// The symbol.
    pub glyph: Glyph,
}

impl LegendEntry {
    /// An entry.
    pub fn new(label: impl Into<String>, glyph: Glyph) -> LegendEntry {
        LegendEntry { label: label.into(), glyph }
    }
}

/// Title, axes and ranges of a figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Title above the chart.
    pub title: String,
    /// What the x axis is.
    pub x_desc: String,
    /// What the y axis is.
    pub y_desc: String,
    /// Shown x range.
    pub x_range: Range<f64>,
    /// X tick positions (their labels are printed with `x_decimals` decimals).
    pub x_ticks: Vec<f64>,
    /// Decimals of the x tick labels: 0 for layer and boundary axes.
    pub x_decimals: usize,
    /// Shown y range.
    pub y_range: Range<f64>,
}

impl Frame {
    /// A frame whose x axis counts layers or boundaries `lo..=hi`: integer ticks ([`integer_ticks`]) and
    /// `pad` of room on both sides.
    pub fn integer_x(title: String, x_desc: String, y_desc: String, lo: i64, hi: i64, pad: f64) -> Frame {
        let hi = hi.max(lo + 1);
        Frame {
            title,
            x_desc,
            y_desc,
            x_range: (lo as f64 - pad)..(hi as f64 + pad),
            x_ticks: integer_ticks(lo, hi, MAX_TICKS).into_iter().map(|t| t as f64).collect(),
            x_decimals: 0,
            y_range: 0.0..1.0,
        }
    }
}

/// A linear f64 axis whose ticks (and grid lines) are exactly the given positions.
pub struct FixedTicks {
    linear: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ranged for FixedTicks {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Bold points only: no light mesh.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.linear.range()
    }
}

/// The chart every figure draws on: x with fixed tick positions, y linear.
pub type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<FixedTicks, RangedCoordf64>>;

/// The tick step for an integer axis spanning `span` units: the smallest of 1, 2, 5, 10, 20, 50, … that keeps
/// the number of ticks at most `max_ticks` (at least 2 ticks are assumed).
pub fn tick_step(span: u64, max_ticks: usize) -> u64 {
    let intervals = max_ticks.max(2) as u64 - 1;
    let mut power = 1u64;
    loop {
        for m in [1, 2, 5] {
            let step = m * power;
            if span.div_ceil(step) <= intervals {
                return step;
            }
        }
        power = power.saturating_mul(10);
    }
}

/// Integer ticks on `lo..=hi`: every multiple of [`tick_step`] in the range.
pub fn integer_ticks(lo: i64, hi: i64, max_ticks: usize) -> Vec<i64> {
    if hi < lo {
        return Vec::new();
    }
    let step = tick_step(hi.abs_diff(lo), max_ticks) as i64;
    let first = lo.div_euclid(step) * step + if lo.rem_euclid(step) == 0 { 0 } else { step };
    (0..).map(|n| first + n * step).take_while(|&t| t <= hi).collect()
}

/// The label of an x tick with `decimals` decimals (an integer axis prints `12`, never `12.0` or `2.5`).
pub fn tick_label(value: f64, decimals: usize) -> String {
    let v = if value == 0.0 { 0.0 } else { value }; // no "-0"
    format!("{v:.decimals$}")
}

/// Whether integer positions `xs` (any order) cover every integer from their smallest to their largest: the
/// condition for drawing a series' CI as a filled band rather than error bars.
pub fn is_dense(xs: &[usize]) -> bool {
    let mut v = xs.to_vec();
    v.sort_unstable();
    v.dedup();
    v.len() == xs.len() && v.windows(2).all(|w| w[1] == w[0] + 1)
}

fn font(px: f64) -> TextStyle<'static> {
    (FONT, px).into_font().color(&INK)
}

/// Text width estimate in pixels (sans-serif averages about 0.55 em per character).
fn text_px(s: &str, px: f64) -> f64 {
    s.chars().count() as f64 * px * 0.55
}

const LEGEND_ROW: u32 = 20;
const LEGEND_LEFT: i32 = 70;
const GLYPH_W: i32 = 28;

/// Legend columns: two when every label fits half the width.
fn legend_columns(entries: &[LegendEntry]) -> usize {
    let half = (WIDTH as i32 - LEGEND_LEFT) / 2 - GLYPH_W - 16;
    if entries.iter().all(|e| text_px(&e.label, LEGEND_PX) <= half as f64) {
        2
    } else {
        1
    }
}

/// Renders a figure: title, light grid, axes with `frame`'s descriptions and ticks, whatever `draw` puts on the
/// chart, and `legend` in rows under the chart. Returns the SVG document.
pub fn render_figure(
    frame: &Frame,
    legend: &[LegendEntry],
    draw: impl FnOnce(&mut Chart<'_, '_>) -> Result<(), String>,
) -> Result<String, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    if !(frame.x_range.start < frame.x_range.end && frame.y_range.start < frame.y_range.end) {
        return Err(format!("empty axis range x {:?}, y {:?}", frame.x_range, frame.y_range));
    }
    let columns = legend_columns(legend);
    let rows = legend.len().div_ceil(columns) as u32;
    let legend_h = if rows == 0 { 0 } else { rows * LEGEND_ROW + 12 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, CHART_HEIGHT + legend_h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, bottom) = root.split_vertically(CHART_HEIGHT);
        let decimals = frame.x_decimals;
        let x_fmt = move |v: &f64| tick_label(*v, decimals);
        let mut chart = ChartBuilder::on(&top)
            .caption(&frame.title, font(TITLE_PX))
            .margin_top(10)
            .margin_left(10)
            .margin_right(25)
            .margin_bottom(5)
            .x_label_area_size(48)
            .y_label_area_size(62)
            .build_cartesian_2d(
                FixedTicks { linear: frame.x_range.clone().into(), ticks: frame.x_ticks.clone() },
                frame.y_range.clone(),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .bold_line_style(GRID.stroke_width(1))
            .light_line_style(TRANSPARENT)
            .max_light_lines(0)
            .axis_style(INK.stroke_width(1))
            .label_style(font(TICK_PX))
            .axis_desc_style(font(AXIS_PX))
            .x_label_formatter(&x_fmt)
            .y_labels(8)
            .x_desc(frame.x_desc.as_str())
            .y_desc(frame.y_desc.as_str())
            .draw()
            .map_err(|e| err(&e))?;
        draw(&mut chart)?;
        draw_legend(&bottom, legend, columns).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

fn draw_legend<'a>(
    area: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    legend: &[LegendEntry],
    columns: usize,
) -> Result<(), DrawingAreaErrorKind<<SVGBackend<'a> as DrawingBackend>::ErrorType>> {
    let col_w = (WIDTH as i32 - LEGEND_LEFT) / columns as i32;
    let rows = legend.len().div_ceil(columns);
    let text = font(LEGEND_PX).pos(Pos::new(HPos::Left, VPos::Center));
    for (n, entry) in legend.iter().enumerate() {
        // Column-major, so that series fill the first column and marks follow.
        let (col, row) = (n / rows.max(1), n % rows.max(1));
        let x = LEGEND_LEFT + col as i32 * col_w;
        let y = 6 + row as i32 * LEGEND_ROW as i32 + LEGEND_ROW as i32 / 2;
        let (x1, mid) = (x + GLYPH_W, x + GLYPH_W / 2);
        match entry.glyph {
            Glyph::Line(stroke) => draw_stroke(area, vec![(x, y), (x1, y)], stroke)?,
            Glyph::Band(color) => {
                area.draw(&Rectangle::new([(x, y - 6), (x1, y + 6)], color.mix(BAND_OPACITY).filled()))?;
                area.draw(&PathElement::new(vec![(x, y), (x1, y)], color.stroke_width(2)))?;
            }
            Glyph::ErrorBar(color) => {
                area.draw(&PathElement::new(vec![(x, y), (x1, y)], color.stroke_width(1)))?;
                area.draw(&PathElement::new(vec![(mid, y - 7), (mid, y + 7)], color.stroke_width(1)))?;
                for cy in [y - 7, y + 7] {
                    area.draw(&PathElement::new(vec![(mid - CAP_PX, cy), (mid + CAP_PX, cy)], color.stroke_width(1)))?;
                }
                area.draw(&Circle::new((mid, y), MARKER_PX, color.filled()))?;
            }
            Glyph::Points(color) => {
                area.draw(&PathElement::new(vec![(x, y), (x1, y)], color.stroke_width(1)))?;
                area.draw(&Circle::new((mid, y), MARKER_PX, color.filled()))?;
            }
            Glyph::Marker(color) => area.draw(&Circle::new((mid, y), MARKER_PX + 1, color.filled()))?,
        }
        area.draw(&Text::new(entry.label.clone(), (x1 + 8, y), text.clone()))?;
    }
    Ok(())
}

/// Draws a polyline in pixel coordinates with `stroke`'s dash.
fn draw_stroke<'a>(
    area: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    points: Vec<(i32, i32)>,
    stroke: Stroke,
) -> Result<(), DrawingAreaErrorKind<<SVGBackend<'a> as DrawingBackend>::ErrorType>> {
    let style = stroke.color.stroke_width(stroke.width);
    match stroke.dash {
        Dash::Solid => area.draw(&PathElement::new(points, style)),
        Dash::Dashed => area.draw(&DashedPathElement::new(points, 7, 4, style)),
        Dash::Dotted => area.draw(&DashedPathElement::new(points, 2, 3, style)),
    }
}

/// Draws a line through data points `points` with `stroke`.
pub fn draw_line(chart: &mut Chart<'_, '_>, points: Vec<(f64, f64)>, stroke: Stroke) -> Result<(), String> {
    let style = stroke.color.stroke_width(stroke.width);
    let drawn = match stroke.dash {
        Dash::Solid => chart.draw_series(std::iter::once(PathElement::new(points, style))).map(|_| ()),
        Dash::Dashed => chart.draw_series(std::iter::once(DashedPathElement::new(points, 7, 4, style))).map(|_| ()),
        Dash::Dotted => chart.draw_series(std::iter::once(DashedPathElement::new(points, 2, 3, style))).map(|_| ()),
    };
    drawn.map_err(|e| e.to_string())
}

/// Draws a vertical boundary mark at `x` across the y range.
pub fn draw_vline(chart: &mut Chart<'_, '_>, x: f64, stroke: Stroke) -> Result<(), String> {
    let y = chart.y_range();
    draw_line(chart, vec![(x, y.start), (x, y.end)], stroke)
}

/// Draws a horizontal reference level at `y` across the x range.
pub fn draw_hline(chart: &mut Chart<'_, '_>, y: f64, stroke: Stroke) -> Result<(), String> {
    let x = chart.x_range();
    draw_line(chart, vec![(x.start, y), (x.end, y)], stroke)
}

/// Fills the CI band `(x, [low, high])` of a dense series (see [`is_dense`]).
pub fn draw_band(chart: &mut Chart<'_, '_>, band: &[(f64, [f64; 2])], color: RGBColor) -> Result<(), String> {
    let mut polygon: Vec<(f64, f64)> = band.iter().map(|(x, ci)| (*x, ci[0])).collect();
    polygon.extend(band.iter().rev().map(|(x, ci)| (*x, ci[1])));
    chart
        .draw_series(std::iter::once(Polygon::new(polygon, color.mix(BAND_OPACITY).filled())))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Draws an error bar (vertical line from low to high, caps of [`CAP_PX`] at both ends) at each `(x, [low, high])`.
pub fn draw_error_bars(chart: &mut Chart<'_, '_>, bars: &[(f64, [f64; 2])], color: RGBColor) -> Result<(), String> {
    let style = color.stroke_width(1);
    let err = |e: &dyn std::fmt::Display| e.to_string();
    chart
        .draw_series(bars.iter().map(|(x, ci)| PathElement::new(vec![(*x, ci[0]), (*x, ci[1])], style)))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(bars.iter().flat_map(|(x, ci)| {
            ci.map(|y| EmptyElement::at((*x, y)) + PathElement::new(vec![(-CAP_PX, 0), (CAP_PX, 0)], style))
        }))
        .map_err(|e| err(&e))?;
    Ok(())
}

/// Draws a filled point marker at each point.
pub fn draw_markers(chart: &mut Chart<'_, '_>, points: &[(f64, f64)], color: RGBColor) -> Result<(), String> {
    chart
        .draw_series(points.iter().map(|p| Circle::new(*p, MARKER_PX, color.filled())))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_1_2_5_and_keep_at_most_max_labels() {
        assert_eq!(tick_step(10, 16), 1);
        assert_eq!(tick_step(15, 16), 1);
        assert_eq!(tick_step(29, 16), 2);
        assert_eq!(tick_step(30, 16), 2);
        assert_eq!(tick_step(31, 16), 5);
        assert_eq!(tick_step(62, 16), 5);
        assert_eq!(tick_step(200, 16), 20);
        assert_eq!(tick_step(0, 16), 1);
        for span in 0..500u64 {
            let ticks = integer_ticks(0, span as i64, MAX_TICKS);
            assert!(ticks.len() <= MAX_TICKS && ticks.len() >= 2.min(span as usize + 1), "span {span}: {ticks:?}");
            assert_eq!(ticks[0], 0);
        }
        assert_eq!(integer_ticks(0, 30, 16), (0..=30).step_by(2).collect::<Vec<_>>());
        assert_eq!(integer_ticks(3, 12, 4), vec![5, 10]);
        assert_eq!(integer_ticks(-3, 3, 16), (-3..=3).collect::<Vec<_>>());
    }

    #[test]
    fn integer_axes_print_integers() {
        let frame = Frame::integer_x("t".into(), "x".into(), "y".into(), 0, 29, 0.5);
        let labels: Vec<String> = frame.x_ticks.iter().map(|&t| tick_label(t, frame.x_decimals)).collect();
        assert!(labels.iter().all(|l| l.parse::<i64>().is_ok()), "{labels:?}");
        assert_eq!(labels.first().map(String::as_str), Some("0"));
        assert_eq!(tick_label(-0.0, 0), "0");
        assert_eq!(tick_label(0.5, 1), "0.5");
    }

    #[test]
    fn dense_means_every_integer_once() {
        assert!(is_dense(&[3, 4, 5]));
        assert!(is_dense(&[5, 3, 4]));
        assert!(is_dense(&[7]));
        assert!(!is_dense(&[0, 7, 14]));
        assert!(!is_dense(&[1, 1, 2]));
    }

    #[test]
    fn marks_and_series_differ_in_colour() {
        for i in 0..3 {
            for j in 0..3 {
                assert_ne!(series_color(i), mark_color(j));
            }
        }
    }
}
