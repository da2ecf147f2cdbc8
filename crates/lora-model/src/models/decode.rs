//! The fused one-token decode step on CPU.
//!
//! A batch-1 decode step of a small model is a few hundred small operations per token: per block two RMSNorms,
//! seven projections, RoPE on the query and key, the cache write, attention, SwiGLU and two residual adds. Run
//! through libtorch, each is a dispatch that costs about as much as its arithmetic (≈ 900 per token for
//! SmolLM2, ≈ a quarter of the step). Here the whole step runs on plain `f32` rows: the projections through the
//! fused matrix–vector kernels of [`crate::kernels`] (LoRA included), everything else in short loops, and the
//! key/value rows are written straight into the preallocated [`KvCache`]. libtorch is called once per step, for
//! the logits tensor.
//!
//! It applies only where it is exact to do so: CPU, f32 or bf16 weights, one new token per row for at most
//! [`crate::kernels::MAX_ROWS`] rows after a prefill, no autograd, no hidden states requested, no sliding window
//! in reach (Mistral's window on every layer; Gemma 3's sliding layers are windowed here), and the kernels enabled
//! (`LORA_BOUNDARY_KERNELS=off` routes everything to libtorch). Gemma 3's block runs in the same step: its `1 + w`
//! norms before and after attention and MLP, q/k norms, per-layer RoPE bases and windows, score scale, GELU-tanh,
//! scaled embeddings and logit soft-capping. Activations stay in f32 between operations (libtorch rounds every bf16 intermediate); in f32 the results equal the libtorch
//! path up to the order of summation.
use tch::{Device, Kind, Tensor};

use super::blocks::RmsNorm;
use super::llama::Block;
use super::{ForwardOptions, ForwardOutput, KvCache, Llama, Logits};
use crate::config::LayerType;
use crate::error::{ModelError, Result};
use crate::kernels::pool::Buf;
use crate::kernels::{self, borrow, LoraPart, Mat, MAX_ROWS};
use crate::lora::LoraLinear;
use crate::mask::Module;

/// `x · rsqrt(mean(x²) + eps) · w` for each row of `x` (`[rows, h]`) into `out`.
fn rms_norm(x: &[f32], w: Mat<'_>, eps: f64, h: usize, out: &mut [f32]) {
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = kernels::dot(row, Mat::F32(row)) / h as f32;
        let inv = 1.0 / (ms + eps as f32).sqrt();
        kernels::scale_mul(row, inv, w, o);
    }
}

/// Gemma's RMSNorm (scale `1 + w` in `w`) over each `hd`-wide head of `x`, in place.
fn norm_heads(x: &mut [f32], w: Mat<'_>, eps: f64, hd: usize) {
    let mut tmp = vec![0f32; hd];
    for head in x.chunks_exact_mut(hd) {
        tmp.copy_from_slice(head);
        rms_norm(&tmp, w, eps, hd, head);
    }
}

/// `gate = gelu_tanh(gate) · up` (PyTorch's `gelu(approximate="tanh")`), in place.
fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = 0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh()) * u;
    }
}

/// The scale a norm applies: the weight (Llama) or Gemma's `1 + w` in f32.
///
/// # Safety
/// As for [`borrow`]: the tensor must not be written while the slice lives.
unsafe fn norm_scale<'a>(n: &'a RmsNorm, what: &str) -> Result<Mat<'a>> {
    let t = n.gemma_scale.as_ref().unwrap_or(&n.weight);
    // SAFETY: the caller's contract (no write while the slice lives) is `borrow`'s; the slice borrows `n` for `'a`.
    // Aliasing: norm weights are written only through `&mut Llama` (loading, `projection_mut`), which the caller's
    // borrow of `n` excludes. Threads: the slice is only read, here and by the kernels' helper inside calls that
    // return first.
    unsafe { borrow(t) }.ok_or_else(|| bad_tensor(what))
}

/// HF's half-split RoPE, in place on one head `x` (`head_dim` values) at angles `angle[i] = pos · inv_freq[i]`.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

