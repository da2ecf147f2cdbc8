//! How the output rows of a split product are shared out between its two threads: [`Chunks`] hands out
//! contiguous runs of rows from both ends, and [`Out`] is the output buffer both threads write into.
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

/// Hands out the output rows of a [`linear_rows`](super::linear_rows) call (all its projections' rows, one after another) in
/// contiguous chunks to two threads: the front thread takes chunks from the start, the back thread from the end,
/// each chunk a quarter of what is left (at least `min` rows), so that both threads stream long runs of weight
/// rows and finish within one small chunk of each other whatever else slows one of them down.
pub(super) struct Chunks {
    /// The unclaimed rows `lo..hi`: `lo` in the low 32 bits, `hi` in the high 32.
    left: AtomicU64,
    min: usize,
}

impl Chunks {
    pub(super) fn new(total: usize, min: usize) -> Self {
        Chunks { left: AtomicU64::new((total as u64) << 32), min: min.max(1) }
    }

    /// The next chunk for the front (or back) thread, or `None` when every row is taken: a quarter of what is
    /// left, or only the smallest chunk (`min` rows) when `small`.
    pub(super) fn claim(&self, front: bool, small: bool) -> Option<std::ops::Range<usize>> {
        let mut cur = self.left.load(Ordering::Relaxed);
        loop {
            let (lo, hi) = ((cur & 0xFFFF_FFFF) as usize, (cur >> 32) as usize);
            if lo >= hi {
                return None;
            }
            let rest = hi - lo;
            let size = if small {
                rest.min(self.min)
            } else if rest <= 2 * self.min {
                rest
            } else {
                (rest / 4).max(self.min).next_multiple_of(self.min)
            };
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
///
/// Why a raw pointer: both threads write the buffer at once (disjoint columns, interleaved in memory when `m > 1`),
/// which no set of Rust borrows can express. The pointer is derived once, in [`Out::new`], from the caller's
/// `&mut [f32]`, and `Out` holds that exclusive borrow for its lifetime `'a`: nothing but the `Out` reads or
/// writes the buffer while it lives, and it writes only through that pointer.
pub(super) struct Out<'a> {
    ptr: *mut f32,
    n_out: usize,
    m: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: threads: the two threads write disjoint output rows (every chunk of a `Chunks` goes to one thread), and
// the buffer outlives both (`linear_rows` returns only after both are done). Aliasing: the `&mut` borrow the
// pointer came from is held for `'a`, so no reference other than those `put`/`slice` make for a thread's own
// rows exists while both write.
unsafe impl Sync for Out<'_> {}

impl<'a> Out<'a> {
    /// The buffer `buf`, `[m, buf.len() / m]` row-major, for `m ≥ 1` activation rows.
    pub(super) fn new(buf: &'a mut [f32], m: usize) -> Self {
        let m = m.max(1);
        Out { ptr: buf.as_mut_ptr(), n_out: buf.len() / m, m, _buf: PhantomData }
    }

    /// Writes `vals` (`[m, rows.len()]`) into output rows `rows`, or adds them to what is there when `add`.
    ///
    /// # Safety
    /// No other thread may touch output rows `rows` meanwhile (nor may a slice of them from [`Out::slice`] be
    /// alive), and `rows.end ≤ n_out`.
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

    /// Runs `f(dst, add)` for output rows `rows`: with one activation row `dst` is those rows themselves (and `f`
    /// adds to them when `add`); with several, `dst` is `tmp` resized to `[m, rows.len()]` and zeroed (`f`
    /// writes it), which then goes into the buffer, or is added to it when `add`.
    ///
    /// # Safety
    /// As for [`Out::put`].
    pub(super) unsafe fn with_rows(
        &self,
        rows: std::ops::Range<usize>,
        tmp: &mut Vec<f32>,
        add: bool,
        f: impl FnOnce(&mut [f32], bool),
    ) {
        if self.m == 1 {
            f(self.slice(rows), add);
        } else {
            tmp.clear();
            tmp.resize(self.m * rows.len(), 0.0);
            f(tmp, false);
            self.put(rows, tmp, add);
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
pub(super) const CHUNK_MIN_BYTES: usize = 16 << 10;

#[cfg(test)]
mod tests {
    use super::*;

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
                    let Some(range) = chunks.claim(front, false).or_else(|| chunks.claim(!front, false)) else { break };
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
}
