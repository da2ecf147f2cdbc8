//! Block dequantizers for the ggml storage types.
//!
//! Each function turns one block of raw bytes into `block_len` values, doing the float arithmetic in
//! `f32` in the same order as gguf-py's `gguf.quants` (and ggml's reference C code), so that the
//! results are bit-identical. The callers check lengths; each function takes exactly one block.

use half::f16;

/// Elements per K-quant super-block.
pub(crate) const QK_K: usize = 256;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `F32`: 4 bytes per value.
pub(crate) fn f32_block(b: &[u8], y: &mut [f32]) {
    for (v, c) in y.iter_mut().zip(b.chunks_exact(4)) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// `F16`: 2 bytes per value.
pub(crate) fn f16_block(b: &[u8], y: &mut [f32]) {
    for (v, c) in y.iter_mut().zip(b.chunks_exact(2)) {
        *v = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
}

/// `BF16`: the upper half of an `f32`.
pub(crate) fn bf16_block(b: &[u8], y: &mut [f32]) {
    for (v, c) in y.iter_mut().zip(b.chunks_exact(2)) {
        *v = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
    }
}

/// `Q4_0`: `d: f16, qs: [u8; 16]`; `y = d * (q - 8)`.
pub(crate) fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * ((qs[j] & 0x0F) as i8 - 8) as f32;
        y[j + 16] = d * ((qs[j] >> 4) as i8 - 8) as f32;
    }
}

/// `Q4_1`: `d: f16, m: f16, qs: [u8; 16]`; `y = d * q + m`.
pub(crate) fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * f32::from(qs[j] & 0x0F) + m;
        y[j + 16] = d * f32::from(qs[j] >> 4) + m;
    }
}

/// The 5th bits of a `Q5_x` block, one per element.
#[inline]
fn q5_high(qh: &[u8]) -> u32 {
    u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]])
}

/// `Q5_0`: `d: f16, qh: u32, qs: [u8; 16]`; `y = d * (q - 16)`.
pub(crate) fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = q5_high(&b[2..6]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        y[j] = d * (((qs[j] & 0x0F) | (h0 << 4)) as i8 - 16) as f32;
        y[j + 16] = d * (((qs[j] >> 4) | (h1 << 4)) as i8 - 16) as f32;
    }
}

/// `Q5_1`: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; `y = d * q + m`.
pub(crate) fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = q5_high(&b[4..8]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        y[j] = d * f32::from((qs[j] & 0x0F) | (h0 << 4)) + m;
        y[j + 16] = d * f32::from((qs[j] >> 4) | (h1 << 4)) + m;
    }
}

/// `Q8_0`: `d: f16, qs: [i8; 32]`; `y = q * d`.
pub(crate) fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..34]) {
        *v = f32::from(q as i8) * d;
    }
}

/// `Q2_K`: `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`.
pub(crate) fn q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for (i, v) in y.iter_mut().enumerate().take(QK_K) {
        let sc = scales[i / 16];
        let dl = d * f32::from(sc & 0x0F);
        let ml = dmin * f32::from(sc >> 4);
        let (chunk, shift, l) = (i / 128, (i % 128) / 32, i % 32);
        let q = (qs[chunk * 32 + l] >> (2 * shift)) & 3;
        *v = dl * f32::from(q) - ml;
    }
}

/// `Q3_K`: `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`.
pub(crate) fn q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let sc = &b[96..108];
    let d = f16_at(b, 108);
    let mut dl = [0f32; 16];
    for (k, out) in dl.iter_mut().enumerate() {
        let low = (sc[k % 8] >> (4 * (k / 8))) & 0x0F;
        let high = (sc[8 + k % 4] >> (2 * (k / 4))) & 0x03;
        let s = (low | (high << 4)) as i8 - 32;
        *out = d * f32::from(s);
    }
    for (i, v) in y.iter_mut().enumerate().take(QK_K) {
        let (chunk, shift, l) = (i / 128, (i % 128) / 32, i % 32);
        let ql = ((qs[chunk * 32 + l] >> (2 * shift)) & 3) as i8;
        let hbit = (hmask[l] >> (i / 32)) & 1;
        let q = ql - (((hbit ^ 1) << 2) as i8);
        *v = dl[i / 16] * f32::from(q);
    }
}

/// The 6-bit scales and mins of `Q4_K` / `Q5_K`.
fn scale_min_k4(scales: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = scales[j] & 0x3F;
        mn[j] = scales[j + 4] & 0x3F;
        sc[j + 4] = (scales[j + 8] & 0x0F) | ((scales[j] >> 2) & 0x30);
        mn[j + 4] = (scales[j + 8] >> 4) | ((scales[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

/// `Q4_K`: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`.
pub(crate) fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qs = &b[16..144];
    for s in 0..8 {
        let dl = d * f32::from(sc[s]);
        let ml = dmin * f32::from(mn[s]);
        let (chunk, nib) = (s / 2, s % 2);
        for l in 0..32 {
            let q = (qs[chunk * 32 + l] >> (4 * nib)) & 0x0F;
            y[s * 32 + l] = dl * f32::from(q) - ml;
        }
    }
}

/// `Q5_K`: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`.
pub(crate) fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qh = &b[16..48];
    let qs = &b[48..176];
    for s in 0..8 {
        let dl = d * f32::from(sc[s]);
        let ml = dmin * f32::from(mn[s]);
        let (chunk, nib) = (s / 2, s % 2);
        for l in 0..32 {
            let low = (qs[chunk * 32 + l] >> (4 * nib)) & 0x0F;
            let high = (qh[l] >> s) & 1;
            y[s * 32 + l] = dl * f32::from(low | (high << 4)) - ml;
        }
    }
}

/// `Q6_K`: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.
pub(crate) fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    let mut dl = [0f32; 16];
    for (out, &s) in dl.iter_mut().zip(scales) {
        *out = d * f32::from(s as i8);
    }
    for (i, v) in y.iter_mut().enumerate().take(QK_K) {
        let (half, r) = (i / 128, i % 128);
        let (nib, l64) = (r / 64, r % 64);
        let low = (ql[half * 64 + l64] >> (4 * nib)) & 0x0F;
        let (sel, l32) = (r / 32, r % 32);
        let high = (qh[half * 32 + l32] >> (2 * sel)) & 0x03;
        let q = (low | (high << 4)) as i8 - 32;
        *v = dl[i / 16] * f32::from(q);
    }
}
