//! Probe samples: `{"prompt", "answer"}` JSONL rows, and their tokenized form.
use std::path::{Path, PathBuf};

use lora_model::{PromptFormat, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::error::{ProbeError, Result};

/// One text sample (the prompt, and the reference answer needed in teacher-forced mode): the workspace's one
/// sample type.
pub use lora_common::Sample;

/// One pre-tokenized sample: prompt ids (templated, with special tokens) and answer ids (without).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedSample {
    /// Prompt token ids, exactly as fed to the model.
    pub prompt_ids: Vec<i64>,
    /// Answer token ids, appended to the prompt ids as they are (no re-tokenization across the seam).
    pub answer_ids: Vec<i64>,
}

/// The name used in errors for samples that come from memory rather than a file.
pub(crate) fn memory_origin() -> PathBuf {
    PathBuf::from("<samples>")
}

/// Reads `{"prompt": ..., "answer": ...}` rows from a JSONL file (blank lines are skipped).
///
/// Errors name the file and the 1-based line of a malformed row.
pub fn read_jsonl(path: impl AsRef<Path>) -> Result<Vec<Sample>> {
    let path = path.as_ref();
    let text = lora_model::textfile::read_text(path).map_err(|e| match e {
        lora_model::textfile::TextFileError::Io(e) => ProbeError::io(path, e),
        e => ProbeError::Row { file: path.to_path_buf(), row: e.line().unwrap_or(0), message: e.to_string() },
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let s: Sample = serde_json::from_str(line).map_err(|e| ProbeError::Row {
            file: path.to_path_buf(),
            row: i + 1,
            message: format!("expected {{\"prompt\": string, \"answer\": string}}: {e}"),
        })?;
        out.push(s);
    }
    if out.is_empty() {
        return Err(ProbeError::Row { file: path.to_path_buf(), row: 0, message: "no samples in the file".into() });
    }
    Ok(out)
}

/// Tokenizes samples as fine-tuning data is built: the prompt in `format` (raw, or chat-templated with an optional
/// system message) via [`Tokenizer::encode_prompt`], the answer on its own without special tokens, appended as is.
///
/// `origin` names the data file in errors. With `require_answer`, an empty answer (or one that tokenizes to
/// nothing) is an error naming its row; rows are numbered from 1 in `samples` order.
pub fn tokenize_samples(
    tokenizer: &Tokenizer,
    samples: &[Sample],
    format: &PromptFormat,
    require_answer: bool,
    origin: Option<&Path>,
) -> Result<Vec<TokenizedSample>> {
    let file = origin.map_or_else(memory_origin, Path::to_path_buf);
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let row_err = |message: String| ProbeError::Row { file: file.clone(), row: i + 1, message };
            let prompt_ids = tokenizer.encode_prompt(&s.prompt, format)?;
            if prompt_ids.is_empty() {
                return Err(row_err("the prompt has no tokens".into()));
            }
            let answer_ids = tokenizer.encode(&s.answer, false)?;
            if require_answer && answer_ids.is_empty() {
                return Err(row_err("the answer is empty (teacher-forced probing needs one)".into()));
            }
            Ok(TokenizedSample { prompt_ids, answer_ids })
        })
        .collect()
}
