//! Portable loops: what the dispatch in [`super`] runs on a CPU without AVX2 and FMA, and the reference the
//! vector loops are tested against. Same shapes and arithmetic as the dispatching functions they stand in for.
use super::Side;
use crate::kernels::borrow::Mat;

/// `y[m][o] (+)= Σᵢ W[o][i] xs[m][i] (+ Σⱼ B[o][j] xa[m][j])` for the `n_out` rows of `w` (`[n_out, n_in]`), into
/// `y` laid out `[xs.len(), n_out]` (added to what `y` holds when `add`).
pub fn matvec(w: Mat<'_>, n_in: usize, n_out: usize, xs: &[&[f32]], side: Option<Side<'_>>, y: &mut [f32], add: bool) {
    for o in 0..n_out {
        for (m, x) in xs.iter().enumerate() {
            let mut s: f32 = (0..n_in).map(|i| w.get(o * n_in + i) * x[i]).sum();
            if let Some(side) = &side {
                s += (0..side.r).map(|j| side.b.get(o * side.r + j) * side.xa[m][j]).sum::<f32>();
            }
            let dst = &mut y[m * n_out + o];
            *dst = if add { *dst + s } else { s };
        }
    }
}

/// `Σ a[i] b[i]` over `a.len()` values (`b` at least as long).
pub fn dot(a: &[f32], b: Mat<'_>) -> f32 {
    a.iter().enumerate().map(|(i, x)| x * b.get(i)).sum()
}

/// `y[i] += alpha · x[i]` over `y.len()` values (`x` at least as long).
pub fn axpy(y: &mut [f32], alpha: f32, x: Mat<'_>) {
    for (i, a) in y.iter_mut().enumerate() {
        *a += alpha * x.get(i);
    }
}

/// `out[i] = (x[i] · scale) · w[i]`.
pub fn scale_mul(x: &[f32], scale: f32, w: Mat<'_>, out: &mut [f32]) {
    for (i, (v, o)) in x.iter().zip(out.iter_mut()).enumerate() {
        *o = v * scale * w.get(i);
    }
}

/// `gate[i] = gate[i] / (1 + e^-gate[i]) · up[i]`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}
