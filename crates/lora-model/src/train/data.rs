//! Training data: `{"prompt", "answer"}` JSONL, tokenization with answer-only labels, padded batches and HF's
//! causal-LM loss.
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use crate::error::{ModelError, Result};
use crate::tokenizer::{PromptFormat, Tokenizer};

/// Label value the loss ignores (PyTorch's and HF's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One training example: the prompt (rendered with the chat template when training in chat mode) and the answer
/// the model should learn to produce after it (only its tokens, and the EOS after it, carry loss). The workspace's
/// one sample type.
pub type TrainSample = lora_common::Sample;

/// Reads `{"prompt": …, "answer": …}` objects, one per line (blank lines are skipped; other keys are ignored).
pub fn read_jsonl(path: &Path) -> Result<Vec<TrainSample>> {
    let out: Vec<TrainSample> = lora_common::text::read_jsonl_lines(path)?.into_iter().map(|(_, s)| s).collect();
    if out.is_empty() {
        return Err(ModelError::InvalidArgument(format!("{}: no training samples", path.display())));
    }
    Ok(out)
}

/// Which side of a batch receives padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// Pads after the tokens (HF Trainer's default for training).
    #[default]
    Right,
    /// Pads before the tokens (positions then follow the attention mask, as in HF).
    Left,
}

/// A tokenized example: `input_ids` and `labels` of equal length, labels [`IGNORE_INDEX`] on prompt positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedSample {
    /// Prompt ids, answer ids, EOS.
    pub input_ids: Vec<i64>,
    /// Unshifted labels (HF convention: the loss shifts them): `-100` on the prompt, the token id elsewhere.
    pub labels: Vec<i64>,
}

impl EncodedSample {
    /// `prompt ++ answer`, labelled on the answer only, truncated to `max_len` tokens.
    ///
    /// Truncation keeps the *first* `max_len` tokens (right truncation, as HF tokenizers and TRL's SFT do), so a
    /// long answer loses its tail (and its EOS); a prompt of `max_len` tokens or more leaves nothing to learn, and
    /// such samples are dropped by [`crate::train::train`]. `max_len = 0` means no limit.
    pub fn new(prompt_ids: &[i64], answer_ids: &[i64], max_len: usize) -> Self {
        let mut input_ids: Vec<i64> = prompt_ids.iter().chain(answer_ids).copied().collect();
        let mut labels: Vec<i64> =
            std::iter::repeat_n(IGNORE_INDEX, prompt_ids.len()).chain(answer_ids.iter().copied()).collect();
        if max_len > 0 && input_ids.len() > max_len {
            input_ids.truncate(max_len);
            labels.truncate(max_len);
        }
        EncodedSample { input_ids, labels }
    }