/// Per-step state shared by the blocks.
struct Step<'a> {
    rows: usize,
    /// Per row, the cached columns before this token (the column this token's key and value go to); all equal
    /// unless the cache is ragged.
    past: Vec<usize>,
    /// Per row, `head_dim / 2` cosines and sines of its position.
    cos: Vec<Vec<f32>>,
    sin: Vec<Vec<f32>>,
    /// Gemma 3's sliding layers: the same with the local RoPE base (empty otherwise).
    cos_local: Vec<Vec<f32>>,
    sin_local: Vec<Vec<f32>>,
    /// Gemma 3's window on its sliding layers.
    window: Option<usize>,
    /// The attention score scale.
    scale: f32,
    /// Per row, which of the `past + 1` keys may be attended to (`None`: all).
    valid: Option<Vec<Vec<bool>>>,
    opts: &'a ForwardOptions<'a>,
}

/// The activations of one block, taken once per step and reused by every block. Each starts on a cache line
/// ([`kernels::pool::Buf`]), and so does each of its rows when the width is a multiple of 16 values: the
/// projections' vector loads of them never straddle two lines.
struct Scratch {
    /// The normed input of the attention, then of the MLP.
    n: Buf,
    q: Buf,
    k: Buf,
    v: Buf,
    /// Attention output, `[rows, heads · head_dim]`.
    att: Buf,
    o: Buf,
    gate: Buf,
    up: Buf,
    down: Buf,
}

impl Scratch {
    fn new(rows: usize, h: usize, q: usize, kv: usize, inter: usize) -> Self {
        let z = |n: usize| kernels::pool::zeros(rows * n);
        Scratch { n: z(h), q: z(q), k: z(kv), v: z(kv), att: z(q), o: z(h), gate: z(inter), up: z(inter), down: z(h) }
    }
}

impl Llama {
    /// The fused decode step, or `Ok(None)` when it does not apply (the caller then runs the libtorch path;
    /// nothing has been changed).
    pub(super) fn fused_decode(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        opts: &ForwardOptions<'_>,
    ) -> Result<Option<ForwardOutput>> {
        let kind = self.place.kind;
        if !kernels::enabled()
            || !self.devices.all_cpu()
            || opts.train
            || opts.hidden_states
            || !matches!(kind, Kind::Float | Kind::BFloat16)
        {
            return Ok(None);
        }
        let size = ids.size();
        let (b, t) = match size.as_slice() {
            [b, t] => (*b, *t),
            _ => return Ok(None),
        };
        if t != 1 || !(1..=MAX_ROWS).contains(&b) || cache.len == 0 || cache.len + 1 > cache.capacity {
            return Ok(None);
        }
        if cache.key_mask.size().first() != Some(&b) {
            return Ok(None);
        }
        let s = cache.len + 1;
        if self.config.sliding_window.is_some_and(|w| (w as i64) < s) {
            return Ok(None);
        }
        // `run` has validated `opts.mask` already.
        let c = &self.config;
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        let ids: Vec<i64> = Vec::try_from(ids.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?.f_view([-1])?)?;
        if ids.iter().any(|&i| i < 0 || i as usize >= vocab) {
            return Ok(None);
        }
        // SAFETY: the embedding lives as long as `self`, which outlives the step. Aliasing: the model's weights are
        // written only through `&mut Llama` (merging, training), which this `&self` excludes, and the crate hands
        // out shallow clones of them (`named_weights`) only for reading. Threads: the slice is read only, here
        // and by the kernels' helper inside calls that return before the step does.
        let Some(embed) = (unsafe { borrow(&self.embed) }) else { return Ok(None) };
        if embed.len() != vocab * h {
            return Ok(None);
        }
        let rows = b as usize;
        let past: Vec<usize> = match &cache.lens {
            Some(lens) if lens.len() == rows => lens.iter().map(|&l| l as usize).collect(),
            Some(_) => return Ok(None),
            None => vec![cache.len as usize; rows],
        };
        let pos: Vec<i64> = Vec::try_from(cache.next_pos.f_to_kind(Kind::Int64)?.f_contiguous()?)?;
        if self.rope.inv_freq_host().len() != c.head_dim / 2 {
            return Ok(None);
        }
        let (mut cos, mut sin) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for &p in &pos {
            let (c, s) = self.rope.host_tables(p);
            cos.push(c);
            sin.push(s);
        }
        let (mut cos_local, mut sin_local) = (Vec::new(), Vec::new());
        if let Some(rope) = &self.rope_local {
            if rope.inv_freq_host().len() != c.head_dim / 2 {
                return Ok(None);
            }
            for &p in &pos {
                let (c, s) = rope.host_tables(p);
                cos_local.push(c);
                sin_local.push(s);
            }
        }
        let gemma = c.gemma3.as_ref();
        let window = gemma.map(|g| g.sliding_window);
        let scale = gemma.map_or(1.0 / (c.head_dim as f64).sqrt(), |g| g.query_pre_attn_scalar.powf(-0.5)) as f32;
        let valid = if cache.padded {
            let m = cache.key_mask.f_narrow(1, 0, s)?.f_to_kind(Kind::Uint8)?.f_contiguous()?;
            let flat: Vec<u8> = Vec::try_from(m.f_view([-1])?)?;
            Some(flat.chunks_exact(s as usize).map(|r| r.iter().map(|&v| v != 0).collect()).collect())
        } else {
            None
        };
        let step = Step { rows, past, cos, sin, cos_local, sin_local, window, scale, valid, opts };

        let mut x = vec![0f32; rows * h];
        for (r, &id) in ids.iter().enumerate() {
            embed.read_into(id as usize * h, &mut x[r * h..(r + 1) * h]);
        }
        if let Some(e) = &self.embed_scale {
            // Gemma 3: sqrt(hidden) rounded to the weights' kind, as the libtorch path multiplies it.
            let e = e.f_double_value(&[])? as f32;
            x.iter_mut().for_each(|v| *v *= e);
        }
        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut scratch = Scratch::new(rows, h, q_width, kv_width, c.intermediate_size);
        if self.decode_views.get().is_none() {
            let _ = self.decode_views.set(DecodeViews::new(self)?);
        }
        let views = self.decode_views.get().ok_or_else(|| bad_tensor("decode views"))?;
        for block in &self.blocks {
            self.fused_block(block, views, &mut x, cache, &step, &mut scratch)?;
        }
        if cache.lens.is_some() {
            cache.advance_ragged();
        } else {
            cache.len = s;
        }
        cache.next_pos = cache.next_pos.f_add_scalar(1)?;
        kernels::FUSED_STEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);

