//! The decoders, built as candle-transformers builds them: shared blocks, each with a `load` from HF-named
//! weights and a `forward`, and one file per architecture family that puts them together.
//!
//! - `blocks`: what every family shares: RMSNorm, rotary embeddings (plain, linear and llama3 scaling),
//!   grouped-query attention over the [`KvCache`], the SwiGLU MLP, causal/sliding-window masks.
//! - `llama`: the Llama / Mistral / Qwen2 (SmolLM2) decoder, [`Llama`].
//! - `gemma3`: what the Gemma 3 family of [`Llama`] does differently (`1 + w` norms, norms after attention and
//!   MLP, q/k norms, sliding-window layers with their own RoPE base, scaled embeddings, logit soft-capping).
//! - `decode`: [`Llama`]'s fused one-token decode step on CPU (both families).
//!
//! [`crate::model`] is the same module under the path the crate had before.
use tch::Tensor;

use crate::mask::LayerMask;

mod blocks;
mod decode;
mod gemma3;
mod llama;

pub use blocks::KvCache;
pub use llama::Llama;

/// Which logits a forward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Logits {
    /// Every position: `[B, T, V]`.
    #[default]
    All,
    /// The last position only: `[B, V]` (what generation needs; saves a `T × V` projection).
    Last,
    /// None (e.g. when only hidden states are wanted).
    Skip,
}

/// Options of one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions<'a> {
    /// Which blocks' LoRA is active.
    pub mask: &'a LayerMask,
    /// Whether to return every hidden state.
    pub hidden_states: bool,
    /// Which logits to compute.
    pub logits: Logits,
    /// Training mode (LoRA dropout on).
    pub train: bool,
}

impl<'a> ForwardOptions<'a> {
    /// Inference with the given mask, all logits, no hidden states.
    pub fn new(mask: &'a LayerMask) -> Self {
        ForwardOptions { mask, hidden_states: false, logits: Logits::All, train: false }
    }
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct ForwardOutput {
    /// Logits in f32, shaped per [`Logits`]; `None` with [`Logits::Skip`].
    pub logits: Option<Tensor>,
    /// With `hidden_states`: `L + 1` tensors `[B, T, H]`; index `i` is the state after `i` blocks (`0` =
    /// embeddings, `L` = the last block's output *before* the final norm). HF's `hidden_states[i]` equals index
    /// `i` for `i < L`; HF's last entry is the final-normed state, which is [`Llama::final_norm`] of index `L`.
    pub hidden_states: Vec<Tensor>,
}
