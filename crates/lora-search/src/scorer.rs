//! The [`Scorer`] trait and the memoising, call-counting wrapper [`Memo`].

use std::collections::HashMap;

use crate::SearchError;

/// Scores keep-through boundaries on validation samples.
///
/// A candidate is a boundary `b`: LoRA stays on decoder blocks `0..=b` and is dropped
/// above; `b = num_layers - 1` is full LoRA. `samples` are indices into the validation set.
/// An implementation returns exactly one score per requested sample, in the same order;
/// higher is better. The facade implements it with generation + a metric, and with a
/// teacher-forced proxy (mean log-probability of the ground truth); tests use synthetic
/// scorers such as [`crate::synthetic::SyntheticScorer`].
///
/// ```
/// use lora_search::{Scorer, SearchError};
///
/// /// Score = 1 when at least 4 blocks keep LoRA, whatever the sample.
/// struct Toy;
/// impl Scorer for Toy {
///     fn score(&mut self, boundary: usize, samples: &[usize]) -> Result<Vec<f64>, SearchError> {
///         Ok(vec![if boundary >= 3 { 1.0 } else { 0.0 }; samples.len()])
///     }
/// }
/// # fn main() -> Result<(), SearchError> {
/// assert_eq!(Toy.score(5, &[0, 1])?, vec![1.0, 1.0]);
/// # Ok(())
/// # }
/// ```
pub trait Scorer {
    /// One score per entry of `samples` for keep-through(`boundary`); higher is better.
    fn score(&mut self, boundary: usize, samples: &[usize]) -> Result<Vec<f64>, SearchError>;

    /// Announces that every boundary of `boundaries` is about to be scored on `samples`, so that a scorer which
    /// shares work between boundaries (the facade's proxy runs one full-LoRA pass for all of them) can do them
    /// together and answer the [`Scorer::score`] calls that follow from what it kept. The default does nothing.
    fn prepare(&mut self, boundaries: &[usize], samples: &[usize]) -> Result<(), SearchError> {
        let _ = (boundaries, samples);
        Ok(())
    }
}

impl<S: Scorer + ?Sized> Scorer for &mut S {
    fn score(&mut self, boundary: usize, samples: &[usize]) -> Result<Vec<f64>, SearchError> {
        (**self).score(boundary, samples)
    }

    fn prepare(&mut self, boundaries: &[usize], samples: &[usize]) -> Result<(), SearchError> {
        (**self).prepare(boundaries, samples)
    }
}

impl<S: Scorer + ?Sized> Scorer for Box<S> {
    fn score(&mut self, boundary: usize, samples: &[usize]) -> Result<Vec<f64>, SearchError> {
        (**self).score(boundary, samples)
    }

    fn prepare(&mut self, boundaries: &[usize], samples: &[usize]) -> Result<(), SearchError> {
        (**self).prepare(boundaries, samples)
    }
}

/// A scorer built from a closure `f(boundary, sample) -> Result<f64, SearchError>`.
///
/// ```
/// use lora_search::{FnScorer, Scorer};
/// # fn main() -> Result<(), lora_search::SearchError> {
/// let mut s = FnScorer::new(|b, i| Ok((b + i) as f64));
/// assert_eq!(s.score(2, &[0, 5])?, vec![2.0, 7.0]);
/// # Ok(())
/// # }
/// ```
pub struct FnScorer<F> {
    f: F,
}

impl<F> FnScorer<F>
where
    F: FnMut(usize, usize) -> Result<f64, SearchError>,
{
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        FnScorer { f }
    }
}

impl<F> Scorer for FnScorer<F>
where
    F: FnMut(usize, usize) -> Result<f64, SearchError>,
{
    fn score(&mut self, boundary: usize, samples: &[usize]) -> Result<Vec<f64>, SearchError> {
        samples.iter().map(|&i| (self.f)(boundary, i)).collect()
    }
}