        let logits = match opts.logits {
            Logits::Skip => None,
            Logits::All | Logits::Last => {
                // SAFETY: as for the embedding above: a weight of `&self`, only read while the slice lives.
                let norm = unsafe { norm_scale(&self.norm, "model.norm.weight") }?;
                let mut normed = kernels::pool::zeros(rows * h);
                rms_norm(&x, norm, c.rms_norm_eps, h, &mut normed);
                let head = self.lm_head.as_ref().unwrap_or(&self.embed);
                let xs: Vec<&[f32]> = normed.chunks_exact(h).collect();
                // The logits are written straight into the tensor handed back.
                let mut l = Tensor::f_empty([b, vocab as i64], (Kind::Float, Device::Cpu))?;
                let lin = kernels::Linear { weight: head, bias: None, lora: None };
                // SAFETY: aliasing: `l` was just created here and has no other handle or view, and it is not used
                // otherwise until `y` (moved into `linear_rows`) is gone. Threads: only `linear_rows` writes `y`, on
                // this thread and the helper, and it returns before `l` is used again.
                let y = unsafe { kernels::borrow_f32_mut(&mut l) }.ok_or_else(|| bad_tensor("logits"))?;
                let l = if kernels::linear_rows(&[lin], &xs, &mut [y])? {
                    match c.gemma3.as_ref().and_then(|g| g.final_logit_softcapping) {
                        Some(cap) => super::gemma3::softcap(l, cap)?,
                        None => l,
                    }
                } else {
                    let n = Tensor::from_slice(&normed[..]).f_view([b, h as i64])?.f_to_kind(kind)?;
                    self.lm_head(&n)?
                };
                Some(if opts.logits == Logits::All { l.f_unsqueeze(1)? } else { l })
            }
        };
        Ok(Some(ForwardOutput { logits, hidden_states: Vec::new() }))
    }

    /// One block on the rows `x` (`[rows, hidden]`, updated in place).
    fn fused_block(
        &self,
        block: &Block,
        views: &DecodeViews,
        x: &mut [f32],
        cache: &mut KvCache,
        step: &Step<'_>,
        sc: &mut Scratch,
    ) -> Result<()> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let a = &block.attn;
        let (nh, nkv) = (c.num_heads, c.num_kv_heads);
        let l = block.index;
        let rows = step.rows;
        let mask = step.opts.mask;
        let on = |m: Module| mask.is_active(l, m);
        // Projections `ms` of this block on the rows of `x` (`n_in` wide) into `ys`, LoRA where the mask says.
        let proj = |ms: &[Module], x: &[f32], n_in: usize, ys: &mut [&mut [f32]]| -> Result<()> {
            let parts: Option<Vec<kernels::Prepared<'_>>> = ms.iter().map(|&m| views.get(self, l, m, on(m))).collect();
            project(parts.as_deref(), ms.iter().map(|&m| (block.linear(m), on(m))), x, n_in, ys)
        };

        // SAFETY: the norm weights live as long as `self`; as for the embedding in `fused_decode`, they are only
        // read while the slices live (`&self` excludes every writer; the helper thread only reads).
        let in_norm = unsafe { norm_scale(&block.input_norm, "input_layernorm") }?;
        let post_norm = unsafe { norm_scale(&block.post_norm, "post_attention_layernorm") }?;
        let eps = c.rms_norm_eps;
        rms_norm(x, in_norm, eps, h, &mut sc.n);
        proj(&[Module::Q, Module::K, Module::V], &sc.n, h, &mut [&mut sc.q, &mut sc.k, &mut sc.v])?;
        // Gemma 3: each query and key head normalised before RoPE.
        if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
            // SAFETY: as for the block's norms above.
            norm_heads(&mut sc.q, unsafe { norm_scale(qn, "self_attn.q_norm") }?, eps, hd);
            norm_heads(&mut sc.k, unsafe { norm_scale(kn, "self_attn.k_norm") }?, eps, hd);
        }
        let sliding = block.layer_type == LayerType::SlidingAttention && !step.cos_local.is_empty();
        let (cos, sin) = if sliding { (&step.cos_local, &step.sin_local) } else { (&step.cos, &step.sin) };
        for r in 0..rows {
            for head in sc.q[r * nh * hd..(r + 1) * nh * hd].chunks_exact_mut(hd) {
                rope(head, &cos[r], &sin[r]);
            }
            for head in sc.k[r * nkv * hd..(r + 1) * nkv * hd].chunks_exact_mut(hd) {
                rope(head, &cos[r], &sin[r]);
            }
        }

        // Append this position's keys and values to the cache, then attend over positions 0..=past.
        let cap = cache.capacity as usize;
        let (keys, values) = (&mut cache.keys[l], &mut cache.values[l]);
        let shape_ok = |t: &Tensor| t.size() == [rows as i64, nkv as i64, cap as i64, hd as i64];
        if !shape_ok(keys) || !shape_ok(values) || keys.kind() != self.place.kind || values.kind() != keys.kind() {
            return Err(ModelError::InvalidArgument(format!("block {l}: KV cache does not fit the model")));
        }
        {
            // SAFETY: aliasing: `keys` and `values` are distinct tensors (separate per-block allocations made by
            // `new_cache`) reached through `&mut KvCache`, so no other Rust code holds them; the cache never hands
            // out views of its storage that outlive a call, so no other libtorch handle reads or writes it while
            // these slices live. Threads: the helper thread only runs inside `kernels::join` calls, none of which
            // is in flight here. `borrow_mut` checks contiguity, device and kind; lengths are checked by `write`.
            let (Some(mut kw), Some(mut vw)) =
                (unsafe { kernels::borrow_mut(keys) }, unsafe { kernels::borrow_mut(values) })
            else {
                return Err(ModelError::InvalidArgument(format!("block {l}: KV cache is not a contiguous CPU tensor")));
            };
            for r in 0..rows {
                for g in 0..nkv {
                    let at = ((r * nkv + g) * cap + step.past[r]) * hd;
                    let src = (r * nkv + g) * hd;
                    if !kw.write(at, &sc.k[src..src + hd]) || !vw.write(at, &sc.v[src..src + hd]) {
                        return Err(ModelError::InvalidArgument(format!("block {l}: KV cache write out of bounds")));
                    }
                }
            }
        }
        // SAFETY: the mutable borrows above have ended; from here to the end of this block's attention the cache
        // is only read (by this thread and the helper inside `join`), and `&mut KvCache` keeps every other user out.
        let (Some(kr), Some(vr)) = (unsafe { borrow(keys) }, unsafe { borrow(values) }) else {
            return Err(ModelError::InvalidArgument(format!("block {l}: KV cache is not a contiguous CPU tensor")));
        };
        // The (row, head) pairs are shared out between this thread and the kernels' helper.
        let window = if sliding { step.window } else { None };
        let heads = Heads { q: &sc.q, keys: kr, values: vr, nh, nkv, hd, cap, window, step };
        let pairs = rows * nh;
        let cut = pairs / 2;
        let (lo, hi) = sc.att.split_at_mut(cut * hd);
        if !kernels::join(|| heads.attend(0..cut, lo), || heads.attend(cut..pairs, hi)) {
            return Err(ModelError::InvalidArgument(format!("block {l}: attention on the helper thread failed")));
        }
        proj(&[Module::O], &sc.att, nh * hd, &mut [&mut sc.o])?;
        // Gemma 3 normalises the attention output before the residual add, and the MLP input with its own norm.
        let gemma = match &block.gemma {
            // SAFETY: as for the block's norms above.
            Some(g) => Some(unsafe {
                (
                    norm_scale(&g.pre_feedforward, "pre_feedforward_layernorm")?,
                    norm_scale(&g.post_feedforward, "post_feedforward_layernorm")?,
                )
            }),
            None => None,
        };
        if gemma.is_some() {
            rms_norm(&sc.o, post_norm, eps, h, &mut sc.n);
            for (xv, nv) in x.iter_mut().zip(sc.n.iter()) {
                *xv += nv;
            }
        } else {
            for (xv, ov) in x.iter_mut().zip(sc.o.iter()) {
                *xv += ov;
            }
        }

        let mlp_norm = gemma.map_or(post_norm, |(pre, _)| pre);
        rms_norm(x, mlp_norm, eps, h, &mut sc.n);
        let inter = c.intermediate_size;
        let mlp = &block.mlp;
        proj(&[Module::Gate, Module::Up], &sc.n, h, &mut [&mut sc.gate, &mut sc.up])?;
        if mlp.gelu_tanh {
            gelu_tanh_mul(&mut sc.gate, &sc.up);
        } else {
            kernels::swiglu(&mut sc.gate, &sc.up);
        }
        proj(&[Module::Down], &sc.gate, inter, &mut [&mut sc.down])?;
        match gemma {
            Some((_, post_ff)) => {
                rms_norm(&sc.down, post_ff, eps, h, &mut sc.n);
                for (xv, nv) in x.iter_mut().zip(sc.n.iter()) {
                    *xv += nv;
                }
            }
            None => {
                for (xv, dv) in x.iter_mut().zip(sc.down.iter()) {
                    *xv += dv;
                }
            }
        }
        Ok(())
    }
}

