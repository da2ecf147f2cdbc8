//! Small-batch CPU matrix–vector products for decoding, with the LoRA update fused in.
//!
//! A decode step multiplies one (or a few) activation rows by every weight matrix of the model, so its speed is
//! set by how fast the weights stream from memory. libtorch hands these products to its BLAS, whose generic
//! `gemv` path reaches about half of this machine's memory bandwidth on AMD CPUs and converts bf16 weights in a
//! slow loop. The kernels here read each weight row once for all activation rows, accumulate in f32 with AVX2/FMA,
//! and add `scaling · B (A x)` in the same pass, so an unmerged LoRA projection costs one call instead of five
//! libtorch ops.
//!
//! Used only where it is exact to do so: CPU, f32 or bf16 contiguous weights, at most [`MAX_ROWS`] activation
//! rows, no autograd, and a CPU with AVX2 and FMA. Everything else (prefill, training, CUDA, other dtypes) goes to
//! libtorch. Results equal libtorch's up to the order of summation (f32) and one final rounding instead of three
//! (bf16: libtorch rounds the base output, the LoRA output and their sum; here only the sum is rounded). Set
//! `LORA_BOUNDARY_KERNELS=off` to route everything to libtorch (for comparisons).
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Largest number of activation rows (batch × new tokens) the kernels take; more go to libtorch's GEMM.
pub const MAX_ROWS: i64 = 8;

/// 0 = not decided yet, 1 = on, 2 = off.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Whether the fused kernels are used: the CPU has AVX2 and FMA, the environment does not say
/// `LORA_BOUNDARY_KERNELS=off`, and [`set_enabled`] did not switch them off.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var("LORA_BOUNDARY_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("off") || v == "0");
            let on = !off && simd::available();
            STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Switches the fused kernels on or off for the whole process (for side-by-side measurements against libtorch).
/// Switching on has no effect on a CPU without AVX2 and FMA. Returns whether they are now used.
pub fn set_enabled(on: bool) -> bool {
    let on = on && simd::available();
    STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    on
}

/// Weight elements below which a product runs on one thread (splitting costs more than it saves).
const PARALLEL_MIN: usize = 1 << 16;

/// Threads the kernels use now: 1, or 2 inside a [`decode_scope`].
static KERNEL_THREADS: AtomicUsize = AtomicUsize::new(1);

/// How many threads a product over `elements` weights uses (one for small products).
fn threads_for(elements: usize) -> usize {
    if elements < PARALLEL_MIN {
        1
    } else {
        KERNEL_THREADS.load(Ordering::Relaxed)
    }
}

/// While alive, decode-sized products run on two threads (this one and a spinning helper) and libtorch's own
/// intra-op pool is set to one thread; dropping it restores libtorch's thread count.
///
/// Why: a decode step is a few hundred products of tens of microseconds. libtorch's OpenMP workers and the
/// helper both spin between jobs, so with both pools active the two cores are oversubscribed and decoding runs
/// several times slower; with libtorch on one thread and the products split in two, batch-1 decode is about
/// 1.5× faster than libtorch's two threads on the project's 2-core machine (`docs/performance.md`). The thread
/// count of libtorch is process-wide: other threads running libtorch ops meanwhile also get one thread.
/// [`generate()`](crate::generate()) opens a scope around its decode loop; open one yourself around hand-written decode loops.
/// A no-op when the kernels are off, libtorch has one thread already (e.g. `OMP_NUM_THREADS=1`), or a scope is
/// already open.
#[must_use = "the scope ends when dropped"]
#[derive(Debug)]
pub struct DecodeScope {
    restore: Option<i32>,
}

/// Opens a [`DecodeScope`].
pub fn decode_scope() -> DecodeScope {
    let torch = tch::get_num_threads();
    if !enabled() || torch <= 1 {
        return DecodeScope { restore: None };
    }
    if KERNEL_THREADS.compare_exchange(1, 2, Ordering::AcqRel, Ordering::Relaxed).is_err() {
        return DecodeScope { restore: None };
    }
    tch::set_num_threads(1);
    DecodeScope { restore: Some(torch) }
}

impl Drop for DecodeScope {
    fn drop(&mut self) {
        if let Some(n) = self.restore.take() {
            tch::set_num_threads(n);
            KERNEL_THREADS.store(1, Ordering::Relaxed);
        }
    }
}

mod helper {
    //! One long-lived helper thread that takes half of a split product. A decode step makes a few hundred
    //! products of a few tens of microseconds each; waking a sleeping pool thread for each costs about as much as
    //! the product, so the helper spins for a short while after each job before it parks.
    use std::cell::UnsafeCell;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};
    use std::thread::Thread;

    /// Spin iterations (`spin_loop` hints) before the helper parks: a few hundred microseconds.
    const SPIN: u32 = 100_000;

    type Job = (*mut (), unsafe fn(*mut ()));

    struct Helper {
        posted: AtomicU64,
        done: AtomicU64,
        failed: AtomicBool,
        job: UnsafeCell<Option<Job>>,
        thread: OnceLock<Thread>,
        busy: Mutex<()>,
    }

    // SAFETY: `job` is written only by the thread holding `busy`, before it publishes the job with a release
    // store to `posted`; the helper reads it only after the matching acquire load, and the writer does not touch
    // it again until the helper has released `done`.
    unsafe impl Sync for Helper {}

    fn get() -> Option<&'static Helper> {
        static HELPER: OnceLock<Option<&'static Helper>> = OnceLock::new();
        *HELPER.get_or_init(|| {
            let h: &'static Helper = Box::leak(Box::new(Helper {
                posted: AtomicU64::new(0),
                done: AtomicU64::new(0),
                failed: AtomicBool::new(false),
                job: UnsafeCell::new(None),
                thread: OnceLock::new(),
                busy: Mutex::new(()),
            }));
            let spawned = std::thread::Builder::new().name("lora-kernel-helper".into()).spawn(move || run(h)).ok()?;
            h.thread.set(spawned.thread().clone()).ok()?;
            Some(h)
        })
    }

    fn run(h: &'static Helper) {
        let mut seen = 0u64;
        loop {
            let mut spins = 0u32;
            loop {
                let p = h.posted.load(Ordering::Acquire);
                if p != seen {
                    seen = p;
                    break;
                }
                if spins < SPIN {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::park();
                    spins = 0;
                }
            }
            // SAFETY: see `impl Sync for Helper`; the poster keeps the job's data alive until `done` says so.
            if let Some((data, call)) = unsafe { (*h.job.get()).take() } {
                let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { call(data) })).is_ok();
                if !ok {
                    h.failed.store(true, Ordering::Relaxed);
                }
            }
            h.done.store(seen, Ordering::Release);
        }
    }

    unsafe fn call_once<B: FnOnce()>(p: *mut ()) {
        // SAFETY: `p` points at the poster's `Option<B>`, alive until the poster has seen `done`.
        if let Some(f) = unsafe { (*(p as *mut Option<B>)).take() } {
            f()
        }
    }

    /// Runs `a` on this thread and `b` on the helper thread, and returns when both are done; both run here when
    /// the helper is busy with another caller or could not be started. Returns false if `b` panicked.
    pub fn join<A: FnOnce(), B: FnOnce() + Send>(a: A, b: B) -> bool {
        let guard = get().and_then(|h| h.busy.try_lock().ok().map(|g| (h, g)));
        let Some((h, _guard)) = guard else {
            a();
            b();
            return true;
        };
        let mut slot = Some(b);
        // SAFETY: the helper only reads `job` after the release store below, and `slot` outlives the wait.
        unsafe { *h.job.get() = Some((&mut slot as *mut Option<B> as *mut (), call_once::<B>)) };
        let seq = h.posted.load(Ordering::Relaxed) + 1;
        h.failed.store(false, Ordering::Relaxed);
        h.posted.store(seq, Ordering::Release);
        if let Some(t) = h.thread.get() {
            t.unpark();
        }
        // `b` may borrow from this frame: even if `a` panics, wait for the helper before unwinding past it.
        let a_result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(a));
        let mut spins = 0u32;
        while h.done.load(Ordering::Acquire) != seq {
            spins += 1;
            if spins < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(panic) = a_result {
            std::panic::resume_unwind(panic);
        }
        !h.failed.load(Ordering::Relaxed)
    }
}

