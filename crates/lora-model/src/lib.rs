//! # lora-model
//!
//! A Llama-family decoder (Llama 2/3.x, Mistral, Qwen2, SmolLM2) on libtorch via `tch`, with LoRA layers whose
//! activity is chosen per call by a [`LayerMask`]: the building block for finding and using the LoRA *boundary
//! layer* (Chen et al., "Not All LoRA Parameters Are Essential", arXiv 2503.23360).
//!
//! - [`Llama`]: load an HF model directory or a `.gguf` file; forward with every layer's hidden state.
//! - [`LoraLinear`], [`LayerMask`]: LoRA beside each projection, switched on per block at run time.
//! - [`generate()`], [`generate_stream()`]: batched KV-cache generation; continuous batching (a finished row's
//!   place goes to the next waiting prompt).
//! - [`Tokenizer`], [`ChatTemplate`], [`PromptFormat`]: `tokenizers` + chat templates rendered as transformers
//!   renders them; how a prompt becomes model input (raw, or chat with an optional system message).
#![warn(missing_docs)]

pub mod adapter;
pub mod chat;
/// Crash-safe outputs (from `lora-common`).
pub use lora_common::atomic;
pub mod config;
pub mod device_map;
pub mod dtype_support;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
mod gguf_weights;
pub mod kernels;
pub use gguf_weights::{gguf_tokenizer_for, GgufWeights};
pub mod loading;
pub mod lora;
pub mod mask;
pub mod models;
/// The decoders under the path the crate had before: the same module as [`models`].
pub use models as model;
mod rng;
/// UTF-8 text and JSONL reading (from `lora-common`).
pub use lora_common::text as textfile;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use adapter::{load_adapter, prune_adapter, AdapterInfo, LoraConfig};
pub use config::{Architecture, ModelConfig};
pub use device_map::DeviceMap;
pub use error::{ModelError, Result};
pub use export::{save_hf_model, ExportOptions};
pub use generate::{
    generate, generate_stream, shared_prefix_len, Generation, GenerationConfig, GenerationTiming, Sampling,
    MIN_SHARED_PREFIX,
};
pub use loading::{
    fetch_command, load_model, load_model_on, load_tokenizer, resolve_model, DeviceSpec, DtypeSpec, DEFAULT_MODEL,
    GEMMA3_270M, GEMMA3_270M_SHORTCUT,
};
pub use lora::{LoraLinear, LoraWeights};
pub use mask::{LayerMask, Module};
pub use model::{ForwardOptions, ForwardOutput, KvCache, Llama, Logits};
pub use tokenizer::{ChatMessage, ChatTemplate, PromptFormat, Tokenizer};
pub use train::{init_lora, train, TrainConfig, TrainProgress, TrainSample, Trainer};
pub use weights::{Placement, SafetensorsWeights, WeightSource};

pub use tch;