/// What attention reads in one block: the rotated queries and the cache (this position's keys and values
/// written already).
struct Heads<'a> {
    /// `[rows, heads · head_dim]`.
    q: &'a [f32],
    /// `[rows, kv heads, capacity, head_dim]`.
    keys: Mat<'a>,
    values: Mat<'a>,
    nh: usize,
    nkv: usize,
    hd: usize,
    cap: usize,
    /// Sliding-window layers: only the last `window` positions are seen.
    window: Option<usize>,
    step: &'a Step<'a>,
}

impl Heads<'_> {
    /// Softmax attention for the (row, head) pairs `pairs` (pair `p` = row `p / heads`, head `p % heads`), into
    /// `out` (`[pairs.len(), head_dim]`). Row `r` attends over its columns `0..=past[r]`. The query heads of a pair
    /// range that share a key/value head are taken together ([`kernels::attn_scores`], [`kernels::attn_values`]):
    /// one pass over those keys and values for all of them.
    fn attend(&self, pairs: std::ops::Range<usize>, out: &mut [f32]) {
        let hd = self.hd;
        let scale = self.step.scale;
        let rep = (self.nh / self.nkv).max(1);
        let longest = self.step.past.iter().copied().max().unwrap_or(0) + 1;
        let mut all_scores = kernels::pool::take(rep * longest);
        let mut p = pairs.start;
        while p < pairs.end {
            let (r, head) = (p / self.nh, p % self.nh);
            let kv = head / rep;
            // The heads of this pair range that read key/value head `kv` of row `r`.
            let end = (r * self.nh + (kv + 1) * rep).min(pairs.end).max(p + 1);
            let g = end - p;
            let s = self.step.past.get(r).map_or(1, |&past| past + 1);
            let valid = self.step.valid.as_ref().map(|v| &v[r]);
            let base = (r * self.nkv + kv) * self.cap * hd;
            let span = base..base + s * hd;
            let scores = &mut all_scores[..g * s];
            kernels::attn_scores(&self.q[p * hd..end * hd], self.keys.slice(span.clone()), hd, s, scale, scores);
            for row in scores.chunks_exact_mut(s) {
                let mut max = f32::NEG_INFINITY;
                for (j, sc) in row.iter_mut().enumerate() {
                    // The newest position is always visible (as in the libtorch path's mask).
                    let in_window = self.window.is_none_or(|w| s - 1 - j < w);
                    let seen = j + 1 == s || (in_window && valid.is_none_or(|v| v[j]));
                    if !seen {
                        *sc = f32::NEG_INFINITY;
                    }
                    max = max.max(*sc);
                }
                let mut sum = 0f32;
                for sc in row.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                for sc in row.iter_mut() {
                    *sc /= sum;
                }
            }
            let at = (p - pairs.start) * hd;
            kernels::attn_values(scores, self.values.slice(span), hd, s, &mut out[at..at + g * hd]);
            p = end;
        }
    }
}

