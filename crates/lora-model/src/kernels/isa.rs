//! Which instruction set the kernels' inner loops use ([`SimdPath`]): chosen once per process from what the CPU
//! has, overridable by `LORA_BOUNDARY_SIMD` or [`set_simd_path`] so that every path can be tested and compared on
//! one machine.
use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::{ModelError, Result};

/// The instruction set of the kernels' inner loops.
///
/// Each path differs from the others only in the order of summation (f32) and, for [`SimdPath::Avx512Bf16`]
/// with bf16 weights, in rounding the activation rows to bf16 before the products (see its documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SimdPath {
    /// Portable loops: the reference the vector loops are tested against. Chosen automatically only where the
    /// CPU has no AVX2/FMA, and then the kernels stay off (libtorch is faster than these loops); forcing it
    /// (`LORA_BOUNDARY_SIMD=scalar`) runs the kernels on it, for tests.
    Scalar,
    /// AVX2 and FMA: 8 lanes; bf16 weights widened with a shift or a mask per 8 values.
    Avx2,
    /// AVX-512 (F, BW, VL) on top of AVX2/FMA: 16 lanes, masked loads for the columns past the last whole
    /// vector; bf16 weights widened as in [`SimdPath::Avx2`], 32 per load.
    Avx512,
    /// [`SimdPath::Avx512`], with bf16 weights multiplied by `vdpbf16ps` (AVX512-BF16): two bf16 products per
    /// 32-bit lane, accumulated in f32. It needs the activations in bf16 too, so with bf16 weights each activation
    /// row is rounded to bf16 (nearest-even) once per call. That is exact where the activations are bf16 tensors
    /// already (every projection of a bf16 model on libtorch's path: the products of two bf16 values are exact in
    /// f32, as in libtorch's bf16 matmul, which also accumulates in f32), and where the fused decode step hands
    /// over f32 rows (its norms' outputs) it rounds them where libtorch would have rounded them anyway. The
    /// instruction treats bf16 subnormals (below 1.2e-38) as zero. f32 weights run as on [`SimdPath::Avx512`].
    Avx512Bf16,
}

impl SimdPath {
    /// Every path, slowest first.
    pub const ALL: [SimdPath; 4] = [SimdPath::Scalar, SimdPath::Avx2, SimdPath::Avx512, SimdPath::Avx512Bf16];

    /// The name `LORA_BOUNDARY_SIMD` takes: `scalar`, `avx2`, `avx512` or `avx512bf16`.
    pub fn name(self) -> &'static str {
        match self {
            SimdPath::Scalar => "scalar",
            SimdPath::Avx2 => "avx2",
            SimdPath::Avx512 => "avx512",
            SimdPath::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Whether this CPU can run the path (detected at run time).
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            let avx2 = || has!("avx2") && has!("fma");
            let avx512 = || avx2() && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
            match self {
                SimdPath::Scalar => true,
                SimdPath::Avx2 => avx2(),
                SimdPath::Avx512 => avx512(),
                SimdPath::Avx512Bf16 => avx512() && has!("avx512bf16"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == SimdPath::Scalar
        }
    }

    /// The fastest path this CPU supports.
    pub fn best() -> SimdPath {
        SimdPath::ALL.into_iter().rev().find(|p| p.supported()).unwrap_or(SimdPath::Scalar)
    }

    fn code(self) -> u8 {
        match self {
            SimdPath::Scalar => 1,
            SimdPath::Avx2 => 2,
            SimdPath::Avx512 => 3,
            SimdPath::Avx512Bf16 => 4,
        }
    }

    fn from_code(code: u8) -> Option<SimdPath> {
        SimdPath::ALL.into_iter().find(|p| p.code() == code)
    }
}

impl std::fmt::Display for SimdPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SimdPath {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<SimdPath> {
        let s = s.trim();
        SimdPath::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            ModelError::InvalidArgument(format!(
                "unknown SIMD path {s:?} (expected scalar, avx2, avx512 or avx512bf16)"
            ))
        })
    }
}

/// The active path: 0 = not decided yet, else `code()`, plus [`FORCED`] when it was asked for explicitly.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// Flag in [`ACTIVE`]: the path was forced (environment or [`set_simd_path`]) rather than detected.
const FORCED: u8 = 0x10;

/// The path the kernels use now: `LORA_BOUNDARY_SIMD` when it is set to a path this CPU supports (an unknown or
/// unsupported value is logged and ignored), else [`SimdPath::best`], unless [`set_simd_path`] changed it.
pub fn simd_path() -> SimdPath {
    SimdPath::from_code(state() & !FORCED).unwrap_or(SimdPath::Scalar)
}

/// Forces the kernels onto `path` for the whole process (for tests and side-by-side measurements; products
/// running at that moment finish on the path they started with). Returns an error, changing nothing, when this
/// CPU does not support it.
pub fn set_simd_path(path: SimdPath) -> Result<SimdPath> {
    if !path.supported() {
        return Err(unsupported(path));
    }
    ACTIVE.store(path.code() | FORCED, Ordering::Relaxed);
    Ok(path)
}

/// Whether the active path was asked for (environment or [`set_simd_path`]) rather than detected.
pub(super) fn forced() -> bool {
    state() & FORCED != 0
}

pub(super) fn unsupported(path: SimdPath) -> ModelError {
    ModelError::InvalidArgument(format!("SIMD path {path} is not supported by this CPU"))
}

fn state() -> u8 {
    match ACTIVE.load(Ordering::Relaxed) {
        0 => {
            let chosen = match std::env::var("LORA_BOUNDARY_SIMD") {
                Ok(v) if !v.trim().is_empty() && !v.eq_ignore_ascii_case("auto") => match v.parse::<SimdPath>() {
                    Ok(p) if p.supported() => p.code() | FORCED,
                    Ok(p) => {
                        tracing::warn!("LORA_BOUNDARY_SIMD={v}: {}; using {}", unsupported(p), SimdPath::best());
                        SimdPath::best().code()
                    }
                    Err(e) => {
                        tracing::warn!("LORA_BOUNDARY_SIMD: {e}; using {}", SimdPath::best());
                        SimdPath::best().code()
                    }
                },
                _ => SimdPath::best().code(),
            };
            // A concurrent first call decides the same way; whichever store lands, both agree.
            match ACTIVE.compare_exchange(0, chosen, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => chosen,
                Err(now) => now,
            }
        }
        s => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_scalar_is_always_supported() {
        for p in SimdPath::ALL {
            assert_eq!(p.name().parse::<SimdPath>().unwrap(), p);
            assert_eq!(p.to_string().to_uppercase().parse::<SimdPath>().unwrap(), p);
            assert_eq!(SimdPath::from_code(p.code()), Some(p));
        }
        assert!(SimdPath::Scalar.supported());
        assert!(SimdPath::best().supported());
        assert!("sse2".parse::<SimdPath>().is_err());
        // A supported path implies every slower vector path (they build on each other).
        for (k, p) in SimdPath::ALL.iter().enumerate().skip(1) {
            if p.supported() {
                assert!(SimdPath::ALL[1..k].iter().all(|q| q.supported()), "{p} without a slower path");
            }
        }
    }
}
