//! Model configuration, mirroring Hugging Face `config.json` for the Llama family and Gemma 3.
//!
//! [`HfConfig`] is the raw serde view of the file; [`ModelConfig`] is the validated, resolved form the
//! decoder runs on (architecture, head dimension, rotary settings, biases, and for Gemma 3 the per-layer
//! attention types in [`Gemma3Config`]).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One token id or several (HF allows both for `eos_token_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(i64),
    /// Several ids.
    Many(Vec<i64>),
}

impl TokenIds {
    /// All ids as a vector.
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Rotary-embedding parameters as HF writes them: `rope_scaling` (transformers 4) or `rope_parameters`
/// (transformers 5, which also carries `rope_theta`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// `default`, `linear` or `llama3` (`type` is accepted as an alias).
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    /// Base of the rotary frequencies (transformers 5 layout).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Scaling factor (`linear`, `llama3`).
    #[serde(default)]
    pub factor: Option<f64>,
    /// `llama3`: low-frequency factor.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// `llama3`: high-frequency factor.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the context length the model was pre-trained with.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// `rope_parameters` as HF writes it: one set of parameters, or (Gemma 3, transformers 5) one set per layer type
/// (`full_attention`, `sliding_attention`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RopeParametersField {
    /// Per layer type, e.g. `{"full_attention": {...}, "sliding_attention": {...}}`.
    PerLayerType(BTreeMap<String, RopeParameters>),
    /// One set for every layer.
    Single(RopeParameters),
}

impl RopeParametersField {
    /// The parameters of every layer, when this is a single set (an empty object counts as one).
    fn single(&self) -> Option<&RopeParameters> {
        match self {
            RopeParametersField::Single(p) => Some(p),
            RopeParametersField::PerLayerType(_) => None,
        }
    }

    /// The parameters of layer type `name`, when given per layer type.
    fn of_type(&self, name: &str) -> Option<&RopeParameters> {
        match self {
            RopeParametersField::PerLayerType(m) => m.get(name),
            RopeParametersField::Single(_) => None,
        }
    }

    fn is_per_layer_type(&self) -> bool {
        matches!(self, RopeParametersField::PerLayerType(m) if !m.is_empty())
    }
}

/// The raw fields of an HF `config.json` that a Llama-family or Gemma 3 decoder needs. Unknown fields are
/// ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HfConfig {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// e.g. `llama`, `mistral`, `qwen2`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Vocabulary size.
    pub vocab_size: Option<usize>,
    /// Model width.
    pub hidden_size: Option<usize>,
    /// MLP width.
    pub intermediate_size: Option<usize>,
    /// Number of decoder blocks.
    pub num_hidden_layers: Option<usize>,
    /// Query heads.
    pub num_attention_heads: Option<usize>,
    /// Key/value heads (GQA); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    /// Rotary base (transformers 4 layout).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rotary scaling (transformers 4 layout).
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// Rotary parameters (transformers 5 layout; per layer type for Gemma 3).
    #[serde(default)]
    pub rope_parameters: Option<RopeParametersField>,
    /// Maximum positions.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Llama: bias on q/k/v/o.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Llama: bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    /// Mistral / Qwen2 sliding-window size.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether the sliding window is used at all.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Beginning-of-sequence id.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
    /// Gemma 3: `sliding_attention` or `full_attention` per block.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 (older configs): every `n`-th block is full attention when `layer_types` is absent.
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3: attention scores are scaled by `query_pre_attn_scalar^-0.5`.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: the MLP activation (`gelu_pytorch_tanh`).
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// Llama family: the MLP activation (`silu`).
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Gemma 3 (transformers 4 layout): the rotary base of sliding-window layers.
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma: `logits = cap · tanh(logits / cap)` when set.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma: soft-capping of attention scores (not implemented; refused when set).
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 3 embedding models: attention without the causal mask (not implemented; refused when true).
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
}

/// The decoder families implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3/3.1/3.2, SmolLM2 and other `LlamaForCausalLM` models.
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (q/k/v bias).
    Qwen2,
    /// `Gemma3ForCausalLM` (`model_type` `gemma3_text`): (1+w) RMSNorms before and after attention and MLP, q/k
    /// norms, GELU-tanh MLP, scaled embeddings, sliding-window and full layers ([`Gemma3Config`]).
    Gemma3,
}

/// The attention of one Gemma 3 block, as HF's `layer_types` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    /// Attends to every earlier position; global RoPE base.
    FullAttention,
    /// Attends to the last `sliding_window` positions; local RoPE base.
    SlidingAttention,
}

