//! The AVX-512 loops (x86-64): f32 weights with 16-lane FMA, bf16 weights widened (shift/mask, 32 per load) or
//! multiplied in pairs by `vdpbf16ps` (AVX512-BF16).
//!
//! Every function here is compiled with `#[target_feature(enable = …)]` for AVX-512 F/BW/VL (plus AVX512-BF16 for
//! the `dpbf16` loops), so calling one is `unsafe`: the caller must have checked at run time that the CPU has
//! them ([`SimdPath::supported`](crate::kernels::SimdPath::supported), which the dispatch in [`super`] relies on)
//! and must pass slices that hold every value the documented shapes say (the loops use unchecked pointer loads
//! and stores; the columns past the last whole vector are read with masked loads, which touch no masked-out
//! address). Stores go only through the `&mut` output slice of the same call; inputs are read through pointers
//! derived from shared slices and are never written.
//!
//! Activation rows are taken in tiles (of up to [`TILE`] for bf16 weights; f32 weights take blocks of weight rows
//! against up to eight activation rows, see [`matvec_f32`]): each weight vector is loaded (and widened) once for the
//! whole tile, and every activation row has its own accumulators. The arithmetic of one row does not depend on
//! the tile it lands in, so a row's result is the same whatever the batch around it.
use std::arch::x86_64::*;

use super::{Side, TileSide};

/// How far ahead of the current column (in bytes of the same weight row, running on into the next rows) the
/// one-activation-row loops prefetch, into L2: 8 KB. A batch-1 product is a sequential stream whose speed is set
/// by how many cache lines are in flight; prefetching a kilobyte ahead into L1 (the AVX2 loops' distance, tuned on
/// Zen 1) keeps too few in flight on the Xeon VM of `docs/performance.md`, where SmolLM2's projections (one
/// activation row, all 30 blocks) took 9.3 ms in bf16 and 16.9 ms in f32 that way against 7.7 ms and 16.0 ms with
/// this distance into L2 (4 KB: 8.6 ms; 8 KB into L1: 9.3 ms).
const AHEAD: usize = 8192;

/// How far ahead of the current row of a [`Side`]'s `B` the loops prefetch it (bytes: 16 rows at r = 16 in bf16).
const B_AHEAD: usize = 512;

/// Activation rows that share one load of a weight vector.
pub const TILE: usize = 4;

/// `(1 << n) - 1` for `n < 16` (the lanes of a partial vector); all lanes from 16 on.
#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// `(1 << n) - 1` for `n < 32`; all lanes from 32 on.
#[inline(always)]
fn mask32(n: usize) -> __mmask32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

/// Prefetches the four cache lines [`AHEAD`] bytes past `p` into L2.
///
/// The bf16 loops call this once per two lines they read, so that every line is asked for twice, 128
/// bytes of stream apart. On the Xeon VM of `docs/performance.md` a second request for the same line streams
/// faster than one (one thread over 270 MB of rows of 576 bf16 values: 15.1–15.4 GB/s with one prefetch per line,
/// 17.1–17.8 GB/s with two; three were no better), as though single requests were sometimes dropped.
#[inline(always)]
unsafe fn prefetch4(p: *const u8) {
    let pf = p.wrapping_add(AHEAD) as *const i8;
    for l in 0..4 {
        _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(64 * l));
    }
}

#[inline(always)]
fn store(y: &mut [f32], k: usize, v: f32, add: bool) {
    if add {
        y[k] += v;
    } else {
        y[k] = v;
    }
}

/// Runs `tile::<R>` over the activation rows `0..m` in tiles of [`TILE`] (the last one shorter), with the weight
/// row `o`; `tile(start, sums)` fills `sums[..R]` for rows `start..start + R`.
macro_rules! for_tiles {
    ($m:expr, |$start:ident, $r:ident| $call:expr, $emit:expr) => {{
        let mut $start = 0;
        while $start < $m {
            let left = $m - $start;
            let mut sums = [0f32; TILE];
            match left.min(TILE) {
                1 => {
                    const $r: usize = 1;
                    sums[..1].copy_from_slice(&$call);
                }
                2 => {
                    const $r: usize = 2;
                    sums[..2].copy_from_slice(&$call);
                }
                3 => {
                    const $r: usize = 3;
                    sums[..3].copy_from_slice(&$call);
                }
                _ => {
                    const $r: usize = TILE;
                    sums.copy_from_slice(&$call);
                }
            }
            let n = left.min(TILE);
            $emit($start, &sums[..n]);
            $start += n;
        }
    }};
}

