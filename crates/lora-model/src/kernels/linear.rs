//! The fused projections: `x Wᵀ + bias (+ scaling · (x Aᵀ) Bᵀ)` for a few activation rows, one weight stream for
//! all of them, several projections of one input (q, k and v) in one call, split over two threads inside a
//! [`decode_scope`](super::decode_scope).
use std::sync::atomic::{AtomicU8, Ordering};

use tch::{Device, Kind, Tensor};

use super::borrow::{borrow_mat, Mat};
use super::isa::{unsupported, SimdPath};
use super::runtime::{helper, pool, threads_for};
use super::schedule::{Chunks, Out, CHUNK_MIN_BYTES};
use super::{enabled, simd, simd_path, MAX_ROWS};
use crate::error::{ModelError, Result};

/// The low-rank part of a fused call: `scaling · B (A x)`.
pub(crate) struct LoraPart<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f64,
}

/// `x Wᵀ + bias (+ scaling · (x Aᵀ) Bᵀ)` for a small `x` `[..., in]`, or `Ok(None)` when the kernels do not
/// apply and the caller should use libtorch.
pub(crate) fn small_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<LoraPart<'_>>,
) -> Result<Option<Tensor>> {
    if !enabled() {
        return Ok(None);
    }
    tensor_linear(simd_path(), MAX_ROWS as usize, x, weight, bias, lora)
}

