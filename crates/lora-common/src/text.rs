//! Reading text data files (JSONL, CSV, JSON) as UTF-8, naming the line of an invalid byte or a bad row.
use std::path::Path;

use crate::error::CommonError;

/// Why a text file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TextFileError {
    /// The file could not be opened or read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not UTF-8.
    #[error("invalid UTF-8 at byte {byte} of the line (data files must be UTF-8)")]
    Utf8 {
        /// 1-based line number.
        line: usize,
        /// 1-based byte offset of the first invalid byte within that line.
        byte: usize,
    },
}

impl TextFileError {
    /// The 1-based line an encoding error is on (`None` for I/O errors).
    pub fn line(&self) -> Option<usize> {
        match self {
            TextFileError::Utf8 { line, .. } => Some(*line),
            TextFileError::Io(_) => None,
        }
    }
}

/// Reads `path` as UTF-8 text (a leading byte-order mark is dropped).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let p = dir.path().join("bad.jsonl");
/// std::fs::write(&p, b"{\"prompt\": \"ok\"}\n{\"prompt\": \"\xff\"}\n")?;
/// let err = lora_common::text::read_text(&p).err().ok_or("line 2 is not UTF-8")?;
/// assert_eq!(err.line(), Some(2));
/// # Ok(()) }
/// ```
pub fn read_text(path: &Path) -> Result<String, TextFileError> {
    let bytes = std::fs::read(path)?;
    match String::from_utf8(bytes) {
        Ok(mut s) => {
            if s.starts_with('\u{feff}') {
                s.drain(..'\u{feff}'.len_utf8());
            }
            Ok(s)
        }
        Err(e) => {
            let bytes = e.as_bytes();
            let at = e.utf8_error().valid_up_to();
            let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
            let line_start = bytes[..at].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            Err(TextFileError::Utf8 { line, byte: at - line_start + 1 })
        }
    }
}

/// Reads a JSONL file into rows with their 1-based line numbers (blank lines skipped), as
/// [`CommonError::Row`] naming the line of the first row that is not valid UTF-8 or not a `T`.
///
/// ```
/// #[derive(Debug, serde::Deserialize)]
/// struct Row { prompt: String }
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let p = dir.path().join("p.jsonl");
/// std::fs::write(&p, "{\"prompt\": \"a\"}\n\n{\"prompt\": 3}\n")?;
/// let err = lora_common::text::read_jsonl_lines::<Row>(&p).err().ok_or("line 3 is not a Row")?;
/// assert!(err.to_string().contains("p.jsonl:3"), "{err}");
/// # Ok(()) }
/// ```
pub fn read_jsonl_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>, CommonError> {
    let text = read_text_file(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(line).map_err(|e| CommonError::Row {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        rows.push((i + 1, row));
    }
    Ok(rows)
}

/// [`read_text`] with its errors as [`CommonError`] (I/O, or a [`CommonError::Row`] naming the line).
pub fn read_text_file(path: &Path) -> Result<String, CommonError> {
    read_text(path).map_err(|e| match e {
        TextFileError::Io(source) => CommonError::Io { path: path.to_path_buf(), source },
        e => CommonError::Row { path: path.to_path_buf(), line: e.line().unwrap_or(0), message: e.to_string() },
    })
}
