//! The inner loops, dispatched per instruction set: `avx2` where the CPU has AVX2 and FMA, `scalar`
//! otherwise. `matvec` computes `y[m][o] = Σᵢ W[o][i] x[m][i]` for every activation row `m`, reading each weight
//! row once for all rows (with `add`, it adds to `y` instead of storing).
use super::borrow::Mat;
use super::runtime::pool;

#[cfg(target_arch = "x86_64")]
mod avx2;
mod scalar;

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
/// odd columns, see `avx2::row_bf16`) made once and shared by every bf16 product over these rows (all
/// projections of a call, both threads, `A x`). Whoever shares a `Rows` between threads should call
/// [`Rows::split`] first: two threads making it at once queue on its lock.
pub struct Rows<'a> {
    pub xs: &'a [&'a [f32]],
    split: std::sync::OnceLock<pool::Buf>,
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
            let mut p = pool::take(n * self.xs.len());
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
            if n_in.is_multiple_of(8) && n_in <= avx2::NARROW_MAX {
                avx2::matvec_narrow(w, n_in, len, xs, split(), y, add);
                return;
            }
            match w {
                Mat::F32(w) => avx2::matvec_f32(w, n_in, len, xs, y, add),
                Mat::Bf16(w) => avx2::matvec_bf16(w, n_in, len, xs, split(), y, add),
            }
        }
        return;
    }
    scalar::matvec(w, n_in, len, xs, y, add)
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

/// Dot product of `a` with the first `a.len()` values of `b` (f32, or bf16 widened; AVX2/FMA when available).
pub fn dot(a: &[f32], b: Mat<'_>) -> f32 {
    assert!(b.len() >= a.len(), "dot: second operand too short");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX2 and FMA were just detected; `b` holds at least `a.len()` values (asserted).
        return unsafe { avx2::dot(a, b) };
    }
    scalar::dot(a, b)
}

/// `y[i] += alpha · x[i]` over the first `y.len()` values of `x` (f32, or bf16 widened).
pub fn axpy(y: &mut [f32], alpha: f32, x: Mat<'_>) {
    assert!(x.len() >= y.len(), "axpy: second operand too short");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX2 and FMA were just detected; `x` holds at least `y.len()` values (asserted).
        unsafe { avx2::axpy(y, alpha, x) };
        return;
    }
    scalar::axpy(y, alpha, x)
}

/// `out[i] = (x[i] · scale) · w[i]`: the last step of an RMSNorm.
pub fn scale_mul(x: &[f32], scale: f32, w: Mat<'_>, out: &mut [f32]) {
    assert!(w.len() >= x.len() && out.len() == x.len(), "scale_mul: shapes disagree");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX2 and FMA were just detected; the lengths were just checked.
        unsafe { avx2::scale_mul(x, scale, w, out) };
        return;
    }
    scalar::scale_mul(x, scale, w, out)
}

/// SwiGLU in place: `gate[i] = silu(gate[i]) · up[i]` with `silu(g) = g / (1 + e^-g)`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert!(up.len() >= gate.len(), "swiglu: shapes disagree");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX2 and FMA were just detected; the lengths were just checked.
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
                scalar::matvec(mat, n_in, n_out, &xs, &mut slow, true);
                for (a, b) in fast.iter().zip(&slow) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{n_in}x{n_out}x{m}: {a} vs {b}");
                }
            }
        }
    }
}
