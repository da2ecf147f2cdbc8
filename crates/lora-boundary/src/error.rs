//! The facade's error type.
use std::path::PathBuf;

/// Errors of the pipeline and the command line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the model crate (loading, adapters, forward, generation).
    #[error(transparent)]
    Model(#[from] lora_model::ModelError),
    /// From the probe (data rows, masks, the model underneath).
    #[error(transparent)]
    Probe(#[from] lora_probe::ProbeError),
    /// From boundary detection and search (settings, curves, scorers).
    #[error(transparent)]
    Search(#[from] lora_search::SearchError),
    /// From the metrics (unknown names, unusable predictions or references).
    #[error(transparent)]
    Metrics(#[from] lora_metrics::MetricsError),
    /// From the shared helpers (crash-safe writes, data files, the bootstrap).
    #[error(transparent)]
    Common(#[from] lora_common::CommonError),
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
    /// A saved report (`report.json`) does not parse as one.
    #[error("{path}: not a lora-boundary report: {source}")]
    Report {
        /// The file.
        path: PathBuf,
        /// What the JSON reader found.
        #[source]
        source: serde_json::Error,
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

/// Exit code of a model-crate error: 2 for what the user asked or supplied (arguments, limits, a conversation the
/// chat template refuses), 1 otherwise.
fn model_exit_code(e: &lora_model::ModelError) -> i32 {
    use lora_model::ModelError as M;
    match e {
        M::InvalidArgument(_) | M::Limit(_) | M::TemplateRejected(_) | M::UnsupportedDtype { .. } => 2,
        M::Common(c) => common_exit_code(c),
        _ => 1,
    }
}

/// Exit code of a shared-helper error: 2 for bad rows, existing outputs and unusable scores, 1 for I/O.
fn common_exit_code(e: &lora_common::CommonError) -> i32 {
    if e.is_input_error() {
        2
    } else {
        1
    }
}

impl Error {
    /// The process exit code the CLI uses (docs/cli.md): 2 for bad usage and bad input data (the message names the
    /// file and line, flag or value), 1 for everything else (model, adapter, libtorch, I/O).
    pub fn exit_code(&self) -> i32 {
        use lora_probe::ProbeError as P;
        use lora_search::SearchError as S;
        match self {
            Error::Usage(_) | Error::Data { .. } | Error::Report { .. } | Error::Metrics(_) => 2,
            Error::Model(e) => model_exit_code(e),
            Error::Common(e) | Error::Probe(P::Common(e)) => common_exit_code(e),
            Error::Probe(P::Model(e)) => model_exit_code(e),
            Error::Probe(P::Row { .. } | P::Mask { .. } | P::InvalidArgument(_)) => 2,
            Error::Probe(_) => 1,
            Error::Search(S::Scorer { .. } | S::NonFiniteScore { .. } | S::ScoreCount { .. }) => 1,
            Error::Search(_) => 2,
            Error::Io { .. } | Error::Json(_) => 1,
        }
    }
}
