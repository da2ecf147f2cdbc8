//! [`ProbeResult`]: per-mask curves (means, per-position means, bootstrap CIs), the per-sample matrices,
//! difference curves, JSON and CSV.
use std::fmt::Write as _;
use std::path::Path;

use ndarray::Array3;
use serde::{Deserialize, Serialize};

use crate::error::{ProbeError, Result};
use crate::probe::ProbeMode;

/// Per-sample values of one mask: `samples × (L + 1) × k` arrays.
///
/// Sample `s` has `positions[s] = min(k, answer length)` valid positions; cells at positions `>= positions[s]` hold
/// `0.0` (never NaN) and are excluded from every mean.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PerSample {
    /// Valid positions per sample.
    pub positions: Vec<usize>,
    /// The probed answer tokens per sample (the reference answer's first tokens, or the greedy tokens in
    /// free-running mode).
    pub answer_ids: Vec<Vec<i64>>,
    /// Probability of the probed token.
    pub gt_prob: Array3<f32>,
    /// Largest probability.
    pub max_prob: Array3<f32>,
    /// 1-based rank of the probed token (1 + entries with a strictly larger logit).
    pub gt_rank: Array3<f32>,
    /// Entropy in nats.
    pub entropy: Array3<f32>,
}

/// One mask's curves over the points `0..=L`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskCurve {
    /// The mask's specification (e.g. `all`, `none`, `0-14`).
    pub mask: String,
    /// Mean probed-token probability per point, over samples and valid positions: `[L + 1]`.
    pub gt_prob: Vec<f64>,
    /// Mean max probability per point: `[L + 1]`.
    pub max_prob: Vec<f64>,
    /// Mean 1-based rank of the probed token per point: `[L + 1]`.
    pub gt_rank: Vec<f64>,
    /// Mean entropy (nats) per point: `[L + 1]`.
    pub entropy: Vec<f64>,
    /// Lower end of the 95% bootstrap CI (resampling samples) of `gt_prob`.
    pub gt_prob_ci_low: Vec<f64>,
    /// Upper end of the 95% bootstrap CI of `gt_prob`.
    pub gt_prob_ci_high: Vec<f64>,
    /// Lower end of the 95% bootstrap CI of `max_prob`.
    pub max_prob_ci_low: Vec<f64>,
    /// Upper end of the 95% bootstrap CI of `max_prob`.
    pub max_prob_ci_high: Vec<f64>,
    /// Mean probed-token probability per point and position: `[L + 1][k]` (over samples having that position).
    pub gt_prob_per_position: Vec<Vec<f64>>,
    /// Mean max probability per point and position: `[L + 1][k]`.
    pub max_prob_per_position: Vec<Vec<f64>>,
    /// How many samples have each position `0..k` (a position no sample has gets means of `0.0`).
    pub position_counts: Vec<usize>,
    /// The per-sample matrices (left out of the default JSON; see [`ProbeResult::to_json`]).
    #[serde(skip)]
    pub per_sample: PerSample,
}

/// The difference `a − b` of two masks' curves on the same samples (the paper's Fig. 5), with paired bootstrap CIs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DifferenceCurve {
    /// Minuend mask.
    pub a: String,
    /// Subtrahend mask.
    pub b: String,
    /// Mean of `gt_prob(a) − gt_prob(b)` per point, over samples and the positions valid under both.
    pub gt_prob: Vec<f64>,
    /// Lower end of its 95% paired bootstrap CI.
    pub gt_prob_ci_low: Vec<f64>,
    /// Upper end of its 95% paired bootstrap CI.
    pub gt_prob_ci_high: Vec<f64>,
    /// Mean of `max_prob(a) − max_prob(b)` per point.
    pub max_prob: Vec<f64>,
    /// Lower end of its 95% paired bootstrap CI.
    pub max_prob_ci_low: Vec<f64>,
    /// Upper end of its 95% paired bootstrap CI.
    pub max_prob_ci_high: Vec<f64>,
}