/// A tensor's values as the kernels read them, kept without a borrow: a [`Mat`] whose lifetime is the model's.
#[derive(Clone, Copy)]
struct RawMat {
    ptr: *const u16,
    /// Values (f32 or bf16).
    len: usize,
    f32: bool,
}

impl RawMat {
    fn of(m: Mat<'_>) -> Self {
        match m {
            Mat::F32(v) => RawMat { ptr: v.as_ptr() as *const u16, len: v.len(), f32: true },
            Mat::Bf16(v) => RawMat { ptr: v.as_ptr(), len: v.len(), f32: false },
        }
    }

    /// The values again, for as long as `_model` is borrowed.
    ///
    /// # Safety
    /// `self` must come from a tensor of `_model` borrowed since its [`DecodeViews`] were made (see there).
    unsafe fn get<'a>(self, _model: &'a Llama) -> Mat<'a> {
        // SAFETY: `ptr` and `len` came from a live slice of one of `_model`'s tensors (`RawMat::of`, with the
        // alignment of its kind), whose storage stays put while `_model` is borrowed (the caller's contract, see
        // `DecodeViews`: replacing or resizing a tensor takes `&mut Llama`). Aliasing: nothing writes these values
        // while the slice lives: merging and replacing take `&mut Llama`, which the `&'a Llama` excludes, and the
        // trainer's in-place updates of LoRA tensors it shares storage with (f32 training) run between forward
        // passes on the caller's thread, never while a decode step holds these slices. Threads: the values are only
        // read, by this thread and the kernels' helper inside calls that return before `'a` ends.
        unsafe {
            if self.f32 {
                Mat::F32(std::slice::from_raw_parts(self.ptr as *const f32, self.len))
            } else {
                Mat::Bf16(std::slice::from_raw_parts(self.ptr, self.len))
            }
        }
    }
}

