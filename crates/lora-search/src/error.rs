//! The crate's single error type.

use thiserror::Error;

/// Every failure this crate reports. Bad input is a typed error, never a panic.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SearchError {
    /// The model has no decoder blocks.
    #[error("the model must have at least one layer (num_layers = 0)")]
    ZeroLayers,
    /// The validation set is empty.
    #[error("the validation sample set is empty")]
    EmptySamples,
    /// The boundary range `[lo, hi]` holds no boundary (`lo > hi`).
    #[error("boundary range {lo}-{hi} is empty (lo > hi)")]
    EmptyRange {
        /// Lower end of the range (inclusive).
        lo: usize,
        /// Upper end of the range (inclusive).
        hi: usize,
    },
    /// The boundary range reaches past the last block.
    #[error("boundary range {lo}-{hi} lies outside the model's blocks 0-{last}", last = num_layers.saturating_sub(1))]
    RangeOutOfBounds {
        /// Lower end of the range (inclusive).
        lo: usize,
        /// Upper end of the range (inclusive).
        hi: usize,
        /// Number of decoder blocks in the model.
        num_layers: usize,
    },
    /// A range string such as `"4-20"` could not be parsed.
    #[error("cannot parse boundary range {0:?}: expected LO-HI, e.g. 4-20")]
    BadRange(String),
    /// A strategy name is not one of `exhaustive|coarse-to-fine|halving|proxy-first`.
    #[error("unknown strategy {0:?}: expected exhaustive, coarse-to-fine, halving or proxy-first")]
    UnknownStrategy(String),
    /// A configuration value is out of its allowed domain.
    #[error("invalid search configuration: {name} = {value} ({why})")]
    InvalidConfig {
        /// Name of the setting.
        name: &'static str,
        /// The offending value, rendered.
        value: String,
        /// What the setting requires.
        why: &'static str,
    },
    /// The per-layer LoRA parameter counts do not match the number of layers.
    #[error("per-layer LoRA parameter counts: expected {expected} entries (one per layer), got {got}")]
    ParamCountLength {
        /// Number of layers.
        expected: usize,
        /// Number of counts supplied.
        got: usize,
    },
    /// The per-layer LoRA parameter counts sum to zero.
    #[error("per-layer LoRA parameter counts sum to zero")]
    ZeroParams,
    /// The proxy-first strategy was run without a proxy scorer.
    #[error("strategy proxy-first needs a proxy scorer: call BoundarySearch::run_with_proxy")]
    MissingProxy,
    /// A scorer returned the wrong number of scores.
    #[error("scorer returned {got} scores for boundary {boundary}, expected {expected}")]
    ScoreCount {
        /// Boundary that was scored.
        boundary: usize,
        /// Number of samples requested.
        expected: usize,
        /// Number of scores returned.
        got: usize,
    },
    /// A scorer returned NaN or an infinity.
    #[error("scorer returned a non-finite score {value} for boundary {boundary}, sample {sample}")]
    NonFiniteScore {
        /// Boundary that was scored.
        boundary: usize,
        /// Sample index.
        sample: usize,
        /// The value returned.
        value: f64,
    },
    /// A sample index is outside the validation set.
    #[error("sample index {sample} is outside the validation set of {n_samples} samples")]
    SampleOutOfRange {
        /// Requested sample index.
        sample: usize,
        /// Size of the validation set.
        n_samples: usize,
    },
    /// A scorer failed for its own reasons (I/O, model, metric).
    #[error("scorer failed on boundary {boundary}: {message}")]
    Scorer {
        /// Boundary being scored.
        boundary: usize,
        /// The scorer's own description of the failure.
        message: String,
    },
    /// A probe curve has fewer than two points.
    #[error("probe curve has {len} points; at least 2 are needed (embeddings + one block)")]
    CurveTooShort {
        /// Number of points supplied.
        len: usize,
    },
    /// A probe curve point is NaN or infinite.
    #[error("probe curve point {point} ({series}) is not finite: {value}")]
    NonFiniteCurve {
        /// Index of the point (state after `point` blocks).
        point: usize,
        /// Which series: `mean`, `lower` or `upper`.
        series: &'static str,
        /// The value found.
        value: f64,
    },
    /// A confidence band does not have one value per curve point.
    #[error("probe curve CI {series} has {got} points, the mean has {expected}")]
    CiLength {
        /// Which series: `lower` or `upper`.
        series: &'static str,
        /// Number of mean points.
        expected: usize,
        /// Number of band points.
        got: usize,
    },
    /// A confidence band is not ordered `lower <= mean <= upper`.
    #[error("probe curve point {point}: CI [{lower}, {upper}] does not contain the mean {mean}")]
    CiOrder {
        /// Index of the point.
        point: usize,
        /// Lower band value.
        lower: f64,
        /// Mean value.
        mean: f64,
        /// Upper band value.
        upper: f64,
    },
    /// A detection parameter is out of its allowed domain.
    #[error("invalid detection parameter: {name} = {value} ({why})")]
    InvalidDetection {
        /// Name of the parameter.
        name: &'static str,
        /// The offending value, rendered.
        value: String,
        /// What the parameter requires.
        why: &'static str,
    },
}