/// What Gemma 3 adds to [`ModelConfig`]. The full-attention layers use [`ModelConfig::rope_theta`] and
/// [`ModelConfig::rope_scaling`]; [`ModelConfig::sliding_window`] stays `None` (it means a window on every
/// layer), the window of the sliding layers is here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gemma3Config {
    /// One entry per block.
    pub layer_types: Vec<LayerType>,
    /// Window of the sliding layers: query `i` sees key `j` when `i - j < sliding_window`.
    pub sliding_window: usize,
    /// Attention scale is `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: f64,
    /// Rotary base of the sliding layers.
    pub local_rope_theta: f64,
    /// Rotary scaling of the sliding layers.
    pub local_rope_scaling: RopeScaling,
    /// `logits = cap · tanh(logits / cap)` when set.
    pub final_logit_softcapping: Option<f64>,
}

/// How rotary frequencies are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Overall factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Pre-training context length.
        original_max_position_embeddings: usize,
    },
}

/// A validated configuration the decoder runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Decoder family.
    pub architecture: Architecture,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder blocks, `L`.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Rotary scaling.
    pub rope_scaling: RopeScaling,
    /// Maximum positions.
    pub max_position_embeddings: usize,
    /// Whether the LM head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Sliding attention window, if the model uses one.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<i64>,
    /// End-of-sequence ids (generation stops on any).
    pub eos_token_ids: Vec<i64>,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// Gemma 3's extra settings (`Some` exactly when `architecture` is [`Architecture::Gemma3`]).
    #[serde(default)]
    pub gemma3: Option<Gemma3Config>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: HfConfig =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })?;
        Self::from_hf(&raw, path)
    }

    /// Validates a parsed HF config; `origin` names the file in errors.
    pub fn from_hf(raw: &HfConfig, origin: &Path) -> Result<Self> {
        let origin: PathBuf = origin.to_path_buf();
        let cfg_err = |message: String| ModelError::Config { path: origin.clone(), message };
        let need = |v: Option<usize>, name: &str| v.ok_or_else(|| cfg_err(format!("missing required field `{name}`")));
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| raw.model_type.clone())
            .ok_or_else(|| cfg_err("neither `architectures` nor `model_type` is set".into()))?;
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            "Gemma3ForCausalLM" | "gemma3_text" => Architecture::Gemma3,
            other => return Err(ModelError::UnsupportedArchitecture { path: origin, arch: other.to_string() }),
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let intermediate_size = need(raw.intermediate_size, "intermediate_size")?;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(cfg_err(format!(
                "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let gemma = architecture == Architecture::Gemma3;
        let head_dim = match raw.head_dim {
            Some(d) => d,
            // transformers' Gemma3TextConfig default.
            None if gemma => 256,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(cfg_err(format!(
                    "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads}) and no head_dim is given"
                )))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(cfg_err(format!("head_dim must be even and positive, got {head_dim}")));
        }
        if num_layers == 0 || hidden_size == 0 || vocab_size == 0 || intermediate_size == 0 {
            return Err(cfg_err("sizes must be positive".into()));
        }
        if num_layers > crate::mask::MAX_BLOCKS {
            return Err(cfg_err(format!(
                "num_hidden_layers is {num_layers}; at most {} are supported",
                crate::mask::MAX_BLOCKS
            )));
        }
        check_parameter_count(
            hidden_size,
            intermediate_size,
            vocab_size,
            num_heads,
            num_kv_heads,
            head_dim,
            num_layers,
        )
        .map_err(cfg_err)?;
        let per_type = raw.rope_parameters.as_ref().is_some_and(RopeParametersField::is_per_layer_type);
        if per_type && !gemma {
            return Err(cfg_err(
                "`rope_parameters` per layer type is only supported for Gemma 3 (`gemma3_text`)".into(),
            ));
        }
        // The (full-attention) rotary parameters: `rope_parameters` (transformers 5; Gemma 3: its
        // `full_attention` entry), else `rope_scaling` (transformers 4).
        let rope_params = match raw.rope_parameters.as_ref() {
            Some(f) if per_type => f.of_type("full_attention").or(raw.rope_scaling.as_ref()),
            Some(f) => f.single().or(raw.rope_scaling.as_ref()),
            None => raw.rope_scaling.as_ref(),
        };
        let default_theta = if gemma { 1_000_000.0 } else { 10_000.0 };
        let rope_theta = raw.rope_theta.or_else(|| rope_params.and_then(|p| p.rope_theta)).unwrap_or(default_theta);
        let rope_scaling = rope_scaling_of(rope_params, &cfg_err)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let gemma3 = if gemma { Some(gemma3_config(raw, num_layers, &cfg_err)?) } else { None };
        let sliding_window = match architecture {
            Architecture::Mistral => raw.sliding_window,
            Architecture::Qwen2 if raw.use_sliding_window.unwrap_or(false) => raw.sliding_window,
            _ => None,
        };
        let first = |ids: &Option<TokenIds>| ids.as_ref().and_then(|t| t.to_vec().first().copied());
        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(if gemma { 131_072 } else { 4096 }),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: first(&raw.bos_token_id),
            eos_token_ids: raw.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default(),
            pad_token_id: first(&raw.pad_token_id),
            gemma3,
        })
    }

    /// The attention type of block `layer`: Gemma 3's `layer_types`, else full attention (a Mistral-style
    /// [`ModelConfig::sliding_window`] applies to every block alike).
    pub fn layer_type(&self, layer: usize) -> LayerType {
        self.gemma3.as_ref().and_then(|g| g.layer_types.get(layer).copied()).unwrap_or(LayerType::FullAttention)
    }

    /// Output width of each projection, by HF module name (`q_proj`, …, `down_proj`).
    pub fn projection_shape(&self, module: &str) -> Option<(usize, usize)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        Some(match module {
            "q_proj" => (q, h),
            "k_proj" | "v_proj" => (kv, h),
            "o_proj" => (h, q),
            "gate_proj" | "up_proj" => (i, h),
            "down_proj" => (h, i),
            _ => return None,
        })
    }
}

