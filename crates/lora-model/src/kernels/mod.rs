//! Small-batch CPU matrix–vector products for decoding, with the LoRA update fused in.
//!
//! A decode step multiplies one (or a few) activation rows by every weight matrix of the model, so its speed is
//! set by how fast the weights stream from memory. libtorch hands these products to its BLAS, whose generic
//! `gemv` path reaches about half of this machine's memory bandwidth on AMD CPUs and converts bf16 weights in a
//! slow loop. The kernels here read each weight row once for all activation rows, accumulate in f32 with AVX2/FMA,
//! and add `scaling · B (A x)` in the same pass, so an unmerged LoRA projection costs one call instead of five
//! libtorch ops.
//!
//! Used only where it is exact to do so: CPU, f32 or bf16 contiguous weights, at most [`MAX_ROWS`] activation
//! rows, no autograd, and a CPU with AVX2 and FMA (AVX-512 and AVX512-BF16 are used where present; see
//! [`SimdPath`]). Everything else (prefill, training, CUDA, other dtypes) goes to
//! libtorch. Results equal libtorch's up to the order of summation (f32) and one final rounding instead of three
//! (bf16: libtorch rounds the base output, the LoRA output and their sum; here only the sum is rounded). Set
//! `LORA_BOUNDARY_KERNELS=off` to route everything to libtorch (for comparisons).
//!
//! The parts, by concern:
//! - `runtime`: the threads a product runs on ([`decode_scope`], the spinning helper thread, `join`) and the
//!   per-thread buffer pool;
//! - `borrow`: tensors borrowed as f32/bf16 slices (`Mat`, `MatMut`) and bf16 rounding;
//! - `schedule`: how the output rows of a split product are handed out to the two threads (`Chunks`, `Out`);
//! - `linear`: the fused projections (`small_linear`, `linear_rows`);
//! - `isa`: which instruction set the inner loops use ([`SimdPath`], [`simd_path`], [`set_simd_path`]);
//! - `simd`: the inner loops, dispatched per instruction set (AVX-512 with or without AVX512-BF16, AVX2/FMA, or
//!   portable scalar loops);
//! - `stats`: [`softmax_stats`], the per-row softmax statistics of the logit lens (two passes over each row of
//!   logits instead of libtorch's softmax, comparison and batched dot-product tensors).
//!
//! Instruction sets: the path is chosen once per process, the fastest the CPU has (detected at run time), and
//! can be forced with `LORA_BOUNDARY_SIMD=scalar|avx2|avx512|avx512bf16` or [`set_simd_path`] (for tests and
//! side-by-side measurements); [`simd_path`] says which one is active. All paths stream each weight row once for
//! all activation rows. AVX2 takes 8 lanes per instruction and re-reads the weight row from L1 for each activation
//! row; AVX-512 takes 16 lanes and masked loads for the columns past the last whole vector, with f32 weights in
//! blocks of two to four weight rows against up to eight activation rows (one accumulator per pair, summed in a
//! fixed order, so that a row's result is the same in any batch) and bf16 weights in tiles of four activation rows
//! (one widening of the weights for four rows); AVX512-BF16 multiplies bf16 weights with
//! `vdpbf16ps`, with the activation rows rounded to bf16 once per call (exact for bf16 activations; see
//! [`SimdPath::Avx512Bf16`]). LoRA's `B` rows are read in the same loop as `W`'s, beside them, into the same
//! accumulators (one reduction per output value for both); the few rows one thread computes before the low-rank
//! input `scaling · A x` is ready take `B` afterwards, in the AVX2 loop that reduces eight narrow rows together.
//! The one-row loops on AVX-512 prefetch 8 KB ahead into L2 (the AVX2 loops 1 KB into L1, as tuned on Zen 1).
//! The helpers of the decode step (dot products, `axpy`, SwiGLU) run on AVX2 on every vector path: they are short
//! and not what limits a step.
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

mod borrow;
mod isa;
mod linear;
mod runtime;
mod schedule;
mod simd;
mod stats;

pub(crate) use borrow::{borrow, borrow_f32_mut, borrow_mut, Mat};
pub use isa::{set_simd_path, simd_path, SimdPath};
pub use linear::linear_on;
pub(crate) use linear::{linear_rows, linear_rows_prepared, small_linear, Linear, LoraPart, Prepared};
pub use runtime::{decode_scope, DecodeScope};
pub(crate) use runtime::{join, pool};
pub(crate) use simd::{attn_scores, attn_values, dot, scale_mul, swiglu};
pub use stats::{softmax_stats, SoftmaxStats};

/// Largest number of activation rows (batch × new tokens) the model sends to the kernels; more go to libtorch's
/// GEMM.
///
/// Up to 8 rows every path streams each weight row once for all rows, which keeps a product memory-bound; the
/// AVX-512 paths take the rows in tiles of four (one load of a weight vector for four rows), the AVX2 path re-reads
/// the row from L1 for each. Somewhere above that, libtorch's blocked GEMM (oneDNN, with AMX for bf16 where the
/// CPU has it) becomes faster: the products turn compute-bound, and these loops do one horizontal sum per output
/// value. 16 is a first guess, not a measurement. How to measure it: `cargo bench -p lora-model --bench kernels
/// -- rows` times [`linear_on`] (which takes any number of rows) against libtorch's `linear` for 1–32 rows on the
/// SmolLM2 and Llama-3.2-1B projection shapes, f32 and bf16, on each path; on a quiet machine, set this to the
/// largest row count at which the active path is still at least as fast as libtorch for every shape and both
/// dtypes, on an AVX2-only and an AVX-512 machine alike (the smaller of the two).
pub const MAX_ROWS: i64 = 16;

/// 0 = not decided yet, 1 = on, 2 = off.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Whether the fused kernels are used: the active [`SimdPath`] is a vector path (or the scalar one was asked for
/// explicitly, for tests), the environment does not say `LORA_BOUNDARY_KERNELS=off`, and [`set_enabled`] did not
/// switch them off.
pub fn enabled() -> bool {
    let on = match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var("LORA_BOUNDARY_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("off") || v == "0");
            STATE.store(if off { 2 } else { 1 }, Ordering::Relaxed);
            !off
        }
    };
    on && path_runs()
}

/// Whether the active path runs the kernels: any vector path, or the scalar one when it was forced.
fn path_runs() -> bool {
    simd_path() != SimdPath::Scalar || isa::forced()
}

/// Switches the fused kernels on or off for the whole process (for side-by-side measurements against libtorch).
/// Switching on has no effect on a CPU without AVX2 and FMA (unless the scalar path was forced). Returns whether
/// they are now used.
pub fn set_enabled(on: bool) -> bool {
    STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    on && path_runs()
}

/// Decode steps that ran on the fused one-token path (see [`Llama::forward_cached`](crate::Llama::forward_cached)),
/// process-wide: for tests and diagnostics.
pub fn fused_decode_steps() -> u64 {
    FUSED_STEPS.load(Ordering::Relaxed)
}

pub(crate) static FUSED_STEPS: AtomicU64 = AtomicU64::new(0);
