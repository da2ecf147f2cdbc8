//! The Llama-family decoder (Llama 2/3.x, Mistral, Qwen2, SmolLM2) and its Gemma 3 family: embeddings, `L`
//! pre-norm blocks (GQA attention with RoPE, gated MLP), final RMSNorm and LM head. Every block's output can be
//! returned, which is what the logit lens reads. What Gemma 3 does differently lives in `gemma3.rs`.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::blocks::{causal_mask, Attention, AttnInputs, KvCache, Mlp, RmsNorm, RotaryEmbedding, StepCtx, Weights};
use super::gemma3::{self, GemmaNorms};
use super::{ForwardOptions, ForwardOutput, Logits};
use crate::config::{LayerType, ModelConfig};
use crate::device_map::{DeviceMap, Footprint};
use crate::error::{ModelError, Result};
use crate::lora::LoraLinear;
use crate::mask::Module;
use crate::weights::{Placement, SafetensorsWeights, WeightSource};

/// One decoder block under `model.layers.{index}`: `x + attn(norm(x))`, then `+ mlp(norm(·))` (Llama), or
/// Gemma 3's layout with norms before and after attention and MLP (`gemma3.rs`).
pub(super) struct Block {
    pub(super) index: usize,
    /// Full or sliding-window attention (always full in the Llama family).
    pub(super) layer_type: LayerType,
    pub(super) input_norm: RmsNorm,
    pub(super) attn: Attention,
    /// `post_attention_layernorm`: the norm before the MLP in Llama, the norm of the attention output in Gemma.
    pub(super) post_norm: RmsNorm,
    pub(super) mlp: Mlp,
    /// Gemma 3's feed-forward norms (`None` for the Llama family).
    pub(super) gemma: Option<GemmaNorms>,
}

impl Block {
    /// Loads block `index`: `input_layernorm`, `post_attention_layernorm`, `self_attn.*`, `mlp.*` (and Gemma 3's
    /// extra norms for that family).
    fn load(w: &Weights<'_>, cfg: &ModelConfig, index: usize) -> Result<Self> {
        if cfg.gemma3.is_some() {
            return Block::load_gemma3(w, cfg, index);
        }
        let p = format!("model.layers.{index}");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let input_norm = RmsNorm::load(w, &format!("{p}.input_layernorm.weight"), h, eps)?;
        let post_norm = RmsNorm::load(w, &format!("{p}.post_attention_layernorm.weight"), h, eps)?;
        let attn = Attention::load(w, cfg, index)?;
        let mlp = Mlp::load(w, cfg, index)?;
        Ok(Block { index, layer_type: LayerType::FullAttention, input_norm, attn, post_norm, mlp, gemma: None })
    }

    /// The block on `x` `[B, T, H]`; with a cache, this block's keys and values are written into it.
    fn forward(&self, x: &Tensor, ctx: &StepCtx<'_>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        if let Some(norms) = &self.gemma {
            return self.forward_gemma3(norms, x, ctx, cache);
        }
        let l = self.index;
        let n = self.input_norm.forward(x)?;
        let a = self.attn.forward(&n, l, ctx.for_layer(self.layer_type), ctx.opts, cache)?;
        let x1 = x.f_add(&a)?;
        let n = self.post_norm.forward(&x1)?;
        let m = self.mlp.forward(&n, l, ctx.opts)?;
        Ok(x1.f_add(&m)?)
    }

    pub(super) fn linear(&self, m: Module) -> &LoraLinear {
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

/// A Llama-family causal language model (Llama 2/3.x, Mistral, Qwen2, SmolLM2, and Gemma 3 as a family of it)
/// with optional LoRA.
pub struct Llama {
    pub(super) config: ModelConfig,
    /// `model.embed_tokens.weight`, `[V, H]`.
    pub(super) embed: Tensor,
    pub(super) blocks: Vec<Block>,
    /// `model.norm`.
    pub(super) norm: RmsNorm,
    /// `lm_head.weight`, `[V, H]`; `None` when tied to the embedding.
    pub(super) lm_head: Option<Tensor>,
    /// A tied head's copy of the embedding on the output device, when that is not the embedding's device.
    pub(super) tied_head: Option<Tensor>,
    pub(super) rope: RotaryEmbedding,
    /// Gemma 3: the rotary embedding of the sliding-window layers.
    pub(super) rope_local: Option<RotaryEmbedding>,
    /// Gemma 3: `sqrt(hidden_size)` in the weights' kind, multiplied into the embeddings (input device).
    pub(super) embed_scale: Option<Tensor>,
    /// The weights' kind, and the input device (the embedding's).
    pub(super) place: Placement,
    /// The device of every block and of the head.
    pub(super) devices: DeviceMap,
    /// The logit lens's f32 logits on the CPU ([`Llama::lens_stats`]), kept between calls: at most
    /// [`LENS_BUFFER_BYTES`], made on first use and freed with the model.
    lens_logits: std::cell::RefCell<Option<Tensor>>,
    /// The projections as the fused decode step's kernels read them, made at the first fused step and kept until
    /// a projection is borrowed mutably ([`Llama::projection_mut`], the only way to reach a weight for writing).
    pub(super) decode_views: std::cell::OnceCell<super::decode::DecodeViews>,
}

/// Bytes of logits [`Llama::lens_stats`] computes at once (and keeps for the next call): 341 rows of SmolLM2's
/// 49 152-token vocabulary, 130 of Llama 3's 128 256, never fewer than [`LENS_MIN_ROWS`].
const LENS_BUFFER_BYTES: i64 = 64 << 20;

/// Rows of logits [`Llama::lens_stats`] computes at once at least, whatever the vocabulary.
const LENS_MIN_ROWS: i64 = 16;

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .field("placement", &self.place)
            .field("devices", &self.devices.to_string())
            .finish_non_exhaustive()
    }
}