/// One projection as the kernels take it (see [`kernels::Prepared`]), LoRA included unless merged.
struct ProjView {
    w: RawMat,
    n_out: usize,
    n_in: usize,
    /// `A`, `B`, r, scaling.
    lora: Option<(RawMat, RawMat, usize, f32)>,
    bias: Option<Vec<f32>>,
}

/// Every projection of the model borrowed for the kernels once, so that a decode step does not ask libtorch
/// for the shapes, kinds and data pointers of about two hundred tensors again (each call a few lookups in
/// tensor metadata that the step's stream of weights has pushed out of the caches: about 1 µs per projection,
/// 2-3 % of a SmolLM2 step). Kept in [`Llama::decode_views`]; `None` for a projection the kernels do not take
/// (then that call goes to libtorch, as before).
///
/// Why the raw pointers stay valid: they point into the storage of tensors the model owns. That storage is
/// freed or reallocated only when a tensor is replaced, resized or moved, which takes `&mut` access to its
/// projection: [`Llama::projection_mut`], the only way to one, drops these views first, and every use turns
/// them back into slices for the length of a `&Llama` borrow, which excludes it meanwhile. (Shallow clones that
/// the crate hands out, e.g. `named_weights`, are for reading: the same rule as for every borrow in the decode
/// step.)
pub(crate) struct DecodeViews {
    /// Per block, its seven projections in [`Module::ALL`] order.
    blocks: Vec<Vec<Option<ProjView>>>,
}