/// Memoises an inner [`Scorer`] per `(boundary, sample)` and counts the real work done.
///
/// Every `(boundary, sample)` pair reaches the inner scorer at most once; repeated requests
/// are answered from the cache. Scores are checked: the inner scorer must return one finite
/// value per requested sample. `Memo` itself implements [`Scorer`], so one memo can be shared
/// across several searches.
///
/// ```
/// use lora_search::{FnScorer, Memo, Scorer};
/// # fn main() -> Result<(), lora_search::SearchError> {
/// let mut m = Memo::new(FnScorer::new(|b, i| Ok((b * 10 + i) as f64)), 4);
/// m.score(1, &[0, 1])?;
/// m.score(1, &[1, 2])?; // sample 1 is cached
/// assert_eq!(m.sample_evals(), 3);
/// assert_eq!(m.full_evaluations(), 0.75);
/// # Ok(())
/// # }
/// ```
pub struct Memo<S> {
    inner: S,
    n_samples: usize,
    cache: HashMap<(usize, usize), f64>,
    sample_evals: usize,
    batches: usize,
    per_boundary: HashMap<usize, usize>,
}

impl<S: Scorer> Memo<S> {
    /// Wraps `inner` for a validation set of `n_samples` samples.
    pub fn new(inner: S, n_samples: usize) -> Self {
        Memo { inner, n_samples, cache: HashMap::new(), sample_evals: 0, batches: 0, per_boundary: HashMap::new() }
    }

    /// Number of `(boundary, sample)` pairs the inner scorer actually evaluated.
    pub fn sample_evals(&self) -> usize {
        self.sample_evals
    }

    /// Number of times the inner scorer was invoked (each invocation is one batch).
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Real work in units of full validation evaluations: `sample_evals / n_samples`.
    pub fn full_evaluations(&self) -> f64 {
        if self.n_samples == 0 {
            0.0
        } else {
            self.sample_evals as f64 / self.n_samples as f64
        }
    }

    /// Sample evaluations the inner scorer spent on `boundary`.
    pub fn evals_for(&self, boundary: usize) -> usize {
        self.per_boundary.get(&boundary).copied().unwrap_or(0)
    }

    /// The cached score of `(boundary, sample)`, if already evaluated.
    pub fn cached(&self, boundary: usize, sample: usize) -> Option<f64> {
        self.cache.get(&(boundary, sample)).copied()
    }

    /// Gives back the inner scorer.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Scorer> Scorer for Memo<S> {
    fn score(&mut self, boundary: usize, samples: &[usize]) -> Result<Vec<f64>, SearchError> {
        let mut missing: Vec<usize> = Vec::new();
        for &s in samples {
            if s >= self.n_samples {
                return Err(SearchError::SampleOutOfRange { sample: s, n_samples: self.n_samples });
            }
            if !self.cache.contains_key(&(boundary, s)) && !missing.contains(&s) {
                missing.push(s);
            }
        }
        if !missing.is_empty() {
            let got = self.inner.score(boundary, &missing)?;
            self.batches += 1;
            if got.len() != missing.len() {
                return Err(SearchError::ScoreCount { boundary, expected: missing.len(), got: got.len() });
            }
            for (&s, &v) in missing.iter().zip(&got) {
                if !v.is_finite() {
                    return Err(SearchError::NonFiniteScore { boundary, sample: s, value: v });
                }
            }
            for (&s, &v) in missing.iter().zip(&got) {
                self.cache.insert((boundary, s), v);
            }
            self.sample_evals += missing.len();
            *self.per_boundary.entry(boundary).or_insert(0) += missing.len();
        }
        samples
            .iter()
            .map(|&s| {
                // ok: every requested sample was inserted above or was already cached.
                self.cache
                    .get(&(boundary, s))
                    .copied()
                    .ok_or(SearchError::SampleOutOfRange { sample: s, n_samples: self.n_samples })
            })
            .collect()
    }

