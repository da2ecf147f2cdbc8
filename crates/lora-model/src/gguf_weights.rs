//! HF-named weights and config from a GGUF file (dequantized, q/k rows un-permuted as transformers does).
use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::WeightSource;

/// Opens a GGUF file as a config plus a weight source.
pub(crate) fn open(path: &Path) -> Result<(ModelConfig, Box<dyn WeightSource>)> {
    Err(ModelError::Gguf {
        path: path.to_path_buf(),
        message: "GGUF import is not built yet".into(),
    })
}

/// Loads the tokenizer (and chat template) stored in a GGUF file's metadata.
pub fn gguf_tokenizer_for(path: &Path) -> Result<crate::Tokenizer> {
    Err(ModelError::Gguf {
        path: path.to_path_buf(),
        message: "GGUF tokenizer import is not built yet".into(),
    })
}