/// Everything a probe run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Decoder blocks `L` (curves have `L + 1` points).
    pub num_layers: usize,
    /// Answer positions probed.
    pub k: usize,
    /// Teacher-forced or free-running.
    pub mode: ProbeMode,
    /// Samples probed.
    pub num_samples: usize,
    /// Bootstrap resamples behind the CIs.
    pub bootstrap_resamples: usize,
    /// Bootstrap seed.
    pub seed: u64,
    /// One curve per mask, in the order given.
    pub curves: Vec<MaskCurve>,
    /// Difference curves added with [`ProbeResult::add_difference`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<DifferenceCurve>,
}

/// Linear-interpolated quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let w = pos - lo as f64;
    sorted[lo] * (1.0 - w) + sorted[hi.min(sorted.len() - 1)] * w
}

/// Ratio of sums, `0.0` for an empty denominator.
fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// Pooled means `Σ_s sums[s][p] / Σ_s counts[s]` and their 95% percentile-bootstrap CI, resampling samples.
fn pooled_with_ci(sums: &[Vec<f64>], counts: &[f64], points: usize, resamples: usize, seed: u64) -> [Vec<f64>; 3] {
    let total: f64 = counts.iter().sum();
    let mean: Vec<f64> = (0..points).map(|p| ratio(sums.iter().map(|s| s[p]).sum(), total)).collect();
    if resamples == 0 || sums.is_empty() {
        return [mean.clone(), mean.clone(), mean];
    }
    let mut rng = lora_common::rng::SplitMix64::new(seed);
    let mut draws: Vec<Vec<f64>> = vec![Vec::with_capacity(resamples); points];
    let mut acc = vec![0.0; points];
    for _ in 0..resamples {
        acc.iter_mut().for_each(|a| *a = 0.0);
        let mut den = 0.0;
        for _ in 0..sums.len() {
            let s = rng.below_fast(sums.len());
            den += counts[s];
            for (a, v) in acc.iter_mut().zip(&sums[s]) {
                *a += v;
            }
        }
        for (d, a) in draws.iter_mut().zip(&acc) {
            d.push(ratio(*a, den));
        }
    }
    let mut low = Vec::with_capacity(points);
    let mut high = Vec::with_capacity(points);
    for mut d in draws {
        d.sort_by(f64::total_cmp);
        low.push(quantile(&d, 0.025));
        high.push(quantile(&d, 0.975));
    }
    [mean, low, high]
}

/// Per-sample sums over the first `n[s]` positions of `f(s, p, j)`: `[samples][points]`.
fn sample_sums(n: &[usize], points: usize, f: impl Fn(usize, usize, usize) -> f64) -> Vec<Vec<f64>> {
    n.iter().enumerate().map(|(s, &ns)| (0..points).map(|p| (0..ns).map(|j| f(s, p, j)).sum()).collect()).collect()
}

impl MaskCurve {
    /// Aggregates per-sample values: pooled means, per-position means and bootstrap CIs (seeded).
    pub fn from_per_sample(mask: String, per_sample: PerSample, resamples: usize, seed: u64) -> Self {
        let (samples, points, k) = per_sample.gt_prob.dim();
        let n: Vec<usize> = per_sample.positions.iter().map(|&p| p.min(k)).collect();
        let counts: Vec<f64> = n.iter().map(|&c| c as f64).collect();
        let sums_of = |a: &Array3<f32>| sample_sums(&n, points, |s, p, j| f64::from(a[[s, p, j]]));
        let [gt_prob, gt_lo, gt_hi] = pooled_with_ci(&sums_of(&per_sample.gt_prob), &counts, points, resamples, seed);
        let [max_prob, max_lo, max_hi] =
            pooled_with_ci(&sums_of(&per_sample.max_prob), &counts, points, resamples, seed);
        let [gt_rank, _, _] = pooled_with_ci(&sums_of(&per_sample.gt_rank), &counts, points, 0, seed);
        let [entropy, _, _] = pooled_with_ci(&sums_of(&per_sample.entropy), &counts, points, 0, seed);
        let position_counts: Vec<usize> = (0..k).map(|j| n.iter().filter(|&&c| c > j).count()).collect();
        let per_position = |a: &Array3<f32>| -> Vec<Vec<f64>> {
            (0..points)
                .map(|p| {
                    (0..k)
                        .map(|j| {
                            let sum: f64 = (0..samples).filter(|&s| n[s] > j).map(|s| f64::from(a[[s, p, j]])).sum();
                            ratio(sum, position_counts[j] as f64)
                        })
                        .collect()
                })
                .collect()
        };
        MaskCurve {
            mask,
            gt_prob_per_position: per_position(&per_sample.gt_prob),
            max_prob_per_position: per_position(&per_sample.max_prob),
            gt_prob,
            max_prob,
            gt_rank,
            entropy,
            gt_prob_ci_low: gt_lo,
            gt_prob_ci_high: gt_hi,
            max_prob_ci_low: max_lo,
            max_prob_ci_high: max_hi,
            position_counts,
            per_sample,
        }
    }