impl<const R: usize> TileSide<u16, R> {
    /// Adds `B[o] · xa[r]` (the bf16 row widened, 16 columns per step, the last step masked) into accumulator
    /// `slot` of each activation row `r`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    #[inline]
    unsafe fn add_bf16(&self, acc: &mut [[__m512; 4]; R], slot: usize) {
        if self.r > 0 {
            // `B`'s rows are a second, short stream beside W's: its next lines, a few rows on.
            _mm_prefetch::<_MM_HINT_T0>((self.b as *const i8).wrapping_add(B_AHEAD));
        }
        let mut c = 0;
        while c < self.r {
            let k = mask16(self.r - c);
            let w = widen16(self.b.add(c), self.r - c);
            for (r, a) in acc.iter_mut().enumerate() {
                a[slot] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(k, self.xa[r].add(c)), a[slot]);
            }
            c += 16;
        }
    }
}

/// Dot products of `RW` consecutive f32 weight rows at `wp` (`n_in` values each) with the `RX` activation rows at
/// `xp`: 16 columns per step, one accumulator per (weight row, activation row) pair, so each step loads `RW + RX`
/// vectors for `RW · RX` FMAs; the columns past the last whole 16 masked. A pair's sum is taken in the same order
/// (16-column chunks from the first, then one horizontal sum) whatever `RW` and `RX` are, so a row's result does
/// not depend on the block it lands in. Each step also prefetches the same columns `ahead` bytes further on
/// (into L1, or into L2 when `far`): with one activation row [`AHEAD`] bytes on in the stream; with several, the
/// next block of weight rows, so that memory keeps streaming while the later tiles compute from L1.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
unsafe fn block_f32<const RW: usize, const RX: usize>(
    wp: *const f32,
    n_in: usize,
    xp: [*const f32; RX],
    ahead: usize,
    far: bool,
    side: TileSide<f32, RX>,
) -> [[f32; RX]; RW] {
    let mut acc = [[_mm512_setzero_ps(); RX]; RW];
    let end = n_in - n_in % 16;
    let mut i = 0;
    while i < end {
        for w in 0..RW {
            let p = (wp.add(w * n_in + i) as *const i8).wrapping_add(ahead);
            if far {
                _mm_prefetch::<_MM_HINT_T1>(p);
            } else {
                _mm_prefetch::<_MM_HINT_T0>(p);
            }
        }
        let x: [__m512; RX] = std::array::from_fn(|r| _mm512_loadu_ps(xp[r].add(i)));
        for (w, a) in acc.iter_mut().enumerate() {
            let v = _mm512_loadu_ps(wp.add(w * n_in + i));
            for (r, a) in a.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(v, x[r], *a);
            }
        }
        i += 16;
    }
    if i < n_in {
        let k = mask16(n_in - i);
        let x: [__m512; RX] = std::array::from_fn(|r| _mm512_maskz_loadu_ps(k, xp[r].add(i)));
        for (w, a) in acc.iter_mut().enumerate() {
            let v = _mm512_maskz_loadu_ps(k, wp.add(w * n_in + i));
            for (r, a) in a.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(v, x[r], *a);
            }
        }
    }
    if side.r > 0 {
        _mm_prefetch::<_MM_HINT_T0>((side.b as *const i8).wrapping_add(B_AHEAD));
    }
    let mut c = 0;
    while c < side.r {
        let k = mask16(side.r - c);
        let x: [__m512; RX] = std::array::from_fn(|r| _mm512_maskz_loadu_ps(k, side.xa[r].add(c)));
        for (w, a) in acc.iter_mut().enumerate() {
            let v = _mm512_maskz_loadu_ps(k, side.b.add(w * side.r + c));
            for (r, a) in a.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(v, x[r], *a);
            }
        }
        c += 16;
    }
    let mut out = [[0f32; RX]; RW];
    if RW * RX == 16 {
        let flat: [__m512; 16] = std::array::from_fn(|j| acc[j / RX][j % RX]);
        let mut sums = [0f32; 16];
        _mm512_storeu_ps(sums.as_mut_ptr(), hsum16(&flat));
        for (j, v) in sums.iter().enumerate() {
            out[j / RX][j % RX] = *v;
        }
    } else {
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, a) in o.iter_mut().zip(a) {
                *o = hsum(*a);
            }
        }
    }
    out
}

