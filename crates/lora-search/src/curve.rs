//! Boundary detection on a probe curve (probability of the answer tokens versus depth).
//!
//! # Layer ↔ boundary convention
//!
//! A model has `L` decoder blocks, indexed `0..L`. A probe curve has `L + 1` points:
//! point `i` is the state **after `i` blocks** (point 0 = embeddings, point `L` = final
//! hidden state). The change between points `i - 1` and `i` is produced by block `i - 1`,
//! so the *first difference* `d_k = p[k + 1] - p[k]` is indexed by block `k`
//! (`k = 0..L`). A detected rise at curve point `i` therefore names **boundary
//! `b = i - 1`**: keep LoRA on blocks `0..=b` ("keep-through `b`").
//!
//! # Is there a rise at all?
//!
//! Every method first measures the largest rise anywhere on the curve,
//! `Δ = max_{i<j} (p[j] - p[i])`. The curve has **no clear rise** when `Δ < min_rise`
//! (default [`DEFAULT_MIN_RISE`]), or, when a confidence band is given, when no pair
//! `i < j` has `lower[j] > upper[i]` (the rise is not distinguishable from the noise). A
//! curve without a clear rise yields `boundary: None` rather than an invented boundary; the
//! method's own numbers are still reported as evidence.

use serde::{Deserialize, Serialize};

use crate::SearchError;

/// Smallest rise in probability (absolute) that [`detect`] accepts as a rise.
pub const DEFAULT_MIN_RISE: f64 = 0.1;

/// Smallest Kneedle difference-curve peak that counts as a knee (curves normalised to the unit square).
pub const MIN_KNEE: f64 = 0.05;

/// A probe curve: mean probability per point with an optional confidence band.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Curve {
    mean: Vec<f64>,
    lower: Option<Vec<f64>>,
    upper: Option<Vec<f64>>,
}

impl Curve {
    /// A curve without a confidence band. Needs at least 2 finite points.
    ///
    /// ```
    /// use lora_search::Curve;
    /// assert!(Curve::new(vec![0.0, 0.1, 0.9]).is_ok());
    /// assert!(Curve::new(vec![0.5]).is_err());
    /// ```
    pub fn new(mean: Vec<f64>) -> Result<Self, SearchError> {
        check_series(&mean, "mean")?;
        if mean.len() < 2 {
            return Err(SearchError::CurveTooShort { len: mean.len() });
        }
        Ok(Curve { mean, lower: None, upper: None })
    }

    /// A curve with a confidence band; requires `lower[i] <= mean[i] <= upper[i]`.
    pub fn with_ci(mean: Vec<f64>, lower: Vec<f64>, upper: Vec<f64>) -> Result<Self, SearchError> {
        let mut c = Curve::new(mean)?;
        check_series(&lower, "lower")?;
        check_series(&upper, "upper")?;
        for (series, v) in [("lower", &lower), ("upper", &upper)] {
            if v.len() != c.mean.len() {
                return Err(SearchError::CiLength { series, expected: c.mean.len(), got: v.len() });
            }
        }
        for (i, ((&l, &m), &u)) in lower.iter().zip(&c.mean).zip(&upper).enumerate() {
            if !(l <= m && m <= u) {
                return Err(SearchError::CiOrder { point: i, lower: l, mean: m, upper: u });
            }
        }
        c.lower = Some(lower);
        c.upper = Some(upper);
        Ok(c)
    }

    /// Mean probability per point (`L + 1` values).
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// Number of decoder blocks `L` the curve spans (points − 1).
    pub fn num_layers(&self) -> usize {
        self.mean.len() - 1
    }

    /// Lower confidence band, if any.
    pub fn lower(&self) -> Option<&[f64]> {
        self.lower.as_deref()
    }

    /// Upper confidence band, if any.
    pub fn upper(&self) -> Option<&[f64]> {
        self.upper.as_deref()
    }
}

fn check_series(v: &[f64], series: &'static str) -> Result<(), SearchError> {
    for (i, &x) in v.iter().enumerate() {
        if !x.is_finite() {
            return Err(SearchError::NonFiniteCurve { point: i, series, value: x });
        }
    }
    Ok(())
}

