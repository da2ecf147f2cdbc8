//! The Llama-family decoder: embeddings, `L` pre-norm blocks (GQA attention with RoPE, SwiGLU MLP), final
//! RMSNorm and LM head. Every block's output can be returned, which is what the logit lens reads.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::lora::LoraLinear;
use crate::mask::{LayerMask, Module};
use crate::weights::{load_placed, Placement, SafetensorsWeights, WeightSource};

mod decode;

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

/// Keys and values of past positions, preallocated for `capacity` positions.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// `[B, capacity]` bool: which cached positions are real tokens (not left padding).
    key_mask: Tensor,
    /// `[B]` i64: the position id the next token of each row gets.
    next_pos: Tensor,
    len: i64,
    capacity: i64,
    padded: bool,
}

impl KvCache {
    /// Positions filled so far.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum positions.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }
}

struct Attention {
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    o: LoraLinear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

struct Mlp {
    gate: LoraLinear,
    up: LoraLinear,
    down: LoraLinear,
}

struct Block {
    index: usize,
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

impl Block {
    fn linear(&self, m: Module) -> &LoraLinear {
        match m {
            Module::Q => &self.attn.q,
            Module::K => &self.attn.k,
            Module::V => &self.attn.v,
            Module::O => &self.attn.o,
            Module::Gate => &self.mlp.gate,
            Module::Up => &self.mlp.up,
            Module::Down => &self.mlp.down,
        }
    }

    fn linear_mut(&mut self, m: Module) -> &mut LoraLinear {
        match m {
            Module::Q => &mut self.attn.q,
            Module::K => &mut self.attn.k,
            Module::V => &mut self.attn.v,
            Module::O => &mut self.attn.o,
            Module::Gate => &mut self.mlp.gate,
            Module::Up => &mut self.mlp.up,
            Module::Down => &mut self.mlp.down,
        }
    }
}

/// What a forward pass starts from.
#[derive(Clone, Copy)]
enum Input<'a> {
    /// Token ids `[B, T]`.
    Ids(&'a Tensor),
    /// The hidden state `[B, T, H]` after this many blocks.
    Hidden(&'a Tensor, usize),
}

/// Per-call state shared by all blocks.
struct StepCtx<'a> {
    cos: Tensor,
    sin: Tensor,
    attn_mask: Option<Tensor>,
    is_causal: bool,
    opts: &'a ForwardOptions<'a>,
}

/// A Llama-family causal language model (Llama 2/3.x, Mistral, Qwen2, SmolLM2) with optional LoRA.
pub struct Llama {
    config: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    inv_freq: Tensor,
    /// The same inverse frequencies on the host (the fused decode step's RoPE).
    inv_freq_host: Vec<f32>,
    place: Placement,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama").field("config", &self.config).field("placement", &self.place).finish_non_exhaustive()
    }
}

/// Inverse rotary frequencies (f32, `[head_dim / 2]`), scaled as HF does for `linear` and `llama3`.
fn inverse_frequencies(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base = cfg.rope_theta;
    (0..d / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / d as f32;
            let inv = 1.0f32 / (base as f32).powf(exponent);
            match cfg.rope_scaling {
                RopeScaling::Default => inv,
                RopeScaling::Linear { factor } => inv / factor as f32,
                RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                    let (factor, lo, hi) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
                    let old = original_max_position_embeddings as f32;
                    let low_freq_wavelen = old / lo;
                    let high_freq_wavelen = old / hi;
                    let wavelen = 2.0 * std::f32::consts::PI / inv;
                    if wavelen < high_freq_wavelen {
                        inv
                    } else if wavelen > low_freq_wavelen {
                        inv / factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * inv / factor + smooth * inv
                    }
                }
            }
        })
        .collect()
}

/// RoPE in HF's half-split layout, `x·cos + rotate_half(x)·sin`, as `x·cos + roll(x, D/2)·sin_signed` where
/// `sin_signed = [-sin₁, sin₂]` is prepared once per forward: three kernels instead of seven.
fn apply_rope(x: &Tensor, cos: &Tensor, sin_signed: &Tensor, half: i64) -> Result<Tensor> {
    let rolled = x.f_roll([half], [-1])?;
    Ok(x.f_mul(cos)?.f_addcmul(&rolled, sin_signed)?)
}