/// Most weight values a model may declare (2^50, about a thousand times the largest open models): every size
/// the crate derives from a config (bytes per block, per device, of the whole model) then fits in `u64`, and a
/// config with absurd sizes is refused before anything is allocated for it.
pub const MAX_PARAMETERS: u64 = 1 << 50;

/// Checks that the projections, embedding and blocks of a model of these sizes hold at most [`MAX_PARAMETERS`]
/// values (each product checked, so that sizes that overflow are refused too).
fn check_parameter_count(
    hidden: usize,
    inter: usize,
    vocab: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: usize,
) -> std::result::Result<(), String> {
    let m = |a: u64, b: u64| a.checked_mul(b);
    let total = (|| {
        let (h, i) = (hidden as u64, inter as u64);
        let q = m(heads as u64, head_dim as u64)?;
        let kv = m(kv_heads as u64, head_dim as u64)?;
        // q and o, k and v, gate/up/down, biases and norms (a generous bound: every optional part counted).
        let block = m(m(q, h)?, 2)?
            .checked_add(m(m(kv, h)?, 2)?)?
            .checked_add(m(m(i, h)?, 3)?)?
            .checked_add(m(q.checked_add(kv)?.checked_add(i)?.checked_add(h)?, 4)?)?;
        m(block, layers as u64)?.checked_add(m(m(vocab as u64, h)?, 2)?)
    })();
    match total {
        Some(n) if n <= MAX_PARAMETERS => Ok(()),
        _ => Err(format!(
            "sizes (hidden_size {hidden}, intermediate_size {inter}, vocab_size {vocab}, {heads} heads and {kv_heads} \
             key/value heads of {head_dim}, {layers} layers) describe more than 2^50 weights"
        )),
    }
}

