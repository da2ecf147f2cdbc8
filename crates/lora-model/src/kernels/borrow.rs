//! Contiguous CPU tensors borrowed as f32 or bf16 slices ([`Mat`], [`MatMut`]), and f32 → bf16 rounding.
//!
//! Every function that makes a slice from a tensor's data pointer is `unsafe`: libtorch may share one storage
//! between several `Tensor` handles (views, shallow clones), which Rust's borrow checker cannot see, so each caller
//! states why no other handle writes the storage (or, for a mutable borrow, touches it) while the slice lives.
use tch::{Device, Kind, Tensor};

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
/// The returned slice aliases the tensor's storage; the tensor must outlive it, and no handle to the same storage
/// (this one, a view or a shallow clone) may be written, by any thread, while the slice lives.
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
    match borrow_mut(t)? {
        MatMut::F32(v) => Some(v),
        MatMut::Bf16(_) => None,
    }
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
pub(super) unsafe fn borrow_mat(t: &Tensor) -> Option<(Mat<'_>, usize, usize)> {
    let [rows, cols] = t.size()[..] else { return None };
    let (rows, cols) = (usize::try_from(rows).ok()?, usize::try_from(cols).ok()?);
    Some((borrow_n(t, rows.checked_mul(cols)?)?, rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_libtorch() {
        // Exact halfway cases (ties to even, down and up), just above halfway, and ordinary values.
        let bits = [0x3F80_8000u32, 0x3F81_8000, 0x3F80_8001, 0xBF80_7FFF, 0x0000_0001, 0x7F7F_FFFF];
        let mut vals: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        vals.extend([0.0f32, 1.0, -1.0, std::f32::consts::PI, -std::f32::consts::E, 1e-30, 65504.0]);
        let t = Tensor::from_slice(&vals).to_kind(Kind::BFloat16);
        // SAFETY: `t` outlives the borrow, and it is this test's own tensor (no other handle, no other thread), so
        // nothing writes it while the slice lives.
        let Some(Mat::Bf16(bits)) = (unsafe { borrow(&t) }) else { panic!("bf16 tensor") };
        for (v, &want) in vals.iter().zip(bits) {
            assert_eq!(to_bf16(*v), want, "{v}");
        }
    }
}
