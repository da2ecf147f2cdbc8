//! The decision core of [`crate::Strategy::Halving`]: candidate statistics from an additive
//! fit of all scores so far, and the choice of the comparison to sharpen next.
//!
//! # Statistics
//!
//! Candidate `b` has been scored on the first `m_b` samples of the run's seeded order (the
//! full-LoRA reference on all of them). The scores are fitted by least squares to the
//! additive model `s_b,i = μ_b + u_i + e_b,i` (a boundary effect plus a per-sample
//! difficulty shared by all boundaries), solved exactly through its normal equations
//! ([`fit`]). Estimates are reported as `δ_b = μ_b − μ_ref`. With only the reference beside
//! `b` this is the plain paired difference; with many candidates on the same samples the
//! difficulty `u_i` is estimated from all of them, so the reference's own noise on a short
//! prefix does not shift every candidate at once. A candidate's standard error uses its
//! residual variance shrunk towards the pooled one ([`PRIOR_DF`] pseudo-degrees of freedom).
//!
//! # Decision ([`decide`])
//!
//! * **Top.** Among the candidates whose upper bound `δ + TOP_Z·se` reaches the best lower
//!   bound `max(δ − TOP_Z·se)`, the one evaluated on most samples (usually full LoRA, which
//!   is exact in this frame).
//! * **Tie level.** `θ = δ_top − LEVEL_Z·se_top + q(k)·σ̄/√n − ε`: the top's lower estimate,
//!   raised by the amount by which exhaustive search's best mean exceeds the common level
//!   of the `k` candidates within ε of the top (`q(k)` = expected maximum of `k` standard
//!   normals, `σ̄` = their mean per-sample noise). This makes the level the one exhaustive
//!   search applies on all `n` samples.
//! * **Choice.** The smallest boundary with `δ ≥ θ` (the selection rule, plug-in).
//! * **Open comparisons.** Every `b` below the choice must lie below `θ`
//!   (`z = (θ − δ_b)/√(se_b² + se_top²) ≥ EXCLUDE_Z`); the choice must reach it
//!   (`z ≥ z_accept`); and no candidate may exceed the top by more than ε
//!   (`z = (δ_top + ε − δ_b)/√(…) ≥ THREAT_Z`; a negative `z` is a *violation*). Among open
//!   comparisons of a kind, the one whose candidate has the fewest samples goes first.

use crate::stats::mean;

/// Weight (pseudo-degrees of freedom) of the pooled variance in a candidate's variance.
pub(crate) const PRIOR_DF: f64 = 4.0;
/// Width of the bounds that decide which candidates may be the top.
pub(crate) const TOP_Z: f64 = 3.0;
/// Standard errors of the top taken off its estimate in the tie level.
pub(crate) const LEVEL_Z: f64 = 1.5;
/// Confidence needed to exclude a boundary below the choice.
pub(crate) const EXCLUDE_Z: f64 = 2.5;
/// Confidence needed to rule out that a candidate exceeds the top by more than ε.
pub(crate) const THREAT_Z: f64 = 3.0;
/// Share of the racing budget (relative to the choice's comparisons) that the top's
/// comparisons may take while both kinds are open.
pub(crate) const THREAT_SHARE: f64 = 0.15;

/// Running statistics of one candidate.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Arm {
    /// Keep-through boundary.
    pub boundary: usize,
    /// Samples evaluated (a prefix of the run's order).
    pub m: usize,
    /// Estimated effect relative to the anchor (full LoRA): `μ_b − μ_ref`.
    pub mean: f64,
    /// Standard error of `mean`; infinite while no variance is known.
    pub se: f64,
}

