//! Small statistics helpers: means and the paired bootstrap.

/// Arithmetic mean; 0 for an empty slice.
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Unbiased sample variance; `None` with fewer than two values.
pub fn variance(xs: &[f64]) -> Option<f64> {
    if xs.len() < 2 {
        return None;
    }
    let m = mean(xs);
    Some(xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (xs.len() - 1) as f64)
}

/// Paired-bootstrap percentile 95% CI of `mean(a_i - b_i)`: the workspace's one paired bootstrap
/// ([`lora_common::bootstrap::paired_ci`]), so a search report's CIs and an evaluation table's CIs of the same
/// scores are the same numbers. Empty input gives `[0, 0]`; one pair, or zero resamples, collapse the CI to the
/// observed difference. Fully determined by `seed`.
pub fn paired_bootstrap_ci(a: &[f64], b: &[f64], resamples: usize, seed: u64) -> [f64; 2] {
    lora_common::bootstrap::paired_ci(a, b, resamples, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_variance() {
        assert_eq!(mean(&[]), 0.0);
        assert_eq!(mean(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(variance(&[1.0]), None);
        assert_eq!(variance(&[1.0, 2.0, 3.0]), Some(1.0));
    }

    #[test]
    fn bootstrap_constant_difference_is_exact() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [0.5, 1.5, 2.5, 3.5];
        let ci = paired_bootstrap_ci(&a, &b, 500, 1);
        assert!((ci[0] - 0.5).abs() < 1e-12 && (ci[1] - 0.5).abs() < 1e-12);
    }

    #[test]
    fn bootstrap_covers_mean_and_is_seeded() {
        let a: Vec<f64> = (0..100).map(|i| (i % 7) as f64).collect();
        let b: Vec<f64> = (0..100).map(|i| (i % 5) as f64).collect();
        let ci = paired_bootstrap_ci(&a, &b, 1000, 9);
        let m = mean(&a) - mean(&b);
        assert!(ci[0] <= m && m <= ci[1]);
        assert_eq!(ci, paired_bootstrap_ci(&a, &b, 1000, 9));
        assert_eq!(paired_bootstrap_ci(&[], &[], 10, 0), [0.0, 0.0]);
    }
}
