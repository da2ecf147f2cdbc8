//! The AVX2/FMA loops (x86-64).
//!
//! Every function here is compiled with `#[target_feature(enable = "avx2,fma")]`, so calling one is `unsafe`:
//! the caller must have checked that the CPU has both ([`SimdPath::supported`](crate::kernels::SimdPath::supported) of the active path), and must pass slices that hold
//! every value the documented shapes say (the loops use unchecked pointer loads and stores). Stores go only
//! through pointers derived from the `&mut` output slice of the same call; inputs are read through pointers
//! derived from shared slices and are never written.
use std::arch::x86_64::*;

use super::{Side, TileSide};
use crate::kernels::borrow::Mat;

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
pub unsafe fn dot(a: &[f32], b: Mat<'_>) -> f32 {
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
pub unsafe fn axpy(y: &mut [f32], alpha: f32, x: Mat<'_>) {
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
pub unsafe fn scale_mul(x: &[f32], scale: f32, w: Mat<'_>, out: &mut [f32]) {
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
pub(super) unsafe fn exp8(x: __m256) -> __m256 {
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

/// Eight f32 (or bf16, widened) weights at `w[k..k + 8]`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load8(w: Mat<'_>, k: usize) -> __m256 {
    match w {
        Mat::F32(w) => _mm256_loadu_ps(w.as_ptr().add(k)),
        Mat::Bf16(w) => {
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

/// Narrow matrices (`n_in` a multiple of 8, at most `NARROW_MAX` of [`super`]: LoRA's `B`, `n_in` = r): eight
/// weight rows at a time, their eight dot products reduced together by [`finish8`] instead of one
/// horizontal sum per row, which would cost more than the row itself. bf16 rows whose width is a multiple
/// of 16 take 16 columns per load (even and odd columns, as in [`row_bf16`]; `split` holds the rows in that
/// order, and is only read then).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn matvec_narrow(
    w: Mat<'_>,
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
            Mat::F32(w) => {
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
            Mat::Bf16(w) if n_in.is_multiple_of(16) => {
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
            Mat::Bf16(wb) => {
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
unsafe fn row_f32(wp: *const f32, n_in: usize, x: &[f32], side: TileSide<f32, 1>) -> f32 {
    let xp = x.as_ptr();
    let end = n_in - n_in % 32;
    let mut a = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < end {
        let pf = (wp as *const i8).wrapping_add(i * 4 + AHEAD);
        _mm_prefetch::<_MM_HINT_T0>(pf);
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64));
        for (k, acc) in a.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i + 8 * k)), _mm256_loadu_ps(xp.add(i + 8 * k)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n_in {
        a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a[0]);
        i += 8;
    }
    let mut c = 0;
    while c + 8 <= side.r {
        a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(side.b.add(c)), _mm256_loadu_ps(side.xa[0].add(c)), a[1]);
        c += 8;
    }
    let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    while i < n_in {
        s += *wp.add(i) * x[i];
        i += 1;
    }
    while c < side.r {
        s += *side.b.add(c) * *side.xa[0].add(c);
        c += 1;
    }
    s
}

/// `y[m][o] (+)= W[o] · xs[m]` (`+ B[o] · xa[m]` with a [`Side`], in the same accumulators), one weight row at a
/// time: the rows of a matrix are contiguous, so the product reads the weights as one sequential stream (the
/// hardware prefetcher's best case, helped by a software prefetch a fixed distance ahead); further activation rows
/// re-read the weight row from L1.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn matvec_f32(
    w: &[f32],
    n_in: usize,
    n_out: usize,
    xs: &[&[f32]],
    side: Option<Side<'_>>,
    y: &mut [f32],
    add: bool,
) {
    let bs = side.as_ref().and_then(Side::values::<f32>);
    for o in 0..n_out {
        let wp = w[o * n_in..(o + 1) * n_in].as_ptr();
        for (m, x) in xs.iter().enumerate() {
            store(y, m * n_out + o, row_f32(wp, n_in, x, TileSide::at(bs, o, m)), add);
        }
    }
}

/// Dot product of bf16 weight row `row` (`n_in` long) with an activation row given both as is (`x`) and
/// with each 16-column block split into its even and odd columns (`xs`): a 32-bit lane holds two bf16
/// values, so shifting it left by 16 gives the even column as f32 and masking off the low half the odd
/// one. 32 columns (one cache line) per step in four accumulators, prefetching [`AHEAD`] bytes ahead.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn row_bf16(row: &[u16], x: &[f32], xs: &[f32], side: TileSide<u16, 1>) -> f32 {
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
    let mut c = 0;
    while c + 8 <= side.r {
        let h = _mm_loadu_si128(side.b.add(c) as *const __m128i);
        let bv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        a[2] = _mm256_fmadd_ps(bv, _mm256_loadu_ps(side.xa[0].add(c)), a[2]);
        c += 8;
    }
    let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    while i < n_in {
        s += f32::from_bits(u32::from(row[i]) << 16) * x[i];
        i += 1;
    }
    while c < side.r {
        s += f32::from_bits(u32::from(*side.b.add(c)) << 16) * *side.xa[0].add(c);
        c += 1;
    }
    s
}

/// [`matvec_f32`] for bf16 weights; `split` holds the rows of `xs` (`[rows, n_in]`, flat) in
/// [`row_bf16`]'s column order.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn matvec_bf16(
    w: &[u16],
    n_in: usize,
    n_out: usize,
    xs: &[&[f32]],
    split: &[f32],
    side: Option<Side<'_>>,
    y: &mut [f32],
    add: bool,
) {
    let bs = side.as_ref().and_then(Side::values::<u16>);
    for o in 0..n_out {
        let row = &w[o * n_in..(o + 1) * n_in];
        for (m, (x, xp)) in xs.iter().zip(split.chunks_exact(n_in)).enumerate() {
            store(y, m * n_out + o, row_bf16(row, x, xp, TileSide::at(bs, o, m)), add);
        }
    }
}

/// Attention scores of `g` query heads against `s` key rows: `out[h · s + j] = (q_h · k_j) · scale`, with `qs`
/// `[g, hd]` and `keys` `[s, hd]` row-major, `hd` a multiple of 8. Each dot product is summed exactly as [`dot`]
/// sums it (one 8-lane accumulator over the columns in order, then [`hsum`]), so the scores are the same bits as
/// `s · g` calls of [`dot`], without a call, a dispatch and a slice per position.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn attn_scores(qs: &[f32], keys: Mat<'_>, hd: usize, s: usize, scale: f32, out: &mut [f32]) {
    let g = qs.len() / hd;
    let (pq, po) = (qs.as_ptr(), out.as_mut_ptr());
    let sv = _mm_set1_ps(scale);
    for h in 0..g {
        let q = pq.add(h * hd);
        let o = po.add(h * s);
        // Four positions at a time: four independent sums sharing each load of the query, reduced together.
        let mut j = 0;
        while j + 4 <= s {
            let k = j * hd;
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < hd {
                let qv = _mm256_loadu_ps(q.add(c));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qv, load8(keys, k + i * hd + c), *a);
                }
                c += 8;
            }
            _mm_storeu_ps(o.add(j), _mm_mul_ps(hsum4(acc), sv));
            j += 4;
        }
        while j < s {
            let k = j * hd;
            let mut acc = _mm256_setzero_ps();
            let mut c = 0;
            while c < hd {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c)), load8(keys, k + c), acc);
                c += 8;
            }
            *o.add(j) = hsum(acc) * scale;
            j += 1;
        }
    }
}

