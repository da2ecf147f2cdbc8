//! [`Sample`]: the one prompt/answer type that data loading, training, probing, search and evaluation share.
use serde::{Deserialize, Serialize};

/// One example: the prompt the model sees, the answer it is trained / probed on, and every reference a metric
/// accepts (empty means "the answer alone").
///
/// ```
/// # fn main() -> Result<(), serde_json::Error> {
/// let s: lora_common::Sample = serde_json::from_str(r#"{"prompt": "2+2?", "answer": "4"}"#)?;
/// assert_eq!(s.references(), ["4"]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// The user prompt (before any chat template).
    pub prompt: String,
    /// The target answer (the first reference); may be empty where only the prompt is needed.
    #[serde(default)]
    pub answer: String,
    /// All references (at least the answer), when there are several.
    #[serde(default)]
    pub references: Vec<String>,
}

impl Sample {
    /// A sample with one reference, its answer.
    pub fn new(prompt: impl Into<String>, answer: impl Into<String>) -> Self {
        Sample { prompt: prompt.into(), answer: answer.into(), references: Vec::new() }
    }

    /// The references a metric compares against: `references`, or the answer when there are none.
    pub fn references(&self) -> Vec<String> {
        if self.references.is_empty() {
            vec![self.answer.clone()]
        } else {
            self.references.clone()
        }
    }
}