/// Fits the additive model to `data` (`(boundary, scores on the first m_b samples)`, every
/// score list a prefix of the same sample order) and returns each candidate's statistics
/// relative to `anchor`, in the order of `data`.
///
/// The normal equations of `min Σ (s_b,p − μ_b − u_p)²` reduce, after eliminating the
/// sample effects `u_p = mean_{b ∈ A(p)} (s_b,p − μ_b)` (`A(p)`: candidates scored at
/// position `p`), to the `K × K` system `m_b μ_b − Σ_b' S(min(m_b, m_b')) μ_b' = r_b` with
/// `S(t) = Σ_{p<t} 1/|A(p)|` and `r_b = Σ_{p<m_b} (s_b,p − mean_{A(p)} s_·,p)`; it is solved
/// with `μ_anchor = 0`. If the system cannot be solved (no anchor, degenerate design), the
/// plain paired differences to the anchor are used.
pub(crate) fn fit(data: &[(usize, Vec<f64>)], anchor: usize) -> Vec<Arm> {
    let n_pos = data.iter().map(|(_, x)| x.len()).max().unwrap_or(0);
    let mut count = vec![0usize; n_pos];
    let mut sum = vec![0.0; n_pos];
    for (_, x) in data {
        for (p, v) in x.iter().enumerate() {
            count[p] += 1;
            sum[p] += v;
        }
    }
    let xbar: Vec<f64> = sum.iter().zip(&count).map(|(s, c)| s / (*c).max(1) as f64).collect();
    let mut s_prefix = vec![0.0; n_pos + 1];
    for p in 0..n_pos {
        s_prefix[p + 1] = s_prefix[p] + 1.0 / count[p].max(1) as f64;
    }
    let mu = solve_effects(data, anchor, &xbar, &s_prefix).unwrap_or_else(|| paired_effects(data, anchor));
    // Sample effects and residuals.
    let mut mu_sum = vec![0.0; n_pos];
    for ((_, x), m) in data.iter().zip(&mu) {
        for v in mu_sum.iter_mut().take(x.len()) {
            *v += m;
        }
    }
    let u: Vec<f64> = (0..n_pos).map(|p| xbar[p] - mu_sum[p] / count[p].max(1) as f64).collect();
    let (mut pooled_ss, mut pooled_df) = (0.0, 0.0);
    let per: Vec<(f64, f64, usize)> = data
        .iter()
        .zip(&mu)
        .map(|((_, x), m)| {
            let (mut ss, mut df, mut info) = (0.0, 0.0, 0usize);
            for (p, v) in x.iter().enumerate() {
                let r = v - m - u[p];
                ss += r * r;
                if count[p] >= 2 {
                    df += 1.0 - 1.0 / count[p] as f64;
                    info += 1;
                }
            }
            let df = if x.is_empty() { 0.0 } else { df * (1.0 - 1.0 / x.len() as f64) };
            pooled_ss += ss;
            pooled_df += df;
            (ss, df, info)
        })
        .collect();
    let pooled = (pooled_df > 0.5).then(|| pooled_ss / pooled_df);
    data.iter()
        .zip(&mu)
        .zip(&per)
        .map(|(((b, x), m), (ss, df, info))| {
            let var = match pooled {
                Some(p) => (ss + PRIOR_DF * p) / (df + PRIOR_DF),
                None if *df > 0.5 => ss / df,
                None => f64::INFINITY,
            };
            let se = if *info == 0 { f64::INFINITY } else { (var / *info as f64).sqrt() };
            Arm { boundary: *b, m: x.len(), mean: *m, se }
        })
        .collect()
}

/// Solves the reduced normal equations of [`fit`] with `μ_anchor = 0`.
fn solve_effects(data: &[(usize, Vec<f64>)], anchor: usize, xbar: &[f64], s_prefix: &[f64]) -> Option<Vec<f64>> {
    let a_idx = data.iter().position(|(b, _)| *b == anchor)?;
    let idx: Vec<usize> = (0..data.len()).filter(|&i| i != a_idx && !data[i].1.is_empty()).collect();
    let k = idx.len();
    let mut a = vec![vec![0.0; k + 1]; k];
    for (r, &i) in idx.iter().enumerate() {
        let mi = data[i].1.len();
        for (c, &j) in idx.iter().enumerate() {
            let mj = data[j].1.len();
            a[r][c] = -s_prefix[mi.min(mj)];
        }
        a[r][r] += mi as f64;
        a[r][k] = data[i].1.iter().zip(xbar).map(|(v, x)| v - x).sum::<f64>();
    }
    let sol = gauss(a)?;
    let mut mu = vec![0.0; data.len()];
    for (r, &i) in idx.iter().enumerate() {
        mu[i] = sol[r];
    }
    Some(mu)
}