/// A curve-based detection method.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum Detection {
    /// Steepest sustained rise: the largest smoothed first difference.
    ///
    /// With `d_k = p[k+1] - p[k]` (block `k`) and half-width `h`, the smoothed difference is
    /// the clipped centred moving average `s_k = mean(d_j : j ∈ [k-h, k+h] ∩ [0, L-1])`.
    /// The window around `k* = argmax_k s_k` (first on ties) is the steepest sustained rise;
    /// the boundary is the block with the largest raw `d_j` inside that window (first on
    /// ties). `h = 0` is the plain largest single-block rise.
    SteepestRise {
        /// Half-width `h` of the moving-average window (window = `2h + 1` blocks).
        half_window: usize,
    },
    /// Threshold crossing: the first point reaching `τ ×` the final probability.
    ///
    /// `target = τ · p[L]`; the first point `i ≥ 1` with `p[i] ≥ target` gives boundary
    /// `b = i - 1`. If `p[0]` already reaches the target, or `p[L] ≤ 0`, there is no rise to
    /// locate. Requires `0 < τ ≤ 1`.
    Threshold {
        /// Fraction `τ` of the final probability.
        tau: f64,
    },
    /// Knee by Kneedle (Satopää et al., 2011) without smoothing.
    ///
    /// Normalise to the unit square: `x_i = i / L`,
    /// `y_i = (p[i] - min p) / (max p - min p)`. If `Σ (y_i - x_i) ≥ 0` the curve is
    /// *concave* (rises early, then saturates) and the difference curve is
    /// `D_i = y_i - x_i`; otherwise it is *convex* (flat, then rises late) and
    /// `D_i = x_i - y_i`. The knee is `k = argmax_i D_i` (first on ties); it counts only if
    /// `D_k ≥` [`MIN_KNEE`] (a straight ramp has no knee). Concave: the knee is where the rise
    /// has ended, so the boundary is the last rising block `b = k - 1`. Convex: the knee is the
    /// last flat point, so the boundary is the block that starts the rise, `b = k`.
    Knee,
}

/// Shape of the curve as judged by Kneedle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// Rises early, then saturates (`Σ (y - x) ≥ 0`).
    Concave,
    /// Flat, then rises late (`Σ (y - x) < 0`).
    Convex,
}

/// The global "is there a rise" check shared by all methods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RiseCheck {
    /// `Δ = max_{i<j} (p[j] - p[i])` (0 for a non-increasing curve).
    pub largest_rise: f64,
    /// Point `i` where that rise starts.
    pub from: usize,
    /// Point `j` where that rise ends.
    pub to: usize,
    /// The threshold `Δ` was compared with.
    pub min_rise: f64,
    /// With a band: whether some `i < j` has `lower[j] > upper[i]`; `None` without a band.
    pub ci_separated: Option<bool>,
    /// Whether the curve has a clear rise (`Δ ≥ min_rise` and `ci_separated != Some(false)`).
    pub clear: bool,
}

/// The numbers a method used, so that a reader can check its decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum Evidence {
    /// Evidence of [`Detection::SteepestRise`].
    SteepestRise {
        /// First differences `d_k`, one per block.
        diffs: Vec<f64>,
        /// Smoothed differences `s_k`, one per block.
        smoothed: Vec<f64>,
        /// Block at the centre of the steepest window (`k*`).
        centre: usize,
        /// Inclusive block window `[k* - h, k* + h]` clipped to the blocks.
        window: [usize; 2],
        /// `s_{k*}`.
        peak_smoothed: f64,
        /// Largest raw difference inside the window.
        peak_diff: f64,
    },
    /// Evidence of [`Detection::Threshold`].
    Threshold {
        /// `τ`.
        tau: f64,
        /// `p[L]`.
        final_prob: f64,
        /// `τ · p[L]`.
        target: f64,
        /// First point `i ≥ 1` with `p[i] ≥ target`, if the curve starts below the target.
        crossing_point: Option<usize>,
        /// `p[i]` at the crossing.
        value_at_crossing: Option<f64>,
        /// `p[i - 1]` just before the crossing.
        value_before: Option<f64>,
    },
    /// Evidence of [`Detection::Knee`].
    Knee {
        /// Shape decided from `Σ (y - x)`.
        shape: Shape,
        /// `Σ (y_i - x_i)`.
        area: f64,
        /// Normalised `y_i`.
        normalized: Vec<f64>,
        /// Difference curve `D_i`.
        difference: Vec<f64>,
        /// Knee point `k`.
        knee_point: usize,
        /// `D_k`.
        knee_value: f64,
    },
}

/// The outcome of [`detect`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detected {
    /// The method and its parameters.
    pub method: Detection,
    /// The boundary `b` (keep-through `b`), or `None` when the curve has no clear rise.
    pub boundary: Option<usize>,
    /// Curve point `b + 1` where the rise is located, when there is a boundary.
    pub point: Option<usize>,
    /// The shared rise check.
    pub rise: RiseCheck,
    /// The method's own numbers.
    pub evidence: Evidence,
    /// One line explaining the decision.
    pub note: String,
}

