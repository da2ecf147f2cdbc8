//! The inner loops, dispatched per instruction set ([`SimdPath`]): `avx512` (with its AVX512-BF16 variant) and
//! `avx2` where the CPU has them, `scalar` otherwise. `matvec` computes `y[m][o] = Σᵢ W[o][i] x[m][i]` for every
//! activation row `m`, reading each weight row once for all rows (with `add`, it adds to `y` instead of storing).
//! The small helpers of the decode step (`dot`, `axpy`, `scale_mul`, `swiglu`) run on AVX2 on every vector path.
use super::borrow::{to_bf16, Mat};
use super::isa::SimdPath;
use super::runtime::pool;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

/// `e^x` for eight lanes (within 2 ulp of `expf` over `[-87, 88]`, inputs clamped to it).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp8_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    avx2::exp8(x)
}

/// Whether the active path has AVX2 and FMA (what the small helpers need).
fn vector() -> bool {
    super::simd_path() != SimdPath::Scalar
}

/// The copies of the activation rows that the bf16 loops read, per path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// f32, each whole 16-column block split into its 8 even columns, then its 8 odd ones (the AVX2 loops).
    Split16,
    /// The same with 32-column blocks (16 even, 16 odd; the AVX-512 widening loop).
    Split32,
    /// Rounded to bf16 (nearest-even), column order, each row padded to an even length (`vdpbf16ps`).
    Bf16,
}

/// Activation rows for [`matvec`], on the instruction set chosen when they were made, with the copies the bf16
/// loops read (see [`Layout`]) made once and shared by every bf16 product over these rows (all projections of a
/// call, both threads, `A x`). Whoever shares a `Rows` between threads should call [`Rows::prepare`] first: two
/// threads making a copy at once queue on its lock.
pub struct Rows<'a> {
    pub xs: &'a [&'a [f32]],
    path: SimdPath,
    copies: [std::sync::OnceLock<pool::Buf>; 3],
}

impl<'a> Rows<'a> {
    /// The rows, for `path` (which the caller has checked this CPU supports).
    pub fn on(path: SimdPath, xs: &'a [&'a [f32]]) -> Self {
        Rows { xs, path, copies: Default::default() }
    }

    fn width(&self) -> usize {
        self.xs.first().map_or(0, |x| x.len())
    }

    /// Makes the copy that a product of a weight matrix like `w` (`n_in` columns) over these rows will read, if
    /// any (before the threads start; see [`Rows`]).
    pub fn prepare(&self, w: Mat<'_>, n_in: usize) {
        if let Some(layout) = layout(self.path, w, n_in) {
            self.copy(layout);
        }
    }

    /// The rows in `layout` (`[rows, n_in]` flat for the split layouts; `[rows, stride]` bf16 bits, as pairs in
    /// `f32` slots, for [`Layout::Bf16`]).
    fn copy(&self, layout: Layout) -> &[f32] {
        let slot = match layout {
            Layout::Split16 => 0,
            Layout::Split32 => 1,
            Layout::Bf16 => 2,
        };
        self.copies[slot].get_or_init(|| {
            let n = self.width();
            match layout {
                Layout::Split16 | Layout::Split32 => {
                    let block = if layout == Layout::Split16 { 16 } else { 32 };
                    let half = block / 2;
                    let mut p = pool::take(n * self.xs.len());
                    for (row, x) in p.chunks_exact_mut(n.max(1)).zip(self.xs) {
                        row.copy_from_slice(x);
                        for (dst, src) in row.chunks_exact_mut(block).zip(x.chunks_exact(block)) {
                            for j in 0..half {
                                dst[j] = src[2 * j];
                                dst[half + j] = src[2 * j + 1];
                            }
                        }
                    }
                    p
                }
                Layout::Bf16 => {
                    let slots = n.div_ceil(2);
                    let mut p = pool::take(slots * self.xs.len());
                    for (row, x) in p.chunks_exact_mut(slots.max(1)).zip(self.xs) {
                        for (k, dst) in row.iter_mut().enumerate() {
                            // Column 2k in the low half of the 32-bit slot, 2k + 1 in the high half (little-endian:
                            // read as bf16 values, they come in column order).
                            let lo = u32::from(to_bf16(x[2 * k]));
                            let hi = x.get(2 * k + 1).map_or(0, |&v| u32::from(to_bf16(v)));
                            *dst = f32::from_bits(lo | (hi << 16));
                        }
                    }
                    p
                }
            }
        })
    }
}