impl Attention {
    fn forward(&self, x: &Tensor, layer: usize, ctx: &StepCtx<'_>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let m = ctx.opts.mask;
        let train = ctx.opts.train;
        let q = self.q.forward(x, m.is_active(layer, Module::Q), train)?;
        let k = self.k.forward(x, m.is_active(layer, Module::K), train)?;
        let v = self.v.forward(x, m.is_active(layer, Module::V), train)?;
        let q = q.f_view([b, t, self.num_heads, self.head_dim])?.f_transpose(1, 2)?;
        let k = k.f_view([b, t, self.num_kv_heads, self.head_dim])?.f_transpose(1, 2)?;
        let v = v.f_view([b, t, self.num_kv_heads, self.head_dim])?.f_transpose(1, 2)?;
        let half = self.head_dim / 2;
        let q = apply_rope(&q, &ctx.cos, &ctx.sin, half)?;
        let k = apply_rope(&k, &ctx.cos, &ctx.sin, half)?;
        let (k, v) = match cache {
            Some(c) => {
                let start = c.len;
                let kc = &mut c.keys[layer];
                kc.f_narrow(2, start, t)?.f_copy_(&k)?;
                let vc = &mut c.values[layer];
                vc.f_narrow(2, start, t)?.f_copy_(&v)?;
                (kc.f_narrow(2, 0, start + t)?, vc.f_narrow(2, 0, start + t)?)
            }
            None => (k, v),
        };
        let rep = self.num_heads / self.num_kv_heads;
        let out = if t == 1 && rep > 1 {
            // One query per head: fold the query heads sharing a KV head into the query axis, so attention runs
            // per KV head with no repeated keys/values (a [B, 1, 1, S] mask broadcasts over the folded axis).
            let qg = q.f_reshape([b, self.num_kv_heads, rep, self.head_dim])?;
            Tensor::f_scaled_dot_product_attention(&qg, &k, &v, ctx.attn_mask.as_ref(), 0.0, false, None, false)?
                .f_reshape([b, self.num_heads, 1, self.head_dim])?
        } else {
            Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                ctx.attn_mask.as_ref(),
                0.0,
                ctx.is_causal,
                None,
                rep > 1,
            )?
        };
        let out = out.f_transpose(1, 2)?.f_reshape([b, t, self.num_heads * self.head_dim])?;
        self.o.forward(&out, m.is_active(layer, Module::O), train)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, layer: usize, opts: &ForwardOptions<'_>) -> Result<Tensor> {
        let m = opts.mask;
        let gate = self.gate.forward(x, m.is_active(layer, Module::Gate), opts.train)?;
        let up = self.up.forward(x, m.is_active(layer, Module::Up), opts.train)?;
        let h = gate.f_silu()?.f_mul(&up)?;
        self.down.forward(&h, m.is_active(layer, Module::Down), opts.train)
    }
}

