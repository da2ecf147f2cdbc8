//! Blocks shared by the decoder families, each loaded from its HF-named weights and run on libtorch tensors:
//! [`RmsNorm`] (plain and Gemma's `1 + w`), [`RotaryEmbedding`] (plain, linear and llama3 scaling), grouped-query
//! [`Attention`] (optional q/k norms and score scale) over a [`KvCache`], the gated [`Mlp`] (SiLU or GELU-tanh),
//! and [`causal_mask`]. A family's file puts them together in its own order
//! (e.g. Llama's pre-norm block); its projections are [`LoraLinear`]s, switched per block by the
//! [`ForwardOptions::mask`].
use tch::{Device, Kind, Tensor};

use super::ForwardOptions;
use crate::config::{LayerType, ModelConfig, RopeScaling};
use crate::device_map::DeviceMap;
use crate::error::{ModelError, Result};
use crate::lora::LoraLinear;
use crate::mask::Module;
use crate::weights::{load_placed, Placement, WeightSource};

/// Where the blocks load their weights from: a source of HF-named tensors, each checked, moved and converted to
/// the model's [`Placement`] as it is loaded.
#[derive(Clone, Copy)]
pub(super) struct Weights<'a> {
    src: &'a dyn WeightSource,
    place: Placement,
}

impl<'a> Weights<'a> {
    pub(super) fn new(src: &'a dyn WeightSource, place: Placement) -> Self {
        Weights { src, place }
    }

    /// The tensor `name`, which must have shape `shape`.
    pub(super) fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        load_placed(self.src, name, shape, self.place)
    }

    /// The projection `module` of block `layer` (`….weight`, and `….bias` when `bias`), shaped as `cfg` says.
    pub(super) fn linear(&self, cfg: &ModelConfig, layer: usize, module: Module, bias: bool) -> Result<LoraLinear> {
        let (out, inp) = cfg
            .projection_shape(module.hf_name())
            .ok_or_else(|| ModelError::InvalidArgument(format!("unknown module {module:?}")))?;
        let path = module.hf_path(layer);
        let w = self.get(&format!("{path}.weight"), &[out as i64, inp as i64])?;
        let b = if bias { Some(self.get(&format!("{path}.bias"), &[out as i64])?) } else { None };
        Ok(LoraLinear::new(w, b))
    }
}

/// RMSNorm over the last axis: `x · rsqrt(mean(x²) + eps) · weight` (Llama), or Gemma's form
/// ([`RmsNorm::load_gemma`], in `gemma3.rs`): in f32, `x · rsqrt(mean(x²) + eps) · (1 + weight)`, cast back.
pub(super) struct RmsNorm {
    /// `[dim]`, the HF parameter (for Gemma the `w` of `1 + w`).
    pub(super) weight: Tensor,
    pub(super) eps: f64,
    pub(super) dim: i64,
    /// Gemma: `1 + weight` in f32, the scale actually applied (computed in f32, then cast to the input's kind).
    pub(super) gemma_scale: Option<Tensor>,
}

impl RmsNorm {
    /// Loads the weight `name` (`[dim]`).
    pub(super) fn load(w: &Weights<'_>, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let dim = dim as i64;
        Ok(RmsNorm { weight: w.get(name, &[dim])?, eps, dim, gemma_scale: None })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.gemma_scale {
            None => Ok(x.f_rms_norm([self.dim], Some(&self.weight), self.eps)?),
            Some(scale) => {
                let y = x.f_to_kind(Kind::Float)?.f_rms_norm([self.dim], Some(scale), self.eps)?;
                Ok(y.f_to_kind(x.kind())?)
            }
        }
    }
}

/// Rotary position embeddings in HF's half-split layout: the inverse frequencies, on the model's device and on
/// the host (for the fused decode step).
pub(super) struct RotaryEmbedding {
    inv_freq: Tensor,
    inv_freq_host: Vec<f32>,
}

impl RotaryEmbedding {
    /// The embedding for heads of `head_dim` values, base `theta`, frequencies scaled per `scaling`.
    pub(super) fn new(head_dim: usize, theta: f64, scaling: &RopeScaling, device: Device) -> Result<Self> {
        let inv_freq_host = inverse_frequencies(head_dim, theta, scaling);
        let inv_freq = Tensor::from_slice(&inv_freq_host).f_to_device(device)?;
        Ok(RotaryEmbedding { inv_freq, inv_freq_host })
    }