/// The sum of the 16 lanes of `a`, always in the same order: lanes `i` and `i + 8` first, then `i` and `i + 4`
/// of those, then `i` and `i + 2`, then the last two ([`hsum16`] adds in exactly this order).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
unsafe fn hsum(a: __m512) -> f32 {
    let s8 =
        _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))));
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2)))
}

/// Lane `j` of the result is [`hsum`]`(v[j])`, bit for bit (the same additions in the same order, four
/// levels of pairwise shuffles instead of sixteen separate reductions).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
unsafe fn hsum16(v: &[__m512; 16]) -> __m512 {
    // Level 1: [a + a.hi8 | b + b.hi8] per pair.
    let l1: [__m512; 8] = std::array::from_fn(|k| {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b))
    });
    // Level 2: each 128-bit quarter q of the result is s4 of vector 4m + q.
    let l2: [__m512; 4] = std::array::from_fn(|m| {
        let (a, b) = (l1[2 * m], l1[2 * m + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
    });
    // Level 3: within each quarter, lanes 0-1 are s2 of the first input, 2-3 of the second.
    let l3: [__m512; 2] = std::array::from_fn(|n| {
        let (a, b) = (l2[2 * n], l2[2 * n + 1]);
        _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b))
    });
    // Level 4: lane 4q + j holds the sum of vector 4j + q.
    let (a, b) = (l3[0], l3[1]);
    let r = _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(a, b), _mm512_shuffle_ps::<0b11_01_11_01>(a, b));
    // Vector i sits in lane 4 (i % 4) + i / 4.
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(idx, r)
}

/// The weight rows `o0..o0 + RW` of [`matvec_f32`] against every activation row, in tiles of up to `T`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_f32<const RW: usize, const T: usize>(
    w: &[f32],
    n_in: usize,
    n_out: usize,
    o0: usize,
    xs: &[&[f32]],
    side: Option<(&[f32], &Side<'_>)>,
    y: &mut [f32],
    add: bool,
) {
    let wp = w.as_ptr().add(o0 * n_in);
    let m = xs.len();
    // One row: [`AHEAD`] bytes on in this stream, into L2; several: the next block of weight rows.
    let (ahead, far) = if m == 1 { (AHEAD, true) } else { (RW * n_in * 4, RW * n_in * 4 > 16 << 10) };
    let mut start = 0;
    while start < m {
        let n = (m - start).min(T);
        let xp = |r: usize| xs[start + r].as_ptr();
        macro_rules! emit {
            ($rx:literal) => {{
                let side = TileSide::at(side, o0, start);
                let sums = block_f32::<RW, $rx>(wp, n_in, std::array::from_fn(xp), ahead, far, side);
                for (w, row) in sums.iter().enumerate() {
                    for (r, v) in row.iter().enumerate() {
                        store(y, (start + r) * n_out + o0 + w, *v, add);
                    }
                }
            }};
        }
        match n {
            1 => emit!(1),
            2 => emit!(2),
            3 => emit!(3),
            4 => emit!(4),
            5 => emit!(5),
            6 => emit!(6),
            7 => emit!(7),
            _ => emit!(8),
        }
        start += n;
    }
}