    /// Number of points (`L + 1`).
    pub fn points(&self) -> usize {
        self.gt_prob.len()
    }
}

/// The difference curves `a − b`, paired by sample over the positions valid under both masks, with a 95% paired
/// bootstrap CI (`resamples` draws of samples, seeded).
pub fn difference(a: &MaskCurve, b: &MaskCurve, resamples: usize, seed: u64) -> Result<DifferenceCurve> {
    let (pa, pb) = (&a.per_sample, &b.per_sample);
    if pa.gt_prob.dim() != pb.gt_prob.dim() || pa.positions.len() != pb.positions.len() {
        return Err(ProbeError::InvalidArgument(format!(
            "difference `{}` − `{}`: per-sample shapes {:?} and {:?} differ (not from the same samples)",
            a.mask,
            b.mask,
            pa.gt_prob.dim(),
            pb.gt_prob.dim()
        )));
    }
    let (_, points, k) = pa.gt_prob.dim();
    let n: Vec<usize> = pa.positions.iter().zip(&pb.positions).map(|(&x, &y)| x.min(y).min(k)).collect();
    let counts: Vec<f64> = n.iter().map(|&c| c as f64).collect();
    let diff = |x: &Array3<f32>, y: &Array3<f32>| {
        sample_sums(&n, points, |s, p, j| f64::from(x[[s, p, j]]) - f64::from(y[[s, p, j]]))
    };
    let [gt, gt_lo, gt_hi] = pooled_with_ci(&diff(&pa.gt_prob, &pb.gt_prob), &counts, points, resamples, seed);
    let [mx, mx_lo, mx_hi] = pooled_with_ci(&diff(&pa.max_prob, &pb.max_prob), &counts, points, resamples, seed);
    Ok(DifferenceCurve {
        a: a.mask.clone(),
        b: b.mask.clone(),
        gt_prob: gt,
        gt_prob_ci_low: gt_lo,
        gt_prob_ci_high: gt_hi,
        max_prob: mx,
        max_prob_ci_low: mx_lo,
        max_prob_ci_high: mx_hi,
    })
}

/// Writes `contents` to `path` through a temporary file in the same directory and a rename.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    Ok(lora_model::atomic::write_file(path, contents)?)
}