    /// The inverse frequencies on the host (`head_dim / 2` values).
    pub(super) fn inv_freq_host(&self) -> &[f32] {
        &self.inv_freq_host
    }

    /// The cosine and signed sine tables (`[B, 1, T, D]`, in `kind`) for `positions` `[B, T]`, as [`apply_rope`]
    /// takes them: `cos = [cos, cos]`, `sin = [-sin, sin]`.
    pub(super) fn tables(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let freqs = positions.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?.f_mul(&self.inv_freq.f_view([1, 1, -1])?)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let cos = emb.f_cos()?.f_to_kind(kind)?.f_unsqueeze(1)?;
        let sin = freqs.f_sin()?;
        let sin = Tensor::f_cat(&[&sin.f_neg()?, &sin], -1)?.f_to_kind(kind)?.f_unsqueeze(1)?;
        Ok((cos, sin))
    }

    /// The `head_dim / 2` cosines and sines of position `pos`, in f32 on the host.
    pub(super) fn host_tables(&self, pos: i64) -> (Vec<f32>, Vec<f32>) {
        let angles: Vec<f32> = self.inv_freq_host.iter().map(|f| pos as f32 * f).collect();
        (angles.iter().map(|a| a.cos()).collect(), angles.iter().map(|a| a.sin()).collect())
    }
}