/// `y[m][o] (+)= W[o] · xs[m]` for the `n_out` f32 rows of `w` (`[n_out, n_in]`), into `y` (`[xs.len(), n_out]`).
/// One activation row: one weight row at a time (a single sequential stream, which the memory bandwidth limits).
/// Several: blocks of weight rows (4 for up to 4 activation rows, 2 against up to 8) in one pass, so that each loaded
/// vector feeds several FMAs (with many rows the product is limited by arithmetic, not bandwidth). Both give each
/// row the same sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
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
    let mut o = 0;
    let m = xs.len();
    if (2..=4).contains(&m) {
        while o + 4 <= n_out {
            rows_f32::<4, 4>(w, n_in, n_out, o, xs, bs, y, add);
            o += 4;
        }
    } else if m > 4 {
        while o + 2 <= n_out {
            rows_f32::<2, 8>(w, n_in, n_out, o, xs, bs, y, add);
            o += 2;
        }
    }
    while o < n_out {
        rows_f32::<1, 8>(w, n_in, n_out, o, xs, bs, y, add);
        o += 1;
    }
}

/// Sixteen bf16 values at `p` (the first `n` of them; the rest read as 0) widened to f32 in column order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
unsafe fn widen16(p: *const u16, n: usize) -> __m512 {
    let h = _mm256_maskz_loadu_epi16(mask16(n), p as *const i16);
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// Dot products of the bf16 weight row at `wp` (`n_in` values) with `R` activation rows given in
/// [`super::Layout::Split32`] order (`sp`: each whole 32-column block as its 16 even columns, then its 16 odd
/// ones; the columns past the last whole block in their own order). A 32-bit lane holds two bf16 values: shifting
/// it left by 16 gives the even column as f32, masking off the low half the odd one. 64 columns (two cache lines)
/// per step in four accumulators per row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[inline]
unsafe fn tile_bf16<const R: usize>(
    wp: *const u16,
    n_in: usize,
    sp: [*const f32; R],
    side: TileSide<u16, R>,
) -> [f32; R] {
    let high = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
    let even = |v: __m512i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
    let odd = |v: __m512i| _mm512_castsi512_ps(_mm512_and_si512(v, high));
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    let end = n_in - n_in % 64;
    let mut i = 0;
    while i < end {
        prefetch4(wp.add(i) as *const u8);
        let v0 = _mm512_loadu_si512(wp.add(i) as *const __m512i);
        let v1 = _mm512_loadu_si512(wp.add(i + 32) as *const __m512i);
        let w = [even(v0), odd(v0), even(v1), odd(v1)];
        for r in 0..R {
            for k in 0..4 {
                acc[r][k] = _mm512_fmadd_ps(w[k], _mm512_loadu_ps(sp[r].add(i + 16 * k)), acc[r][k]);
            }
        }
        i += 64;
    }
    if i + 32 <= n_in {
        let v = _mm512_loadu_si512(wp.add(i) as *const __m512i);
        let (e, d) = (even(v), odd(v));
        for r in 0..R {
            acc[r][0] = _mm512_fmadd_ps(e, _mm512_loadu_ps(sp[r].add(i)), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(d, _mm512_loadu_ps(sp[r].add(i + 16)), acc[r][1]);
        }
        i += 32;
    }
    while i < n_in {
        let k = mask16(n_in - i);
        let w = widen16(wp.add(i), n_in - i);
        for r in 0..R {
            acc[r][2] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(k, sp[r].add(i)), acc[r][2]);
        }
        i += 16;
    }
    side.add_bf16(&mut acc, 3);
    let mut out = [0f32; R];
    for r in 0..R {
        let a = &acc[r];
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
    }
    out
}

/// [`matvec_f32`] for bf16 weights, widened; `split` holds the activation rows (`[xs.len(), n_in]`, flat) in
/// [`super::Layout::Split32`] order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn matvec_bf16(
    w: &[u16],
    n_in: usize,
    n_out: usize,
    m: usize,
    split: &[f32],
    side: Option<Side<'_>>,
    y: &mut [f32],
    add: bool,
) {
    let sp = split.as_ptr();
    let bs = side.as_ref().and_then(Side::values::<u16>);
    for o in 0..n_out {
        let wp = w.as_ptr().add(o * n_in);
        for_tiles!(
            m,
            |start, R| tile_bf16::<R>(
                wp,
                n_in,
                std::array::from_fn(|r| sp.add((start + r) * n_in)),
                TileSide::at(bs, o, start)
            ),
            |start: usize, sums: &[f32]| {
                for (r, s) in sums.iter().enumerate() {
                    store(y, (start + r) * n_out + o, *s, add);
                }
            }
        );
    }
}

