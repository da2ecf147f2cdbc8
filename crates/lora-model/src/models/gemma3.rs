//! Gemma 3 (`Gemma3ForCausalLM`, `model_type` `gemma3_text`) as a family of [`Llama`]: what differs from the
//! Llama block, over the shared blocks of `blocks.rs`.
//!
//! - Norms are Gemma's RMSNorm: computed in f32 as `x · rsqrt(mean(x²) + eps) · (1 + w)`, then cast to the
//!   input's kind (HF stores `w`; a GGUF stores `1 + w` and the loader subtracts 1, as transformers does).
//! - The block normalises before *and* after attention and MLP:
//!   `x += post_attention_layernorm(attn(input_layernorm(x)))`,
//!   `x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))`.
//! - Attention normalises each query and key head (`q_norm`, `k_norm`) before RoPE and scales scores by
//!   `query_pre_attn_scalar^-0.5`; sliding-window layers use their own window and RoPE base
//!   ([`crate::config::Gemma3Config`]).
//! - The MLP is `down(gelu_tanh(gate(x)) · up(x))` (in `blocks.rs`).
//! - Embeddings are multiplied by `sqrt(hidden_size)` rounded to the weights' kind (hidden state 0 is the
//!   scaled embedding); the tied LM head uses the unscaled matrix; logits are soft-capped when
//!   `final_logit_softcapping` is set.
use tch::{Device, Kind, Tensor};

use super::blocks::{Attention, KvCache, Mlp, RmsNorm, RotaryEmbedding, StepCtx, Weights};
use super::llama::Block;
use crate::config::{Gemma3Config, ModelConfig};
use crate::error::{ModelError, Result};

/// The two norms a Gemma 3 block has beyond the Llama pair: `pre_feedforward_layernorm` and
/// `post_feedforward_layernorm`.
pub(super) struct GemmaNorms {
    pub(super) pre_feedforward: RmsNorm,
    pub(super) post_feedforward: RmsNorm,
}

impl RmsNorm {
    /// Loads Gemma's `1 + w` RMSNorm with HF weight `name` (`[dim]`).
    pub(super) fn load_gemma(w: &Weights<'_>, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let mut norm = RmsNorm::load(w, name, dim, eps)?;
        norm.gemma_scale = Some(norm.weight.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?);
        Ok(norm)
    }
}

/// The Gemma 3 settings of `cfg`, or an error naming the block when they are missing.
fn settings(cfg: &ModelConfig, index: usize) -> Result<&Gemma3Config> {
    cfg.gemma3.as_ref().ok_or_else(|| {
        ModelError::InvalidArgument(format!("block {index}: a Gemma 3 block needs the Gemma 3 configuration"))
    })
}

impl Block {
    /// Loads Gemma 3 block `index`: the four norms, `self_attn.{q,k,v,o}_proj` with `q_norm` / `k_norm`, and
    /// `mlp.{gate,up,down}_proj`.
    pub(super) fn load_gemma3(w: &Weights<'_>, cfg: &ModelConfig, index: usize) -> Result<Self> {
        let g = settings(cfg, index)?;
        let p = format!("model.layers.{index}");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let norm = |leaf: &str, dim: usize| RmsNorm::load_gemma(w, &format!("{p}.{leaf}.weight"), dim, eps);
        let mut attn = Attention::load(w, cfg, index)?;
        attn.q_norm = Some(norm("self_attn.q_norm", cfg.head_dim)?);
        attn.k_norm = Some(norm("self_attn.k_norm", cfg.head_dim)?);
        attn.scale = Some(g.query_pre_attn_scalar.powf(-0.5));
        Ok(Block {
            index,
            layer_type: cfg.layer_type(index),
            input_norm: norm("input_layernorm", h)?,
            attn,
            post_norm: norm("post_attention_layernorm", h)?,
            mlp: Mlp::load(w, cfg, index)?,
            gemma: Some(GemmaNorms {
                pre_feedforward: norm("pre_feedforward_layernorm", h)?,
                post_feedforward: norm("post_feedforward_layernorm", h)?,
            }),
        })
    }

    /// The Gemma 3 block on `x` `[B, T, H]`, with `norms` its feed-forward norms.
    pub(super) fn forward_gemma3(
        &self,
        norms: &GemmaNorms,
        x: &Tensor,
        ctx: &StepCtx<'_>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let l = self.index;
        let n = self.input_norm.forward(x)?;
        let a = self.attn.forward(&n, l, ctx.for_layer(self.layer_type), ctx.opts, cache)?;
        let x = x.f_add(&self.post_norm.forward(&a)?)?;
        let n = norms.pre_feedforward.forward(&x)?;
        let m = self.mlp.forward(&n, l, ctx.opts)?;
        Ok(x.f_add(&norms.post_feedforward.forward(&m)?)?)
    }

    /// This block's HF-named norm weights beyond the Llama pair (`q_norm`, `k_norm`, the feed-forward norms).
    pub(super) fn gemma3_named_norms(&self) -> Vec<(String, Tensor)> {
        let p = format!("model.layers.{}", self.index);
        let mut out = Vec::new();
        if let Some(n) = &self.attn.q_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), n.weight.shallow_clone()));
        }
        if let Some(n) = &self.attn.k_norm {
            out.push((format!("{p}.self_attn.k_norm.weight"), n.weight.shallow_clone()));
        }
        if let Some(g) = &self.gemma {
            out.push((format!("{p}.pre_feedforward_layernorm.weight"), g.pre_feedforward.weight.shallow_clone()));
            out.push((format!("{p}.post_feedforward_layernorm.weight"), g.post_feedforward.weight.shallow_clone()));
        }
        out
    }
}

/// The rotary embedding of the sliding-window layers (`None` for the Llama family).
pub(super) fn local_rope(cfg: &ModelConfig, device: Device) -> Result<Option<RotaryEmbedding>> {
    cfg.gemma3
        .as_ref()
        .map(|g| RotaryEmbedding::new(cfg.head_dim, g.local_rope_theta, &g.local_rope_scaling, device))
        .transpose()
}

/// `sqrt(hidden_size)` as a scalar tensor of `kind` (HF rounds the scale to the embedding's dtype before the
/// product), on `device`.
pub(super) fn embed_scale(cfg: &ModelConfig, kind: Kind, device: Device) -> Result<Tensor> {
    let scale = (cfg.hidden_size as f32).sqrt();
    Ok(Tensor::from(scale).f_to_kind(kind)?.f_to_device(device)?)
}

/// `cap · tanh(logits / cap)`.
pub(super) fn softcap(logits: Tensor, cap: f64) -> Result<Tensor> {
    Ok(logits.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?)
}
