//! Seeded paired bootstrap resampling for comparing two systems scored on the same items.
//!
//! Each resample draws `n` item indices uniformly with replacement and records
//! `mean(a[idx]) - mean(b[idx])`. Resample `k` uses its own xoshiro256** stream seeded through
//! splitmix64 from `(seed, k)`, so results do not depend on the number of threads.

use crate::{MetricsError, Result};
use rayon::prelude::*;
use serde::Serialize;

/// Outcome of [`paired_bootstrap`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BootstrapResult {
    /// Number of paired items.
    pub n_items: usize,
    /// Number of resamples drawn.
    pub n_resamples: usize,
    /// Seed used.
    pub seed: u64,
    /// Mean of system A's item scores.
    pub mean_a: f64,
    /// Mean of system B's item scores.
    pub mean_b: f64,
    /// Observed `mean_a - mean_b`.
    pub mean_diff: f64,
    /// 2.5th percentile of the resampled differences (linear interpolation, numpy's default).
    pub ci_low: f64,
    /// 97.5th percentile of the resampled differences.
    pub ci_high: f64,
    /// Fraction of resamples whose difference does not have the observed difference's sign
    /// (`<= 0` when `mean_diff > 0`, `>= 0` when `mean_diff < 0`, 1.0 when `mean_diff == 0`):
    /// a one-sided bootstrap p-value for "A and B differ in the observed direction".
    pub p_value: f64,
}

/// splitmix64 step.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** generator.
struct Xoshiro([u64; 4]);

impl Xoshiro {
    fn new(seed: u64, stream: u64) -> Self {
        let mut sm = seed;
        let mut sm = splitmix64(&mut sm) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Xoshiro([splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)])
    }

    fn next(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform index in `0..n` (Lemire's multiply-shift with rejection, so unbiased).
    fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Paired bootstrap over per-item scores `a` and `b` (same items, same order).
///
/// ```
/// # fn main() -> Result<(), lora_metrics::MetricsError> {
/// let a = vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0];
/// let b = vec![0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
/// let r = lora_metrics::paired_bootstrap(&a, &b, 1000, 7)?;
/// assert!((r.mean_diff - 0.375).abs() < 1e-12);
/// assert!(r.ci_low <= r.mean_diff && r.mean_diff <= r.ci_high);
/// # Ok(())
/// # }
/// ```
pub fn paired_bootstrap(a: &[f64], b: &[f64], n_resamples: usize, seed: u64) -> Result<BootstrapResult> {
    if a.is_empty() {
        return Err(MetricsError::Bootstrap("no items".into()));
    }
    if a.len() != b.len() {
        return Err(MetricsError::Bootstrap(format!(
            "system A has {} item scores but system B has {}",
            a.len(),
            b.len()
        )));
    }
    if n_resamples == 0 {
        return Err(MetricsError::Bootstrap("n_resamples must be at least 1".into()));
    }
    if let Some(i) = a.iter().chain(b).position(|x| !x.is_finite()) {
        let (sys, row) = if i < a.len() { ("A", i) } else { ("B", i - a.len()) };
        return Err(MetricsError::Bootstrap(format!("system {sys}, row {row}: score is not finite")));
    }
    let n = a.len();
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mean_a = a.iter().sum::<f64>() / n as f64;
    let mean_b = b.iter().sum::<f64>() / n as f64;
    let mean_diff = mean_a - mean_b;
    let mut deltas: Vec<f64> = (0..n_resamples as u64)
        .into_par_iter()
        .map(|k| {
            let mut rng = Xoshiro::new(seed, k);
            let mut s = 0.0;
            for _ in 0..n {
                s += d[rng.below(n as u64) as usize];
            }
            s / n as f64
        })
        .collect();
    deltas.sort_by(f64::total_cmp);
    let against = if mean_diff > 0.0 {
        deltas.iter().filter(|&&x| x <= 0.0).count()
    } else if mean_diff < 0.0 {
        deltas.iter().filter(|&&x| x >= 0.0).count()
    } else {
        n_resamples
    };
    Ok(BootstrapResult {
        n_items: n,
        n_resamples,
        seed,
        mean_a,
        mean_b,
        mean_diff,
        ci_low: percentile(&deltas, 0.025),
        ci_high: percentile(&deltas, 0.975),
        p_value: against as f64 / n_resamples as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sane() {
        let a: Vec<f64> = (0..200).map(|i| ((i * 7) % 10) as f64 / 10.0).collect();
        let b: Vec<f64> = a.iter().map(|x| x - 0.05).collect();
        let r1 = paired_bootstrap(&a, &b, 500, 1).unwrap();
        let r2 = paired_bootstrap(&a, &b, 500, 1).unwrap();
        assert_eq!(r1, r2);
        assert!((r1.mean_diff - 0.05).abs() < 1e-9);
        assert!((r1.ci_low - 0.05).abs() < 1e-9 && (r1.ci_high - 0.05).abs() < 1e-9);
        assert_eq!(r1.p_value, 0.0);
        let same = paired_bootstrap(&a, &a, 100, 3).unwrap();
        assert_eq!(same.p_value, 1.0);
        assert!(paired_bootstrap(&a, &b[..10], 10, 0).is_err());
        assert!(paired_bootstrap(&[], &[], 10, 0).is_err());
        assert!(paired_bootstrap(&[f64::NAN], &[0.0], 10, 0).is_err());
    }

    #[test]
    fn different_seeds_differ() {
        let a: Vec<f64> = (0..100).map(|i| (i % 3) as f64).collect();
        let b = vec![1.0; 100];
        let r1 = paired_bootstrap(&a, &b, 200, 1).unwrap();
        let r2 = paired_bootstrap(&a, &b, 200, 2).unwrap();
        assert_ne!(r1.ci_low, r2.ci_low);
    }
}
