//! The one error type of `lora-common`.
use std::path::PathBuf;

/// What can go wrong in the shared helpers; each variant names the file (and line) it is about.
#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An output path exists already (outputs are never overwritten).
    #[error("{path}: output path exists; choose a new path")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// A data row is malformed: not UTF-8, not the JSON expected, or empty where content is needed.
    #[error("{path}:{line}: {message}")]
    Row {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 for the file as a whole).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Bootstrap inputs are unusable (no items, unequal lengths, non-finite scores, no resamples).
    #[error("paired bootstrap: {0}")]
    Bootstrap(String),
}

impl CommonError {
    /// Whether the error is about what the user supplied (a bad row, an existing output, unusable scores) rather
    /// than the machine (I/O): the command line exits 2 for these, 1 otherwise.
    pub fn is_input_error(&self) -> bool {
        !matches!(self, CommonError::Io { .. })
    }
}

/// Result alias of `lora-common`.
pub type Result<T, E = CommonError> = std::result::Result<T, E>;