/// Widest rows that go to the AVX2 narrow loop (`avx2::matvec_narrow`: eight weight rows reduced together), on
/// every vector path.
const NARROW_MAX: usize = 64;

/// The copy of the activation rows that `path`'s loop for `w` (`n_in` columns) reads, if any.
fn layout(path: SimdPath, w: Mat<'_>, n_in: usize) -> Option<Layout> {
    if !matches!(w, Mat::Bf16(_)) {
        return None;
    }
    let narrow = n_in.is_multiple_of(8) && n_in <= NARROW_MAX;
    match path {
        SimdPath::Scalar => None,
        SimdPath::Avx2 => Some(Layout::Split16),
        SimdPath::Avx512 | SimdPath::Avx512Bf16 if narrow => Some(Layout::Split16),
        SimdPath::Avx512 => Some(Layout::Split32),
        SimdPath::Avx512Bf16 => Some(Layout::Bf16),
    }
}

/// LoRA's `B` beside the weight matrix of a [`matvec`]: output row `o` also gets `B[o] · xa[m]` for activation
/// row `m`, summed into the same accumulators as `W[o] · x[m]` before their one reduction, so `B` costs its bytes
/// and a few vector instructions per row instead of a pass of its own with a horizontal sum per row.
#[derive(Clone, Copy)]
pub struct Side<'a> {
    /// `[*, r]` row-major, the same kind as `W` and as many rows.
    pub b: Mat<'a>,
    /// `B`'s width (LoRA's rank).
    pub r: usize,
    /// The low-rank input per activation row (`scaling · A x[m]`, `r` values each, f32).
    pub xa: &'a [&'a [f32]],
}

impl<'a> Side<'a> {
    /// `B`'s values with the side, if `B` is of kind `T` (`f32`, or `u16` for bf16 bits).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn values<T: SideKind>(&self) -> Option<(&'a [T], &Self)> {
        T::values(self.b).map(|b| (b, self))
    }
}

/// The kinds a [`Side`]'s `B` comes in: f32, or bf16 as raw `u16` bits.
trait SideKind: Sized {
    fn values(b: Mat<'_>) -> Option<&[Self]>;
}

impl SideKind for f32 {
    fn values(b: Mat<'_>) -> Option<&[f32]> {
        match b {
            Mat::F32(v) => Some(v),
            Mat::Bf16(_) => None,
        }
    }
}

impl SideKind for u16 {
    fn values(b: Mat<'_>) -> Option<&[u16]> {
        match b {
            Mat::Bf16(v) => Some(v),
            Mat::F32(_) => None,
        }
    }
}

/// The share of a [`Side`] that the loops of one weight row and `R` activation rows read: `B`'s rows from that
/// weight row on (`r` values each, at `b`) and the low-rank inputs of those activation rows (`r` f32 each); `r = 0`
/// (pointers never read) without a side. The AVX2 loops take one activation row at a time (`R = 1`), the AVX-512
/// ones tiles of up to four.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct TileSide<T, const R: usize> {
    b: *const T,
    r: usize,
    xa: [*const f32; R],
}

