//! The paired bootstrap for comparing two systems scored on the same items: the workspace's one implementation
//! ([`lora_common::bootstrap`]), with this crate's error type.

use crate::{MetricsError, Result};
pub use lora_common::bootstrap::BootstrapResult;

/// Paired bootstrap over per-item scores `a` and `b` (same items, same order): see
/// [`lora_common::paired_bootstrap`].
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
    lora_common::paired_bootstrap(a, b, n_resamples, seed).map_err(|e| match e {
        lora_common::CommonError::Bootstrap(m) => MetricsError::Bootstrap(m),
        other => MetricsError::Bootstrap(other.to_string()),
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
