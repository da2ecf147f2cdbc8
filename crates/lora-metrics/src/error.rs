//! The one error type of this crate.

/// Everything that can go wrong while scoring.
///
/// Row numbers are 0-based indices into the prediction/reference slices (for JSONL input,
/// [`MetricsError::Jsonl`] names the 1-based line instead).
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// No predictions were given.
    #[error("empty input: at least one prediction is required")]
    EmptyInput,
    /// Predictions and reference lists differ in length.
    #[error("length mismatch: {predictions} predictions but {references} reference lists")]
    LengthMismatch {
        /// Number of predictions.
        predictions: usize,
        /// Number of reference lists.
        references: usize,
    },
    /// A row has an empty reference list.
    #[error("row {row}: the reference list is empty (at least one reference is required)")]
    NoReferences {
        /// 0-based row index.
        row: usize,
    },
    /// A GSM8K reference has no gold answer (`#### N`, or a bare number).
    #[error("row {row}, reference {index}: no GSM8K gold answer ('#### N' or a bare number) in {reference:?}")]
    InvalidGsm8kReference {
        /// 0-based row index.
        row: usize,
        /// 0-based index of the reference within the row.
        index: usize,
        /// The offending reference text.
        reference: String,
    },
    /// A metric name that is not known.
    #[error("unknown metric {name:?}; expected one of: {expected}")]
    UnknownMetric {
        /// The name that was given.
        name: String,
        /// The accepted names, comma separated.
        expected: String,
    },
    /// Paired bootstrap inputs are unusable.
    #[error("paired bootstrap: {0}")]
    Bootstrap(String),
    /// A JSON Lines input could not be read or parsed.
    #[error("{path}:{line}: {message}")]
    Jsonl {
        /// The file.
        path: String,
        /// 1-based line number (0 when the file itself could not be read).
        line: usize,
        /// What went wrong.
        message: String,
    },
}

/// Shorthand result type.
pub type Result<T> = std::result::Result<T, MetricsError>;

/// Checks the shared preconditions of every metric: non-empty, equal lengths, no empty reference list.
pub(crate) fn validate(predictions: &[String], references: &[Vec<String>]) -> Result<()> {
    if predictions.is_empty() {
        return Err(MetricsError::EmptyInput);
    }
    if predictions.len() != references.len() {
        return Err(MetricsError::LengthMismatch { predictions: predictions.len(), references: references.len() });
    }
    if let Some(row) = references.iter().position(|r| r.is_empty()) {
        return Err(MetricsError::NoReferences { row });
    }
    Ok(())
}
