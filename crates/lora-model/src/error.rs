//! The one error type of `lora-model`.
use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model or an adapter.
///
/// Each variant names what it is about (file, tensor, layer, field) so that a user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config, index, adapter config) is malformed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A configuration is missing a field or holds a value we cannot run.
    #[error("{path}: {message}")]
    Config {
        /// The config file (or the GGUF file its values came from).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model architecture is not a Llama-family decoder we implement.
    #[error("{path}: unsupported architecture `{arch}` (supported: llama, mistral, qwen2, gemma3_text)")]
    UnsupportedArchitecture {
        /// The config file.
        path: PathBuf,
        /// The architecture named there.
        arch: String,
    },
    /// A model the project fetches on demand is not there yet.
    #[error("{path}: not found; fetch it with `{fetch}` (from the repository root)")]
    ModelNotFetched {
        /// Where the model was looked for.
        path: PathBuf,
        /// The command that fetches it.
        fetch: String,
    },
    /// A weight the model needs is not in any weight file.
    #[error("{file}: missing tensor `{name}`")]
    MissingTensor {
        /// The tensor name (HF naming).
        name: String,
        /// The weight file, or the directory / index that was searched.
        file: PathBuf,
    },
    /// A weight has the wrong shape.
    #[error("{file}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// The file holding it.
        file: PathBuf,
        /// The shape the model needs.
        expected: Vec<i64>,
        /// The shape in the file.
        actual: Vec<i64>,
    },
    /// A weight has a dtype we cannot load.
    #[error("{file}: tensor `{name}` has unsupported dtype {dtype}")]
    TensorDtype {
        /// The tensor name.
        name: String,
        /// The file holding it.
        file: PathBuf,
        /// The dtype in the file.
        dtype: String,
    },
    /// A safetensors file is malformed.
    #[error("{path}: invalid safetensors: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A GGUF file is malformed or uses something we do not support.
    #[error("{path}: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// The chat template refused the conversation (its `raise_exception`, e.g. roles that do not alternate or a
    /// system message the model does not take); the template's own message.
    #[error("chat template rejected the conversation: {0}")]
    TemplateRejected(String),
    /// A LoRA adapter is malformed, unsupported, or does not fit the base model.
    #[error("{path}: {message}")]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A weight holds NaN or infinite values.
    #[error("{file}: tensor `{name}`{} holds {count} non-finite value(s) (NaN or inf)", layer.map_or(String::new(), |l| format!(" (block {l})")))]
    NonFinite {
        /// The tensor name.
        name: String,
        /// The decoder block it belongs to, when it belongs to one.
        layer: Option<usize>,
        /// The file holding it.
        file: PathBuf,
        /// How many values are NaN or infinite.
        count: u64,
    },
    /// The device cannot run the dtype asked for (checked when the model is placed, before any weight is read;
    /// see [`crate::dtype_support`]).
    #[error("dtype {dtype} cannot run on {device}: {reason}")]
    UnsupportedDtype {
        /// The dtype (`f32`, `bf16`, `f16`, or libtorch's name of another).
        dtype: String,
        /// The device (`cpu`, `cuda:N`).
        device: String,
        /// Why: libtorch's refusal, or what the decoder needs.
        reason: String,
    },
    /// A request would exceed a limit of the model or the machine (context length, memory).
    #[error("{0}")]
    Limit(String),
    /// A caller passed an argument outside what the operation accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A shared helper failed (a crash-safe write, reading a data file).
    #[error(transparent)]
    Common(#[from] lora_common::CommonError),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias for `lora-model`.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    /// An [`ModelError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }
}