#[cfg(target_arch = "x86_64")]
impl<T, const R: usize> TileSide<T, R> {
    /// Weight row `o` on of `b` (`[*, r]`) against the low-rank rows `start..start + R` of the side, or the empty
    /// side. Bounds: `o < b`'s rows and `start + R ≤` the side's rows (checked).
    fn at(side: Option<(&[T], &Side<'_>)>, o: usize, start: usize) -> Self {
        match side {
            Some((b, s)) => {
                TileSide { b: b[o * s.r..].as_ptr(), r: s.r, xa: std::array::from_fn(|k| s.xa[start + k].as_ptr()) }
            }
            None => TileSide { b: std::ptr::null(), r: 0, xa: [std::ptr::null(); R] },
        }
    }
}

/// Output rows `rows` of `W x` (plus `B xa` with `side`) for every activation row `x` of `x`, into `y` laid out
/// `[x.xs.len(), rows.len()]` (added to what `y` holds when `add`). `W` is `[*, n_in]` row-major.
pub fn matvec(
    w: Mat<'_>,
    n_in: usize,
    rows: std::ops::Range<usize>,
    x: &Rows<'_>,
    side: Option<Side<'_>>,
    y: &mut [f32],
    add: bool,
) {
    let xs = x.xs;
    let len = rows.len();
    let w = w.slice(rows.start * n_in..rows.end * n_in);
    assert!(xs.iter().all(|x| x.len() == n_in) && y.len() == xs.len() * len, "matvec: shapes disagree");
    // `B`'s rows for these output rows; `r = 0` (no side) makes every side loop empty.
    let side = side.map(|s| Side { b: s.b.slice(rows.start * s.r..rows.end * s.r), ..s });
    if let Some(s) = &side {
        let kinds_agree = matches!((w, s.b), (Mat::F32(_), Mat::F32(_)) | (Mat::Bf16(_), Mat::Bf16(_)));
        assert!(
            kinds_agree && s.xa.len() == xs.len() && s.xa.iter().all(|v| v.len() == s.r),
            "matvec: the side's shapes disagree"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if x.path != SimdPath::Scalar && x.path.supported() {
        let copy = |w: Mat<'_>| match layout(x.path, w, n_in) {
            Some(l) => x.copy(l),
            None => &[],
        };
        let narrow = n_in.is_multiple_of(8) && n_in <= NARROW_MAX;
        // SAFETY: the path's instruction sets were just detected (`supported`, which for the AVX-512 paths includes
        // AVX2/FMA, so the AVX2 narrow loop may run on them too). Bounds: `w` holds exactly `len` rows of `n_in`,
        // every row of `xs` has `n_in` values and `y` has `xs.len() * len` (asserted above); each copy holds
        // `xs.len()` rows of its layout (`Rows::copy`), which bounds every load and store; a side's `b` holds exactly
        // `len` rows of `r` (sliced above) and each of its `xs.len()` low-rank rows `r` values (asserted above).
        unsafe {
            if narrow {
                avx2::matvec_narrow(w, n_in, len, xs, copy(w), y, add);
                if let Some(s) = side {
                    // A narrow `W` (tests' shapes, not a model's) takes `B` in a pass of its own.
                    let xa = Rows::on(x.path, s.xa);
                    matvec(s.b, s.r, 0..len, &xa, None, y, true);
                }
                return;
            }
            match (x.path, w) {
                (SimdPath::Avx2, Mat::F32(w)) => avx2::matvec_f32(w, n_in, len, xs, side, y, add),
                (SimdPath::Avx2, Mat::Bf16(wb)) => avx2::matvec_bf16(wb, n_in, len, xs, copy(w), side, y, add),
                (_, Mat::F32(w)) => avx512::matvec_f32(w, n_in, len, xs, side, y, add),
                (SimdPath::Avx512Bf16, Mat::Bf16(wb)) => {
                    let pairs = copy(w);
                    // The bf16 copy holds two bf16 values per f32 slot, read here as u16: the same bytes (`2 ×
                    // len` u16 in `len` f32), alignment 4 ≥ 2, every bit pattern a valid u16. Aliasing: the copy
                    // is never written after its `OnceLock` was set, and this shared slice lives only while
                    // `pairs` borrows it. Threads: the `OnceLock` published the finished copy to every reader.
                    let bits = std::slice::from_raw_parts(pairs.as_ptr() as *const u16, pairs.len() * 2);
                    let stride = n_in.next_multiple_of(2);
                    avx512::matvec_dpbf16(wb, n_in, len, xs.len(), bits, stride, side, y, add)
                }
                (_, Mat::Bf16(wb)) => avx512::matvec_bf16(wb, n_in, len, xs.len(), copy(w), side, y, add),
            }
        }
        return;
    }
    scalar::matvec(w, n_in, len, xs, side, y, add)
}

/// Attention scores of the `g` query heads `qs` (`[g, hd]`) against the key rows `keys` (`[s, hd]`, f32 or bf16):
/// `out[h · s + j] = (q_h · k_j) · scale`. The same bits as [`dot`] per pair (AVX2/FMA in one loop when `hd` is a
/// multiple of 8, else [`dot`] itself).
pub fn attn_scores(qs: &[f32], keys: Mat<'_>, hd: usize, s: usize, scale: f32, out: &mut [f32]) {
    assert!(
        hd > 0 && qs.len().is_multiple_of(hd) && keys.len() >= s * hd && out.len() >= qs.len() / hd * s,
        "attn_scores: shapes disagree"
    );
    #[cfg(target_arch = "x86_64")]
    if vector() && hd.is_multiple_of(8) {
        // SAFETY: the active path is a vector path, so AVX2 and FMA were detected; `qs` holds `g` rows of `hd`,
        // `keys` at least `s` rows of `hd` and `out` at least `g · s` values (asserted), which bounds every access.
        // Aliasing and threads: only these slices are touched, whose borrows Rust checks (inputs shared and only
        // read, possibly by the other decode thread at once; the output exclusive to this call).
        unsafe { avx2::attn_scores(qs, keys, hd, s, scale, out) };
        return;
    }
    for (h, q) in qs.chunks_exact(hd).enumerate() {
        for j in 0..s {
            out[h * s + j] = dot(q, keys.slice(j * hd..(j + 1) * hd)) * scale;
        }
    }
}

/// Attention outputs of `g` heads: `out[h] = Σⱼ ws[h · s + j] · v_j` (`out` `[g, hd]`, `values` `[s, hd]`, f32 or
/// bf16), positions with a zero weight skipped. The same bits as zeroing `out[h]` and calling [`axpy`] once per
/// position with a non-zero weight (AVX2/FMA with the columns held in registers when `hd` is a multiple of 8).
pub fn attn_values(ws: &[f32], values: Mat<'_>, hd: usize, s: usize, out: &mut [f32]) {
    assert!(
        hd > 0 && out.len().is_multiple_of(hd) && ws.len() >= out.len() / hd * s && values.len() >= s * hd,
        "attn_values: shapes disagree"
    );
    #[cfg(target_arch = "x86_64")]
    if vector() && hd.is_multiple_of(8) {
        // SAFETY: the active path is a vector path, so AVX2 and FMA were detected; `out` holds `g` rows of `hd`,
        // `ws` at least `g · s` weights and `values` at least `s` rows of `hd` (asserted), which bounds every
        // access.
        // Aliasing and threads: only these slices are touched, whose borrows Rust checks (inputs shared and only
        // read, possibly by the other decode thread at once; the output exclusive to this call).
        unsafe { avx2::attn_values(ws, values, hd, s, out) };
        return;
    }
    for (h, dst) in out.chunks_exact_mut(hd).enumerate() {
        dst.fill(0.0);
        for (j, &w) in ws[h * s..(h + 1) * s].iter().enumerate() {
            if w != 0.0 {
                axpy(dst, w, values.slice(j * hd..(j + 1) * hd));
            }
        }
    }
}

/// Dot product of `a` with the first `a.len()` values of `b` (f32, or bf16 widened; AVX2/FMA when available).
pub fn dot(a: &[f32], b: Mat<'_>) -> f32 {
    assert!(b.len() >= a.len(), "dot: second operand too short");
    #[cfg(target_arch = "x86_64")]
    if vector() {
        // SAFETY: the active path is a vector path, so AVX2 and FMA were detected; `b` holds at least `a.len()` values (asserted).
        // Aliasing and threads: only these slices are touched, whose borrows Rust checks (inputs shared and only
        // read, possibly by the other decode thread at once; the output exclusive to this call).
        return unsafe { avx2::dot(a, b) };
    }
    scalar::dot(a, b)
}

/// `y[i] += alpha · x[i]` over the first `y.len()` values of `x` (f32, or bf16 widened).
pub fn axpy(y: &mut [f32], alpha: f32, x: Mat<'_>) {
    assert!(x.len() >= y.len(), "axpy: second operand too short");
    #[cfg(target_arch = "x86_64")]
    if vector() {
        // SAFETY: the active path is a vector path, so AVX2 and FMA were detected; `x` holds at least `y.len()` values (asserted).
        // Aliasing and threads: only these slices are touched, whose borrows Rust checks (inputs shared and only
        // read, possibly by the other decode thread at once; the output exclusive to this call).
        unsafe { avx2::axpy(y, alpha, x) };
        return;
    }
    scalar::axpy(y, alpha, x)
}

/// `out[i] = (x[i] · scale) · w[i]`: the last step of an RMSNorm.
pub fn scale_mul(x: &[f32], scale: f32, w: Mat<'_>, out: &mut [f32]) {
    assert!(w.len() >= x.len() && out.len() == x.len(), "scale_mul: shapes disagree");
    #[cfg(target_arch = "x86_64")]
    if vector() {
        // SAFETY: the active path is a vector path, so AVX2 and FMA were detected; the lengths were just checked.
        // Aliasing and threads: only these slices are touched, whose borrows Rust checks (inputs shared and only
        // read, possibly by the other decode thread at once; the output exclusive to this call).
        unsafe { avx2::scale_mul(x, scale, w, out) };
        return;
    }
    scalar::scale_mul(x, scale, w, out)
}

/// SwiGLU in place: `gate[i] = silu(gate[i]) · up[i]` with `silu(g) = g / (1 + e^-g)`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert!(up.len() >= gate.len(), "swiglu: shapes disagree");
    #[cfg(target_arch = "x86_64")]
    if vector() {
        // SAFETY: the active path is a vector path, so AVX2 and FMA were detected; the lengths were just checked.
        // Aliasing and threads: only these slices are touched, whose borrows Rust checks (inputs shared and only
        // read, possibly by the other decode thread at once; the output exclusive to this call).
        unsafe { avx2::swiglu(gate, up) };
        return;
    }
    scalar::swiglu(gate, up)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|k| (((k as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0)
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

    /// The grouped attention loops give the same bits as a [`dot`] per (head, position) and zeroing plus an
    /// [`axpy`] per non-zero weight (what the decode step did before), for f32 and bf16 caches, head widths on and
    /// off the fast path, 1–4 heads per key/value head, and weights with zeros; and both equal the f64 sums.
    #[test]
    fn grouped_attention_equals_a_dot_and_an_axpy_per_position() {
        for hd in [4usize, 8, 24, 64, 72, 128, 256] {
            for g in 1..=4usize {
                for s in [1usize, 5, 37] {
                    let qs = data(g * hd, 11);
                    let kv = data(s * hd, 12);
                    let bits: Vec<u16> = kv.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
                    let wide: Vec<f32> = bits.iter().map(|&h| f32::from_bits(u32::from(h) << 16)).collect();
                    // Weights in [0, 1) with every third one zero.
                    let ws: Vec<f32> = data(g * s, 13)
                        .iter()
                        .enumerate()
                        .map(|(k, w)| if k % 3 == 1 { 0.0 } else { w.abs() })
                        .collect();
                    for (mat, f) in [(Mat::F32(&kv), &kv), (Mat::Bf16(&bits), &wide)] {
                        let mut scores = vec![f32::NAN; g * s];
                        attn_scores(&qs, mat, hd, s, 0.125, &mut scores);
                        let mut out = vec![f32::NAN; g * hd];
                        attn_values(&ws, mat, hd, s, &mut out);
                        for h in 0..g {
                            let q = &qs[h * hd..(h + 1) * hd];
                            let mut want = vec![0f32; hd];
                            for j in 0..s {
                                let row = mat.slice(j * hd..(j + 1) * hd);
                                let sc = scores[h * s + j];
                                assert_eq!(sc.to_bits(), (dot(q, row) * 0.125).to_bits(), "score hd {hd} g {g} s {s}");
                                let exact: f64 =
                                    q.iter().zip(&f[j * hd..]).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                                assert!((f64::from(sc) - exact * 0.125).abs() < 1e-5, "score vs f64, hd {hd}");
                                let w = ws[h * s + j];
                                if w != 0.0 {
                                    axpy(&mut want, w, row);
                                }
                            }
                            for c in 0..hd {
                                let got = out[h * hd + c];
                                assert_eq!(got.to_bits(), want[c].to_bits(), "value hd {hd} g {g} s {s} col {c}");
                                let exact: f64 =
                                    (0..s).map(|j| f64::from(ws[h * s + j]) * f64::from(f[j * hd + c])).sum();
                                assert!((f64::from(got) - exact).abs() < 1e-5, "value vs f64, hd {hd}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Every path this CPU has, against the scalar loop (in f64), for odd shapes: widths that are not multiples
    /// of 16/32/64 and narrow ones (LoRA's `B`), 1..=16 activation rows (more than a tile, a tile and a part), f32
    /// and bf16 weights. On the AVX512-BF16 path bf16 weights multiply the activations rounded to bf16, so its
    /// reference rounds them too.
    #[test]
    fn every_path_equals_the_scalar_loop_for_odd_shapes() {
        let shapes: &[(usize, usize, usize)] = &[
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
            (33, 6, 5),
            (63, 4, 16),
            (65, 3, 9),
            (96, 5, 7),
            (127, 4, 13),
            (129, 3, 16),
            (200, 2, 12),
            (576, 9, 16),
            (1, 3, 4),
        ];
        for path in SimdPath::ALL {
            if !path.supported() {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "skipped: SIMD path {path} (this CPU lacks it)");
                continue;
            }
            for &(n_in, n_out, m) in shapes {
                let w = data(n_in * n_out, 1);
                let wb: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
                let xs_own: Vec<Vec<f32>> = (0..m).map(|k| data(n_in, 7 + k as u32)).collect();
                let xs: Vec<&[f32]> = xs_own.iter().map(Vec::as_slice).collect();
                for mat in [Mat::F32(&w), Mat::Bf16(&wb)] {
                    let rounded = path == SimdPath::Avx512Bf16 && layout(path, mat, n_in) == Some(Layout::Bf16);
                    let mut fast = vec![0.5f32; m * n_out];
                    let rows = Rows::on(path, &xs);
                    rows.prepare(mat, n_in);
                    matvec(mat, n_in, 0..n_out, &rows, None, &mut fast, true);
                    for (k, got) in fast.iter().enumerate() {
                        let (r, o) = (k / n_out, k % n_out);
                        let x = |i: usize| {
                            let v = xs[r][i];
                            f64::from(if rounded { f32::from_bits(u32::from(to_bf16(v)) << 16) } else { v })
                        };
                        let want = 0.5 + (0..n_in).map(|i| f64::from(mat.get(o * n_in + i)) * x(i)).sum::<f64>();
                        let scale: f64 =
                            1.0 + (0..n_in).map(|i| (f64::from(mat.get(o * n_in + i)) * x(i)).abs()).sum::<f64>();
                        // f32 accumulation of n_in products: a few ulp of the sum of magnitudes.
                        let tol = 4.0 * f64::from(f32::EPSILON) * scale * (n_in as f64).sqrt().max(1.0);
                        assert!(
                            (f64::from(*got) - want).abs() <= tol,
                            "{path} {}: {n_in}x{n_out}, {m} rows, row {r} out {o}: {got} vs {want}",
                            if matches!(mat, Mat::F32(_)) { "f32" } else { "bf16" }
                        );
                    }
                }
            }
        }
    }

    /// With a [`Side`] (LoRA's `B` beside `W`), every path this CPU has adds `B[o] · xa[m]` to each output: against
    /// the f64 sum for ranks that are whole, partial and several vectors wide, f32 and bf16, 1..=9 activation rows
    /// (tiles of four and a part), a weight range that does not start at row 0, and a narrow `W` (the pass of its
    /// own); and each row gives the same bits in any batch, as without a side.
    #[test]
    fn the_side_adds_b_times_the_low_rank_input_on_every_path() {
        for path in SimdPath::ALL {
            if !path.supported() {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "skipped: SIMD path {path} (this CPU lacks it)");
                continue;
            }
            for &(n_in, n_out, r) in
                &[(576usize, 21usize, 16usize), (100, 9, 5), (37, 6, 33), (1536, 5, 64), (48, 7, 8)]
            {
                let w = data(n_in * n_out, 5);
                let wb: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
                let b = data(r * n_out, 6);
                let bb: Vec<u16> = b.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
                let xs_own: Vec<Vec<f32>> = (0..9).map(|k| data(n_in, 21 + k as u32)).collect();
                let xa_own: Vec<Vec<f32>> = (0..9).map(|k| data(r, 41 + k as u32)).collect();
                for (mat, bmat) in [(Mat::F32(&w), Mat::F32(&b)), (Mat::Bf16(&wb), Mat::Bf16(&bb))] {
                    let rounded = path == SimdPath::Avx512Bf16 && layout(path, mat, n_in) == Some(Layout::Bf16);
                    let rows = 2..n_out;
                    // The product for activation rows `ks` of `xs_own` (with their low-rank inputs).
                    let run = |ks: std::ops::Range<usize>| {
                        let xs: Vec<&[f32]> = xs_own[ks.clone()].iter().map(Vec::as_slice).collect();
                        let xa: Vec<&[f32]> = xa_own[ks].iter().map(Vec::as_slice).collect();
                        let mut y = vec![0.25f32; xs.len() * rows.len()];
                        let input = Rows::on(path, &xs);
                        input.prepare(mat, n_in);
                        let side = Side { b: bmat, r, xa: &xa };
                        matvec(mat, n_in, rows.clone(), &input, Some(side), &mut y, true);
                        y
                    };
                    let alone: Vec<Vec<f32>> = (0..9).map(|k| run(k..k + 1)).collect();
                    for m in 1..=9 {
                        let y = run(0..m);
                        for (k, got) in y.iter().enumerate() {
                            let (row, o) = (k / rows.len(), rows.start + k % rows.len());
                            let x = |i: usize| {
                                let v = xs_own[row][i];
                                f64::from(if rounded { f32::from_bits(u32::from(to_bf16(v)) << 16) } else { v })
                            };
                            let main = (0..n_in).map(|i| f64::from(mat.get(o * n_in + i)) * x(i));
                            let side = (0..r).map(|j| f64::from(bmat.get(o * r + j)) * f64::from(xa_own[row][j]));
                            let terms: Vec<f64> = main.chain(side).collect();
                            let want = 0.25 + terms.iter().sum::<f64>();
                            let scale = 1.0 + terms.iter().map(|t| t.abs()).sum::<f64>();
                            let tol = 4.0 * f64::from(f32::EPSILON) * scale * ((n_in + r) as f64).sqrt();
                            assert!(
                                (f64::from(*got) - want).abs() <= tol,
                                "{path} {n_in}x{n_out} r{r}, {m} rows, row {row} out {o}: {got} vs {want}"
                            );
                        }
                        for (row, want) in alone.iter().take(m).enumerate() {
                            let got = y.get(row * rows.len()..(row + 1) * rows.len());
                            assert_eq!(got, Some(want.as_slice()), "{path} {n_in}x{n_out} r{r}: row {row} of {m}");
                        }
                    }
                }
            }
        }
    }

    /// A row's result does not depend on the rows computed with it (what makes batched greedy decoding equal
    /// one-by-one decoding): on every path this CPU has, each of 1..=16 activation rows gives bit for bit what it
    /// gives alone, for shapes with whole and partial blocks of weight rows and vectors.
    #[test]
    fn a_row_gives_the_same_bits_in_any_batch() {
        for path in SimdPath::ALL {
            if !path.supported() {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "skipped: SIMD path {path} (this CPU lacks it)");
                continue;
            }
            for &(n_in, n_out) in &[(576usize, 13usize), (100, 9), (1536, 8), (33, 5)] {
                let w = data(n_in * n_out, 3);
                let wb: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
                let xs_own: Vec<Vec<f32>> = (0..16).map(|k| data(n_in, 11 + k as u32)).collect();
                for mat in [Mat::F32(&w), Mat::Bf16(&wb)] {
                    let run = |xs: &[&[f32]]| {
                        let mut y = vec![0f32; xs.len() * n_out];
                        let rows = Rows::on(path, xs);
                        rows.prepare(mat, n_in);
                        matvec(mat, n_in, 0..n_out, &rows, None, &mut y, false);
                        y
                    };
                    let alone: Vec<Vec<f32>> = xs_own.iter().map(|x| run(&[x.as_slice()])).collect();
                    for m in 1..=16 {
                        let xs: Vec<&[f32]> = xs_own.iter().take(m).map(Vec::as_slice).collect();
                        let y = run(&xs);
                        for (r, want) in alone.iter().take(m).enumerate() {
                            let got = y.get(r * n_out..(r + 1) * n_out);
                            assert_eq!(got, Some(want.as_slice()), "{path} {n_in}x{n_out}: row {r} of {m}");
                        }
                    }
                }
            }
        }
    }
}