    /// Tokens that carry loss after the causal shift (labels at positions ≥ 1 that are not ignored).
    pub fn label_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Tokenizes one sample: prompt ids ([`Tokenizer::encode_prompt`] in `format`), then the answer
/// encoded without special tokens, then the tokenizer's first EOS id (if it has one); see [`EncodedSample::new`]
/// for truncation.
pub fn encode_sample(
    tokenizer: &Tokenizer,
    sample: &TrainSample,
    format: &PromptFormat,
    max_len: usize,
) -> Result<EncodedSample> {
    let prompt = tokenizer.encode_prompt(&sample.prompt, format)?;
    let mut answer = tokenizer.encode(&sample.answer, false)?;
    answer.extend(tokenizer.eos_token_ids().first().copied());
    Ok(EncodedSample::new(&prompt, &answer, max_len))
}

/// A padded batch on the CPU: `input_ids`, `attention_mask` (1 = token) and `labels` (`-100` on pads), all
/// `[B, T]` i64.
#[derive(Debug)]
pub struct Batch {
    /// Token ids, pads filled with the pad id.
    pub input_ids: Tensor,
    /// 1 on tokens, 0 on pads.
    pub attention_mask: Tensor,
    /// Unshifted labels, [`IGNORE_INDEX`] on prompts and pads.
    pub labels: Tensor,
}

impl Batch {
    /// Pads `samples` to the longest one with `pad_id` on the `padding` side.
    pub fn collate(samples: &[&EncodedSample], pad_id: i64, padding: Padding) -> Result<Batch> {
        let t = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
        if samples.is_empty() || t == 0 {
            return Err(ModelError::InvalidArgument("cannot build a batch from no tokens".into()));
        }
        let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for s in samples {
            if s.labels.len() != s.input_ids.len() {
                return Err(ModelError::InvalidArgument(format!(
                    "sample has {} input ids but {} labels",
                    s.input_ids.len(),
                    s.labels.len()
                )));
            }
            let pad = t - s.input_ids.len();
            let row = |v: &[i64], fill: i64, out: &mut Vec<i64>| match padding {
                Padding::Right => {
                    out.extend_from_slice(v);
                    out.extend(std::iter::repeat_n(fill, pad));
                }
                Padding::Left => {
                    out.extend(std::iter::repeat_n(fill, pad));
                    out.extend_from_slice(v);
                }
            };
            row(&s.input_ids, pad_id, &mut ids);
            row(&s.labels, IGNORE_INDEX, &mut labels);
            row(&vec![1; s.input_ids.len()], 0, &mut mask);
        }
        let shape = [samples.len() as i64, t as i64];
        Ok(Batch {
            input_ids: Tensor::f_from_slice(&ids)?.f_view(shape)?,
            attention_mask: Tensor::f_from_slice(&mask)?.f_view(shape)?,
            labels: Tensor::f_from_slice(&labels)?.f_view(shape)?,
        })
    }

    /// Tokens that carry loss after the causal shift.
    pub fn label_tokens(&self) -> Result<i64> {
        let t = self.labels.size().get(1).copied().unwrap_or(0);
        if t < 2 {
            return Ok(0);
        }
        Ok(self.labels.f_narrow(1, 1, t - 1)?.f_ne(IGNORE_INDEX)?.f_sum(Kind::Int64)?.f_int64_value(&[])?)
    }

    /// Real (non-pad) tokens.
    pub fn tokens(&self) -> Result<i64> {
        Ok(self.attention_mask.f_sum(Kind::Int64)?.f_int64_value(&[])?)
    }
}

/// Summed cross-entropy of HF's causal-LM loss: `logits[:, :-1]` against `labels[:, 1:]`, positions labelled
/// [`IGNORE_INDEX`] skipped, computed in f32 (HF's `ForCausalLMLoss` with `reduction="sum"`).
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let ls = logits.size();
    let (b, t, v) = match ls.as_slice() {
        [b, t, v] => (*b, *t, *v),
        _ => {
            return Err(ModelError::InvalidArgument(format!("logits must be [B, T, V], got {ls:?}")));
        }
    };
    if labels.size() != [b, t] {
        return Err(ModelError::InvalidArgument(format!(
            "labels shape {:?} differs from logits' [B, T] = [{b}, {t}]",
            labels.size()
        )));
    }
    if t < 2 {
        return Ok(logits.f_sum(Kind::Float)?.f_mul_scalar(0.0)?);
    }
    let shifted = logits.f_narrow(1, 0, t - 1)?.f_to_kind(Kind::Float)?.f_reshape([-1, v])?;
    let target = labels.f_narrow(1, 1, t - 1)?.f_to_device(logits.device())?.f_reshape([-1])?;
    Ok(shifted.f_cross_entropy_loss::<Tensor>(&target, None, Reduction::Sum, IGNORE_INDEX, 0.0)?)
}

/// HF's default causal-LM loss: [`causal_lm_loss_sum`] divided by the number of label tokens (the mean over
/// targets; 0 when there are none).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let sum = causal_lm_loss_sum(logits, labels)?;
    let t = labels.size().get(1).copied().unwrap_or(0);
    let n = if t < 2 {
        0
    } else {
        labels.f_narrow(1, 1, t - 1)?.f_ne(IGNORE_INDEX)?.f_sum(Kind::Int64)?.f_int64_value(&[])?
    };
    Ok(sum.f_div_scalar(n.max(1) as f64)?)
}
