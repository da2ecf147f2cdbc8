//! Where the kernels run: one thread, or two inside a [`decode_scope`] (this one and a spinning helper), and the
//! per-thread pool of `f32` buffers that a decode step takes its short-lived scratch from.
use std::sync::atomic::{AtomicUsize, Ordering};

use super::enabled;

/// Weight elements below which a product runs on one thread (splitting costs more than it saves).
pub(super) const PARALLEL_MIN: usize = 1 << 16;

/// Threads the kernels use now: 1, or 2 inside a [`decode_scope`].
static KERNEL_THREADS: AtomicUsize = AtomicUsize::new(1);

/// How many threads a product over `elements` weights uses (one for small products).
pub(super) fn threads_for(elements: usize) -> usize {
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

pub(super) mod helper {
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
            // SAFETY: threads: the acquire load above saw the poster's release store, so its write of `job` is
            // visible. Aliasing: see `impl Sync for Helper`; the poster does not touch `job` again until it sees
            // `done`, so this is the only access to the cell meanwhile.
            if let Some((data, call)) = unsafe { (*h.job.get()).take() } {
                // SAFETY: `call` is the `call_once::<B>` posted together with `data`, a pointer to the poster's
                // `Option<B>`, which the poster keeps alive and does not touch until it sees `done`.
                let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { call(data) })).is_ok();
                if !ok {
                    h.failed.store(true, Ordering::Relaxed);
                }
            }
            h.done.store(seen, Ordering::Release);
        }
    }

    /// Takes and runs the closure that `p` points at.
    ///
    /// # Safety
    /// `p` must come from a `&mut Option<B>` that stays alive, and is not used otherwise, until this returns.
    unsafe fn call_once<B: FnOnce()>(p: *mut ()) {
        // SAFETY: `p` points at the poster's `Option<B>` (derived from a `&mut`), alive until the poster has seen
        // `done`; the poster only waits meanwhile, so this is the only access to it (aliasing), and the release/
        // acquire pair on `posted` made the poster's writes to it visible here (threads).
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
        // SAFETY: threads: the helper only reads `job` after the release store below, and it finished with the
        // previous job before that poster returned (it waited for `done`), so nothing else touches the cell now
        // (`busy` keeps other posters out). Aliasing: the pointer is derived from `&mut slot`, and this frame does
        // not use `slot` again; `slot` outlives the wait below.
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

    /// Values in a 64-byte cache line: a buffer leaves room to start its first value on a line boundary.
    const LINE: usize = 16;

    /// A buffer of `len` values (contents unspecified) that goes back to the current thread's free list when
    /// dropped. Its first value sits on a 64-byte boundary, so that the vector loops' loads of it (and of rows of
    /// it whose width is a multiple of 16 values) never straddle two cache lines: a split load costs two, which
    /// slows the multi-row products by a quarter when the weights are in cache.
    #[derive(Debug, Default)]
    pub(crate) struct Buf {
        v: Vec<f32>,
        /// Where the aligned values start in `v`.
        off: usize,
        len: usize,
    }

    /// A buffer of `len` values, reused if this thread has one large enough. Its values are whatever the
    /// previous user left (or 0).
    pub(crate) fn take(len: usize) -> Buf {
        let room = len + LINE - 1;
        let reused = FREE.with(|f| {
            let mut f = f.try_borrow_mut().ok()?;
            // Best fit: the shortest free buffer that is long enough, so small requests leave the long buffers
            // to the long ones.
            let at = f.iter().enumerate().filter(|(_, v)| v.len() >= room).min_by_key(|(_, v)| v.len())?.0;
            Some(f.swap_remove(at))
        });
        let mut v = reused.unwrap_or_default();
        if v.len() < room {
            v.resize(room, 0.0);
        }
        // `align_offset` counts in values (0..16 for a heap `f32` pointer); were it ever larger, the buffer would
        // start unaligned but still in bounds.
        let off = v.as_ptr().align_offset(64);
        let off = if off < LINE { off } else { 0 };
        Buf { v, off, len }
    }

    /// [`take`] filled with zeros.
    pub(crate) fn zeros(len: usize) -> Buf {
        let mut b = take(len);
        b.fill(0.0);
        b
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
            &self.v[self.off..self.off + self.len]
        }
    }

    impl std::ops::DerefMut for Buf {
        fn deref_mut(&mut self) -> &mut [f32] {
            &mut self.v[self.off..self.off + self.len]
        }
    }
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