impl Detected {
    /// Whether a boundary was found.
    pub fn is_clear(&self) -> bool {
        self.boundary.is_some()
    }
}

/// Detects the boundary with `method`, requiring a rise of at least [`DEFAULT_MIN_RISE`].
///
/// ```
/// use lora_search::{detect, Curve, Detection};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // 6 blocks; the probability jumps between points 3 and 4, i.e. in block 3.
/// let c = Curve::new(vec![0.01, 0.02, 0.02, 0.03, 0.70, 0.80, 0.82])?;
/// let d = detect(&c, Detection::SteepestRise { half_window: 0 })?;
/// assert_eq!(d.boundary, Some(3));
/// let flat = Curve::new(vec![0.2; 7])?;
/// assert_eq!(detect(&flat, Detection::Knee)?.boundary, None);
/// # Ok(())
/// # }
/// ```
pub fn detect(curve: &Curve, method: Detection) -> Result<Detected, SearchError> {
    detect_with(curve, method, DEFAULT_MIN_RISE)
}

/// [`detect`] with an explicit minimum rise `min_rise ≥ 0` (absolute probability).
pub fn detect_with(curve: &Curve, method: Detection, min_rise: f64) -> Result<Detected, SearchError> {
    if !(min_rise.is_finite() && min_rise >= 0.0) {
        return Err(SearchError::InvalidDetection {
            name: "min_rise",
            value: min_rise.to_string(),
            why: "must be finite and >= 0",
        });
    }
    let p = curve.mean();
    let l = curve.num_layers();
    let rise = rise_check(curve, min_rise);
    let (found, evidence, mut note) = match method {
        Detection::SteepestRise { half_window } => steepest(p, l, half_window),
        Detection::Threshold { tau } => threshold(p, l, tau)?,
        Detection::Knee => knee(p, l),
    };
    let boundary = if rise.clear { found } else { None };
    if !rise.clear {
        note = format!(
            "no clear rise: largest rise {:.4} (points {}..{}) {}; method alone said: {note}",
            rise.largest_rise,
            rise.from,
            rise.to,
            if rise.largest_rise < min_rise {
                format!("is below min_rise {min_rise}")
            } else {
                "is inside the confidence band".to_string()
            }
        );
    }
    Ok(Detected { method, boundary, point: boundary.map(|b| b + 1), rise, evidence, note })
}

fn rise_check(curve: &Curve, min_rise: f64) -> RiseCheck {
    let p = curve.mean();
    let (mut best, mut from, mut to) = (0.0_f64, 0, 0);
    let mut min_idx = 0;
    for j in 1..p.len() {
        if p[j] - p[min_idx] > best {
            best = p[j] - p[min_idx];
            from = min_idx;
            to = j;
        }
        if p[j] < p[min_idx] {
            min_idx = j;
        }
    }
    let ci_separated = match (curve.lower(), curve.upper()) {
        (Some(lo), Some(up)) => {
            let mut min_up = f64::INFINITY;
            let mut sep = false;
            for j in 0..p.len() {
                if j > 0 && lo[j] > min_up {
                    sep = true;
                    break;
                }
                min_up = min_up.min(up[j]);
            }
            Some(sep)
        }
        _ => None,
    };
    RiseCheck {
        largest_rise: best,
        from,
        to,
        min_rise,
        ci_separated,
        clear: best >= min_rise && best > 0.0 && ci_separated != Some(false),
    }
}

fn steepest(p: &[f64], l: usize, h: usize) -> (Option<usize>, Evidence, String) {
    let diffs: Vec<f64> = (0..l).map(|k| p[k + 1] - p[k]).collect();
    let smoothed: Vec<f64> = (0..l)
        .map(|k| {
            let a = k.saturating_sub(h);
            let b = k.saturating_add(h).min(l - 1);
            diffs[a..=b].iter().sum::<f64>() / (b - a + 1) as f64
        })
        .collect();
    let centre = argmax_first(&smoothed);
    let a = centre.saturating_sub(h);
    let b = centre.saturating_add(h).min(l - 1);
    let inner = argmax_first(&diffs[a..=b]);
    let boundary = a + inner;
    let peak_smoothed = smoothed[centre];
    let peak_diff = diffs[boundary];
    let found = (peak_diff > 0.0).then_some(boundary);
    let note = match found {
        Some(bd) => format!(
            "steepest {}-block window centred on block {centre} rises {peak_smoothed:.4}/block; its largest step is block {bd} (+{peak_diff:.4})",
            b - a + 1
        ),
        None => "no block increases the probability".to_string(),
    };
    (found, Evidence::SteepestRise { diffs, smoothed, centre, window: [a, b], peak_smoothed, peak_diff }, note)
}