/// `x Wᵀ + bias (+ scaling · (x Aᵀ) Bᵀ)` on the kernels' loops for instruction set `path`, for `x` `[..., in]`
/// with any number of rows (whether or not the kernels are [`enabled`](super::enabled), and past
/// [`MAX_ROWS`]): for benchmarks that compare the paths with each other and with libtorch, and for tests. `lora`
/// is `(A [r, in], B [out, r], scaling)`. Every tensor must be a contiguous CPU tensor of `weight`'s kind, f32 or
/// bf16, without autograd; the result has `x`'s shape with `out` columns and `weight`'s kind (bf16 rounded once, at
/// the end). Inside a [`decode_scope`](super::decode_scope) large products are split over two threads, as in
/// decoding.
///
/// # Errors
/// [`ModelError::InvalidArgument`] when this CPU lacks `path`, or the tensors are not what the kernels take
/// (device, kind, layout, autograd or shapes).
pub fn linear_on(
    path: SimdPath,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> Result<Tensor> {
    if !path.supported() {
        return Err(unsupported(path));
    }
    let lora = lora.map(|(a, b, scaling)| LoraPart { a, b, scaling });
    tensor_linear(path, usize::MAX, x, weight, bias, lora)?.ok_or_else(|| {
        ModelError::InvalidArgument(format!(
            "the kernels do not take x {:?} {:?} with weight {:?} {:?} (contiguous CPU f32/bf16 tensors of one kind, \
             no autograd, matching shapes)",
            x.size(),
            x.kind(),
            weight.size(),
            weight.kind()
        ))
    })
}

/// [`small_linear`] on `path` for at most `max_rows` rows.
fn tensor_linear(
    path: SimdPath,
    max_rows: usize,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<LoraPart<'_>>,
) -> Result<Option<Tensor>> {
    if x.device() != Device::Cpu || x.requires_grad() {
        return Ok(None);
    }
    let kind = weight.kind();
    if x.kind() != kind || !matches!(kind, Kind::Float | Kind::BFloat16) {
        return Ok(None);
    }
    let xs = x.size();
    let Some(&n_in) = xs.last() else { return Ok(None) };
    let m = if n_in > 0 { x.numel() / n_in as usize } else { 0 };
    if m == 0 || m > max_rows {
        return Ok(None);
    }
    let xf = x.f_to_kind(Kind::Float)?.f_contiguous()?;
    let xv = Vec::<f32>::try_from(xf.f_view([-1])?)?;
    // On a cache line, as the decode step's activations are (see `pool::Buf`).
    let mut aligned = pool::take(xv.len());
    aligned.copy_from_slice(&xv);
    let rows: Vec<&[f32]> = aligned.chunks_exact(n_in as usize).collect();
    let n_out = weight.size().first().copied().unwrap_or(0).max(0) as usize;
    let mut y = vec![0f32; rows.len() * n_out];
    if !linear_rows_on(path, usize::MAX, &[Linear { weight, bias, lora }], &rows, &mut [&mut y])? {
        return Ok(None);
    }
    let mut shape = xs;
    if let Some(last) = shape.last_mut() {
        *last = n_out as i64;
    }
    let out = Tensor::from_slice(&y).f_view(shape.as_slice())?;
    Ok(Some(if kind == Kind::Float { out } else { out.f_to_kind(kind)? }))
}

/// The scaled low-rank inputs `scaling · A x` of a [`linear_rows`] call's LoRAs, computed by both threads: each
/// projection's `A` in two halves of its rows, the front thread taking halves from the first projection on and the
/// back thread from the last one back, before either streams W (so the short `A` matrices are read by both
/// threads at once, and each thread first needs the projection it computed). A projection's input is ready once
/// both its halves are; until then a thread computes W's rows without `B` and adds `B`'s later.
struct LowRank {
    /// Per projection, `[activation rows, r]` (`None` without LoRA): owned here, and not touched through the
    /// `Buf` while the threads run (only through `values`).
    _bufs: Vec<Option<pool::Buf>>,
    /// Per projection, its buffer's values (pointer and length; null and 0 without LoRA), made once, before the
    /// threads start. Written only through [`LowRank::write`], each value by the one thread that claimed its
    /// half, before that half's release increment of `done`; read only through [`LowRank::ready`], after an
    /// acquire load has seen both halves done.
    values: Vec<(*mut f32, usize)>,
    /// Per projection, how many of its two halves are written.
    done: Vec<AtomicU8>,
    /// The halves, handed out one at a time from both ends (half `2k + h` is half `h` of projection `k`).
    halves: Chunks,
    /// A thread failed (panicked) while computing a half: waiting for it would never end.
    failed: std::sync::atomic::AtomicBool,
}

// SAFETY: threads: every value behind `values` is written by exactly one thread (the one that claimed its half
// from `halves`, an atomic hand-out), before the release increment of its projection's `done`; readers make a
// shared slice of a projection's values only after an acquire load has seen both halves done, so every write
// happens-before every read. Aliasing: writes go through the raw pointers to disjoint values, no `&mut` to a
// buffer exists while the threads run (the pointers were made before, and the `Buf`s are not touched until drop),
// and no `&` to a projection's values exists before its writes are done.
unsafe impl Sync for LowRank {}

impl LowRank {
    /// Buffers for `m` activation rows of every LoRA of `prepared` (made by the calling thread, before the
    /// threads start).
    fn new(prepared: &[Prepared<'_>], m: usize) -> Self {
        let mut bufs: Vec<Option<pool::Buf>> =
            prepared.iter().map(|p| p.lora.as_ref().map(|&(_, _, r, _)| pool::zeros(m * r))).collect();
        let values = bufs
            .iter_mut()
            .map(|b| b.as_mut().map_or((std::ptr::null_mut(), 0), |b| (b.as_mut_ptr(), b.len())))
            .collect();
        LowRank {
            done: bufs.iter().map(|b| AtomicU8::new(if b.is_some() { 0 } else { 2 })).collect(),
            halves: Chunks::new(2 * bufs.len(), 1),
            _bufs: bufs,
            values,
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Computes the halves this thread claims until none are left.
    fn compute(&self, prepared: &[Prepared<'_>], w_in: usize, xs: &simd::Rows<'_>, front: bool) {
        // Marks the call failed if a product panics, so that a waiting thread never spins forever.
        struct Guard<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.store(true, Ordering::Release);
                }
            }
        }
        let _guard = Guard(&self.failed);
        let m = xs.xs.len();
        let mut tmp = Vec::new();
        while let Some(claimed) = self.halves.claim(front, true) {
            let half = claimed.start;
            let k = half / 2;
            let Some((a, _, r, scaling)) = prepared.get(k).and_then(|p| p.lora) else { continue };
            let rows = if half % 2 == 0 { 0..r / 2 } else { r / 2..r };
            let len = rows.len();
            if len > 0 {
                tmp.clear();
                tmp.resize(m * len, 0.0);
                simd::matvec(a, w_in, rows.clone(), xs, None, &mut tmp, false);
                for (row, vals) in tmp.chunks_exact(len).enumerate() {
                    for (j, v) in rows.clone().zip(vals) {
                        // SAFETY: this thread claimed this half (`write` checks the bounds).
                        unsafe { self.write(k, row * r + j, v * scaling) };
                    }
                }
            }
            self.done[k].fetch_add(1, Ordering::Release);
        }
    }

    /// Writes value `i` of projection `k`'s buffer.
    ///
    /// # Safety
    /// The caller must be the thread that claimed the half `i` belongs to (see the `Sync` impl): no other thread
    /// writes or reads that value meanwhile. Out-of-bounds `i` is ignored.
    unsafe fn write(&self, k: usize, i: usize, v: f32) {
        if let Some(&(ptr, len)) = self.values.get(k) {
            if i < len {
                *ptr.add(i) = v;
            }
        }
    }

    /// Projection `k`'s input as `m` rows if both its halves are written (`Some(Some)`), `Some(None)` if a
    /// thread failed, `None` while a half is still being computed.
    fn ready(&self, k: usize, m: usize) -> Option<Option<Vec<&[f32]>>> {
        if self.failed.load(Ordering::Acquire) {
            return Some(None);
        }
        if self.done.get(k)?.load(Ordering::Acquire) < 2 {
            return None;
        }
        let &(ptr, len) = self.values.get(k)?;
        if ptr.is_null() {
            return Some(Some(Vec::new()));
        }
        // SAFETY: both halves were written before their release increments, which the acquire load above saw;
        // from now on these values are only read (see the `Sync` impl), and the buffer lives as long as `self`.
        let vals: &[f32] = unsafe { std::slice::from_raw_parts(ptr, len) };
        Some(Some(vals.chunks_exact((len / m.max(1)).max(1)).collect()))
    }

    /// [`LowRank::ready`], spinning until it is.
    fn wait(&self, k: usize, m: usize) -> Option<Vec<&[f32]>> {
        loop {
            match self.ready(k, m) {
                Some(done) => return done,
                None => std::hint::spin_loop(),
            }
        }
    }
}

/// One projection of a [`linear_rows`] call: `x Wᵀ + bias (+ scaling · (x Aᵀ) Bᵀ)`.
pub(crate) struct Linear<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub lora: Option<LoraPart<'a>>,
}

/// A projection borrowed for the kernels: what [`linear_rows`] makes of a [`Linear`] on every call, or what a
/// caller that calls often with the same weights keeps (the model's decode step, see `models::decode`), so that
/// libtorch is not asked for the tensors' shapes, kinds and data pointers again each time.
#[derive(Clone)]
pub(crate) struct Prepared<'a> {
    /// `W`, `[n_out, n_in]` row-major.
    pub w: Mat<'a>,
    pub n_out: usize,
    pub n_in: usize,
    /// `A` (`[r, n_in]`), `B` (`[n_out, r]`), r and scaling; the same kind as `W`.
    pub lora: Option<(Mat<'a>, Mat<'a>, usize, f32)>,
    /// `n_out` values.
    pub bias: Option<std::borrow::Cow<'a, [f32]>>,
}