pub(crate) mod pool {
    //! Reusable `f32` buffers, one free list per thread. A decode step asks for a few hundred short-lived
    //! buffers (inputs in bf16 column order, the low-rank inputs `A x`, attention scores); taking them from
    //! here instead of the allocator keeps glibc's bins (and its consolidation of freed chunks) out of the step.
    use std::cell::RefCell;

    /// Buffers kept per thread at most.
    const KEEP: usize = 32;

    thread_local! {
        static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    }

    /// A buffer of `len` values (contents unspecified) that goes back to the current thread's free list when
    /// dropped.
    #[derive(Debug, Default)]
    pub(crate) struct Buf {
        v: Vec<f32>,
        len: usize,
    }

    /// A buffer of `len` values, reused if this thread has one large enough. Its values are whatever the
    /// previous user left (or 0).
    pub(crate) fn take(len: usize) -> Buf {
        let reused = FREE.with(|f| {
            let mut f = f.try_borrow_mut().ok()?;
            let at = f.iter().position(|v| v.len() >= len)?;
            Some(f.swap_remove(at))
        });
        let mut v = reused.unwrap_or_default();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        Buf { v, len }
    }

    impl Drop for Buf {
        fn drop(&mut self) {
            let v = std::mem::take(&mut self.v);
            if v.is_empty() {
                return;
            }
            // `try_with`: during thread teardown the list may be gone already; the buffer is then just freed.
            let _ = FREE.try_with(|f| {
                if let Ok(mut f) = f.try_borrow_mut() {
                    if f.len() < KEEP {
                        f.push(v);
                    }
                }
            });
        }
    }

    impl std::ops::Deref for Buf {
        type Target = [f32];
        fn deref(&self) -> &[f32] {
            &self.v[..self.len]
        }
    }

    impl std::ops::DerefMut for Buf {
        fn deref_mut(&mut self) -> &mut [f32] {
            &mut self.v[..self.len]
        }
    }
}

/// The low-rank part of a fused call: `scaling · B (A x)`.
pub(crate) struct LoraPart<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f64,
}

/// Borrowed f32 or bf16 values of a contiguous CPU tensor (a weight matrix is row-major `[rows, cols]`).
#[derive(Clone, Copy)]
pub(crate) enum Mat<'a> {
    F32(&'a [f32]),
    /// bf16 as raw bits.
    Bf16(&'a [u16]),
}

impl<'a> Mat<'a> {
    /// Number of values.
    pub(crate) fn len(&self) -> usize {
        match self {
            Mat::F32(v) => v.len(),
            Mat::Bf16(v) => v.len(),
        }
    }

    /// Value `i` as f32.
    #[inline(always)]
    pub(crate) fn get(&self, i: usize) -> f32 {
        match self {
            Mat::F32(v) => v[i],
            Mat::Bf16(v) => f32::from_bits(u32::from(v[i]) << 16),
        }
    }

    /// Bytes one value takes in memory.
    pub(crate) fn value_bytes(&self) -> usize {
        match self {
            Mat::F32(_) => 4,
            Mat::Bf16(_) => 2,
        }
    }

    /// Values `range` as a shorter borrow.
    pub(crate) fn slice(&self, range: std::ops::Range<usize>) -> Mat<'a> {
        match *self {
            Mat::F32(v) => Mat::F32(&v[range]),
            Mat::Bf16(v) => Mat::Bf16(&v[range]),
        }
    }

    /// Values `start..start + out.len()` as f32 into `out`.
    pub(crate) fn read_into(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Mat::F32(v) => out.copy_from_slice(&v[start..start + n]),
            Mat::Bf16(v) => {
                for (o, &b) in out.iter_mut().zip(&v[start..start + n]) {
                    *o = f32::from_bits(u32::from(b) << 16);
                }
            }
        }
    }
}

/// f32 → bf16 bits, rounding to nearest even (as libtorch converts).
#[inline]
pub(crate) fn to_bf16(v: f32) -> u16 {
    if v.is_nan() {
        return 0x7FC0;
    }
    let bits = v.to_bits();
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// Mutably borrowed f32 or bf16 values of a contiguous CPU tensor.
pub(crate) enum MatMut<'a> {
    F32(&'a mut [f32]),
    /// bf16 as raw bits.
    Bf16(&'a mut [u16]),
}

impl MatMut<'_> {
    /// Writes `src` at element offset `at` (rounded to nearest-even bf16 for a bf16 tensor), or returns `false`
    /// (writing nothing) when it does not fit.
    pub(crate) fn write(&mut self, at: usize, src: &[f32]) -> bool {
        let Some(end) = at.checked_add(src.len()) else { return false };
        match self {
            MatMut::F32(d) => match d.get_mut(at..end) {
                Some(dst) => dst.copy_from_slice(src),
                None => return false,
            },
            MatMut::Bf16(d) => match d.get_mut(at..end) {
                Some(dst) => {
                    for (o, &v) in dst.iter_mut().zip(src) {
                        *o = to_bf16(v);
                    }
                }
                None => return false,
            },
        }
        true
    }
}

/// Mutably borrows a contiguous CPU tensor of kind f32 or bf16 without autograd, or `None` if it is not one.
///
/// # Safety
/// The slice aliases the tensor's storage, which libtorch may share between several `Tensor` handles (views,
/// shallow clones). The `&mut Tensor` makes this handle exclusive in Rust; the caller must also guarantee that
/// no other handle to the same storage is read or written, by any thread, while the slice lives.
pub(crate) unsafe fn borrow_mut(t: &mut Tensor) -> Option<MatMut<'_>> {
    let n = usize::try_from(t.size().iter().product::<i64>()).ok()?;
    if t.device() != Device::Cpu || !t.is_contiguous() || t.requires_grad() || n == 0 {
        return None;
    }
    let ptr = t.data_ptr();
    if ptr.is_null() {
        return None;
    }
    match t.kind() {
        Kind::Float => Some(MatMut::F32(std::slice::from_raw_parts_mut(ptr as *mut f32, n))),
        Kind::BFloat16 => Some(MatMut::Bf16(std::slice::from_raw_parts_mut(ptr as *mut u16, n))),
        _ => None,
    }
}