/// The [`hsum`] of each of four vectors, as lanes 0–3 (each summed in the same order as [`hsum`] sums it:
/// the two halves, then adjacent pairs, then the two pair sums).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum4(v: [__m256; 4]) -> __m128 {
    let a = _mm_add_ps(_mm256_castps256_ps128(v[0]), _mm256_extractf128_ps(v[0], 1));
    let b = _mm_add_ps(_mm256_castps256_ps128(v[1]), _mm256_extractf128_ps(v[1], 1));
    let c = _mm_add_ps(_mm256_castps256_ps128(v[2]), _mm256_extractf128_ps(v[2], 1));
    let d = _mm_add_ps(_mm256_castps256_ps128(v[3]), _mm256_extractf128_ps(v[3], 1));
    _mm_hadd_ps(_mm_hadd_ps(a, b), _mm_hadd_ps(c, d))
}

/// Attention outputs of `g` heads over `s` value rows: `out[h] = Σⱼ ws[h · s + j] · v_j` (`out` `[g, hd]`,
/// `values` `[s, hd]` row-major, `hd` a multiple of 8), positions with a zero weight skipped. Each output value is
/// accumulated from zero over the positions in order with one fused multiply-add each, exactly as repeated
/// [`axpy`] calls accumulate it (the same bits), but with up to 64 columns held in registers across the positions.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn attn_values(ws: &[f32], values: Mat<'_>, hd: usize, s: usize, out: &mut [f32]) {
    let g = out.len() / hd;
    let mut c = 0;
    while c < hd {
        let nb = ((hd - c) / 8).min(8);
        for h in 0..g {
            let w = &ws[h * s..(h + 1) * s];
            let dst = out.as_mut_ptr().add(h * hd + c);
            match nb {
                8 => values_cols::<8>(w, values, hd, c, dst),
                7 => values_cols::<7>(w, values, hd, c, dst),
                6 => values_cols::<6>(w, values, hd, c, dst),
                5 => values_cols::<5>(w, values, hd, c, dst),
                4 => values_cols::<4>(w, values, hd, c, dst),
                3 => values_cols::<3>(w, values, hd, c, dst),
                2 => values_cols::<2>(w, values, hd, c, dst),
                _ => values_cols::<1>(w, values, hd, c, dst),
            }
        }
        c += nb * 8;
    }
}

/// `NB · 8` columns (from column `c`) of one head's [`attn_values`] into `dst`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn values_cols<const NB: usize>(w: &[f32], values: Mat<'_>, hd: usize, c: usize, dst: *mut f32) {
    let mut acc = [_mm256_setzero_ps(); NB];
    for (j, &wj) in w.iter().enumerate() {
        if wj != 0.0 {
            let a = _mm256_set1_ps(wj);
            let base = j * hd + c;
            for (b, v) in acc.iter_mut().enumerate() {
                *v = _mm256_fmadd_ps(a, load8(values, base + 8 * b), *v);
            }
        }
    }
    for (b, v) in acc.iter().enumerate() {
        _mm256_storeu_ps(dst.add(8 * b), *v);
    }
}