impl Llama {
    /// Loads a model from an HF directory (`config.json` + safetensors) or a `.gguf` file onto one device. A
    /// model whose weights and planned KV cache ([`Footprint`]) exceed the device's free memory is refused before
    /// anything is allocated.
    pub fn load(path: impl AsRef<Path>, place: Placement) -> Result<Self> {
        Self::load_across(path, place.kind, &[place.device])
    }

    /// Loads a model with its blocks placed in order over `devices` by the memory each has free
    /// ([`DeviceMap::plan_free`]): the first device is filled before the next is used, the final norm and LM
    /// head go with the last block. A model that fits nowhere is refused before anything is allocated, with what
    /// it needs and what is free.
    pub fn load_across(path: impl AsRef<Path>, kind: Kind, devices: &[Device]) -> Result<Self> {
        Self::load_with(path, kind, |config| DeviceMap::plan_free(&Footprint::of(config, kind), devices))
    }

    /// Loads a model placed as `map` says (e.g. [`DeviceMap::split`]); `map` must have one entry per block.
    pub fn load_mapped(path: impl AsRef<Path>, kind: Kind, map: DeviceMap) -> Result<Self> {
        Self::load_with(path, kind, |_| Ok(map))
    }

    fn load_with(
        path: impl AsRef<Path>,
        kind: Kind,
        plan: impl FnOnce(&ModelConfig) -> Result<DeviceMap>,
    ) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            // A model one of the repository's scripts fetches: say which.
            return Err(match crate::loading::fetch_command(path) {
                Some(fetch) => ModelError::ModelNotFetched { path: path.to_path_buf(), fetch: fetch.to_string() },
                None => ModelError::io(
                    path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such model directory or .gguf file"),
                ),
            });
        }
        if path.is_dir() {
            let config = ModelConfig::from_file(path.join("config.json"))?;
            let map = plan(&config)?;
            let weights = SafetensorsWeights::open_dir(path)?;
            Self::from_weights_mapped(config, &weights, kind, map)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            let (config, weights) = crate::gguf_weights::open(path)?;
            let map = plan(&config)?;
            Self::from_weights_mapped(config, weights.as_ref(), kind, map)
        } else {
            Err(ModelError::InvalidArgument(format!(
                "{}: a model is an HF directory (config.json + safetensors) or a .gguf file",
                path.display()
            )))
        }
    }

    /// Builds the model on one device from a config and a source of HF-named weights.
    pub fn from_weights(config: ModelConfig, src: &dyn WeightSource, place: Placement) -> Result<Self> {
        let map = DeviceMap::single(place.device, config.num_layers);
        Self::from_weights_mapped(config, src, place.kind, map)
    }

    /// Builds the model from a config and a source of HF-named weights, each part loaded straight onto the device
    /// `map` gives it.
    pub fn from_weights_mapped(
        config: ModelConfig,
        src: &dyn WeightSource,
        kind: Kind,
        map: DeviceMap,
    ) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let c = &config;
        if map.num_layers() != c.num_layers {
            return Err(ModelError::InvalidArgument(format!(
                "the device map places {} blocks but the model has {}",
                map.num_layers(),
                c.num_layers
            )));
        }
        // A dtype a device cannot run is refused by name before any weight is read.
        for (i, &d) in map.devices().iter().enumerate() {
            if !map.devices()[..i].contains(&d) {
                crate::dtype_support::check_dtype(d, kind)?;
            }
        }
        // CPU weights carved out of shared chunks on huge pages (see `weights::empty_on_huge_pages`); the arena is
        // told the bytes of the tensors it will carve, so that it faults in no chunk beyond them.
        let elt = kind.elt_size_in_bytes() as u64;
        let carved = |n: u64| if crate::weights::carvable(n * elt) { n * elt } else { 0 };
        let h = c.hidden_size as u64;
        let per_block: u64 = crate::mask::Module::ALL
            .iter()
            .filter_map(|m| c.projection_shape(m.hf_name()))
            .map(|(out, inp)| carved(out as u64 * inp as u64))
            .sum::<u64>()
            + 4 * carved(h);
        let cpu_blocks = (0..c.num_layers).filter(|&i| map.block(i) == Device::Cpu).count() as u64;
        let head = if map.output() == Device::Cpu {
            carved(h) + if c.tie_word_embeddings { 0 } else { carved(c.vocab_size as u64 * h) }
        } else {
            0
        };
        let _arena = crate::weights::arena_scope(cpu_blocks * per_block + head);
        src.prefetch();
        let (h, v) = (c.hidden_size as i64, c.vocab_size as i64);
        let on = |device: Device| Weights::new(src, Placement { device, kind });
        let (input, output) = (map.input(), map.output());
        let embed = on(input).get("model.embed_tokens.weight", &[v, h])?;
        let blocks = (0..c.num_layers).map(|i| Block::load(&on(map.block(i)), c, i)).collect::<Result<Vec<_>>>()?;
        let head = on(output);
        let norm = if c.gemma3.is_some() {
            RmsNorm::load_gemma(&head, "model.norm.weight", c.hidden_size, c.rms_norm_eps)?
        } else {
            RmsNorm::load(&head, "model.norm.weight", c.hidden_size, c.rms_norm_eps)?
        };
        let lm_head = if c.tie_word_embeddings { None } else { Some(head.get("lm_head.weight", &[v, h])?) };
        let tied_head =
            if c.tie_word_embeddings && map.slot(c.num_layers) != 0 { Some(embed.f_to_device(output)?) } else { None };
        let rope = RotaryEmbedding::new(c.head_dim, c.rope_theta, &c.rope_scaling, input)?;
        let rope_local = gemma3::local_rope(c, input)?;
        let embed_scale = if c.gemma3.is_some() { Some(gemma3::embed_scale(c, kind, input)?) } else { None };
        let place = Placement { device: input, kind };
        Ok(Llama {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            tied_head,
            rope,
            rope_local,
            embed_scale,
            place,
            devices: map,
            lens_logits: std::cell::RefCell::new(None),
            decode_views: std::cell::OnceCell::new(),
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Number of decoder blocks `L`.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// The input device: where the embedding lives and token ids, position ids and masks go. On a model split
    /// over devices ([`Llama::device_map`]) blocks may live elsewhere; logits come out on
    /// [`DeviceMap::output`].
    pub fn device(&self) -> Device {
        self.place.device
    }

    /// Where the embedding, each block and the head live.
    pub fn device_map(&self) -> &DeviceMap {
        &self.devices
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
        // The caller may replace or reshape any tensor of the projection: the decode step's borrowed views of
        // them go, and are made again at its next call.
        self.decode_views.take();
        self.blocks.get_mut(layer).map(|b| b.linear_mut(module))
    }

    /// Every projection with its block index.
    pub fn projections(&self) -> impl Iterator<Item = (usize, Module, &LoraLinear)> {
        (0..self.blocks.len())
            .flat_map(move |l| Module::ALL.into_iter().filter_map(move |m| self.projection(l, m).map(|p| (l, m, p))))
    }

    /// The model's final RMSNorm, applied to any hidden state (the first half of the logit lens); the result is
    /// on the output device.
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        self.norm.forward(&hidden.f_to_device(self.devices.output())?)
    }

    /// The LM head (tied or not) applied to normed states, returning f32 logits on the output device (soft-capped
    /// in f32 when the config sets `final_logit_softcapping`, as Gemma may).
    pub fn lm_head(&self, normed: &Tensor) -> Result<Tensor> {
        let normed = &normed.f_to_device(self.devices.output())?;
        let w = self.head_weight();
        let logits = match crate::kernels::small_linear(normed, w, None, None)? {
            Some(y) => y.f_to_kind(Kind::Float)?,
            None => head_product(normed, w)?,
        };
        match self.softcap() {
            Some(cap) => gemma3::softcap(logits, cap),
            None => Ok(logits),
        }
    }

    /// The LM head's weight `[V, H]` on the output device: `lm_head.weight`, or the tied embedding.
    fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().or(self.tied_head.as_ref()).unwrap_or(&self.embed)
    }

    /// Gemma's `final_logit_softcapping`, when the config sets it.
    fn softcap(&self) -> Option<f64> {
        self.config.gemma3.as_ref().and_then(|g| g.final_logit_softcapping)
    }

    /// The logit lens on CPU: the final norm and LM head applied to pre-norm states `x` `[M, H]`, then the softmax
    /// statistics of each row against `targets[row]` ([`crate::kernels::softmax_stats`]: two passes over each row
    /// of logits, no softmax tensor). `None` when the head is not on the CPU (use libtorch's ops there).
    ///
    /// With an f32 head, the logits are computed a chunk of rows at a time into one buffer the model keeps
    /// between calls (at most 64 MB): a search's proxy or a probe calls this many times with a few hundred rows,
    /// and fresh memory for each call's logits (tens of MB, above glibc's mmap threshold, so mapped and zeroed
    /// anew each time) cost the proxy a third of its LM head time.
    pub fn lens_stats(&self, x: &Tensor, targets: &[i64]) -> Result<Option<Vec<crate::kernels::SoftmaxStats>>> {
        if self.devices.output() != Device::Cpu {
            return Ok(None);
        }
        let normed = self.final_norm(x)?;
        let w = self.head_weight();
        let rows = normed.size().first().copied().unwrap_or(0);
        let plain = normed.dim() == 2
            && normed.kind() == Kind::Float
            && w.kind() == Kind::Float
            && !normed.requires_grad()
            && !w.requires_grad()
            && self.softcap().is_none()
            && rows > crate::kernels::MAX_ROWS;
        if plain {
            if let Ok(mut slot) = self.lens_logits.try_borrow_mut() {
                return self.lens_stats_buffered(&normed, w, targets, &mut slot).map(Some);
            }
        }
        let logits = self.lm_head(&normed)?.f_contiguous()?;
        let vocab = logits.size().get(1).copied().unwrap_or(0) as usize;
        // SAFETY: aliasing: `logits` was made just above by the LM head (and `contiguous`, which returns it or a
        // copy); no other handle, view or clone of its storage exists, and it outlives `values`, which is only
        // read. Threads: the storage is reachable only through this frame's handle, so no other thread writes it;
        // `softmax_stats` only reads it (from its scoped threads, joined before it returns).
        let stats = match unsafe { crate::kernels::borrow(&logits) } {
            Some(crate::kernels::Mat::F32(values)) => crate::kernels::softmax_stats(values, vocab, targets),
            _ => return Ok(None),
        };
        stats.map(Some).map_err(ModelError::InvalidArgument)
    }

    /// [`Llama::lens_stats`] for f32 normed rows `normed` `[M, H]` and an f32 head `w` `[V, H]`: chunks of rows
    /// through libtorch's product into the kept buffer `slot` (grown to the chunk's size when smaller), each
    /// chunk's statistics read from it before the next overwrites it.
    fn lens_stats_buffered(
        &self,
        normed: &Tensor,
        w: &Tensor,
        targets: &[i64],
        slot: &mut Option<Tensor>,
    ) -> Result<Vec<crate::kernels::SoftmaxStats>> {
        let rows = normed.size().first().copied().unwrap_or(0);
        let vocab = w.size().first().copied().unwrap_or(0);
        if targets.len() as i64 != rows {
            return Err(ModelError::InvalidArgument(format!(
                "lens_stats: {} targets for {rows} rows of states",
                targets.len()
            )));
        }
        let chunk = (LENS_BUFFER_BYTES / (4 * vocab.max(1))).max(LENS_MIN_ROWS).min(rows);
        let need = chunk * vocab;
        if slot.as_ref().is_none_or(|b| b.numel() < need as usize) {
            // Dropped first, so the old buffer and the new one never both hold memory.
            *slot = None;
            *slot = Some(crate::weights::fresh_on_huge_pages(&[need], Kind::Float)?);
        }
        let buffer = slot.as_ref().ok_or_else(|| ModelError::InvalidArgument("lens_stats: no buffer".into()))?;
        let wt = w.f_transpose(0, 1)?;
        let mut out = Vec::with_capacity(targets.len());
        let mut start = 0;
        while start < rows {
            let n = chunk.min(rows - start);
            let logits = buffer.f_narrow(0, 0, n * vocab)?.f_view([n, vocab])?;
            let _ = normed.f_narrow(0, start, n)?.f_mm_out(&logits, &wt)?;
            let span = targets.get(start as usize..(start + n) as usize).unwrap_or(&[]);
            // SAFETY: aliasing: `logits` is a view of the model's lens buffer, whose other handle (`slot`) is held
            // by this call's exclusive `RefCell` borrow and not used while `values` lives; the product above, the
            // only writer, has returned, and `values` is only read. Threads: `Llama` is not `Sync`, so no other
            // thread reaches the buffer through this model, and no handle to it leaves the model;
            // `softmax_stats` only reads it from its scoped threads, joined before it returns.
            let stats = match unsafe { crate::kernels::borrow(&logits) } {
                Some(crate::kernels::Mat::F32(values)) => crate::kernels::softmax_stats(values, vocab as usize, span),
                _ => Err("lens_stats: the logits buffer is not a contiguous f32 CPU tensor".to_string()),
            };
            out.extend(stats.map_err(ModelError::InvalidArgument)?);
            start += n;
        }
        Ok(out)
    }

    /// A fresh KV cache for `batch` rows and up to `capacity` positions.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> Result<KvCache> {
        let c = &self.config;
        KvCache::new(&self.devices, batch, c.num_kv_heads, capacity, c.head_dim, self.place)
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
    /// appended to it. `attention_mask` `[B, T]` (1 = token, 0 = padding) marks left padding among the new
    /// tokens, on the first call or on a later one (e.g. prompts' suffixes after a prefix they share, see
    /// [`KvCache::from_prefix`]); position ids then continue each row's own count of real tokens. A ragged cache
    /// takes no mask.
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
        self.check_start("forward_from", start)?;
        self.run(Input::Hidden(hidden, start), attention_mask, None, opts)
    }

    /// [`Llama::forward_from`] with a KV cache: blocks `start..L` run on `hidden` `[B, T, H]` (the state after
    /// `start` blocks) as new positions after what `cache` holds, and write their keys and values into it (the
    /// cache's blocks below `start` are neither read nor written). With [`KvCache::from_prefix`] this continues
    /// prompts' suffixes after a prefix they share, each under its own mask above `start` (the logit-lens
    /// proxy of the boundary search does this). `attention_mask` `[B, T]` marks left padding of the new positions.
    pub fn forward_from_cached(
        &self,
        hidden: &Tensor,
        start: usize,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        self.check_start("forward_from_cached", start)?;
        self.run(Input::Hidden(hidden, start), attention_mask, Some(cache), opts)
    }

    /// Refuses a start block past the last one (`what` names the caller).
    fn check_start(&self, what: &str, start: usize) -> Result<()> {
        if start > self.num_layers() {
            return Err(ModelError::InvalidArgument(format!(
                "{what}: start block {start} is past the last block ({} blocks)",
                self.num_layers()
            )));
        }
        Ok(())
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
            if c.lens.is_some() && (t != 1 || attention_mask.is_some()) {
                return Err(ModelError::InvalidArgument(format!(
                    "a cache whose rows hold different lengths takes one token per row and no attention mask, got \
                     {t} tokens{}",
                    if attention_mask.is_some() { " and a mask" } else { "" }
                )));
            }
        }
        // A ragged cache: per row, the column its new token goes to (= the row's length).
        let ragged_cols = match cache.as_ref().and_then(|c| c.lens.as_ref()) {
            Some(lens) => Some(Tensor::from_slice(lens).f_to_device(dev)?),
            None => None,
        };
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
            (Some(m), Some(c)) if padded && past > 0 => {
                let within = m.f_to_kind(Kind::Int64)?.f_cumsum(1, Kind::Int64)?.f_sub_scalar(1)?.f_clamp_min(0)?;
                within.f_add(&c.next_pos.f_unsqueeze(1)?)?
            }
            (Some(m), _) if padded => {
                m.f_to_kind(Kind::Int64)?.f_cumsum(1, Kind::Int64)?.f_sub_scalar(1)?.f_clamp_min(0)?
            }
            (_, Some(c)) if past > 0 => {
                c.next_pos.f_unsqueeze(1)?.f_add(&Tensor::f_arange(t, (Kind::Int64, dev))?.f_unsqueeze(0)?)?
            }
            _ => Tensor::f_arange_start(past, past + t, (Kind::Int64, dev))?.f_unsqueeze(0)?.f_expand([b, t], false)?,
        };

        // Attention masks: boolean [B, 1, T, S], true = may attend.
        let s = past + t;
        let key_valid = match (cache.as_deref_mut(), &amask) {
            (Some(c), Some(m)) => {
                c.key_mask.f_narrow(1, past, t)?.f_copy_(m)?;
                Some(c.key_mask.f_narrow(1, 0, s)?)
            }
            (Some(c), None) if padded => Some(c.key_mask.f_narrow(1, 0, s)?),
            (None, Some(m)) if padded => Some(m.shallow_clone()),
            _ => None,
        };
        let mask_for = |window: Option<usize>| -> Result<(Option<Tensor>, bool)> {
            let window = window.map(|w| w as i64).filter(|&w| w < s);
            if let Some(cols) = &ragged_cols {
                return Ok((Some(ragged_mask(cols, s, window, dev)?), false));
            }
            Ok(if !padded && window.is_none() {
                if t == 1 || past == 0 {
                    (None, t > 1)
                } else {
                    (Some(causal_mask(past, t, None, None, dev)?), false)
                }
            } else {
                (Some(causal_mask(past, t, key_valid.as_ref(), window, dev)?), false)
            })
        };

        // Rotary tables for these positions, [B, 1, T, D].
        let (cos, sin) = self.rope.tables(&positions, self.place.kind)?;
        let (attn_mask, is_causal) = mask_for(self.config.sliding_window)?;
        let ragged = match &ragged_cols {
            Some(cols) => Some((Tensor::f_arange(b, (Kind::Int64, dev))?, cols.shallow_clone())),
            None => None,
        };
        let full = AttnInputs { cos, sin, attn_mask, is_causal, ragged };
        let sliding = match (&self.config.gemma3, &self.rope_local) {
            (Some(g), Some(rope)) => {
                let (cos, sin) = rope.tables(&positions, self.place.kind)?;
                let (attn_mask, is_causal) = mask_for(Some(g.sliding_window))?;
                let ragged = full.ragged.as_ref().map(|(r, c)| (r.shallow_clone(), c.shallow_clone()));
                Some(AttnInputs { cos, sin, attn_mask, is_causal, ragged })
            }
            _ => None,
        };
        let ctx = StepCtx { full, sliding, opts };

        let (mut x, start) = match input {
            Input::Ids(ids) => {
                let e = Tensor::f_embedding(&self.embed, &ids.f_to_device(dev)?, -1, false, false)?;
                match &self.embed_scale {
                    Some(scale) => (e.f_mul(scale)?, 0),
                    None => (e, 0),
                }
            }
            Input::Hidden(hs, start) => (hs.f_to_device(self.devices.block(start))?.f_to_kind(self.place.kind)?, start),
        };
        let mut hidden = Vec::new();
        if opts.hidden_states {
            hidden.push(x.shallow_clone());
        }
        // The step context on the device of the current segment of blocks (moved once per segment).
        let mut moved: Option<StepCtx<'_>> = None;
        for block in &self.blocks[start..] {
            let bdev = self.devices.block(block.index);
            if x.device() != bdev {
                x = x.f_to_device(bdev)?;
            }
            let ctx = if bdev == dev {
                &ctx
            } else {
                match moved {
                    Some(ref m) if m.full.cos.device() == bdev => {}
                    _ => moved = Some(ctx.to_device(bdev)?),
                }
                moved.as_ref().unwrap_or(&ctx)
            };
            x = block.forward(&x, ctx, cache.as_deref_mut())?;
            if opts.hidden_states {
                hidden.push(x.shallow_clone());
            }
        }
        if let Some(c) = cache {
            if c.lens.is_some() {
                c.advance_ragged();
            } else {
                c.len = s;
                c.padded = padded;
            }
            c.next_pos = positions.f_select(1, t - 1)?.f_add_scalar(1)?;
        }
        let logits = match opts.logits {
            Logits::Skip => None,
            Logits::All => Some(self.lm_head(&self.final_norm(&x)?)?),
            Logits::Last => Some(self.lm_head(&self.final_norm(&x.f_select(1, t - 1)?)?)?),
        };
        Ok(ForwardOutput { logits, hidden_states: hidden })
    }
}