fn threshold(p: &[f64], l: usize, tau: f64) -> Result<(Option<usize>, Evidence, String), SearchError> {
    if !(tau.is_finite() && tau > 0.0 && tau <= 1.0) {
        return Err(SearchError::InvalidDetection { name: "tau", value: tau.to_string(), why: "must be in (0, 1]" });
    }
    let final_prob = p[l];
    let target = tau * final_prob;
    let (crossing, note) = if final_prob <= 0.0 {
        (None, "final probability is 0: nothing to reach".to_string())
    } else if p[0] >= target {
        (None, format!("the embeddings already reach the target {target:.4}"))
    } else {
        match (1..=l).find(|&i| p[i] >= target) {
            Some(i) => (
                Some(i),
                format!(
                    "point {i} is the first to reach {tau} x {final_prob:.4} = {target:.4} ({:.4} -> {:.4})",
                    p[i - 1],
                    p[i]
                ),
            ),
            None => (None, "no point reaches the target".to_string()),
        }
    };
    Ok((
        crossing.map(|i| i - 1),
        Evidence::Threshold {
            tau,
            final_prob,
            target,
            crossing_point: crossing,
            value_at_crossing: crossing.map(|i| p[i]),
            value_before: crossing.map(|i| p[i - 1]),
        },
        note,
    ))
}

fn knee(p: &[f64], l: usize) -> (Option<usize>, Evidence, String) {
    let lo = p.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = hi - lo;
    let normalized: Vec<f64> = p.iter().map(|&v| if span > 0.0 { (v - lo) / span } else { 0.0 }).collect();
    let x = |i: usize| i as f64 / l as f64;
    let area: f64 = normalized.iter().enumerate().map(|(i, y)| y - x(i)).sum();
    let shape = if area >= 0.0 { Shape::Concave } else { Shape::Convex };
    let difference: Vec<f64> = normalized
        .iter()
        .enumerate()
        .map(|(i, &y)| match shape {
            Shape::Concave => y - x(i),
            Shape::Convex => x(i) - y,
        })
        .collect();
    let k = argmax_first(&difference);
    let dk = difference[k];
    let found = if span <= 0.0 || dk < MIN_KNEE {
        None
    } else {
        match shape {
            Shape::Concave => k.checked_sub(1),
            Shape::Convex => (k < l).then_some(k),
        }
    };
    let note = match found {
        Some(b) => format!("{shape:?} curve, knee at point {k} (D = {dk:.4}) -> boundary {b}"),
        None => format!("no knee: largest difference D = {dk:.4} < {MIN_KNEE}"),
    };
    (found, Evidence::Knee { shape, area, normalized, difference, knee_point: k, knee_value: dk }, note)
}