/// Borrows a contiguous CPU tensor of kind f32 or bf16 without autograd (any shape), or `None` if it is not one.
///
/// # Safety
/// The returned slice aliases the tensor's storage; the tensor must outlive it and must not be written meanwhile
/// except through this borrow by its only user.
pub(crate) unsafe fn borrow(t: &Tensor) -> Option<Mat<'_>> {
    let n = usize::try_from(t.size().iter().product::<i64>()).ok()?;
    borrow_n(t, n)
}

/// The values of a contiguous f32 CPU tensor without autograd, for writing.
///
/// # Safety
/// Nothing else may read or write the tensor's storage while the slice lives (e.g. a tensor just created by the
/// caller, with no other handle or view).
pub(crate) unsafe fn borrow_f32_mut(t: &mut Tensor) -> Option<&mut [f32]> {
    let n = match borrow(t)? {
        Mat::F32(v) => v.len(),
        Mat::Bf16(_) => return None,
    };
    Some(std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n))
}

/// [`borrow`] for a tensor known to hold `n` values (saves asking libtorch for its shape again).
///
/// # Safety
/// As for [`borrow`], and `n` must be the tensor's number of elements.
unsafe fn borrow_n(t: &Tensor, n: usize) -> Option<Mat<'_>> {
    if t.device() != Device::Cpu || !t.is_contiguous() || t.requires_grad() {
        return None;
    }
    let ptr = t.data_ptr();
    if n == 0 || ptr.is_null() {
        return None;
    }
    match t.kind() {
        Kind::Float => Some(Mat::F32(std::slice::from_raw_parts(ptr as *const f32, n))),
        Kind::BFloat16 => Some(Mat::Bf16(std::slice::from_raw_parts(ptr as *const u16, n))),
        _ => None,
    }
}

/// [`borrow`] for a 2-D tensor, with its `(rows, cols)`.
///
/// # Safety
/// As for [`borrow`].
unsafe fn borrow_mat(t: &Tensor) -> Option<(Mat<'_>, usize, usize)> {
    let [rows, cols] = t.size()[..] else { return None };
    let (rows, cols) = (usize::try_from(rows).ok()?, usize::try_from(cols).ok()?);
    Some((borrow_n(t, rows.checked_mul(cols)?)?, rows, cols))
}

/// `x Wᵀ + bias (+ scaling · (x Aᵀ) Bᵀ)` for a small `x` `[..., in]`, or `Ok(None)` when the kernels do not
/// apply and the caller should use libtorch.
pub(crate) fn small_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<LoraPart<'_>>,
) -> Result<Option<Tensor>> {
    if !enabled() || x.device() != Device::Cpu || x.requires_grad() {
        return Ok(None);
    }
    let kind = weight.kind();
    if x.kind() != kind || !matches!(kind, Kind::Float | Kind::BFloat16) {
        return Ok(None);
    }
    let xs = x.size();
    let Some(&n_in) = xs.last() else { return Ok(None) };
    let m = if n_in > 0 { x.numel() as i64 / n_in } else { 0 };
    if m == 0 || m > MAX_ROWS {
        return Ok(None);
    }
    let xf = x.f_to_kind(Kind::Float)?.f_contiguous()?;
    let xv = Vec::<f32>::try_from(xf.f_view([-1])?)?;
    let rows: Vec<&[f32]> = xv.chunks_exact(n_in as usize).collect();
    let n_out = weight.size().first().copied().unwrap_or(0).max(0) as usize;
    let mut y = vec![0f32; rows.len() * n_out];
    if !linear_rows(&[Linear { weight, bias, lora }], &rows, &mut [&mut y])? {
        return Ok(None);
    }
    let mut shape = xs;
    if let Some(last) = shape.last_mut() {
        *last = n_out as i64;
    }
    let out = Tensor::from_slice(&y).f_view(shape.as_slice())?;
    Ok(Some(if kind == Kind::Float { out } else { out.f_to_kind(kind)? }))
}

/// The scaled low-rank inputs `scaling · A x` of a [`linear_rows`] call's LoRAs. The front thread computes them
/// before it takes its first chunk of W (the back thread meanwhile streams W from the other end, so the short A
/// matrices cost their bytes and no waiting); both threads read them when they add B's rows.
struct LowRank {
    /// 0 pending, 1 ready, 2 the computing thread failed.
    state: AtomicU8,
    /// Per projection, `[activation rows, r]` (`None` without LoRA); written only by the front thread, before
    /// its release store of 1, and read only after an acquire load has seen it.
    bufs: std::cell::UnsafeCell<Vec<Option<pool::Buf>>>,
}

// SAFETY: see `bufs`.
unsafe impl Sync for LowRank {}

impl LowRank {
    fn new() -> Self {
        LowRank { state: AtomicU8::new(0), bufs: std::cell::UnsafeCell::new(Vec::new()) }
    }

    /// Computes every projection's `scaling · A x` (the front thread, once).
    fn compute(&self, prepared: &[Prepared<'_>], w_in: usize, xs: &simd::Rows<'_>) {
        // Marks the inputs ready, or failed if a product panics, so that a waiting thread never spins forever.
        struct Done<'a>(&'a AtomicU8);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(if std::thread::panicking() { 2 } else { 1 }, Ordering::Release);
            }
        }
        let _done = Done(&self.state);
        let m = xs.xs.len();
        // SAFETY: only this (front) thread writes `bufs`, and nobody reads it before the store of 1.
        let bufs = unsafe { &mut *self.bufs.get() };
        for p in prepared {
            bufs.push(p.lora.as_ref().map(|&(a, _, r, scaling)| {
                let mut xa = pool::take(m * r);
                simd::matvec(a, w_in, 0..r, xs, &mut xa, false);
                for v in xa.iter_mut() {
                    *v *= scaling;
                }
                xa
            }));
        }
    }

    /// The inputs once they are ready, or `None` if computing them failed.
    fn wait(&self) -> Option<&[Option<pool::Buf>]> {
        loop {
            match self.state.load(Ordering::Acquire) {
                // SAFETY: the front thread finished writing before its release store of 1.
                1 => return Some(unsafe { &*self.bufs.get() }),
                2 => return None,
                _ => std::hint::spin_loop(),
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

/// A [`Linear`] borrowed for the kernels.
struct Prepared<'a> {
    w: Mat<'a>,
    n_out: usize,
    /// `A`, `B`, r and scaling.
    lora: Option<(Mat<'a>, Mat<'a>, usize, f32)>,
    bias: Option<Vec<f32>>,
}

/// Hands out the output rows of a [`linear_rows`] call (all its projections' rows, one after another) in
/// contiguous chunks to two threads: the front thread takes chunks from the start, the back thread from the end,
/// each chunk a quarter of what is left (at least `min` rows), so that both threads stream long runs of weight
/// rows and finish within one small chunk of each other whatever else slows one of them down.
struct Chunks {
    /// The unclaimed rows `lo..hi`: `lo` in the low 32 bits, `hi` in the high 32.
    left: AtomicU64,
    min: usize,
}

impl Chunks {
    fn new(total: usize, min: usize) -> Self {
        Chunks { left: AtomicU64::new((total as u64) << 32), min: min.max(1) }
    }

    /// The next chunk for the front (or back) thread, or `None` when every row is taken.
    fn claim(&self, front: bool) -> Option<std::ops::Range<usize>> {
        let mut cur = self.left.load(Ordering::Relaxed);
        loop {
            let (lo, hi) = ((cur & 0xFFFF_FFFF) as usize, (cur >> 32) as usize);
            if lo >= hi {
                return None;
            }
            let rest = hi - lo;
            let size = if rest <= 2 * self.min { rest } else { (rest / 4).max(self.min).next_multiple_of(self.min) };
            let (range, next) = if front { (lo..lo + size, (lo + size, hi)) } else { (hi - size..hi, (lo, hi - size)) };
            let packed = ((next.1 as u64) << 32) | next.0 as u64;
            match self.left.compare_exchange_weak(cur, packed, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(range),
                Err(now) => cur = now,
            }
        }
    }
}

/// An output buffer `[m, n_out]` that both threads of a split product write, each into the output rows (columns
/// of this buffer) of the chunks it claimed.
struct Out {
    ptr: *mut f32,
    n_out: usize,
    m: usize,
}

// SAFETY: the two threads write disjoint output rows (every chunk of a `Chunks` goes to one thread), and the
// buffer outlives both (`linear_rows` returns only after both are done).
unsafe impl Sync for Out {}

impl Out {
    /// Writes `vals` (`[m, rows.len()]`) into output rows `rows`, or adds them to what is there when `add`.
    ///
    /// # Safety
    /// No other thread may touch output rows `rows` meanwhile, and `rows.end ≤ n_out`.
    unsafe fn put(&self, rows: std::ops::Range<usize>, vals: &[f32], add: bool) {
        let len = rows.len();
        for (row, src) in vals.chunks_exact(len).take(self.m).enumerate() {
            let dst = std::slice::from_raw_parts_mut(self.ptr.add(row * self.n_out + rows.start), len);
            if add {
                for (d, v) in dst.iter_mut().zip(src) {
                    *d += v;
                }
            } else {
                dst.copy_from_slice(src);
            }
        }
    }

    /// Output rows `rows` as one slice, possible when there is one activation row.
    ///
    /// # Safety
    /// As for [`Out::put`], and `m` must be 1.
    #[allow(clippy::mut_from_ref)] // the caller's claim on `rows` is what makes this borrow exclusive
    unsafe fn slice(&self, rows: std::ops::Range<usize>) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.ptr.add(rows.start), rows.len())
    }
}