/// The rotary scaling an HF parameter set declares (`None`: plain RoPE).
fn rope_scaling_of(p: Option<&RopeParameters>, cfg_err: &dyn Fn(String) -> ModelError) -> Result<RopeScaling> {
    let Some(p) = p else { return Ok(RopeScaling::Default) };
    Ok(match p.rope_type.as_deref().unwrap_or("default") {
        "default" => RopeScaling::Default,
        "linear" => {
            RopeScaling::Linear { factor: p.factor.ok_or_else(|| cfg_err("rope `linear` needs `factor`".into()))? }
        }
        "llama3" => {
            let get = |v: Option<f64>, name: &str| v.ok_or_else(|| cfg_err(format!("rope `llama3` needs `{name}`")));
            RopeScaling::Llama3 {
                factor: get(p.factor, "factor")?,
                low_freq_factor: get(p.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: get(p.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: p
                    .original_max_position_embeddings
                    .ok_or_else(|| cfg_err("rope `llama3` needs `original_max_position_embeddings`".into()))?,
            }
        }
        other => return Err(cfg_err(format!("unsupported rope type `{other}` (supported: default, linear, llama3)"))),
    })
}

/// Gemma 3's settings, with transformers' `Gemma3TextConfig` defaults for what the file leaves out; what is not
/// implemented (attention soft-capping, bidirectional attention, another activation) is refused by name.
fn gemma3_config(raw: &HfConfig, num_layers: usize, cfg_err: &dyn Fn(String) -> ModelError) -> Result<Gemma3Config> {
    if let Some(cap) = raw.attn_logit_softcapping {
        return Err(cfg_err(format!("`attn_logit_softcapping` ({cap}) is not implemented for Gemma 3")));
    }
    if raw.use_bidirectional_attention == Some(true) {
        return Err(cfg_err(
            "`use_bidirectional_attention: true` (Gemma 3 embedding models) is not implemented".into(),
        ));
    }
    let act = raw.hidden_activation.as_deref().or(raw.hidden_act.as_deref()).unwrap_or("gelu_pytorch_tanh");
    if act != "gelu_pytorch_tanh" {
        return Err(cfg_err(format!("Gemma 3 activation `{act}` is not implemented (supported: gelu_pytorch_tanh)")));
    }
    let layer_types = match &raw.layer_types {
        Some(types) => {
            if types.len() != num_layers {
                return Err(cfg_err(format!(
                    "`layer_types` has {} entries but there are {num_layers} layers",
                    types.len()
                )));
            }
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "full_attention" => Ok(LayerType::FullAttention),
                    "sliding_attention" => Ok(LayerType::SlidingAttention),
                    other => Err(cfg_err(format!(
                        "`layer_types[{i}]` is `{other}` (supported: full_attention, sliding_attention)"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?
        }
        None => {
            let pattern = raw.sliding_window_pattern.unwrap_or(6).max(1);
            (0..num_layers)
                .map(|i| if (i + 1) % pattern == 0 { LayerType::FullAttention } else { LayerType::SlidingAttention })
                .collect()
        }
    };
    let sliding = raw.rope_parameters.as_ref().and_then(|f| f.of_type("sliding_attention"));
    let local_rope_theta = sliding.and_then(|p| p.rope_theta).or(raw.rope_local_base_freq).unwrap_or(10_000.0);
    let sliding_window = raw.sliding_window.unwrap_or(4096);
    if sliding_window == 0 {
        return Err(cfg_err("`sliding_window` must be positive".into()));
    }
    let query_pre_attn_scalar = raw.query_pre_attn_scalar.unwrap_or(256.0);
    if query_pre_attn_scalar.is_nan() || query_pre_attn_scalar <= 0.0 {
        return Err(cfg_err(format!("`query_pre_attn_scalar` must be positive, got {query_pre_attn_scalar}")));
    }
    if let Some(cap) = raw.final_logit_softcapping {
        if cap.is_nan() || cap <= 0.0 {
            return Err(cfg_err(format!("`final_logit_softcapping` must be positive, got {cap}")));
        }
    }
    Ok(Gemma3Config {
        layer_types,
        sliding_window,
        query_pre_attn_scalar,
        local_rope_theta,
        local_rope_scaling: rope_scaling_of(sliding, cfg_err)?,
        final_logit_softcapping: raw.final_logit_softcapping,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        let raw: HfConfig =
            serde_json::from_str(json).map_err(|source| ModelError::Json { path: "config.json".into(), source })?;
        ModelConfig::from_hf(&raw, Path::new("config.json"))
    }

    #[test]
    fn rope_theta_in_either_layout() {
        let base = r#""architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2"#;
        let v4 = parse(&format!("{{{base},\"rope_theta\":500000.0}}")).unwrap();
        assert_eq!(v4.rope_theta, 500000.0);
        let v5 =
            parse(&format!("{{{base},\"rope_parameters\":{{\"rope_theta\":100000.0,\"rope_type\":\"default\"}}}}"))
                .unwrap();
        assert_eq!(v5.rope_theta, 100000.0);
        assert_eq!(v5.rope_scaling, RopeScaling::Default);
        assert_eq!(v5.head_dim, 4);
        assert_eq!(v5.num_kv_heads, 2);
    }

    #[test]
    fn llama3_scaling_and_qwen_bias() {
        let cfg = parse(r#"{"model_type":"qwen2","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}}"#).unwrap();
        assert!(cfg.qkv_bias && !cfg.o_bias);
        assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn absurd_sizes_are_refused_before_anything_is_allocated() {
        let cfg = |layers: &str, hidden: &str| {
            format!(
                r#"{{"model_type":"llama","vocab_size":10,"hidden_size":{hidden},"intermediate_size":16,"num_hidden_layers":{layers},"num_attention_heads":2}}"#
            )
        };
        let err = parse(&cfg("2305843009213693952", "8")).unwrap_err();
        assert!(matches!(err, ModelError::Config { .. }) && err.to_string().contains("num_hidden_layers"), "{err}");
        let err = parse(&cfg("65537", "8")).unwrap_err();
        assert!(err.to_string().contains("num_hidden_layers"), "{err}");
        // 2^26 wide: about 2^54 weights, no product overflows but the total exceeds the bound.
        let err = parse(&cfg("2", "67108864")).unwrap_err();
        assert!(err.to_string().contains("2^50 weights"), "{err}");
        // Products that overflow 64 bits.
        let err = parse(&cfg("2", "9223372036854775808")).unwrap_err();
        assert!(err.to_string().contains("2^50 weights"), "{err}");
        // The largest block count accepted, and a Llama-3.1-405B shape, still parse.
        assert_eq!(parse(&cfg("65536", "8")).unwrap().num_layers, 65536);
        let big = parse(r#"{"model_type":"llama","vocab_size":128256,"hidden_size":16384,"intermediate_size":53248,"num_hidden_layers":126,"num_attention_heads":128,"num_key_value_heads":8}"#).unwrap();
        assert_eq!(big.num_layers, 126);
    }

    #[test]
    fn errors_name_the_problem() {
        let err = parse(r#"{"architectures":["GPT2LMHeadModel"]}"#).unwrap_err();
        assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");
        let err = parse(r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10}"#).unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
        let err = parse(r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":3,"num_key_value_heads":2}"#).unwrap_err();
        assert!(err.to_string().contains("multiple"), "{err}");
        let err = parse(r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2,"rope_scaling":{"type":"yarn","factor":2.0}}"#).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    #[test]
    fn gemma3_text_config_resolves_per_layer_type() {
        let base = r#""model_type":"gemma3_text","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":7,"num_attention_heads":2,"num_key_value_heads":1"#;
        let v5 = parse(&format!(
            "{{{base},\"head_dim\":4,\"sliding_window\":3,\"query_pre_attn_scalar\":8,\"rope_parameters\":{{\"full_attention\":{{\"rope_type\":\"linear\",\"factor\":8.0,\"rope_theta\":1000000.0}},\"sliding_attention\":{{\"rope_type\":\"default\",\"rope_theta\":10000.0}}}}}}"
        ))
        .unwrap();
        assert_eq!(v5.architecture, Architecture::Gemma3);
        assert_eq!((v5.rope_theta, v5.rope_scaling), (1e6, RopeScaling::Linear { factor: 8.0 }));
        let g = v5.gemma3.as_ref().unwrap();
        assert_eq!((g.local_rope_theta, g.local_rope_scaling), (1e4, RopeScaling::Default));
        assert_eq!((g.sliding_window, g.query_pre_attn_scalar), (3, 8.0));
        assert!(v5.tie_word_embeddings && v5.sliding_window.is_none());
        // No layer_types: every sixth block is full attention.
        let full: Vec<usize> = (0..7).filter(|&i| v5.layer_type(i) == LayerType::FullAttention).collect();
        assert_eq!(full, vec![5]);
        // transformers 4 layout: rope_theta + rope_local_base_freq; Gemma's defaults for the rest.
        let v4 = parse(&format!(
            "{{{base},\"rope_theta\":500000.0,\"rope_local_base_freq\":20000.0,\"sliding_window_pattern\":2}}"
        ))
        .unwrap();
        let g = v4.gemma3.as_ref().unwrap();
        assert_eq!((v4.rope_theta, g.local_rope_theta, v4.head_dim, g.sliding_window), (5e5, 2e4, 256, 4096));
        assert_eq!(v4.layer_type(1), LayerType::FullAttention);
        assert_eq!(v4.layer_type(2), LayerType::SlidingAttention);
        assert_eq!(v4.layer_type(3), LayerType::FullAttention);
    }

    #[test]
    fn gemma3_features_not_implemented_are_refused_by_name() {
        let base = r#""model_type":"gemma3_text","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2"#;
        for (extra, name) in [
            (r#""attn_logit_softcapping":50.0"#, "attn_logit_softcapping"),
            (r#""use_bidirectional_attention":true"#, "use_bidirectional_attention"),
            (r#""hidden_activation":"gelu""#, "gelu"),
            (r#""layer_types":["sliding_attention"]"#, "layer_types"),
            (r#""layer_types":["sliding_attention","chunked_attention"]"#, "chunked_attention"),
        ] {
            let err = parse(&format!("{{{base},{extra}}}")).unwrap_err();
            assert!(err.to_string().contains(name), "{extra}: {err}");
        }
        let err = parse(r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2,"rope_parameters":{"full_attention":{"rope_theta":1.0}}}"#).unwrap_err();
        assert!(err.to_string().contains("per layer type"), "{err}");
    }
}