/// Gaussian elimination with partial pivoting on an augmented `k × (k+1)` matrix.
fn gauss(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let k = a.len();
    let scale = a.iter().flat_map(|r| r.iter().take(k)).fold(0.0f64, |s, v| s.max(v.abs())).max(1e-300);
    for col in 0..k {
        let piv = (col..k).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[piv][col].abs() <= 1e-12 * scale {
            return None;
        }
        a.swap(col, piv);
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for row in lower.iter_mut() {
            let f = row[col] / pivot_row[col];
            if f != 0.0 {
                for (x, p) in row.iter_mut().zip(pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut x = vec![0.0; k];
    for row in (0..k).rev() {
        let s: f64 = (row + 1..k).map(|c| a[row][c] * x[c]).sum();
        x[row] = (a[row][k] - s) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// Fallback effects: mean paired difference to the anchor on each candidate's prefix.
fn paired_effects(data: &[(usize, Vec<f64>)], anchor: usize) -> Vec<f64> {
    let reference = data.iter().find(|(b, _)| *b == anchor).map(|(_, x)| x.as_slice());
    data.iter()
        .map(|(b, x)| match reference {
            Some(r) if *b != anchor => mean(&x.iter().zip(r).map(|(v, w)| v - w).collect::<Vec<_>>()),
            _ => 0.0,
        })
        .collect()
}

/// One open comparison: the candidate to grow and the comparison's `z`.
pub(crate) type Link = (usize, f64);

/// The plug-in selection on the current statistics and the comparisons still open.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    /// The boundary the selection rule picks now.
    pub choice: usize,
    /// The candidate whose estimate sets the tie level.
    pub top: usize,
    /// The tie level `θ` (relative to full LoRA).
    pub level: f64,
    /// A candidate whose estimate exceeds the top's by more than ε.
    pub violation: Option<Link>,
    /// A boundary at or below the choice whose side of the tie level is not yet certain.
    pub scan: Option<Link>,
    /// A candidate that may still exceed the top by more than ε.
    pub threat: Option<Link>,
    /// The comparison of the choice with the tie level (whatever its `z`).
    pub choice_link: Option<Link>,
    /// The weakest unsettled comparison of all, relative to its target.
    pub polish: Option<Link>,
}

/// Applies the selection rule to `arms` (ascending boundaries, estimates relative to full
/// LoRA) for a validation set of `n` samples and lists the open comparisons; `z_accept` is
/// the confidence needed to accept the choice as tied. `None` for no arms.
pub(crate) fn decide(arms: &[Arm], epsilon: f64, n: usize, z_accept: f64) -> Option<Decision> {
    let lcb = |a: &Arm| if a.se.is_finite() { a.mean - TOP_Z * a.se } else { f64::NEG_INFINITY };
    let ucb = |a: &Arm| if a.se.is_finite() { a.mean + TOP_Z * a.se } else { f64::INFINITY };
    let any_finite = arms.iter().any(|a| a.se.is_finite());
    let key = |a: &Arm| if any_finite { lcb(a) } else { a.mean };
    let best = arms.iter().fold(None::<&Arm>, |best, a| match best {
        Some(t) if key(t) >= key(a) => Some(t),
        _ => Some(a),
    })?;
    let floor = key(best);
    let top = arms.iter().filter(|a| ucb(a) >= floor).fold(best, |t, a| if a.m > t.m { a } else { t });
    let mut level = if top.se.is_finite() { top.mean - LEVEL_Z * top.se } else { top.mean } - epsilon;
    let near: Vec<&Arm> = arms.iter().filter(|a| a.mean >= top.mean - epsilon && a.se.is_finite()).collect();
    if near.len() >= 2 && n > 0 {
        let sigma = near.iter().map(|a| a.se * (a.m as f64).sqrt()).sum::<f64>() / near.len() as f64;
        level += expected_max_normal(near.len()) * sigma / (n as f64).sqrt();
    }
    let choice = arms.iter().find(|a| a.mean >= level).unwrap_or(top);
    // (samples of a, boundary of a, grow, z) of a comparison of `a` with the top; None when
    // settled (both on all samples, or no noise).
    let link = |a: &Arm, gap: f64, prefer_top: bool| -> Option<(usize, usize, usize, f64)> {
        if a.m >= n && top.m >= n {
            return None;
        }
        let se = (a.se * a.se + top.se * top.se).sqrt();
        if se == 0.0 {
            return None;
        }
        let z = if se.is_finite() { gap / se } else { gap.min(0.0) };
        let grow = if top.m >= n {
            a.boundary
        } else if a.m >= n {
            top.boundary
        } else if a.se > top.se || (a.se == top.se && !prefer_top) {
            a.boundary
        } else {
            top.boundary
        };
        Some((a.m, a.boundary, grow, z))
    };
    let others = || arms.iter().filter(|a| a.boundary != top.boundary);
    let scans: Vec<((usize, usize, usize, f64), f64)> = others()
        .filter(|a| a.boundary <= choice.boundary)
        .filter_map(|a| {
            let (gap, target) =
                if a.boundary == choice.boundary { (a.mean - level, z_accept) } else { (level - a.mean, EXCLUDE_Z) };
            link(a, gap, true).map(|l| (l, target))
        })
        .collect();
    let threats: Vec<(usize, usize, usize, f64)> =
        others().filter_map(|a| link(a, top.mean + epsilon - a.mean, false)).collect();
    // Fewest samples first, then the weakest, then the smaller boundary.
    let first = |v: &mut dyn Iterator<Item = (usize, usize, usize, f64)>| {
        v.min_by(|x, y| x.0.cmp(&y.0).then(x.3.total_cmp(&y.3)).then(x.1.cmp(&y.1))).map(|x| (x.2, x.3))
    };
    let violation = first(&mut threats.iter().copied().filter(|t| t.3 < 0.0));
    let scan = first(&mut scans.iter().filter(|(l, target)| l.3 < *target).map(|(l, _)| *l));
    let threat = first(&mut threats.iter().copied().filter(|t| t.3 < THREAT_Z));
    let choice_link = scans.iter().find(|(l, _)| l.1 == choice.boundary).map(|(l, _)| (l.2, l.3));
    let polish = scans
        .iter()
        .map(|(l, target)| (l.2, l.3 / target.max(1e-9)))
        .chain(threats.iter().map(|t| (t.2, t.3 / THREAT_Z)))
        .min_by(|x, y| x.1.total_cmp(&y.1));
    Some(Decision { choice: choice.boundary, top: top.boundary, level, violation, scan, threat, choice_link, polish })
}

/// Expected maximum of `k` independent standard normal deviates (Blom's approximation
/// `Φ⁻¹((k − 0.375)/(k + 0.25))`); 0 for `k ≤ 1`.
pub(crate) fn expected_max_normal(k: usize) -> f64 {
    if k <= 1 {
        return 0.0;
    }
    inverse_normal_cdf((k as f64 - 0.375) / (k as f64 + 0.25))
}

/// Inverse of the standard normal CDF (Acklam's rational approximation, relative error
/// below 1.2e-9); `p` is clamped into `(0, 1)`.
pub(crate) fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    let p = if p.is_nan() { 0.5 } else { p.clamp(1e-300, 1.0 - 1e-16) };
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(boundary: usize, m: usize, mean: f64, se: f64) -> Arm {
        Arm { boundary, m, mean, se }
    }

    #[test]
    fn fit_with_the_reference_alone_is_the_paired_difference() {
        let r = vec![0.5, 0.9, 0.1, 0.7];
        let b = vec![0.6, 0.8, 0.3];
        let arms = fit(&[(1, b.clone()), (9, r.clone())], 9);
        let paired = (0.1 - 0.1 + 0.2) / 3.0;
        assert!((arms[0].mean - paired).abs() < 1e-12);
        assert_eq!(arms[1].mean, 0.0);
        assert_eq!((arms[0].m, arms[1].m), (3, 4));
        assert!(arms[0].se.is_finite() && arms[0].se > 0.0);
    }

    #[test]
    fn fit_recovers_additive_effects_and_ignores_the_references_prefix_noise() {
        // Exact additive scores: effects are recovered whatever the nesting.
        let u = [0.3, -0.2, 0.5, 0.0, 0.1, -0.4];
        let mu = [0.1, 0.4, 0.25];
        let data: Vec<(usize, Vec<f64>)> = vec![
            (0, u.iter().take(2).map(|x| x + mu[0]).collect()),
            (1, u.iter().take(4).map(|x| x + mu[1]).collect()),
            (2, u.iter().map(|x| x + mu[2]).collect()),
        ];
        let arms = fit(&data, 2);
        assert!((arms[0].mean - (mu[0] - mu[2])).abs() < 1e-12);
        assert!((arms[1].mean - (mu[1] - mu[2])).abs() < 1e-12);
        // Noise (+1) on the reference's first sample. Paired with the reference alone, ten
        // short candidates would all read −0.5; a long candidate (11) on the same samples
        // carries information about the sample effects, and the fit moves them about halfway
        // towards its level (−0.05).
        let mut data: Vec<(usize, Vec<f64>)> = (0..10).map(|b| (b, vec![0.0, 0.0])).collect();
        data.push((11, vec![0.0; 20]));
        let mut r = vec![0.0; 20];
        r[0] = 1.0;
        data.push((12, r));
        let arms = fit(&data, 12);
        assert!((arms[10].mean + 0.05).abs() < 1e-12);
        assert!(arms[..10].iter().all(|a| (a.mean + 0.275).abs() < 1e-9), "{arms:?}");
    }

    #[test]
    fn fit_without_variance_information_has_infinite_se() {
        let arms = fit(&[(0, vec![1.0]), (1, vec![2.0]), (5, vec![1.5])], 5);
        assert!(arms.iter().filter(|a| a.boundary != 5).all(|a| a.se.is_infinite()));
        assert!(fit(&[], 0).is_empty());
        // No anchor among the data: paired fallback gives zeros, no panic.
        let arms = fit(&[(0, vec![1.0, 2.0])], 7);
        assert_eq!(arms[0].mean, 0.0);
    }

    #[test]
    fn decide_scans_from_below_and_accepts_the_choice() {
        // Plateau from 2 on; the reference (3) is exact. Boundary 1 is 0.05 below the level.
        let arms = vec![arm(0, 4, -0.5, 0.05), arm(1, 4, -0.08, 0.05), arm(2, 8, -0.01, 0.03), arm(3, 100, 0.0, 0.0)];
        let d = decide(&arms, 0.03, 100, 2.0).unwrap();
        assert_eq!((d.choice, d.top), (2, 3));
        // Two candidates within ε of the top (2 and 3): the level is raised by q(2)·σ̄/√n.
        let sigma = (0.03 * 8f64.sqrt() + 0.0) / 2.0;
        assert!((d.level - (-0.03 + expected_max_normal(2) * sigma / 10.0)).abs() < 1e-12);
        // Boundary 1 is open (z ≈ 0.9 < 2.5) and has fewer samples than the choice.
        let (grow, z) = d.scan.unwrap();
        assert_eq!(grow, 1);
        assert!(z > 0.0 && z < EXCLUDE_Z);
        assert_eq!(d.choice_link.map(|l| l.0), Some(2));
        assert!(d.violation.is_none());
        // Everything on all samples: nothing open.
        let arms = vec![arm(0, 10, 0.0, 0.1), arm(1, 10, 0.2, 0.1)];
        let d = decide(&arms, 0.0, 10, 2.0).unwrap();
        assert_eq!((d.scan, d.threat, d.polish), (None, None, None));
        assert_eq!(decide(&[], 0.0, 10, 2.0), None);
    }

    #[test]
    fn decide_flags_candidates_above_the_top() {
        // The top is the well-sampled 5; 7 sits far above it on two samples.
        let arms = vec![arm(5, 200, 0.0, 0.0), arm(7, 2, 0.2, 0.08)];
        let d = decide(&arms, 0.03, 200, 2.0).unwrap();
        assert_eq!(d.top, 5);
        assert_eq!(d.violation.map(|v| v.0), Some(7));
        // Ties of the lower bound go to the smaller boundary.
        let arms = vec![arm(4, 3, 0.5, 0.0), arm(6, 3, 0.5, 0.0)];
        let d = decide(&arms, 0.0, 10, 2.0).unwrap();
        assert_eq!((d.choice, d.top), (4, 4));
    }

    #[test]
    fn normal_quantiles() {
        assert!(inverse_normal_cdf(0.5).abs() < 1e-12);
        assert!((inverse_normal_cdf(0.975) - 1.959_963_985).abs() < 1e-8);
        assert!((inverse_normal_cdf(0.001) + 3.090_232_306).abs() < 1e-7);
        assert_eq!(expected_max_normal(1), 0.0);
        // E[max of 2] = 1/√π ≈ 0.564; Blom gives 0.55 to 0.57.
        assert!((expected_max_normal(2) - 0.564).abs() < 0.03);
        assert!((expected_max_normal(30) - 2.04).abs() < 0.05);
    }
}
