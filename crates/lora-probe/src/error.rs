//! The one error type of `lora-probe`.
use std::path::PathBuf;

/// Everything that can go wrong while probing.
///
/// Each variant names what it is about (file, row, mask) so that a user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The model, adapter or tokenizer failed.
    #[error(transparent)]
    Model(#[from] lora_model::ModelError),
    /// A shared helper failed (a crash-safe write, reading a data file).
    #[error(transparent)]
    Common(#[from] lora_common::CommonError),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] lora_model::tch::TchError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A data row is malformed (bad JSON, missing field, empty answer or prompt).
    #[error("{file}: row {row}: {message}")]
    Row {
        /// The data file (`<memory>` for samples passed in directly).
        file: PathBuf,
        /// 1-based row (line) number.
        row: usize,
        /// What is wrong.
        message: String,
    },
    /// A mask specification could not be parsed or does not fit the model.
    #[error("mask `{spec}`: {message}")]
    Mask {
        /// The specification as given.
        spec: String,
        /// What is wrong.
        message: String,
    },
    /// A caller passed an argument outside what the operation accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An SVG plot could not be drawn.
    #[error("{path}: plot: {message}")]
    Plot {
        /// The output file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ProbeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ProbeError::Io { path: path.into(), source }
    }
}

/// Result alias for `lora-probe`.
pub type Result<T, E = ProbeError> = std::result::Result<T, E>;
