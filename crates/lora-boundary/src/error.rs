//! The facade's error type.
use std::path::PathBuf;

/// Errors of the pipeline and the command line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the model crate (loading, adapters, forward, generation).
    #[error(transparent)]
    Model(#[from] lora_model::ModelError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An input data row is malformed.
    #[error("{path}:{line}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A command-line or config value is invalid.
    #[error("{0}")]
    Usage(String),
    /// Serialising output failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Result alias of the facade.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The process exit code the CLI uses: 2 for usage and input errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::Data { .. } => 2,
            Error::Model(lora_model::ModelError::InvalidArgument(_)) => 2,
            _ => 1,
        }
    }
}