// SAFETY: threads: the pointers lead to tensor storage on the heap, owned by the model that holds these views and
// moving with it; nothing here is tied to a thread, and the values are only read. Aliasing: as for the views
// themselves (see above): no `&mut` to a weight exists while a slice made from them lives.
unsafe impl Send for DecodeViews {}

impl DecodeViews {
    fn new(model: &Llama) -> Result<Self> {
        let mut blocks = Vec::with_capacity(model.blocks.len());
        for block in &model.blocks {
            let mut views = Vec::with_capacity(Module::ALL.len());
            for m in Module::ALL {
                let lin = block.linear(m);
                let part = kernels::Linear {
                    weight: &lin.weight,
                    bias: lin.bias.as_ref(),
                    lora: match &lin.lora {
                        Some(l) if !l.merged => Some(LoraPart { a: &l.a, b: &l.b, scaling: l.scaling }),
                        _ => None,
                    },
                };
                // SAFETY: the slices are turned into raw pointers at once; see `DecodeViews` for why those stay
                // valid while they are used.
                let view = unsafe { kernels::Prepared::new(&part) }?.map(|p| ProjView {
                    w: RawMat::of(p.w),
                    n_out: p.n_out,
                    n_in: p.n_in,
                    lora: p.lora.map(|(a, b, r, s)| (RawMat::of(a), RawMat::of(b), r, s)),
                    bias: p.bias.map(|b| b.into_owned()),
                });
                views.push(view);
            }
            blocks.push(views);
        }
        Ok(DecodeViews { blocks })
    }

    /// Projection `m` of block `l` for the kernels, with its LoRA when `lora_on`, or `None` when the kernels do
    /// not take it.
    fn get<'a>(&'a self, model: &'a Llama, l: usize, m: Module, lora_on: bool) -> Option<kernels::Prepared<'a>> {
        let i = Module::ALL.iter().position(|&x| x == m)?;
        let v = self.blocks.get(l)?.get(i)?.as_ref()?;
        // SAFETY: these views were made from `model`'s tensors and are still in `model.decode_views` (they go
        // before any `&mut` access to a projection), and `model` stays borrowed while the slices live.
        unsafe {
            Some(kernels::Prepared {
                w: v.w.get(model),
                n_out: v.n_out,
                n_in: v.n_in,
                lora: match v.lora {
                    Some((a, b, r, s)) if lora_on => Some((a.get(model), b.get(model), r, s)),
                    _ => None,
                },
                bias: v.bias.as_deref().map(std::borrow::Cow::Borrowed),
            })
        }
    }
}

/// `ys[p] = lins[p].0(x)` (with its LoRA when `lins[p].1`) for the rows of `x` (`[rows, n_in]`), all projections
/// in one kernel call, or libtorch one by one for what the kernels do not take. `parts` are the same projections
/// as the kernels take them (from [`DecodeViews`]), `None` when the kernels do not take one of them; `lins` is only
/// walked on the libtorch path.
fn project<'a>(
    parts: Option<&[kernels::Prepared<'_>]>,
    lins: impl Iterator<Item = (&'a LoraLinear, bool)>,
    x: &[f32],
    n_in: usize,
    ys: &mut [&mut [f32]],
) -> Result<()> {
    let rows: Vec<&[f32]> = x.chunks_exact(n_in).collect();
    if let Some(parts) = parts {
        if kernels::linear_rows_prepared(parts, &rows, ys)? {
            return Ok(());
        }
    }
    let x32 = Tensor::from_slice(x).f_view([rows.len() as i64, n_in as i64])?;
    for ((lin, on), y) in lins.zip(ys.iter_mut()) {
        let xt = x32.f_to_kind(lin.weight.kind())?;
        let out = lin.forward(&xt, on, false)?.f_to_kind(Kind::Float)?.f_contiguous()?;
        let v: Vec<f32> = Vec::try_from(out.f_view([-1])?)?;
        if v.len() != y.len() {
            return Err(ModelError::InvalidArgument(format!(
                "projection output has {} values, expected {}",
                v.len(),
                y.len()
            )));
        }
        y.copy_from_slice(&v);
    }
    Ok(())
}

fn bad_tensor(what: &str) -> ModelError {
    ModelError::InvalidArgument(format!("{what}: not a contiguous f32/bf16 CPU tensor"))
}
