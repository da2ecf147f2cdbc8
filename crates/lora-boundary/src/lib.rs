//! # lora-boundary
//!
//! Find the LoRA *boundary layer* of a fine-tuned LLM and drop LoRA above it at inference, with no retraining
//! (Chen et al., "Not All LoRA Parameters Are Essential: Insights on Inference Necessity", arXiv 2503.23360).
//!
//! This crate is the facade: it re-exports what a user needs from the workspace crates and adds the pipeline and
//! the `lora-boundary` command line.
//!
//! ```no_run
//! use lora_boundary::{load_model, LayerMask, GenerationConfig, generate, PromptFormat};
//! let (model, tokenizer) = load_model("models/SmolLM2-135M-Instruct.Q4_1.gguf", Default::default())?;
//! let format = PromptFormat::chat_with_system("Answer in one word.");
//! let prompt = tokenizer.encode_prompt("What is the capital of France?", &format)?;
//! let cfg = GenerationConfig { max_new_tokens: 16, eos_token_ids: tokenizer.eos_token_ids().to_vec(), ..Default::default() };
//! let (out, _timing) = generate(&model, Some(&tokenizer), &[prompt], &cfg, &LayerMask::keep_through(14))?;
//! println!("{}", out[0].text);
//! # Ok::<(), lora_boundary::Error>(())
//! ```
#![warn(missing_docs)]

pub mod cli;
pub mod commands;
mod error;
mod loading;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod scoring;
pub mod settings;
pub mod summary;
pub mod tasks;

pub use error::{Error, Result};
pub use loading::{load_model, parse_device, parse_kind, resolve_kind, resolve_model, DEFAULT_MODEL};
pub use lora_metrics as metrics;
pub use lora_model::tch;
pub use lora_model::{
    self as model, generate, generate_stream, load_adapter, prune_adapter, AdapterInfo, ChatMessage, ForwardOptions,
    Generation, GenerationConfig, LayerMask, Llama, Logits, LoraConfig, ModelConfig, Module, Placement, PromptFormat,
    Sampling, Tokenizer,
};
pub use lora_probe as probe;
pub use lora_search as search;