impl<'a> Prepared<'a> {
    /// Borrows `lin` for the kernels, or `None` when they do not take it (device, kind, layout, autograd or
    /// shapes).
    ///
    /// # Safety
    /// The returned slices alias the tensors' storage: the tensors must outlive them, and nothing may write the
    /// tensors (or reallocate their storage) while they live.
    pub(crate) unsafe fn new(lin: &Linear<'a>) -> Result<Option<Self>> {
        let kind = lin.weight.kind();
        let Some((w, n_out, n_in)) = borrow_mat(lin.weight) else { return Ok(None) };
        let lora = match &lin.lora {
            Some(l) => {
                if l.a.kind() != kind || l.b.kind() != kind {
                    return Ok(None);
                }
                let (Some((a, r, a_in)), Some((b, b_out, b_r))) = (borrow_mat(l.a), borrow_mat(l.b)) else {
                    return Ok(None);
                };
                if a_in != n_in || b_out != n_out || b_r != r {
                    return Ok(None);
                }
                Some((a, b, r, l.scaling as f32))
            }
            None => None,
        };
        let bias = match lin.bias {
            Some(b) => {
                if b.numel() != n_out || b.device() != Device::Cpu {
                    return Ok(None);
                }
                let b = b.f_to_kind(Kind::Float)?.f_contiguous()?;
                Some(std::borrow::Cow::Owned(Vec::<f32>::try_from(&b)?))
            }
            None => None,
        };
        Ok(Some(Prepared { w, n_out, n_in, lora, bias }))
    }
}

