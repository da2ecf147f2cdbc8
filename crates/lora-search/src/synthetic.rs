//! Synthetic scorers with known optima, for tests, benches and demos.
//!
//! A [`SyntheticScorer`] returns, for boundary `b` and sample `i`,
//! `means[b] + sample_sd · z_i + noise · z_{b,i}` where `z_i` (a per-sample difficulty
//! shared by all boundaries, which is what makes paired comparisons pay off) and `z_{b,i}`
//! are standard normal deviates derived by hashing `(seed, i)` and `(seed, b, i)`. Scores
//! are therefore deterministic per `(b, i)`, whatever the order of requests.

use crate::rng::{mix, Rng};
use crate::{Scorer, SearchError};

/// A true mean-score profile over boundaries `0..L`.
#[derive(Debug, Clone, PartialEq)]
pub enum Profile {
    /// `low` below `at`, `high` from `at` on. Optimum: `at`.
    Step {
        /// First boundary on the plateau.
        at: usize,
        /// Score below the step.
        low: f64,
        /// Score on the plateau.
        high: f64,
    },
    /// `low` up to `start`, linear up to `high` at `end`, `high` after.
    Ramp {
        /// Last boundary at `low`.
        start: usize,
        /// First boundary at `high`.
        end: usize,
        /// Score before the ramp.
        low: f64,
        /// Score after the ramp.
        high: f64,
    },
    /// A step whose plateau wobbles by up to `wobble` below `high` (deterministically).
    NoisyPlateau {
        /// First boundary on the plateau.
        at: usize,
        /// Score below the step.
        low: f64,
        /// Top of the plateau.
        high: f64,
        /// Largest dip below `high` on the plateau.
        wobble: f64,
    },
    /// `base` plus triangular peaks `(centre, height, half_width)`.
    MultiPeak {
        /// Baseline score.
        base: f64,
        /// Peaks as `(centre, height, half_width)`.
        peaks: Vec<(usize, f64, usize)>,
    },
    /// The same score everywhere. Optimum: the smallest boundary of the range.
    Flat {
        /// The score.
        level: f64,
    },
}

impl Profile {
    /// True mean scores for boundaries `0..num_layers`.
    pub fn means(&self, num_layers: usize) -> Vec<f64> {
        (0..num_layers).map(|b| self.at(b)).collect()
    }

    fn at(&self, b: usize) -> f64 {
        match self {
            Profile::Step { at, low, high } => {
                if b >= *at {
                    *high
                } else {
                    *low
                }
            }
            Profile::Ramp { start, end, low, high } => {
                if b <= *start {
                    *low
                } else if b >= *end {
                    *high
                } else {
                    low + (high - low) * (b - start) as f64 / (end - start) as f64
                }
            }
            Profile::NoisyPlateau { at, low, high, wobble } => {
                if b < *at {
                    *low
                } else {
                    let u = (mix(&[b as u64, 0x0B]) % 1001) as f64 / 1000.0;
                    high - wobble * u
                }
            }
            Profile::MultiPeak { base, peaks } => {
                base + peaks
                    .iter()
                    .map(|&(c, h, w)| {
                        let d = b.abs_diff(c) as f64;
                        h * (1.0 - d / (w.max(1) as f64)).max(0.0)
                    })
                    .sum::<f64>()
            }
            Profile::Flat { level } => *level,
        }
    }
}

/// The boundary the selection rule picks on exact means: the smallest `b` in `lo..=hi`
/// with `means[b] ≥ max − eps`. `None` for an empty or out-of-bounds range.
///
/// ```
/// use lora_search::synthetic::{expected_boundary, Profile};
/// let m = Profile::Step { at: 9, low: 0.2, high: 0.7 }.means(20);
/// assert_eq!(expected_boundary(&m, 0, 19, 0.01), Some(9));
/// assert_eq!(expected_boundary(&m, 12, 19, 0.01), Some(12));
/// ```
pub fn expected_boundary(means: &[f64], lo: usize, hi: usize, eps: f64) -> Option<usize> {
    if lo > hi || hi >= means.len() {
        return None;
    }
    let top = means[lo..=hi].iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo..=hi).find(|&b| means[b] >= top - eps)
}

/// A deterministic noisy scorer over a profile of true means.
#[derive(Debug, Clone)]
pub struct SyntheticScorer {
    means: Vec<f64>,
    noise: f64,
    sample_sd: f64,
    seed: u64,
}

impl SyntheticScorer {
    /// Scorer with true means `means[b]`, independent noise `noise` per `(b, i)` and a
    /// shared per-sample effect of standard deviation `sample_sd`.
    pub fn new(means: Vec<f64>, noise: f64, sample_sd: f64, seed: u64) -> Self {
        SyntheticScorer { means, noise, sample_sd, seed }
    }

    /// The true means.
    pub fn means(&self) -> &[f64] {
        &self.means
    }

    /// The score of `(boundary, sample)`; errors for a boundary without a mean.
    pub fn value(&self, boundary: usize, sample: usize) -> Result<f64, SearchError> {
        let m = self.means.get(boundary).copied().ok_or_else(|| SearchError::Scorer {
            boundary,
            message: format!("synthetic profile has {} boundaries", self.means.len()),
        })?;
        let shared = Rng::new(mix(&[self.seed, 0x5A, sample as u64])).normal();
        let own = Rng::new(mix(&[self.seed, 0x0E, boundary as u64, sample as u64])).normal();
        Ok(m + self.sample_sd * shared + self.noise * own)
    }
}

impl Scorer for SyntheticScorer {
    fn score(&mut self, boundary: usize, samples: &[usize]) -> Result<Vec<f64>, SearchError> {
        samples.iter().map(|&i| self.value(boundary, i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_have_expected_optima() {
        let l = 30;
        let eps = 0.01;
        let step = Profile::Step { at: 12, low: 0.3, high: 0.8 }.means(l);
        assert_eq!(expected_boundary(&step, 0, l - 1, eps), Some(12));
        let ramp = Profile::Ramp { start: 5, end: 20, low: 0.2, high: 0.8 }.means(l);
        assert_eq!(expected_boundary(&ramp, 0, l - 1, eps), Some(20));
        let np = Profile::NoisyPlateau { at: 9, low: 0.3, high: 0.8, wobble: 0.005 }.means(l);
        assert_eq!(expected_boundary(&np, 0, l - 1, eps), Some(9));
        let mp = Profile::MultiPeak { base: 0.3, peaks: vec![(8, 0.3, 4), (20, 0.5, 4)] }.means(l);
        assert_eq!(expected_boundary(&mp, 0, l - 1, eps), Some(20));
        assert_eq!(expected_boundary(&mp, 0, 14, eps), Some(8));
        let flat = Profile::Flat { level: 0.5 }.means(l);
        assert_eq!(expected_boundary(&flat, 3, 7, eps), Some(3));
        assert_eq!(expected_boundary(&flat, 7, 3, eps), None);
    }

    #[test]
    fn scorer_is_deterministic_and_order_free() {
        let mut s = SyntheticScorer::new(vec![0.1, 0.5], 0.1, 0.1, 4);
        let a = s.score(1, &[0, 1, 2]).unwrap();
        let b = s.score(1, &[2, 1, 0]).unwrap();
        assert_eq!(a[0], b[2]);
        assert!(s.score(2, &[0]).is_err());
        let zero = SyntheticScorer::new(vec![0.25], 0.0, 0.0, 1);
        assert_eq!(zero.value(0, 99).unwrap(), 0.25);
    }
}