/// Index of the first maximum (0 for an empty slice).
fn argmax_first(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigmoid_curve(l: usize, centre: f64, width: f64) -> Vec<f64> {
        (0..=l).map(|i| 0.9 / (1.0 + (-(i as f64 - centre) / width).exp())).collect()
    }

    #[test]
    fn step_curve_all_methods() {
        // L = 10; jump between points 6 and 7 => block 6.
        let mut p = vec![0.02; 7];
        p.extend([0.85, 0.88, 0.9, 0.9]);
        let c = Curve::new(p).unwrap();
        for h in 0..3 {
            let d = detect(&c, Detection::SteepestRise { half_window: h }).unwrap();
            assert_eq!(d.boundary, Some(6), "h={h}: {}", d.note);
            assert_eq!(d.point, Some(7));
        }
        let d = detect(&c, Detection::Threshold { tau: 0.5 }).unwrap();
        assert_eq!(d.boundary, Some(6));
        match d.evidence {
            Evidence::Threshold { target, crossing_point, .. } => {
                assert!((target - 0.45).abs() < 1e-12);
                assert_eq!(crossing_point, Some(7));
            }
            _ => panic!("wrong evidence"),
        }
        let d = detect(&c, Detection::Knee).unwrap();
        // Convex (flat then rise): knee is the last flat point 6 => block 6.
        assert_eq!(d.boundary, Some(6), "{}", d.note);
    }

    #[test]
    fn sigmoid_curve_methods_agree_near_centre() {
        let p = sigmoid_curve(24, 14.5, 1.0);
        let c = Curve::new(p).unwrap();
        let s = detect(&c, Detection::SteepestRise { half_window: 1 }).unwrap();
        // Largest difference between points 14 and 15 => block 14.
        assert_eq!(s.boundary, Some(14));
        let t = detect(&c, Detection::Threshold { tau: 0.5 }).unwrap();
        assert_eq!(t.boundary, Some(14));
        let k = detect(&c, Detection::Knee).unwrap();
        let b = k.boundary.unwrap();
        assert!((11..=17).contains(&b), "{b}");
    }

    #[test]
    fn concave_curve_knee_is_end_of_rise() {
        // Rises over blocks 0..=2 then saturates: knee at point 3 => boundary 2.
        let c = Curve::new(vec![0.0, 0.3, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]).unwrap();
        let d = detect(&c, Detection::Knee).unwrap();
        assert_eq!(d.boundary, Some(2), "{}", d.note);
        assert!(matches!(d.evidence, Evidence::Knee { shape: Shape::Concave, knee_point: 3, .. }));
    }

    #[test]
    fn flat_and_noisy_curves_have_no_clear_rise() {
        let c = Curve::new(vec![0.3, 0.31, 0.29, 0.3, 0.32, 0.3]).unwrap();
        for m in [Detection::SteepestRise { half_window: 1 }, Detection::Threshold { tau: 0.5 }, Detection::Knee] {
            let d = detect(&c, m).unwrap();
            assert!(!d.is_clear(), "{m:?}");
            assert!(!d.rise.clear);
            assert!(d.note.starts_with("no clear rise"));
        }
        // A big rise that the confidence band cannot separate.
        let mean = vec![0.1, 0.4, 0.45, 0.5];
        let c = Curve::with_ci(mean.clone(), vec![0.0; 4], vec![0.6; 4]).unwrap();
        let d = detect(&c, Detection::SteepestRise { half_window: 0 }).unwrap();
        assert_eq!(d.rise.ci_separated, Some(false));
        assert_eq!(d.boundary, None);
        // Same rise with a tight band is clear.
        let lo: Vec<f64> = mean.iter().map(|m| m - 0.01).collect();
        let up: Vec<f64> = mean.iter().map(|m| m + 0.01).collect();
        let c = Curve::with_ci(mean, lo, up).unwrap();
        let d = detect(&c, Detection::SteepestRise { half_window: 0 }).unwrap();
        assert_eq!(d.rise.ci_separated, Some(true));
        assert_eq!(d.boundary, Some(0));
    }

    #[test]
    fn straight_ramp_has_no_knee_but_a_threshold() {
        let c = Curve::new((0..=10).map(|i| i as f64 * 0.08).collect()).unwrap();
        assert_eq!(detect(&c, Detection::Knee).unwrap().boundary, None);
        let t = detect(&c, Detection::Threshold { tau: 0.5 }).unwrap();
        assert_eq!(t.boundary, Some(4)); // point 5 = 0.4 = 0.5 * 0.8
    }

    #[test]
    fn decreasing_curve_has_no_rise() {
        let c = Curve::new(vec![0.9, 0.5, 0.1]).unwrap();
        let d = detect(&c, Detection::SteepestRise { half_window: 0 }).unwrap();
        assert_eq!(d.boundary, None);
        assert_eq!(d.rise.largest_rise, 0.0);
    }

    #[test]
    fn bad_curves_are_errors() {
        assert_eq!(Curve::new(vec![]).unwrap_err(), SearchError::CurveTooShort { len: 0 });
        assert!(matches!(Curve::new(vec![0.0, f64::NAN]), Err(SearchError::NonFiniteCurve { point: 1, .. })));
        assert!(matches!(
            Curve::with_ci(vec![0.0, 0.5], vec![0.0], vec![0.1, 0.6]),
            Err(SearchError::CiLength { series: "lower", .. })
        ));
        assert!(matches!(
            Curve::with_ci(vec![0.0, 0.5], vec![0.0, 0.6], vec![0.1, 0.7]),
            Err(SearchError::CiOrder { point: 1, .. })
        ));
        let c = Curve::new(vec![0.0, 1.0]).unwrap();
        assert!(detect(&c, Detection::Threshold { tau: 0.0 }).is_err());
        assert!(detect(&c, Detection::Threshold { tau: 1.5 }).is_err());
        assert!(detect_with(&c, Detection::Knee, -1.0).is_err());
    }

    #[test]
    fn evidence_serialises() {
        let c = Curve::new(vec![0.0, 0.0, 1.0]).unwrap();
        let d = detect(&c, Detection::SteepestRise { half_window: 1 }).unwrap();
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(j["boundary"], 1);
        assert_eq!(j["method"]["method"], "steepest-rise");
        assert_eq!(j["evidence"]["diffs"][1], 1.0);
    }
}
