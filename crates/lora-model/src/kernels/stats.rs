//! [`softmax_stats`]: what the logit lens needs from each row of logits, in two passes over the row and no
//! intermediate tensors.
use super::isa::SimdPath;

/// Softmax statistics of one row of logits against its target token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftmaxStats {
    /// Probability of the target.
    pub target_prob: f32,
    /// Natural log of the target's probability (`l_target - m - ln s`, exact where the probability underflows).
    pub target_logprob: f32,
    /// Largest probability.
    pub max_prob: f32,
    /// 1-based rank of the target: 1 + the number of logits strictly larger than the target's.
    pub rank: f32,
    /// Entropy of the distribution, in nats (`0 · log 0 = 0`, so `-inf` logits contribute nothing).
    pub entropy: f32,
}

/// The [`SoftmaxStats`] of each row of `logits` (`rows × vocab`, row-major) against `targets[row]`, the rows shared
/// out between the cores (at most two threads, or one below 64 rows).
///
/// Per row: the maximum `m` and the rank in one pass; `s = Σ e^(l - m)` and `t = Σ e^(l - m)(l - m)` in a second
/// (the row is in cache by then); then `p(target) = e^(l_target - m) / s`, `max p = 1 / s` and
/// `H = ln s - t / s`. A row holding a NaN gives NaN statistics. On CPUs with AVX2/FMA the passes run eight
/// lanes at a time (exponentials within 2 ulp of `expf`); elsewhere in scalar code.
///
/// # Errors
/// A message when the shapes disagree or a target is outside `0..vocab`.
///
/// ```
/// # fn main() -> Result<(), String> {
/// let stats = lora_model::kernels::softmax_stats(&[0.0, 0.0, f32::NEG_INFINITY, 2.0f32.ln()], 4, &[3])?;
/// assert!((stats[0].target_prob - 0.5).abs() < 1e-6);
/// assert_eq!(stats[0].rank, 1.0);
/// # Ok(())
/// # }
/// ```
pub fn softmax_stats(logits: &[f32], vocab: usize, targets: &[i64]) -> Result<Vec<SoftmaxStats>, String> {
    if vocab == 0 || logits.len() != vocab * targets.len() {
        return Err(format!("softmax_stats: {} logits are not {} rows of {vocab}", logits.len(), targets.len()));
    }
    if let Some(t) = targets.iter().find(|&&t| t < 0 || t as usize >= vocab) {
        return Err(format!("softmax_stats: target {t} outside the vocabulary (0..{vocab})"));
    }
    let nan = SoftmaxStats {
        target_prob: f32::NAN,
        target_logprob: f32::NAN,
        max_prob: f32::NAN,
        rank: f32::NAN,
        entropy: f32::NAN,
    };
    let mut out = vec![nan; targets.len()];
    let vector = super::simd_path() != SimdPath::Scalar;
    let work = |rows: &[f32], tg: &[i64], out: &mut [SoftmaxStats]| {
        for ((row, &t), o) in rows.chunks_exact(vocab).zip(tg).zip(out.iter_mut()) {
            *o = row_stats(row, t as usize, vector);
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(2);
    if threads < 2 || targets.len() < 64 {
        work(logits, targets, &mut out);
    } else {
        let half = targets.len() / 2;
        let (l0, l1) = logits.split_at(half * vocab);
        let (t0, t1) = targets.split_at(half);
        let (o0, o1) = out.split_at_mut(half);
        std::thread::scope(|s| {
            s.spawn(|| work(l1, t1, o1));
            work(l0, t0, o0);
        });
    }
    Ok(out)
}

/// One row's statistics.
fn row_stats(row: &[f32], target: usize, vector: bool) -> SoftmaxStats {
    let lt = row.get(target).copied().unwrap_or(f32::NAN);
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: `vector` says the active path has AVX2 and FMA, which the CPU was checked for
        // (`SimdPath::supported`); the function only reads `row` within its length. Aliasing and threads: `row` is a
        // shared borrow, only read, on this thread.
        let (m, above, nan, s, t) = unsafe { avx2::passes(row, lt) };
        return finish(m, above, nan, s, t, lt);
    }
    let _ = vector;
    let (mut m, mut above, mut nan) = (f32::NEG_INFINITY, 0usize, false);
    for &l in row {
        m = m.max(l);
        above += usize::from(l > lt);
        nan |= l.is_nan();
    }
    let (mut s, mut t) = (0f64, 0f64);
    for &l in row {
        let d = (l - m).max(-88.0);
        let e = d.exp();
        s += f64::from(e);
        t += f64::from(e * d);
    }
    finish(m, above, nan, s as f32, t as f32, lt)
}

fn finish(m: f32, above: usize, nan: bool, s: f32, t: f32, lt: f32) -> SoftmaxStats {
    if nan || lt.is_nan() || !m.is_finite() {
        return SoftmaxStats {
            target_prob: f32::NAN,
            target_logprob: f32::NAN,
            max_prob: f32::NAN,
            rank: f32::NAN,
            entropy: f32::NAN,
        };
    }
    SoftmaxStats {
        target_logprob: (lt - m) - s.ln(),
        target_prob: (lt - m).max(-88.0).exp() / s * f32::from(u8::from(lt > f32::NEG_INFINITY)),
        max_prob: 1.0 / s,
        rank: 1.0 + above as f32,
        entropy: s.ln() - t / s,
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Horizontal sum of eight lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2)))
    }

    /// `(max, logits above lt, any NaN, Σ e^(l-m), Σ e^(l-m)(l-m))` of `row`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn passes(row: &[f32], lt: f32) -> (f32, usize, bool, f32, f32) {
        let n = row.len();
        let end = n - n % 8;
        let p = row.as_ptr();
        let (mut vm, mut above, mut nan) = (_mm256_set1_ps(f32::NEG_INFINITY), 0u32, 0i32);
        let vt = _mm256_set1_ps(lt);
        let mut i = 0;
        while i < end {
            // SAFETY: i + 8 <= n.
            let v = _mm256_loadu_ps(p.add(i));
            vm = _mm256_max_ps(vm, v);
            above += (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(v, vt)) as u32).count_ones();
            nan |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vm);
        let mut m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut above = above as usize;
        let mut any_nan = nan != 0;
        for &l in row.get(end..).unwrap_or(&[]) {
            m = m.max(l);
            above += usize::from(l > lt);
            any_nan |= l.is_nan();
        }
        let (vmx, floor) = (_mm256_set1_ps(m), _mm256_set1_ps(-88.0));
        let (mut s0, mut s1, mut t0, mut t1) =
            (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        let end16 = n - n % 16;
        let mut i = 0;
        while i < end16 {
            // SAFETY: i + 16 <= n.
            let d0 = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vmx), floor);
            let d1 = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8)), vmx), floor);
            let (e0, e1) = (super::super::simd::exp8_avx2(d0), super::super::simd::exp8_avx2(d1));
            s0 = _mm256_add_ps(s0, e0);
            s1 = _mm256_add_ps(s1, e1);
            t0 = _mm256_fmadd_ps(e0, d0, t0);
            t1 = _mm256_fmadd_ps(e1, d1, t1);
            i += 16;
        }
        let (mut s, mut t) = (hsum(_mm256_add_ps(s0, s1)), hsum(_mm256_add_ps(t0, t1)));
        for &l in row.get(end16..).unwrap_or(&[]) {
            let d = (l - m).max(-88.0);
            let e = d.exp();
            s += e;
            t += e * d;
        }
        (m, above, any_nan, s, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statistics in f64 from their definitions.
    fn reference(row: &[f32], t: usize) -> [f64; 5] {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&l| (l as f64 - m).exp()).sum();
        let p = |l: f32| (l as f64 - m).exp() / z;
        let h: f64 = row.iter().map(|&l| p(l)).filter(|&q| q > 0.0).map(|q| -q * q.ln()).sum();
        let rank = 1 + row.iter().filter(|&&l| l > row[t]).count();
        [p(row[t]), 1.0 / z, rank as f64, h, row[t] as f64 - m - z.ln()]
    }

    /// Rows of odd widths (whole vectors and tails), with `-inf` entries and ties, against the definitions, on the
    /// active path and the scalar one; a NaN row gives NaN.
    #[test]
    fn statistics_match_their_definitions() {
        let mut x = 7u64;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 20.0 - 10.0
        };
        for vocab in [1usize, 7, 8, 16, 33, 1000, 49152] {
            let rows = 70; // more than the threading threshold
            let mut logits: Vec<f32> = (0..rows * vocab).map(|_| next()).collect();
            for r in 0..rows {
                if vocab > 3 && r % 3 == 0 {
                    logits[r * vocab + 2] = f32::NEG_INFINITY;
                    logits[r * vocab + 1] = logits[r * vocab];
                }
            }
            let targets: Vec<i64> = (0..rows).map(|r| ((r * 31) % vocab) as i64).collect();
            for vector in [true, false] {
                let got: Vec<SoftmaxStats> = if vector {
                    softmax_stats(&logits, vocab, &targets).unwrap()
                } else {
                    logits.chunks(vocab).zip(&targets).map(|(row, &t)| row_stats(row, t as usize, false)).collect()
                };
                for (r, g) in got.iter().enumerate() {
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    let want = reference(row, targets[r] as usize);
                    let have = [g.target_prob, g.max_prob, g.rank, g.entropy, g.target_logprob].map(f64::from);
                    for (k, (h, w)) in have.iter().zip(want).enumerate() {
                        let close = *h == w || (h - w).abs() <= 1e-5 * w.abs().max(1.0);
                        assert!(close, "vocab {vocab} row {r} stat {k}: {h} vs {w}");
                    }
                }
            }
        }
        let nan = softmax_stats(&[1.0, f32::NAN, 0.0], 3, &[0]).unwrap();
        assert!(nan[0].target_prob.is_nan() && nan[0].entropy.is_nan());
        assert!(softmax_stats(&[1.0, 2.0], 2, &[2]).is_err());
        assert!(softmax_stats(&[1.0, 2.0, 3.0], 2, &[0]).is_err());
    }
}