fn array_json(a: &Array3<f32>, n: &[usize]) -> serde_json::Value {
    // [samples][L + 1][positions of that sample]
    let (s, p, _) = a.dim();
    serde_json::Value::from(
        (0..s)
            .map(|i| (0..p).map(|l| (0..n[i]).map(|j| f64::from(a[[i, l, j]])).collect::<Vec<_>>()).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
    )
}

impl ProbeResult {
    /// The curve of mask `spec`.
    pub fn curve(&self, spec: &str) -> Option<&MaskCurve> {
        self.curves.iter().find(|c| c.mask == spec)
    }

    /// The difference curves `a − b` of two masks of this run (paired bootstrap with this run's settings).
    pub fn difference(&self, a: &str, b: &str) -> Result<DifferenceCurve> {
        let find = |m: &str| {
            self.curve(m).ok_or_else(|| ProbeError::Mask {
                spec: m.to_string(),
                message: format!(
                    "not probed in this run (masks: {})",
                    self.curves.iter().map(|c| c.mask.as_str()).collect::<Vec<_>>().join(", ")
                ),
            })
        };
        difference(find(a)?, find(b)?, self.bootstrap_resamples, self.seed)
    }

    /// Computes [`ProbeResult::difference`] and keeps it in [`ProbeResult::differences`] (serialised).
    pub fn add_difference(&mut self, a: &str, b: &str) -> Result<&DifferenceCurve> {
        let d = self.difference(a, b)?;
        self.differences.push(d);
        self.differences.last().ok_or_else(|| ProbeError::InvalidArgument("unreachable: just pushed".into()))
    }

    /// The result as JSON; with `per_sample`, each curve also carries `per_sample`: `positions`, `answer_ids`
    /// and `gt_prob`, `max_prob`, `gt_rank`, `entropy` as `[samples][L + 1][positions of the sample]`.
    pub fn to_json(&self, per_sample: bool) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(self)
            .map_err(|e| ProbeError::InvalidArgument(format!("serialising the probe result: {e}")))?;
        if per_sample {
            if let Some(curves) = v.get_mut("curves").and_then(|c| c.as_array_mut()) {
                for (c, curve) in curves.iter_mut().zip(&self.curves) {
                    let ps = &curve.per_sample;
                    let k = ps.gt_prob.dim().2;
                    let n: Vec<usize> = ps.positions.iter().map(|&p| p.min(k)).collect();
                    let obj = serde_json::json!({
                        "positions": ps.positions,
                        "answer_ids": ps.answer_ids,
                        "gt_prob": array_json(&ps.gt_prob, &n),
                        "max_prob": array_json(&ps.max_prob, &n),
                        "gt_rank": array_json(&ps.gt_rank, &n),
                        "entropy": array_json(&ps.entropy, &n),
                    });
                    if let Some(map) = c.as_object_mut() {
                        map.insert("per_sample".into(), obj);
                    }
                }
            }
        }
        Ok(v)
    }

    /// The curves as CSV: one row per mask and point with the pooled means and CIs (`position` = `mean`), then one
    /// row per mask, point and position with the per-position means (CI columns empty).
    ///
    /// Columns: `mask,point,position,gt_prob,max_prob,gt_rank,entropy,gt_prob_ci_low,gt_prob_ci_high,
    /// max_prob_ci_low,max_prob_ci_high`.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "mask,point,position,gt_prob,max_prob,gt_rank,entropy,gt_prob_ci_low,gt_prob_ci_high,max_prob_ci_low,max_prob_ci_high\n",
        );
        for c in &self.curves {
            let mask = csv_field(&c.mask);
            for p in 0..c.points() {
                let _ = writeln!(
                    out,
                    "{mask},{p},mean,{},{},{},{},{},{},{},{}",
                    c.gt_prob[p],
                    c.max_prob[p],
                    c.gt_rank[p],
                    c.entropy[p],
                    c.gt_prob_ci_low[p],
                    c.gt_prob_ci_high[p],
                    c.max_prob_ci_low[p],
                    c.max_prob_ci_high[p]
                );
            }
        }
        for c in &self.curves {
            let mask = csv_field(&c.mask);
            let ps = &c.per_sample;
            let (_, points, k) = ps.gt_prob.dim();
            let n: Vec<usize> = ps.positions.iter().map(|&q| q.min(k)).collect();
            for p in 0..points {
                for j in 0..k {
                    let valid: Vec<usize> = (0..n.len()).filter(|&s| n[s] > j).collect();
                    let mean = |a: &Array3<f32>| {
                        ratio(valid.iter().map(|&s| f64::from(a[[s, p, j]])).sum(), valid.len() as f64)
                    };
                    let _ = writeln!(
                        out,
                        "{mask},{p},{j},{},{},{},{},,,,",
                        mean(&ps.gt_prob),
                        mean(&ps.max_prob),
                        mean(&ps.gt_rank),
                        mean(&ps.entropy)
                    );
                }
            }
        }
        out
    }

    /// Writes [`ProbeResult::to_csv`] to `path` atomically.
    pub fn write_csv(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomic(path.as_ref(), self.to_csv().as_bytes())
    }

    /// Writes [`ProbeResult::to_json`] (pretty) to `path` atomically.
    pub fn write_json(&self, path: impl AsRef<Path>, per_sample: bool) -> Result<()> {
        let v = self.to_json(per_sample)?;
        let text = serde_json::to_string_pretty(&v)
            .map_err(|e| ProbeError::InvalidArgument(format!("serialising the probe result: {e}")))?;
        write_atomic(path.as_ref(), text.as_bytes())
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