impl Llama {
    /// Loads a model from an HF directory (`config.json` + safetensors) or a `.gguf` file.
    pub fn load(path: impl AsRef<Path>, place: Placement) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            let config = ModelConfig::from_file(path.join("config.json"))?;
            let weights = SafetensorsWeights::open_dir(path)?;
            Self::from_weights(config, &weights, place)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            let (config, weights) = crate::gguf_weights::open(path)?;
            Self::from_weights(config, weights.as_ref(), place)
        } else if !path.exists() {
            Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such model directory or .gguf file"),
            ))
        } else {
            Err(ModelError::InvalidArgument(format!(
                "{}: a model is an HF directory (config.json + safetensors) or a .gguf file",
                path.display()
            )))
        }
    }

    /// Builds the model from a config and a source of HF-named weights.
    pub fn from_weights(config: ModelConfig, src: &dyn WeightSource, place: Placement) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let c = &config;
        let (h, v) = (c.hidden_size as i64, c.vocab_size as i64);
        let load = |name: &str, shape: &[i64]| load_placed(src, name, shape, place);
        let linear = |layer: usize, module: Module, bias: bool| -> Result<LoraLinear> {
            let (out, inp) = c
                .projection_shape(module.hf_name())
                .ok_or_else(|| ModelError::InvalidArgument(format!("unknown module {module:?}")))?;
            let path = module.hf_path(layer);
            let w = load(&format!("{path}.weight"), &[out as i64, inp as i64])?;
            let b = if bias { Some(load(&format!("{path}.bias"), &[out as i64])?) } else { None };
            Ok(LoraLinear::new(w, b))
        };
        let embed = load("model.embed_tokens.weight", &[v, h])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            blocks.push(Block {
                index: i,
                input_norm: load(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: load(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                attn: Attention {
                    q: linear(i, Module::Q, c.qkv_bias)?,
                    k: linear(i, Module::K, c.qkv_bias)?,
                    v: linear(i, Module::V, c.qkv_bias)?,
                    o: linear(i, Module::O, c.o_bias)?,
                    num_heads: c.num_heads as i64,
                    num_kv_heads: c.num_kv_heads as i64,
                    head_dim: c.head_dim as i64,
                },
                mlp: Mlp {
                    gate: linear(i, Module::Gate, c.mlp_bias)?,
                    up: linear(i, Module::Up, c.mlp_bias)?,
                    down: linear(i, Module::Down, c.mlp_bias)?,
                },
            });
        }
        let norm = load("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(load("lm_head.weight", &[v, h])?) };
        let inv_freq_host = inverse_frequencies(c);
        let inv_freq = Tensor::from_slice(&inv_freq_host).f_to_device(place.device)?;
        Ok(Llama { config, embed, blocks, norm, lm_head, inv_freq, inv_freq_host, place })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Number of decoder blocks `L`.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Device the weights live on.
    pub fn device(&self) -> Device {
        self.place.device
    }

    /// Floating-point kind of the weights.
    pub fn kind(&self) -> Kind {
        self.place.kind
    }

    /// The projection `module` of block `layer`.
    pub fn projection(&self, layer: usize, module: Module) -> Option<&LoraLinear> {
        self.blocks.get(layer).map(|b| b.linear(module))
    }

    /// Mutable access to the projection `module` of block `layer`.
    pub fn projection_mut(&mut self, layer: usize, module: Module) -> Option<&mut LoraLinear> {
        self.blocks.get_mut(layer).map(|b| b.linear_mut(module))
    }

    /// Every projection with its block index.
    pub fn projections(&self) -> impl Iterator<Item = (usize, Module, &LoraLinear)> {
        (0..self.blocks.len())
            .flat_map(move |l| Module::ALL.into_iter().filter_map(move |m| self.projection(l, m).map(|p| (l, m, p))))
    }

    /// The model's final RMSNorm, applied to any hidden state (the first half of the logit lens).
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        self.rms_norm(hidden, &self.norm)
    }

    /// The LM head (tied or not) applied to normed states, returning f32 logits.
    pub fn lm_head(&self, normed: &Tensor) -> Result<Tensor> {
        let w = self.lm_head.as_ref().unwrap_or(&self.embed);
        if let Some(y) = crate::kernels::small_linear(normed, w, None, None)? {
            return Ok(y.f_to_kind(Kind::Float)?);
        }
        Ok(normed.f_linear::<Tensor>(w, None)?.f_to_kind(Kind::Float)?)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let h = self.config.hidden_size as i64;
        Ok(x.f_rms_norm([h], Some(weight), self.config.rms_norm_eps)?)
    }

    /// A fresh KV cache for `batch` rows and up to `capacity` positions.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> Result<KvCache> {
        let c = &self.config;
        let shape = [batch, c.num_kv_heads as i64, capacity, c.head_dim as i64];
        let opts = (self.place.kind, self.place.device);
        let mut keys = Vec::with_capacity(c.num_layers);
        let mut values = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            keys.push(Tensor::f_zeros(shape, opts)?);
            values.push(Tensor::f_zeros(shape, opts)?);
        }
        Ok(KvCache {
            keys,
            values,
            key_mask: Tensor::f_ones([batch, capacity], (Kind::Bool, self.place.device))?,
            next_pos: Tensor::f_zeros([batch], (Kind::Int64, self.place.device))?,
            len: 0,
            capacity,
            padded: false,
        })
    }

    /// A full (uncached) forward pass over `input_ids` `[B, T]`.
    ///
    /// `attention_mask` `[B, T]` (1 = token, 0 = left padding) is optional; position ids follow it as HF's
    /// `generate` computes them (`cumsum - 1`), so a left-padded row gives the same results as the unpadded one.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        self.run(Input::Ids(input_ids), attention_mask, None, opts)
    }

    /// A cached forward step: the new tokens `input_ids` `[B, T]` attend to everything in `cache` and are
    /// appended to it. The first call may carry an `attention_mask` for left padding; later calls must not.
    ///
    /// One-token steps on CPU (f32/bf16, at most [`crate::kernels::MAX_ROWS`] rows, no hidden states) run as one
    /// fused step outside libtorch (norms, RoPE, cache write, attention and the fused projection kernels on f32
    /// rows); the results equal the libtorch path up to summation order in f32, and keep f32 intermediates in
    /// bf16. `LORA_BOUNDARY_KERNELS=off` disables it.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        self.run(Input::Ids(input_ids), attention_mask, Some(cache), opts)
    }

    /// Runs blocks `start..L` on `hidden` `[B, T, H]`, the state after `start` blocks (what
    /// [`ForwardOutput::hidden_states`]`[start]` holds), then the final norm and LM head; no cache.
    ///
    /// This shares work between masks that agree below `start`: e.g. `keep_through(b)` equals full LoRA up to
    /// block `b`, so one full-LoRA pass with hidden states plus `forward_from(h[b + 1], b + 1, none)` gives the
    /// output of every boundary `b` for about half the cost of separate passes. With `opts.hidden_states`, the
    /// returned states are indices `start..=L` (the first is `hidden` itself). `attention_mask` is as in
    /// [`Llama::forward`]; `start == L` applies only the head.
    pub fn forward_from(
        &self,
        hidden: &Tensor,
        start: usize,
        attention_mask: Option<&Tensor>,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        if start > self.num_layers() {
            return Err(ModelError::InvalidArgument(format!(
                "forward_from: start block {start} is past the last block ({} blocks)",
                self.num_layers()
            )));
        }
        self.run(Input::Hidden(hidden, start), attention_mask, None, opts)
    }

    fn run(
        &self,
        input: Input<'_>,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        let h = self.config.hidden_size as i64;
        let size = match input {
            Input::Ids(t) => t.size(),
            Input::Hidden(t, _) => t.size(),
        };
        let (b, t) = match (input, size.as_slice()) {
            (Input::Ids(_), [b, t]) if *b > 0 && *t > 0 => (*b, *t),
            (Input::Hidden(..), [b, t, hh]) if *b > 0 && *t > 0 && *hh == h => (*b, *t),
            (Input::Ids(_), _) => {
                return Err(ModelError::InvalidArgument(format!(
                    "input_ids must be a non-empty [batch, seq] tensor, got shape {size:?}"
                )))
            }
            (Input::Hidden(..), _) => {
                return Err(ModelError::InvalidArgument(format!(
                    "hidden states must be a non-empty [batch, seq, {h}] tensor, got shape {size:?}"
                )))
            }
        };
        opts.mask.validate(self.num_layers())?;
        if let (Input::Ids(ids), Some(c), None) = (input, cache.as_deref_mut(), attention_mask) {
            if let Some(out) = self.fused_decode(ids, c, opts)? {
                return Ok(out);
            }
        }
        let dev = self.place.device;
        let past = cache.as_ref().map_or(0, |c| c.len);
        if let Some(c) = cache.as_ref() {
            if c.key_mask.size()[0] != b {
                return Err(ModelError::InvalidArgument(format!(
                    "cache was made for batch {}, got batch {b}",
                    c.key_mask.size()[0]
                )));
            }
            if past + t > c.capacity {
                return Err(ModelError::InvalidArgument(format!(
                    "KV cache holds {} positions; {past} used, {t} more requested",
                    c.capacity
                )));
            }
            if past > 0 && attention_mask.is_some() {
                return Err(ModelError::InvalidArgument(
                    "an attention mask is only accepted on the first cached step".into(),
                ));
            }
        }
        let amask = match attention_mask {
            Some(m) => {
                if m.size() != [b, t] {
                    return Err(ModelError::InvalidArgument(format!(
                        "attention_mask shape {:?} differs from the input's [batch, seq] = [{b}, {t}]",
                        m.size()
                    )));
                }
                Some(m.f_to_device(dev)?.f_to_kind(Kind::Bool)?)
            }
            None => None,
        };
        let padded = match &amask {
            Some(m) => !bool::try_from(m.f_all()?)?,
            None => false,
        } || cache.as_ref().is_some_and(|c| c.padded);

        // Position ids.
        let positions = match (&amask, cache.as_ref()) {
            (Some(m), _) if padded => {
                m.f_to_kind(Kind::Int64)?.f_cumsum(1, Kind::Int64)?.f_sub_scalar(1)?.f_clamp_min(0)?
            }
            (_, Some(c)) if past > 0 => {
                c.next_pos.f_unsqueeze(1)?.f_add(&Tensor::f_arange(t, (Kind::Int64, dev))?.f_unsqueeze(0)?)?
            }
            _ => Tensor::f_arange_start(past, past + t, (Kind::Int64, dev))?.f_unsqueeze(0)?.f_expand([b, t], false)?,
        };

        // Attention mask: boolean [B, 1, T, S], true = may attend.
        let s = past + t;
        let window = self.config.sliding_window.map(|w| w as i64).filter(|&w| w < s);
        let (attn_mask, is_causal) = if !padded && window.is_none() {
            if t == 1 || past == 0 {
                (None, t > 1)
            } else {
                (Some(self.causal_mask(past, t, None, None)?), false)
            }
        } else {
            let key_valid = match (cache.as_deref_mut(), &amask) {
                (Some(c), Some(m)) => {
                    c.key_mask.f_narrow(1, past, t)?.f_copy_(m)?;
                    c.key_mask.f_narrow(1, 0, s)?
                }
                (Some(c), None) => c.key_mask.f_narrow(1, 0, s)?,
                (None, Some(m)) => m.shallow_clone(),
                (None, None) => Tensor::f_ones([b, s], (Kind::Bool, dev))?,
            };
            (Some(self.causal_mask(past, t, Some(&key_valid), window)?), false)
        };

        // Rotary tables for these positions, [B, 1, T, D].
        let freqs = positions.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?.f_mul(&self.inv_freq.f_view([1, 1, -1])?)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let cos = emb.f_cos()?.f_to_kind(self.place.kind)?.f_unsqueeze(1)?;
        let sin = freqs.f_sin()?;
        let sin = Tensor::f_cat(&[&sin.f_neg()?, &sin], -1)?.f_to_kind(self.place.kind)?.f_unsqueeze(1)?;
        let ctx = StepCtx { cos, sin, attn_mask, is_causal, opts };

        let (mut x, start) = match input {
            Input::Ids(ids) => (Tensor::f_embedding(&self.embed, &ids.f_to_device(dev)?, -1, false, false)?, 0),
            Input::Hidden(hs, start) => (hs.f_to_device(dev)?.f_to_kind(self.place.kind)?, start),
        };
        let mut hidden = Vec::new();
        if opts.hidden_states {
            hidden.push(x.shallow_clone());
        }
        for block in &self.blocks[start..] {
            let l = block.index;
            let n = self.rms_norm(&x, &block.input_norm)?;
            let a = block.attn.forward(&n, l, &ctx, cache.as_deref_mut())?;
            let x1 = x.f_add(&a)?;
            let n = self.rms_norm(&x1, &block.post_norm)?;
            let m = block.mlp.forward(&n, l, opts)?;
            x = x1.f_add(&m)?;
            if opts.hidden_states {
                hidden.push(x.shallow_clone());
            }
        }
        if let Some(c) = cache {
            c.len = s;
            c.padded = padded;
            c.next_pos = positions.f_select(1, t - 1)?.f_add_scalar(1)?;
        }
        let logits = match opts.logits {
            Logits::Skip => None,
            Logits::All => Some(self.lm_head(&self.final_norm(&x)?)?),
            Logits::Last => Some(self.lm_head(&self.final_norm(&x.f_select(1, t - 1)?)?)?),
        };
        Ok(ForwardOutput { logits, hidden_states: hidden })
    }

    /// `[B or 1, 1, T, S]` boolean mask: causal over `past` cached + `t` new positions, restricted to valid keys
    /// and to the sliding window; the diagonal always stays open so fully padded rows never produce NaN.
    fn causal_mask(&self, past: i64, t: i64, key_valid: Option<&Tensor>, window: Option<i64>) -> Result<Tensor> {
        let dev = self.place.device;
        let s = past + t;
        let qpos = Tensor::f_arange_start(past, s, (Kind::Int64, dev))?.f_unsqueeze(1)?;
        let kpos = Tensor::f_arange(s, (Kind::Int64, dev))?.f_unsqueeze(0)?;
        let mut allowed = kpos.f_le_tensor(&qpos)?;
        if let Some(w) = window {
            allowed = allowed.f_logical_and(&qpos.f_sub(&kpos)?.f_lt(w)?)?;
        }
        let diag = kpos.f_eq_tensor(&qpos)?;
        let mut m = allowed.f_unsqueeze(0)?.f_unsqueeze(0)?;
        if let Some(k) = key_valid {
            m = m.f_logical_and(&k.f_unsqueeze(1)?.f_unsqueeze(1)?)?;
        }
        Ok(m.f_logical_or(&diag.f_unsqueeze(0)?.f_unsqueeze(0)?)?)
    }
}

impl Llama {
    /// The base weights under their HF names (`lm_head.weight` only when untied). Merged LoRA is part of them.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.shallow_clone())];
        for b in &self.blocks {
            let p = format!("model.layers.{}", b.index);
            out.push((format!("{p}.input_layernorm.weight"), b.input_norm.shallow_clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), b.post_norm.shallow_clone()));
            for m in Module::ALL {
                let lin = b.linear(m);
                out.push((format!("{}.weight", m.hf_path(b.index)), lin.weight.shallow_clone()));
                if let Some(bias) = &lin.bias {
                    out.push((format!("{}.bias", m.hf_path(b.index)), bias.shallow_clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.shallow_clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.shallow_clone()));
        }
        out
    }
}