/// Dot products of the bf16 weight row at `wp` (`n_in` values) with `R` activation rows in bf16 (`xp`, column
/// order): `vdpbf16ps` multiplies the two bf16 values of each 32-bit lane and adds both products to the f32 lane.
/// 64 columns (two cache lines) per step, alternately into accumulators 0-1 and 2-3 of each row; the columns past
/// the last whole 64 in steps of 32 (masked at the end) into the first.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
#[inline]
unsafe fn tile_dpbf16<const R: usize>(
    wp: *const u16,
    n_in: usize,
    xp: [*const u16; R],
    side: TileSide<u16, R>,
) -> [f32; R] {
    // SAFETY (of every `transmute` below): `__m512i` and `__m512bh` are both 64-byte vectors of plain bits with no
    // invalid values; the instruction reads the bits as 32 bf16 values.
    let bh = |v: __m512i| -> __m512bh { unsafe { std::mem::transmute::<__m512i, __m512bh>(v) } };
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    // Two cache lines (64 columns) per step, alternately into accumulators 0-1 and 2-3 (four independent chains).
    // Each step prefetches the four lines [`AHEAD`] bytes on, so every line is asked for twice, one step apart:
    // see [`prefetch4`] for why.
    let pair = |acc: &mut [[__m512; 4]; R], i: usize, s: usize| {
        prefetch4(wp.add(i) as *const u8);
        let w = [0, 1].map(|k| bh(_mm512_loadu_si512(wp.add(i + 32 * k) as *const __m512i)));
        for r in 0..R {
            for (k, &w) in w.iter().enumerate() {
                let x = bh(_mm512_loadu_si512(xp[r].add(i + 32 * k) as *const __m512i));
                acc[r][s + k] = _mm512_dpbf16_ps(acc[r][s + k], w, x);
            }
        }
    };
    let mut i = 0;
    while i + 128 <= n_in {
        pair(&mut acc, i, 0);
        pair(&mut acc, i + 64, 2);
        i += 128;
    }
    if i + 64 <= n_in {
        pair(&mut acc, i, 0);
        i += 64;
    }
    // The last 1-63 columns: one or two (masked) loads of 32.
    while i < n_in {
        let k = mask32(n_in - i);
        let w = bh(_mm512_maskz_loadu_epi16(k, wp.add(i) as *const i16));
        for r in 0..R {
            let x = bh(_mm512_maskz_loadu_epi16(k, xp[r].add(i) as *const i16));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w, x);
        }
        i += 32;
    }
    side.add_bf16(&mut acc, 1);
    let mut out = [0f32; R];
    for r in 0..R {
        let a = &acc[r];
        out[r] = hsum(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
    }
    out
}

/// [`matvec_f32`] for bf16 weights with `vdpbf16ps`; `pairs` holds the activation rows rounded to bf16
/// ([`super::Layout::Bf16`]: `m` rows of `stride` values, bf16 bits, column order).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn matvec_dpbf16(
    w: &[u16],
    n_in: usize,
    n_out: usize,
    m: usize,
    pairs: &[u16],
    stride: usize,
    side: Option<Side<'_>>,
    y: &mut [f32],
    add: bool,
) {
    let xp = pairs.as_ptr();
    let bs = side.as_ref().and_then(Side::values::<u16>);
    for o in 0..n_out {
        let wp = w.as_ptr().add(o * n_in);
        for_tiles!(
            m,
            |start, R| tile_dpbf16::<R>(
                wp,
                n_in,
                std::array::from_fn(|r| xp.add((start + r) * stride)),
                TileSide::at(bs, o, start)
            ),
            |start: usize, sums: &[f32]| {
                for (r, s) in sums.iter().enumerate() {
                    store(y, (start + r) * n_out + o, *s, add);
                }
            }
        );
    }
}