/// Inverse rotary frequencies (f32, `[head_dim / 2]`), scaled as HF does for `linear` and `llama3`.
fn inverse_frequencies(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let d = head_dim;
    let base = theta;
    (0..d / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / d as f32;
            let inv = 1.0f32 / (base as f32).powf(exponent);
            match *scaling {
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

/// Keys and values of past positions, preallocated for `capacity` positions.
///
/// A cache is *uniform* (every row holds the same number of columns, `len`; rows shorter than the longest are
/// left-padded, which `key_mask` records) or *ragged* (each row holds its own number of columns, `lens[r]`, with
/// no padding: row `r`'s tokens are columns `0..lens[r]`, and column `j` holds position `j`). A cache becomes
/// ragged when a row is installed into it from another cache ([`KvCache::install_row`], what continuous batching
/// does when a new prompt takes a finished row's place); a ragged cache then takes one token per row per step,
/// each written at its own row's next column, and a row attends only to its own columns.
#[derive(Debug)]
pub struct KvCache {
    /// Per block, `[B, kv heads, capacity, head_dim]`.
    pub(super) keys: Vec<Tensor>,
    pub(super) values: Vec<Tensor>,
    /// `[B, capacity]` bool: which cached positions are real tokens (not left padding); unused when ragged.
    pub(super) key_mask: Tensor,
    /// `[B]` i64: the position id the next token of each row gets.
    pub(super) next_pos: Tensor,
    /// Columns in use: the longest row's.
    pub(super) len: i64,
    /// Ragged caches: the columns each row holds (`None`: every row holds `len`).
    pub(super) lens: Option<Vec<i64>>,
    pub(super) capacity: i64,
    pub(super) padded: bool,
}

impl KvCache {
    /// An empty cache for the blocks of `devices` (each block's keys and values on its device), `batch` rows,
    /// `kv_heads` heads of `head_dim` values and up to `capacity` positions; the key mask and positions live on
    /// the input device (`place.device`).
    pub(super) fn new(
        devices: &DeviceMap,
        batch: i64,
        kv_heads: usize,
        capacity: i64,
        head_dim: usize,
        place: Placement,
    ) -> Result<Self> {
        let shape = [batch, kv_heads as i64, capacity, head_dim as i64];
        let layers = devices.num_layers();
        let mut keys = Vec::with_capacity(layers);
        let mut values = Vec::with_capacity(layers);
        for l in 0..layers {
            let opts = (place.kind, devices.block(l));
            keys.push(Tensor::f_zeros(shape, opts)?);
            values.push(Tensor::f_zeros(shape, opts)?);
        }
        Ok(KvCache {
            keys,
            values,
            key_mask: Tensor::f_ones([batch, capacity], (Kind::Bool, place.device))?,
            next_pos: Tensor::f_zeros([batch], (Kind::Int64, place.device))?,
            len: 0,
            lens: None,
            capacity,
            padded: false,
        })
    }

    /// Rows (the batch size).
    pub fn rows(&self) -> i64 {
        self.next_pos.size().first().copied().unwrap_or(0)
    }

    /// Whether rows hold different numbers of positions (see the type's documentation).
    pub fn is_ragged(&self) -> bool {
        self.lens.is_some()
    }

    /// Positions row `row` holds (`None` past the last row).
    pub fn row_len(&self, row: usize) -> Option<i64> {
        if row as i64 >= self.rows() {
            return None;
        }
        Some(self.lens.as_ref().map_or(self.len, |l| l.get(row).copied().unwrap_or(0)))
    }

    /// Row `row` of this cache becomes row `src_row`'s columns `start..start + n` of `src` (moved to columns
    /// `0..n`), its next position `src`'s; the cache becomes ragged. Every other row is unchanged.
    ///
    /// `start..start + n` must be real tokens of `src` (e.g. a left-padded prefill's row without its padding):
    /// keys carry their rotary position, not their column, so they keep their meaning wherever they are copied.
    /// A padded uniform cache with anything in it cannot become ragged (its rows' padding would be lost).
    pub fn install_row(&mut self, row: usize, src: &KvCache, src_row: usize, start: i64, n: i64) -> Result<()> {
        self.install_row_parts(row, src, src_row, &[(start, n)])
    }

    /// Like [`KvCache::install_row`], but row `row` becomes the concatenation of several column ranges
    /// `(start, n)` of `src`'s row `src_row`, in order: e.g. a shared prefix and a left-padded suffix prefilled
    /// after it (`[(0, prefix), (prefix + pad, suffix)]`), without the padding between them.
    pub fn install_row_parts(&mut self, row: usize, src: &KvCache, src_row: usize, parts: &[(i64, i64)]) -> Result<()> {
        let (rows, src_rows) = (self.rows(), src.rows());
        if row as i64 >= rows || src_row as i64 >= src_rows {
            return Err(ModelError::InvalidArgument(format!(
                "install_row: row {row} of {rows} from row {src_row} of {src_rows}: no such row"
            )));
        }
        let n: i64 = parts.iter().map(|p| p.1).sum();
        if let Some(&(start, m)) = parts.iter().find(|&&(start, m)| start < 0 || m < 1 || start + m > src.len) {
            return Err(ModelError::InvalidArgument(format!(
                "install_row: columns {start}..{} of a source holding {}",
                start + m,
                src.len
            )));
        }
        if n < 1 || n > self.capacity {
            return Err(ModelError::InvalidArgument(format!(
                "install_row: {n} columns into a cache of capacity {}",
                self.capacity
            )));
        }
        if self.keys.len() != src.keys.len() {
            return Err(ModelError::InvalidArgument("install_row: the caches belong to different models".into()));
        }
        if self.lens.is_none() && self.padded && self.len > 0 {
            return Err(ModelError::InvalidArgument(
                "install_row: a left-padded cache cannot take rows of their own length".into(),
            ));
        }
        let (r, sr) = (row as i64, src_row as i64);
        for (dst, from) in self.keys.iter_mut().chain(self.values.iter_mut()).zip(src.keys.iter().chain(&src.values)) {
            let (dst, from) = (dst.f_narrow(0, r, 1)?, from.f_narrow(0, sr, 1)?);
            let mut at = 0;
            for &(start, m) in parts {
                dst.f_narrow(2, at, m)?.f_copy_(&from.f_narrow(2, start, m)?)?;
                at += m;
            }
        }
        self.next_pos
            .f_narrow(0, r, 1)?
            .f_copy_(&src.next_pos.f_narrow(0, sr, 1)?.f_to_device(self.next_pos.device())?)?;
        let len = self.len;
        let lens = self.lens.get_or_insert_with(|| vec![len; rows as usize]);
        if let Some(l) = lens.get_mut(row) {
            *l = n;
        }
        self.len = lens.iter().copied().max().unwrap_or(0);
        self.padded = false;
        Ok(())
    }

    /// A uniform cache of `rows` rows and `capacity` positions whose every row starts with the columns of the
    /// one-row cache `prefix` (e.g. a prompt prefix all rows share, prefilled once): its next tokens continue
    /// at `prefix`'s next position. `capacity` must hold at least `prefix`'s columns.
    pub fn from_prefix(prefix: &KvCache, rows: i64, capacity: i64) -> Result<KvCache> {
        if prefix.rows() != 1 || prefix.lens.is_some() || prefix.padded || rows < 1 || capacity < prefix.len {
            return Err(ModelError::InvalidArgument(format!(
                "from_prefix: a {}-row{} prefix of {} columns into {rows} rows of capacity {capacity}",
                prefix.rows(),
                if prefix.lens.is_some() || prefix.padded { " padded or ragged" } else { "" },
                prefix.len
            )));
        }
        let len = prefix.len;
        let grow = |t: &Tensor| -> Result<Tensor> {
            let mut shape = t.size();
            if let [b, _, c, ..] = shape.as_mut_slice() {
                (*b, *c) = (rows, capacity);
            }
            let out = Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?;
            if len > 0 {
                out.f_narrow(2, 0, len)?.f_copy_(&t.f_narrow(2, 0, len)?)?;
            }
            Ok(out)
        };
        let keys = prefix.keys.iter().map(grow).collect::<Result<Vec<_>>>()?;
        let values = prefix.values.iter().map(grow).collect::<Result<Vec<_>>>()?;
        let dev = prefix.key_mask.device();
        Ok(KvCache {
            keys,
            values,
            key_mask: Tensor::f_ones([rows, capacity], (Kind::Bool, dev))?,
            next_pos: prefix.next_pos.f_expand([rows], false)?.f_contiguous()?,
            len,
            lens: None,
            capacity,
            padded: false,
        })
    }

    /// Keeps only the rows `keep` (in that order), e.g. to drop finished rows so later steps no longer compute
    /// them. Copies the kept rows into new tensors.
    pub fn retain_rows(&mut self, keep: &[usize]) -> Result<()> {
        let rows = self.rows();
        if keep.is_empty() || keep.iter().any(|&k| k as i64 >= rows) {
            return Err(ModelError::InvalidArgument(format!("retain_rows: rows {keep:?} of a cache of {rows} rows")));
        }
        let idx: Vec<i64> = keep.iter().map(|&k| k as i64).collect();
        let on = |d: Device| Tensor::from_slice(&idx).f_to_device(d);
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *t = t.f_index_select(0, &on(t.device())?)?;
        }
        let i = on(self.key_mask.device())?;
        self.key_mask = self.key_mask.f_index_select(0, &i)?;
        self.next_pos = self.next_pos.f_index_select(0, &i)?;
        if let Some(lens) = &mut self.lens {
            *lens = keep.iter().map(|&k| lens.get(k).copied().unwrap_or(0)).collect();
            self.len = lens.iter().copied().max().unwrap_or(0);
        }
        Ok(())
    }

    /// After a ragged step of one token per row: each row holds one more column.
    pub(super) fn advance_ragged(&mut self) {
        if let Some(lens) = &mut self.lens {
            lens.iter_mut().for_each(|l| *l += 1);
            self.len = lens.iter().copied().max().unwrap_or(0);
        }
    }

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

/// What the attention of one kind of layer needs for this call: rotary tables and the mask.
pub(super) struct AttnInputs {
    /// Rotary tables from [`RotaryEmbedding::tables`].
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// Boolean `[B or 1, 1, T, S]`, true = may attend; `None` with `is_causal` or a single query.
    pub(super) attn_mask: Option<Tensor>,
    pub(super) is_causal: bool,
    /// A ragged cache's step: `([B] row indices, [B] columns)` where each row's new key and value go.
    pub(super) ragged: Option<(Tensor, Tensor)>,
}

impl AttnInputs {
    fn to_device(&self, device: Device) -> Result<AttnInputs> {
        Ok(AttnInputs {
            cos: self.cos.f_to_device(device)?,
            sin: self.sin.f_to_device(device)?,
            attn_mask: self.attn_mask.as_ref().map(|m| m.f_to_device(device)).transpose()?,
            is_causal: self.is_causal,
            ragged: match &self.ragged {
                Some((r, c)) => Some((r.f_to_device(device)?, c.f_to_device(device)?)),
                None => None,
            },
        })
    }
}

/// Per-call state shared by all blocks.
pub(super) struct StepCtx<'a> {
    /// Full-attention layers (every layer of the Llama family).
    pub(super) full: AttnInputs,
    /// Gemma 3's sliding-window layers: their own rotary base and windowed mask.
    pub(super) sliding: Option<AttnInputs>,
    pub(super) opts: &'a ForwardOptions<'a>,
}

impl<'a> StepCtx<'a> {
    /// The same context with its tensors on `device` (for the blocks placed there).
    pub(super) fn to_device(&self, device: Device) -> Result<StepCtx<'a>> {
        Ok(StepCtx {
            full: self.full.to_device(device)?,
            sliding: self.sliding.as_ref().map(|s| s.to_device(device)).transpose()?,
            opts: self.opts,
        })
    }

    /// The inputs of a layer of type `t`.
    pub(super) fn for_layer(&self, t: LayerType) -> &AttnInputs {
        match (t, &self.sliding) {
            (LayerType::SlidingAttention, Some(s)) => s,
            _ => &self.full,
        }
    }
}

/// `[B or 1, 1, T, S]` boolean mask: causal over `past` cached + `t` new positions, restricted to valid keys
/// and to the sliding window; the diagonal always stays open so fully padded rows never produce NaN.
pub(super) fn causal_mask(
    past: i64,
    t: i64,
    key_valid: Option<&Tensor>,
    window: Option<i64>,
    dev: Device,
) -> Result<Tensor> {
    let s = past + t;
    let qpos = Tensor::f_arange_start(past, s, (Kind::Int64, dev))?.f_unsqueeze(1)?;
    let kpos = Tensor::f_arange(s, (Kind::Int64, dev))?.f_unsqueeze(0)?;
    let mut allowed = kpos.f_le_tensor(&qpos)?.f_unsqueeze(0)?;
    if let Some(w) = window {
        let near = match key_valid {
            // Padding may sit between real tokens (a shared prefix, then left-padded suffixes), so the window is
            // measured in positions (real tokens counted per row), not columns: `[B, T, S]`.
            Some(k) => {
                let pos = k.f_to_kind(Kind::Int64)?.f_cumsum(1, Kind::Int64)?;
                let q = pos.f_narrow(1, past, t)?.f_unsqueeze(2)?;
                q.f_sub(&pos.f_unsqueeze(1)?)?.f_lt(w)?
            }
            None => qpos.f_sub(&kpos)?.f_lt(w)?.f_unsqueeze(0)?,
        };
        allowed = allowed.f_logical_and(&near)?;
    }
    let diag = kpos.f_eq_tensor(&qpos)?;
    let mut m = allowed.f_unsqueeze(1)?;
    if let Some(k) = key_valid {
        m = m.f_logical_and(&k.f_unsqueeze(1)?.f_unsqueeze(1)?)?;
    }
    Ok(m.f_logical_or(&diag.f_unsqueeze(0)?.f_unsqueeze(0)?)?)
}

/// Grouped-query self-attention with RoPE: `q_proj`, `k_proj`, `v_proj`, `o_proj`.
pub(super) struct Attention {
    pub(super) q: LoraLinear,
    pub(super) k: LoraLinear,
    pub(super) v: LoraLinear,
    pub(super) o: LoraLinear,
    /// Gemma 3: RMSNorm over each query / key head (`self_attn.q_norm`, `k_norm`), before RoPE.
    pub(super) q_norm: Option<RmsNorm>,
    pub(super) k_norm: Option<RmsNorm>,
    /// The score scale when it is not `head_dim^-0.5` (Gemma 3: `query_pre_attn_scalar^-0.5`).
    pub(super) scale: Option<f64>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    /// Loads `model.layers.{layer}.self_attn.{q,k,v,o}_proj` (biases on q/k/v and o as `cfg` says).
    pub(super) fn load(w: &Weights<'_>, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        Ok(Attention {
            q: w.linear(cfg, layer, Module::Q, cfg.qkv_bias)?,
            k: w.linear(cfg, layer, Module::K, cfg.qkv_bias)?,
            v: w.linear(cfg, layer, Module::V, cfg.qkv_bias)?,
            o: w.linear(cfg, layer, Module::O, cfg.o_bias)?,
            q_norm: None,
            k_norm: None,
            scale: None,
            num_heads: cfg.num_heads as i64,
            num_kv_heads: cfg.num_kv_heads as i64,
            head_dim: cfg.head_dim as i64,
        })
    }

    /// Attention of `x` `[B, T, H]` (block `layer`) over itself and, with a cache, everything cached before it;
    /// the new keys and values are written into the cache (which the caller then advances).
    pub(super) fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        inputs: &AttnInputs,
        opts: &ForwardOptions<'_>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let m = opts.mask;
        let train = opts.train;
        let q = self.q.forward(x, m.is_active(layer, Module::Q), train)?;
        let k = self.k.forward(x, m.is_active(layer, Module::K), train)?;
        let v = self.v.forward(x, m.is_active(layer, Module::V), train)?;
        let q = q.f_view([b, t, self.num_heads, self.head_dim])?.f_transpose(1, 2)?;
        let k = k.f_view([b, t, self.num_kv_heads, self.head_dim])?.f_transpose(1, 2)?;
        let v = v.f_view([b, t, self.num_kv_heads, self.head_dim])?.f_transpose(1, 2)?;
        let q = match &self.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        let half = self.head_dim / 2;
        let q = apply_rope(&q, &inputs.cos, &inputs.sin, half)?;
        let k = apply_rope(&k, &inputs.cos, &inputs.sin, half)?;
        let (k, v) = match cache {
            Some(c) => {
                let start = c.len;
                let kc = &mut c.keys[layer];
                let vc = &mut c.values[layer];
                match &inputs.ragged {
                    // One token per row, each at its own row's next column (`t == 1`, checked by the caller).
                    Some((rows, cols)) => {
                        let at = [Some(rows), None, Some(cols)];
                        let _ = kc.f_index_put_(&at, &k.f_squeeze_dim(2)?, false)?;
                        let _ = vc.f_index_put_(&at, &v.f_squeeze_dim(2)?, false)?;
                    }
                    None => {
                        kc.f_narrow(2, start, t)?.f_copy_(&k)?;
                        vc.f_narrow(2, start, t)?.f_copy_(&v)?;
                    }
                }
                (kc.f_narrow(2, 0, start + t)?, vc.f_narrow(2, 0, start + t)?)
            }
            None => (k, v),
        };
        let rep = self.num_heads / self.num_kv_heads;
        let out = if t == 1 && rep > 1 {
            // One query per head: fold the query heads sharing a KV head into the query axis, so attention runs
            // per KV head with no repeated keys/values (a [B, 1, 1, S] mask broadcasts over the folded axis).
            let qg = q.f_reshape([b, self.num_kv_heads, rep, self.head_dim])?;
            Tensor::f_scaled_dot_product_attention(
                &qg,
                &k,
                &v,
                inputs.attn_mask.as_ref(),
                0.0,
                false,
                self.scale,
                false,
            )?
            .f_reshape([b, self.num_heads, 1, self.head_dim])?
        } else {
            Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                inputs.attn_mask.as_ref(),
                0.0,
                inputs.is_causal,
                self.scale,
                rep > 1,
            )?
        };
        let out = out.f_transpose(1, 2)?.f_reshape([b, t, self.num_heads * self.head_dim])?;
        self.o.forward(&out, m.is_active(layer, Module::O), train)
    }
}