/// `ys[p] = x Wₚᵀ + biasₚ (+ scalingₚ · (x Aₚᵀ) Bₚᵀ)` for the activation rows `rows` (each `in` long) and every
/// projection `p` of `lins` (all reading the same input, e.g. q, k and v), into `ys[p]` (`[rows.len(), outₚ]`,
/// row-major). Inside a [`decode_scope`](super::decode_scope) the output rows of all projections are shared out between this thread
/// and the helper in chunks ([`Chunks`]), so several projections cost one hand-over instead of one each. Returns
/// `Ok(false)`, with `ys` untouched, when the kernels do not apply to one of the tensors (then the caller uses
/// libtorch).
pub(crate) fn linear_rows(lins: &[Linear<'_>], rows: &[&[f32]], ys: &mut [&mut [f32]]) -> Result<bool> {
    if !enabled() {
        return Ok(false);
    }
    linear_rows_on(simd_path(), MAX_ROWS as usize, lins, rows, ys)
}

/// [`linear_rows`] on the loops of `path` (which this CPU supports) for at most `max_rows` rows, whether or not
/// the kernels are enabled.
fn linear_rows_on(
    path: SimdPath,
    max_rows: usize,
    lins: &[Linear<'_>],
    rows: &[&[f32]],
    ys: &mut [&mut [f32]],
) -> Result<bool> {
    if rows.is_empty() || rows.len() > max_rows || lins.len() != ys.len() {
        return Ok(false);
    }
    let mut prepared = Vec::with_capacity(lins.len());
    for lin in lins {
        // SAFETY: every borrowed tensor is borrowed (`&Tensor`) by `lins` until the end of this function, which
        // outlives the slices. Aliasing: the model's weights are written only through `&mut` access to their owner
        // (merging, training), which the caller's shared borrow excludes meanwhile. Threads: the slices are read
        // only, by this thread and (inside `helper::join`, which returns before this function does) the helper.
        match unsafe { Prepared::new(lin) }? {
            Some(p) => prepared.push(p),
            None => return Ok(false),
        }
    }
    prepared_rows_on(path, max_rows, &prepared, rows, ys)
}

/// [`linear_rows`] for projections borrowed already ([`Prepared`]): no call into libtorch. Returns `Ok(false)`,
/// with `ys` untouched, when the shapes disagree or the kernels are off.
pub(crate) fn linear_rows_prepared(parts: &[Prepared<'_>], rows: &[&[f32]], ys: &mut [&mut [f32]]) -> Result<bool> {
    if !enabled() {
        return Ok(false);
    }
    prepared_rows_on(simd_path(), MAX_ROWS as usize, parts, rows, ys)
}

/// [`linear_rows_prepared`] on `path` for at most `max_rows` rows.
fn prepared_rows_on(
    path: SimdPath,
    max_rows: usize,
    prepared: &[Prepared<'_>],
    rows: &[&[f32]],
    ys: &mut [&mut [f32]],
) -> Result<bool> {
    if rows.is_empty() || rows.len() > max_rows || prepared.is_empty() || prepared.len() != ys.len() {
        return Ok(false);
    }
    let m = rows.len();
    let w_in = rows[0].len();
    if rows.iter().any(|r| r.len() != w_in) {
        return Ok(false);
    }
    let shapes_agree = prepared.iter().zip(ys.iter()).all(|(p, y)| {
        let lora_ok = p.lora.as_ref().is_none_or(|(a, b, r, _)| a.len() == r * p.n_in && b.len() == p.n_out * r);
        p.n_in == w_in
            && p.w.len() == p.n_out * p.n_in
            && lora_ok
            && p.bias.as_ref().is_none_or(|b| b.len() == p.n_out)
            && y.len() == m * p.n_out
    });
    if !shapes_agree {
        return Ok(false);
    }
    let total: usize = prepared.iter().map(|p| p.n_out).sum();
    if u32::try_from(total).is_err() {
        return Ok(false); // `Chunks` counts rows in 32 bits
    }
    let threads = threads_for(total * w_in);
    let min = (CHUNK_MIN_BYTES / (w_in * prepared[0].w.value_bytes()).max(1)).next_multiple_of(8).max(8);
    let chunks = Chunks::new(total, min);
    // The one place the output buffers' raw pointers are made: from the `&mut` borrows of `ys`, held by the
    // `Out`s until this function returns (`ys` is not touched otherwise from here on).
    let outs: Vec<Out<'_>> = ys.iter_mut().map(|y| Out::new(y, m)).collect();
    let input = simd::Rows::on(path, rows);
    for p in prepared {
        input.prepare(p.w, w_in); // before the threads start (see `Rows`); `A` has the same width and kind
    }

    // Both threads first compute the LoRAs' `scaling · A x` ([`LowRank`]: halves of each `A`, the front thread
    // from the first projection, the back thread from the last). Then each takes chunks of output rows until none
    // are left and computes W's rows (plus B's rows against the low-rank input, in the same loop: `simd::Side`) and
    // the bias; while a projection's input is not ready yet (its other half still being computed by the other
    // thread), it takes small chunks, W's rows only, and adds their B's rows at the end.
    let low_rank = LowRank::new(prepared, m);
    let any_lora = prepared.iter().any(|p| p.lora.is_some());
    let work = |front: bool| -> bool {
        if any_lora {
            low_rank.compute(prepared, w_in, &input, front);
        }
        let mut tmp = Vec::new();
        // Per projection, its low-rank rows `scaling · A x` once this thread has seen them ready.
        let mut xa_rows: Vec<Option<Vec<&[f32]>>> = vec![None; prepared.len()];
        let mut missing = prepared.iter().filter(|p| p.lora.is_some()).count();
        // (projection, its output rows) computed without B's part.
        let mut pending: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        loop {
            if missing > 0 {
                for (k, (p, slot)) in prepared.iter().zip(xa_rows.iter_mut()).enumerate() {
                    if p.lora.is_some() && slot.is_none() {
                        match low_rank.ready(k, m) {
                            Some(Some(rows)) => {
                                *slot = Some(rows);
                                missing -= 1;
                            }
                            Some(None) => return false,
                            None => {}
                        }
                    }
                }
            }
            let Some(range) = chunks.claim(front, missing > 0) else { break };
            let mut start = 0;
            for (k, (p, out)) in prepared.iter().zip(&outs).enumerate() {
                let (lo, hi) = (range.start.max(start), range.end.min(start + p.n_out));
                let first = start;
                start += p.n_out;
                if lo >= hi {
                    continue;
                }
                let local = lo - first..hi - first;
                let len = local.len();
                let side = match (&p.lora, &xa_rows[k]) {
                    (Some((_, b, r, _)), Some(rows)) => Some(simd::Side { b: *b, r: *r, xa: rows }),
                    (Some(_), None) => {
                        pending.push((k, local.clone()));
                        None
                    }
                    (None, _) => None,
                };
                let rows_w = |dst: &mut [f32], _: bool| {
                    simd::matvec(p.w, w_in, local.clone(), &input, side, dst, false);
                    if let Some(bias) = &p.bias {
                        for row in dst.chunks_exact_mut(len) {
                            for (v, b) in row.iter_mut().zip(&bias[local.clone()]) {
                                *v += b;
                            }
                        }
                    }
                };
                // SAFETY: threads: this thread claimed these output rows from `chunks`, so the other thread never
                // touches them. Aliasing: no other slice over them is alive (each piece's ends with its call), and
                // `local.end ≤ n_out` of this projection.
                unsafe { out.with_rows(local.clone(), &mut tmp, false, rows_w) };
            }
        }
        for (k, local) in pending {
            if xa_rows[k].is_none() {
                xa_rows[k] = low_rank.wait(k, m);
            }
            let (Some((_, b, r, _)), Some(out), Some(xa)) = (&prepared[k].lora, outs.get(k), &xa_rows[k]) else {
                return false;
            };
            if xa.len() != m {
                return false;
            }
            let input = simd::Rows::on(path, xa);
            let rows_b = |dst: &mut [f32], add: bool| simd::matvec(*b, *r, local.clone(), &input, None, dst, add);
            // SAFETY: as above (this thread claimed these rows, and no other slice of them is alive).
            unsafe { out.with_rows(local.clone(), &mut tmp, true, rows_b) };
        }
        true
    };
    let ok = if threads <= 1 {
        work(true)
    } else {
        let (mut ok_a, mut ok_b) = (false, false);
        let joined = helper::join(|| ok_a = work(true), || ok_b = work(false));
        joined && ok_a && ok_b
    };
    if !ok {
        return Err(crate::error::ModelError::InvalidArgument("decode kernel helper thread failed".into()));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::runtime::PARALLEL_MIN;
    use crate::kernels::{decode_scope, enabled};

    fn randn(shape: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        a.to_kind(Kind::Float).f_sub(&b.to_kind(Kind::Float)).unwrap().abs().max().double_value(&[])
    }

    /// The fused call equals libtorch's `linear` + the unfused LoRA update, for f32 and bf16, with bias, for one
    /// and several rows, and declines what it does not handle.
    #[test]
    fn fused_linear_matches_libtorch() {
        let _g = tch::no_grad_guard();
        if !enabled() {
            eprintln!("skipped: CPU without AVX2/FMA or kernels switched off");
            return;
        }
        // The second shape is large enough to be split over threads (when libtorch has more than one).
        // r = 8 and 16 take the narrow kernel for B (bf16: 8 and 16 columns per load).
        for (n_in, n_out, r) in [(72, 40, 3), (256, 301, 5), (96, 24, 8), (256, 301, 16), (256, 301, 1)] {
            check_shape(n_in, n_out, r);
        }
        // Inside a decode scope the large shape is split between this thread and the helper; same results, and
        // libtorch's thread count comes back afterwards.
        let before = tch::get_num_threads();
        {
            let _scope = decode_scope();
            if before > 1 {
                assert_eq!(tch::get_num_threads(), 1);
                assert_eq!(threads_for(256 * 301), 2);
            }
            check_shape(256, 301, 5);
            check_shape(256, 301, 16);
            check_shape(256, 301, 1);
            check_shared_input();
        }
        assert_eq!(tch::get_num_threads(), before);
        assert_eq!(threads_for(256 * 301), 1);
    }

    /// Several projections of one input in one call (as q, k and v are): each output equals its own libtorch
    /// product, whichever thread computed which of its rows.
    fn check_shared_input() {
        let n_in = 256;
        let shapes = [(301i64, Some(16i64), true), (77, None, true), (160, Some(8), false)];
        type Part = (Tensor, Option<Tensor>, Option<(Tensor, Tensor)>);
        let parts: Vec<Part> = shapes
            .iter()
            .enumerate()
            .map(|(k, &(n_out, r, bias))| {
                let seed = 20 + 4 * k as i64;
                let lora = r.map(|r| (randn(&[r, n_in], seed + 1), randn(&[n_out, r], seed + 2)));
                (randn(&[n_out, n_in], seed), bias.then(|| randn(&[n_out], seed + 3)), lora)
            })
            .collect();
        for rows in [1i64, 3] {
            let x = randn(&[rows, n_in], 40 + rows);
            let xv = Vec::<f32>::try_from(x.view([-1])).unwrap();
            let xs: Vec<&[f32]> = xv.chunks_exact(n_in as usize).collect();
            let lins: Vec<Linear<'_>> = parts
                .iter()
                .map(|(w, b, l)| Linear {
                    weight: w,
                    bias: b.as_ref(),
                    lora: l.as_ref().map(|(a, b)| LoraPart { a, b, scaling: 0.5 }),
                })
                .collect();
            let mut outs: Vec<Vec<f32>> = shapes.iter().map(|s| vec![f32::NAN; (rows * s.0) as usize]).collect();
            let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            assert!(linear_rows(&lins, &xs, &mut refs).unwrap());
            for ((w, b, l), out) in parts.iter().zip(&outs) {
                let mut want = x.linear(w, b.as_ref());
                if let Some((a, bb)) = l {
                    want += x.linear::<Tensor>(a, None).linear::<Tensor>(bb, None) * 0.5;
                }
                let got = Tensor::from_slice(out).view(want.size().as_slice());
                assert!(max_diff(&got, &want) < 1e-4, "{rows} rows: {}", max_diff(&got, &want));
            }
        }
    }

    /// Every instruction-set path this CPU has, through the public [`linear_on`], against libtorch: f32 and bf16
    /// weights, with and without the fused LoRA part (and a bias in f32), widths that are not multiples of 16, 32
    /// or 64, 1..=16 activation rows. bf16 is held to the exact value of the bf16 inputs (f64) within one final
    /// rounding, and without LoRA to libtorch's own bf16 matmul (f32 accumulation) within one bf16 ulp.
    #[test]
    fn every_path_matches_libtorch() {
        let _g = tch::no_grad_guard();
        for path in SimdPath::ALL {
            if !path.supported() {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "skipped: SIMD path {path} (this CPU lacks it)");
                continue;
            }
            for (n_in, n_out, r) in [(37i64, 29i64, 3i64), (96, 40, 8), (200, 77, 16), (131, 33, 4), (576, 65, 5)] {
                check_path(path, n_in, n_out, r);
            }
        }
        assert!(linear_on(SimdPath::Scalar, &randn(&[2, 3], 1), &randn(&[4, 5], 2), None, None).is_err());
    }

    fn check_path(path: SimdPath, n_in: i64, n_out: i64, r: i64) {
        let f64s = |t: &Tensor| t.to_kind(Kind::Double);
        let w = randn(&[n_out, n_in], 11);
        let bias = randn(&[n_out], 12);
        let a = randn(&[r, n_in], 13);
        let b = randn(&[n_out, r], 14);
        let scaling = 0.625;
        for rows in 1..=16i64 {
            let x = randn(&[rows, n_in], 100 + rows);
            for with_lora in [false, true] {
                let lora = with_lora.then_some((&a, &b, scaling));
                // f32, with a bias.
                let got = linear_on(path, &x, &w, Some(&bias), lora).unwrap();
                let mut want = x.linear(&w, Some(&bias));
                if with_lora {
                    want += x.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None) * scaling;
                }
                let scale = f64s(&x).abs().matmul(&f64s(&w).abs().tr()).max().double_value(&[]).max(1.0);
                let d = max_diff(&got, &want);
                assert!(d <= 1e-5 * scale, "{path} f32 {n_in}x{n_out} r{r} lora {with_lora}, {rows} rows: {d}");

                // bf16, against the exact value of the bf16 inputs.
                let bf = |t: &Tensor| t.to_kind(Kind::BFloat16);
                let (xb, wb, ab, bb) = (bf(&x), bf(&w), bf(&a), bf(&b));
                let lora = with_lora.then_some((&ab, &bb, scaling));
                let got = linear_on(path, &xb, &wb, None, lora).unwrap();
                assert_eq!(got.kind(), Kind::BFloat16);
                let got = f64s(&got);
                let mut exact = f64s(&xb).matmul(&f64s(&wb).tr());
                let mut mag = f64s(&xb).abs().matmul(&f64s(&wb).abs().tr());
                let mut lora_mag = Tensor::zeros_like(&mag);
                if with_lora {
                    let xa = f64s(&xb).matmul(&f64s(&ab).tr()) * scaling;
                    exact += xa.matmul(&f64s(&bb).tr());
                    lora_mag = xa.abs().matmul(&f64s(&bb).abs().tr());
                    mag += &lora_mag;
                }
                // One rounding to bf16 (half an ulp, 2^-9 relative; 2^-8 allowed), f32 accumulation (1e-5 of the
                // sum of magnitudes), and on the AVX512-BF16 path the low-rank input rounded to bf16 before B
                // when B is not narrow (2^-9 of the LoRA part's magnitude; 2^-8 allowed).
                let mut tol = exact.abs() / 256.0 + &mag * 1e-5;
                if path == SimdPath::Avx512Bf16 {
                    tol += lora_mag / 256.0;
                }
                let over = ((&got - &exact).abs() - &tol).max().double_value(&[]);
                assert!(over <= 0.0, "{path} bf16 {n_in}x{n_out} r{r} lora {with_lora}, {rows} rows: over by {over}");
                if !with_lora {
                    // libtorch's bf16 matmul: f32 accumulation of the same exact products, then one rounding; the
                    // two results may round to neighbouring bf16 values.
                    let libtorch = f64s(&xb.linear::<Tensor>(&wb, None));
                    let ulp_tol = libtorch.abs() / 128.0 + &mag * 1e-5;
                    let over = ((&got - &libtorch).abs() - ulp_tol).max().double_value(&[]);
                    assert!(over <= 0.0, "{path} bf16 vs libtorch {n_in}x{n_out}, {rows} rows: over by {over}");
                }
            }
        }
    }

    fn check_shape(n_in: i64, n_out: i64, r: i64) {
        let w = randn(&[n_out, n_in], 1);
        let bias = randn(&[n_out], 2);
        let a = randn(&[r, n_in], 3);
        let b = randn(&[n_out, r], 4);
        let scaling = 0.75;
        for rows in [1i64, 3, MAX_ROWS] {
            let x = randn(&[rows, 1, n_in], 5 + rows);
            let reference = x
                .linear(&w, Some(&bias))
                .f_add(&x.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None).f_mul_scalar(scaling).unwrap())
                .unwrap();
            let part = LoraPart { a: &a, b: &b, scaling };
            let got = small_linear(&x, &w, Some(&bias), Some(part)).unwrap().expect("f32 is handled");
            assert_eq!(got.size(), reference.size());
            assert!(max_diff(&got, &reference) < 1e-4, "f32, {rows} rows: {}", max_diff(&got, &reference));

            let bf = |t: &Tensor| t.to_kind(Kind::BFloat16);
            let (xb, wb, ab, bb) = (bf(&x), bf(&w), bf(&a), bf(&b));
            let exact = xb.to_kind(Kind::Float).linear::<Tensor>(&wb.to_kind(Kind::Float), None).f_add(
                &xb.to_kind(Kind::Float)
                    .linear::<Tensor>(&ab.to_kind(Kind::Float), None)
                    .linear::<Tensor>(&bb.to_kind(Kind::Float), None)
                    .f_mul_scalar(scaling)
                    .unwrap(),
            );
            let part = LoraPart { a: &ab, b: &bb, scaling };
            let got = small_linear(&xb, &wb, None, Some(part)).unwrap().expect("bf16 is handled");
            assert_eq!(got.kind(), Kind::BFloat16);
            // One bf16 rounding of values of magnitude ~10: within 2^-8 relative.
            let exact = exact.unwrap();
            let tol = exact.abs().max().double_value(&[]) / 128.0;
            assert!(max_diff(&got, &exact) < tol, "bf16, {rows} rows: {}", max_diff(&got, &exact));
        }
        if n_out * n_in >= PARALLEL_MIN as i64 {
            return;
        }
        let many = randn(&[MAX_ROWS + 1, n_in], 9);
        assert!(small_linear(&many, &w, None, None).unwrap().is_none(), "large batches go to libtorch");
        let half = randn(&[1, n_in], 9).to_kind(Kind::Half);
        assert!(small_linear(&half, &w.to_kind(Kind::Half), None, None).unwrap().is_none());
        let grad = randn(&[1, n_in], 9).set_requires_grad(true);
        assert!(small_linear(&grad, &w, None, None).unwrap().is_none(), "autograd goes to libtorch");
    }
}