/// The `[B, 1, 1, s]` mask of one query per row over a ragged cache: row `r` (its new token at column
/// `cols[r]`) sees its own columns `0..=cols[r]`, within `window` of the new one on sliding-window layers.
fn ragged_mask(cols: &Tensor, s: i64, window: Option<i64>, dev: Device) -> Result<Tensor> {
    let kpos = Tensor::f_arange(s, (Kind::Int64, dev))?.f_unsqueeze(0)?;
    let q = cols.f_unsqueeze(1)?;
    let mut m = kpos.f_le_tensor(&q)?;
    if let Some(w) = window {
        m = m.f_logical_and(&q.f_sub(&kpos)?.f_lt(w)?)?;
    }
    Ok(m.f_unsqueeze(1)?.f_unsqueeze(1)?)
}

impl Llama {
    /// The base weights under their HF names (`lm_head.weight` only when untied). Merged LoRA is part of them.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.shallow_clone())];
        for b in &self.blocks {
            let p = format!("model.layers.{}", b.index);
            out.push((format!("{p}.input_layernorm.weight"), b.input_norm.weight.shallow_clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), b.post_norm.weight.shallow_clone()));
            out.extend(b.gemma3_named_norms());
            for m in Module::ALL {
                let lin = b.linear(m);
                out.push((format!("{}.weight", m.hf_path(b.index)), lin.weight.shallow_clone()));
                if let Some(bias) = &lin.bias {
                    out.push((format!("{}.bias", m.hf_path(b.index)), bias.shallow_clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight.shallow_clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.shallow_clone()));
        }
        out
    }
}