/// The gated MLP: `down(act(gate(x)) · up(x))`, from `gate_proj`, `up_proj`, `down_proj`; `act` is SiLU
/// (SwiGLU, the Llama family) or GELU with the tanh approximation (Gemma 3's `gelu_pytorch_tanh`).
pub(super) struct Mlp {
    pub(super) gate: LoraLinear,
    pub(super) up: LoraLinear,
    pub(super) down: LoraLinear,
    /// GELU-tanh instead of SiLU.
    pub(super) gelu_tanh: bool,
}

impl Mlp {
    /// Loads `model.layers.{layer}.mlp.{gate,up,down}_proj` (biases as `cfg` says).
    pub(super) fn load(w: &Weights<'_>, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        Ok(Mlp {
            gate: w.linear(cfg, layer, Module::Gate, cfg.mlp_bias)?,
            up: w.linear(cfg, layer, Module::Up, cfg.mlp_bias)?,
            down: w.linear(cfg, layer, Module::Down, cfg.mlp_bias)?,
            gelu_tanh: cfg.gemma3.is_some(),
        })
    }

    pub(super) fn forward(&self, x: &Tensor, layer: usize, opts: &ForwardOptions<'_>) -> Result<Tensor> {
        let m = opts.mask;
        let gate = self.gate.forward(x, m.is_active(layer, Module::Gate), opts.train)?;
        let up = self.up.forward(x, m.is_active(layer, Module::Up), opts.train)?;
        let act = if self.gelu_tanh { gate.f_gelu("tanh")? } else { gate.f_silu()? };
        let h = act.f_mul(&up)?;
        self.down.forward(&h, m.is_active(layer, Module::Down), opts.train)
    }
}