/// Bytes of weights a chunk holds at least (the largest imbalance between the two threads of a split product).
const CHUNK_MIN_BYTES: usize = 16 << 10;

/// `ys[p] = x Wₚᵀ + biasₚ (+ scalingₚ · (x Aₚᵀ) Bₚᵀ)` for the activation rows `rows` (each `in` long) and every
/// projection `p` of `lins` (all reading the same input, e.g. q, k and v), into `ys[p]` (`[rows.len(), outₚ]`,
/// row-major). Inside a [`decode_scope`] the output rows of all projections are shared out between this thread
/// and the helper in chunks ([`Chunks`]), so several projections cost one hand-over instead of one each. Returns
/// `Ok(false)`, with `ys` untouched, when the kernels do not apply to one of the tensors (then the caller uses
/// libtorch).
pub(crate) fn linear_rows(lins: &[Linear<'_>], rows: &[&[f32]], ys: &mut [&mut [f32]]) -> Result<bool> {
    if !enabled() || rows.is_empty() || rows.len() > MAX_ROWS as usize || lins.len() != ys.len() {
        return Ok(false);
    }
    let m = rows.len();
    let w_in = rows[0].len();
    if rows.iter().any(|r| r.len() != w_in) {
        return Ok(false);
    }
    let mut prepared = Vec::with_capacity(lins.len());
    for (lin, y) in lins.iter().zip(ys.iter()) {
        // SAFETY: every borrowed tensor lives until the end of this function and nothing writes to it meanwhile.
        match unsafe { prepare(lin, w_in) }? {
            Some(p) if y.len() == m * p.n_out => prepared.push(p),
            _ => return Ok(false),
        }
    }
    let total: usize = prepared.iter().map(|p| p.n_out).sum();
    if u32::try_from(total).is_err() {
        return Ok(false); // `Chunks` counts rows in 32 bits
    }
    let threads = threads_for(total * w_in);
    let min = (CHUNK_MIN_BYTES / (w_in * prepared[0].w.value_bytes()).max(1)).next_multiple_of(8).max(8);
    let chunks = Chunks::new(total, min);
    let outs: Vec<Out> = ys.iter_mut().map(|y| Out { ptr: y.as_mut_ptr(), n_out: y.len() / m, m }).collect();
    let input = simd::Rows::new(rows);
    if matches!(prepared[0].w, Mat::Bf16(_)) {
        input.split(); // before the threads start (see `Rows`)
    }

    // The front thread first computes every LoRA's `scaling · A x` ([`LowRank`]). Then each thread takes chunks
    // of output rows until none are left and computes the rows of W (plus the bias) for them; last it adds B's
    // rows times the low-rank input to the rows it computed. B is prefetched at the start, so it arrives
    // alongside W's stream and is read from the cache.
    let low_rank = LowRank::new();
    let any_lora = prepared.iter().any(|p| p.lora.is_some());
    let work = |front: bool| -> bool {
        for p in &prepared {
            if let Some((_, b, r, _)) = &p.lora {
                let nominal = if front { 0..p.n_out / 2 } else { p.n_out / 2..p.n_out };
                simd::prefetch(*b, nominal.start * r..nominal.end * r);
            }
        }
        if front && any_lora {
            low_rank.compute(&prepared, w_in, &input);
        }
        // (projection, its output rows) of every piece this thread computed.
        let mut pieces: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        let mut tmp = Vec::new();
        while let Some(range) = chunks.claim(front) {
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
                // SAFETY: this thread claimed these output rows; no other thread touches them.
                let dst: &mut [f32] = if m == 1 {
                    unsafe { out.slice(local.clone()) }
                } else {
                    tmp.clear();
                    tmp.resize(m * len, 0.0);
                    &mut tmp
                };
                simd::matvec(p.w, w_in, local.clone(), &input, dst, false);
                if let Some(bias) = &p.bias {
                    for row in dst.chunks_exact_mut(len) {
                        for (v, b) in row.iter_mut().zip(&bias[local.clone()]) {
                            *v += b;
                        }
                    }
                }
                if m > 1 {
                    // SAFETY: as above.
                    unsafe { out.put(local.clone(), &tmp, false) };
                }
                if p.lora.is_some() {
                    // The chunks of one thread are adjacent: extend the last piece when this one continues it.
                    match pieces.iter_mut().find(|(pk, r)| *pk == k && (r.end == local.start || r.start == local.end)) {
                        Some((_, r)) => *r = r.start.min(local.start)..r.end.max(local.end),
                        None => pieces.push((k, local)),
                    }
                }
            }
        }
        if pieces.is_empty() {
            return true;
        }
        let Some(low) = low_rank.wait() else { return false };
        for (k, local) in pieces {
            let (p, out) = (&prepared[k], &outs[k]);
            let (Some((_, b, r, _)), Some(Some(xa))) = (&p.lora, low.get(k)) else { continue };
            let xa_rows: Vec<&[f32]> = xa.chunks_exact(*r).collect();
            let xa_rows = simd::Rows::new(&xa_rows);
            if m == 1 {
                // SAFETY: this thread computed these output rows; no other thread touches them.
                simd::matvec(*b, *r, local.clone(), &xa_rows, unsafe { out.slice(local) }, true);
            } else {
                tmp.clear();
                tmp.resize(m * local.len(), 0.0);
                simd::matvec(*b, *r, local.clone(), &xa_rows, &mut tmp, false);
                // SAFETY: as above.
                unsafe { out.put(local, &tmp, true) };
            }
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

/// Borrows one projection for [`linear_rows`] (`w_in` inputs), or `None` when the kernels do
/// not take it.
///
/// # Safety
/// The returned slices alias the tensors' storage: they must outlive it and not be written meanwhile.
unsafe fn prepare<'a>(lin: &Linear<'a>, w_in: usize) -> Result<Option<Prepared<'a>>> {
    let kind = lin.weight.kind();
    let Some((w, n_out, in_)) = borrow_mat(lin.weight) else { return Ok(None) };
    if in_ != w_in {
        return Ok(None);
    }
    let lora = match &lin.lora {
        Some(l) => {
            if l.a.kind() != kind || l.b.kind() != kind {
                return Ok(None);
            }
            let (Some((a, r, a_in)), Some((b, b_out, b_r))) = (borrow_mat(l.a), borrow_mat(l.b)) else {
                return Ok(None);
            };
            if a_in != w_in || b_out != n_out || b_r != r {
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
            Some(Vec::<f32>::try_from(&b)?)
        }
        None => None,
    };
    Ok(Some(Prepared { w, n_out, lora, bias }))
}

/// Decode steps that ran on the fused one-token path (see [`Llama::forward_cached`](crate::Llama::forward_cached)),
/// process-wide: for tests and diagnostics.
pub fn fused_decode_steps() -> u64 {
    FUSED_STEPS.load(Ordering::Relaxed)
}

pub(crate) static FUSED_STEPS: AtomicU64 = AtomicU64::new(0);

/// Dot product of `a` with the first `a.len()` values of `b` (f32, or bf16 widened; AVX2/FMA when available).
pub(crate) fn dot(a: &[f32], b: Mat<'_>) -> f32 {
    simd::dot(a, b)
}

/// `y[i] += alpha · x[i]` over the first `y.len()` values of `x` (f32, or bf16 widened).
pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: Mat<'_>) {
    simd::axpy(y, alpha, x)
}

/// `out[i] = (x[i] · scale) · w[i]`: the last step of an RMSNorm.
pub(crate) fn scale_mul(x: &[f32], scale: f32, w: Mat<'_>, out: &mut [f32]) {
    simd::scale_mul(x, scale, w, out)
}

/// SwiGLU in place: `gate[i] = silu(gate[i]) · up[i]` with `silu(g) = g / (1 + e^-g)`.
pub(crate) fn swiglu(gate: &mut [f32], up: &[f32]) {
    simd::swiglu(gate, up)
}

/// Runs `a` here and `b` on the kernels' helper thread inside a [`decode_scope`] (both here otherwise), and
/// returns when both are done; false if `b` panicked.
pub(crate) fn join<A: FnOnce(), B: FnOnce() + Send>(a: A, b: B) -> bool {
    if KERNEL_THREADS.load(Ordering::Relaxed) > 1 {
        helper::join(a, b)
    } else {
        a();
        b();
        true
    }
}

mod simd {
    //! The inner loops. `matvec` computes `y[m][o] = Σᵢ W[o][i] x[m][i]` for every activation row `m`, reading
    //! each weight row once for all rows; `matvec_add` adds instead of storing.
    use super::Mat;

    /// Whether the CPU has what the vector loops need.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Activation rows for [`matvec`], with their bf16 column order (each 16-column block split into its even and
    /// odd columns, see `x86::row_bf16`) made once and shared by every bf16 product over these rows (all
    /// projections of a call, both threads, `A x`). Whoever shares a `Rows` between threads should call
    /// [`Rows::split`] first: two threads making it at once queue on its lock.
    pub struct Rows<'a> {
        pub xs: &'a [&'a [f32]],
        split: std::sync::OnceLock<super::pool::Buf>,
    }

    impl<'a> Rows<'a> {
        pub fn new(xs: &'a [&'a [f32]]) -> Self {
            Rows { xs, split: std::sync::OnceLock::new() }
        }

        /// The rows (`[rows, n_in]`, flat) in bf16 column order (the columns past the last whole 16-column block
        /// as they are).
        pub fn split(&self) -> &[f32] {
            self.split.get_or_init(|| {
                let n = self.xs.first().map_or(0, |x| x.len());
                let mut p = super::pool::take(n * self.xs.len());
                for (row, x) in p.chunks_exact_mut(n.max(1)).zip(self.xs) {
                    row.copy_from_slice(x);
                    for (dst, src) in row.chunks_exact_mut(16).zip(x.chunks_exact(16)) {
                        for j in 0..8 {
                            dst[j] = src[2 * j];
                            dst[8 + j] = src[2 * j + 1];
                        }
                    }
                }
                p
            })
        }
    }

    /// Output rows `rows` of `W x` for every activation row `x` of `x`, into `y` laid out `[x.xs.len(), rows.len()]`
    /// (added to what `y` holds when `add`). `W` is `[*, n_in]` row-major.
    pub fn matvec(w: Mat<'_>, n_in: usize, rows: std::ops::Range<usize>, x: &Rows<'_>, y: &mut [f32], add: bool) {
        let xs = x.xs;
        let len = rows.len();
        let w = match w {
            Mat::F32(w) => Mat::F32(&w[rows.start * n_in..rows.end * n_in]),
            Mat::Bf16(w) => Mat::Bf16(&w[rows.start * n_in..rows.end * n_in]),
        };
        assert!(xs.iter().all(|x| x.len() == n_in) && y.len() == xs.len() * len, "matvec: shapes disagree");
        #[cfg(target_arch = "x86_64")]
        if available() {
            let split = || match w {
                Mat::Bf16(_) => x.split(),
                Mat::F32(_) => &[],
            };
            // SAFETY: AVX2 and FMA were just detected; `w` holds exactly `len` rows of `n_in`, every row of `xs`
            // (and of its split copy) has `n_in` values and `y` has `xs.len() * len` (asserted above), which bounds
            // every load and store.
            unsafe {
                if n_in.is_multiple_of(8) && n_in <= x86::NARROW_MAX {
                    x86::matvec_narrow(w, n_in, len, xs, split(), y, add);
                    return;
                }
                match w {
                    Mat::F32(w) => x86::matvec_f32(w, n_in, len, xs, y, add),
                    Mat::Bf16(w) => x86::matvec_bf16(w, n_in, len, xs, split(), y, add),
                }
            }
            return;
        }
        scalar(w, n_in, len, xs, y, add)
    }

    /// Asks for values `range` of `m` to be brought into the cache (a hint; nothing is read).
    pub fn prefetch(m: Mat<'_>, range: std::ops::Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        {
            let ptr = match m {
                Mat::F32(v) => v.as_ptr() as *const i8,
                Mat::Bf16(v) => v.as_ptr() as *const i8,
            };
            let size = m.value_bytes();
            let end = range.end.min(m.len()) * size;
            for at in (range.start * size..end).step_by(64) {
                // SAFETY: `at` lies inside `m`; a prefetch reads nothing and cannot fault.
                unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(ptr.add(at)) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (m, range);
    }

    /// `Σ a[i] b[i]` over `a.len()` values (`b` at least as long).
    pub fn dot(a: &[f32], b: Mat<'_>) -> f32 {
        assert!(b.len() >= a.len(), "dot: second operand too short");
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: AVX2 and FMA were just detected; `b` holds at least `a.len()` values (asserted).
            return unsafe { x86::dot(a, b) };
        }
        a.iter().enumerate().map(|(i, x)| x * b.get(i)).sum()
    }

    /// `y[i] += alpha · x[i]` over `y.len()` values (`x` at least as long).
    pub fn axpy(y: &mut [f32], alpha: f32, x: Mat<'_>) {
        assert!(x.len() >= y.len(), "axpy: second operand too short");
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: AVX2 and FMA were just detected; `x` holds at least `y.len()` values (asserted).
            unsafe { x86::axpy(y, alpha, x) };
            return;
        }
        for (i, a) in y.iter_mut().enumerate() {
            *a += alpha * x.get(i);
        }
    }

    /// `out[i] = (x[i] · scale) · w[i]`.
    pub fn scale_mul(x: &[f32], scale: f32, w: Mat<'_>, out: &mut [f32]) {
        assert!(w.len() >= x.len() && out.len() == x.len(), "scale_mul: shapes disagree");
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: AVX2 and FMA were just detected; the lengths were just checked.
            unsafe { x86::scale_mul(x, scale, w, out) };
            return;
        }
        for (i, (v, o)) in x.iter().zip(out.iter_mut()).enumerate() {
            *o = v * scale * w.get(i);
        }
    }

    /// `gate[i] = gate[i] / (1 + e^-gate[i]) · up[i]`.
    pub fn swiglu(gate: &mut [f32], up: &[f32]) {
        assert!(up.len() >= gate.len(), "swiglu: shapes disagree");
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: AVX2 and FMA were just detected; the lengths were just checked.
            unsafe { x86::swiglu(gate, up) };
            return;
        }
        for (g, u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }

    /// Portable reference loop.
    fn scalar(w: Mat<'_>, n_in: usize, n_out: usize, xs: &[&[f32]], y: &mut [f32], add: bool) {
        for o in 0..n_out {
            for (m, x) in xs.iter().enumerate() {
                let s: f32 = (0..n_in).map(|i| weight(w, o * n_in + i) * x[i]).sum();
                let dst = &mut y[m * n_out + o];
                *dst = if add { *dst + s } else { s };
            }
        }
    }

    #[inline(always)]
    fn weight(w: Mat<'_>, k: usize) -> f32 {
        match w {
            Mat::F32(w) => w[k],
            Mat::Bf16(w) => f32::from_bits(u32::from(w[k]) << 16),
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        /// How far ahead of the current column (in bytes of the same weight row, running on into the next
        /// rows) the row loops prefetch: 16 cache lines, the best distance measured on the 2-core Zen 1 machine
        /// (sequential streams of both dtypes reach the bandwidth of a plain sum; 8 or 24 lines lose 5-10 %).
        const AHEAD: usize = 1024;

        #[target_feature(enable = "avx2,fma")]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_hadd_ps(s, s);
            _mm_cvtss_f32(_mm_hadd_ps(s, s))
        }

        #[inline(always)]
        fn store(y: &mut [f32], k: usize, v: f32, add: bool) {
            if add {
                y[k] += v;
            } else {
                y[k] = v;
            }
        }

        /// `Σ a[i] b[i]` over `a.len()` values; `b` holds at least as many.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn dot(a: &[f32], b: super::Mat<'_>) -> f32 {
            let n = a.len();
            let end = n - n % 8;
            let pa = a.as_ptr();
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i < end {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load8(b, i), acc);
                i += 8;
            }
            hsum(acc) + (end..n).map(|k| a[k] * b.get(k)).sum::<f32>()
        }

        /// `y[i] += alpha · x[i]` over `y.len()` values; `x` holds at least as many.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn axpy(y: &mut [f32], alpha: f32, x: super::Mat<'_>) {
            let n = y.len();
            let end = n - n % 8;
            let py = y.as_mut_ptr();
            let av = _mm256_set1_ps(alpha);
            let mut i = 0;
            while i < end {
                let v = _mm256_fmadd_ps(av, load8(x, i), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), v);
                i += 8;
            }
            for (k, v) in y.iter_mut().enumerate().skip(end) {
                *v += alpha * x.get(k);
            }
        }

        /// `out[i] = (x[i] · scale) · w[i]` (the same two roundings as the scalar loop).
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn scale_mul(x: &[f32], scale: f32, w: super::Mat<'_>, out: &mut [f32]) {
            let n = x.len();
            let end = n - n % 8;
            let (px, po) = (x.as_ptr(), out.as_mut_ptr());
            let sv = _mm256_set1_ps(scale);
            let mut i = 0;
            while i < end {
                _mm256_storeu_ps(po.add(i), _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(px.add(i)), sv), load8(w, i)));
                i += 8;
            }
            for k in end..n {
                out[k] = x[k] * scale * w.get(k);
            }
        }

        /// `e^x` for eight values: Cephes' single-precision method (`x = n ln 2 + r`, a degree-6 polynomial in
        /// `r`, times `2^n`), within 2 ulp of `expf` over `[-87, 88]`; inputs are clamped to that range, so very
        /// negative inputs give ≈ 1e-38 instead of 0 (harmless next to the 1 that SiLU adds).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn exp8(x: __m256) -> __m256 {
            let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                x,
                _mm256_set1_ps(std::f32::consts::LOG2_E),
            ));
            // r = x - n ln 2, with ln 2 split in two so that n · (high part) is exact.
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm256_set1_ps(1.987_569_1e-4);
            for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
            let pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
            _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
        }

        /// `gate[i] = gate[i] / (1 + e^-gate[i]) · up[i]`; `up` holds at least `gate.len()` values.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
            let n = gate.len();
            let end = n - n % 8;
            let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
            let one = _mm256_set1_ps(1.0);
            let mut i = 0;
            while i < end {
                let g = _mm256_loadu_ps(pg.add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
                _mm256_storeu_ps(pg.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(pu.add(i))));
                i += 8;
            }
            for k in end..n {
                gate[k] = gate[k] / (1.0 + (-gate[k]).exp()) * up[k];
            }
        }

        /// Widest rows [`matvec_narrow`] takes.
        pub const NARROW_MAX: usize = 64;

        /// Eight f32 (or bf16, widened) weights at `w[k..k + 8]`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn load8(w: super::Mat<'_>, k: usize) -> __m256 {
            match w {
                super::Mat::F32(w) => _mm256_loadu_ps(w.as_ptr().add(k)),
                super::Mat::Bf16(w) => {
                    let h = _mm_loadu_si128(w.as_ptr().add(k) as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                }
            }
        }

        /// Prefetches the `len` bytes that lie [`AHEAD`] bytes past `block` (the next blocks of a narrow
        /// matrix, whose rows are too short for a per-row prefetch to run ahead of the loads).
        #[inline(always)]
        unsafe fn prefetch_block(block: *const i8, len: usize) {
            let ahead = block.wrapping_add(AHEAD);
            for l in (0..len).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l));
            }
        }

        /// The eight dot products in `acc` (one vector of partial sums per weight row) reduced together into
        /// one vector of eight sums (a transposing `hadd` tree), stored to (or added into) `dst[0..8]`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn finish8(acc: &[__m256; 8], dst: *mut f32, add: bool) {
            let s01 = _mm256_hadd_ps(acc[0], acc[1]);
            let s23 = _mm256_hadd_ps(acc[2], acc[3]);
            let s45 = _mm256_hadd_ps(acc[4], acc[5]);
            let s67 = _mm256_hadd_ps(acc[6], acc[7]);
            let s0123 = _mm256_hadd_ps(s01, s23);
            let s4567 = _mm256_hadd_ps(s45, s67);
            // Lane halves: low 128 bits hold rows 0-3 (then 4-7) of columns 0-3, high of columns 4-7.
            let lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
            let hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
            let mut sums = _mm256_add_ps(lo, hi);
            if add {
                sums = _mm256_add_ps(sums, _mm256_loadu_ps(dst));
            }
            _mm256_storeu_ps(dst, sums);
        }

        /// Narrow matrices (`n_in` a multiple of 8, at most [`NARROW_MAX`]: LoRA's `B`, `n_in` = r): eight
        /// weight rows at a time, their eight dot products reduced together by [`finish8`] instead of one
        /// horizontal sum per row, which would cost more than the row itself. bf16 rows whose width is a multiple
        /// of 16 take 16 columns per load (even and odd columns, as in [`row_bf16`]; `split` holds the rows in that
        /// order, and is only read then).
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn matvec_narrow(
            w: super::Mat<'_>,
            n_in: usize,
            n_out: usize,
            xs: &[&[f32]],
            split: &[f32],
            y: &mut [f32],
            add: bool,
        ) {
            let full = n_out - n_out % 8;
            let high = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
            for (m, x) in xs.iter().enumerate() {
                let xp = x.as_ptr();
                let dst = y.as_mut_ptr().add(m * n_out);
                match w {
                    super::Mat::F32(w) => {
                        let wp = w.as_ptr();
                        for o in (0..full).step_by(8) {
                            prefetch_block(wp.add(o * n_in) as *const i8, 32 * n_in);
                            let mut acc = [_mm256_setzero_ps(); 8];
                            for c in (0..n_in).step_by(8) {
                                let xv = _mm256_loadu_ps(xp.add(c));
                                for (r, a) in acc.iter_mut().enumerate() {
                                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add((o + r) * n_in + c)), xv, *a);
                                }
                            }
                            finish8(&acc, dst.add(o), add);
                        }
                    }
                    super::Mat::Bf16(w) if n_in.is_multiple_of(16) => {
                        let wp = w.as_ptr();
                        let sp = split[m * n_in..(m + 1) * n_in].as_ptr();
                        for o in (0..full).step_by(8) {
                            prefetch_block(wp.add(o * n_in) as *const i8, 16 * n_in);
                            let mut acc = [_mm256_setzero_ps(); 8];
                            for c in (0..n_in).step_by(16) {
                                let e = _mm256_loadu_ps(sp.add(c));
                                let d = _mm256_loadu_ps(sp.add(c + 8));
                                for (r, a) in acc.iter_mut().enumerate() {
                                    let v = _mm256_loadu_si256(wp.add((o + r) * n_in + c) as *const __m256i);
                                    let ev = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                                    let ov = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                                    *a = _mm256_fmadd_ps(ov, d, _mm256_fmadd_ps(ev, e, *a));
                                }
                            }
                            finish8(&acc, dst.add(o), add);
                        }
                    }
                    super::Mat::Bf16(wb) => {
                        for o in (0..full).step_by(8) {
                            prefetch_block(wb.as_ptr().add(o * n_in) as *const i8, 16 * n_in);
                            let mut acc = [_mm256_setzero_ps(); 8];
                            for c in (0..n_in).step_by(8) {
                                let xv = _mm256_loadu_ps(xp.add(c));
                                for (r, a) in acc.iter_mut().enumerate() {
                                    *a = _mm256_fmadd_ps(load8(w, (o + r) * n_in + c), xv, *a);
                                }
                            }
                            finish8(&acc, dst.add(o), add);
                        }
                    }
                }
                for r in full..n_out {
                    let mut acc = _mm256_setzero_ps();
                    for c in (0..n_in).step_by(8) {
                        acc = _mm256_fmadd_ps(load8(w, r * n_in + c), _mm256_loadu_ps(xp.add(c)), acc);
                    }
                    store(y, m * n_out + r, hsum(acc), add);
                }
            }
        }

        /// Dot product of weight row `row` (at `wp`, `n_in` f32) with `x`: 32 columns per step in four
        /// accumulators, prefetching [`AHEAD`] bytes ahead.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn row_f32(wp: *const f32, n_in: usize, x: &[f32]) -> f32 {
            let xp = x.as_ptr();
            let end = n_in - n_in % 32;
            let mut a = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < end {
                let pf = (wp as *const i8).wrapping_add(i * 4 + AHEAD);
                _mm_prefetch::<_MM_HINT_T0>(pf);
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64));
                for (k, acc) in a.iter_mut().enumerate() {
                    *acc =
                        _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i + 8 * k)), _mm256_loadu_ps(xp.add(i + 8 * k)), *acc);
                }
                i += 32;
            }
            while i + 8 <= n_in {
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
            while i < n_in {
                s += *wp.add(i) * x[i];
                i += 1;
            }
            s
        }

        /// `y[m][o] (+)= W[o] · xs[m]`, one weight row at a time: the rows of a matrix are contiguous, so the
        /// product reads the weights as one sequential stream (the hardware prefetcher's best case, helped by a
        /// software prefetch a fixed distance ahead); further activation rows re-read the weight row from L1.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn matvec_f32(w: &[f32], n_in: usize, n_out: usize, xs: &[&[f32]], y: &mut [f32], add: bool) {
            for o in 0..n_out {
                let wp = w[o * n_in..(o + 1) * n_in].as_ptr();
                for (m, x) in xs.iter().enumerate() {
                    store(y, m * n_out + o, row_f32(wp, n_in, x), add);
                }
            }
        }

        /// Dot product of bf16 weight row `row` (`n_in` long) with an activation row given both as is (`x`) and
        /// with each 16-column block split into its even and odd columns (`xs`): a 32-bit lane holds two bf16
        /// values, so shifting it left by 16 gives the even column as f32 and masking off the low half the odd
        /// one. 32 columns (one cache line) per step in four accumulators, prefetching [`AHEAD`] bytes ahead.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn row_bf16(row: &[u16], x: &[f32], xs: &[f32]) -> f32 {
            let n_in = row.len();
            let wp = row.as_ptr();
            let xp = xs.as_ptr();
            let high = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
            let even = |v: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            let odd = |v: __m256i| _mm256_castsi256_ps(_mm256_and_si256(v, high));
            let end = n_in - n_in % 32;
            let mut a = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < end {
                _mm_prefetch::<_MM_HINT_T0>((wp as *const i8).wrapping_add(i * 2 + AHEAD));
                let v0 = _mm256_loadu_si256(wp.add(i) as *const __m256i);
                let v1 = _mm256_loadu_si256(wp.add(i + 16) as *const __m256i);
                a[0] = _mm256_fmadd_ps(even(v0), _mm256_loadu_ps(xp.add(i)), a[0]);
                a[1] = _mm256_fmadd_ps(odd(v0), _mm256_loadu_ps(xp.add(i + 8)), a[1]);
                a[2] = _mm256_fmadd_ps(even(v1), _mm256_loadu_ps(xp.add(i + 16)), a[2]);
                a[3] = _mm256_fmadd_ps(odd(v1), _mm256_loadu_ps(xp.add(i + 24)), a[3]);
                i += 32;
            }
            if i + 16 <= n_in {
                let v = _mm256_loadu_si256(wp.add(i) as *const __m256i);
                a[0] = _mm256_fmadd_ps(even(v), _mm256_loadu_ps(xp.add(i)), a[0]);
                a[1] = _mm256_fmadd_ps(odd(v), _mm256_loadu_ps(xp.add(i + 8)), a[1]);
                i += 16;
            }
            let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
            while i < n_in {
                s += f32::from_bits(u32::from(row[i]) << 16) * x[i];
                i += 1;
            }
            s
        }

        /// [`matvec_f32`] for bf16 weights; `split` holds the rows of `xs` (`[rows, n_in]`, flat) in
        /// [`row_bf16`]'s column order.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn matvec_bf16(
            w: &[u16],
            n_in: usize,
            n_out: usize,
            xs: &[&[f32]],
            split: &[f32],
            y: &mut [f32],
            add: bool,
        ) {
            for o in 0..n_out {
                let row = &w[o * n_in..(o + 1) * n_in];
                for (m, (x, xp)) in xs.iter().zip(split.chunks_exact(n_in)).enumerate() {
                    store(y, m * n_out + o, row_bf16(row, x, xp), add);
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn data(n: usize, seed: u32) -> Vec<f32> {
            (0..n)
                .map(|k| {
                    (((k as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0
                })
                .collect()
        }

        #[test]
        fn swiglu_equals_the_scalar_formula() {
            // Every magnitude SiLU meets, both signs, the clamped tails, and a length with a scalar tail.
            let mut gate: Vec<f32> = (0..203).map(|k| (k as f32 - 101.0) * 0.9).collect();
            gate.extend([-1e-30, 1e-30, 0.0, -0.0, 86.9, -86.9, 87.5, -87.5, 120.0, -120.0, f32::MIN_POSITIVE]);
            let up: Vec<f32> = (0..gate.len()).map(|k| 1.0 + (k % 7) as f32 * 0.25).collect();
            let mut fast = gate.clone();
            swiglu(&mut fast, &up);
            for ((g, u), f) in gate.iter().zip(&up).zip(&fast) {
                let want = (f64::from(*g) / (1.0 + (-f64::from(*g)).exp()) * f64::from(*u)) as f32;
                // A few ulp; far below zero (where the kernel clamps e^-g) anything within 1e-30 of the true ≈ 0.
                let tol = (4.0 * f32::EPSILON * want.abs()).max(1e-30);
                assert!((f - want).abs() <= tol, "silu({g}) * {u}: {f} vs {want}");
            }
        }

        #[test]
        fn dot_axpy_and_scale_mul_read_bf16_as_its_f32_value() {
            for n in [5usize, 8, 64, 77] {
                let a = data(n, 3);
                let b = data(n + 3, 4);
                let bits: Vec<u16> = b.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
                let wide: Vec<f32> = bits.iter().map(|&h| f32::from_bits(u32::from(h) << 16)).collect();
                let want: f32 = a.iter().zip(&wide).map(|(x, y)| x * y).sum();
                for m in [Mat::Bf16(&bits), Mat::F32(&wide)] {
                    assert!((dot(&a, m) - want).abs() <= 1e-5 * (1.0 + want.abs()), "dot, n = {n}");
                    let mut y = a.clone();
                    axpy(&mut y, 0.5, m);
                    let mut out = vec![0f32; n];
                    scale_mul(&a, 1.5, m, &mut out);
                    for i in 0..n {
                        assert_eq!(y[i], a[i] + 0.5 * wide[i], "axpy, n = {n}");
                        assert_eq!(out[i], a[i] * 1.5 * wide[i], "scale_mul, n = {n}");
                    }
                }
            }
        }

        #[test]
        fn vector_loops_equal_the_scalar_loop_for_odd_shapes() {
            for &(n_in, n_out, m) in &[
                (576, 192, 1),
                (37, 5, 3),
                (16, 4, 8),
                (7, 9, 2),
                (1536, 13, 1),
                (16, 1536, 1),
                (8, 21, 3),
                (64, 19, 2),
                (88, 7, 2),
                (121, 3, 2),
            ] {
                let w = data(n_in * n_out, 1);
                let wb: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
                let xs_own: Vec<Vec<f32>> = (0..m).map(|k| data(n_in, 7 + k as u32)).collect();
                let xs: Vec<&[f32]> = xs_own.iter().map(Vec::as_slice).collect();
                for mat in [Mat::F32(&w), Mat::Bf16(&wb)] {
                    let mut fast = vec![0.5f32; m * n_out];
                    let mut slow = fast.clone();
                    matvec(mat, n_in, 0..n_out, &Rows::new(&xs), &mut fast, true);
                    scalar(mat, n_in, n_out, &xs, &mut slow, true);
                    for (a, b) in fast.iter().zip(&slow) {
                        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{n_in}x{n_out}x{m}: {a} vs {b}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for (n_in, n_out, r) in [(72, 40, 3), (256, 301, 5), (96, 24, 8), (256, 301, 16)] {
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
            check_shared_input();
        }
        assert_eq!(tch::get_num_threads(), before);
        assert_eq!(threads_for(256 * 301), 1);
    }

    /// Whatever order the two threads claim in, every row is handed out exactly once, in chunks of at least
    /// `min` rows (but the last), each thread's chunks adjacent to each other.
    #[test]
    fn chunks_hand_out_every_row_once() {
        for (total, min) in [(0usize, 8usize), (5, 8), (576, 16), (1536 * 2, 8), (49_152, 16), (100, 1)] {
            for pattern in [0u32, 0b1010, 0b0110_1101, u32::MAX] {
                let chunks = Chunks::new(total, min);
                let mut seen = vec![0u8; total];
                let mut k = 0;
                let (mut front_end, mut back_start) = (0, total);
                loop {
                    let front = pattern.rotate_left(k) & 1 == 1;
                    k += 1;
                    let Some(range) = chunks.claim(front).or_else(|| chunks.claim(!front)) else { break };
                    assert!(range.len() >= min.min(total) || range.end == back_start || range.start == front_end);
                    if range.start == front_end {
                        front_end = range.end;
                    } else {
                        assert_eq!(range.end, back_start, "{total}/{min}: chunks of one end are adjacent");
                        back_start = range.start;
                    }
                    for r in range {
                        seen[r] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{total}/{min}: every row once");
                assert_eq!(front_end, back_start);
            }
        }
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
