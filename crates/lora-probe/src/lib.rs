//! # lora-probe
//!
//! The per-layer logit-lens probability probe of Chen et al., "Not All LoRA Parameters Are Essential"
//! (arXiv 2503.23360), Fig. 1, 2 and 5: how sure the model is of the answer after each block, with LoRA on in
//! chosen blocks only.
//!
//! For every point `i = 0..=L` (the state after `i` blocks, `0` = embeddings) and each of the first `k` answer
//! positions, the model's final norm and LM head are applied to the hidden state (the last point is the real output
//! distribution) and the softmax (f32) gives the answer token's probability, the max probability, the answer
//! token's rank and the entropy. Curves are pooled over samples and positions, per position, with seeded 95%
//! bootstrap CIs; [`difference`] compares two masks.
//!
//! - [`Probe`] ([`Probe::run`] on text, [`Probe::run_tokenized`] on token ids) → [`ProbeResult`] (JSON, CSV, SVG).
//! - [`LogitLens`]: the projection of gathered positions of every hidden state.
//! - [`scoring`]: teacher-forced answer log-probabilities and the one left-padded prompt+answer batching.
//!
//! ```no_run
//! use lora_model::{load_adapter, LayerMask, Llama, Placement};
//! use lora_probe::{Probe, ProbeConfig, TokenizedSample};
//! let mut model = Llama::load("tests/fixtures/models/tiny-llama", Placement::default())?;
//! load_adapter(&mut model, "tests/fixtures/adapters/tiny-llama-basic")?;
//! let samples = vec![TokenizedSample { prompt_ids: vec![5, 6, 7], answer_ids: vec![8, 9] }];
//! let result = Probe::new(ProbeConfig::default())
//!     .run_tokenized(&model, &samples, &[LayerMask::all(), LayerMask::keep_through(1)])?;
//! println!("{}", result.to_json(false)?);
//! # Ok::<(), lora_probe::ProbeError>(())
//! ```
#![warn(missing_docs)]

pub mod data;
pub mod error;
pub mod lens;
pub mod plot;
pub mod probe;
pub mod result;
pub mod scoring;

pub use data::{read_jsonl, tokenize_samples, Sample, TokenizedSample};
pub use error::{ProbeError, Result};
pub use lens::{LensStats, LogitLens};
/// How prompts are rendered (from `lora-model`): raw, or the chat template with an optional system message.
pub use lora_model::PromptFormat;
pub use plot::PlotMetric;
pub use probe::{parse_masks, Probe, ProbeConfig, ProbeMode};
pub use result::{difference, DifferenceCurve, MaskCurve, PerSample, ProbeResult};