    /// Forwards to the inner scorer the boundaries of `boundaries` that miss a score on some of `samples`, with
    /// the samples that miss one on some of them (what is cached is not asked again).
    fn prepare(&mut self, boundaries: &[usize], samples: &[usize]) -> Result<(), SearchError> {
        if let Some(&s) = samples.iter().find(|&&s| s >= self.n_samples) {
            return Err(SearchError::SampleOutOfRange { sample: s, n_samples: self.n_samples });
        }
        let open = |b: usize, s: usize| !self.cache.contains_key(&(b, s));
        let mut bs: Vec<usize> = boundaries.iter().copied().filter(|&b| samples.iter().any(|&s| open(b, s))).collect();
        bs.sort_unstable();
        bs.dedup();
        let mut ss: Vec<usize> = samples.iter().copied().filter(|&s| bs.iter().any(|&b| open(b, s))).collect();
        ss.sort_unstable();
        ss.dedup();
        if bs.is_empty() || ss.is_empty() {
            return Ok(());
        }
        self.inner.prepare(&bs, &ss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_counts_and_caches() {
        let mut calls = 0usize;
        let mut m = Memo::new(
            FnScorer::new(|b, i| {
                calls += 1;
                Ok((b * 100 + i) as f64)
            }),
            10,
        );
        assert_eq!(m.score(2, &[1, 2, 3]).unwrap(), vec![201.0, 202.0, 203.0]);
        assert_eq!(m.score(2, &[3, 4]).unwrap(), vec![203.0, 204.0]);
        assert_eq!(m.score(2, &[1, 2, 3, 4]).unwrap().len(), 4);
        assert_eq!(m.sample_evals(), 4);
        assert_eq!(m.batches(), 2);
        assert_eq!(m.evals_for(2), 4);
        assert_eq!(m.evals_for(3), 0);
        assert_eq!(m.cached(2, 4), Some(204.0));
        drop(m);
        assert_eq!(calls, 4);
    }

    #[test]
    fn memo_prepares_only_what_it_lacks() {
        /// Records each `prepare` call and answers `score` from what was prepared (an error otherwise).
        #[derive(Default)]
        struct Batched {
            calls: Vec<(Vec<usize>, Vec<usize>)>,
            ready: Vec<(usize, usize)>,
        }
        impl Scorer for Batched {
            fn score(&mut self, b: usize, s: &[usize]) -> Result<Vec<f64>, SearchError> {
                s.iter()
                    .map(|&i| match self.ready.contains(&(b, i)) {
                        true => Ok((b * 10 + i) as f64),
                        false => Err(SearchError::Scorer { boundary: b, message: format!("{i} not prepared") }),
                    })
                    .collect()
            }
            fn prepare(&mut self, bs: &[usize], ss: &[usize]) -> Result<(), SearchError> {
                self.calls.push((bs.to_vec(), ss.to_vec()));
                self.ready.extend(bs.iter().flat_map(|&b| ss.iter().map(move |&i| (b, i))));
                Ok(())
            }
        }
        let mut m = Memo::new(Batched::default(), 4);
        m.prepare(&[3, 1, 3], &[2, 0]).unwrap();
        assert_eq!(m.score(1, &[0, 2]).unwrap(), vec![10.0, 12.0]);
        assert_eq!(m.score(3, &[2]).unwrap(), vec![32.0]);
        // Boundary 1 is cached on samples 0 and 2: only sample 3 is asked for, with the boundaries lacking it.
        m.prepare(&[1, 2], &[0, 2, 3]).unwrap();
        m.prepare(&[1], &[0, 2]).unwrap();
        let calls = m.into_inner().calls;
        assert_eq!(calls, vec![(vec![1, 3], vec![0, 2]), (vec![1, 2], vec![0, 2, 3])]);
        let mut m = Memo::new(Batched::default(), 4);
        assert!(matches!(m.prepare(&[0], &[4]), Err(SearchError::SampleOutOfRange { sample: 4, n_samples: 4 })));
    }

    #[test]
    fn memo_rejects_bad_scorers() {
        struct Short;
        impl Scorer for Short {
            fn score(&mut self, _: usize, s: &[usize]) -> Result<Vec<f64>, SearchError> {
                Ok(vec![0.0; s.len().saturating_sub(1)])
            }
        }
        let mut m = Memo::new(Short, 3);
        assert!(matches!(m.score(0, &[0, 1]), Err(SearchError::ScoreCount { expected: 2, got: 1, .. })));
        let mut m = Memo::new(FnScorer::new(|_, _| Ok(f64::NAN)), 3);
        assert!(matches!(m.score(1, &[2]), Err(SearchError::NonFiniteScore { boundary: 1, sample: 2, .. })));
        assert!(matches!(m.score(1, &[3]), Err(SearchError::SampleOutOfRange { sample: 3, n_samples: 3 })));
    }
}