/// `normed Wᵀ` (the LM head's product for more rows than the kernels take) in f32 by libtorch's BLAS. On the CPU
/// without autograd, f32 logits are written into memory advised to transparent huge pages first: the logits of many
/// rows are hundreds of MB (a probe batch's lens on SmolLM2: 992 rows, 195 MB) of fresh memory that the product
/// would otherwise fill 4 KB page fault by page fault (≈ 4 % of a probe batch, `probe_profile` in alternating runs).
fn head_product(normed: &Tensor, w: &Tensor) -> Result<Tensor> {
    let shape = normed.size();
    let width = shape.last().copied().unwrap_or(0);
    let vocab = w.size().first().copied().unwrap_or(0);
    let rows = if width > 0 { normed.numel() as i64 / width } else { 0 };
    let plain_f32 = normed.kind() == Kind::Float && w.kind() == Kind::Float && normed.device() == Device::Cpu;
    if plain_f32 && !normed.requires_grad() && !w.requires_grad() && rows > 0 {
        let out = crate::weights::fresh_on_huge_pages(&[rows, vocab], Kind::Float)?;
        let y = normed.f_reshape([rows, width])?.f_mm_out(&out, &w.f_transpose(0, 1)?)?;
        let mut logits_shape = shape;
        if let Some(last) = logits_shape.last_mut() {
            *last = vocab;
        }
        return Ok(y.f_view(logits_shape.as_slice())?);
    }
    Ok(normed.f_linear::<Tensor>(w, None)?.f_to_kind(Kind::Float)?)
}
