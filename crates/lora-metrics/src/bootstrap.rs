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
    fn errors_become_this_crates_type() {
        // The computation is lora-common's (tested there); this crate only maps its errors.
        assert!(matches!(paired_bootstrap(&[], &[], 10, 0), Err(MetricsError::Bootstrap(_))));
        assert!(matches!(paired_bootstrap(&[1.0], &[0.0, 1.0], 10, 0), Err(MetricsError::Bootstrap(_))));
        let r = paired_bootstrap(&[1.0, 0.0], &[0.0, 0.0], 50, 1).unwrap();
        assert_eq!(r, lora_common::paired_bootstrap(&[1.0, 0.0], &[0.0, 0.0], 50, 1).unwrap());
    }
}
